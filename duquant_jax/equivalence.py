"""SPEC's equivalence contract between a pack and the float64 reference, as reusable checks."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from duquant_jax import reference
from duquant_jax.config import DuQuantConfig
from duquant_jax.packed import Pack
from duquant_jax.reference import block_ranges

ORTHO_TOL = 1e-5
ROT_TOL = 1e-4
FORWARD_TOL = 1e-5
CODES_IDENTICAL = 0.999


def rel_err(y, y_ref) -> float:
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    denom = np.linalg.norm(y_ref)
    return float(np.linalg.norm(y - y_ref) / (denom if denom > 0 else 1.0))


def max_ortho_err(r) -> float:
    """max |R^T R - I| over a stack of rotations (..., B, B)."""
    r = np.asarray(r, np.float64)
    return float(np.abs(np.swapaxes(r, -1, -2) @ r - np.eye(r.shape[-1])).max())


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


@dataclasses.dataclass(frozen=True)
class Report:
    """One pack checked against the reference, with SPEC's bounds."""

    perm_identical: bool
    ortho_err: float
    rot_err: float  # max |R - R_ref| over well-separated blocks (0 when none)
    separated: float  # share of blocks that are well separated
    codes_identical: float
    codes_max_diff: int
    exact_forward_err: float

    @property
    def ok(self) -> bool:
        codes_ok = self.separated < 1.0 or (self.codes_max_diff <= 1 and self.codes_identical >= CODES_IDENTICAL)
        return (
            self.perm_identical
            and self.ortho_err <= ORTHO_TOL
            and self.rot_err <= ROT_TOL
            and self.exact_forward_err <= FORWARD_TOL
            and codes_ok
        )


def check_pack(pack: Pack, w, seed: int = 0) -> Report:
    """Checks `pack` (made from `w: (out, in)`) against the reference path's pack of `w`."""
    w = np.asarray(w, np.float32)
    return compare(pack, reference.pack_weight(w, pack.config), w, seed)


def compare(pack: Pack, want: Pack, w, seed: int = 0) -> Report:
    """Checks `pack` against `want`, the reference path's pack of `w: (out, in)` (same config)."""
    from duquant_jax.pack import forward, pack_with_rotations

    got = jax.tree.map(np.asarray, pack)
    w = np.asarray(w, np.float32)
    sep_in, sep_out = separated_blocks(w, want)
    rot = [np.abs(got.r_in[k] - want.r_in[k]).max() for k in np.flatnonzero(sep_in)]
    rot += [np.abs(got.r_out[r] - want.r_out[r]).max() for r in np.flatnonzero(sep_out)]
    rotations = [got.r_in] + ([got.r_out] if got.r_out is not None else [])
    codes_same, codes_diff = 1.0, 0
    if pack.config.quantize_weights:
        diff = np.abs(got.w_codes.astype(np.int64) - want.w_codes.astype(np.int64))
        codes_same, codes_diff = float(np.mean(diff == 0)), int(diff.max())
    exact_cfg = DuQuantConfig(**{**pack.config.to_dict(), "weight_bits": 16, "act_bits": 16, "row_rot_mode": "restore"})
    exact = pack_with_rotations(w, got.perm, got.r_in, got.r_out, exact_cfg) if got.r_out is not None else None
    x = np.random.default_rng(seed).standard_normal((16, w.shape[1])).astype(np.float32)
    if exact is None:  # row_rot_mode "none": check the input rotations alone
        exact = pack_with_rotations(w, got.perm, got.r_in, None, dataclasses.replace(exact_cfg, row_rot_mode="none"))
    fwd = rel_err(forward(exact, x), x.astype(np.float64) @ w.astype(np.float64).T)
    n_blocks = len(sep_in) + len(sep_out)
    return Report(
        perm_identical=bool(np.array_equal(got.perm, want.perm)),
        ortho_err=max(max_ortho_err(r) for r in rotations),
        rot_err=float(max(rot, default=0.0)),
        separated=(sum(sep_in) + sum(sep_out)) / n_blocks,
        codes_identical=codes_same,
        codes_max_diff=codes_diff,
        exact_forward_err=fwd,
    )
