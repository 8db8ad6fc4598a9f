"""One call per layer (`interop.layer_product`, `native.LayerInt8`, the ops `duquant::layer_call` under `torch.compile`
and `duquant::layer_mm` under `torch.export`): the same C functions on the same operands as the two-op route
(`transform_quantize`, then the product of the resolved path), so the same bits, eager, compiled and exported, on
every path a token count can resolve to; bindings that follow the layer's tensors; handles that name one live layer
each (a copy gets its own); the operands checked before the C code runs.

Bounds: bit-identical (`torch.equal`) to the two-op route; no tolerance. Calls into the C code that the checks
should refuse run in a subprocess: a crash fails the test instead of ending the run.
"""

from __future__ import annotations

import pytest
import torch

from duquant_jax import DuQuantConfig
from interop import compiled, native
from interop.kernels import kernel_options, quantized_matmul
from interop.layer_product import layer_product
from interop.linear import DuQuantLinear
from helpers import compiled_op_targets, run_child

pytestmark = pytest.mark.skipif(compiled.load() is None, reason=f"the compiled helpers are unavailable: {compiled.unavailable()}")


def _layer(preset: str, n_in: int = 256, n_out: int = 192) -> DuQuantLinear:
    torch.manual_seed(0)
    config = DuQuantConfig.preset(preset, weight_method="rtn", smooth_alpha=None)
    return DuQuantLinear.from_linear(torch.nn.Linear(n_in, n_out), config)


