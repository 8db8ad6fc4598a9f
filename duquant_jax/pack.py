"""The JAX path: `pack_weight`, `forward` and `calibrate`, jitted, batched over blocks.

`pack_weight` composes (docs/ALGORITHM.md "Packing"): smoothing -> the rotation
family's input transform (`in_diag`, `r_pre`, `perm`, `r_in`) -> output rows
(`out_diag`, `r_out`) -> weight scales -> rounding (round-to-nearest or GPTQ).
With `DuQuantConfig()` this is SPEC's algorithm exactly.
"""

from __future__ import annotations

import functools
import gc
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.activations import quantize_activations, static_scales
from duquant_jax.checks import (
    check_bias,
    check_input,
    check_stats,
    check_weight,
    count_nonfinite,
    require_scales,
)
from duquant_jax.config import DuQuantConfig
from duquant_jax.fit import Fitted, fit
from duquant_jax.packed import Pack
from duquant_jax.quantize import column_scales, quantize, weight_scales
from duquant_jax.rotation import (
    HIGHEST,
    block_rotations,
    rotate_columns,
    rotate_rows,
)
from duquant_jax.stats import LayerStats


def input_transform(x: jax.Array, perm, r_in, in_diag=None, r_pre=None) -> jax.Array:
    """x: (..., in) -> x2 = rot(rot(x * in_diag, r_pre)[..., perm], r_in): (..., in).

    Absent pieces (None) are skipped. This is `x -> x T` for the layer's input transform T.
    """
    if in_diag is not None:
        x = x * in_diag.astype(x.dtype)
    if r_pre is not None:
        x = rotate_columns(x, r_pre)
    x = x[..., perm]
    return x if r_in is None else rotate_columns(x, r_in)


# The pack runs as a few jitted stages, each a whole-array batched step. On CPU this is
# ~35% faster than one program for the whole pack (16384 x 2048: 0.9 s against 1.4 s):
# XLA overlaps the big program's independent steps on the same two cores and loses cache.
@jax.jit
def _max_abs(w: jax.Array) -> jax.Array:
    """max |w|, made NaN when `w` holds a NaN or Inf: XLA's CPU max reduction drops NaN
    (jaxlib 0.10.2), so `sum(w * 0)` (0, or NaN from NaN and ±Inf) is added. Two fast
    reductions (6 ms at 16384 x 2048); fused into the permutation's gather, XLA ran 7x slower."""
    w = w.astype(jnp.float32)
    return jnp.max(jnp.abs(w)) + jnp.sum(w * 0)


@functools.partial(jax.jit, static_argnames=("rotate_inputs",))
def _stage_inputs(w, perm, in_diag, r_pre, rotate_inputs: bool) -> jax.Array:
    """w: (out, in) -> W divided by in_diag, rotated by r_pre and permuted: (out, in) float32."""
    w = w.astype(jnp.float32)
    if in_diag is not None:
        w = w / in_diag
    if r_pre is not None:
        w = rotate_columns(w, r_pre)
    return w[:, perm]


@functools.partial(jax.jit, static_argnames=("size", "method"))
def _fit_rotations(m: jax.Array, size: int, method: str) -> jax.Array:
    """m: (M, N) -> (ceil(M/size), size, size): each block of `size` rows' left singular vectors."""
    return block_rotations(m, size, method)


@functools.partial(jax.jit, static_argnames=("size", "method"))
def _fit_input_rotations(wp: jax.Array, size: int, method: str) -> jax.Array:
    """wp: (out, in) -> (ceil(in/size), size, size): each block of `size` columns' rotation (SPEC step 3)."""
    return block_rotations(wp.T, size, method)


_rotate_columns = jax.jit(rotate_columns)


@jax.jit
def _rotate_rows(w1: jax.Array, r_out: jax.Array, out_diag: jax.Array | None) -> jax.Array:
    return rotate_rows(w1 if out_diag is None else w1 * out_diag[:, None], r_out)


ROWS_PER_CHUNK = 64


