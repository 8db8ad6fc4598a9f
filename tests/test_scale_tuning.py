"""End-to-end scale tuning (interop.scale_tuning): the training forward is the layer's own, the tuned scales lower
the loss against the float model, only scales change, they are saved, and nothing changes on a failure."""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")

from interop import load_quantized, quantize_, save_quantized, tune_scales  # noqa: E402
from interop.linear import DuQuantLinear  # noqa: E402
from interop.scale_tuning import _divergence, _TrainedScales  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402

W4A16 = DuQuantConfig(weight_bits=4, act_bits=16, rotation="hadamard", block_size=16, row_rot_mode="none",
                      weight_group_size=16)
W4A8 = DuQuantConfig(weight_bits=4, act_bits=8, rotation="hadamard", block_size=16, row_rot_mode="none",
                     act_scheme="dynamic-token", weight_group_size=16, smooth_alpha=0.5)
W4A4_GROUPS = DuQuantConfig(weight_bits=4, act_bits=4, rotation="hadamard", block_size=16, row_rot_mode="none",
                            act_scheme="dynamic-group", act_group_size=16, act_clip=0.9)
SPEC = DuQuantConfig(weight_bits=4, act_bits=8)  # SPEC's algorithm: static per-channel activations, rotated rows


def _model(seed: int = 0) -> torch.nn.Module:
    """A 3-layer MLP giving 40 'logits'."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 40))


def _batches(seed: int = 1, n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 64, generator=g) * 2 for _ in range(n)]


def _quantized(config: DuQuantConfig, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(quantized model, its float teacher), calibrated on `_batches()` when the config needs it."""
    from interop import calibrate, observe

    teacher = _model(seed)
    model = copy.deepcopy(teacher)
    stats = None
    if config.needs_stats:
        with observe(model, xtx=config.needs_xtx) as stats:
            for b in _batches():
                model(b)
    quantize_(model, config, progress=False, stats=stats)
    if config.needs_calibration:
        with calibrate(model):
            for b in _batches():
                model(b)
    return model, teacher


def _kl(model, teacher, batches) -> float:
    with torch.no_grad():
        return float(sum(_divergence(model(b), teacher(b), "kl") for b in batches) / len(batches))


@pytest.mark.parametrize("config", [W4A16, W4A8, W4A4_GROUPS, SPEC], ids=["w4a16", "w4a8-smooth", "w4a4-groups", "spec"])
def test_training_forward_equals_the_layers_own_forward_before_training(config):
    model, _ = _quantized(config)
    x = _batches(seed=7, n=1)[0]
    for layer in (m for m in model if isinstance(m, DuQuantLinear)):
        inp = torch.randn(32, layer.in_features, generator=torch.Generator().manual_seed(3))
        want = layer(inp)
        got = _TrainedScales(layer).forward(inp)
        # bounded: float32 sums in another order; an activation code may move one step at a rounding tie
        assert torch.allclose(got, want, rtol=1e-4, atol=2e-3 * float(want.abs().max())), layer.name
    assert model(x).shape == (32, 40)


@pytest.mark.parametrize("config", [W4A16, W4A8], ids=["w4a16", "w4a8-smooth"])
def test_tuning_lowers_the_kl_to_the_float_model_and_changes_only_scales(config):
    model, teacher = _quantized(config)
    layers = [m for m in model if isinstance(m, DuQuantLinear)]
    codes = [m.codes().clone() for m in layers]
    scales = [m.qweight.scales.clone() for m in layers]
    held_out = _batches(seed=11, n=4)
    before_fit, before_held = _kl(model, teacher, _batches()), _kl(model, teacher, held_out)
    out = tune_scales(model, teacher, _batches(), epochs=30, lr=3e-3, progress=False)
    after_fit, after_held = _kl(model, teacher, _batches()), _kl(model, teacher, held_out)
    assert out["layers"] == 3 and out["steps"] == 30 * 6 and len(out["epoch_loss"]) == 30
    assert out["scales"] == sum(s.numel() for s in scales)
    assert after_fit < 0.7 * before_fit  # bounded: 180 Adam steps on 6 batches
    assert after_held < before_held  # and the gain carries to batches it never saw
    assert 0 < out["log_change"]["mean_abs"] <= out["log_change"]["max_abs"] < 1.0
    for m, c, s in zip(layers, codes, scales):
        assert torch.equal(m.codes(), c)  # the codes are untouched
        assert not torch.equal(m.qweight.scales, s)
        assert "forward" not in m.__dict__  # the training forward is gone
    # every parameter's requires_grad is back as it was (a quantized model's are all frozen; the teacher's not)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in teacher.parameters())


