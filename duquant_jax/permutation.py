"""Channel energy and the zigzag permutation (SPEC steps 1-2), jittable."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def channel_energy(w: jax.Array, lambda_smooth: float) -> jax.Array:
    """w: (out, in) -> e: (in,), `mean_i W_ij^2`, blended towards its mean by `lambda_smooth`."""
    e = jnp.mean(jnp.square(w), axis=0)
    if lambda_smooth > 0:
        e = (1.0 - lambda_smooth) * e + lambda_smooth * jnp.mean(e)
    return e


def zigzag(e: jax.Array) -> jax.Array:
    """e: (in,) -> perm: (in,) int32.

    `order` sorts channels by descending energy (stable: ties by ascending
    index); `perm` takes `order[0], order[n-1], order[1], order[n-2], ...`.
    """
    n = e.shape[0]
    order = jnp.argsort(-e, stable=True)
    i = jnp.arange(n)
    take = jnp.where(i % 2 == 0, i // 2, n - 1 - i // 2)
    return order[take].astype(jnp.int32)


def input_permutation(w: jax.Array, enable_permute: bool, lambda_smooth: float) -> jax.Array:
    """w: (out, in) -> perm: (in,) int32; the identity when `enable_permute` is off."""
    if not enable_permute:
        return jnp.arange(w.shape[1], dtype=jnp.int32)
    return zigzag(channel_energy(w, lambda_smooth))
