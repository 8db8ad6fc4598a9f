"""Pack file format 2: every optional Pack field round-trips, shapes are validated, format 1 still reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from duquant_jax import DuQuantConfig, Pack, pack_weight
from duquant_jax.io import FORMAT_VERSION, PackFileError, load_packs, read_metadata, save_packs
from duquant_jax.packed import ARRAY_FIELDS


def _rotations(rng, n: int, b: int) -> np.ndarray:
    return np.stack([np.linalg.qr(rng.standard_normal((b, b)))[0] for _ in range(n)]).astype(np.float32)


def hand_built_packs() -> dict[str, Pack]:
    """Packs with every optional field set, shared (1, B, B) and per-block stacks, groups, a (1,) a_scale."""
    rng = np.random.default_rng(0)
    out, n_in = 40, 37
    shared = DuQuantConfig(rotation="duquant", block_size=8, weight_group_size=8, act_scheme="static-tensor", smooth_alpha=0.5)
    every = Pack(
        perm=rng.permutation(n_in).astype(np.int32),
        r_in=_rotations(rng, 1, 8),
        r_out=_rotations(rng, 1, 8),
        w_scale=rng.uniform(0.1, 1, (out, 5)).astype(np.float32),
        w_codes=rng.integers(-8, 8, (out, n_in)).astype(np.int8),
        a_scale=np.array([0.25], np.float32),
        config=shared,
        in_diag=rng.uniform(0.5, 2, n_in).astype(np.float32),
        r_pre=_rotations(rng, 1, 8),
        out_diag=rng.choice([-1.0, 1.0], out).astype(np.float32),
    )
    # Hadamard's block is the largest power of two <= block_size dividing `in`: 8 for in = 24, not 16.
    hadamard = DuQuantConfig(rotation="hadamard", block_size=16, weight_bits=8, act_scheme="dynamic-token")
    per_block = Pack(
        perm=np.arange(24, dtype=np.int32),
        r_in=_rotations(rng, 3, 8),
        r_out=_rotations(rng, 2, 8),
        w_scale=rng.uniform(0.1, 1, 16).astype(np.float32),
        w_codes=rng.integers(-128, 128, (16, 24)).astype(np.int8),
        a_scale=None,
        config=hadamard,
        in_diag=rng.choice([-1.0, 1.0], 24).astype(np.float32),
        out_diag=rng.choice([-1.0, 1.0], 16).astype(np.float32),
    )
    none = Pack(
        perm=np.arange(12, dtype=np.int32),
        r_in=None,
        r_out=None,
        w_scale=np.ones(6, np.float32),
        w_codes=rng.standard_normal((6, 12)).astype(np.float32),
        a_scale=np.ones(12, np.float32),
        config=DuQuantConfig(rotation="none", weight_bits=16),
    )
    return {"every.optional.field": every, "hadamard.per_block": per_block, "no.rotation": none}


def test_hand_built_pack_with_every_optional_field_round_trips(tmp_path):
    packs = hand_built_packs()
    path = save_packs(tmp_path / "p.safetensors", packs)
    back = load_packs(path)
    assert list(back) == list(packs)
    for name, p in packs.items():
        q = back[name]
        assert q.config == p.config
        for field in ARRAY_FIELDS:
            a, b = getattr(p, field), getattr(q, field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=f"{name}.{field}")
    meta = read_metadata(path)
    assert meta["every.optional.field"]["fields"] == sorted(
        ["perm", "r_in", "r_out", "w_scale", "w_codes_int4", "a_scale", "in_diag", "r_pre", "out_diag"]
    )


def _rewrite(path, out, edit_tensors=None, edit_meta=None):
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize(
    "layer, key, bad",
    [
        ("every.optional.field", "w_scale", np.ones((40, 4), np.float32)),  # groups of 8 over 37 channels: 5
        ("every.optional.field", "a_scale", np.ones(37, np.float32)),  # static-tensor: (1,)
        ("every.optional.field", "r_pre", np.ones((2, 8, 8), np.float32)),  # neither shared nor one per block
        ("hadamard.per_block", "r_in", np.ones((3, 8, 4), np.float32)),  # not square
        ("hadamard.per_block", "in_diag", np.ones(23, np.float32)),
        ("hadamard.per_block", "out_diag", np.ones(17, np.float32)),
    ],
)
def test_optional_fields_of_the_wrong_shape_are_named(tmp_path, layer, key, bad):
    path = save_packs(tmp_path / "p.safetensors", hand_built_packs())

    def edit(t):
        t[f"{layer}.{key}"] = bad

    bad_file = _rewrite(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(PackFileError, match=rf"bad.safetensors, layer '{layer}': {layer}.{key} has shape"):
        load_packs(bad_file, [layer], verify=False)


def test_spec_rotations_keep_their_exact_block_shape(tmp_path):
    """For rotation "svd" a shared (1, B, B) r_in is not SPEC's layout: refused as before."""
    w = np.random.default_rng(1).standard_normal((32, 48)).astype(np.float32)
    path = save_packs(tmp_path / "p.safetensors", {"l": pack_weight(w)})

    def edit(t):
        t["l.r_in"] = t["l.r_in"][:1]

    with pytest.raises(PackFileError, match=r"l.r_in has shape \(1, 16, 16\)"):
        load_packs(_rewrite(path, tmp_path / "bad.safetensors", edit), verify=False)


def test_a_tensor_dropped_from_the_file_is_missing_not_silently_absent(tmp_path):
    path = save_packs(tmp_path / "p.safetensors", hand_built_packs())

    def edit(t):
        del t["every.optional.field.in_diag"]

    with pytest.raises(PackFileError, match=r"tensor every.optional.field.in_diag is missing"):
        load_packs(_rewrite(path, tmp_path / "bad.safetensors", edit), verify=False)


def test_format_1_files_still_load(tmp_path):
    w = np.random.default_rng(2).standard_normal((24, 40)).astype(np.float32)
    pack = pack_weight(w)
    path = save_packs(tmp_path / "v2.safetensors", {"l": pack})

    def to_v1(meta):
        layers = json.loads(meta["layers"])
        for info in layers.values():
            del info["fields"]
            for k in ("rotation", "seed", "smooth_alpha", "weight_group_size", "act_scheme"):
                info["config"].pop(k)  # version-1 configs had SPEC's fields only
        meta["layers"] = json.dumps(layers)
        meta["format_version"] = "1"
        del meta["checksums"]

    v1 = _rewrite(path, tmp_path / "v1.safetensors", edit_meta=to_v1)
    assert FORMAT_VERSION == "2"
    back = load_packs(v1)["l"]
    assert back.config == pack.config
    for field in ("perm", "r_in", "r_out", "w_scale", "w_codes"):
        np.testing.assert_array_equal(np.asarray(getattr(back, field)), np.asarray(getattr(pack, field)))
