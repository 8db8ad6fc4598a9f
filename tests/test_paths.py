"""Untrusted names and paths: the three attacks of issue 11 refused, nothing read or written outside."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from duquant_jax.checkpoint import Checkpoint, iter_pack_dir, layer_file, pack_checkpoint, pack_dir_layers
from duquant_jax.cli import main
from duquant_jax.io import save_packs
from duquant_jax.pack import pack_weight
from duquant_jax.paths import MAX_STEM, UnsafePathError, contained, safe_file_name


def _snapshot(root: Path) -> dict[str, int]:
    """Every file under `root` with its size (to show that nothing appeared or changed)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _weights(names, seed=0, shape=(32, 48)):
    rng = np.random.default_rng(seed)
    return {n: (0.02 * rng.standard_normal(shape)).astype(np.float32) for n in names}


# --- file names from tensor names ---------------------------------------------------------------

TRICKY = [
    "model.layers.0.self_attn.q_proj.weight",
    "../../x.weight",
    "a/../../b.weight",
    "/etc/passwd",
    "C:\\windows\\x.weight",
    "..",
    ".",
    ".hidden.weight",
    "nul",
    "CON.weight",
    "com1.weight",
    "a/b.weight",
    "a%2Fb.weight",
    "a%2fb.weight",
    "A/b.weight",
    "a/B.weight",
    "Q.weight",
    "q.weight",
    "x\x00y",
    "ünïcode.weight",
    "a" * 300,
    "a" * 299 + "b",
    "a" * 300 + "/" + "b",
]


def test_file_names_are_one_safe_readable_component_and_never_collide():
    names = [safe_file_name(n, ".safetensors") for n in TRICKY]
    assert names[0] == "model.layers.0.self_attn.q_proj.weight.safetensors"  # ordinary names stay readable
    for raw, name in zip(TRICKY, names):
        assert "/" not in name and "\\" not in name and "\x00" not in name, raw
        assert name not in ("", ".", "..") and not name.startswith("."), raw
        assert not os.path.isabs(name), raw
        assert name.split(".")[0].lower() not in {"con", "prn", "aux", "nul", "com1", "lpt1"}, raw
        assert len(name.encode()) <= MAX_STEM + len(".safetensors") < 255, raw
    # collision-free, even where the filesystem ignores case (macOS, Windows)
    assert len({n.casefold() for n in names}) == len(TRICKY)


def test_random_names_never_collide_after_encoding():
    rng = np.random.default_rng(0)
    alphabet = list("aAbB./\\%_-~ 0é")
    names = {"".join(rng.choice(alphabet, size=rng.integers(1, 12))) for _ in range(5000)}
    assert len({safe_file_name(n).casefold() for n in names}) == len(names)


def test_empty_and_non_string_names_are_refused():
    for bad in ("", None, 3):
        with pytest.raises(UnsafePathError, match="cannot name a file"):
            safe_file_name(bad)


# --- paths read from an index -------------------------------------------------------------------


def test_contained_refuses_absolute_dotdot_and_symlinks_out(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_text("x")
    (tmp_path / "outside").write_text("secret")
    (root / "link_out").symlink_to(tmp_path / "outside")
    (root / "link_in").symlink_to(root / "sub" / "f")
    ok = dict(what="layer 'l'", source="index.json")
    assert contained(root, "sub/f", **ok) == (root / "sub" / "f").resolve()
    assert contained(root, "sub/../sub/f", **ok) == (root / "sub" / "f").resolve()  # `..` that stays inside
    assert contained(root, "link_in", **ok) == (root / "sub" / "f").resolve()
    for entry, why in [
        (str(tmp_path / "outside"), "absolute"),
        ("/etc/passwd", "absolute"),
        ("../outside", "outside"),
        ("sub/../../outside", "outside"),  # `..` in the middle
        ("link_out", "outside"),  # a symlink out
        ("", "non-empty"),
        (None, "non-empty"),
        ("a\x00b", "NUL"),
        (".", "directory itself"),
    ]:
        with pytest.raises(UnsafePathError, match=rf"index.json: layer 'l' names file .*{why}"):
            contained(root, entry, **ok)


# --- attack 1: a tensor named ../../x.weight -----------------------------------------------------


def test_attack_tensor_name_with_dotdot_writes_nothing_outside_out(tmp_path):
    names = ["../../x.weight", "model.layers.0.q_proj.weight", "/abs/y.weight", "a/../../../z.weight"]
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(_weights(names), str(ckpt))
    out = tmp_path / "a" / "b" / "out"
    before = _snapshot(tmp_path)
    summary = pack_checkpoint(ckpt, out, progress=False)
    after = _snapshot(tmp_path)
    new = sorted(set(after) - set(before))
    assert all(p.startswith("a/b/out/") for p in new), new  # nothing outside OUT
    assert sorted(p for p in new if p.startswith("a/b/out/layers/")) == sorted(
        f"a/b/out/layers/{safe_file_name(n, '.safetensors')}" for n in names
    )
    assert summary.packed == 4
    loaded = dict(iter_pack_dir(out))  # and each layer reads back under its own name
    assert sorted(loaded) == sorted(names)
    for n, w in _weights(names).items():
        np.testing.assert_array_equal(np.asarray(loaded[n].w_codes), np.asarray(pack_weight(w).w_codes))


def test_names_that_differ_only_in_case_or_escapes_get_their_own_files(tmp_path):
    names = ["m.Q.weight", "m.q.weight", "m/x.weight", "m%2Fx.weight"]
    ckpt = tmp_path / "ckpt.safetensors"
    weights = _weights(names, seed=3)
    save_file(weights, str(ckpt))
    pack_checkpoint(ckpt, tmp_path / "out", progress=False)
    files = {layer_file(tmp_path / "out", n).name.casefold() for n in names}
    assert len(files) == 4
    for n, p in iter_pack_dir(tmp_path / "out"):
        np.testing.assert_array_equal(np.asarray(p.w_codes), np.asarray(pack_weight(weights[n]).w_codes))


def test_an_empty_tensor_name_is_refused_by_name(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(_weights(["", "ok.weight"]), str(ckpt))
    with pytest.raises(UnsafePathError, match="tensor name '' cannot name a file"):
        pack_checkpoint(ckpt, tmp_path / "out", include=r"^$|ok", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


# --- attack 2: a shard named ../outside.safetensors in the checkpoint index -------------------------


def _sharded(tmp_path: Path, shard_of: dict[str, str]) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(_weights(["l.weight"]), str(d / "model-00001.safetensors"))
    save_file(_weights(["l.weight"], seed=9), str(tmp_path / "outside.safetensors"))  # readable, if it were reached
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard_of}))
    return d


