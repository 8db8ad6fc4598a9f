"""GPTQ's Hessian moved into the codes' basis and factored inside its own host buffer.

`pack.hessian_in_basis` followed by `gptq.gptq_factor` holds up to three more (in, in)
float32 matrices than the statistics' own `XᵀX` (XLA's copy of it, each program's output
and temporaries): 3 GiB more for the 16384-wide down projection of a 2B model, the largest
part of a sequential calibration's peak memory. When the caller gives up the statistics
(`consume_stats=True` of `pack_weight`, `interop.quantize_`), this module does the same
arithmetic in the `XᵀX` buffer itself, with temporaries of one panel of rows:

1. `h <- h T` by panels of rows (each row of `h` transforms alone), `h <- hᵀ` (tile
   pairs swapped), `h <- h T` again: `Tᵀ XᵀX T` for the input transform `T`
   (`pack.input_transform`, jitted per panel). Without activation order the reversal
   `J` that the factorization needs (`gptq.GPTQFactor`) is folded into `T` (a gather
   of the columns), so these passes give `J Tᵀ XᵀX T J` directly.
2. `h <- (h + hᵀ) / 2` by tile pairs.
3. With activation order: the order from the diagonal, then the symmetric permutation
   `h[rev][:, rev]` as a column gather by panels, a transpose and a gather again.
4. Dead columns (`diag == 0`) and dampening on the diagonal; LAPACK's `spotrf` in
   place (the C-ordered buffer is the Fortran transpose of itself), the strict upper
   triangle zeroed: the factor `l` of `gptq.GPTQFactor`, as a JAX array that shares
   the buffer when it is 64-byte aligned (torch's allocations are).

The result equals `gptq_factor(hessian_in_basis(...))` up to float32 rounding (LAPACK's
and XLA's Cholesky sum in different orders); `tests/test_hessian_in_place.py` bounds it.
Host (CPU) only: on an accelerator the matrix is on the device and `pack` uses XLA. On the host
`pack` uses this module also when the statistics are kept, on a copy (`aligned_copy`): one (in, in)
matrix more than the statistics, against three for the XLA programs, and faster.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.gptq import GPTQFactor, _who, not_positive_definite
from duquant_jax.pack import input_transform

ROWS = 256  # rows per panel of a transform pass: 16 MiB of a 16384-wide matrix
TILE = 1024  # side of the tiles swapped by a transpose or symmetrization


def usable(xtx: Any) -> bool:
    """Whether `xtx` can be factored in place: a writable C-contiguous float32 NumPy (in, in) array."""
    return (
        isinstance(xtx, np.ndarray) and xtx.dtype == np.float32 and xtx.ndim == 2 and xtx.shape[0] == xtx.shape[1]
        and xtx.flags.c_contiguous and xtx.flags.writeable
    )


def aligned_copy(xtx: Any) -> np.ndarray:
    """A float32 C-ordered copy of `xtx (in, in)` starting on a 64-byte boundary, so that the factor made in
    it becomes a JAX array without another copy (NumPy's own allocations are often 16-byte aligned)."""
    src = np.asarray(xtx)
    buf = np.empty(src.size + 16, np.float32)
    start = (-buf.ctypes.data % 64) // 4
    out = buf[start : start + src.size].reshape(src.shape)
    out[...] = src
    return out


@functools.partial(jax.jit, static_argnames=("transform",))
def _panel(x: jax.Array, perm, r_in, in_diag, r_pre, gather, *, transform: bool) -> tuple[jax.Array, jax.Array]:
    """One panel of rows (p, in) -> (its rows times T (or not), then columns gathered by `gather` (or not)),
    and the count of its non-finite entries."""
    if transform:
        x = input_transform(x, perm, r_in, in_diag, r_pre)
    if gather is not None:
        x = x[:, gather]
    return x, jnp.sum(~jnp.isfinite(x))


def _row_pass(h: np.ndarray, pieces: tuple, gather: jax.Array | None, transform: bool) -> int:
    """Every panel of `ROWS` rows of `h` replaced by `_panel` of it; returns the non-finite entries seen."""
    bad = 0
    for i in range(0, h.shape[0], ROWS):
        out, n_bad = _panel(h[i : i + ROWS], *pieces, gather, transform=transform)
        h[i : i + ROWS] = np.asarray(out)
        bad += int(n_bad)
    return bad


def transpose_(h: np.ndarray, tile: int = TILE) -> np.ndarray:
    """`h (n, n)` replaced by `hᵀ` in place, one pair of `tile x tile` tiles at a time."""
    n = h.shape[0]
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            upper = h[i : i + tile, j : j + tile].copy()
            h[i : i + tile, j : j + tile] = h[j : j + tile, i : i + tile].T
            h[j : j + tile, i : i + tile] = upper.T
    return h


def symmetrize_(h: np.ndarray, tile: int = TILE) -> np.ndarray:
    """`h (n, n)` replaced by `(h + hᵀ) / 2` in place, bit for bit, one pair of tiles at a time."""
    n = h.shape[0]
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            mean = (h[i : i + tile, j : j + tile] + h[j : j + tile, i : i + tile].T) / np.float32(2)
            h[i : i + tile, j : j + tile] = mean
            h[j : j + tile, i : i + tile] = mean.T
    return h


def _zero_upper_(a: np.ndarray) -> None:
    """The strict upper triangle of `a (n, n)` set to 0, by panels of rows."""
    n = a.shape[0]
    cols = np.arange(n)
    for i in range(0, n, ROWS):
        rows = np.arange(i, min(i + ROWS, n))
        a[i : i + ROWS][cols[None, :] > rows[:, None]] = 0


def factor_in_place(
    xtx: np.ndarray, perm: Any, r_in: Any, in_diag: Any, r_pre: Any, *, damp: float, act_order: bool, name: str = ""
) -> GPTQFactor:
    """`gptq_factor(hessian_in_basis(xtx, perm, r_in, in_diag, r_pre), damp=, act_order=)`, computed in `xtx`'s buffer.

    Args:
      xtx: (in, in) float32 `XᵀX` in the layer's original basis (`usable(xtx)`); overwritten
        (it holds the factor afterwards: do not use it again).
      perm, r_in, in_diag, r_pre: the layer's input transform (`pack.input_transform`'s pieces).
      damp, act_order, name: as `gptq.gptq_factor`.

    Returns:
      The `GPTQFactor`; its `l` shares `xtx`'s memory when the buffer is 64-byte aligned.

    Raises:
      ValueError naming `name`: `xtx` not usable, NaN/Inf in the transformed matrix, or not
      positive definite after dampening (the messages of `gptq.gptq_factor`).
    """
    from scipy.linalg import lapack

    if not usable(xtx):
        raise ValueError(f"{_who(name)}: an in-place factorization needs a writable C-contiguous float32 (in, in) NumPy array; "
                         f"got {type(xtx).__name__} {getattr(xtx, 'dtype', '')} {getattr(xtx, 'shape', '')}")
    h, n = xtx, xtx.shape[0]
    pieces = tuple(None if p is None else jnp.asarray(p) for p in (perm, r_in, in_diag, r_pre))
    fold = None if act_order else jnp.arange(n - 1, -1, -1, dtype=jnp.int32)  # J folded into both passes
    _row_pass(h, pieces, fold, True)
    transpose_(h)
    bad = _row_pass(h, pieces, fold, True)  # a NaN/Inf of the first pass reaches the second
    if bad:
        raise ValueError(f"{_who(name)}: h (the input second moment XᵀX) of shape {(n, n)} holds {bad} NaN/Inf entries in the codes' basis")
    symmetrize_(h)
    d = h.diagonal().copy()  # in the stored order: reversed without act_order
    dead_stored = d == 0
    d[dead_stored] = 1
    if act_order:
        order = np.argsort(-d, kind="stable").astype(np.int32)
        rev = order[::-1].copy()
        gather = jnp.asarray(rev)
        _row_pass(h, pieces, gather, False)
        transpose_(h)
        _row_pass(h, pieces, gather, False)
        dead = dead_stored
        bump = dead_stored[rev].astype(np.float32)
    else:
        order = np.arange(n, dtype=np.int32)
        dead = dead_stored[::-1].copy()
        bump = dead_stored.astype(np.float32)
    bump += np.float32(damp) * np.mean(d, dtype=np.float32)
    h.reshape(-1)[:: n + 1] += bump
    c, info = lapack.spotrf(h.T, lower=0, overwrite_a=1, clean=0)  # h.T is Fortran-ordered: LAPACK works in h
    if not np.shares_memory(c, h):
        h[...] = c.T
    ld = h.diagonal()
    if info != 0 or not (np.all(np.isfinite(ld)) and np.all(ld > 0)):
        raise not_positive_definite(name, (n, n), damp)
    _zero_upper_(h)
    return GPTQFactor(jnp.asarray(order), jnp.asarray(dead), jax.device_put(h), act_order)
