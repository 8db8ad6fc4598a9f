"""Checksums: recorded for every tensor, verified on load, single bit flips caught, an explicit opt-out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from duquant_jax import DuQuantConfig, calibrate, pack_weight
from duquant_jax import integrity
from duquant_jax.io import PackFileError, load_packs, save_packs
from fuzz_cases import join_header, split_header

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 37)).astype(np.float32)
    return {
        "model.layers.0.q_proj": calibrate(pack_weight(w), [rng.standard_normal((8, 37)).astype(np.float32)]),
        "model.layers.0.w8": pack_weight(w, DuQuantConfig(weight_bits=8, row_rot_mode="none")),
    }


def _tensor_spans(path: Path) -> dict[str, tuple[int, int]]:
    header, start = integrity.read_header(path)
    return {k: (start + v["data_offsets"][0], start + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}


def test_every_tensor_has_a_checksum_that_matches_its_bytes(tmp_path, packs):
    path = save_packs(tmp_path / "p.safetensors", packs)
    with safe_open(str(path), framework="numpy") as f:
        sums = json.loads(f.metadata()["checksums"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert sums["algorithm"] == "crc32" and set(sums["tensors"]) == set(tensors) and set(sums["metadata"]) == {"layers"}
    for k, a in tensors.items():
        assert sums["tensors"][k] == integrity.array_digest(a)
    # the framework-free file check agrees with the array one
    assert integrity.verify_file(path) == len(tensors)


def test_a_single_bit_flip_in_any_tensor_is_named_by_file_layer_and_tensor(tmp_path, packs):
    path = save_packs(tmp_path / "p.safetensors", packs)
    data = path.read_bytes()
    for key, (begin, end) in _tensor_spans(path).items():
        for pos, bit in ((begin, 0), ((begin + end) // 2, 3), (end - 1, 7)):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            damaged = tmp_path / "damaged.safetensors"
            damaged.write_bytes(bad)
            layer = key.rsplit(".", 1)[0]
            with pytest.raises(PackFileError, match=rf"damaged.safetensors, layer '{layer}'.*tensor {key} does not match its checksum"):
                load_packs(damaged)
            with pytest.raises(integrity.ChecksumError, match=rf"tensor {key} does not match"):
                integrity.verify_file(damaged)


def test_verify_false_skips_the_check_explicitly(tmp_path, packs):
    path = save_packs(tmp_path / "p.safetensors", packs)
    begin, _ = _tensor_spans(path)["model.layers.0.q_proj.w_scale"]
    bad = bytearray(path.read_bytes())
    bad[begin + 1] ^= 0x40  # an exponent bit of the first row's scale
    path.write_bytes(bad)
    with pytest.raises(PackFileError, match="w_scale does not match its checksum"):
        load_packs(path)
    loaded = load_packs(path, verify=False)["model.layers.0.q_proj"]  # opted out: loads, with a different scale
    assert not np.array_equal(np.asarray(loaded.w_scale), np.asarray(packs["model.layers.0.q_proj"].w_scale))


def _rewrite_header(path: Path, out: Path, edit) -> Path:
    header, body = split_header(path.read_bytes())
    edit(header)
    out.write_bytes(join_header(header, body))
    return out


def test_a_same_size_dtype_change_in_the_header_is_caught(tmp_path, packs):
    """int8 codes relabelled uint8 have the same bytes: only the checksum's dtype prefix (and the dtype check) sees it."""
    path = save_packs(tmp_path / "p.safetensors", packs)

    def edit(h):
        h["model.layers.0.w8.w_codes"]["dtype"] = "U8"

    bad = _rewrite_header(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(integrity.ChecksumError, match="model.layers.0.w8.w_codes does not match"):
        integrity.verify_file(bad)
    with pytest.raises(PackFileError, match="w_codes has dtype uint8"):
        load_packs(bad)


def test_a_changed_config_in_the_metadata_is_caught(tmp_path, packs):
    path = save_packs(tmp_path / "p.safetensors", packs)

    def edit(h):
        h["__metadata__"]["layers"] = h["__metadata__"]["layers"].replace('"act_percentile": 99.9', '"act_percentile": 99.8')

    bad = _rewrite_header(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(PackFileError, match="metadata 'layers' does not match its checksum"):
        load_packs(bad)


@pytest.mark.parametrize("module", ["integrity", "paths", "lock"])
def test_the_pure_python_modules_import_neither_jax_nor_torch_nor_numpy(module):
    """Loaded from its file alone (not through the package), so the check does not depend on `duquant_jax/__init__`."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location({module!r}, {str(ROOT / 'duquant_jax' / (module + '.py'))!r})\n"
        f"m = importlib.util.module_from_spec(spec); sys.modules[{module!r}] = m; spec.loader.exec_module(m)\n"
        "bad = [k for k in ('jax', 'torch', 'numpy') if k in sys.modules]\n"
        "assert not bad, bad\n"
        "print(m.digest(b'abc', 'U8', [3]) if hasattr(m, 'digest') else 'ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (integrity.digest(b"abc", "U8", [3]) if module == "integrity" else "ok")


def test_digests_of_the_torch_side_match(tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.randn(5, 7).to(torch.bfloat16)
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    d = integrity.digest(t.contiguous().reshape(-1).view(torch.uint8).numpy(), integrity.dtype_code(t.dtype), t.shape)
    save_file({"t": t}, str(path), metadata={"checksums": integrity.checksum_metadata({"t": d})})
    assert integrity.verify_file(path) == 1
