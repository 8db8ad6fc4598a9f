"""Layers that read one input tensor (q/k/v, gate/up): one input transform for the group.

The input side of the transform (smoothing `in_diag`, `r_pre`, `perm`, `r_in`) is fitted once, on
the stacked weight `[W_1; ...; W_k]` (sum of outs, in): each channel's smoothing factor takes the
maximum over every member's column (as SmoothQuant and the DuQuant paper's code do for weights
that share an input), and the permutation and the "svd" family's input rotations are the stacked
weight's. Each member keeps its own output rows (`r_out`, `out_diag`), scales and codes.

With one input transform `x2 = x T` is the same for every member, so a runtime can transform and
quantize the input once for the group (`interop.shared_input`). A group of one is `pack_weight`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from duquant_jax.checks import check_stats, check_weight
from duquant_jax.config import DuQuantConfig
from duquant_jax.fit import Fitted, _row_transform, fit
from duquant_jax.pack import _fit_input_rotations, _stage_inputs, pack_fitted
from duquant_jax.packed import Pack
from duquant_jax.stats import LayerStats

INPUT_FIELDS = ("perm", "in_diag", "r_pre", "r_in")  # the Pack fields a group shares


def _check_group(ws: Sequence[Any], config: DuQuantConfig, stats: LayerStats | None, names: Sequence[str]) -> list[str]:
    if not isinstance(config, DuQuantConfig):
        raise TypeError(f"config must be a DuQuantConfig; got {type(config).__name__}")
    if len(ws) == 0:
        raise ValueError("a layer group needs at least one weight; got none")
    names = list(names) or [f"#{i}" for i in range(len(ws))]
    if len(names) != len(ws):
        raise ValueError(f"names must name every weight: {len(ws)} weights, {len(names)} names")
    n_in = None
    for w, name in zip(ws, names):
        try:
            check_weight(w, finite=False)  # NaN/Inf are found by each member's pack, naming it
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {name}: {e}") from None
        if n_in is not None and w.shape[1] != n_in:
            raise ValueError(f"layers that share an input must have one input width; {names[0]} has {n_in}, {name} has {w.shape[1]}")
        n_in = w.shape[1]
        check_stats(stats, config, tuple(w.shape), name)
    return names


def fit_group(ws: Sequence[Any], config: DuQuantConfig, stats: LayerStats | None = None) -> list[Fitted]:
    """ws: k weights (out_i, in) that read one input -> each one's Fitted pieces: the input side
    fitted on the stacked weight (module docstring), the output rows each layer's own."""
    stacked = ws[0] if len(ws) == 1 else jnp.concatenate([jnp.asarray(w) for w in ws], axis=0)
    joint = fit(stacked, config, stats)
    r_in = joint.r_in
    if config.rotation == "svd" and config.rotate_inputs:  # fitted in the jitted pack for a single layer
        staged = _stage_inputs(jnp.asarray(stacked), jnp.asarray(joint.perm), _maybe(joint.in_diag), _maybe(joint.r_pre), True)
        r_in = _fit_input_rotations(staged, config.block_size, config.rotation_method)
    shared = {"perm": joint.perm, "in_diag": joint.in_diag, "r_pre": joint.r_pre, "r_in": r_in}
    if config.rotation in ("svd", "none"):
        return [Fitted(**shared) for _ in ws]
    return [Fitted(**shared, **_row_transform(w.shape[0], config)) for w in ws]


def _maybe(a):
    return None if a is None else jnp.asarray(a)


def pack_group(
    ws: Sequence[Any],
    config: DuQuantConfig = DuQuantConfig(),
    stats: LayerStats | None = None,
    *,
    names: Sequence[str] = (),
    device: jax.Device | None = None,
) -> list[Pack]:
    """Packs k weights that read one input with one input transform (module docstring).

    Args:
      ws: the weights (out_i, in), one input width; any float dtype (as `pack_weight`).
      config: the settings, one for the group.
      stats: the statistics of their (one) input, for configs that need them.
      names: the layers' names, for error messages.
      device: as `pack_weight`.

    Returns:
      one Pack per weight, in order; their `perm`, `in_diag`, `r_pre` and `r_in` are equal.
    """
    names = _check_group(ws, config, stats, names)
    return [
        pack_fitted(w, fitted, config, stats, device=device, name=name)
        for w, fitted, name in zip(ws, fit_group(ws, config, stats), names)
    ]
