"""The JAX path: `pack_weight`, `forward` and `calibrate` (SPEC), jitted, batched over blocks."""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.checks import check_bias, check_input, check_weight, require_scales
from duquant_jax.config import DuQuantConfig, qmax
from duquant_jax.packed import Pack
from duquant_jax.permutation import input_permutation
from duquant_jax.quantize import fake_quantize, quantize, weight_scales
from duquant_jax.rotation import HIGHEST, block_rotations, rotate_columns, rotate_rows


@functools.partial(jax.jit, static_argnames=("config",))
def _pack(w: jax.Array, perm: jax.Array, config: DuQuantConfig) -> Pack:
    w = w.astype(jnp.float32)
    wp = w[:, perm]
    r_in = block_rotations(wp.T, config.block_size, config.rotation_method)
    w2 = rotate_columns(wp, r_in)
    r_out = None
    if config.rotate_rows:
        # SPEC step 5: the U of W1's row blocks equals the U of W's. Taking W1
        # also runs these LAPACK calls after the input ones (see rotation.after).
        r_out = block_rotations(w2, config.out_block_size, config.rotation_method)
        w2 = rotate_rows(w2, r_out)
    w_scale, w_codes = _scales_and_codes(w2, config)
    return Pack(perm=perm, r_in=r_in, r_out=r_out, w_scale=w_scale, w_codes=w_codes, a_scale=None, config=config)


def _scales_and_codes(w2: jax.Array, config: DuQuantConfig, w_scale: jax.Array | None = None):
    """SPEC steps 7-8: (w_scale (out,), w_codes (out, in) int8); W2 itself and scale 1 when unquantized."""
    if not config.quantize_weights:
        return jnp.ones(w2.shape[0], jnp.float32), w2
    if w_scale is None:
        w_scale = weight_scales(w2, config.weight_bits)
    return w_scale, quantize(w2, w_scale[:, None], config.weight_bits).astype(jnp.int8)


def pack_weight(w: Any, config: DuQuantConfig = DuQuantConfig(), device: jax.Device | None = None, wait: bool = True) -> Pack:
    """Packs one weight by SPEC with every block's rotation computed at once.

    Args:
      w: (out, in) weight of a linear layer `y = x W^T + b`, any float dtype
        (NumPy or JAX, bfloat16 included); computed in float32.
      config: the settings; one compiled program per (shape, dtype, config).
      device: run on this device (default: where `w` is, else the default device).
      wait: return only once the pack is computed. On CPU it always waits: two
        pack programs in flight at once could run their LAPACK kernels
        concurrently, which deadlocks jaxlib 0.10.2 (see rotation.after). On an
        accelerator, `wait=False` lets packs on several devices overlap.

    Returns:
      A Pack of JAX arrays: perm (in,), r_in (n_in, B, B), r_out (n_out, Bo, Bo)
      or None, w_scale (out,), w_codes (out, in), a_scale None.
    """
    if not isinstance(config, DuQuantConfig):
        raise TypeError(f"config must be a DuQuantConfig; got {type(config).__name__}")
    check_weight(w)
    perm = input_permutation(w, config.enable_permute, config.lambda_smooth)
    w, perm = (jnp.asarray(w), jnp.asarray(perm)) if device is None else jax.device_put((w, perm), device)
    pack = _pack(w, perm, config)
    if wait or next(iter(w.devices())).platform == "cpu":
        jax.block_until_ready(pack)
    return pack


@functools.partial(jax.jit, static_argnames=("config",))
def _pack_given(w, perm, r_in, r_out, w_scale, config: DuQuantConfig) -> Pack:
    w = w.astype(jnp.float32)
    w2 = rotate_columns(w[:, perm], r_in)
    if config.rotate_rows:
        w2 = rotate_rows(w2, r_out)
    w_scale, w_codes = _scales_and_codes(w2, config, w_scale)
    return Pack(perm=perm, r_in=r_in, r_out=r_out, w_scale=w_scale, w_codes=w_codes, a_scale=None, config=config)


