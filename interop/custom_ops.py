"""The quantized product as a `torch.library` custom op, so that `torch.compile` traces `DuQuantLinear` whole.

`torch.ops.duquant.quantized_mm(a, s_t, qdata, scales, in_features, out_features, bits, group_size,
layout, paths, act_scheme, act_bits, act_clip, out_dtype) -> y (T, out)`:

- `a`, `s_t`: the prepared activations of `interop.kernels.prepare` (x2 (T, in); or int8 codes
  `xq (T, in)` with float32 scales `s_t (T, 1)`; or float32 `x3 (T, in)`), computed in the graph,
  where inductor fuses them with the rotation;
- `qdata`, `scales`, `bits`, `group_size` (0: per row), `layout`: the `QuantizedWeight`'s tensors and
  facts (`in_features`, `out_features` its shape);
- `paths`: which kernel path, decided ahead of the graph (`interop.kernels.path_spec`): "" (the
  autotuner's choice at run time), one path name (forced), or a frozen table
  "1=int4pack,2-16=int-mm,..." read by the token count of the call, inside the op, so that one graph
  serves every prompt length;
- `act_scheme`, `act_bits`, `act_clip`: the activation handling (`ActQuant`), for the path checks;
- `out_dtype`: the dtype of x2 and of y.

`torch.ops.duquant.transform_quantize(x, perm, diag, rot, dynamic, clip, qa, static_scale) -> (xq, s_t)`: a
layer's input transform and per-token quantization in one C pass (`interop.native.transform_quantize`), which
`DuQuantLinear` calls under `torch.compile` wherever it calls the C function in eager mode, so that both modes
compute the same codes.

`torch.ops.duquant.layer_mm(x, perm, diag, rot, qdata, scales, in_features, out_features, bits, group_size, layout,
paths, act_bits, act_clip) -> y (T, out) float32`: the two ops above in one (`interop.layer_product`), for a layer
that takes the fused input transform with per-token codes and shares its input with no other layer: one op crossing
and one set of lookups a layer instead of two. `torch.export` records it (its operands are tensors and plain values).

`torch.ops.duquant.layer_call(x, layer, out_features) -> y (T, out) float32`: the same computation as `layer_mm`,
for `torch.compile`, reading the layer's tensors and kernel choices at run time from the layer a handle names
(`interop.layer_product.register_layer`), as the eager forward does, instead of taking them as operands. A compiled
graph then has one tensor input a layer, not six, and no guard on the layer's frozen choices: dynamo checks
(guards) and gathers (pre-graph code) fewer inputs, and inductor's wrapper asserts fewer shapes, per call of the
graph; the op call converts 3 arguments instead of 14. At one decode token of Gemma-3 270M (127 such layers) that
Python is a large part of the step (bench/RESULTS.md, "Whole-model speed on an AVX2-only CPU, layers named by
handle"). A handle means something only in the process that made it, so `DuQuantLinear` records `layer_mm` under
`torch.export`.

The ops are opaque to inductor; `quantized_mm`'s fake implementation gives `(T, out)` in `out_dtype`. At run time it
finds the layer's `QuantizedWeight` by its tensors (`register`; its derived caches and choices are
reused), or, failing that, wraps the tensors in a `WeightView` (correct, builds small caches per call).
Pure torch: no JAX.
"""

from __future__ import annotations

import functools
import weakref

import torch

from interop import kernels
from interop.layer_product import layer_product, registered_layer
from interop.qweight import QuantizedWeight

__all__ = ["WeightView", "layer_call", "layer_mm", "quantized_mm", "register", "transform_quantize"]

_WEIGHTS: dict[int, weakref.ref] = {}  # id(weight.qdata) -> the weight


def register(weight: QuantizedWeight) -> None:
    """Lets the op find `weight` (its caches, its choices) from its `qdata` tensor."""
    key = id(weight.qdata)
    ref = _WEIGHTS.get(key)
    if ref is not None and ref() is weight:
        return

    def forget(r: weakref.ref, key: int = key) -> None:
        if _WEIGHTS.get(key) is r:
            del _WEIGHTS[key]

    _WEIGHTS[key] = weakref.ref(weight, forget)


class WeightView:
    """The `QuantizedWeight` interface the kernel paths use, over given tensors (no copies, no checks)."""

    row_tiles = QuantizedWeight.row_tiles
    code_tile = QuantizedWeight.code_tile
    float_tile = QuantizedWeight.float_tile
    scales_2d = QuantizedWeight.scales_2d
    code_scales = QuantizedWeight.code_scales
    derived = QuantizedWeight.derived
    n_groups = QuantizedWeight.n_groups
    effective_group = QuantizedWeight.effective_group

    def __init__(self, qdata: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int, bits: int, group_size: int | None, layout: str):
        self.qdata, self.scales = qdata, scales
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.layout = bits, group_size, layout
        self.name, self.path, self.last_path = "", None, None
        self._derived: dict[str, object] = {}
        self.choices: dict[tuple, str] = {}


def _weight(qdata, scales, in_features, out_features, bits, group_size, layout):
    ref = _WEIGHTS.get(id(qdata))
    w = None if ref is None else ref()
    if w is not None and w.qdata is qdata and w.scales is scales and w.layout == layout:
        return w
    return WeightView(qdata, scales, in_features, out_features, bits, group_size, layout)


@functools.lru_cache(maxsize=64)
def _act(scheme: str, bits: int, clip: float) -> kernels.ActQuant:
    return kernels.ActQuant(scheme, bits, clip)


