"""The literal float64 path: SPEC step by step, loops over blocks, `np.linalg.svd`.

This is the oracle the JAX and PyTorch paths are tested against. It is written
to be checked against SPEC line by line, not to be fast.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from duquant_jax.checks import check_bias, check_input, check_weight, require_scales
from duquant_jax.config import DuQuantConfig, qmax
from duquant_jax.packed import Pack
from duquant_jax.quantize import SCALE_ALPHAS


def channel_energy(w: np.ndarray, lambda_smooth: float) -> np.ndarray:
    """SPEC step 1. w: (out, in) -> e: (in,)."""
    e = np.mean(w**2, axis=0)
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


def weight_scales(w2: np.ndarray, bits: int) -> np.ndarray:
    """SPEC step 7: per-row scale among `base / alpha` with the least squared error."""
    qm = qmax(bits)
    scales = np.empty(w2.shape[0])
    for i, row in enumerate(w2):
        base = max(np.max(np.abs(row)) / qm, 1e-8)
        best_err, best = None, None
        for alpha in SCALE_ALPHAS:
            s = base / alpha
            err = np.mean((np.clip(np.round(row / s), -qm - 1, qm) * s - row) ** 2)
            if best_err is None or err < best_err:
                best_err, best = err, s
        scales[i] = best
    return scales


def pack_weight(w: Any, config: DuQuantConfig = DuQuantConfig()) -> Pack:
    """Packs `w: (out, in)` in float64 by SPEC; returns a Pack of NumPy arrays."""
    check_weight(w)
    w = np.asarray(w, dtype=np.float64)
    out, n_in_ch = w.shape
    B, Bo = config.block_size, config.out_block_size

    if config.enable_permute:
        perm = zigzag(channel_energy(w, config.lambda_smooth))
    else:
        perm = np.arange(n_in_ch)
    wp = w[:, perm]

    r_in_blocks = [left_rotation(wp[:, list(cols)].T) for cols in block_ranges(n_in_ch, B)]
    w1 = np.empty_like(wp)
    for cols, u in zip(block_ranges(n_in_ch, B), r_in_blocks):
        w1[:, list(cols)] = wp[:, list(cols)] @ u

    r_out = None
    w2 = w1
    if config.rotate_rows:
        r_out_blocks = [left_rotation(w[list(rows), :]) for rows in block_ranges(out, Bo)]
        w2 = np.empty_like(w1)
        for rows, u in zip(block_ranges(out, Bo), r_out_blocks):
            w2[list(rows), :] = u @ w1[list(rows), :]
        r_out = stack_blocks(r_out_blocks, Bo)

    if config.quantize_weights:
        qm = qmax(config.weight_bits)
        w_scale = weight_scales(w2, config.weight_bits)
        w_codes = np.clip(np.round(w2 / w_scale[:, None]), -qm - 1, qm).astype(np.int8)
    else:
        w_scale = np.ones(out)
        w_codes = w2

    return Pack(
        perm=perm,
        r_in=stack_blocks(r_in_blocks, B),
        r_out=r_out,
        w_scale=w_scale,
        w_codes=w_codes,
        a_scale=None,
        config=config,
    )


def rotate_input(pack: Pack, x: np.ndarray) -> np.ndarray:
    """Forward steps 1-2: `x2 = x[..., perm] diag(R_in)`, block by block."""
    x1 = np.asarray(x, dtype=np.float64)[..., pack.perm]
    x2 = np.empty_like(x1)
    for k, cols in enumerate(block_ranges(pack.in_features, pack.config.block_size)):
        b = len(cols)
        x2[..., list(cols)] = x1[..., list(cols)] @ np.asarray(pack.r_in[k], np.float64)[:b, :b]
    return x2


def dequantized_weight(pack: Pack) -> np.ndarray:
    """`W_hat = Q * s` (out, in), float64."""
    return np.asarray(pack.w_codes, np.float64) * np.asarray(pack.w_scale, np.float64)[:, None]


def forward(pack: Pack, x: Any, bias: Any = None) -> np.ndarray:
    """SPEC "Forward pass" in float64. x: (..., in) -> y: (..., out)."""
    cfg = pack.config
    check_input(x, pack.in_features)
    check_bias(bias, pack.out_features)
    x2 = rotate_input(pack, x)
    if cfg.quantize_acts:
        require_scales(pack.a_scale)
        qa = qmax(cfg.act_bits)
        s_a = np.asarray(pack.a_scale, np.float64)
        x2 = np.clip(np.round(x2 / s_a), -qa - 1, qa) * s_a
    y1 = x2 @ dequantized_weight(pack).T
    b = np.zeros(pack.out_features) if bias is None else np.asarray(bias, np.float64)

    if cfg.row_rot_mode == "none":
        return y1 + b
    y = np.empty_like(y1)
    b_rot = np.empty_like(b)
    for r, rows in enumerate(block_ranges(pack.out_features, cfg.out_block_size)):
        n = len(rows)
        u = np.asarray(pack.r_out[r], np.float64)[:n, :n]
        y[..., list(rows)] = y1[..., list(rows)] @ u
        b_rot[list(rows)] = u @ b[list(rows)]
    if cfg.row_rot_mode == "restore":
        return y + b
    return y1 + b_rot  # "propagate"


def calibrate(pack: Pack, batches: Iterable[Any]) -> Pack:
    """SPEC "Activation calibration": element-wise max over batches of the percentile of |x2|."""
    cfg = pack.config
    running = None
    for i, x in enumerate(batches):
        if i >= cfg.calib_batches:
            break
        check_input(x, pack.in_features, name=f"calibration batch {i}", finite=True)
        x2 = rotate_input(pack, x).reshape(-1, pack.in_features)
        p = np.percentile(np.abs(x2), cfg.act_percentile, axis=0)
        running = p if running is None else np.maximum(running, p)
    if running is None:
        raise ValueError("calibrate needs at least one batch; got an empty iterable")
    if not cfg.quantize_acts:
        return pack
    return pack.replace(a_scale=np.maximum(running / qmax(cfg.act_bits), 1e-6))
