"""Shared test helpers: SPEC's equivalence bounds and structured weights."""

from __future__ import annotations

import jax
import numpy as np

from duquant_jax import Pack
from duquant_jax.reference import block_ranges

ORTHO_TOL = 1e-5
ROT_TOL = 1e-4
FORWARD_TOL = 1e-5


def to_numpy(pack: Pack) -> Pack:
    return jax.tree.map(np.asarray, pack)


def rel_err(y, y_ref) -> float:
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    denom = np.linalg.norm(y_ref)
    return float(np.linalg.norm(y - y_ref) / (denom if denom > 0 else 1.0))


def max_ortho_err(r) -> float:
    r = np.asarray(r, np.float64)
    eye = np.eye(r.shape[-1])
    return float(np.abs(np.swapaxes(r, -1, -2) @ r - eye).max())


def well_separated(x: np.ndarray) -> bool:
    """SPEC: each gap between adjacent singular values >= 1e-2 of the largest, the smallest >= 1e-6 of it."""
    b, n = x.shape
    if n < b:
        return False
    s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
    if s[0] == 0:
        return False
    return bool(np.all(-np.diff(s) >= 1e-2 * s[0]) and s[-1] >= 1e-6 * s[0])


def separated_blocks(w: np.ndarray, ref: Pack) -> tuple[list[bool], list[bool]]:
    """Which input and output blocks of `w` have a unique rotation (SPEC's table)."""
    w = np.asarray(w, np.float64)
    cfg = ref.config
    wp = w[:, ref.perm]
    ins = [well_separated(wp[:, list(c)].T) for c in block_ranges(w.shape[1], cfg.block_size)]
    outs = []
    if cfg.rotate_rows:
        outs = [well_separated(w[list(r), :]) for r in block_ranges(w.shape[0], cfg.out_block_size)]
    return ins, outs


def structured_weight(kind: str, out: int, n_in: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, n_in)).astype(np.float32)
    if kind == "outlier_columns":
        w[:, rng.choice(n_in, size=max(1, n_in // 50), replace=False)] *= 50.0
    elif kind == "low_rank":
        w = (rng.standard_normal((out, 3)) @ rng.standard_normal((3, n_in))).astype(np.float32)
    elif kind == "zero_block":
        w[:, : min(n_in, 20)] = 0.0
    elif kind == "heavy_tails":
        w = rng.standard_t(df=2, size=(out, n_in)).astype(np.float32)
    elif kind != "gaussian":
        raise ValueError(kind)
    return w
