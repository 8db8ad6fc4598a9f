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


def test_report_renders_the_latest_cell_of_each_row(tmp_path):
    out = tmp_path / "q.jsonl"
    split = {"seed": 0, "total": 220, "n_calib": 16, "n_eval": 40}
    base = {"kind": "result", "model": "gemma", "metric": "perplexity", "split": split}
    spec = quality_rows.ROWS["spec"]
    recs = [
        {**base, "row": "float", "column": "float", "value": 40.0, "times": {"eval_s": 50.0}},
        {**base, "row": "spec", "column": "W4A8", "value": 200.0, "times": {"prepare_s": 30.0}, "labels": spec.labels(spec.config(4, 8))},
        {**base, "row": "spec", "column": "W4A8", "value": 130.0, "times": {"prepare_s": 31.0}, "labels": spec.labels(spec.config(4, 8))},
        {**base, "row": "hadamard", "column": "W4A8", "error": "NotImplementedError: x", "times": {}},
        {**base, "row": "rtn", "column": "W4A8", "value": 99.0, "times": {}, "split": {**split, "bos": False}},
    ]
    out.write_text("\n".join(json.dumps(r) for r in recs) + "\n{truncated")
    args = argparse.Namespace(out=out, no_write=True, seed=0, calib_chunks=16, eval_chunks=40, no_bos=False,
                              calib_sentences=256, eval_sentences=512)
    body = quality.report(args)  # the truncated last line is skipped with a warning
    assert "| spec | svd B=16 +perm | - | static-channel | row | rtn |  | 130.00 (31 s) |" in body
    assert "200.00" not in body and "99.00" not in body  # superseded, and another split
    assert "Float model: perplexity 40.0000" in body
    assert "hadamard W4A8: NotImplementedError" in body
    assert "- issue 8, W4A8 round-to-nearest per row: < 70 at float 39.7, i.e. < 1.76x float (< 70.53): best 130 (spec), NOT met" in body
