"""Layers that read one input tensor share one input transform in PyTorch (`interop.shared_input`):
the observe pass finds the groups, `quantize_` packs them jointly and links them, the linked model
gives bit for bit the outputs of the same packs run one layer at a time while transforming each
input once, saves and reloads its groups, and compiles with one transform per group."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from duquant_jax import DuQuantConfig
from duquant_jax.shared_input import pack_group
from duquant_jax.stats import StatsFileError, load_stats
from interop import calibrate, load_quantized, name_filter, observe, quantize_, save_quantized
from interop.saved_checks import SavedModelError
from interop.shared_input import SharedInput, input_groups

transformers = pytest.importorskip("transformers")

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj")


def _gemma(seed: int = 0) -> nn.Module:
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def _ids(seed: int = 1, batch: int = 2, tokens: int = 24) -> torch.Tensor:
    return torch.randint(0, 96, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _observed(model: nn.Module, xtx: bool = True):
    with observe(model, xtx=xtx) as stats, torch.no_grad():
        for s in (1, 2):
            model(_ids(s))
    return stats


def _expected_groups() -> list[tuple[str, ...]]:
    return [tuple(f"model.layers.{i}.{n}" for n in names) for i in range(2) for names in (ATTN, MLP)]


def test_observe_finds_the_layers_that_read_one_tensor():
    stats = _observed(_gemma(), xtx=False)
    assert list(stats.input_groups) == _expected_groups()
    assert repr(stats) == "ModelStats(15 layers, 0 with xtx, 4 input groups)"  # lm_head included


class _TwoReads(nn.Module):
    """a and b read x; c reads x after an in-place change; d reads a copy of x."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(16, 8) for _ in range(4))

    def forward(self, x):
        y = self.a(x) + self.b(x)
        y = y + self.d(x.clone())
        x.mul_(2.0)
        return y + self.c(x)


def test_observe_keeps_apart_a_changed_tensor_and_a_copy():
    model = _TwoReads()
    with observe(model) as stats, torch.no_grad():
        model(torch.randn(3, 16))
        model(torch.randn(3, 16))
    assert stats.input_groups == (("a", "b"),)


def test_observe_groups_drop_members_the_filter_leaves_out():
    model = _gemma()
    with observe(model, name_filter(exclude=r"k_proj$")) as stats, torch.no_grad():
        model(_ids())
    assert ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj") in stats.input_groups


def test_statistics_file_keeps_the_input_groups(tmp_path):
    stats = _observed(_gemma(), xtx=False)
    path = stats.save(tmp_path / "stats.safetensors")
    assert load_stats(path).input_groups == stats.input_groups


def test_statistics_file_with_a_bad_input_group_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    stats = _observed(_gemma(), xtx=False)
    path = stats.save(tmp_path / "stats.safetensors")

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    meta["input_groups"] = '[["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]]'
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(StatsFileError, match="bad input_groups: .*different input widths"):
        load_stats(path)


@pytest.mark.parametrize("preset", ["w4a8", "w8a8", "w4a16", "w4a4"])
def test_quantize_packs_each_group_with_one_transform_like_pack_group(preset):
    model = _gemma()
    stats = _observed(model)
    config = DuQuantConfig.preset(preset)
    quantize_(model, config, stats=stats, progress=False, input_groups="auto")
    assert input_groups(model) == [list(g) for g in _expected_groups()]
    names = _expected_groups()[0]
    float_model = _gemma()
    packs = pack_group([float_model.get_submodule(n).weight.detach().numpy() for n in names], config, stats[names[0]], names=names)
    for name, pack in zip(names, packs):
        layer = model.get_submodule(name)
        np.testing.assert_array_equal(layer.perm.numpy(), np.asarray(pack.perm))
        np.testing.assert_array_equal(layer.codes().numpy(), np.asarray(pack.w_codes))
        assert layer.perm is model.get_submodule(names[0]).perm  # one set of transform tensors


