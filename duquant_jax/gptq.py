"""GPTQ weight rounding (Frantar et al., arXiv 2210.17323), jitted, in the basis the codes live in.

The algorithm is the reference code's `GPTQ.fasterquant` (IST-DASLab/gptq, `gptq.py`;
ModelCloud/GPTQModel maintains it) with static scales (its `static_groups`): columns
with `diag(h) == 0` are dead (their diagonal set to 1, their weight to 0); with
`act_order` columns are rounded in descending order of `diag(h)`; `damp * mean(diag(h))`
is added to the diagonal; `U` is the upper Cholesky factor of `h⁻¹` (in the rounding
order); each column is rounded and its error `(w - q s) / U_ii` is pushed onto the
later columns by row `i` of `U`, lazily: within blocks of `block` columns, and by one
matrix product between blocks.

How this module computes the same thing without forming `h⁻¹`:

- `U` is the inverse of `M`, the upper triangular factor of `h = M Mᵀ` (a Cholesky
  factorization from the bottom up). With `J` the reversal, `J h J = L Lᵀ` (one
  ordinary Cholesky, `L` kept as the factor) gives `M = J L J`. Only `M`'s diagonal
  `block x block` blocks are inverted (one batched triangular solve); `U` itself is
  never formed (the reference computes chol, cholesky_inverse and chol of `h`).
- The rounding state at column `j` is `W_j - sum_{i<j} e_i U_ij`, with `E U = W - Q̂`
  (`e_i` the pushed errors, `Q̂` the dequantized codes). For block `b` this is
  `W_b + (D_{<b} M_{<b,b}) U_bb` with `D = W - Q̂` of the columns already rounded: a
  product with `M`, not with `U`.
- Columns go in panels of `PANEL` (static slices in Python): a panel's share from the
  panels before it is one product `D[:, :a] M[:a, panel]`; inside the panel a
  `lax.scan` over its blocks adds `D_panel M[panel, block]` (columns not yet rounded
  hold 0 in `D_panel`). Within a block the reference's column loop runs `SUB` columns
  at a time (`lax.fori_loop`, batched over rows), one product passing each group's
  errors on to the rest of the block, so the loop's state stays in cache.

- Rows are independent given the factor: a tall weight (an output layer of 256000 rows)
  is rounded in chunks of rows (`chunk_rows`), so the rounding's temporaries stay near
  128 MiB each instead of growing with the vocabulary.

Two entry points: `gptq_codes` (factor and round), or `gptq_factor` once per Hessian
and `gptq_round` per layer (q/k/v share their input, gate/up too).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from duquant_jax.checks import count_nonfinite, is_float_dtype
from duquant_jax.config import qmax
from duquant_jax.quantize import weight_scales

HIGHEST = lax.Precision.HIGHEST
PANEL = 1024  # columns per panel: a multiple of `block` near this
SUB = 16  # columns per inner step of a block's column loop
ROW_CHUNK_ELEMENTS = 1 << 25  # weights rounded per program call at most: 128 MiB per (rows, in) float32 temporary


class GPTQFactor(NamedTuple):
    """The factor of one damped Hessian, shared by every layer that reads the same input.

    Attributes:
      order: (in,) int32, the rounding order: step `k` rounds column `order[k]`
        (descending `diag(h)`, ties by index, with act_order; else the identity).
      dead: (in,) bool, columns with `diag(h) == 0` (their codes are 0).
      l: (in, in) float32 lower triangular, `J hd[order][:, order] J = l lᵀ` with `hd`
        the damped, dead-fixed `h` and `J` the reversal; `M = J l J` is upper with
        `hd[order][:, order] = M Mᵀ`, and the reference code's `Hinv` is `M⁻¹`.
      act_order: whether `order` is a permutation (False: the identity).
    """

    order: jax.Array
    dead: jax.Array
    l: jax.Array
    act_order: bool = False


def _who(name: str) -> str:
    return f"GPTQ of layer {name!r}" if name else "GPTQ"


def _check_int(value: Any, arg: str, lo: int, hi: int | None, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{_who(name)}: {arg} must be an int in {rng}; got {value!r}")


def _check_matrix(a: Any, arg: str, shape: tuple[int, ...], name: str) -> None:
    got = tuple(getattr(a, "shape", ()))
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        raise ValueError(f"{_who(name)}: {arg} must be a NumPy or JAX array; got {type(a).__name__}")
    if got != shape:
        raise ValueError(f"{_who(name)}: {arg} must have shape {shape}; got {got}")
    if not is_float_dtype(dtype):
        raise ValueError(f"{_who(name)}: {arg} must have a floating dtype; got {dtype}")
    bad = count_nonfinite(a)
    if bad:
        raise ValueError(f"{_who(name)}: {arg} of shape {got} holds {bad} NaN/Inf entries")


def _check_weight(w2: Any, name: str) -> tuple[int, int]:
    shape = tuple(getattr(w2, "shape", ()))
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"{_who(name)}: w2 must be a non-empty 2-D (out, in) array; got shape {shape}")
    _check_matrix(w2, "w2", shape, name)
    return shape[0], shape[1]


def check_hessian(h: Any, n_in: int, name: str = "") -> None:
    """Raises ValueError naming `name` unless `h` is a finite float `(n_in, n_in)` array."""
    _check_matrix(h, "h (the input second moment XᵀX)", (n_in, n_in), name)


def _factor_fn(h: jax.Array, damp: jax.Array, *, act_order: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    n = h.shape[0]
    d = jnp.diagonal(h)
    dead = d == 0
    d = jnp.where(dead, 1.0, d)
    if act_order:
        order = jnp.argsort(-d, stable=True).astype(jnp.int32)
        rev = order[::-1]
        a = jnp.take(jnp.take(h, rev, axis=0), rev, axis=1)
    else:
        order = jnp.arange(n, dtype=jnp.int32)
        rev = order[::-1]
        a = jnp.flip(h)
    # Dead diagonals to 1, plus the dampening: a scatter on the diagonal. No symmetrization
    # (a transpose of `h` costs more than the flip): the Cholesky reads `a`'s lower triangle.
    bump = jnp.where(dead, 1.0, 0.0)[rev] + damp * jnp.mean(d)
    diag = jnp.arange(n)
    a = a.at[diag, diag].add(bump)
    l = lax.linalg.cholesky(a, symmetrize_input=False)
    ld = jnp.diagonal(l)
    ok = jnp.all(jnp.isfinite(ld) & (ld > 0))
    return order, dead, l, ok


_factor = jax.jit(_factor_fn, static_argnames=("act_order",))
# The same program with `h`'s buffer given to XLA for its (in, in) temporaries: one (in, in) float32 matrix
# less at the peak (1 GiB for a 16384-wide down projection). `h` is deleted.
_factor_consuming = jax.jit(_factor_fn, static_argnames=("act_order",), donate_argnums=0)


def _check_factor_args(h: Any, damp: Any, act_order: Any, name: str) -> int:
    shape = tuple(getattr(h, "shape", ()))
    if h is None or len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
        raise ValueError(f"{_who(name)}: h must be a square (in, in) matrix; got {'None' if h is None else f'shape {shape}'}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.integer, np.floating)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"{_who(name)}: damp must be a finite number >= 0; got {damp!r}")
    if not isinstance(act_order, bool):
        raise ValueError(f"{_who(name)}: act_order must be a bool; got {act_order!r}")
    return shape[0]


def _factor_checked(h: Any, damp: float, act_order: bool, name: str, consume_h: bool = False) -> GPTQFactor:
    shape = tuple(h.shape)
    if consume_h:
        if not isinstance(h, jax.Array) or h.dtype != jnp.float32:
            raise ValueError(f"{_who(name)}: consume_h needs h as a float32 JAX array (its buffer is reused); got {type(h).__name__} {h.dtype}")
        order, dead, l, ok = _factor_consuming(h, jnp.float32(float(damp)), act_order=act_order)
    else:
        order, dead, l, ok = _factor(jnp.asarray(h, jnp.float32), jnp.float32(float(damp)), act_order=act_order)
    if not bool(ok):  # waits for the Cholesky: no later LAPACK call overlaps it
        raise not_positive_definite(name, shape, damp)
    return GPTQFactor(order, dead, l, act_order)


def not_positive_definite(name: str, shape: tuple[int, ...], damp: float) -> ValueError:
    """The error for a Hessian whose Cholesky factorization failed even after dampening."""
    return ValueError(
        f"{_who(name)}: h (shape {shape}) is not positive definite even after dampening "
        f"(damp={damp} of the mean diagonal): its Cholesky factorization failed; check the "
        "statistics, or raise damp"
    )


def gptq_factor(h: Any, *, damp: float = 0.01, act_order: bool = False, name: str = "") -> GPTQFactor:
    """Dead channels, act_order, dampening and the Cholesky factor of one Hessian.

    Compute it once for layers that share their input (q/k/v, gate/up) and round
    each with `gptq_round`.

    Args:
      h: (in, in) float input second moment `XᵀX` in the basis of the codes (not
        normalized by the token count), symmetric: only the entries `h[order[p],
        order[q]]` with `p <= q` are read (the upper triangle, in the rounding order).
      damp: fraction of `mean(diag(h))` added to the diagonal, >= 0.
      act_order: round columns in descending order of `diag(h)`.
      name: the layer, for error messages.

    Returns:
      A `GPTQFactor` (holds one (in, in) float32 matrix).

    Raises:
      ValueError naming `name`: `h` missing, not square, not float, NaN/Inf, or not
      positive definite even after dampening.
    """
    n_in = _check_factor_args(h, damp, act_order, name)
    check_hessian(h, n_in, name)
    return _factor_checked(h, damp, act_order, name)


def gptq_factor_consuming(h: jax.Array, *, damp: float = 0.01, act_order: bool = False, name: str = "") -> GPTQFactor:
    """`gptq_factor` of a float32 JAX `h` the caller no longer needs: its buffer is reused by the
    factorization and `h` is deleted (as `gptq_codes(consume_h=True)`)."""
    n_in = _check_factor_args(h, damp, act_order, name)
    check_hessian(h, n_in, name)
    return _factor_checked(h, damp, act_order, name, consume_h=True)


def _round_columns(w1: jax.Array, u: jax.Array, s: jax.Array, q_max: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w1: (out, c) state, u: (c, c) upper, s: (out, c) -> (codes, errors), both (out, c) float.

    Column `i`: `q = clamp(round(w / s), -q_max - 1, q_max)`, `err = (w - q s) / u_ii`,
    later columns `-= err u[i]`.
    """

    def column(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        w1, codes, errs = carry
        w = lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
        si = lax.dynamic_index_in_dim(s, i, axis=1, keepdims=False)
        q = jnp.clip(jnp.round(w / si), -q_max - 1, q_max)
        err = (w - q * si) / u[i, i]
        w1 = w1 - err[:, None] * u[i][None, :]  # u[i, :i] is 0: earlier columns unchanged
        codes = lax.dynamic_update_index_in_dim(codes, q, i, axis=1)
        errs = lax.dynamic_update_index_in_dim(errs, err, i, axis=1)
        return w1, codes, errs

    _, codes, errs = lax.fori_loop(0, w1.shape[1], column, (w1, jnp.zeros_like(w1), jnp.zeros_like(w1)))
    return codes, errs


class Refit(NamedTuple):
    """Scales fitted during the rounding (the reference code without `static_groups`): when the
    rounding reaches a group's first column, the group's scale is fitted to the group's current
    (error-fed) weights by `quantize.weight_scales(method=method)` for `bits`-bit codes. The group
    size divides the block; columns go in their own order (no act_order)."""

    group: int
    bits: int
    method: str


def _round_block(wb: jax.Array, u: jax.Array, s: jax.Array, q_max: jax.Array, refit: Refit | None = None) -> tuple[jax.Array, jax.Array]:
    """wb: (out, b) state, u: (b, b) upper, s: (out, b) scales -> ((out, b) float codes, (out, b) scales).

    The reference's column loop over one block, run `SUB` columns at a time (each
    column's update reaches the rest of its sub-block; one product carries a
    sub-block's errors to the rest of the block), so the loop's state stays in cache.
    With `refit`, each group's scale is fitted to `wb`'s group columns when its first
    column comes (`s` then only gives the shape).
    """
    b = wb.shape[1]
    sub = SUB if b % SUB == 0 else b
    if refit is not None:
        sub = math.gcd(sub, refit.group)

    def sub_block(k: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        wb, codes, s = carry
        a = k * sub
        u_rows = lax.dynamic_slice_in_dim(u, a, sub, axis=0)  # (sub, b), zero left of column a
        q, err = _round_columns(
            lax.dynamic_slice_in_dim(wb, a, sub, axis=1),
            lax.dynamic_slice_in_dim(u_rows, a, sub, axis=1),
            lax.dynamic_slice_in_dim(s, a, sub, axis=1),
            q_max,
        )
        # The sub-block's own (already rounded) columns change too; nothing reads them again.
        wb = wb - jnp.dot(err, u_rows, precision=HIGHEST)
        return wb, lax.dynamic_update_slice_in_dim(codes, q, a, axis=1), s

    carry = (wb, jnp.zeros_like(wb), s)
    if refit is None:
        _, codes, s = lax.fori_loop(0, b // sub, sub_block, carry)
        return codes, s
    per_group = refit.group // sub

    def group_step(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        wb, codes, s = carry
        g0 = j * refit.group
        fresh = weight_scales(lax.dynamic_slice_in_dim(wb, g0, refit.group, axis=1), refit.bits, method=refit.method)
        s = lax.dynamic_update_slice_in_dim(s, jnp.broadcast_to(fresh[:, None], (wb.shape[0], refit.group)), g0, axis=1)
        return lax.fori_loop(j * per_group, (j + 1) * per_group, sub_block, (wb, codes, s))

    _, codes, s = lax.fori_loop(0, b // refit.group, group_step, carry)
    return codes, s


def _round_panel(
    w_p: jax.Array,
    g: jax.Array,
    m_pp: jax.Array,
    u_p: jax.Array,
    scale: jax.Array,
    g_idx: jax.Array,
    q_max: jax.Array,
    refit: Refit | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One panel of P columns, its blocks in a `lax.scan`.

    Args:
      w_p: (out, P) weights; g: (out, P) `D_before M[before, panel]` from earlier panels;
      m_pp: (P, P) `M[panel, panel]`; u_p: (P / b, b, b) the blocks' `U_kk`;
      scale: (out, n_groups); g_idx: (P,) group of each column; q_max: largest code;
      refit: scales fitted during the rounding (`scale` then only gives the shape).

    Returns:
      the codes (out, P) int8 (`D = W - Q̂` is rebuilt from them where later panels need it)
      and, with `refit`, each column's scale (out, P) float32 (else None).
    """
    out, width = w_p.shape
    block = u_p.shape[1]

    def step(d: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        c0 = k * block
        m_col = lax.dynamic_slice_in_dim(m_pp, c0, block, axis=1)
        t = lax.dynamic_slice_in_dim(g, c0, block, axis=1) + jnp.dot(d, m_col, precision=HIGHEST)
        wb = lax.dynamic_slice_in_dim(w_p, c0, block, axis=1)
        s = jnp.take(scale, lax.dynamic_slice_in_dim(g_idx, c0, block), axis=1)
        u = u_p[k]
        q, s = _round_block(wb + jnp.dot(t, u, precision=HIGHEST), u, s, q_max, refit)
        d = lax.dynamic_update_slice_in_dim(d, wb - q * s, c0, axis=1)
        return d, (q.astype(jnp.int8), s if refit is not None else None)

    _, (q, s) = lax.scan(step, jnp.zeros_like(w_p), jnp.arange(width // block))
    in_order = lambda x: None if x is None else jnp.transpose(x, (1, 0, 2)).reshape(out, width)  # noqa: E731
    return in_order(q), in_order(s)


def _prepare_body(
    w: jax.Array, l: jax.Array, order: jax.Array | None, dead: jax.Array, col_group: jax.Array, *, block: int
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """`w (out, in)` with dead columns zeroed, in the rounding order and padded to blocks; the group of
    each of its columns; `l` padded alike (None when no padding is needed: a program's output is a new
    buffer, and `l` may be 1 GiB); the inverses `U_kk` (n_blocks, block, block) of `M`'s diagonal blocks."""
    n = w.shape[1]
    n_pad = -(-n // block) * block
    pad = n_pad - n
    w0 = jnp.where(dead[None, :], 0.0, w)
    gidx = col_group
    if order is not None:
        w0, gidx = w0[:, order], gidx[order]
    l_padded = None
    if pad:  # dead columns at the end: M = diag(M, I), i.e. l = diag(I, l)
        w0 = jnp.pad(w0, ((0, 0), (0, pad)))
        gidx = jnp.pad(gidx, (0, pad))
        l = l_padded = jnp.pad(l, ((pad, 0), (pad, 0))).at[jnp.arange(pad), jnp.arange(pad)].set(1.0)
    nb = n_pad // block
    # Diagonal blocks of M (M's block k is l's block nb-1-k, reversed) and their inverses U_kk.
    l_diag = jax.vmap(lambda k: lax.dynamic_slice(l, (k * block, k * block), (block, block)))(jnp.arange(nb))
    m_diag = jnp.flip(l_diag[::-1], axis=(1, 2))
    eye = jnp.broadcast_to(jnp.eye(block, dtype=l.dtype), m_diag.shape)
    return w0, gidx, l_padded, lax.linalg.triangular_solve(m_diag, eye, left_side=True, lower=False)


_prepare = partial(jax.jit, static_argnames=("block",))(_prepare_body)
# The same, `w`'s buffer donated: with no column order and no padding `w0` is `w` with dead columns
# zeroed, made inside that buffer (one (out, in) float32 matrix less, 0.125 GiB at 2048 x 16384).
_prepare_consuming = partial(jax.jit, static_argnames=("block",), donate_argnums=0)(_prepare_body)


@partial(jax.jit, static_argnames=("width", "panel", "first", "refit"), donate_argnums=(0,))
def _panel_step(
    codes: jax.Array, w0: jax.Array, l: jax.Array, u_diag: jax.Array, scale: jax.Array, gidx: jax.Array,
    q_max: jax.Array, a: jax.Array, *, width: int, panel: int, first: bool, refit: Refit | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Rounds the `width` columns from `a` on (one panel; the `a // panel` panels before it are `panel`
    wide, none when `first`): `codes` (out, n_pad) int8 of the panels before it, updated in its own
    (donated) buffer. An earlier panel's `D = W - Q̂` is made again from its codes when it is needed
    (`w0 - codes * scale`, the expression that `_round_panel` uses), so no (out, in) float matrix of `D`
    is kept (0.125 GiB at 2048 x 16384). `a` is traced, so one program serves every panel of a shape
    (a program per panel cost 10 MiB of code each, 16 for a 16384-wide input). With `refit` it also
    returns `scale` (out, n_groups) with this panel's groups fitted (later panels read them)."""
    block, n = u_diag.shape[1], l.shape[0]
    e = a + width

    def earlier(k: jax.Array, g: jax.Array) -> jax.Array:
        """`g + D_k M[k, this panel]` for the k-th earlier panel: in a loop, so that one slice of `D`
        and one block of `M` are alive at a time (XLA held every panel's at once)."""
        c0 = k * panel
        cols_k = lambda x: lax.dynamic_slice_in_dim(x, c0, panel, axis=x.ndim - 1)  # noqa: E731
        s_k = jnp.take(scale, cols_k(gidx), axis=1)
        d_k = cols_k(w0) - cols_k(codes).astype(w0.dtype) * s_k
        m_k = jnp.flip(lax.dynamic_slice(l, (n - (k + 1) * panel, n - e), (panel, width)))  # M[k*panel:(k+1)*panel, a:e]
        return g + jnp.dot(d_k, m_k, precision=HIGHEST)

    g = jnp.zeros((w0.shape[0], width), w0.dtype)
    if not first:  # (the first panel may be narrower than `panel`: no slice of that width exists)
        g = lax.fori_loop(0, a // panel, earlier, g)
    m_pp = jnp.flip(lax.dynamic_slice(l, (n - e, n - e), (width, width)))  # M[a:e, a:e]
    u_p = lax.dynamic_slice_in_dim(u_diag, a // block, width // block)
    cols = lambda x: lax.dynamic_slice_in_dim(x, a, width, axis=x.ndim - 1)  # noqa: E731
    q, s = _round_panel(cols(w0), g, m_pp, u_p, scale, cols(gidx), q_max, refit)
    codes = lax.dynamic_update_slice_in_dim(codes, q, a, axis=1)
    if refit is None:
        return codes
    return codes, lax.dynamic_update_slice_in_dim(scale, s[:, :: refit.group], a // refit.group, axis=1)


@partial(jax.jit, static_argnames=("n",))
def _in_weight_order(codes: jax.Array, order: jax.Array | None, *, n: int) -> jax.Array:
    q = codes[:, :n]
    return q if order is None else q[:, jnp.argsort(order)]


def _round(
    w: jax.Array,
    l: jax.Array,
    order: jax.Array | None,
    dead: jax.Array,
    scale: jax.Array,
    col_group: jax.Array,
    q_max: jax.Array,
    *,
    block: int,
    panel: int,
    consume_w: bool = False,
    refit: Refit | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """GPTQ codes (out, in) int8 of `w (out, in)` given the factor's `l`, `order` (None:
    the identity) and `dead`; `scale (out, n_groups)`, `col_group (in,)` the group of each
    column, `q_max` the largest code; `block` columns per block, `panel` per panel;
    `consume_w`: `w`'s buffer may be reused (where no order or padding needs a new one).
    With `refit` (no `order`; its group divides `block`): (codes, (out, n_groups) float32 scales
    fitted during the rounding; `scale` then only gives the shape).

    One program call per panel (at most three programs: the first panel, the others, a narrower
    last one), the codes carried in a donated buffer: one program for them all held every panel's
    slices of `M` and of `D` at once (0.8 GiB of temporaries at 2048 x 16384)."""
    out, n = w.shape
    prepare = _prepare_consuming if consume_w and order is None and n % block == 0 else _prepare
    w0, gidx, l_padded, u_diag = prepare(w, l, order, dead, col_group, block=block)
    l = l if l_padded is None else l_padded
    n_pad = w0.shape[1]
    codes = jnp.zeros((out, n_pad), jnp.int8)
    step = partial(_panel_step, panel=panel, refit=refit)
    if refit is None:
        for a in range(0, n_pad, panel):
            codes = step(codes, w0, l, u_diag, scale, gidx, q_max, jnp.int32(a), width=min(panel, n_pad - a), first=not a)
        return _in_weight_order(codes, order, n=n)
    n_groups = scale.shape[1]  # the padded columns' groups (all zero weights) are fitted, then dropped
    fitted = jnp.ones((out, n_pad // refit.group), jnp.float32)
    gidx = jnp.arange(n_pad, dtype=jnp.int32) // refit.group
    for a in range(0, n_pad, panel):
        codes, fitted = step(codes, w0, l, u_diag, fitted, gidx, q_max, jnp.int32(a), width=min(panel, n_pad - a), first=not a)
    return _in_weight_order(codes, None, n=n), fitted[:, :n_groups]


def _scales(w_scale: Any, out: int, n_in: int, group_size: int | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """w_scale -> ((out, n_groups) float32 scales, (in,) int32 group of each column), checked."""
    if group_size is None:
        _check_matrix(w_scale, "w_scale (per row)", (out,), name)
        scale = np.asarray(w_scale, np.float32).reshape(out, 1)
        groups = np.zeros(n_in, np.int32)
    else:
        _check_int(group_size, "group_size", 1, None, name)
        n_groups = -(-n_in // group_size)
        _check_matrix(w_scale, f"w_scale (per row and group of {group_size})", (out, n_groups), name)
        scale = np.asarray(w_scale, np.float32)
        groups = (np.arange(n_in) // group_size).astype(np.int32)
    if not np.all(scale > 0):
        raise ValueError(f"{_who(name)}: w_scale must be > 0 everywhere; got min {float(scale.min())!r}")
    return scale, groups


def _check_round_args(w2: Any, factor: GPTQFactor, bits: Any, block: Any, name: str) -> tuple[int, int]:
    """The checks every rounding entry point makes: the weight, the factor's size, bits and block -> (out, in)."""
    out, n_in = _check_weight(w2, name)
    if tuple(factor.l.shape) != (n_in, n_in):
        raise ValueError(f"{_who(name)}: the factor is for {factor.l.shape[0]} inputs; w2 has shape {(out, n_in)}")
    _check_int(bits, "bits", 2, 8, name)
    _check_int(block, "block", 1, None, name)
    return out, n_in


def gptq_round(
    w2: Any,
    factor: GPTQFactor,
    w_scale: Any,
    bits: int,
    *,
    group_size: int | None = None,
    block: int = 128,
    name: str = "",
    consume_w: bool = False,
) -> jax.Array:
    """GPTQ codes of `w2 (out, in)` given its Hessian's `gptq_factor` (arguments as `gptq_codes`).

    `consume_w`: you will not use `w2` again; a float32 JAX `w2` may then be deleted, its buffer
    holding the working copy of the weight (used without a column order, and when `block` divides `in`)."""
    out, n_in = _check_round_args(w2, factor, bits, block, name)
    scale, groups = _scales(w_scale, out, n_in, group_size, name)
    return _round_checked(w2, factor, scale, groups, bits, block, consume_w)


def chunk_rows(out: int, n_in: int) -> int:
    """Rows rounded per program call: all `out`, or as many as keep one (rows, in) float32 temporary
    within ROW_CHUNK_ELEMENTS entries (rows are rounded independently given the factor)."""
    return max(1, min(out, ROW_CHUNK_ELEMENTS // max(n_in, 1)))


def _round_checked(
    w2: Any, factor: GPTQFactor, scale: np.ndarray, groups: np.ndarray, bits: int, block: int, consume_w: bool = False,
    refit: Refit | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    out, n_in = w2.shape
    block = min(block, n_in if refit is None else -(-n_in // refit.group) * refit.group)
    rounding = partial(
        _round, l=factor.l, order=factor.order if factor.act_order else None, dead=factor.dead, col_group=groups,
        q_max=jnp.float32(qmax(bits)), block=block, panel=max(block, PANEL // block * block), refit=refit,
    )
    rows = chunk_rows(out, n_in)
    if rows == out:
        # block_until_ready: no LAPACK call of a later pack overlaps this one
        return jax.block_until_ready(rounding(jnp.asarray(w2, jnp.float32), scale=scale, consume_w=consume_w))
    # A tall weight (an output layer: 262144 x 640, 256000 x 2048) in chunks of rows, so the rounding's
    # (rows, in) temporaries stay small: 6 GiB of them above the weight at 256000 x 2048 in one call. A short
    # last chunk is padded (zero weights, unit scales: its codes are dropped), so one program serves every chunk.
    codes = np.empty((out, n_in), np.int8)
    fitted = np.empty(scale.shape, np.float32) if refit is not None else None
    for r0 in range(0, out, rows):
        part, part_scale = jnp.asarray(w2[r0 : r0 + rows], jnp.float32), scale[r0 : r0 + rows]
        short = rows - part.shape[0]
        if short:
            part = jnp.pad(part, ((0, short), (0, 0)))
            part_scale = np.pad(part_scale, ((0, short), (0, 0)), constant_values=1.0)
        got = rounding(part, scale=part_scale, consume_w=True)
        if refit is None:
            codes[r0 : r0 + rows] = np.asarray(got)[: rows - short]
        else:
            codes[r0 : r0 + rows] = np.asarray(got[0])[: rows - short]
            fitted[r0 : r0 + rows] = np.asarray(got[1])[: rows - short]
    return jnp.asarray(codes) if refit is None else (jnp.asarray(codes), jnp.asarray(fitted))


def gptq_round_fitting_scales(
    w2: Any,
    factor: GPTQFactor,
    bits: int,
    *,
    group_size: int,
    method: str = "mse",
    block: int = 128,
    name: str = "",
    consume_w: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """GPTQ codes of `w2 (out, in)` with each group's scale fitted when the rounding reaches the group.

    The reference code's own default (IST-DASLab/gptq without `static_groups`): at a group's first
    column the group's scale is fitted, by `quantize.weight_scales(method=method)`, to the group's
    weights as the error feedback of the columns before has left them, instead of to `w2` before
    any rounding (`gptq_round` with `weight_scales(w2)`). Columns go in their own order: `factor`
    must be made without act_order, and `group_size` must divide `block` (contiguous groups, each
    inside one block). Other arguments as `gptq_round`.

    Returns:
      (codes (out, in) int8, scales (out, ceil(in / group_size)) float32), JAX arrays; the
      dequantized weight is `codes * scale` of each column's group.

    Raises:
      ValueError naming `name`: as `gptq_round`, and for an act_order factor, a group size that
      does not divide `block`, or an unknown `method`.
    """
    from duquant_jax.quantize import scale_alphas

    out, n_in = _check_round_args(w2, factor, bits, block, name)
    _check_int(group_size, "group_size", 1, None, name)
    if factor.act_order:
        raise ValueError(f"{_who(name)}: scales fitted during the rounding need columns in their own order; the factor has act_order")
    if block % group_size:
        raise ValueError(f"{_who(name)}: scales fitted during the rounding need group_size to divide block; got group_size {group_size}, block {block}")
    try:
        scale_alphas(method)
    except ValueError as e:
        raise ValueError(f"{_who(name)}: {e}") from None
    n_groups = -(-n_in // group_size)
    groups = (np.arange(n_in) // group_size).astype(np.int32)
    shape_only = np.ones((out, n_groups), np.float32)
    return _round_checked(w2, factor, shape_only, groups, bits, block, consume_w, Refit(group_size, bits, method))


def gptq_codes(
    w2: Any,
    h: Any,
    w_scale: Any,
    bits: int,
    *,
    group_size: int | None = None,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    name: str = "",
    consume_h: bool = False,
) -> jax.Array:
    """GPTQ rounding of one weight with fixed scales.

    Args:
      w2: (out, in) float weight in the basis the codes live in.
      h: (in, in) float `XᵀX` of the layer's inputs in the same basis (not normalized),
        symmetric (one triangle is read: see `gptq_factor`).
      w_scale: (out,) per row, or (out, ceil(in / group_size)) per row and group of
        `group_size` consecutive columns (a short last group allowed); fixed, > 0.
      bits: 2..8; codes are `clamp(round_half_even(w / s), -2^(bits-1), 2^(bits-1) - 1)`.
      group_size: columns per scale group, or None for per-row scales.
      damp: dampening, a fraction of `mean(diag(h))`.
      block: columns per lazy batch update (any value gives the same codes in exact
        arithmetic; float32 may differ at rounding ties).
      act_order: round columns in descending order of `diag(h)`; the codes are
        returned in `w2`'s column order either way.
      name: the layer, for error messages.
      consume_h: `h` is a float32 JAX array the caller no longer needs: its buffer is
        reused by the factorization (one (in, in) matrix less at the peak) and `h` is
        deleted. Same codes.

    Returns:
      (out, in) int8 codes (a JAX array); the dequantized weight is `codes * scale`.
      Dead columns (`diag(h) == 0`) get code 0.

    Raises:
      ValueError naming `name`: wrong shapes, NaN/Inf, non-positive scales, bad
      bits/block/group_size, or `h` not positive definite after dampening.
    """
    out, n_in = _check_weight(w2, name)
    _check_factor_args(h, damp, act_order, name)
    check_hessian(h, n_in, name)
    _check_int(bits, "bits", 2, 8, name)
    _check_int(block, "block", 1, None, name)
    scale, groups = _scales(w_scale, out, n_in, group_size, name)  # every check before the factorization
    factor = _factor_checked(h, damp, act_order, name, consume_h=consume_h)
    del h
    return _round_checked(w2, factor, scale, groups, bits, block)


def inverse_factor(factor: GPTQFactor) -> jax.Array:
    """(in, in) `U = M⁻¹`: the reference code's `Hinv` (upper Cholesky factor of the
    damped `h⁻¹`, in the rounding order). For checks; the rounding never forms it."""
    m = jnp.flip(factor.l)
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    return lax.linalg.triangular_solve(m, eye, left_side=True, lower=False).block_until_ready()
