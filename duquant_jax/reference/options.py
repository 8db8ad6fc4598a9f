"""The options added beside SPEC, in float64, written literally (docs/ALGORITHM.md "Options").

Greedy rotation and zigzag of the "duquant" family, block rotations with one shared
matrix, grouped and min-max weight scales, and the activation schemes. The random
matrices and signs come from `duquant_jax.transforms` (deterministic from the seed),
so the reference and the JAX path draw the same ones.
"""

from __future__ import annotations

import numpy as np

from duquant_jax.config import qmax
from duquant_jax.quantize import scale_alphas
from duquant_jax.reference.spec import block_ranges
from duquant_jax.reference.spec import weight_scales as spec_row_scales


def exchange(base: np.ndarray, c: int) -> np.ndarray:
    """`E_c base E_c`: rows and columns 0 and `c` exchanged."""
    m = base.copy()
    m[[0, c], :] = m[[c, 0], :]
    m[:, [0, c]] = m[:, [c, 0]]
    return m


def greedy_rotation(v: np.ndarray, base: np.ndarray, steps: int) -> np.ndarray:
    """v: (n, b) statistic, base: (b, b) -> R: (b, b), the product of the best prefix of greedy steps.

    Before each step and after the last, the peak `max(v) - min(v)` is recorded; a
    step takes the channel (column) of whichever of the max and min entries has the
    larger magnitude (the max on a tie) and multiplies `v` by `E_c base E_c`.
    """
    v = np.asarray(v, np.float64).copy()
    peaks, channels = [], []
    for step in range(steps + 1):
        flat = v.reshape(-1)
        hi, lo = int(np.argmax(flat)), int(np.argmin(flat))
        peaks.append(flat[hi] - flat[lo])
        if step == steps:
            break
        c = hi % v.shape[1] if abs(flat[hi]) > abs(flat[lo]) else lo % v.shape[1]
        channels.append(c)
        v = v @ exchange(base, c)
    keep = int(np.argmin(peaks))
    r = np.eye(base.shape[0])
    for c in channels[:keep]:
        r = r @ exchange(base, c)
    return r


def zigzag_blocks(m: np.ndarray, b: int) -> np.ndarray:
    """The paper's zigzag: channels by descending |m| dealt to in/b blocks 0..K-1, K-1..0, 0.."""
    n = len(m)
    k = n // b
    order = sorted(range(n), key=lambda j: (-abs(m[j]), j))
    buckets: list[list[int]] = [[] for _ in range(k)]
    cur, step = 0, 1
    for j in order:
        buckets[cur].append(j)
        if not 0 <= cur + step < k:
            step = -step  # the end bucket takes a second channel before turning
        else:
            cur += step
    return np.asarray([j for bucket in buckets for j in bucket], dtype=np.int64)


def rotate_blocks(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """x: (..., C), r: (n, B, B) -> x with each block of B channels times its matrix.

    One matrix per block (the last one's leading `b x b` part for a short block),
    or, when n == 1, the same matrix for every block.
    """
    c = x.shape[-1]
    size = r.shape[-1]
    y = np.empty_like(x)
    for k, cols in enumerate(block_ranges(c, size)):
        u = np.asarray(r[k if r.shape[0] > 1 else 0], np.float64)[: len(cols), : len(cols)]
        y[..., list(cols)] = x[..., list(cols)] @ u
    return y


def group_scales(w2: np.ndarray, bits: int, group_size: int | None, method: str) -> np.ndarray:
    """w2: (out, in) -> (out,) or (out, ceil(in / G)): SPEC's grid ("mse"), the finer grid ("mse-fine")
    or `base` ("minmax") per group."""
    out, n = w2.shape
    groups = [range(0, n)] if group_size is None else block_ranges(n, group_size)
    scales = np.empty((out, len(groups)))
    for g, cols in enumerate(groups):
        part = w2[:, list(cols)]
        if method == "minmax":
            scales[:, g] = np.maximum(np.abs(part).max(axis=1) / qmax(bits), 1e-8)
        else:
            scales[:, g] = spec_row_scales(part, bits, scale_alphas(method))
    return scales[:, 0] if group_size is None else scales


def code_scales(w_scale: np.ndarray, n: int, group_size: int | None) -> np.ndarray:
    """(out,) or (out, groups) -> (out, n): the scale of each code."""
    w_scale = np.asarray(w_scale, np.float64)
    if group_size is None:
        return np.repeat(w_scale[:, None], n, axis=1)
    return np.stack([w_scale[:, j // group_size] for j in range(n)], axis=1)


def fake_quantize_acts(x2: np.ndarray, a_scale, scheme: str, bits: int, clip: float, group: int = 128) -> np.ndarray:
    """x2: (..., in) -> its fake quantization under `scheme` (docs/ALGORITHM.md "Activation schemes");
    `group`: channels per scale group of "dynamic-group"."""
    qa = qmax(bits)
    if scheme == "dynamic-token":
        s = np.maximum(clip * np.abs(x2).max(axis=-1, keepdims=True) / qa, 1e-8)
    elif scheme == "dynamic-group":
        s = np.empty(x2.shape)
        for cols in block_ranges(x2.shape[-1], group):
            part = x2[..., cols.start : cols.stop]
            s[..., cols.start : cols.stop] = np.maximum(clip * np.abs(part).max(axis=-1, keepdims=True) / qa, 1e-8)
    else:
        s = np.asarray(a_scale, np.float64)  # (in,) per channel, or (1,) per tensor
    return np.clip(np.round(x2 / s), -qa - 1, qa) * s