def _unlinked_outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The same packs, each member transforming its input alone."""
    other = copy.deepcopy(model)
    for g in {id(m.input_group): m.input_group for m in other.modules() if getattr(m, "input_group", None) is not None}.values():
        g.unlink()
    assert input_groups(other) == []
    with torch.no_grad():
        return other(ids).logits


@pytest.mark.parametrize("preset", ["w4a8", "w8a8", "w4a4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linked_groups_give_the_outputs_of_their_members_run_alone_bit_for_bit(preset, dtype):
    model = _gemma()
    stats = _observed(model)
    quantize_(model, DuQuantConfig.preset(preset), stats=stats, progress=False, input_groups="auto")
    model = model.to(dtype)
    assert model.get_submodule(_expected_groups()[1][1]).perm is model.get_submodule(_expected_groups()[1][0]).perm
    ids = _ids(7)
    with torch.no_grad():
        linked = model(ids).logits
    assert torch.equal(linked, _unlinked_outputs(model, ids))


def test_linked_calibrated_layers_match_their_members_run_alone():
    model = _gemma()
    stats = _observed(model, xtx=False)
    config = DuQuantConfig(rotation="hadamard", block_size=32, smooth_alpha=0.5, act_scheme="static-channel")
    quantize_(model, config, stats=stats, progress=False, input_groups="auto")
    with calibrate(model), torch.no_grad():
        model(_ids(3))
    scales = [model.get_submodule(n).a_scale for n in _expected_groups()[0]]
    assert all(torch.equal(s, scales[0]) for s in scales)  # one input, one calibration
    ids = _ids(8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _unlinked_outputs(model, ids))


def test_each_input_is_transformed_once_per_group(monkeypatch):
    model = _gemma()
    quantize_(model, DuQuantConfig.preset("w4a8"), stats=_observed(model), progress=False, input_groups="auto")
    calls = []
    layer_type = type(model.get_submodule("model.layers.0.self_attn.q_proj"))
    # the torch transform, the one C pass with the codes, or that pass and the product in one call (a layer alone)
    for method in ("rotate_input", "_fused_input", "_layer_product"):
        original = getattr(layer_type, method)

        def counting(self, *args, original=original):
            calls.append(self.name)
            return original(self, *args)

        monkeypatch.setattr(layer_type, method, counting)
    with torch.no_grad():
        model(_ids())
    # 2 blocks x (attention group, o_proj, MLP group, down_proj), and lm_head: 9 transforms for 15 layers
    assert len(calls) == 9, calls
    assert not any("k_proj" in c or "v_proj" in c or "up_proj" in c for c in calls)


class _Shared(nn.Module):
    """q and k read x; between them x is changed in place (the cache must see it)."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(64, 32), nn.Linear(64, 16)

    def forward(self, x):
        a = self.q(x)
        x.add_(1.0)
        return a, self.k(x)


def test_an_input_changed_in_place_between_members_is_transformed_again():
    torch.manual_seed(0)
    model = _Shared().eval()
    x = torch.randn(5, 64)
    quantize_(model, DuQuantConfig(rotation="hadamard", block_size=32, act_scheme="dynamic-token"), input_groups=[["q", "k"]], progress=False)
    assert isinstance(model.q.input_group, SharedInput)
    alone = copy.deepcopy(model)
    alone.q.input_group.unlink()
    with torch.no_grad():
        got, want = model(x.clone()), alone(x.clone())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_every_layer_is_fitted_alone_by_default():
    model, other = _gemma(), _gemma()
    stats = _observed(model)
    config = DuQuantConfig.preset("w4a8")
    quantize_(model, config, stats=stats, progress=False)
    assert input_groups(model) == []
    from interop.linear import DuQuantLinear

    name = "model.layers.0.self_attn.k_proj"
    alone = DuQuantLinear.from_linear(other.get_submodule(name), config, name=name, stats=stats[name])
    assert torch.equal(model.get_submodule(name).codes(), alone.codes())
    assert torch.equal(model.get_submodule(name).perm, alone.perm)


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ([["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.nope"]], r"names \['model.layers.0.self_attn.nope'\], which the filter"),
        ([["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]], "input widths"),
        ([["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"]], "did not read the same input"),
        ("qkv", "must be 'auto', None or a list"),
        ([["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"], ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]], "more than one group"),
    ],
)
def test_bad_named_groups_are_refused_naming_the_layers(groups, match):
    model = _gemma()
    stats = _observed(model, xtx=False)
    with pytest.raises(ValueError, match=match):
        quantize_(model, DuQuantConfig(smooth_alpha=0.5), stats=stats, progress=False, input_groups=groups)


