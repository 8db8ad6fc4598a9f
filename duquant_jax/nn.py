"""Flax NNX: `DuQuantLinear`, `quantize` (swap `nnx.Linear` modules) and `calibrate`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from duquant_jax.activations import static_scales
from duquant_jax.calibration import calibration_session
from duquant_jax.checks import check_input
from duquant_jax.config import DuQuantConfig
from duquant_jax.integer import (
    packed_forward,
    packs_nibbles,
    stored_codes,
    unpack_nibbles,
)
from duquant_jax.nn_graph import FilterFn, path_filter, selected_linears, set_child  # noqa: F401  (path_filter: public here)
from duquant_jax.pack import _abs_percentile, forward, pack_weight
from duquant_jax.packed import ARRAY_FIELDS, Pack
from duquant_jax.stats import LayerStats

PACK_FIELDS = tuple(f for f in ARRAY_FIELDS if f != "a_scale")



class PackVariable(nnx.Variable):
    """Packed arrays of a layer: perm, rotations, codes, weight scales."""


class ActStat(nnx.Variable):
    """Activation calibration state: the running percentile max and the frozen scales."""


class DuQuantLinear(nnx.Module):
    """A DuQuant-packed linear layer for NNX models, running SPEC's forward.

    Variables: the Pack's arrays (`perm`, `r_in`, `r_out`, `w_scale` and, when
    present, `in_diag`, `r_pre`, `out_diag`; see `duquant_jax.packed.Pack`) as
    PackVariable, absent ones None; the weight codes `w_codes` in their stored form
    (2..4 bits: two a byte, `(out, ceil(in/2))` uint8; 5..8 bits: `(out, in)` int8);
    `a_scale` ((in,) or (1,)) and the calibration running max as ActStat; `bias
    (out,)` as a Param. The forward is `duquant_jax.integer.packed_forward`: integer
    products for per-token and per-tensor activation scales, float32 otherwise.
    """

    def __init__(self, pack: Pack, bias: Any = None, name: str = ""):
        self.config = pack.config
        self.in_features, self.out_features = pack.in_features, pack.out_features
        self.name = name
        for field in PACK_FIELDS:
            value = stored_codes(pack) if field == "w_codes" else getattr(pack, field)
            setattr(self, field, None if value is None else PackVariable(jnp.asarray(value)))
        self.calibrated = pack.a_scale is not None
        zeros = jnp.zeros(self.in_features, jnp.float32)
        n_scales = 1 if self.config.act_scheme == "static-tensor" else self.in_features
        self.a_scale = ActStat(jnp.asarray(pack.a_scale) if self.calibrated else jnp.zeros(n_scales, jnp.float32))
        self.calib_max = ActStat(zeros)
        self.calib_seen = -1  # -1: not calibrating
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias, jnp.float32))

    @classmethod
    def from_linear(
        cls, linear: nnx.Linear, config: DuQuantConfig = DuQuantConfig(), name: str = "", stats: LayerStats | None = None
    ) -> DuQuantLinear:
        """Packs an `nnx.Linear`, whose kernel is `(in, out)`: the weight is its transpose.
        `stats`: the layer's input statistics, when the config needs them."""
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"from_linear needs an nnx.Linear; got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias[...]
        return cls(pack_weight(linear.kernel[...].T, config, stats, name=name), bias=bias, name=name)

    def _arrays(self) -> dict[str, Any]:
        return {f: getattr(self, f)[...] for f in PACK_FIELDS if getattr(self, f) is not None}

    def pack(self) -> Pack:
        """The layer's Pack, codes unpacked to int8 (with `a_scale` once calibrated)."""
        arrays = dict.fromkeys(PACK_FIELDS) | self._arrays()
        if packs_nibbles(self.config):
            arrays["w_codes"] = unpack_nibbles(arrays["w_codes"], self.in_features)
        return Pack(**arrays, a_scale=self.a_scale[...] if self.calibrated else None, config=self.config)

    def start_calibration(self) -> None:
        self.calib_max[...] = jnp.zeros(self.in_features, jnp.float32)
        self.calib_seen = 0

    def abort_calibration(self) -> None:
        self.calib_seen = -1

    def finish_calibration(self) -> bool:
        """Freezes `a_scale`; False (unchanged) when no batch was seen."""
        seen, self.calib_seen = self.calib_seen, -1
        if seen <= 0:
            return False
        if self.config.needs_calibration:
            self.a_scale[...] = static_scales(self.calib_max[...], self.config)
            self.calibrated = True
        return True

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        if self.calib_seen >= 0:
            pack = self.pack()
            if self.calib_seen < self.config.calib_batches:
                check_input(x, self.in_features, name=f"{self.name or 'layer'}: calibration batch {self.calib_seen}", finite=True)
                p = _abs_percentile(pack, jnp.asarray(x), float(self.config.act_percentile))
                self.calib_max[...] = jnp.maximum(self.calib_max[...], p)
                self.calib_seen += 1
            unquantized = dataclasses.replace(self.config, act_bits=16)
            return forward(pack.replace(config=unquantized, a_scale=None), x, bias)
        if self.config.needs_calibration and not self.calibrated:
            raise RuntimeError(
                f"layer {self.name or '(unnamed)'} quantizes activations (A{self.config.act_bits}) but was "
                "never calibrated: run batches inside `with duquant_jax.nn.calibrate(model):` first"
            )
        check_input(x, self.in_features, name=self.name or "x")
        a_scale = self.a_scale[...] if self.config.needs_calibration else None
        y = packed_forward(self._arrays(), a_scale, jnp.asarray(x), bias, self.config, self.in_features)
        return y.astype(jnp.result_type(x))


def quantize(
    model: nnx.Module,
    config: DuQuantConfig = DuQuantConfig(),
    filter_fn: FilterFn | None = None,
    stats: Mapping[str, LayerStats] | None = None,
) -> dict[str, DuQuantLinear]:
    """Swaps every selected `nnx.Linear` of `model` for a `DuQuantLinear`, in place.

    Modules are found by walking the NNX graph; names are their paths joined by ".".
    `stats` maps those names to the layers' input statistics (from `observe`), for
    configs that need them; a selected layer missing from it is an error naming it.
    Returns {name: new layer}.
    """
    selected = selected_linears(model, filter_fn, "quantize")
    replaced = {}
    for path, name, linear in selected:
        layer_stats = None if stats is None else stats.get(name)
        new = DuQuantLinear.from_linear(linear, config, name=name, stats=layer_stats)
        set_child(model, path, new)
        replaced[name] = new
    return replaced


def calibrate(model: nnx.Module):
    """A context manager: inside, every DuQuantLinear of `model` records SPEC's statistics on the
    batches you run; on a clean exit each freezes its activation scales (duquant_jax.calibration)."""
    layers = {".".join(str(p) for p in path): m for path, m in nnx.iter_graph(model) if isinstance(m, DuQuantLinear)}
    return calibration_session(layers, "quantize")


from duquant_jax.nn_observe import ObservedLinear, observe  # noqa: E402,F401  (the observe pass for NNX models)
