"""A quantized layer's forward from its float32 input in one call: the input transform and per-token codes
(`native.TransformQuantize`, bound to the layer's tensors) and the product of the kernel path the token count
resolves to; on the c-int8 path both C functions run from one Python call (`native.LayerInt8`).

`DuQuantLinear` takes it where it takes the fused C input transform (`_fuses`: integer activations quantized
per token, float32 on the CPU, the compiled helpers built) and no other layer shares its input; under
`torch.compile` it is one op, `duquant::layer_call`, which finds the layer by the handle `register_layer` gave it
(`duquant::layer_mm`, which takes the layer's tensors, under `torch.export`; `interop.custom_ops`). Why: at one token (decode) a Gemma-3
270M projection's C work takes 20-25 us, and going through two ops (`transform_quantize`, `quantized_mm`),
each with its generic argument checks and lookups, cost 50-80 us more (bench/RESULTS.md, "Whole-model speed
on an AVX2-only CPU, one call per layer"). The C functions and their arguments are those of the two-op route, so
the outputs are bit-identical to it. Pure torch: no JAX.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

from interop import kernels, native
from interop.qweight import QuantizedWeight

__all__ = ["layer_product", "register_layer", "registered_layer"]

_LAYERS: dict[int, weakref.ref] = {}  # handle -> the layer (weakly held)
_HANDLES = itertools.count(1)


def register_layer(layer: Any) -> int:
    """A new handle naming `layer` (a `DuQuantLinear`) to the op `duquant::layer_call` (`interop.custom_ops`); the
    layer is held weakly, and its handle is forgotten when it is collected. A copy of a layer (`copy.deepcopy`)
    registers itself anew (`DuQuantLinear.__setstate__`), so that no two live layers share a handle."""
    handle = next(_HANDLES)

    def forget(ref: weakref.ref, handle: int = handle) -> None:
        if _LAYERS.get(handle) is ref:
            del _LAYERS[handle]

    _LAYERS[handle] = weakref.ref(layer, forget)
    return handle


def registered_layer(handle: int) -> Any:
    """The live layer `handle` names; a RuntimeError if none does (the layer was collected after a graph that calls
    it was compiled, or the handle comes from another process)."""
    ref = _LAYERS.get(handle)
    layer = None if ref is None else ref()
    if layer is None:
        raise RuntimeError(f"duquant::layer_call: layer handle {handle!r} names no live DuQuantLinear (the layer was "
                           "deleted after the graph calling it was compiled, or the graph comes from another process)")
    return layer

_BOUND = "layer-transform"  # the key of the bound transform among the weight's derived objects


def layer_product(x: torch.Tensor, perm: torch.Tensor, diag: torch.Tensor | None, rot: torch.Tensor | None, act: kernels.ActQuant,
                  weight: QuantizedWeight, paths: str = "") -> torch.Tensor:
    """float32 x (T, in) -> y (T, out) float32: `rotate_input`, `quantize_tokens` (act: "dynamic-token") and the
    product of the path `kernels.resolve_path` gives for T tokens (`paths`: as `quantized_mm`'s argument).

    The transform is bound once per weight (`weight.derived`, dropped on `.to()`, a relayout or a load) and rebound
    when the layer's tensors or activation arguments are other objects than the bound ones. Sets `weight.last_path`."""
    if act.scheme != "dynamic-token":
        raise ValueError(f"layer_product quantizes activations per token; got act scheme {act.scheme!r}")
    tokens = x.shape[0]
    if tokens == 0:
        return x.new_zeros(0, weight.out_features)
    clip, qa = act.traced_clip, act.qa
    bound = weight._derived.get(_BOUND)
    if bound is None or not bound.transform.fits(perm, diag, rot, clip, qa):
        bound = weight._derived[_BOUND] = _Bound(native.TransformQuantize(perm, diag, rot, clip, qa))
    name = kernels.resolve_path(weight, act, torch.float32, tokens, paths)
    if weight.last_path != name:  # a module attribute write costs microseconds: only when it changes
        weight.last_path = name
    if name == "c-int8":
        product = kernels.panels_product(weight)
        if bound.layer is None or bound.layer.product is not product:
            bound.layer = native.LayerInt8(bound.transform, product)
        return bound.layer(x)
    xq, s_t = bound.transform(x)
    with torch.no_grad():
        return kernels.PATHS[name].product(xq, s_t, weight, torch.float32)


class _Bound:
    """A weight's bound transform, and the transform and c-int8 product called as one (built on first use)."""

    __slots__ = ("transform", "layer")

    def __init__(self, transform: native.TransformQuantize):
        self.transform, self.layer = transform, None