def _two_op_route(layer: DuQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x (T, in) -> y (T, out) as the layer computed it before `layer_product`: the fused transform, then the product."""
    prepared = native.transform_quantize(x, layer.perm, layer.in_diag, layer.r_in, True, layer.act.traced_clip, layer.act.qa, None)
    return quantized_matmul(x, layer.qweight, layer.act, None, prepared=prepared)


@pytest.mark.parametrize("preset", ["w4a8", "w8a8"])
@pytest.mark.parametrize("path", ["c-int8", "int-mm", "fake-quant", None])
def test_layer_product_is_bit_identical_to_the_two_op_route_on_every_path(preset, path):
    """Forced paths and the autotuner's choice (None), 0, 1, 3 and 40 tokens; the layer's own forward too."""
    layer = _layer(preset)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode(), kernel_options(path=path):
        for tokens in (0, 1, 3, 40):
            x = torch.randn(tokens, 256, generator=gen) * 3
            want = _two_op_route(layer, x)
            got = layer_product(x, layer.perm, layer.in_diag, layer.r_in, layer.act, layer.qweight)
            assert got.shape == (tokens, 192) and got.dtype == torch.float32
            assert torch.equal(got, want), (preset, path, tokens)
            assert torch.equal(layer(x.view(1, tokens, 256)), want.view(1, tokens, 192) + layer.b_eff)
            if tokens and path is not None:
                assert layer.qweight.last_path == path


def test_layer_product_follows_the_layers_tensors_when_they_change():
    """A buffer replaced by another tensor rebinds; one changed in place is read as it is now (the C code reads
    the live values); codes replaced in the weight rebind the product."""
    layer = _layer("w4a8")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), kernel_options(path="c-int8"):
        first = layer(x)
        layer.perm = torch.roll(layer.perm, 1).contiguous()  # another object
        assert torch.equal(layer(x), _two_op_route(layer, x) + layer.b_eff) and not torch.equal(layer(x), first)
        layer.in_diag.mul_(2.0)  # in place, same storage
        assert torch.equal(layer(x), _two_op_route(layer, x) + layer.b_eff)
        w = layer.qweight
        codes = w.codes()
        w.qdata = torch.flip(w.qdata, dims=[1]).contiguous()  # other codes, same layout and shape
        assert not torch.equal(w.codes(), codes)
        assert torch.equal(layer(x), _two_op_route(layer, x) + layer.b_eff)


def test_compiled_layer_is_one_layer_op_and_equals_eager_bit_for_bit():
    """Under `torch.compile(fullgraph=True)` a layer is one `duquant::layer_call` (no torch rotation, no separate
    transform or product op, none of the layer's tensors an operand), and its outputs are eager's bits at one token
    and at many."""
    targets = compiled_op_targets(_layer("w4a8"), 256)
    assert any("layer_call" in t for t in targets), targets
    assert not any("transform_quantize" in t or "quantized_mm" in t or "layer_mm" in t for t in targets), targets
    assert not any("index_select" in t or "matmul" in t or "bmm" in t for t in targets), targets


def test_compiled_graph_takes_one_tensor_input_per_layer():
    """The graph of a compiled layer takes x and the bias its torch code adds, nothing else: the layer's perm,
    rotation, smoothing, codes and scales are read by the op from the layer its handle names, so dynamo guards and
    gathers none of them."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(example_inputs)
        return gm.forward

    layer = _layer("w4a8")
    with torch.inference_mode():
        torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)(torch.randn(1, 3, 256))
    tensors = [t for t in graphs[0] if isinstance(t, torch.Tensor)]
    assert [tuple(t.shape) for t in tensors] == [(1, 3, 256), (192,)]


def test_exported_layer_records_layer_mm_and_equals_eager():
    """`torch.export` records `duquant::layer_mm`, whose operands are the layer's tensors (a handle means nothing
    in another process), and the exported program computes eager's bits."""
    layer = torch.nn.Sequential(_layer("w8a8"))  # (a bare DuQuantLinear trips torch.export over its None buffers)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    program = torch.export.export(layer, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert any("layer_mm" in t for t in targets) and not any("layer_call" in t for t in targets), targets
    with torch.inference_mode():
        assert torch.equal(program.module()(x), layer(x))


def test_copies_get_their_own_handle_and_compiled_copies_use_their_own_weights():
    """A deepcopy registers anew: its compiled forward computes with its own tensors, not the original's, after the
    original's are changed; a handle whose layer is gone is named in the error."""
    import copy
    import gc

    from interop.custom_ops import layer_call
    from interop.layer_product import registered_layer

    layer = _layer("w4a8")
    x = torch.randn(1, 4, 256, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = layer(x)
        twins = [copy.deepcopy(layer), copy.deepcopy(layer)]
        assert len({layer._handle, *(t._handle for t in twins)}) == 3
        assert all(registered_layer(t._handle) is t for t in twins)
        layer.in_diag.mul_(3.0)  # the original changes; its copies must not follow
        torch._dynamo.reset()
        for twin in twins:
            assert torch.equal(torch.compile(twin, fullgraph=True, dynamic=True)(x), want)
        handle = twins[0]._handle
        del twins
        gc.collect()
        with pytest.raises(RuntimeError, match=f"layer handle {handle} names no live DuQuantLinear"):
            layer_call(torch.randn(1, 256), handle, 192)


def test_layer_int8_names_bad_operands_before_the_c_code_runs():
    """Bad inputs (dtype, width, stride), layer tensors changed in place since binding (an out-of-range permutation
    index, a resized smoothing vector) and a transform and product of different widths are named by the checks,
    in a child process."""
    got = run_child(
        """
        import json, torch
        from duquant_jax import DuQuantConfig
        from interop import native
        from interop.kernels import panels_product
        from interop.linear import DuQuantLinear
        torch.manual_seed(0)
        layer = DuQuantLinear.from_linear(torch.nn.Linear(256, 192), DuQuantConfig.preset("w4a8", weight_method="rtn", smooth_alpha=None))
        act = layer.act
        def fresh():
            t = native.TransformQuantize(layer.perm, layer.in_diag, layer.r_in, act.traced_clip, act.qa)
            return native.LayerInt8(t, panels_product(layer.qweight))
        x = torch.randn(3, 256)
        messages = {}
        def attempt(name, fn):
            try:
                fn()
                messages[name] = None
            except (native.NativeKernelError, ValueError, RuntimeError) as e:
                messages[name] = str(e)
        attempt("float64 x", lambda: fresh()(x.double()))
        attempt("x with 255 columns", lambda: fresh()(torch.randn(3, 255)))
        attempt("x with a column stride", lambda: fresh()(torch.randn(3, 512)[:, ::2]))
        bound = fresh()
        layer.perm[5] = 256  # in place: the C code refuses it
        attempt("perm out of range", lambda: bound(x))
        layer.perm[5] = 5
        layer.in_diag.resize_(128)  # in place, another shape
        attempt("diag resized", lambda: bound(x))
        attempt("transform of 256 and product of 128", lambda: native.LayerInt8(
            native.TransformQuantize(torch.arange(128), None, None, 1.0, 127), bound.product))
        print(json.dumps(messages))
        """
    )
    assert "x must be torch.float32" in got["float64 x"]
    assert "x must have 256 columns" in got["x with 255 columns"]
    assert "x must have unit column stride" in got["x with a column stride"]
    assert "perm must hold indices in [0, 256); got range [0, 256]" in got["perm out of range"]
    assert "diag must be a contiguous (256,) tensor" in got["diag resized"]
    assert "the transform's 128 channels must be the product's in_features 256" in got["transform of 256 and product of 128"]
