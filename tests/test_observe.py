"""The observe pass: activation statistics in PyTorch and Flax NNX, their validation and files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from duquant_jax import DuQuantConfig
from duquant_jax.stats import (
    LayerStats,
    ModelStats,
    StatsAccumulator,
    StatsError,
    StatsFileError,
    layer_for_tensor,
    load_stats,
    save_stats,
    stats_for_layer,
)

torch = pytest.importorskip("torch")
from flax import nnx  # noqa: E402

import duquant_jax.nn as dnn  # noqa: E402
from interop import name_filter, observe  # noqa: E402

IN, HID, OUT = 24, 40, 12
# float32 accumulation of XᵀX against a float64 sum, relative to the largest entry.
XTX_REL_TOL = 1e-5


def _batches(seed: int = 0) -> list[np.ndarray]:
    """Batches of different leading shapes, with two outlier channels."""
    rng = np.random.default_rng(seed)
    scale = np.ones(IN, np.float32)
    scale[[3, 17]] = 25.0
    shapes = [(5, IN), (2, 7, IN), (1, IN), (3, 1, 4, IN)]
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]


def _weights(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w0": (rng.standard_normal((HID, IN)) / np.sqrt(IN)).astype(np.float32),
        "b0": rng.standard_normal(HID).astype(np.float32),
        "w1": (rng.standard_normal((OUT, HID)) / np.sqrt(HID)).astype(np.float32),
        "b1": rng.standard_normal(OUT).astype(np.float32),
    }


def _torch_mlp(w: dict[str, np.ndarray]) -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.ReLU(), torch.nn.Linear(HID, OUT))
    with torch.no_grad():
        m[0].weight.copy_(torch.from_numpy(w["w0"]))
        m[0].bias.copy_(torch.from_numpy(w["b0"]))
        m[2].weight.copy_(torch.from_numpy(w["w1"]))
        m[2].bias.copy_(torch.from_numpy(w["b1"]))
    return m


class _NnxMLP(nnx.Module):
    def __init__(self, w: dict[str, np.ndarray]):
        rngs = nnx.Rngs(0)
        self.up = nnx.Linear(IN, HID, rngs=rngs)
        self.down = nnx.Linear(HID, OUT, rngs=rngs)
        self.up.kernel[...] = w["w0"].T  # an nnx.Linear kernel is (in, out)
        self.up.bias[...] = w["b0"]
        self.down.kernel[...] = w["w1"].T
        self.down.bias[...] = w["b1"]

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def _reference(inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """NumPy: absmax over every token, float64 XᵀX, token count."""
    x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in inputs])
    return np.abs(x).max(axis=0), x.astype(np.float64).T @ x.astype(np.float64), x.shape[0]


def _assert_matches(s: LayerStats, inputs: list[np.ndarray]) -> None:
    absmax, xtx, tokens = _reference(inputs)
    np.testing.assert_array_equal(s.act_absmax, absmax.astype(np.float32))
    assert s.tokens == tokens
    assert s.xtx is not None and s.xtx.dtype == np.float32
    assert np.abs(s.xtx - xtx).max() <= XTX_REL_TOL * np.abs(xtx).max()
    np.testing.assert_array_equal(s.xtx, s.xtx.T)


def _hidden_torch(m: torch.nn.Module, batches: list[np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [torch.relu(m[0](torch.from_numpy(b))).numpy() for b in batches]


# ---- NumPy accumulator and LayerStats ----------------------------------------------------


def test_accumulator_matches_numpy_on_batches_of_any_leading_shape():
    acc = StatsAccumulator(IN, xtx=True, layer="l")
    for b in _batches():
        acc.update(b)
    acc.update(np.zeros((0, IN), np.float32))  # an empty batch changes nothing
    _assert_matches(acc.result(), _batches())


def test_accumulator_without_xtx_records_absmax_and_tokens_only():
    acc = StatsAccumulator(IN)
    for b in _batches():
        acc.update(b)
    s = acc.result()
    assert s.xtx is None and s.tokens == 5 + 14 + 1 + 12
    with pytest.raises(ValueError, match=r"\(\.\.\., 24\)"):
        acc.update(np.zeros((3, IN + 1), np.float32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"act_absmax": np.zeros((2, 3))}, r"act_absmax must have shape \(in,\)"),
        ({"act_absmax": np.array([1.0, np.nan])}, "NaN/Inf"),
        ({"act_absmax": np.array([1.0, -2.0])}, ">= 0"),
        ({"act_absmax": np.ones(2), "tokens": -1}, "tokens must be an int"),
        ({"act_absmax": np.ones(2), "xtx": np.eye(3)}, r"xtx must have shape \(in, in\)"),
        ({"act_absmax": np.ones(2), "xtx": np.array([[1.0, 0.5], [0.0, 1.0]])}, "not symmetric"),
        ({"act_absmax": np.ones(2), "xtx": np.array([[1.0, np.inf], [np.inf, 1.0]])}, "NaN/Inf"),
        ({"act_absmax": np.array([1.0, 3.0]), "xtx": np.eye(2)}, r"diag\(xtx\)\[1\]"),
    ],
)
def test_bad_layer_stats_raise_errors_naming_the_layer(kwargs, match):
    with pytest.raises(StatsError, match=match) as e:
        LayerStats(**kwargs, layer="model.layers.3.q_proj")
    assert "model.layers.3.q_proj" in str(e.value)


def test_stats_module_imports_neither_jax_nor_torch():
    code = "import sys, duquant_jax.stats; print('jax' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_config_that_needs_stats_and_gets_none_says_how_to_collect_them():
    cfg = DuQuantConfig(smooth_alpha=0.5)
    with pytest.raises(StatsError, match=r"layer 'fc'.*interop\.observe"):
        stats_for_layer(cfg, None, "fc", IN)
    with pytest.raises(StatsError, match=r"layer 'fc'.*have none for it.*observe"):
        stats_for_layer(cfg, ModelStats({"other": LayerStats(np.ones(IN))}), "fc", IN)
    s = LayerStats(np.ones(IN), tokens=3)
    assert stats_for_layer(cfg, {"fc": s}, "fc", IN) is s
    with pytest.raises(StatsError, match="24 input channels, the layer has 8"):
        stats_for_layer(cfg, {"fc": s}, "fc", 8)
    with pytest.raises(StatsError, match=r"needs XᵀX.*xtx=True"):
        stats_for_layer(DuQuantConfig(weight_method="gptq"), {"fc": s}, "fc", IN)
    assert stats_for_layer(DuQuantConfig(), None, "fc", IN) is None


# ---- PyTorch ------------------------------------------------------------------------------


def test_torch_observe_equals_numpy_on_the_same_batches():
    w = _weights()
    model = _torch_mlp(w)
    batches = _batches()
    with observe(model, xtx=True) as stats:
        for b in batches:
            model(torch.from_numpy(b))
    assert stats.complete and sorted(stats) == ["0", "2"]
    _assert_matches(stats["0"], batches)
    _assert_matches(stats["2"], _hidden_torch(model, batches))


def test_torch_observe_follows_the_filter_and_leaves_xtx_out_by_default():
    model = _torch_mlp(_weights())
    with observe(model, name_filter(include=r"^2$")) as stats:
        model(torch.from_numpy(_batches()[0]))
    assert list(stats) == ["2"] and stats["2"].xtx is None and stats["2"].tokens == 5
    with pytest.raises(ValueError, match="no nn.Linear of the model passed the filter"):
        observe(model, name_filter(include="nothing"))


def test_torch_hooks_are_removed_after_exit_and_after_an_exception():
    model = _torch_mlp(_weights())
    x = torch.from_numpy(_batches()[0])
    with torch.no_grad():
        y0 = model(x)
    with observe(model) as stats:
        model(x)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(KeyError, match="boom"):
        with observe(model, xtx=True) as failed:
            model(x)
            raise KeyError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert not failed.complete and stats.complete
    with pytest.raises(RuntimeError, match="raised an exception"):
        failed["0"]
    with pytest.raises(RuntimeError, match="incomplete"):
        failed.save("never-written.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


def test_torch_observe_statistics_are_unreadable_inside_the_block():
    model = _torch_mlp(_weights())
    with observe(model) as stats:
        model(torch.from_numpy(_batches()[0]))
        with pytest.raises(RuntimeError, match="has not exited"):
            len(stats)


def test_layers_that_see_no_batch_are_left_out_with_a_warning_and_no_batch_is_an_error():
    model = torch.nn.Module()
    model.mlp = _torch_mlp(_weights())
    model.unused = torch.nn.Linear(IN, 3)
    with pytest.warns(UserWarning, match=r"saw no batch.*unused"):
        with observe(model) as stats:
            model.mlp(torch.from_numpy(_batches()[0]))
    assert sorted(stats) == ["mlp.0", "mlp.2"]
    with pytest.raises(RuntimeError, match="no batch reached any selected nn.Linear"):
        with observe(model) as empty:
            pass
    assert not empty.complete


def test_torch_observe_records_bfloat16_inputs_in_float32():
    model = _torch_mlp(_weights()).to(torch.bfloat16)
    x = torch.from_numpy(_batches()[1]).to(torch.bfloat16)
    with observe(model, xtx=True) as stats:
        model(x)
    _assert_matches(stats["0"], [x.float().numpy()])


# ---- Flax NNX -----------------------------------------------------------------------------


def test_flax_observe_equals_numpy_and_puts_the_layers_back():
    w = _weights()
    model = _NnxMLP(w)
    up, down = model.up, model.down
    batches = _batches()
    with dnn.observe(model, xtx=True) as stats:
        assert isinstance(model.up, dnn.ObservedLinear)
        for b in batches:
            model(b)
    assert model.up is up and model.down is down
    assert sorted(stats) == ["down", "up"]
    _assert_matches(stats["up"], batches)
    hidden = [np.maximum(b @ w["w0"].T + w["b0"], 0) for b in batches]
    s = stats["down"]
    absmax, xtx, tokens = _reference(hidden)
    np.testing.assert_allclose(s.act_absmax, absmax, rtol=1e-5)
    assert s.tokens == tokens and np.abs(s.xtx - xtx).max() <= 1e-5 * np.abs(xtx).max()


def test_flax_layers_are_put_back_after_an_exception():
    model = _NnxMLP(_weights())
    up = model.up
    with pytest.raises(ValueError, match="boom"):
        with dnn.observe(model, dnn.path_filter(include="up")) as stats:
            model(_batches()[0])
            raise ValueError("boom")
    assert model.up is up and isinstance(model.up, nnx.Linear)
    assert not stats.complete


def test_flax_observe_under_nnx_jit_equals_eager():
    batches = _batches()
    eager_model, jit_model = _NnxMLP(_weights()), _NnxMLP(_weights())
    with dnn.observe(eager_model, xtx=True) as eager:
        for b in batches:
            eager_model(b)
    step = nnx.jit(lambda m, x: m(x))
    with dnn.observe(jit_model, xtx=True) as jitted:
        for b in batches:
            step(jit_model, b)
    for name in ("up", "down"):
        np.testing.assert_allclose(jitted[name].act_absmax, eager[name].act_absmax, rtol=1e-6)
        np.testing.assert_allclose(jitted[name].xtx, eager[name].xtx, rtol=1e-5, atol=1e-5 * np.abs(eager[name].xtx).max())
        assert jitted[name].tokens == eager[name].tokens


def test_flax_and_torch_agree_on_the_same_weights():
    w, batches = _weights(), _batches()
    tm, fm = _torch_mlp(w), _NnxMLP(w)
    with observe(tm, xtx=True) as ts:
        for b in batches:
            tm(torch.from_numpy(b))
    with dnn.observe(fm, xtx=True) as fs:
        for b in batches:
            fm(b)
    for t_name, f_name in (("0", "up"), ("2", "down")):
        t, f = ts[t_name], fs[f_name]
        assert t.tokens == f.tokens
        np.testing.assert_allclose(f.act_absmax, t.act_absmax, rtol=1e-5)
        assert np.abs(f.xtx - t.xtx).max() <= 1e-5 * np.abs(t.xtx).max()
    np.testing.assert_array_equal(fs["up"].act_absmax, ts["0"].act_absmax)  # the same inputs: exact


# ---- files --------------------------------------------------------------------------------


def _model_stats() -> ModelStats:
    model = _torch_mlp(_weights())
    with observe(model, xtx=True) as stats:
        for b in _batches():
            model(torch.from_numpy(b))
    layers = dict(stats)
    layers["absmax_only"] = LayerStats(np.arange(5, dtype=np.float32), None, 7)
    return ModelStats(layers)


def test_stats_file_round_trip_is_exact(tmp_path):
    stats = _model_stats()
    path = stats.save(tmp_path / "sub" / "stats.safetensors")
    back = load_stats(path)
    assert back.complete and list(back) == list(stats)
    for name, s in stats.items():
        b = back[name]
        np.testing.assert_array_equal(b.act_absmax, s.act_absmax)
        assert b.tokens == s.tokens and b.layer == name
        assert (b.xtx is None) == (s.xtx is None)
        if s.xtx is not None:
            np.testing.assert_array_equal(b.xtx, s.xtx)
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary file left


def test_missing_and_garbage_stats_files_raise_named_errors(tmp_path):
    with pytest.raises(StatsFileError, match=r"nope\.safetensors does not exist.*observe"):
        load_stats(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3 + b"not a safetensors header")
    with pytest.raises(StatsFileError, match=r"junk\.safetensors is not a readable safetensors file"):
        load_stats(junk)
    good = save_stats(tmp_path / "good.safetensors", _model_stats())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(StatsFileError, match=r"cut\.safetensors"):
        load_stats(cut)


def _rewrite(src, dst, tensors=None, metadata=None):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(src), framework="numpy") as f:
        meta = dict(f.metadata())
    t = load_file(str(src))
    save_file(tensors(t) if tensors else t, str(dst), metadata=metadata(meta) if metadata else meta)
    return dst


def test_inconsistent_stats_files_raise_errors_naming_file_and_layer(tmp_path):
    good = save_stats(tmp_path / "good.safetensors", _model_stats())

    def drop(t):
        t.pop("2.xtx")
        return t

    with pytest.raises(StatsFileError, match=r"missing\.safetensors, layer '2': tensor 2\.xtx is missing"):
        load_stats(_rewrite(good, tmp_path / "missing.safetensors", tensors=drop))

    def reshape(t):
        t["0.act_absmax"] = t["0.act_absmax"][:-1].copy()
        return t

    with pytest.raises(StatsFileError, match=r"layer '0': 0\.act_absmax has shape \(23,\), expected \(24,\)"):
        load_stats(_rewrite(good, tmp_path / "shape.safetensors", tensors=reshape))

    def negate(t):
        t["0.act_absmax"] = -t["0.act_absmax"]
        return t

    with pytest.raises(StatsFileError, match=r"neg\.safetensors: layer '0': act_absmax must be >= 0"):
        load_stats(_rewrite(good, tmp_path / "neg.safetensors", tensors=negate))
    with pytest.raises(StatsFileError, match="not a duquant-jax statistics file"):
        load_stats(_rewrite(good, tmp_path / "fmt.safetensors", metadata=lambda m: {**m, "format": "duquant-jax-packs"}))
    with pytest.raises(StatsFileError, match="format_version '9'"):
        load_stats(_rewrite(good, tmp_path / "ver.safetensors", metadata=lambda m: {**m, "format_version": "9"}))

    def bad_table(m):
        table = json.loads(m["layers"])
        table["0"].pop("tokens")
        return {**m, "layers": json.dumps(table)}

    with pytest.raises(StatsFileError, match=r"layer '0': bad metadata"):
        load_stats(_rewrite(good, tmp_path / "meta.safetensors", metadata=bad_table))


def test_saving_empty_or_wrongly_typed_stats_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="at least one layer"):
        save_stats(tmp_path / "a.safetensors", ModelStats())
    with pytest.raises(TypeError, match="layer 'x'"):
        save_stats(tmp_path / "a.safetensors", {"x": np.ones(3)})
    assert not list(tmp_path.iterdir())


def test_checkpoint_tensors_find_their_layer_statistics():
    s = LayerStats(np.ones(3))
    stats = ModelStats({"0.auto_model.encoder.layer.0.query": s, "model.layers.0.q_proj": s, "a.x": s, "b.x": s})
    assert layer_for_tensor(stats, "encoder.layer.0.query.weight") == "0.auto_model.encoder.layer.0.query"
    assert layer_for_tensor(stats, "model.layers.0.q_proj.weight") == "model.layers.0.q_proj"
    assert layer_for_tensor(stats, "model.layers.1.q_proj.weight") is None
    with pytest.raises(StatsError, match="several layers"):
        layer_for_tensor(stats, "x.weight")


@pytest.mark.parametrize("n, tile", [(1, 4), (7, 3), (300, 128), (513, 256)])
def test_symmetrize_in_place_equals_the_whole_matrix_expression_bitwise(n, tile):
    from interop.observe import symmetrize_

    a = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    want = 0.5 * (a + a.T)
    got = symmetrize_(a.clone(), tile=tile)
    assert torch.equal(got, want)


@pytest.mark.parametrize("rows", [1, 5, 64, 1000])
def test_banded_xtx_checks_equal_whole_matrix_ones(rows):
    from duquant_jax.stats import _finite_scale_asymmetry

    rng = np.random.default_rng(rows)
    a = rng.standard_normal((37, 37)).astype(np.float32)
    finite, scale, asym = _finite_scale_asymmetry(a, rows=rows)
    assert finite and scale == float(np.abs(a).max()) and asym == float(np.abs(a - a.T).max())
    a[30, 2] = np.nan
    assert not _finite_scale_asymmetry(a, rows=rows)[0]
