"""The literal float64 path, composed: `pack_weight`, `forward`, `calibrate` for every option.

Written to be read against docs/ALGORITHM.md ("Packing a weight", "Options",
"Forward pass", "Activation calibration") line by line, not to be fast: loops over
blocks, rows and groups, `np.linalg.svd`, dense matrices where that is clearest.
With `DuQuantConfig()` it is SPEC's algorithm step by step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

from duquant_jax.checks import (
    check_bias,
    check_input,
    check_stats,
    check_weight,
    require_scales,
)
from duquant_jax.config import DuQuantConfig, qmax
from duquant_jax.packed import Pack
from duquant_jax.reference import options
from duquant_jax.reference.spec import (
    block_ranges,
    channel_energy,
    left_rotation,
    stack_blocks,
    zigzag,
)
from duquant_jax.stats import LayerStats
from duquant_jax.transforms import greedy, hadamard
from duquant_jax.transforms.smooth import smoothing_factors


def _spec_rotations(m: np.ndarray, size: int) -> np.ndarray:
    """SPEC steps 3/5: the canonical-sign `U` of each block of `size` rows of `m`, stacked."""
    return stack_blocks([left_rotation(m[list(rows), :]) for rows in block_ranges(m.shape[0], size)], size)


@dataclasses.dataclass(frozen=True)
class InputSide:
    """A layer's input transform, fitted (float64): `s` the smoothing factors (or None), `signs` the
    Hadamard family's input signs (or None), and the Pack fields `in_diag`, `r_pre`, `perm`, `r_in`."""

    s: np.ndarray | None
    signs: np.ndarray | None
    in_diag: np.ndarray | None
    r_pre: np.ndarray | None
    perm: np.ndarray
    r_in: np.ndarray | None


def _smoothed(w: np.ndarray, side: InputSide) -> np.ndarray:
    """W diag(s): the weight as smoothing leaves it (W itself without smoothing)."""
    return w if side.s is None else w * side.s[None, :]


def _staged(w: np.ndarray, side: InputSide) -> np.ndarray:
    """The weight in the basis before the input rotations: smoothed, signed, rotated by r_pre, permuted."""
    w = _smoothed(w, side)
    if side.signs is not None:
        w = w * side.signs[None, :]
    if side.r_pre is not None:
        w = options.rotate_blocks(w, side.r_pre)
    return w[:, side.perm]


def input_side(w: Any, config: DuQuantConfig = DuQuantConfig(), stats: LayerStats | None = None) -> InputSide:
    """Fits the input transform of `w: (out, in)`: smoothing, the family's transform before the
    permutation, the permutation, the input rotations (docs/ALGORITHM.md "Packing a weight", steps 1-3).
    For layers that read one input, `w` is their stacked weight (`pack_group`)."""
    w = np.asarray(w, dtype=np.float64)
    n_in = w.shape[1]
    B = config.block_size

    # Smoothing: x -> x / s, W -> W diag(s).
    in_diag = s = None
    if config.smooth_alpha is not None:
        s = smoothing_factors(stats.act_absmax, np.abs(w).max(axis=0), config.smooth_alpha)
        w = w * s[None, :]
        in_diag = 1.0 / s

    # The family's transform before the permutation.
    r_pre = signs = None
    if config.rotation == "hadamard":
        signs = hadamard.random_signs(n_in, config.seed, hadamard.INPUT_STREAM)
        w = w * signs[None, :]
        in_diag = signs if in_diag is None else in_diag * signs
    if config.rotation == "duquant":
        b = greedy.block_for(n_in, B)
        m = np.asarray(stats.act_absmax, np.float64) * (1.0 if in_diag is None else in_diag)
        r_pre = options.greedy_rotation(m.reshape(-1, b), greedy.base_rotation(b, config.seed, greedy.PRE_STREAM), config.greedy_steps)[None]
        w = options.rotate_blocks(w, r_pre)
        m = options.rotate_blocks(m, r_pre)
        perm = options.zigzag_blocks(m, b) if config.enable_permute else np.arange(n_in)
    else:
        perm = zigzag(channel_energy(w, config.lambda_smooth)) if config.enable_permute else np.arange(n_in)
    wp = w[:, perm]

    # Input rotations.
    if config.rotation == "svd":
        r_in = _spec_rotations(wp.T, B)
    elif config.rotation == "hadamard":
        r_in = hadamard.hadamard_matrix(hadamard.block_for(n_in, B))[None]
    elif config.rotation == "duquant":
        b = r_pre.shape[-1]
        r_in = options.greedy_rotation(m[perm].reshape(-1, b), greedy.base_rotation(b, config.seed, greedy.POST_STREAM), config.greedy_steps)[None]
    else:
        r_in = None
    return InputSide(s=s, signs=signs, in_diag=in_diag, r_pre=r_pre, perm=perm, r_in=r_in)