# Defined with the low-level `torch.library.Library` rather than `torch.library.custom_op`: one call of the
# latter cost ~25-45 us of Python wrapping (a dynamo-disable frame, grad-mode contexts, an alias check) on top
# of the ~8 us dispatch, per projection per token (bench/RESULTS.md, "Whole-model speed ..."). The op never
# returns an alias of its inputs (every path writes a fresh tensor) and has no autograd formula: it is an
# inference kernel, run below the autograd keys, so what it computes inside records no graph.
_LIB = torch.library.Library("duquant", "DEF")
_LIB.define(
    "quantized_mm(Tensor a, Tensor? s_t, Tensor qdata, Tensor scales, int in_features, int out_features, int bits, "
    "int group_size, str layout, str paths, str act_scheme, int act_bits, float act_clip, ScalarType out_dtype) -> Tensor"
)


def _quantized_mm(a, s_t, qdata, scales, in_features, out_features, bits, group_size, layout, paths, act_scheme, act_bits,
                  act_clip, out_dtype):
    """Prepared activations `a (T, in)` (and `s_t (T, 1)`) -> y (T, out) in `out_dtype` (module docstring)."""
    weight = _weight(qdata, scales, in_features, out_features, bits, group_size or None, layout)
    tokens = a.shape[0]
    if tokens == 0:
        return torch.zeros(0, out_features, dtype=out_dtype, device=a.device)
    name = kernels.resolve_path(weight, _act(act_scheme, act_bits, act_clip), out_dtype, tokens, paths)
    return kernels.PATHS[name].product(a, s_t, weight, out_dtype)


_LIB.impl("quantized_mm", _quantized_mm, "CompositeExplicitAutograd")


@torch.library.register_fake("duquant::quantized_mm", lib=_LIB)
def _(a, s_t, qdata, scales, in_features, out_features, bits, group_size, layout, paths, act_scheme, act_bits, act_clip, out_dtype):
    torch._check(a.shape[-1] == in_features, lambda: f"quantized_mm: a must have {in_features} columns; got {a.shape[-1]}")
    return a.new_empty((a.shape[0], out_features), dtype=out_dtype)


quantized_mm = torch.ops.duquant.quantized_mm.default


# The input transform and per-token quantization in one C pass (`interop.native.transform_quantize`), for graphs
# whose layers take it in eager mode too (`DuQuantLinear._fuses`), so that compiled and eager give the same codes.
_LIB.define(
    "transform_quantize(Tensor x, Tensor perm, Tensor? diag, Tensor? rot, bool dynamic, float clip, int qa, "
    "Tensor? static_scale) -> (Tensor, Tensor)"
)


def _transform_quantize(x, perm, diag, rot, dynamic, clip, qa, static_scale):
    from interop import native

    return native.transform_quantize(x, perm, diag, rot, dynamic, clip, qa, static_scale)


_LIB.impl("transform_quantize", _transform_quantize, "CompositeExplicitAutograd")


@torch.library.register_fake("duquant::transform_quantize", lib=_LIB)
def _(x, perm, diag, rot, dynamic, clip, qa, static_scale):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


transform_quantize = torch.ops.duquant.transform_quantize.default


# A layer's whole forward from its float32 input (`interop.layer_product`): the transform, the per-token codes and
# the product in one op, for the layers that take the fused input transform and share their input with no other.
_LIB.define(
    "layer_mm(Tensor x, Tensor perm, Tensor? diag, Tensor? rot, Tensor qdata, Tensor scales, int in_features, "
    "int out_features, int bits, int group_size, str layout, str paths, int act_bits, float act_clip) -> Tensor"
)


def _layer_mm(x, perm, diag, rot, qdata, scales, in_features, out_features, bits, group_size, layout, paths, act_bits, act_clip):
    """float32 x (T, in) -> y (T, out) float32 (`interop.layer_product.layer_product`)."""
    weight = _weight(qdata, scales, in_features, out_features, bits, group_size or None, layout)
    return layer_product(x, perm, diag, rot, _act("dynamic-token", act_bits, act_clip), weight, paths)


_LIB.impl("layer_mm", _layer_mm, "CompositeExplicitAutograd")


@torch.library.register_fake("duquant::layer_mm", lib=_LIB)
def _(x, perm, diag, rot, qdata, scales, in_features, out_features, bits, group_size, layout, paths, act_bits, act_clip):
    torch._check(x.shape[-1] == in_features, lambda: f"layer_mm: x must have {in_features} columns; got {x.shape[-1]}")
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


layer_mm = torch.ops.duquant.layer_mm.default


# `layer_mm` with the layer named by a handle instead of its tensors (module docstring).
_LIB.define("layer_call(Tensor x, int layer, int out_features) -> Tensor")


def _layer_call(x, layer, out_features):
    """float32 x (T, in) -> y (T, out) float32: `layer_product` of the layer `layer` names, as it is now."""
    m = registered_layer(layer)
    b = m._buffers  # the module's own dicts: `m.perm` (nn.Module.__getattr__) costs ~1 us a name, per layer and token
    return layer_product(x, b["perm"], b["in_diag"], b["r_in"], m.act, m._modules["qweight"])


_LIB.impl("layer_call", _layer_call, "CompositeExplicitAutograd")


@torch.library.register_fake("duquant::layer_call", lib=_LIB)
def _(x, layer, out_features):
    n_in = registered_layer(layer).in_features
    torch._check(x.shape[-1] == n_in, lambda: f"layer_call: x must have {n_in} columns; got {x.shape[-1]}")
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


layer_call = torch.ops.duquant.layer_call.default