def test_saved_model_reloads_its_groups_and_outputs_bit_for_bit(tmp_path):
    model = _gemma()
    quantize_(model, DuQuantConfig.preset("w4a8"), stats=_observed(model), progress=False, input_groups="auto")
    save_quantized(model, tmp_path)
    loaded = load_quantized(_gemma(seed=5), tmp_path)
    assert input_groups(loaded) == input_groups(model)
    assert loaded.get_submodule(_expected_groups()[0][2]).perm is loaded.get_submodule(_expected_groups()[0][0]).perm
    ids = _ids(9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_saved_group_whose_members_differ_is_refused_on_load(tmp_path, monkeypatch):
    model = _gemma()
    quantize_(model, DuQuantConfig.preset("w4a8"), stats=_observed(model), progress=False, input_groups=None)
    bad = [["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"]]  # never packed as one group
    import interop.serialize as serialize

    monkeypatch.setattr(serialize, "input_groups", lambda m: bad)
    save_quantized(model, tmp_path)
    monkeypatch.undo()
    with pytest.raises(SavedModelError, match="input_groups: .*o_proj's perm differs"):
        load_quantized(_gemma(), tmp_path)


def test_deepcopy_links_the_copies_and_drops_the_cached_input():
    model = _gemma()
    quantize_(model, DuQuantConfig.preset("w4a8"), stats=_observed(model), progress=False, input_groups="auto")
    dup = copy.deepcopy(model)
    q, k = dup.get_submodule(_expected_groups()[0][0]), dup.get_submodule(_expected_groups()[0][1])
    assert k.input_group is q.input_group and k.input_group.members[0] is q
    assert k.input_group is not model.get_submodule(_expected_groups()[0][1]).input_group


class _Attn(nn.Module):
    def __init__(self, d: int = 128):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, 32), nn.Linear(d, 32)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


def test_compiled_group_transforms_its_input_once_and_equals_eager():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = _Attn().eval()
    x = torch.randn(1, 24, 128)
    with observe(model, xtx=True) as stats, torch.no_grad():
        model(x)
    quantize_(model, DuQuantConfig.preset("w4a8"), stats=stats, progress=False, input_groups="auto")
    with torch.no_grad():
        eager = model(x)
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    for a, b in zip(eager, compiled):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    src = "\n".join(code)
    # one input rotation for q, k and v: torch's, or the one C pass with the codes (interop.native.transform_quantize)
    assert src.count("extern_kernels.bmm(") + src.count("torch.ops.duquant.transform_quantize.default(") == 1
    assert src.count("torch.ops.duquant.quantized_mm.default(") == 3


def test_inference_mode_inputs_are_shared_by_identity_and_give_the_same_outputs():
    model = _gemma()
    with observe(model, xtx=True) as stats, torch.inference_mode():
        model(_ids(1))
    assert list(stats.input_groups) == _expected_groups()
    quantize_(model, DuQuantConfig.preset("w4a8"), stats=stats, progress=False, input_groups="auto")
    ids = _ids(4)
    with torch.inference_mode():
        linked = model(ids).logits
    assert torch.equal(linked, _unlinked_outputs(model, ids))


def test_one_tensor_object_with_different_values_is_not_grouped_under_inference_mode():
    model = _TwoReads()
    with observe(model) as stats, torch.inference_mode():
        model(torch.randn(3, 16))
    assert stats.input_groups == (("a", "b", "c"),)  # identity alone: c reads x after x.mul_(2)
    with pytest.warns(UserWarning, match="saw different values"):
        quantize_(model, DuQuantConfig(smooth_alpha=0.5), stats=stats, progress=False, input_groups="auto")
    assert input_groups(model) == [["a", "b"]]
