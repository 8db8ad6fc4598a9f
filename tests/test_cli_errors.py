"""`duquant` speaks to people: every expected failure is one line `error: ...`, exit status 2, no traceback."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_checkpoint
from safetensors.numpy import save_file

from duquant_jax.checkpoint import layer_file, pack_checkpoint
from duquant_jax.cli import main

NAMES = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors", NAMES)


def _fails(capsys, argv: list[str], *expected: str) -> str:
    """Runs `duquant argv`, which must fail with exit 2 and one line naming each `expected` text."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    return err


def test_bad_arguments_name_the_flag(capsys, ckpt, tmp_path):
    _fails(capsys, ["pack", str(ckpt), "--out", str(tmp_path / "o"), "--weight-bits", "9"], "--weight-bits", "got 9")
    _fails(capsys, ["pack", str(ckpt), "--out", str(tmp_path / "o"), "--block-size", "0"], "--block-size", "got 0")
    _fails(capsys, ["pack", str(ckpt), "--out", str(tmp_path / "o"), "--bogus"], "unrecognized arguments: --bogus", "--help")
    _fails(capsys, ["pack", str(ckpt)], "--out", "--help")
    _fails(capsys, ["verify", str(tmp_path), "--checkpoint", str(ckpt), "--layers", "x"], "--layers", "invalid int value")
    _fails(capsys, ["verify", str(tmp_path), "--checkpoint", str(ckpt), "--layers", "0"], "--layers must be >= 1")
    _fails(capsys, ["demo", "--blocks", "0"], "--blocks must be >= 1")
    _fails(capsys, ["frobnicate"], "invalid choice: 'frobnicate'")


def test_missing_and_malformed_inputs_name_the_file(capsys, ckpt, tmp_path):
    out = str(tmp_path / "o")
    _fails(capsys, ["pack", str(tmp_path / "nope.safetensors"), "--out", out], "nope.safetensors does not exist")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    _fails(capsys, ["pack", str(garbage), "--out", out], "garbage.safetensors is not a readable safetensors file")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "model.safetensors.index.json").write_text('{"weight_map": ')
    _fails(capsys, ["pack", str(shards), "--out", out], "model.safetensors.index.json has no readable weight_map")
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "missing.safetensors"}}))
    _fails(capsys, ["pack", str(shards), "--out", out], "missing.safetensors of tensor a.weight does not exist")
    _fails(capsys, ["pack", str(ckpt), "--out", out, "--include", "nothing"], "--include 'nothing' matches no tensor")
    _fails(capsys, ["verify", str(tmp_path / "empty"), "--checkpoint", str(ckpt)], "has no index.json", "run `duquant pack`")
    (tmp_path / "bad_index").mkdir()
    (tmp_path / "bad_index" / "index.json").write_text("{not json")
    _fails(capsys, ["verify", str(tmp_path / "bad_index"), "--checkpoint", str(ckpt)], "index.json is damaged", "run `duquant pack` again")


def test_a_layer_that_does_not_match_the_checkpoint_is_named(capsys, ckpt, tmp_path):
    out = tmp_path / "packs"
    pack_checkpoint(ckpt, out, progress=False)
    other = tmp_path / "other.safetensors"
    save_file({n: np.ones((32, 40), np.float32) for n in NAMES}, str(other))
    _fails(capsys, ["verify", str(out), "--checkpoint", str(other)], f"layer {NAMES[0]}: the pack is 32x48", "the checkpoint that was packed?")
    save_file({"something.else": np.ones((2, 2), np.float32)}, str(other))
    _fails(capsys, ["verify", str(out), "--checkpoint", str(other)], f"layer {NAMES[0]}", "is not in checkpoint", "the checkpoint that was packed?")


def test_a_damaged_layer_file_fails_verify_by_name(capsys, ckpt, tmp_path):
    out = tmp_path / "packs"
    pack_checkpoint(ckpt, out, progress=False)
    f = layer_file(out, NAMES[1])
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # a byte of the last tensor's data
    f.write_bytes(data)
    assert main(["verify", str(out), "--checkpoint", str(ckpt), "--layers", "3"]) == 1
    text = capsys.readouterr().out
    assert f"DAMAGED {NAMES[1]}: " in text and "does not match its checksum" in text
    assert "2/3 layer files intact" in text and "2/2 layers within SPEC's bounds" in text


def test_a_full_disk_or_an_interruption_says_how_to_resume(capsys, ckpt, tmp_path, monkeypatch):
    import duquant_jax.checkpoint as checkpoint

    real = checkpoint.save_packs
    calls = []

    def full_disk(path, packs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, packs)

    monkeypatch.setattr(checkpoint, "save_packs", full_disk)
    out = str(tmp_path / "o")
    _fails(capsys, ["pack", str(ckpt), "--out", out], f"could not write layer {NAMES[1]}", "No space left on device", "run the same command again to resume")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "pack_weight", interrupt)
    _fails(capsys, ["pack", str(ckpt), "--out", out], "interrupted", "run the same command again to resume")


def test_debug_shows_the_traceback(capsys, tmp_path):
    assert main(["pack", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("error: ")


def test_the_installed_command_prints_one_line_in_a_fresh_process(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "duquant_jax.cli", "pack", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'nope'} does not exist: give a .safetensors file or a directory of shards"]
