"""GPTQ rounding in float64, literally: the reference code's `GPTQ.fasterquant`.

IST-DASLab/gptq, `gptq.py` at 06d5c54 (`fasterquant(blocksize, percdamp, groupsize,
actorder, static_groups=True)`), with fixed symmetric scales instead of its quantizer
object: dead columns, act_order, dampening, `chol -> cholesky_inverse -> chol(upper)`,
then columns one at a time inside blocks of `block`, a matrix update between blocks.
Two choices the reference code leaves open are fixed here as in `duquant_jax.gptq`:
act_order breaks ties of `diag(h)` by column index (a stable sort), and `h` is read as
symmetric from its upper triangle in the rounding order.
This is the oracle `duquant_jax.gptq` is tested against; it is written to be read
next to that code, not to be fast.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from duquant_jax.config import qmax


def _who(name: str) -> str:
    return f"GPTQ of layer {name!r}" if name else "GPTQ"


def column_scales(w_scale: Any, out: int, n_in: int, group_size: int | None, name: str = "") -> np.ndarray:
    """w_scale: (out,) or (out, ceil(in / group_size)) -> (out, in): the scale of every weight."""
    s = np.asarray(w_scale, np.float64)
    if group_size is None:
        if s.shape != (out,):
            raise ValueError(f"{_who(name)}: w_scale (per row) must have shape {(out,)}; got {s.shape}")
        return np.repeat(s[:, None], n_in, axis=1)
    n_groups = -(-n_in // group_size)
    if s.shape != (out, n_groups):
        raise ValueError(f"{_who(name)}: w_scale must have shape {(out, n_groups)}; got {s.shape}")
    cols = np.empty((out, n_in))
    for j in range(n_in):
        cols[:, j] = s[:, j // group_size]
    return cols


def hinv_factor(h: Any, *, damp: float = 0.01, act_order: bool = False, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """h: (in, in) symmetric -> (perm (in,), Hinv (in, in)): the rounding order and the
    upper Cholesky factor of the damped, dead-fixed `h⁻¹` in that order."""
    H = np.array(h, dtype=np.float64)  # a copy: the caller's h is never changed
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{_who(name)}: h must be a square (in, in) matrix; got shape {H.shape}")
    if not np.all(np.isfinite(H)):
        raise ValueError(f"{_who(name)}: h of shape {H.shape} holds {np.count_nonzero(~np.isfinite(H))} NaN/Inf entries")
    n = H.shape[0]
    dead = np.diag(H) == 0
    for i in np.flatnonzero(dead):
        H[i, i] = 1
    perm = np.arange(n)
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        H = H[perm][:, perm]
    H = np.triu(H) + np.triu(H, 1).T  # h is symmetric: read the upper triangle (in this order), as the JAX path does
    H[np.arange(n), np.arange(n)] += damp * np.mean(np.diag(H))
    try:
        L = np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        raise ValueError(f"{_who(name)}: h (shape {H.shape}) is not positive definite even after dampening") from None
    Linv = np.linalg.inv(L)
    Hinv = Linv.T @ Linv  # torch.cholesky_inverse
    return perm, np.linalg.cholesky(Hinv).T  # torch.linalg.cholesky(upper=True)


class Rounding(NamedTuple):
    """codes: (out, in) int8; ratio: (out, in) the value `w / s` each code was rounded
    from; order: (in,) the rounding order (step k rounded column order[k]); scales: the
    scales fitted during the rounding, (out, n_groups) float64 (None with given scales)."""

    codes: np.ndarray
    ratio: np.ndarray
    order: np.ndarray
    scales: np.ndarray | None = None


def gptq_rounding(
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
    fit_scales: str | None = None,
) -> Rounding:
    """`gptq_codes`, with the values the codes were rounded from and the rounding order.

    `fit_scales`: a scale method ("mse", "mse-fine", "minmax"): `w_scale` is ignored and each
    group's scale is fitted (`reference.options.group_scales`, in float64) to the group's weights as they stand when the rounding
    reaches its first column (the reference code without `static_groups`; `duquant_jax.gptq.
    gptq_round_fitting_scales`). Needs group_size, no act_order, and group_size dividing block."""
    W = np.array(w2, dtype=np.float64)
    if W.ndim != 2 or not np.all(np.isfinite(W)):
        raise ValueError(f"{_who(name)}: w2 must be a finite 2-D (out, in) array; got shape {W.shape}")
    out, columns = W.shape
    if np.shape(h) != (columns, columns):
        raise ValueError(f"{_who(name)}: h must have shape {(columns, columns)}; got {np.shape(h)}")
    q_max = qmax(bits)
    if fit_scales is not None:
        from duquant_jax.reference.options import group_scales
        if group_size is None or act_order or block % group_size:
            raise ValueError(f"{_who(name)}: fitted scales need a group_size dividing block and no act_order")
        n_groups = -(-columns // group_size)
        fitted = np.zeros((out, n_groups))
        w_scale = np.ones((out, n_groups))  # replaced group by group below
    S = column_scales(w_scale, out, columns, group_size, name)

    dead = np.diag(np.asarray(h, np.float64)) == 0
    W[:, dead] = 0
    perm, Hinv = hinv_factor(h, damp=damp, act_order=act_order, name=name)
    W = W[:, perm]
    S = S[:, perm]  # static groups: each column keeps its own group's scale

    Q = np.zeros_like(W)
    R = np.zeros_like(W)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            if fit_scales is not None and (i1 + i) % group_size == 0:  # a group's first column: fit its scale now
                g = (i1 + i) // group_size
                fitted[:, g] = group_scales(W1[:, i : i + group_size], bits, None, fit_scales)
                S[:, i1 + i : i1 + i + group_size] = fitted[:, g : g + 1]
            w = W1[:, i]
            d = Hinv1[i, i]
            s = S[:, i1 + i]
            R[:, i1 + i] = w / s
            q = np.clip(np.round(w / s), -q_max - 1, q_max)
            Q1[:, i] = q
            err1 = (w - q * s) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = np.argsort(perm)
    return Rounding(Q[:, invperm].astype(np.int8), R[:, invperm], perm, fitted if fit_scales is not None else None)


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
) -> np.ndarray:
    """GPTQ codes of `w2: (out, in)` given `h = XᵀX: (in, in)` and fixed scales: (out, in) int8.

    Arguments as `duquant_jax.gptq.gptq_codes`.
    """
    return gptq_rounding(
        w2, h, w_scale, bits, group_size=group_size, damp=damp, block=block, act_order=act_order, name=name
    ).codes
