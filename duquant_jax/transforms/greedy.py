"""The "duquant" family: the DuQuant paper's greedy rotation and zigzag permutation
(arXiv 2406.01721; official code Hsu1023/DuQuant, `quantize/quantizer.py`).

Both rotations are fitted on the layer's activation statistic only, the per-channel
maximum `m_j = max|x_j|` (after smoothing), viewed as `(in / b, b)`: one `b x b`
matrix serves every block. The weight copies the same transforms.

Greedy rotation: a base matrix `G` whose first row spreads channel 0 over all `b`
outputs (the product of `b - 1` Givens rotations with `cos = 1/sqrt(i+2)`, rows and
columns 0 and `b-1` exchanged, times `diag(1, Q)` with `Q` the Q factor of a random
Gaussian `(b-1) x (b-1)` matrix drawn from the seed). Each step finds the entry of
largest magnitude, takes its *channel* `c` (the paper's meaning; the official code
takes the row index of its `(-1, b)` view modulo `b`, which is not the channel),
and multiplies by `E_c G E_c` (`E_c` exchanges channels 0 and `c`), which spreads
that channel's value across the block. The peak `max - min` of the statistic is
recorded before each step and after the last; the kept rotation is the product of
the prefix of steps with the least peak (possibly none: the identity).

Zigzag: channels sorted by descending `|m|` (ties by index) are dealt to the
`in / b` blocks in the order 0, 1, ..., K-1, K-1, ..., 1, 0, 0, 1, ...; each block
keeps them in that (descending) order; blocks are concatenated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.transforms.blocks import largest_divisor_block

PRE_STREAM, POST_STREAM = 2, 3


def givens_base(b: int) -> np.ndarray:
    """(b, b) float64: the product of the `b - 1` Givens rotations, rows/columns 0 and b-1 exchanged."""
    r = np.eye(b)
    for i in range(b - 1):
        g = np.eye(b)
        cos, sin = 1.0 / np.sqrt(i + 2), np.sqrt(i + 1) / np.sqrt(i + 2)
        g[i, i] = g[i + 1, i + 1] = cos
        g[i, i + 1], g[i + 1, i] = -sin, sin
        r = g @ r
    idx = np.arange(b)
    idx[0], idx[b - 1] = b - 1, 0
    return r[idx][:, idx]


def base_rotation(b: int, seed: int, stream: int) -> np.ndarray:
    """(b, b) float64 orthogonal base matrix `givens_base(b) @ diag(1, Q)`, Q drawn from `(seed, stream)`."""
    rng = np.random.default_rng([seed, stream])
    q = np.eye(b)
    if b > 1:
        q[1:, 1:] = np.linalg.qr(rng.standard_normal((b - 1, b - 1)))[0]
    return givens_base(b) @ q


def block_for(n: int, block_size: int) -> int:
    """The greedy rotation's block for a dimension of `n` channels: the largest divisor <= block_size."""
    return largest_divisor_block(n, block_size)


def zigzag_blocks(m: np.ndarray, b: int) -> np.ndarray:
    """m: (in,) channel magnitudes, `b` dividing `in` -> perm: (in,) int32, the paper's zigzag."""
    n = m.shape[0]
    k = n // b
    order = np.argsort(-np.abs(m), kind="stable")
    i = np.arange(n) % (2 * k)
    bucket = np.where(i < k, i, 2 * k - 1 - i)
    return order[np.argsort(bucket, kind="stable")].astype(np.int32)


def _exchange(base: jax.Array, c: jax.Array) -> jax.Array:
    """`E_c base E_c`: rows and columns 0 and `c` of `base` exchanged."""
    idx = jnp.arange(base.shape[0]).at[0].set(c).at[c].set(0)
    return base[idx][:, idx]


def _peak_and_channel(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """v: (n, b) -> (max - min, the channel of the entry of larger magnitude among max and min)."""
    flat = v.reshape(-1)
    hi, lo = jnp.argmax(flat), jnp.argmin(flat)
    b = v.shape[1]
    c = jnp.where(jnp.abs(flat[hi]) > jnp.abs(flat[lo]), hi % b, lo % b)
    return flat[hi] - flat[lo], c


@functools.partial(jax.jit, static_argnames=("steps",))
def greedy_rotation(v: jax.Array, base: jax.Array, steps: int) -> jax.Array:
    """v: (n, b) statistic, base: (b, b) -> R: (b, b), the greedy rotation (module docstring).

    The steps run inside one `lax.fori_loop`; the best prefix's product is carried
    along, so no second pass is needed.
    """
    v = v.astype(jnp.float32)
    base = base.astype(jnp.float32)
    eye = jnp.eye(base.shape[0], dtype=jnp.float32)

    def step(_, state):
        v, r, best_peak, best_r = state
        peak, c = _peak_and_channel(v)
        better = peak < best_peak
        best_peak = jnp.where(better, peak, best_peak)
        best_r = jnp.where(better, r, best_r)
        m = _exchange(base, c)
        dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST)
        return dot(v, m), dot(r, m), best_peak, best_r

    init = (v, eye, jnp.array(jnp.inf, jnp.float32), eye)
    v, r, best_peak, best_r = jax.lax.fori_loop(0, steps, step, init)
    peak, _ = _peak_and_channel(v)
    return jnp.where(peak < best_peak, r, best_r)
