"""Fitting a layer's transforms before the jitted pack: which pieces each rotation family needs.

SPEC's "svd" family fits its rotations inside the jitted pack (from the weight);
everything fitted here is small (vectors of `in` or `out`, one `b x b` matrix)
and drawn from the config's seed or the layer's activation statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from duquant_jax.config import DuQuantConfig
from duquant_jax.permutation import input_permutation
from duquant_jax.reference.spec import ENERGY_ROWS
from duquant_jax.stats import LayerStats
from duquant_jax.transforms import greedy, hadamard
from duquant_jax.transforms.smooth import smoothing_factors


@dataclasses.dataclass(frozen=True)
class Fitted:
    """The pieces of a layer's transform known before the jitted pack (NumPy, float32/int32).

    `r_in` and `r_out` are None for the "svd" family, whose rotations the jitted
    pack computes from the weight; see `duquant_jax.packed.Pack` for the shapes.
    """

    perm: np.ndarray
    in_diag: np.ndarray | None = None
    r_pre: np.ndarray | None = None
    r_in: np.ndarray | None = None
    r_out: np.ndarray | None = None
    out_diag: np.ndarray | None = None


def _column_absmax(w32: np.ndarray) -> np.ndarray:
    """w32: (out, in) float32 -> (in,) `max_i |w_ij|`, `ENERGY_ROWS` rows at a time (no (out, in) temporary)."""
    top = np.zeros(w32.shape[1], np.float32)
    for start in range(0, w32.shape[0], ENERGY_ROWS):
        np.maximum(top, np.abs(w32[start : start + ENERGY_ROWS]).max(axis=0), out=top)
    return top


def _signs_f32(n: int, seed: int, stream: int) -> np.ndarray:
    return hadamard.random_signs(n, seed, stream).astype(np.float32)


def fit(w: Any, config: DuQuantConfig, stats: LayerStats | None = None) -> Fitted:
    """w: (out, in) weight -> the Fitted pieces of its transform (module docstring).

    Smoothing (when `smooth_alpha` is set) makes `in_diag = 1/s`; the Hadamard
    family multiplies it by random signs. The permutation is decided on the
    smoothed weight (float64, as the reference path does), so both paths agree; it is
    smoothed chunk by chunk as its energies are summed, with no float64 copy of the whole
    weight (two of them were 0.5 GiB for a 16384-wide down projection).
    """
    out, n_in = w.shape
    in_diag = None
    s = None
    w32 = None
    if config.smooth_alpha is not None:
        w32 = np.asarray(jnp.asarray(w, jnp.float32))
        # max |w| in float32 is exact, so this equals the float64 weight's column maxima
        s = smoothing_factors(stats.act_absmax, _column_absmax(w32), config.smooth_alpha)
        in_diag = 1.0 / s

    def weight_perm() -> np.ndarray:
        return input_permutation(w if w32 is None else w32, config.enable_permute, config.lambda_smooth, s)

    if config.rotation == "svd":
        return Fitted(perm=weight_perm(), in_diag=_f32(in_diag))
    if config.rotation == "none":
        return Fitted(perm=weight_perm(), in_diag=_f32(in_diag))

    rows = _row_transform(out, config)
    if config.rotation == "hadamard":
        b = hadamard.block_for(n_in, config.block_size)
        signs = hadamard.random_signs(n_in, config.seed, hadamard.INPUT_STREAM)
        in_diag = signs if in_diag is None else in_diag * signs
        return Fitted(perm=weight_perm(), in_diag=_f32(in_diag), r_in=_f32(hadamard.hadamard_matrix(b)[None]), **rows)

    # "duquant": both rotations fitted on the (smoothed) activation maxima.
    b = greedy.block_for(n_in, config.block_size)
    m = np.asarray(stats.act_absmax, np.float64)
    if s is not None:
        m = m / s
    base_pre = greedy.base_rotation(b, config.seed, greedy.PRE_STREAM)
    r_pre = np.asarray(greedy.greedy_rotation(jnp.asarray(m.reshape(-1, b), jnp.float32), jnp.asarray(base_pre, jnp.float32), config.greedy_steps))
    m1 = (m.reshape(-1, b) @ r_pre.astype(np.float64)).reshape(-1)
    perm = greedy.zigzag_blocks(m1, b) if config.enable_permute else np.arange(n_in, dtype=np.int32)
    base_post = greedy.base_rotation(b, config.seed, greedy.POST_STREAM)
    r_in = np.asarray(greedy.greedy_rotation(jnp.asarray(m1[perm].reshape(-1, b), jnp.float32), jnp.asarray(base_post, jnp.float32), config.greedy_steps))
    return Fitted(perm=perm, in_diag=_f32(in_diag), r_pre=_f32(r_pre[None]), r_in=_f32(r_in[None]), **rows)


def _row_transform(out: int, config: DuQuantConfig) -> dict[str, np.ndarray | None]:
    """Output rows of the "hadamard" and "duquant" families: random signs, then a block Hadamard."""
    if not config.rotate_rows:
        return {}
    bo = hadamard.block_for(out, config.out_block_size)
    return {"r_out": _f32(hadamard.hadamard_matrix(bo)[None]), "out_diag": _signs_f32(out, config.seed, hadamard.OUTPUT_STREAM)}


def _f32(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a, np.float32)
