"""The quality benchmark's harness (bench/quality*.py), without loading the real models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402
import quality_data  # noqa: E402
import quality_rows  # noqa: E402
import rtn_baseline  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402
from duquant_jax.quantize import weight_scales  # noqa: E402


def test_split_is_seeded_and_calibration_never_overlaps_evaluation():
    a, b = quality_data.Split(0, 220, 16, 40), quality_data.Split(0, 220, 16, 40)
    np.testing.assert_array_equal(a.calib, b.calib)
    np.testing.assert_array_equal(a.eval, b.eval)
    assert len(a.calib) == 16 and len(a.eval) == 40
    assert not set(a.calib) & set(a.eval)
    assert set(quality_data.Split(1, 220, 16, 40).eval) != set(a.eval)
    with pytest.raises(ValueError, match="cannot hold"):
        quality_data.Split(0, 10, 8, 8)


def test_corpus_gives_chunks_and_prose_sentences():
    chunks = quality_data.token_chunks(np.arange(1030), 512)
    assert chunks.shape == (2, 512) and chunks[1, 0] == 512
    s = quality_data.sentences()
    assert len(s) > 1000 and len(set(s)) == len(s)
    assert all(6 <= len(x.split()) <= 40 and "=" not in x for x in s)


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_baseline_scales_equal_spec_mse_grid(bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    w[:, 5] *= 30.0
    got = rtn_baseline.mse_row_scales(torch.from_numpy(w), bits).numpy()
    np.testing.assert_allclose(got, np.asarray(weight_scales(w, bits)), rtol=1e-6)


def test_rtn_baseline_quantizes_weights_and_calibrated_activations():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    w = model[0].weight.detach().clone()
    cfg = DuQuantConfig(weight_bits=4, act_bits=8)
    rtn_baseline.quantize_rtn_(model, cfg, lambda n, m: True)
    layer = model[0]
    s = rtn_baseline.mse_row_scales(w, 4)
    codes = layer.w_hat / s[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 8
    x = torch.randn(64, 32) * 3
    with pytest.raises(RuntimeError, match="never calibrated"):
        model(x)
    with rtn_baseline.calibrate_rtn(model):
        model(x)
    assert layer.a_scale.shape == (32,)
    y = model(x)
    assert not torch.equal(y, torch.nn.functional.linear(x, layer.w_hat, layer.bias))  # activations quantized
    assert torch.allclose(y, torch.nn.functional.linear(x, layer.w_hat, layer.bias), atol=0.2)


def test_every_row_and_list_is_valid():
    for name, names in quality_rows.LISTS.items():
        assert names and all(n in quality_rows.ROWS for n in names), name
    for row in quality_rows.ROWS.values():
        if row.kind in ("config", "rtn"):
            for w, a in quality_rows.BITS.values():
                cfg = row.config(w, a)
                assert set(row.labels(cfg)) == set(quality_rows.LABELS)
    assert quality_rows.ROWS["spec"].config(4, 8) == DuQuantConfig()
    with pytest.raises(SystemExit, match="unknown row or list"):
        quality_rows.select("baselines,nope")


def test_three_way_split_parts_are_disjoint_seeded_and_extend_the_two_way_split():
    t = quality_data.ThreeWaySplit(0, 220, 16, 40, 96)
    assert (len(t.calib), len(t.dev), len(t.test)) == (16, 40, 96)
    assert not (set(t.calib) & set(t.dev) or set(t.calib) & set(t.test) or set(t.dev) & set(t.test))
    two = quality_data.Split(0, 220, 16, 40)  # the split the presets were developed on is the development part
    np.testing.assert_array_equal(t.calib, two.calib)
    np.testing.assert_array_equal(t.dev, two.eval)
    assert set(quality_data.ThreeWaySplit(1, 220, 16, 40, 96).test) != set(t.test)
    with pytest.raises(ValueError, match="cannot hold"):
        quality_data.ThreeWaySplit(0, 100, 16, 40, 96)


def test_extra_calibration_items_come_after_the_test_part_and_leave_dev_and_test_unchanged():
    plain = quality_data.ThreeWaySplit(0, 220, 16, 40, 96)
    more = quality_data.ThreeWaySplit(0, 220, 16, 40, 96, n_calib_extra=48)
    np.testing.assert_array_equal(more.dev, plain.dev)
    np.testing.assert_array_equal(more.test, plain.test)
    assert len(more.calib) == 64 and set(plain.calib) < set(more.calib)
    assert not (set(more.calib) & (set(more.dev) | set(more.test)))
    assert "n_calib_extra" not in plain.describe() and more.describe()["n_calib_extra"] == 48
    with pytest.raises(ValueError, match=r"16 \(\+69\) calibration"):
        quality_data.ThreeWaySplit(0, 220, 16, 40, 96, n_calib_extra=69)


def test_a_line_recorded_before_a_config_field_existed_still_counts_as_its_preset():
    old = DuQuantConfig.preset("w8a8").to_dict()
    del old["act_group_size"]  # the field came later; its default is what the line measured
    cell = {"record": {"row": "presets", "config": old}}
    assert quality._is_preset(cell, "W8A8")
    assert not quality._is_preset({"record": {"row": "presets", "config": {**old, "act_clip": 0.9}}}, "W8A8")


def test_a_sensitivity_row_quantizes_only_the_layers_it_names_and_is_not_its_preset():
    row = quality_rows.ROWS["presets-only-down"]
    layers = row.layer_filter(lambda name, module: name.endswith("_proj"))
    assert layers("model.layers.3.mlp.down_proj", None)
    assert not layers("model.layers.3.mlp.up_proj", None) and not layers("model.layers.3.mlp.down", None)
    assert quality_rows.ROWS["presets"].layer_filter(len) is len  # no pattern: the task's own filter
    assert quality_rows.LISTS["sensitivity"] == [f"presets-only-{k}" for k in ("q", "k", "v", "o", "gate", "up", "down")]
    for name in ("w4-candidates", "w4a8-candidates", "groups-small", "g64", "msefine", "w4a4-candidates"):
        assert not [n for n in quality_rows.LISTS[name] if quality_rows.ROWS[n].only], name  # candidates quantize every layer
    config = DuQuantConfig.preset("w4a16").to_dict()
    assert quality._is_preset({"record": {"row": "presets", "config": config}}, "W4A16")
    assert not quality._is_preset({"record": {"row": "presets-only-down", "config": config}}, "W4A16")
    with pytest.raises(Exception, match="unterminated|missing"):
        quality_rows.Row("bad", "preset", only="(down")


def test_score_spec_parses_modes_and_parts_and_names_bad_ones():
    assert quality.parse_score("default=dev,test; float32=test") == {"default": ("dev", "test"), "float32": ("test",)}
    with pytest.raises(SystemExit, match="unknown kernel mode 'fast'"):
        quality.parse_score("fast=dev")
    with pytest.raises(SystemExit, match="needs parts from dev, test; got 'eval'"):
        quality.parse_score("default=eval")


def test_run_refuses_a_dirty_tree_unless_allowed(monkeypatch, tmp_path):
    monkeypatch.setattr(quality, "commit", lambda: "abc1234+dirty")
    args = argparse.Namespace(
        configs="float", bits="W8A8", score="default=dev", allow_dirty=False, skip_done=False, out=tmp_path / "q.jsonl", models="")
    with pytest.raises(SystemExit, match="'abc1234\\+dirty': commit first"):
        quality.run(args)
    assert not (tmp_path / "q.jsonl").exists()


def _gemma_lines(rng: np.random.Generator) -> list[dict]:
    """Float, a preset (default and float32 kernels), a superseded line, a dirty line and a peer, per-chunk NLLs."""
    split = {"seed": 0, "total": 220, "n_calib": 16, "n_dev": 8, "n_test": 24, "unit": "512-token chunks", "bos": True}
    base = {"kind": "result", "schema": 2, "model": "gemma", "metric": "perplexity", "split": split, "commit": "abc1234"}
    f = {"dev": rng.normal(2.8, 0.3, 8), "test": rng.normal(2.8, 0.3, 24)}
    w4a8 = DuQuantConfig.preset("w4a8").to_dict()

    def shifted(d: float, noise: float = 0.002) -> dict:
        return {k: (v + d + rng.normal(0, noise, v.size)).tolist() for k, v in f.items()}

    return [
        {**base, "row": "float", "column": "float", "kernels": "none", "per_item": {k: v.tolist() for k, v in f.items()}},
        {**base, "row": "presets", "column": "W4A8", "kernels": "default", "config": w4a8, "per_item": shifted(0.5)},
        {**base, "row": "presets", "column": "W4A8", "kernels": "default", "config": w4a8, "per_item": shifted(0.02)},
        {**base, "row": "presets", "column": "W4A8", "kernels": "float32", "config": w4a8, "per_item": {"test": shifted(0.021)["test"]}},
        {**base, "row": "presets", "column": "W4A8", "kernels": "default", "config": w4a8, "per_item": shifted(0.0),
         "commit": "abc1234+dirty"},
        {**base, "row": "llmc-gptq-w4a8", "column": "W4A8", "kernels": "peer", "per_item": shifted(0.1),
         "peer": {"name": "llm-compressor", "version": "0.14.0"}},
        {**base, "row": "presets", "column": "W8A8", "kernels": "default", "error": "RuntimeError: x"},
    ]


def test_report_renders_intervals_targets_and_peers_from_committed_lines_only(tmp_path):
    out, peers = tmp_path / "q.jsonl", tmp_path / "p.jsonl"
    lines = _gemma_lines(np.random.default_rng(0))
    out.write_text("\n".join(json.dumps(r) for r in lines if r["kernels"] != "peer") + "\n{truncated")
    peers.write_text(json.dumps(next(r for r in lines if r["kernels"] == "peer")) + "\n")
    args = argparse.Namespace(out=out, peers=peers, no_write=True, allow_dirty=False, seed=0, calib_chunks=16, dev_chunks=8,
                              test_chunks=24, calib_sentences=256, dev_sentences=384, test_sentences=768,
                              extra_calib_chunks=0, extra_calib_sentences=0)
    body = quality.report(args)  # the truncated line is skipped with a warning
    row = next(x for x in body.splitlines() if x.startswith("| `w4a8` | default |"))
    ratio = float(row.split("|")[4].split()[0])
    assert abs(ratio - np.exp(0.02)) < 0.002  # the latest committed line; not the superseded 0.5, not the dirty 0.0
    assert "<= 1.03: met, interval inside" in row  # exp(0.02) = 1.0202, the interval about ±0.001
    assert "llmc-gptq-w4a8" in row and "preset better" in row  # 0.02 against the peer's 0.1, paired
    f32 = next(x for x in body.splitlines() if x.startswith("| `w4a8` | float32 |"))
    assert "test: default kernels " in f32  # compared with the default-kernel line on the same test chunks
    assert "+dirty" not in body
    args.allow_dirty = True
    assert "+dirty" in quality.report(args)


def test_report_splits_a_presets_excess_over_the_projections_it_quantizes(tmp_path):
    rng = np.random.default_rng(2)
    lines = _gemma_lines(rng)
    f = lines[0]["per_item"]
    w4a8 = DuQuantConfig.preset("w4a8").to_dict()
    base = {k: v for k, v in lines[0].items() if k not in ("row", "column", "kernels", "per_item")}
    for kind, d in (("k", 0.005), ("down", 0.015)):  # exp(0.005) - 1 is a quarter of exp(0.02) - 1
        lines.append({**base, "row": f"presets-only-{kind}", "column": "W4A8", "kernels": "default", "config": w4a8,
                      "per_item": {"dev": (np.array(f["dev"]) + d + rng.normal(0, 0.001, 8)).tolist()}})
    out = tmp_path / "q.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    args = argparse.Namespace(out=out, peers=tmp_path / "none.jsonl", no_write=True, allow_dirty=False, seed=0, calib_chunks=16,
                              dev_chunks=8, test_chunks=24, calib_sentences=256, dev_sentences=384, test_sentences=768,
                              extra_calib_chunks=0, extra_calib_sentences=0)
    body = quality.report(args)
    k = next(x for x in body.splitlines() if x.startswith("| `\\.k_proj$` |"))
    assert abs(float(k.split("|")[2].split()[0]) - np.exp(0.005)) < 0.002
    assert abs(float(k.split("|")[3].strip().rstrip("%")) - 25) <= 3  # its share of the whole preset's excess
    total = next(x for x in body.splitlines() if x.startswith("| 1 + the sum of the excesses |"))
    assert abs(float(total.split("|")[2]) - (np.exp(0.005) + np.exp(0.015) - 1)) < 0.003
    assert "presets-only-k` (default kernels) against the preset" not in body  # a measurement, not a dev candidate


def test_versus_marks_what_the_paired_interval_does_not_separate():
    rng = np.random.default_rng(1)
    a = rng.normal(2.8, 0.3, 64)
    assert quality._versus("gemma", a - 0.05, a).startswith("better")
    assert quality._versus("gemma", a + 0.05, a).startswith("worse")
    assert quality._versus("gemma", a + rng.normal(0, 0.01, 64), a).startswith("not separated")
    assert quality._versus("minilm", a + 0.05, a).startswith("better")
