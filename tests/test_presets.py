"""Presets (`DuQuantConfig.preset`, `duquant pack --preset`) and packing a checkpoint with statistics
(`duquant pack --stats`)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from duquant_jax import DuQuantConfig
from duquant_jax.checkpoint import iter_pack_dir, pack_checkpoint
from duquant_jax.cli import main
from duquant_jax.config import PRESETS
from duquant_jax.pack import pack_weight
from duquant_jax.stats import LayerStats, save_stats

UP, DOWN = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"


@pytest.fixture()
def ckpt_and_stats(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"{UP}.weight": rng.standard_normal((64, 128)).astype(np.float32), f"{DOWN}.weight": rng.standard_normal((128, 64)).astype(np.float32)}
    save_file(tensors, tmp_path / "ckpt.safetensors")
    stats = {}
    for layer, n in ((UP, 128), (DOWN, 64)):
        x = rng.standard_normal((256, n)).astype(np.float32)
        stats[layer] = LayerStats(np.abs(x).max(axis=0), (x.T @ x).astype(np.float32), 256)
    save_stats(tmp_path / "stats.safetensors", stats)
    return tmp_path / "ckpt.safetensors", tmp_path / "stats.safetensors", tensors, stats


def test_every_preset_is_a_valid_config_with_its_bits():
    for name in ("w8a8", "w4a8", "w4a16", "w4a4"):
        cfg = DuQuantConfig.preset(name)
        assert (f"w{cfg.weight_bits}a{cfg.act_bits}") == name
    assert DuQuantConfig.preset("w4a8", weight_group_size=None).weight_group_size is None
    assert set(PRESETS) == {"w8a8", "w4a8", "w4a16", "w4a4"}
    with pytest.raises(ValueError, match="unknown preset 'w3a8'"):
        DuQuantConfig.preset("w3a8")


def test_default_config_is_still_spec_not_a_preset():
    assert DuQuantConfig() == DuQuantConfig(rotation="svd", act_scheme="static-channel", weight_method="rtn", block_size=16)


def test_pack_with_stats_equals_pack_weight_with_the_layers_stats(ckpt_and_stats, tmp_path):
    ckpt, _, tensors, stats = ckpt_and_stats
    cfg = DuQuantConfig.preset("w4a8", weight_group_size=32)
    pack_checkpoint(ckpt, tmp_path / "packs", cfg, stats=stats, progress=False)
    for name, pack in iter_pack_dir(tmp_path / "packs"):
        want = pack_weight(tensors[name], cfg, stats[name.removesuffix(".weight")])
        np.testing.assert_array_equal(np.asarray(pack.w_codes), np.asarray(want.w_codes))


def test_pack_refuses_missing_statistics_before_writing_anything(ckpt_and_stats, tmp_path):
    ckpt, _, _, stats = ckpt_and_stats
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*statistics have none"):
        pack_checkpoint(ckpt, tmp_path / "packs", DuQuantConfig.preset("w4a8"), stats={DOWN: stats[DOWN]}, progress=False)
    assert not (tmp_path / "packs" / "layers").exists() or not list((tmp_path / "packs" / "layers").iterdir())


def test_cli_preset_and_stats(ckpt_and_stats, tmp_path, capsys):
    ckpt, stats_path, tensors, stats = ckpt_and_stats
    out = tmp_path / "packs"
    assert DuQuantConfig.preset("w4a8").weight_group_size != 16  # the flag below overrides the preset's value
    assert main(["pack", str(ckpt), "--out", str(out), "--preset", "w4a8", "--group-size", "16", "--stats", str(stats_path)]) == 0
    packs = dict(iter_pack_dir(out))
    assert all(p.config == DuQuantConfig.preset("w4a8", weight_group_size=16) for p in packs.values())
    assert main(["pack", str(ckpt), "--out", str(tmp_path / "p2"), "--preset", "w4a8"]) == 2
    assert "needs activation statistics" in capsys.readouterr().err
    assert main(["pack", str(ckpt), "--out", str(tmp_path / "p3"), "--rotation", "hadamard", "--block-size", "12"]) == 2
    assert "power of two" in capsys.readouterr().err