@functools.partial(jax.jit, static_argnames=("config", "keep_w2"))
def _rows_scales_codes(w1, r_out, out_diag, config: DuQuantConfig, keep_w2: bool = False) -> tuple[jax.Array, jax.Array]:
    """SPEC steps 6-8 fused: `W2 = diag(r_out) diag(out_diag) W1`, its scales and codes, computed a
    chunk of row blocks at a time so that W2 never leaves the cache (one pass over W1 instead of
    three over W2). w1: (out, in) -> (w_scale, codes (out, in) int8), or with `keep_w2`
    (GPTQ rounds W2 itself) (w_scale, W2 (out, in) float32): the same scales bit for bit."""
    out, n = w1.shape
    if out_diag is not None:
        w1 = w1 * out_diag[:, None]
    nb, bo, _ = r_out.shape
    n_blocks = -(-out // bo)
    per_chunk = max(1, ROWS_PER_CHUNK // bo)
    n_chunks = -(-n_blocks // per_chunk)
    rows = n_chunks * per_chunk * bo
    chunks = jnp.pad(w1, ((0, rows - out), (0, 0))).reshape(n_chunks, per_chunk, bo, n)
    if nb == 1:
        r = jnp.broadcast_to(r_out, (n_chunks * per_chunk, bo, bo))
    else:
        r = jnp.pad(r_out, ((0, n_chunks * per_chunk - nb), (0, 0), (0, 0)))
    r = r.astype(jnp.float32).reshape(n_chunks, per_chunk, bo, bo)

    def one(args):
        c, u = args  # (per_chunk, bo, n), (per_chunk, bo, bo)
        if bo <= 32:  # bo multiply-adds of whole rows (see rotation._rotate_blocks_cpu)
            y = u[:, :, 0, None] * c[:, None, 0, :]
            for j in range(1, bo):
                y = y + u[:, :, j, None] * c[:, None, j, :]
        else:
            y = jnp.einsum("kij,kjn->kin", u, c, precision=HIGHEST)
        w2 = y.reshape(per_chunk * bo, n)
        w_scale = weight_scales(w2, config.weight_bits, group_size=config.weight_group_size, method=config.scale_method)
        return w_scale, w2 if keep_w2 else _rtn_codes(w2, w_scale, config)

    w_scale, codes = jax.lax.map(one, (chunks, r))
    return w_scale.reshape(rows, *w_scale.shape[2:])[:out], codes.reshape(rows, n)[:out]


@functools.partial(jax.jit, static_argnames=("config", "keep_w2"))
def _scales_and_codes(w2: jax.Array, w_scale: jax.Array | None, config: DuQuantConfig, keep_w2: bool = False) -> tuple[jax.Array, jax.Array]:
    """w2: (out, in) -> (its scales (or `w_scale`), its codes, or W2 itself with `keep_w2`)."""
    w_scale = _scales(w2, config, w_scale)
    return w_scale, w2 if keep_w2 else _rtn_codes(w2, w_scale, config)


def _transform_weight(w, perm, in_diag, r_pre, r_in, r_out, out_diag, config: DuQuantConfig, rows: bool = True):
    """w: (out, in) -> (r_in, r_out, w2, max |w|): the weight in the basis its codes live in
    (with `rows=False`, W1 instead of W2: the output rows are fitted but not yet rotated).

    `W1 = rot(rot(W / in_diag, r_pre)[:, perm], r_in)` (so that `x2 W1ᵀ = x Wᵀ`) and
    `W2 = diag(r_out) diag(out_diag) W1`. For the "svd" family `r_in` (and `r_out`)
    are None on entry and fitted here: SPEC steps 3-6.
    """
    bad = _max_abs(w)  # its own program: see _max_abs
    wp = _stage_inputs(w, perm, in_diag, r_pre, config.rotate_inputs)
    if r_in is None and config.rotate_inputs:
        r_in = _fit_input_rotations(wp, config.block_size, config.rotation_method)
    w2 = wp if r_in is None else _rotate_columns(wp, r_in)
    if not config.rotate_rows:
        return r_in, None, w2, bad
    if r_out is None:
        # SPEC step 5: the U of W1's row blocks equals the U of W's.
        r_out = _fit_rotations(w2, config.out_block_size, config.rotation_method)
    return r_in, r_out, _rotate_rows(w2, r_out, out_diag) if rows else w2, bad


def _scales(w2: jax.Array, config: DuQuantConfig, w_scale: jax.Array | None) -> jax.Array:
    if not config.quantize_weights:
        return jnp.ones(w2.shape[0], jnp.float32)
    if w_scale is None:
        w_scale = weight_scales(w2, config.weight_bits, group_size=config.weight_group_size, method=config.scale_method)
    return w_scale


def _rtn_codes(w2: jax.Array, w_scale: jax.Array, config: DuQuantConfig) -> jax.Array:
    """SPEC step 8, per row or group; W2 itself (float32) when weights are unquantized."""
    if not config.quantize_weights:
        return w2
    scale = column_scales(w_scale, w2.shape[1], config.weight_group_size)
    return quantize(w2, scale, config.weight_bits).astype(jnp.int8)


def _check_finite(max_abs: jax.Array, w: jax.Array, name: str) -> None:
    if not bool(jnp.isfinite(max_abs)):
        n = count_nonfinite(w)
        raise ValueError(f"{'layer ' + name + ': ' if name else ''}w of shape {tuple(w.shape)} holds {n} NaN/Inf entries")


def _pack_rtn(w, perm, in_diag, r_pre, r_in, r_out, out_diag, w_scale, config: DuQuantConfig, name: str = "",
              keep_w2: bool = False) -> Pack:
    """The pack with round-to-nearest codes; with `keep_w2`, `w_codes` holds W2 itself (float32),
    for GPTQ to round with the same scales, bit for bit."""
    if config.rotate_rows and config.quantize_weights and w_scale is None:
        r_in, r_out, w1, bad = _transform_weight(w, perm, in_diag, r_pre, r_in, r_out, out_diag, config, rows=False)
        w_scale, codes = _rows_scales_codes(w1, r_out, out_diag, config, keep_w2=keep_w2)
    else:
        r_in, r_out, w2, bad = _transform_weight(w, perm, in_diag, r_pre, r_in, r_out, out_diag, config)
        w_scale, codes = _scales_and_codes(w2, w_scale, config, keep_w2=keep_w2)
    _check_finite(bad, w, name)
    return Pack(perm=perm, r_in=r_in, r_out=r_out, w_scale=w_scale, w_codes=codes, a_scale=None, config=config,
                in_diag=in_diag, r_pre=r_pre, out_diag=out_diag)


# `Tᵀ (XᵀX) T` in three programs, each handed the previous one's (in, in) buffer: at most two such
# matrices are alive at once (one program holds three).
@functools.partial(jax.jit, donate_argnums=0)
def _transform_rows_consuming(h, perm, r_in, in_diag, r_pre) -> jax.Array:
    return input_transform(h, perm, r_in, in_diag, r_pre)


@functools.partial(jax.jit, donate_argnums=0)
def _transform_columns_consuming(h, perm, r_in, in_diag, r_pre) -> jax.Array:
    return input_transform(h.T, perm, r_in, in_diag, r_pre)


@functools.partial(jax.jit, donate_argnums=0)
def _symmetric_part_consuming(h) -> jax.Array:
    return (h + h.T) / 2


def hessian_in_basis(xtx: Any, perm, r_in, in_diag, r_pre, device: jax.Device | None = None) -> jax.Array:
    """`Tᵀ (XᵀX) T` (in, in), symmetric, for the input transform T, as the GPTQ pack computes it.

    The float32 matrix is put on `device` once (a copy, 1 GiB for a 16384-wide input, except where
    XLA shares an aligned host array, which the first program then copies instead of overwriting)
    and handed over: each program takes the previous one's buffer. `xtx` itself is left unchanged.
    On the host `pack` uses `duquant_jax.hessian_in_place` instead (one (in, in) matrix, not three).
    """
    h = jax.device_put(np.asarray(xtx, np.float32), device)
    h = _transform_rows_consuming(h, perm, r_in, in_diag, r_pre)
    h = _transform_columns_consuming(h, perm, r_in, in_diag, r_pre)
    return jax.block_until_ready(_symmetric_part_consuming(h))


def pack_weight(
    w: Any,
    config: DuQuantConfig = DuQuantConfig(),
    stats: LayerStats | None = None,
    *,
    device: jax.Device | None = None,
    wait: bool = True,
    name: str = "",
    consume_stats: bool = False,
) -> Pack:
    """Packs one weight, every block's rotation computed at once.

    Args:
      w: (out, in) weight of a linear layer `y = x Wᵀ + b`, any float dtype
        (NumPy or JAX, bfloat16 included); computed in float32.
      config: the settings; one compiled program per (shape, dtype, config).
        `DuQuantConfig()` is SPEC's algorithm.
      stats: the layer's input statistics (`duquant_jax.stats.LayerStats`), needed
        by smoothing, the "duquant" rotation (`act_absmax`) and GPTQ (`xtx`).
      device: run on this device (default: where `w` is, else the default device).
      wait: return only once the pack is computed. On CPU it always waits: two
        pack programs in flight at once could run their LAPACK kernels
        concurrently, which deadlocks jaxlib 0.10.2 (see rotation.after). On an
        accelerator, `wait=False` lets packs on several devices overlap.
      name: the layer's name, used in error messages.
      consume_stats: GPTQ may transform and factor `stats.xtx` inside its own buffer
        (`duquant_jax.hessian_in_place`, on the host: one (in, in) float32 matrix less at
        the peak, 1 GiB for a 16384-wide input); `stats.xtx` is then set to None. Ignored
        where the buffer does not allow it (not a writable float32 C-ordered NumPy array)
        and on an accelerator. Without it the host factors a copy.

    Returns:
      A Pack of JAX arrays (see `duquant_jax.packed.Pack` for every field's shape).
    """
    if not isinstance(config, DuQuantConfig):
        raise TypeError(f"config must be a DuQuantConfig; got {type(config).__name__}")
    try:
        check_weight(w, finite=False)  # NaN/Inf are counted inside the first jitted stage
    except (TypeError, ValueError) as e:
        raise type(e)(f"layer {name}: {e}" if name else str(e)) from None
    check_stats(stats, config, tuple(w.shape), name)
    return pack_fitted(w, fit(w, config, stats), config, stats, device=device, wait=wait, name=name, consume_stats=consume_stats)


def pack_fitted(
    w: Any,
    fitted: Fitted,
    config: DuQuantConfig,
    stats: LayerStats | None = None,
    *,
    device: jax.Device | None = None,
    wait: bool = True,
    name: str = "",
    consume_stats: bool = False,
) -> Pack:
    """Packs a checked weight `w (out, in)` with its transform pieces already fitted (`duquant_jax.fit`):
    the jitted stages of `pack_weight`, which fit what `fitted` leaves None (the "svd" family's rotations).
    `duquant_jax.shared_input.pack_group` passes input pieces fitted jointly for several layers.
    `consume_stats`: as `pack_weight`'s."""
    arrays = (w, fitted.perm, fitted.in_diag, fitted.r_pre, fitted.r_in, fitted.r_out, fitted.out_diag)
    arrays = jax.tree.map(jnp.asarray, arrays) if device is None else jax.device_put(arrays, device)
    if config.needs_xtx:
        return _gptq_pack(arrays, stats, config, name, consume_stats)
    pack = _pack_rtn(*arrays, None, config, name)
    if wait or next(iter(arrays[0].devices())).platform == "cpu":
        jax.block_until_ready(pack)
    return pack


def _gptq_pack(arrays: tuple, stats: LayerStats, config: DuQuantConfig, name: str, consume_stats: bool = False) -> Pack:
    from duquant_jax import hessian_in_place
    from duquant_jax.gptq import gptq_codes, gptq_factor_consuming, gptq_round, gptq_round_fitting_scales

    unrounded = _pack_rtn(*arrays, None, config, name, keep_w2=True)  # the RTN scales, W2 as w_codes
    w2 = unrounded.w_codes
    device = next(iter(w2.devices()))
    pieces = (unrounded.perm, unrounded.r_in, unrounded.in_diag, unrounded.r_pre)
    rounding = {"group_size": config.weight_group_size, "block": config.gptq_block, "name": name}
    if device.platform == "cpu":  # the Hessian transformed and factored in one host buffer: the statistics' own, or a copy
        consume = consume_stats and hessian_in_place.usable(stats.xtx)
        h = stats.xtx if consume else hessian_in_place.aligned_copy(stats.xtx)
        try:
            factor = hessian_in_place.factor_in_place(h, *pieces, damp=config.gptq_damp, act_order=config.gptq_act_order, name=name)
        finally:
            if consume:
                object.__setattr__(stats, "xtx", None)  # its buffer holds the factor (or is spoilt): a later use fails loudly
        del h
        # W2 is ours (the pack's `w_codes` gets the codes): its buffer may hold the rounding's copy
        if config.gptq_static_groups:
            codes = gptq_round(w2, factor, unrounded.w_scale, config.weight_bits, consume_w=True, **rounding)
        else:
            codes, w_scale = gptq_round_fitting_scales(w2, factor, config.weight_bits, method=config.scale_method,
                                                       consume_w=True, **rounding)
            unrounded = unrounded.replace(w_scale=w_scale)
        del w2
        # The factor's JAX array shares the host buffer; jaxlib hands such buffers back only when a garbage
        # collection runs (its gc callback, jax-ml/jax#14882): a generation-0 pass frees the (in, in) matrix now
        # instead of at some later layer's peak.
        factor.l.delete()
        del factor
        gc.collect(0)
    elif config.gptq_static_groups:
        h2 = hessian_in_basis(stats.xtx, *pieces, device)  # the factorization takes the rotated Hessian's buffer
        codes = gptq_codes(
            w2, h2, unrounded.w_scale, config.weight_bits, damp=config.gptq_damp, act_order=config.gptq_act_order,
            consume_h=True, **rounding,
        )
    else:
        factor = gptq_factor_consuming(hessian_in_basis(stats.xtx, *pieces, device), damp=config.gptq_damp, name=name)
        codes, w_scale = gptq_round_fitting_scales(w2, factor, config.weight_bits, method=config.scale_method, **rounding)
        unrounded = unrounded.replace(w_scale=w_scale)
    return jax.block_until_ready(unrounded.replace(w_codes=codes))


def pack_with_rotations(w: Any, perm: Any, r_in: Any, r_out: Any, config: DuQuantConfig, w_scale: Any = None) -> Pack:
    """Packs `w: (out, in)` with a given `perm (in,)`, stacked `r_in (n_in, B, B)` and
    `r_out (n_out, Bo, Bo)` (None when rows are not rotated), e.g. read from another
    tool, for SPEC's "svd" family. Rotations of any sign give an exact forward, since
    W2 is computed from them. `w_scale` (as config's granularity) is used as given;
    None chooses it by SPEC step 7.
    """
    out, n_in = check_weight(w)
    n_in_blocks, n_out_blocks = -(-n_in // config.block_size), -(-out // config.out_block_size)
    B, Bo = config.block_size, config.out_block_size
    if config.rotation != "svd" or config.smooth_alpha is not None or config.weight_method != "rtn":
        raise ValueError("pack_with_rotations takes SPEC's svd-family rotations with rtn rounding and no smoothing; "
                         f"got rotation={config.rotation!r}, smooth_alpha={config.smooth_alpha!r}, weight_method={config.weight_method!r}")
    if tuple(np.shape(perm)) != (n_in,):
        raise ValueError(f"perm must have shape ({n_in},); got {np.shape(perm)}")
    if tuple(np.shape(r_in)) != (n_in_blocks, B, B):
        raise ValueError(f"r_in must have shape {(n_in_blocks, B, B)}; got {np.shape(r_in)}")
    if config.rotate_rows and tuple(np.shape(r_out)) != (n_out_blocks, Bo, Bo):
        raise ValueError(f"r_out must have shape {(n_out_blocks, Bo, Bo)}; got {np.shape(r_out)}")
    if w_scale is not None:
        want = (out,) if config.weight_group_size is None else (out, -(-n_in // config.weight_group_size))
        if tuple(np.shape(w_scale)) != want:
            raise ValueError(f"w_scale must have shape {want}; got {np.shape(w_scale)}")
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    r_out = f32(r_out) if config.rotate_rows else None
    pack = _pack_rtn(jnp.asarray(w), jnp.asarray(perm, jnp.int32), None, None, f32(r_in), r_out, None, f32(w_scale), config)
    return jax.block_until_ready(pack)


def rotate_input(pack: Pack, x: jax.Array) -> jax.Array:
    """Forward steps 1-2. x: (..., in) -> x2 = x T: (..., in), float32."""
    return input_transform(jnp.asarray(x, jnp.float32), pack.perm, pack.r_in, pack.in_diag, pack.r_pre)


def dequantized_weight(pack: Pack) -> jax.Array:
    """`W_hat = Q * scale` (each code times its row's or group's scale): (out, in) float32."""
    scale = column_scales(pack.w_scale.astype(jnp.float32), pack.in_features, pack.group_size)
    return pack.w_codes.astype(jnp.float32) * scale


def restore_output(pack: Pack, y: jax.Array) -> jax.Array:
    """y1: (..., out) in the rotated row basis -> `y1 diag(r_out) diag(out_diag)`."""
    y = rotate_columns(y, pack.r_out)
    return y if pack.out_diag is None else y * pack.out_diag.astype(y.dtype)


def rotated_bias(pack: Pack, b: jax.Array) -> jax.Array:
    """b: (out,) -> `diag(r_out) diag(out_diag) b`, the bias in the rotated row basis ("propagate")."""
    if pack.out_diag is not None:
        b = b * pack.out_diag.astype(b.dtype)
    return rotate_columns(b, jnp.swapaxes(pack.r_out, -1, -2))


def _forward(pack: Pack, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    cfg = pack.config
    x2 = quantize_activations(rotate_input(pack, x), pack.a_scale, cfg)
    y = jnp.einsum("...i,oi->...o", x2, dequantized_weight(pack), precision=HIGHEST)
    b = None if bias is None else jnp.asarray(bias, jnp.float32)
    if cfg.rotate_rows and cfg.row_rot_mode == "restore":
        y = restore_output(pack, y)
    elif cfg.rotate_rows and cfg.row_rot_mode == "propagate" and b is not None:
        b = rotated_bias(pack, b)
    return y if b is None else y + b


_forward_jit = jax.jit(_forward)


def forward(pack: Pack, x: Any, bias: Any = None) -> jax.Array:
    """The forward pass of a packed layer (docs/ALGORITHM.md "Forward").

    Args:
      pack: a Pack; with a static activation scheme and act_bits in 2..8 it must be calibrated.
      x: (..., in) float input, any leading shape.
      bias: optional (out,) bias of the original layer.

    Returns:
      y: (..., out) in x's dtype (computed in float32). Jittable.
    """
    check_input(x, pack.in_features)
    check_bias(bias, pack.out_features)
    if pack.config.needs_calibration:
        require_scales(pack.a_scale)
    y = _forward_jit(pack, jnp.asarray(x), bias)
    return y.astype(jnp.result_type(x))


@functools.partial(jax.jit, static_argnames=("percentile",))
def _abs_percentile(pack: Pack, x: jax.Array, percentile: float) -> jax.Array:
    x2 = rotate_input(pack, x).reshape(-1, pack.in_features)
    return jnp.percentile(jnp.abs(x2), percentile, axis=0)


class ActivationStats:
    """Running calibration statistics: the element-wise max of per-batch percentiles of |x2|.

    `update(x)` takes one batch `(..., in)`; batches past `calib_batches` are
    ignored. `scales()` returns the activation scales of the pack's static scheme:
    (in,) for "static-channel", (1,) for "static-tensor".
    """

    def __init__(self, pack: Pack):
        self.pack = pack
        self.running: jax.Array | None = None
        self.batches = 0

    def update(self, x: Any) -> None:
        if self.batches >= self.pack.config.calib_batches:
            return
        check_input(x, self.pack.in_features, name=f"calibration batch {self.batches}", finite=True)
        p = _abs_percentile(self.pack, jnp.asarray(x), float(self.pack.config.act_percentile))
        self.running = p if self.running is None else jnp.maximum(self.running, p)
        self.batches += 1

    def scales(self) -> jax.Array:
        if self.running is None:
            raise ValueError("calibration saw no batch: run at least one batch through it")
        return static_scales(self.running, self.pack.config)


def calibrate(pack: Pack, batches: Iterable[Any]) -> Pack:
    """Activation calibration over `batches` (each `(..., in)`) for the static schemes.

    Returns the pack with `a_scale` set ((in,) "static-channel", (1,) "static-tensor");
    unchanged when activations are not quantized or the scheme is dynamic ("dynamic-token", "dynamic-group").
    An empty iterable, a NaN/Inf or a wrong last dimension is an error.
    """
    stats = ActivationStats(pack)
    for x in batches:
        if stats.batches >= pack.config.calib_batches:
            break
        stats.update(x)
    scales = stats.scales()
    return pack.replace(a_scale=scales) if pack.config.needs_calibration else pack
