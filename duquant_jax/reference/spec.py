"""SPEC's building blocks in float64, written literally (docs/ALGORITHM.md "Packing a weight").

Energy and zigzag (steps 1-2), the SVD's `U` with canonical signs (steps 3 and 5,
"Canonical signs"), the stacked layout ("Stacked storage") and the MSE-grid
scales (step 7). `duquant_jax.reference.pipeline` composes them.
"""

from __future__ import annotations

import math

import numpy as np

from duquant_jax.config import qmax
from duquant_jax.quantize import SCALE_ALPHAS


ENERGY_ROWS = 512


def channel_energy(w: np.ndarray, lambda_smooth: float, col_scale: np.ndarray | None = None) -> np.ndarray:
    """SPEC step 1. w: (out, in), any float dtype -> e: (in,) float64, `mean_i w_ij²` then smoothing.

    Squares are summed in float64, `ENERGY_ROWS` rows at a time (the same order on every
    path: the JAX path calls this function too, so both permutations are identical), which
    needs no float64 copy of the whole weight. `col_scale (in,)` float64: the energies of
    `w * col_scale` (a smoothed weight), each chunk scaled in float64 as it is read, so the
    result equals `channel_energy(w.astype(float64) * col_scale)` bit for bit.
    """
    w = np.asarray(w)
    total = np.zeros(w.shape[1])
    for start in range(0, w.shape[0], ENERGY_ROWS):
        chunk = w[start : start + ENERGY_ROWS].astype(np.float64)
        if col_scale is not None:
            chunk *= col_scale
        total += np.einsum("ij,ij->j", chunk, chunk)
    e = total / w.shape[0]
    if lambda_smooth > 0:
        e = (1.0 - lambda_smooth) * e + lambda_smooth * np.mean(e)
    return e


def zigzag(e: np.ndarray) -> np.ndarray:
    """SPEC step 2. e: (in,) energies -> perm: (in,), front/back alternately of the descending order."""
    n = len(e)
    order = sorted(range(n), key=lambda j: (-e[j], j))
    perm = []
    front, back = 0, n - 1
    while front <= back:
        perm.append(order[front])
        front += 1
        if front <= back:
            perm.append(order[back])
            back -= 1
    return np.asarray(perm, dtype=np.int64)


def canonical_signs(u: np.ndarray) -> np.ndarray:
    """SPEC "Canonical signs": each column's largest-magnitude entry (first on a tie) made positive."""
    u = u.copy()
    for c in range(u.shape[1]):
        i = int(np.argmax(np.abs(u[:, c])))
        if u[i, c] < 0:
            u[:, c] = -u[:, c]
    return u


def left_rotation(x: np.ndarray) -> np.ndarray:
    """`U` (b x b) of the SVD `x = U S V^T`, x: (b, N), canonical signs."""
    b, n = x.shape
    u = np.linalg.svd(x, full_matrices=n < b)[0]  # b x b either way
    return canonical_signs(u)


def stack_blocks(blocks: list[np.ndarray], size: int) -> np.ndarray:
    """SPEC "Stacked storage": (n, size, size), a short block `U` as `diag(U, I)`."""
    out = np.zeros((len(blocks), size, size))
    for k, u in enumerate(blocks):
        b = u.shape[0]
        out[k] = np.eye(size)
        out[k, :b, :b] = u
    return out


def block_ranges(n: int, size: int) -> list[range]:
    return [range(k * size, min((k + 1) * size, n)) for k in range(math.ceil(n / size))]


def weight_scales(w2: np.ndarray, bits: int, alphas: tuple[float, ...] = SCALE_ALPHAS) -> np.ndarray:
    """SPEC step 7: per-row scale among `base / alpha` (alpha in `alphas`, SPEC's SCALE_ALPHAS by
    default) with the least squared error, the first on a tie."""
    qm = qmax(bits)
    scales = np.empty(w2.shape[0])
    for i, row in enumerate(w2):
        base = max(np.max(np.abs(row)) / qm, 1e-8)
        best_err, best = None, None
        for alpha in alphas:
            s = base / alpha
            err = np.mean((np.clip(np.round(row / s), -qm - 1, qm) * s - row) ** 2)
            if best_err is None or err < best_err:
                best_err, best = err, s
        scales[i] = best
    return scales
