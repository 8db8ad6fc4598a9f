"""`duquant verify` judges the quantized layer itself: scales, codes and the weight-quantized forward
against the float64 reference, for SPEC and every preset; damaged packs fail on the verdict, not on
their checksums (every damaged pack here is rewritten through `save_packs`)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import write_checkpoint

from duquant_jax import DuQuantConfig, LayerStats, pack_weight
from duquant_jax import reference as ref
from duquant_jax.checkpoint import layer_file
from duquant_jax.cli import main
from duquant_jax.config import PRESETS, qmax
from duquant_jax.io import load_packs, save_packs
from duquant_jax.stats import save_stats
from duquant_jax.verify import explain_pack

OUT, IN = 128, 256


def _layer(seed: int = 0, out: int = OUT, n: int = IN):
    """A Gaussian weight, and statistics (absmax and XᵀX) of correlated inputs with two outlier channels."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, n)).astype(np.float32)
    x = rng.standard_normal((4 * n, n)).astype(np.float32) @ (0.1 * rng.standard_normal((n, n)) + np.eye(n)).astype(np.float32)
    x[:, [3, 50]] *= 10.0
    return w, LayerStats(np.abs(x).max(axis=0), (x.T.astype(np.float64) @ x).astype(np.float32), len(x))


WEIGHT, STATS = _layer()
CONFIGS = {
    "spec": DuQuantConfig(),
    **{name: DuQuantConfig.preset(name) for name in sorted(PRESETS)},
    "svd-smooth-groups": DuQuantConfig(smooth_alpha=0.5, weight_group_size=64, act_scheme="static-tensor"),
    "hadamard-rows-minmax": DuQuantConfig(rotation="hadamard", block_size=64, scale_method="minmax"),
    "hadamard-groups-msefine": DuQuantConfig(rotation="hadamard", block_size=64, weight_bits=4, weight_group_size=32,
                                             scale_method="mse-fine"),
    "duquant-propagate": DuQuantConfig(rotation="duquant", block_size=64, smooth_alpha=0.5, row_rot_mode="propagate", act_scheme="dynamic-token"),
    "none-groups-w8": DuQuantConfig(rotation="none", enable_permute=False, weight_bits=8, weight_group_size=32),
    # GPTQ fitting each group's scale as the rounding reaches it: the scales are checked against the weights the
    # forced float64 rounding has at each group's first column
    "w4a8-fitted-groups": DuQuantConfig.preset("w4a8", gptq_static_groups=False),
    "w4a16-fitted-groups-msefine": DuQuantConfig.preset("w4a16", gptq_static_groups=False, gptq_act_order=False,
                                                        scale_method="mse-fine"),
}


def _stats(cfg: DuQuantConfig) -> LayerStats | None:
    return STATS if cfg.needs_stats else None


@functools.cache
def _packs(name: str):
    """(the JAX path's pack as NumPy arrays, the reference's pack) of WEIGHT with CONFIGS[name]."""
    cfg = CONFIGS[name]
    return jax.tree.map(np.asarray, pack_weight(WEIGHT, cfg, _stats(cfg))), ref.pack_weight(WEIGHT, cfg, _stats(cfg))


