"""Weight scales by an MSE grid, integer codes, fake quantization, int4 nibble packing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.config import qmax

SCALE_ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5)
# "mse-fine": the scale `base * shrink` for shrink 1.00, 0.98, ..., 0.70 (clipping the group's largest
# values by up to 30%), written as `base / alpha` like SPEC's grid; the first is the absmax scale.
FINE_SHRINKS = tuple(round(1.0 - 0.02 * k, 2) for k in range(16))
FINE_ALPHAS = tuple(1.0 / shrink for shrink in FINE_SHRINKS)


def scale_alphas(method: str) -> tuple[float, ...]:
    """The candidates `alpha` of a scale method (each scale is `base / alpha`, the first with the least
    squared error wins): SPEC's five for "mse", the 16 of FINE_ALPHAS for "mse-fine", (1.0,) for "minmax"."""
    if method == "mse":
        return SCALE_ALPHAS
    if method == "mse-fine":
        return FINE_ALPHAS
    if method == "minmax":
        return (1.0,)
    raise ValueError(f"scale method must be 'mse', 'mse-fine' or 'minmax'; got {method!r}")


def quantize(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """Codes `clamp(round(x / scale), -qmax-1, qmax)` (round half to even), as x's dtype."""
    q = qmax(bits)
    return jnp.clip(jnp.round(x / scale), -q - 1, q)


def fake_quantize(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """`quantize(x, scale, bits) * scale`."""
    return quantize(x, scale, bits) * scale


CPU_SCALE_ROWS = 16


def weight_scales(w2: jax.Array, bits: int, *, group_size: int | None = None, method: str = "mse") -> jax.Array:
    """w2: (out, in) -> scales: (out,), or (out, ceil(in / group_size)) with groups.

    "mse" (SPEC step 7): per row (or group), the `base / alpha` with the least
    squared error, first on a tie, where `base = max(max |w2| / qmax, 1e-8)` and
    alpha in SCALE_ALPHAS. "mse-fine": the same over FINE_ALPHAS (`base` shrunk by
    0 to 30% in steps of 2%). "minmax": `base` itself. A short last group is padded
    with zeros, which change neither its maximum nor which candidate errs least.
    """
    if group_size is not None:
        out, n = w2.shape
        groups = -(-n // group_size)
        padded = jnp.pad(w2, ((0, 0), (0, groups * group_size - n)))
        return weight_scales(padded.reshape(out * groups, group_size), bits, method=method).reshape(out, groups)
    alphas = scale_alphas(method)
    if method == "minmax":
        return jnp.maximum(jnp.max(jnp.abs(w2), axis=1) / qmax(bits), 1e-8)
    return _mse_scales(w2, bits, alphas)


def _mse_scales(w2: jax.Array, bits: int, alphas: tuple[float, ...] = SCALE_ALPHAS) -> jax.Array:
    """SPEC step 7 per row, over the candidates `alphas`. On CPU the rows go through in chunks of
    CPU_SCALE_ROWS, so each chunk stays in cache for all candidates (4x faster at 16384 x 2048 with
    SPEC's five; the same values)."""
    out, n = w2.shape
    if jax.default_backend() == "cpu" and out > CPU_SCALE_ROWS:
        pad = (-out) % CPU_SCALE_ROWS
        chunks = jnp.pad(w2, ((0, pad), (0, 0))).reshape(-1, CPU_SCALE_ROWS, n)
        return jax.lax.map(lambda c: _row_scales(c, bits, alphas), chunks).reshape(-1)[:out]
    return _row_scales(w2, bits, alphas)


def _row_scales(w2: jax.Array, bits: int, alphas: tuple[float, ...] = SCALE_ALPHAS) -> jax.Array:
    base = jnp.maximum(jnp.max(jnp.abs(w2), axis=1) / qmax(bits), 1e-8)
    best = base
    best_err = jnp.full(base.shape, jnp.inf, dtype=w2.dtype)
    for alpha in alphas:  # a fixed handful of candidates, not a loop over blocks
        s = base / alpha
        err = jnp.mean(jnp.square(fake_quantize(w2, s[:, None], bits) - w2), axis=1)
        better = err < best_err
        best = jnp.where(better, s, best)
        best_err = jnp.where(better, err, best_err)
    return best


def column_scales(w_scale: jax.Array, n: int, group_size: int | None) -> jax.Array:
    """w_scale: (out,) or (out, ceil(n / group_size)) -> each code's scale: (out, 1) or (out, n)."""
    if group_size is None:
        return w_scale[:, None]
    return jnp.repeat(w_scale, group_size, axis=1, total_repeat_length=w_scale.shape[1] * group_size)[:, :n]


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """codes: (out, in) int8 in [-8, 7] -> (out, ceil(in/2)) uint8.

    Column 2j in the low nibble, 2j+1 in the high nibble, two's complement
    (`code & 0xF`), a zero nibble padding an odd `in` (SPEC "Pack fields").
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"int4 codes must be 2-D (out, in); got shape {codes.shape}")
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise ValueError(f"int4 codes must lie in [-8, 7]; got range [{codes.min()}, {codes.max()}]")
    nib = (codes.astype(np.int16) & 0xF).astype(np.uint8)
    if nib.shape[1] % 2:
        nib = np.pad(nib, ((0, 0), (0, 1)))
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, in_features: int) -> np.ndarray:
    """packed: (out, ceil(in/2)) uint8 -> (out, in) int8 codes; inverse of `pack_int4`."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != (in_features + 1) // 2:
        raise ValueError(
            f"packed int4 codes for in_features={in_features} must have shape "
            f"(out, {(in_features + 1) // 2}); got {packed.shape}"
        )
    nib = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int16)
    nib[:, 0::2] = packed & 0xF
    nib[:, 1::2] = packed >> 4
    nib = np.where(nib >= 8, nib - 16, nib)
    return nib[:, :in_features].astype(np.int8)
