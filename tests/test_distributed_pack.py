"""`duquant pack` as two local `jax.distributed` processes (coordinator on 127.0.0.1) writes exactly the
index and layer files of a single-process run."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from duquant_jax.distributed import check_coordinator
from helpers import write_checkpoint

LAYERS = [f"model.layers.{i}.mlp.{p}.weight" for i in range(3) for p in ("up_proj", "down_proj")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pack(ckpt, out, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "duquant_jax.cli", "pack", str(ckpt), "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def _content(path) -> object:
    """A file's content: JSON parsed; a safetensors file as (parsed header, data bytes), since safetensors
    writes its header's keys in a per-process hash order (two single-process runs differ in those bytes too)."""
    raw = path.read_bytes()
    if path.suffix == ".json":
        return json.loads(raw)
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _files(directory) -> dict[str, object]:
    return {str(p.relative_to(directory)): _content(p) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("config", [[], ["--preset", "w8a8"]], ids=["spec", "w8a8"])
def test_two_processes_write_the_same_files_as_one(tmp_path, config):
    ckpt = write_checkpoint(tmp_path / "ckpt.safetensors", LAYERS, shape=(64, 128))
    single = _pack(ckpt, tmp_path / "one", *config)
    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out
    port = _free_port()
    procs = [
        _pack(ckpt, tmp_path / "two", *config, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(k))
        for k in range(2)
    ]
    for k, p in enumerate(procs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"process {k}:\n{out[-3000:]}"
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert set(one) == set(two) and len(one) == len(LAYERS) + 1  # every layer file and index.json
    different = [name for name in one if one[name] != two[name]]
    assert not different, different


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:0", "host:70000", ":1234", "a b:12"])
def test_bad_coordinator_addresses_are_named_errors(address):
    with pytest.raises(ValueError, match="coordinator address must be HOST:PORT"):
        check_coordinator(address)


def test_distributed_flags_go_together(tmp_path):
    from duquant_jax.cli import main

    ckpt = write_checkpoint(tmp_path / "ckpt.safetensors", LAYERS[:1])
    assert main(["pack", str(ckpt), "--out", str(tmp_path / "o"), "--coordinator", "127.0.0.1:1234"]) == 2
