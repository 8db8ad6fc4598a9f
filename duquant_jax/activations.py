"""Activation quantization schemes (docs/ALGORITHM.md "Activation schemes"), in JAX.

  "static-channel" (SPEC): one calibrated scale per input channel, `a_scale (in,)`.
  "static-tensor": one calibrated scale for the layer, `a_scale (1,)`: the largest
    per-channel calibration statistic, so no channel is clipped harder than SPEC's.
  "dynamic-token": per token, `s_t = max(act_clip * max_j |x2_tj| / qa, DYNAMIC_EPS)`,
    computed at run time; no calibration.
  "dynamic-group": the same per token and per group `g` of `act_group_size` consecutive
    channels (a short last group allowed), `s_tg = max(act_clip * max_{j in g} |x2_tj| / qa,
    DYNAMIC_EPS)`; its scales do not factor out of an integer product.

Codes are `clamp(round_half_even(x2 / s), -qa - 1, qa)`; the forward uses `codes * s`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from duquant_jax.config import DuQuantConfig, qmax
from duquant_jax.quantize import fake_quantize

STATIC_EPS = 1e-6
DYNAMIC_EPS = 1e-8


def dynamic_scales(x2: jax.Array, bits: int, clip: float) -> jax.Array:
    """x2: (..., in) -> (..., 1) per-token scales."""
    return jnp.maximum(clip * jnp.max(jnp.abs(x2), axis=-1, keepdims=True) / qmax(bits), DYNAMIC_EPS)


def group_scales(x2: jax.Array, bits: int, clip: float, group: int) -> jax.Array:
    """x2: (..., in) -> (..., in) the "dynamic-group" scale of every channel (its group's)."""
    n = x2.shape[-1]
    groups = -(-n // group)
    padded = jnp.pad(x2, [(0, 0)] * (x2.ndim - 1) + [(0, groups * group - n)])
    s = dynamic_scales(padded.reshape(*x2.shape[:-1], groups, group), bits, clip)  # (..., groups, 1)
    return jnp.broadcast_to(s, (*x2.shape[:-1], groups, group)).reshape(*x2.shape[:-1], groups * group)[..., :n]


def quantize_activations(x2: jax.Array, a_scale: jax.Array | None, config: DuQuantConfig) -> jax.Array:
    """x2: (..., in) rotated input -> its fake-quantized value (unchanged when act_bits is 0/16)."""
    if not config.quantize_acts:
        return x2
    if config.act_scheme == "dynamic-token":
        return fake_quantize(x2, dynamic_scales(x2, config.act_bits, config.act_clip), config.act_bits)
    if config.act_scheme == "dynamic-group":
        return fake_quantize(x2, group_scales(x2, config.act_bits, config.act_clip, config.act_group_size), config.act_bits)
    return fake_quantize(x2, a_scale.astype(x2.dtype), config.act_bits)


def static_scales(percentiles: jax.Array, config: DuQuantConfig) -> jax.Array:
    """percentiles: (in,) running calibration statistic -> a_scale: (in,) or (1,)."""
    if config.act_scheme == "static-tensor":
        percentiles = jnp.max(percentiles, keepdims=True)
    return jnp.maximum(percentiles / qmax(config.act_bits), STATIC_EPS).astype(jnp.float32)