@pytest.mark.parametrize(
    "shard, why",
    [
        ("../outside.safetensors", "outside"),
        ("sub/../../outside.safetensors", "outside"),
        ("ABSOLUTE", "absolute path"),
        ("", "non-empty"),
        (["model-00001.safetensors"], "non-empty"),
    ],
)
def test_attack_checkpoint_index_naming_a_shard_outside_is_refused(tmp_path, shard, why):
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "outside.safetensors")
    d = _sharded(tmp_path, {"l.weight": shard})
    with pytest.raises(UnsafePathError, match=rf"model.safetensors.index.json: tensor 'l.weight' names file .*{why}"):
        Checkpoint(d)


def test_attack_checkpoint_shard_symlinked_outside_is_refused(tmp_path):
    d = _sharded(tmp_path, {"l.weight": "model-00002.safetensors"})
    (d / "model-00002.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(UnsafePathError, match="model-00002.safetensors.*outside"):
        Checkpoint(d)
    (d / "model.safetensors.index.json").unlink()  # without an index, every *.safetensors is a shard: same rule
    with pytest.raises(UnsafePathError, match="model-00002.safetensors.*outside"):
        Checkpoint(d)


def test_a_hugging_face_cache_snapshot_may_point_into_its_blobs(tmp_path):
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file(_weights(["l.weight"]), str(repo / "blobs" / "f00d"))
    (snap / "model.safetensors").symlink_to(repo / "blobs" / "f00d")
    assert list(Checkpoint(snap).files) == ["l.weight"]


def test_attack_through_the_command_line_is_one_clear_error(tmp_path, capsys):
    d = _sharded(tmp_path, {"l.weight": "../outside.safetensors"})
    before = _snapshot(tmp_path)
    assert main(["pack", str(d), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "tensor 'l.weight' names file '../outside.safetensors'" in err
    assert _snapshot(tmp_path) == before  # nothing written


# --- attack 3: a pack directory whose index names a layer file outside -----------------------------


def _pack_dir(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(_weights(["l.weight"]), str(ckpt))
    out = tmp_path / "packs"
    pack_checkpoint(ckpt, out, progress=False)
    (tmp_path / "elsewhere").mkdir()
    w = _weights(["l.weight"], seed=5)["l.weight"]
    save_packs(tmp_path / "elsewhere" / "l.safetensors", {"l.weight": pack_weight(w)})  # a valid pack, if it were reached
    return out


@pytest.mark.parametrize("entry", ["../elsewhere/l.safetensors", "layers/../../elsewhere/l.safetensors", "ABSOLUTE", "SYMLINK"])
def test_attack_pack_index_naming_a_file_outside_is_refused_by_every_loader(tmp_path, entry, capsys):
    out = _pack_dir(tmp_path)
    if entry == "ABSOLUTE":
        entry = str(tmp_path / "elsewhere" / "l.safetensors")
    if entry == "SYMLINK":
        (out / "layers" / "link.safetensors").symlink_to(tmp_path / "elsewhere" / "l.safetensors")
        entry = "layers/link.safetensors"
    index = json.loads((out / "index.json").read_text())
    index["layers"]["l.weight"]["file"] = entry
    (out / "index.json").write_text(json.dumps(index))
    assert pack_dir_layers(out) == ["l.weight"]
    with pytest.raises(UnsafePathError, match=r"index.json: layer 'l.weight' names file .*(outside|absolute)"):
        list(iter_pack_dir(out))
    assert main(["verify", str(out), "--checkpoint", str(tmp_path / "ckpt.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "layer 'l.weight' names file" in err
    torch = pytest.importorskip("torch")
    from interop import from_pack_dir

    model = torch.nn.Module()
    model.l = torch.nn.Linear(48, 32)
    with pytest.raises(UnsafePathError, match="layer 'l.weight' names file"):
        from_pack_dir(model, out, progress=False)