def pack_weight(w: Any, config: DuQuantConfig = DuQuantConfig(), stats: LayerStats | None = None) -> Pack:
    """Packs `w: (out, in)` in float64; returns a Pack of NumPy arrays."""
    check_weight(w)
    check_stats(stats, config, tuple(np.shape(w)))
    return pack_with_input_side(w, input_side(w, config, stats), config, stats)


def pack_group(ws: Sequence[Any], config: DuQuantConfig = DuQuantConfig(), stats: LayerStats | None = None) -> list[Pack]:
    """Layers that read one input (`duquant_jax.shared_input`): the input transform fitted once on
    the stacked weight `[W_1; ...; W_k]`, then each layer packed with it; one Pack per weight."""
    for w in ws:
        check_weight(w)
        check_stats(stats, config, tuple(np.shape(w)))
    side = input_side(np.concatenate([np.asarray(w, np.float64) for w in ws], axis=0), config, stats)
    return [pack_with_input_side(w, side, config, stats) for w in ws]


def pack_with_input_side(w: Any, side: InputSide, config: DuQuantConfig, stats: LayerStats | None = None) -> Pack:
    """Packs `w: (out, in)` with a fitted input transform: output rows, scales and codes (steps 4-8)."""
    w = np.asarray(w, dtype=np.float64)
    out, n_in = w.shape
    Bo = config.out_block_size
    perm, r_in, r_pre, in_diag = side.perm, side.r_in, side.r_pre, side.in_diag
    wp = _staged(w, side)
    w1 = wp if r_in is None else options.rotate_blocks(wp, r_in)
    w = _smoothed(w, side)  # the svd family's row rotations come from the smoothed W's row blocks

    # Output rows.
    r_out = out_diag = None
    w2 = w1
    if config.rotate_rows:
        if config.rotation == "svd":
            r_out = _spec_rotations(w, Bo)  # the U of the row blocks of W (as smoothed)
        else:
            r_out = hadamard.hadamard_matrix(hadamard.block_for(out, Bo))[None]
            out_diag = hadamard.random_signs(out, config.seed, hadamard.OUTPUT_STREAM)
            w2 = out_diag[:, None] * w2
        w2 = options.rotate_blocks(w2.T, np.swapaxes(r_out, -1, -2)).T  # diag(r_out) @ w2

    # Scales and codes.
    if config.quantize_weights:
        qm = qmax(config.weight_bits)
        w_scale = options.group_scales(w2, config.weight_bits, config.weight_group_size, config.scale_method)
        scale = options.code_scales(w_scale, n_in, config.weight_group_size)
        if config.needs_xtx:
            from duquant_jax.reference.gptq import gptq_rounding

            t = transform_matrix(n_in, perm, r_in, in_diag, r_pre)
            h2 = t.T @ np.asarray(stats.xtx, np.float64) @ t
            rounding = gptq_rounding(
                w2, h2, w_scale, config.weight_bits, group_size=config.weight_group_size, damp=config.gptq_damp,
                block=config.gptq_block, act_order=config.gptq_act_order,
                fit_scales=None if config.gptq_static_groups else config.scale_method,
            )
            w_codes = rounding.codes.astype(np.int8)
            if not config.gptq_static_groups:  # each group's scale fitted as the rounding reached it
                w_scale = rounding.scales
        else:
            w_codes = np.clip(np.round(w2 / scale), -qm - 1, qm).astype(np.int8)
    else:
        w_scale = np.ones(out)
        w_codes = w2

    return Pack(
        perm=perm, r_in=r_in, r_out=r_out, w_scale=w_scale, w_codes=w_codes, a_scale=None, config=config,
        in_diag=in_diag, r_pre=r_pre, out_diag=out_diag,
    )


