"""Pack files: round trips, int4 nibbles, corruption, truncation, atomic writes."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from duquant_jax import DuQuantConfig, calibrate, pack_weight
from duquant_jax.io import PackFileError, load_packs, read_metadata, save_packs
from duquant_jax.quantize import pack_int4, unpack_int4


def _packs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 37)).astype(np.float32)
    calibrated = calibrate(pack_weight(w), [rng.standard_normal((8, 37)).astype(np.float32)])
    return {
        "model.layers.0.q_proj": calibrated,
        "model.layers.0.w8": pack_weight(w, DuQuantConfig(weight_bits=8, row_rot_mode="none")),
        "float": pack_weight(w[:, :20], DuQuantConfig(weight_bits=16, act_bits=16, block_out_size=8)),
    }


def test_int4_nibbles_follow_spec_and_round_trip():
    codes = np.array([[-8, 7, -1, 0, 3]], np.int8)
    packed = pack_int4(codes)
    # column 0 in the low nibble: -8 -> 0x8, 7 -> 0x7: byte 0x78; -1 -> 0xF, 0 -> 0: 0x0F; 3, pad 0: 0x03
    np.testing.assert_array_equal(packed, [[0x78, 0x0F, 0x03]])
    np.testing.assert_array_equal(unpack_int4(packed, 5), codes)
    rnd = np.random.default_rng(1).integers(-8, 8, size=(13, 29)).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(rnd), 29), rnd)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([[9]], np.int8))


def test_pack_file_round_trip_is_exact(tmp_path):
    packs = _packs()
    path = save_packs(tmp_path / "packs.safetensors", packs)
    back = load_packs(path)
    assert list(back) == list(packs)
    for name, p in packs.items():
        q = back[name]
        assert q.config == p.config
        for field in ("perm", "r_in", "r_out", "w_scale", "w_codes", "a_scale"):
            a, b = getattr(p, field), getattr(q, field)
            assert (a is None) == (b is None), field
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta = read_metadata(path)
    assert meta["model.layers.0.q_proj"]["codes"] == "w_codes_int4"
    assert meta["model.layers.0.w8"]["codes"] == "w_codes"


def test_4bit_codes_take_half_a_byte_on_disk(tmp_path):
    w = np.random.default_rng(2).standard_normal((256, 512)).astype(np.float32)
    p4 = save_packs(tmp_path / "a.safetensors", {"l": pack_weight(w, DuQuantConfig(weight_bits=4))})
    p8 = save_packs(tmp_path / "b.safetensors", {"l": pack_weight(w, DuQuantConfig(weight_bits=8))})
    from safetensors import safe_open

    with safe_open(str(p4), framework="numpy") as f:
        codes = f.get_tensor("l.w_codes_int4")
    assert codes.shape == (256, 256) and codes.dtype == np.uint8
    # the files differ by the codes' halved size, up to the small JSON header
    assert abs((os.path.getsize(p8) - os.path.getsize(p4)) - 256 * 256) < 256


def test_truncated_and_corrupted_files_name_the_file(tmp_path):
    path = save_packs(tmp_path / "packs.safetensors", _packs())
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackFileError, match="trunc.safetensors"):
        load_packs(trunc)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(PackFileError, match="garbage.safetensors"):
        load_packs(garbage)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_packs(tmp_path / "missing.safetensors")


def test_mismatched_layer_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    path = save_packs(tmp_path / "packs.safetensors", _packs())
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["model.layers.0.w8.r_in"] = tensors["model.layers.0.w8.r_in"][:1]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(PackFileError, match=r"bad.safetensors, layer 'model.layers.0.w8'.*r_in has shape"):
        load_packs(bad)
    assert "model.layers.0.q_proj" in load_packs(bad, ["model.layers.0.q_proj"])
    with pytest.raises(KeyError, match="nope"):
        load_packs(path, ["nope"])


def test_failed_write_leaves_nothing_at_path(tmp_path, monkeypatch):
    import safetensors.numpy

    target = tmp_path / "packs.safetensors"
    save_packs(target, _packs())
    before = target.read_bytes()

    def boom(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_packs(target, _packs())
    assert target.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["packs.safetensors"]  # no temporary left


def test_packs_stay_jax_arrays():
    assert isinstance(_packs()["float"].w_codes, jax.Array)