def _roundtrip(tmp_path: Path, pack, name: str = "layer"):
    """`pack` written through `save_packs` (valid checksums) and read back with them verified."""
    path = save_packs(tmp_path / f"{name}.safetensors", {name: pack})
    return load_packs(path, verify=True)[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_intact_pack_passes_for_spec_every_preset_and_the_options(tmp_path, name):
    cfg = CONFIGS[name]
    pack, want = _packs(name)
    e = explain_pack(_roundtrip(tmp_path, pack), WEIGHT, stats=_stats(cfg), want=want)
    q = e.quantized
    assert e.transform_ok and q.ok and e.ok, (name, e)
    assert q.scale_err <= 1e-5  # SCALE_RTOL 1e-4: margin 10x
    assert q.round_err - 0.5 <= (1e-4 if cfg.weight_method == "rtn" else 0.01)  # ROUND_TOL: 1e-3 / 0.05
    assert q.codes_same >= 0.9999
    assert q.wq_err[0] <= 1.005 * q.wq_err[1]  # WQ_RATIO 1.02


def _codes(p, fn):
    return p.replace(w_codes=np.clip(fn(np.asarray(p.w_codes).astype(np.int64)), -qmax(p.config.weight_bits) - 1, qmax(p.config.weight_bits)).astype(np.int8))


def _few_flipped(p, rng):
    """Five codes moved by one step (the smallest change a code can take), inside the code range."""
    q = np.asarray(p.w_codes).astype(np.int64).copy()
    top = qmax(p.config.weight_bits)
    for i, j in zip(rng.integers(0, q.shape[0], 5), rng.integers(0, q.shape[1], 5)):
        q[i, j] += 1 if q[i, j] < top else -1
    return p.replace(w_codes=q.astype(np.int8))


def _scales(p, fn):
    return p.replace(w_scale=fn(np.asarray(p.w_scale).copy()))


def _row_scale_x2(s):
    s[5] *= 2
    return s


def _swap_rows(p):
    idx = np.arange(p.out_features)
    idx[[3, 70]] = idx[[70, 3]]
    return p.replace(w_codes=np.asarray(p.w_codes)[idx], w_scale=np.asarray(p.w_scale)[idx])


DAMAGES = {
    "codes all zero": lambda p, rng: _codes(p, np.zeros_like),
    "codes random bytes": lambda p, rng: p.replace(w_codes=rng.integers(-128, 128, np.shape(p.w_codes)).astype(np.int8)
                                                   if p.config.weight_bits == 8 else rng.integers(-8, 8, np.shape(p.w_codes)).astype(np.int8)),
    "a few codes flipped": _few_flipped,
    "one row's scale x2": lambda p, rng: _scales(p, _row_scale_x2),
    "all scales x1.5": lambda p, rng: _scales(p, lambda s: s * 1.5),
    "two rows swapped": lambda p, rng: _swap_rows(p),
    "a row negated": lambda p, rng: _codes(p, lambda q: np.concatenate([q[:9], -q[9:10], q[10:]])),
}


@pytest.mark.parametrize("config", ["spec", "w8a8", "w4a16", "w4a8-fitted-groups"])  # SPEC, rtn, gptq, gptq fitting scales
def test_each_damage_fails_on_the_verdict_with_valid_checksums(tmp_path, config):
    cfg = CONFIGS[config]
    pack, want = _packs(config)  # intact: PASS (test_intact_pack_passes_...)
    for k, (damage, fn) in enumerate(DAMAGES.items()):
        bad = _roundtrip(tmp_path, fn(pack, np.random.default_rng(k)), f"d{k}")
        e = explain_pack(bad, WEIGHT, stats=_stats(cfg), want=want)
        assert e.transform_ok and not e.quantized.ok and not e.ok, (config, damage, e.quantized)


def test_a_few_flipped_codes_are_caught_by_the_rounding_bound_not_by_the_share(tmp_path):
    """Five codes in 32768 moved by one step: the share of codes equal to round(z) stays above 99.9%,
    but each moved code sits about 1 away from the value it is rounded from."""
    pack, want = _packs("w8a8")
    e = explain_pack(_few_flipped(pack, np.random.default_rng(0)), WEIGHT, want=want)
    assert e.quantized.codes_same >= 0.999 and e.quantized.round_err > 0.6 and not e.ok


def test_gptq_codes_against_the_free_running_reference_differ_but_the_forced_rounding_agrees():
    """Float32 and float64 GPTQ drift apart once one code differs (error feedback): the free-running
    reference's codes are only mostly identical, the pack's rounding, given its own codes, is exact."""
    cfg = DuQuantConfig(weight_method="gptq")  # the svd family: non-separated blocks rotate differently
    e = explain_pack(pack_weight(WEIGHT, cfg, STATS), WEIGHT, stats=STATS)
    assert e.spec.codes_identical < 1.0 and e.spec.codes_identical >= 0.98
    assert e.quantized.codes_same >= 0.9999 and e.quantized.round_err - 0.5 <= 0.01 and e.ok


def test_configs_that_need_statistics_without_them_name_the_layer():
    with pytest.raises(ValueError, match="needs activation statistics"):
        explain_pack(_packs("w4a16")[0], WEIGHT)


NAMES = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]


def test_cli_pack_preset_then_verify_passes_and_a_damaged_pack_fails(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "model.safetensors", NAMES, shape=(OUT, IN))  # WEIGHT's shape: the compiled packs are reused
    out = tmp_path / "packs"
    assert main(["pack", str(ckpt), "--out", str(out), "--preset", "w8a8"]) == 0
    assert main(["verify", str(out), "--checkpoint", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "2/2 layers within SPEC's bounds" in text and "FAIL" not in text
    f = layer_file(out, NAMES[1])
    pack = load_packs(f)[NAMES[1]]
    save_packs(f, {NAMES[1]: pack.replace(w_codes=np.zeros(np.shape(pack.w_codes), np.int8))})
    assert main(["verify", str(out), "--checkpoint", str(ckpt)]) == 1
    text = capsys.readouterr().out
    assert "2/2 layer files intact" in text and "1/2 layers within SPEC's bounds" in text
    assert [line.split()[0] for line in text.splitlines() if line.endswith("FAIL")] == [NAMES[1]]


def test_cli_verify_of_a_gptq_preset_takes_the_statistics_pack_took(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "model.safetensors", NAMES, shape=(OUT, IN))  # WEIGHT's shape: the compiled packs are reused
    stats_file = save_stats(tmp_path / "stats.safetensors", {n.removesuffix(".weight"): _layer(seed=i)[1] for i, n in enumerate(NAMES)})
    out = tmp_path / "packs"
    assert main(["pack", str(ckpt), "--out", str(out), "--preset", "w4a16", "--stats", str(stats_file)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: layer model.layers.0.mlp.up_proj.weight: ") and err.count("\n") == 1, err
    assert "needs the activation statistics it was packed with" in err and "duquant verify --stats PATH" in err
    assert main(["verify", str(out), "--checkpoint", str(ckpt), "--stats", str(stats_file)]) == 0
    assert "2/2 layers within SPEC's bounds" in capsys.readouterr().out
    other = save_stats(tmp_path / "other.safetensors", {n.removesuffix(".weight"): _layer(seed=5 + i)[1] for i, n in enumerate(NAMES)})
    assert main(["verify", str(out), "--checkpoint", str(ckpt), "--stats", str(other), "--layers", "1"]) == 1  # GPTQ's codes follow XᵀX
