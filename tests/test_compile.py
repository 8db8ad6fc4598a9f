"""`torch.compile` of quantized models: one graph, no graph breaks, eager's outputs, no recompiles per
prompt length, and frozen kernel choices that survive save/load in a fresh process.

Bounds: the compiled model runs the same kernels on the same prepared activations as eager (the
per-token quantization is traced and fused by inductor, or, where eager takes the fused C input transform, the
same C function as the op `duquant::transform_quantize`; the product is the opaque `duquant::quantized_mm`, or both
are one `duquant::layer_call`), so its outputs must equal eager's to 1e-5 of max|y| (the float32 paths'
bound of interop/kernels.py; measured on this machine: bit-identical, 0.0, for every config).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import interop
from duquant_jax import DuQuantConfig
from interop import kernels
from interop.kernel_tuning import token_bucket
from interop.kernels import freeze_paths, kernel_options
from interop.linear import DuQuantLinear

CONFIGS = {
    "w8a8": lambda: DuQuantConfig.preset("w8a8"),
    "w4a8": lambda: DuQuantConfig.preset("w4a8"),
    "w4a16": lambda: DuQuantConfig.preset("w4a16"),
    "spec": lambda: DuQuantConfig(),  # static-channel A8: needs interop.calibrate
    "w4a4-groups": lambda: DuQuantConfig.preset("w4a4", act_scheme="dynamic-group", act_group_size=64),
}
LENGTHS = (2, 5, 17, 64, 100, 300)  # every bucket above one token
COMPARE_TOL = 1e-5


class Tiny(nn.Module):
    """Three 256 x 256 linears (one shape: one JAX compile per config) with a ReLU, a residual and a
    bias-free head.

    ReLU, not GELU: inductor's GELU differs from eager's by ~1e-6, which flips an occasional A8
    activation code of the next layer (measured: 1.3e-3 of max|y| at 64 tokens, w8a8); the quantized
    layers themselves compile bit-identically.
    """

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.up, self.down, self.head = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 256, bias=False)
        with torch.no_grad():
            for m in (self.up, self.down, self.head):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.down(torch.relu(self.up(x)))
        return self.head(h)


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    """(batch, length, 256) float32 activations with outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 256, generator=gen)
    x[..., ::32] *= 6.0
    return x


def quantized(name: str) -> nn.Module:
    """Tiny quantized with config `name` (statistics or calibration as it needs), paths frozen for float32."""
    model, config = Tiny().eval(), CONFIGS[name]()
    calib = [tokens(2, 16, seed) for seed in range(2)]
    stats = None
    if config.weight_method == "gptq" or config.smooth_alpha:
        with torch.no_grad(), interop.observe(model, xtx=True) as stats:
            for x in calib:
                model(x)
    interop.quantize_(model, config, progress=False, stats=stats)
    if config.needs_calibration:
        with torch.no_grad(), interop.calibrate(model):
            for x in calib:
                model(x)
    with kernel_options(autotune=True, precision="any"):
        freeze_paths(model)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: quantized(name) for name in CONFIGS}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_model_has_one_graph_and_matches_eager_across_lengths(models, name):
    model = models[name]
    torch._dynamo.reset()
    with torch.no_grad(), kernel_options(precision="any"):
        explained = torch._dynamo.explain(model)(tokens(1, 7, 0))
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
        for length in LENGTHS:
            x = tokens(1, length, length)
            assert _max_rel(compiled(x), model(x)) <= COMPARE_TOL, length
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for lengths {LENGTHS}"
    assert counter.op_count > 0


def test_graph_holds_one_custom_op_per_product(models):
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(models["w4a8"], backend=backend, fullgraph=True, dynamic=True)(tokens(1, 9, 1))
    # a product is `duquant::quantized_mm`, or `duquant::layer_call` where the layer's input transform runs with it
    ops = [n for n in graphs[0].graph.nodes if n.op == "call_function" and ("quantized_mm" in str(n.target) or "layer_call" in str(n.target))]
    assert len(ops) == 3


def test_decode_then_prefill_lengths_do_not_recompile_per_length(models):
    """One token is its own graph (dynamo specialises size 1), every longer prompt shares one."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(models["w8a8"], backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for length in (1, 1, *LENGTHS, 7, 1000):
            compiled(tokens(1, length, 3))
    assert counter.frame_count == 2


def test_frozen_paths_are_used_and_a_frozen_path_that_cannot_run_falls_back(models):
    model = models["w8a8"]
    weight = model.up.qweight
    with torch.no_grad(), kernel_options(autotune=True, precision="any"):
        for length in (1, 16, 64, 256, 1024):
            model(tokens(1, length, 0))
            assert weight.last_path == model.up.kernel_paths["float32"][token_bucket(length)[0]]
        saved = weight.frozen_paths
        try:
            weight.frozen_paths = {"float32": {b: "int4pack" for b in kernels.BUCKET_LABELS}}  # int8 layout: unavailable
            model(tokens(1, 3, 0))
            assert weight.last_path != "int4pack"
        finally:
            weight.frozen_paths = saved


def test_frozen_choices_need_valid_arguments(models):
    with pytest.raises(ValueError, match="tokens must be"):
        freeze_paths(models["w8a8"], tokens=(0,))
    with pytest.raises(ValueError, match="dtype must be"):
        freeze_paths(models["w8a8"], dtype=torch.float64)
    with pytest.raises(ValueError, match="bucket must be one of"):
        kernels.check_frozen({"float32": {"3-5": "int-mm"}}, "layer 'x'")
    with pytest.raises(ValueError, match="no quantized DuQuantLinear"):
        freeze_paths(Tiny())


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["jax"] = None  # JAX is not importable here
    import torch
    from torch import nn
    import interop
    from interop import kernel_tuning

    def refuse(*args, **kwargs):
        raise AssertionError("the reloaded model measured kernel paths again")

    kernel_tuning.get_tuner().choose = refuse
    exec({source!r})
    result = {{}}
    for name, saved in {saved!r}.items():
        model = interop.load_quantized(Tiny(), saved)
        with torch.no_grad():
            out = {{str(n): model(tokens(1, n, n)).tolist() for n in {lengths!r}}}
        paths = {{n: m.kernel_paths for n, m in model.named_modules() if hasattr(m, "kernel_paths")}}
        result[name] = {{"out": out, "paths": paths}}
    json.dump(result, open({result!r}, "w"))
    """
)
RELOAD_LENGTHS = (1, 5, 40, 200, 300)


def test_frozen_choices_reload_bit_identical_in_a_fresh_process_without_jax(models, tmp_path):
    """w8a8 (int8 layout) and w4a8 (int4pack layout): every bucket's frozen path, default options in the child."""
    names = ("w8a8", "w4a8")
    saved = {name: str(interop.save_quantized(models[name], tmp_path / name)) for name in names}
    with torch.no_grad(), kernel_options(autotune=True, precision="any"):  # the child's default options
        want = {name: {str(n): models[name](tokens(1, n, n)) for n in RELOAD_LENGTHS} for name in names}
    result = tmp_path / "result.json"
    source = inspect.getsource(Tiny) + "\n\n" + inspect.getsource(tokens)
    code = CHILD.format(source=source, saved=saved, lengths=RELOAD_LENGTHS, result=str(result))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)
    got = json.loads(result.read_text())
    for name in names:
        frozen = {n: m.kernel_paths for n, m in models[name].named_modules() if isinstance(m, DuQuantLinear)}
        assert got[name]["paths"] == frozen and all(frozen.values())
        for n, y in want[name].items():
            assert torch.equal(torch.tensor(got[name]["out"][n]), y), (name, n)