def rotate_input(pack: Pack, x: np.ndarray) -> np.ndarray:
    """Forward steps 1-2: `x2 = rot(rot(x * in_diag, r_pre)[..., perm], r_in)`, block by block."""
    x = np.asarray(x, dtype=np.float64)
    if pack.in_diag is not None:
        x = x * np.asarray(pack.in_diag, np.float64)
    if pack.r_pre is not None:
        x = options.rotate_blocks(x, pack.r_pre)
    x1 = x[..., np.asarray(pack.perm)]
    return x1 if pack.r_in is None else options.rotate_blocks(x1, pack.r_in)


def transform_matrix(n: int, perm, r_in, in_diag=None, r_pre=None) -> np.ndarray:
    """The dense (n, n) matrix T of the input transform: `rotate_input(x) = x T`."""
    eye = np.eye(n)
    pack = Pack(perm=perm, r_in=r_in, r_out=None, w_scale=None, w_codes=np.zeros((1, n)), a_scale=None,
                config=DuQuantConfig(), in_diag=in_diag, r_pre=r_pre)
    return rotate_input(pack, eye)


def dequantized_weight(pack: Pack) -> np.ndarray:
    """`W_hat = Q * scale` (out, in), float64."""
    return np.asarray(pack.w_codes, np.float64) * options.code_scales(pack.w_scale, pack.in_features, pack.group_size)


def forward(pack: Pack, x: Any, bias: Any = None) -> np.ndarray:
    """The forward pass in float64. x: (..., in) -> y: (..., out)."""
    cfg = pack.config
    check_input(x, pack.in_features)
    check_bias(bias, pack.out_features)
    x2 = rotate_input(pack, x)
    if cfg.quantize_acts:
        if cfg.needs_calibration:
            require_scales(pack.a_scale)
        x2 = options.fake_quantize_acts(x2, pack.a_scale, cfg.act_scheme, cfg.act_bits, cfg.act_clip, cfg.act_group_size)
    y1 = x2 @ dequantized_weight(pack).T
    b = np.zeros(pack.out_features) if bias is None else np.asarray(bias, np.float64)
    if not cfg.rotate_rows:
        return y1 + b
    sign = np.ones(pack.out_features) if pack.out_diag is None else np.asarray(pack.out_diag, np.float64)
    if cfg.row_rot_mode == "restore":
        return options.rotate_blocks(y1, pack.r_out) * sign + b  # y1 diag(r_out) diag(sign)
    return y1 + options.rotate_blocks((sign * b)[None], np.swapaxes(pack.r_out, -1, -2))[0]  # "propagate"


def calibrate(pack: Pack, batches: Iterable[Any]) -> Pack:
    """Static activation scales: element-wise max over batches of the percentile of |x2| per channel;
    "static-tensor" keeps the largest channel's. Unchanged for the dynamic schemes and A16."""
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
    if not cfg.needs_calibration:
        return pack
    if cfg.act_scheme == "static-tensor":
        running = np.max(running, keepdims=True)
    return pack.replace(a_scale=np.maximum(running / qmax(cfg.act_bits), 1e-6))