def test_the_layer_forward_uses_the_tuned_scales():
    model, teacher = _quantized(W4A16)
    tune_scales(model, teacher, _batches(), epochs=3, lr=1e-2, progress=False)
    layer = model[0]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    w = layer.codes().float() * layer.qweight.scales_2d().repeat_interleave(16, dim=1)
    want = layer.rotate_input(x) @ w.t() + layer.b_eff
    assert torch.allclose(layer(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_tuned_scales_are_saved_and_reloaded_bit_identically(tmp_path):
    model, teacher = _quantized(W4A8)
    tune_scales(model, teacher, _batches(), epochs=2, lr=1e-2, progress=False)
    save_quantized(model, tmp_path / "m")
    back = load_quantized(_model(seed=5), tmp_path / "m")
    for a, b in zip(model, back):
        if isinstance(a, DuQuantLinear):
            assert torch.equal(a.qweight.scales, b.qweight.scales)
    x = _batches(seed=9, n=1)[0]
    assert torch.equal(back(x), model(x))


def test_the_mse_loss_tunes_embeddings():
    model, teacher = _quantized(W4A16)
    before = float(sum(_divergence(model(b), teacher(b), "mse") for b in _batches()).detach())
    out = tune_scales(model, teacher, _batches(), loss="mse", epochs=10, lr=3e-3, progress=False)
    after = float(sum(_divergence(model(b), teacher(b), "mse") for b in _batches()).detach())
    assert after < before and out["epoch_loss"][-1] < out["epoch_loss"][0]


def test_the_order_is_seeded():
    results = []
    for _ in range(2):
        model, teacher = _quantized(W4A16)
        tune_scales(model, teacher, _batches(), epochs=2, lr=1e-2, seed=4, progress=False)
        results.append(torch.cat([m.qweight.scales.flatten() for m in model if isinstance(m, DuQuantLinear)]))
    assert torch.equal(results[0], results[1])


def test_bad_arguments_are_refused_naming_them():
    model, teacher = _quantized(W4A16)
    with pytest.raises(ValueError, match="epochs must be an int >= 1; got 0"):
        tune_scales(model, teacher, _batches(), epochs=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0; got -1"):
        tune_scales(model, teacher, _batches(), lr=-1)
    with pytest.raises(ValueError, match="lr must be a finite number > 0; got nan"):
        tune_scales(model, teacher, _batches(), lr=math.nan)
    with pytest.raises(ValueError, match="loss must be one of \\('kl', 'mse'\\); got 'l1'"):
        tune_scales(model, teacher, _batches(), loss="l1")
    with pytest.raises(ValueError, match="batches is empty"):
        tune_scales(model, teacher, [])
    with pytest.raises(ValueError, match="no DuQuantLinear with quantized weights"):
        tune_scales(_model(), teacher, _batches())
    with pytest.raises(ValueError, match="must give a tensor"):
        tune_scales(model, teacher, _batches(), run=lambda m, b: {"x": m(b)})
    with pytest.raises(ValueError, match=r"outputs \(32, 40\) and the teacher's \(32, 39\)"):
        tune_scales(model, teacher, _batches(), run=lambda m, b: m(b) if m is model else m(b)[:, :39])


def test_a_non_finite_loss_leaves_the_model_as_it_was():
    model, teacher = _quantized(W4A16)
    scales = [m.qweight.scales.clone() for m in model if isinstance(m, DuQuantLinear)]
    x = _batches(seed=9, n=1)[0]
    before = model(x)
    calls = []

    def run(m, b):  # the teacher's third output is NaN: the loss turns non-finite mid-epoch
        if m is teacher:
            calls.append(1)
            return m(b) * (math.nan if len(calls) == 3 else 1.0)
        return m(b)

    with pytest.raises(ValueError, match="the loss became nan"):
        tune_scales(model, teacher, _batches(), run=run, epochs=1, lr=1e-2, progress=False)
    assert all(torch.equal(m.qweight.scales, s) for m, s in zip((m for m in model if isinstance(m, DuQuantLinear)), scales))
    assert all("forward" not in m.__dict__ for m in model)
    assert torch.equal(model(x), before)