def pack_with_rotations(w: Any, perm: Any, r_in: Any, r_out: Any, config: DuQuantConfig, w_scale: Any = None) -> Pack:
    """Packs `w: (out, in)` with given `perm (in,)`, stacked `r_in (n_in, B, B)` and
    `r_out (n_out, Bo, Bo)` (None with row_rot_mode "none"), e.g. read from another
    tool. Rotations of any sign give an exact forward, since W2 is computed from them.
    `w_scale (out,)` is used as given; None chooses it by SPEC step 7.
    """
    out, n_in = check_weight(w)
    n_in_blocks, n_out_blocks = -(-n_in // config.block_size), -(-out // config.out_block_size)
    B, Bo = config.block_size, config.out_block_size
    if tuple(np.shape(perm)) != (n_in,):
        raise ValueError(f"perm must have shape ({n_in},); got {np.shape(perm)}")
    if tuple(np.shape(r_in)) != (n_in_blocks, B, B):
        raise ValueError(f"r_in must have shape {(n_in_blocks, B, B)}; got {np.shape(r_in)}")
    if config.rotate_rows and tuple(np.shape(r_out)) != (n_out_blocks, Bo, Bo):
        raise ValueError(f"r_out must have shape {(n_out_blocks, Bo, Bo)}; got {np.shape(r_out)}")
    if w_scale is not None and tuple(np.shape(w_scale)) != (out,):
        raise ValueError(f"w_scale must have shape ({out},); got {np.shape(w_scale)}")
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    r_out = f32(r_out) if config.rotate_rows else None
    pack = _pack_given(jnp.asarray(w), jnp.asarray(perm, jnp.int32), f32(r_in), r_out, f32(w_scale), config)
    return jax.block_until_ready(pack)


def rotate_input(pack: Pack, x: jax.Array) -> jax.Array:
    """Forward steps 1-2. x: (..., in) -> x2 = x[..., perm] diag(R_in): (..., in), float32."""
    return rotate_columns(jnp.asarray(x, jnp.float32)[..., pack.perm], pack.r_in)


def dequantized_weight(pack: Pack) -> jax.Array:
    """`W_hat = Q * s`: (out, in) float32."""
    return pack.w_codes.astype(jnp.float32) * pack.w_scale.astype(jnp.float32)[:, None]


def _forward(pack: Pack, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    cfg = pack.config
    x2 = rotate_input(pack, x)
    if cfg.quantize_acts:
        x2 = fake_quantize(x2, pack.a_scale.astype(jnp.float32), cfg.act_bits)
    y = jnp.einsum("...i,oi->...o", x2, dequantized_weight(pack), precision=HIGHEST)
    b = None if bias is None else jnp.asarray(bias, jnp.float32)
    if cfg.row_rot_mode == "restore":
        y = rotate_columns(y, pack.r_out)
    elif cfg.row_rot_mode == "propagate" and b is not None:
        b = rotate_columns(b, jnp.swapaxes(pack.r_out, -1, -2))  # diag(R_out) b
    return y if b is None else y + b


_forward_jit = jax.jit(_forward)


def forward(pack: Pack, x: Any, bias: Any = None) -> jax.Array:
    """SPEC's forward pass.

    Args:
      pack: a Pack; with act_bits in 2..8 it must be calibrated.
      x: (..., in) float input, any leading shape.
      bias: optional (out,) bias of the original layer.

    Returns:
      y: (..., out) in x's dtype (computed in float32). Jittable.
    """
    check_input(x, pack.in_features)
    check_bias(bias, pack.out_features)
    if pack.config.quantize_acts:
        require_scales(pack.a_scale)
    y = _forward_jit(pack, jnp.asarray(x), bias)
    return y.astype(jnp.result_type(x))


@functools.partial(jax.jit, static_argnames=("percentile",))
def _abs_percentile(pack: Pack, x: jax.Array, percentile: float) -> jax.Array:
    x2 = rotate_input(pack, x).reshape(-1, pack.in_features)
    return jnp.percentile(jnp.abs(x2), percentile, axis=0)


class ActivationStats:
    """Running SPEC calibration statistics: the element-wise max of per-batch percentiles.

    `update(x)` takes one batch `(..., in)`; batches past `calib_batches` are
    ignored. `scales()` returns `s_a = max(p / qa, 1e-6)`: (in,) float32.
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
        return jnp.maximum(self.running / qmax(self.pack.config.act_bits), 1e-6).astype(jnp.float32)


def calibrate(pack: Pack, batches: Iterable[Any]) -> Pack:
    """SPEC's activation calibration over `batches` (each `(..., in)`).

    Returns the pack with `a_scale` (in,) set; unchanged when act_bits is 0/16.
    An empty iterable, a NaN/Inf or a wrong last dimension is an error.
    """
    stats = ActivationStats(pack)
    for x in batches:
        if stats.batches >= pack.config.calib_batches:
            break
        stats.update(x)
    scales = stats.scales()
    return pack.replace(a_scale=scales) if pack.config.quantize_acts else pack
