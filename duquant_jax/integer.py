"""The deployed forward in JAX: packed 4-bit codes, and integer products where the scales allow.

Weights stay in their quantized form: 2..4-bit codes two a byte (the pack files'
nibble layout, `pack_nibbles`), 5..8-bit codes as int8. With per-token
("dynamic-token") or per-tensor ("static-tensor") activation scales, the scale
of each activation row factors out of the product, so the forward quantizes the
rotated activations to int8 and multiplies them by the int8 codes with int32
accumulation (`lax.dot_general(..., preferred_element_type=int32)`): exact sums,
then one float32 multiply by the activation and weight scales (per group: one
int32 product per group, summed with the group scales). SPEC's per-channel
("static-channel") scales do not factor out: that scheme, and weight-only (A16),
dequantize the codes to float32 inside the jitted program and multiply in
float32, as `duquant_jax.pack.forward` does (a simulation of the quantized layer).

Both give `forward`'s result up to float32 rounding (tests/test_integer.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from duquant_jax.activations import dynamic_scales, quantize_activations
from duquant_jax.config import DuQuantConfig
from duquant_jax.pack import input_transform, restore_output, rotated_bias
from duquant_jax.packed import Pack
from duquant_jax.quantize import column_scales, quantize

NIBBLE_BITS = 4


def packs_nibbles(config: DuQuantConfig) -> bool:
    """Whether a config's codes are stored two a byte (2..4 bits)."""
    return config.quantize_weights and config.weight_bits <= NIBBLE_BITS


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """codes: (out, in) int8 in [-8, 7] -> (out, ceil(in/2)) uint8: column 2j low nibble, 2j+1 high."""
    nib = (codes.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    if nib.shape[1] % 2:
        nib = jnp.pad(nib, ((0, 0), (0, 1)))
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_nibbles(packed: jax.Array, in_features: int) -> jax.Array:
    """packed: (out, ceil(in/2)) uint8 -> (out, in) int8, sign-extended; inverse of `pack_nibbles`."""
    low = jax.lax.shift_right_arithmetic(jax.lax.shift_left(packed, jnp.uint8(4)).astype(jnp.int8), jnp.int8(4))
    high = jax.lax.shift_right_arithmetic(packed.astype(jnp.int8), jnp.int8(4))
    return jnp.stack([low, high], axis=-1).reshape(packed.shape[0], -1)[:, :in_features]


def stored_codes(pack: Pack) -> jax.Array:
    """The codes as a deployed layer stores them: nibbles for 2..4 bits, else `w_codes` as is."""
    return pack_nibbles(pack.w_codes) if packs_nibbles(pack.config) else pack.w_codes


def integer_product(xq: jax.Array, codes: jax.Array, w_scale: jax.Array, group_size: int | None) -> jax.Array:
    """xq: (T, in) int8, codes: (out, in) int8 -> `sum_j xq codes * scale`: (T, out) float32, int32 sums.

    Per row: one int32 product, times `w_scale (out,)`. With groups: one int32
    product per group, times that group's scale `w_scale (out, groups)`, summed.
    """
    dims = (((1,), (1,)), ((), ()))
    if group_size is None:
        acc = jax.lax.dot_general(xq, codes, dims, preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * w_scale[None, :]
    n, groups = xq.shape[1], w_scale.shape[1]
    pad = groups * group_size - n
    xg = jnp.pad(xq, ((0, 0), (0, pad))).reshape(xq.shape[0], groups, group_size)
    cg = jnp.pad(codes, ((0, 0), (0, pad))).reshape(codes.shape[0], groups, group_size)
    acc = jax.lax.dot_general(xg, cg, (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.int32)  # (groups, T, out)
    return jnp.einsum("gto,og->to", acc.astype(jnp.float32), w_scale, precision=jax.lax.Precision.HIGHEST)


def uses_integer_product(config: DuQuantConfig) -> bool:
    """Integer products need quantized weights and activations whose scale factors out (per token or tensor)."""
    return config.quantize_weights and config.quantize_acts and config.act_scheme in ("dynamic-token", "static-tensor")


@functools.partial(jax.jit, static_argnames=("config", "in_features"))
def packed_forward(
    arrays: dict[str, Any], a_scale: Any, x: jax.Array, bias: Any, config: DuQuantConfig, in_features: int
) -> jax.Array:
    """The forward of a layer stored as `arrays` (Pack fields, `w_codes` as `stored_codes`).

    x: (..., in) -> y: (..., out) float32.
    """
    lead = x.shape[:-1]
    x2 = input_transform(x.astype(jnp.float32).reshape(-1, in_features), arrays["perm"], arrays.get("r_in"), arrays.get("in_diag"), arrays.get("r_pre"))
    codes = arrays["w_codes"]
    if packs_nibbles(config):
        codes = unpack_nibbles(codes, in_features)
    w_scale = arrays["w_scale"].astype(jnp.float32)
    if uses_integer_product(config):
        if config.act_scheme == "dynamic-token":
            s = dynamic_scales(x2, config.act_bits, config.act_clip)
        else:
            s = a_scale.astype(jnp.float32).reshape(1, 1)
        xq = quantize(x2, s, config.act_bits).astype(jnp.int8)
        y = integer_product(xq, codes, w_scale, config.weight_group_size) * s
    else:
        x3 = quantize_activations(x2, a_scale, config)
        w_hat = codes.astype(jnp.float32) * column_scales(w_scale, in_features, config.weight_group_size) if config.quantize_weights else codes
        y = jnp.einsum("ti,oi->to", x3, w_hat, precision=jax.lax.Precision.HIGHEST)
    shell = Pack(perm=None, r_in=None, r_out=arrays.get("r_out"), w_scale=None, w_codes=None, a_scale=None, config=config, out_diag=arrays.get("out_diag"))
    b = None if bias is None else jnp.asarray(bias, jnp.float32)
    if config.rotate_rows and config.row_rot_mode == "restore":
        y = restore_output(shell, y)
    elif config.rotate_rows and config.row_rot_mode == "propagate" and b is not None:
        b = rotated_bias(shell, b)
    y = y if b is None else y + b
    return y.reshape(*lead, y.shape[-1])

