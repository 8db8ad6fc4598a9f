"""Block rotations: batched left singular vectors, canonical signs, block-diagonal products.

All functions work on every block at once (no Python loop over blocks) and are jittable.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
TSQR_CHUNK = 256


def after(x: jax.Array, dep: jax.Array) -> jax.Array:
    """`x` unchanged, but computed only once `dep` is.

    jaxlib's CPU LAPACK kernels (QR, SVD, eigh) each fan out over one shared
    thread pool, and two of them that XLA runs concurrently can deadlock it
    (seen on 2 cores with jaxlib 0.10.2). A data dependency orders them; an
    optimization barrier does not, since it moves no data. `min(max|dep|, 0)`
    is 0 (NaN only if dep is), which XLA cannot fold away.
    """
    return x + jnp.minimum(jnp.max(jnp.abs(dep)), 0).astype(x.dtype)


def tall_r_factor(a: jax.Array, chunk: int = TSQR_CHUNK) -> jax.Array:
    """a: (n, N, b) tall blocks -> (n, b, b): an R with `a = Q R` for each block (TSQR).

    Each block's rows are cut into chunks of `chunk` rows (zero rows pad the
    last, which leaves R unchanged up to row signs), every chunk is QR-factored
    at once, and the stacked R factors are reduced the same way until one
    remains. This is as stable as one Householder QR and, on CPU, several times
    faster for N >> b since each small QR stays in cache. Row signs of R are
    arbitrary; they do not change the left singular vectors of `R^T`.
    """
    n, rows, b = a.shape
    chunk = max(chunk, 4 * b)
    while rows > chunk:
        m = -(-rows // chunk)
        a = jnp.pad(a, ((0, 0), (0, m * chunk - rows), (0, 0)))
        r = jnp.linalg.qr(a.reshape(n * m, chunk, b), mode="r")
        a = r.reshape(n, m * b, b)
        rows = m * b
    return jnp.linalg.qr(a, mode="r")


def canonical_signs(u: jax.Array) -> jax.Array:
    """u: (..., b, b) -> u with each column's largest-magnitude entry (first on a tie) >= 0."""
    idx = jnp.argmax(jnp.abs(u), axis=-2)
    pivot = jnp.take_along_axis(u, idx[..., None, :], axis=-2)
    return jnp.where(pivot < 0, -u, u)


def _svd_u(x: jax.Array) -> jax.Array:
    """x: (n, b, N) with N >= b -> (n, b, b) U of each SVD, descending."""
    return jax.vmap(lambda a: jnp.linalg.svd(a, full_matrices=False)[0])(x)


def left_singular_vectors(x: jax.Array, method: str) -> jax.Array:
    """x: (n, b, N) blocks -> (n, b, b): each block's `U` of `x = U S V^T`, canonical signs.

    Columns are in descending order of singular value. For N < b the block is
    padded with zero columns, which only adds zero singular values, so `U` is
    still b x b (its trailing columns an orthonormal completion).

    Methods:
      "svd": the vmapped SVD of each b x N block.
      "qr-svd": `x^T = Q R` (R is b x b, from `tall_r_factor`), so `x = R^T Q^T`
        has the left singular vectors of the small `R^T`: the same U in exact
        arithmetic, at the cost of a QR plus a b x b SVD.
      "eigh": eigenvectors of the b x b Gram matrix `x x^T`, descending. Fast but
        it squares the condition number (see the README for its accuracy).
    """
    b, n_cols = x.shape[-2:]
    if n_cols < b:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, b - n_cols)))
    if method == "svd":
        u = _svd_u(x)
    elif method == "qr-svd":
        r = tall_r_factor(jnp.swapaxes(x, -1, -2))
        u = _svd_u(jnp.swapaxes(r, -1, -2))
    elif method == "eigh":
        gram = jnp.einsum("nik,njk->nij", x, x, precision=HIGHEST)
        u = jnp.linalg.eigh(gram)[1][..., ::-1]
    else:
        raise ValueError(f"unknown rotation method {method!r}")
    return canonical_signs(u)


def block_rotations(m: jax.Array, size: int, method: str) -> jax.Array:
    """m: (M, N) -> (ceil(M/size), size, size): the rotation of each block of `size` rows.

    Block `k` holds rows `k*size ...`; its rotation is the `U` of those rows.
    A short last block's `U` (b x b) is stored as `diag(U, I_{size-b})`.
    """
    n_rows, n_cols = m.shape
    n_full, tail = divmod(n_rows, size)
    parts = []
    if n_full:
        parts.append(left_singular_vectors(m[: n_full * size].reshape(n_full, size, n_cols), method))
    if tail:
        tail_rows = m[n_full * size :]
        if parts:
            tail_rows = after(tail_rows, parts[0])
        u = left_singular_vectors(tail_rows[None], method)[0]
        padded = jnp.eye(size, dtype=u.dtype).at[:tail, :tail].set(u)
        parts.append(padded[None])
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def rotate_columns(m: jax.Array, r: jax.Array) -> jax.Array:
    """m: (..., C), r: (n, B, B) -> `m diag(r_0, r_1, ...)`: (..., C).

    With n*B >= C, block k of the columns is multiplied by `r[k]`; the last block
    is zero-padded, rotated and truncated (with identity padding in `r` this equals
    rotating by the short block's own `U`). With n == 1 and C a multiple of B, the
    one matrix `r[0]` serves every block.
    """
    n, size, _ = r.shape
    c = m.shape[-1]
    lead = m.shape[:-1]
    r = r.astype(m.dtype)
    if n == 1 and c % size == 0:
        y = jnp.einsum("...nb,bc->...nc", m.reshape(*lead, c // size, size), r[0], precision=HIGHEST)
        return y.reshape(*lead, c)
    mp = jnp.pad(m, [(0, 0)] * len(lead) + [(0, n * size - c)])
    rows = math.prod(lead)
    if jax.default_backend() == "cpu" and rows >= 2 * CPU_ROTATE_ROWS and size <= 32:
        y = _rotate_blocks_cpu(mp.reshape(rows, n, size), r)
    else:
        y = jnp.einsum("...nb,nbc->...nc", mp.reshape(*lead, n, size), r, precision=HIGHEST)
    return y.reshape(*lead, n * size)[..., :c]


CPU_ROTATE_ROWS = 128


def _rotate_blocks_cpu(m: jax.Array, r: jax.Array) -> jax.Array:
    """m: (R, n, b), r: (n, b, b) -> (R, n, b), each block times its matrix, as `b` fused
    multiply-adds over chunks of CPU_ROTATE_ROWS rows that stay in cache.

    XLA's CPU dot with a batch of n small (b x b) products runs at a few GFLOP/s; this
    form runs 2-3x faster (16384 x 2048 with b = 16: ~110 ms instead of ~300 ms). The sums
    are the same terms in another order.
    """
    rows, n, b = m.shape
    pad = (-rows) % CPU_ROTATE_ROWS
    chunks = jnp.pad(m, ((0, pad), (0, 0), (0, 0))).reshape(-1, CPU_ROTATE_ROWS, n, b)

    def one(c: jax.Array) -> jax.Array:
        y = c[:, :, 0:1] * r[None, :, 0, :]
        for k in range(1, b):  # b multiply-adds, not a loop over blocks
            y = y + c[:, :, k : k + 1] * r[None, :, k, :]
        return y

    return jax.lax.map(one, chunks).reshape(-1, n, b)[:rows]


def rotate_rows(m: jax.Array, r: jax.Array) -> jax.Array:
    """m: (R, C), r: (n, B, B) -> `diag(r_0, r_1, ...) m`: (R, C) (one shared matrix when n == 1)."""
    n, size, _ = r.shape
    rows, cols = m.shape
    r = r.astype(m.dtype)
    if n == 1 and rows % size == 0:
        y = jnp.einsum("ij,njc->nic", r[0], m.reshape(rows // size, size, cols), precision=HIGHEST)
        return y.reshape(rows, cols)
    mp = jnp.pad(m, ((0, n * size - rows), (0, 0))).reshape(n, size, cols)
    y = jnp.einsum("nij,njc->nic", r, mp, precision=HIGHEST)
    return y.reshape(n * size, cols)[:rows]
