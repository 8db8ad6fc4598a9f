"""Concurrent and repeated `duquant pack` runs: one writer per directory, no mixed configs, failures leave it consistent."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import Stop, stop_after, write_checkpoint

from duquant_jax import DuQuantConfig
from duquant_jax.checkpoint import INDEX, iter_pack_dir, layer_file, pack_checkpoint
from duquant_jax.io import PackFileError, load_packs, save_packs
from duquant_jax.lock import LOCK_NAME, BusyError, exclusive
from duquant_jax.pack import pack_weight

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)]


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors", NAMES)


def _holder(out: Path) -> subprocess.Popen:
    """Another process that takes the lock of `out` (importing only the pure-Python lock module) and sleeps."""
    code = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('lock', {str(ROOT / 'duquant_jax' / 'lock.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['lock'] = m; spec.loader.exec_module(m)\n"
        f"with m.exclusive({str(out)!r}):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def _assert_consistent(out: Path, config: DuQuantConfig) -> None:
    """The index lists exactly the selected layers, each intact and of the index's config."""
    index = json.loads((out / INDEX).read_text())
    assert list(index["layers"]) == NAMES and index["config"] == config.to_dict()
    assert [p.config for _, p in iter_pack_dir(out)] == [config] * len(NAMES)
    assert not list(out.rglob("*.tmp")) and not (out / LOCK_NAME).exists()


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(ckpt, tmp_path):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        with pytest.raises(BusyError, match=rf"{out} is being written by another duquant pack \(pid {holder.pid} on "):
            pack_checkpoint(ckpt, out, progress=False)
        assert not (out / "layers").exists()  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_message(ckpt, tmp_path):
    out = tmp_path / "out"
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in (out / LOCK_NAME).read_text()  # the dead owner's lock file is still there
    notes = []
    summary = pack_checkpoint(ckpt, out, progress=False, echo=notes.append)
    assert summary.packed == 4
    assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "no longer running" in notes[0] and "taking it over" in notes[0]
    _assert_consistent(out, DuQuantConfig())


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with exclusive(tmp_path / "d"):
        with pytest.raises(BusyError, match=f"pid {os.getpid()}"):
            with exclusive(tmp_path / "d"):
                pass
    with exclusive(tmp_path / "d"):  # released: free again
        pass


def test_two_pack_processes_on_one_directory_never_both_write(ckpt, tmp_path):
    """Both outcomes are right: the second refuses (exit 2, naming the first), or it ran after the first finished."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "duquant_jax.cli", "pack", str(ckpt), "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for rc, err in results:
        if rc == 2:
            assert "is being written by another duquant pack (pid" in err and err.count("error:") == 1
    _assert_consistent(out, DuQuantConfig())


def test_a_resumed_run_with_another_config_never_leaves_a_mixed_directory(ckpt, tmp_path):
    out = tmp_path / "out"
    pack_checkpoint(ckpt, out, progress=False)  # a complete run: index of config A
    _assert_consistent(out, DuQuantConfig())

    w8 = DuQuantConfig(weight_bits=8)
    notes = []
    with pytest.raises(Stop):
        pack_checkpoint(ckpt, out, w8, progress=False, on_layer=stop_after(2), echo=notes.append)
    # two layers of config B, two of A are on disk: no index may claim them as one pack
    assert not (out / INDEX).exists()
    assert [load_packs(layer_file(out, n))[n].config.weight_bits for n in NAMES] == [8, 8, 4, 4]
    assert len(notes) == 2 and all("packed with another config" in n for n in notes)
    summary = pack_checkpoint(ckpt, out, w8, progress=False, echo=notes.append)
    assert (summary.skipped, summary.packed) == (2, 2)
    _assert_consistent(out, w8)


def test_an_index_that_disagrees_with_a_layer_file_is_refused_on_load(ckpt, tmp_path):
    out = tmp_path / "out"
    pack_checkpoint(ckpt, out, progress=False)
    w = np.random.default_rng(1).standard_normal((32, 48)).astype(np.float32)
    save_packs(layer_file(out, NAMES[2]), {NAMES[2]: pack_weight(w, DuQuantConfig(weight_bits=8))})  # as a stray writer would
    with pytest.raises(PackFileError, match=rf"holds layer '{NAMES[2]}' packed with another config .* mixes two runs"):
        list(iter_pack_dir(out))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_a_write_failure_mid_run_keeps_finished_layers_readable_and_no_index(ckpt, tmp_path, monkeypatch, err):
    import safetensors.numpy

    out = tmp_path / "out"
    real = safetensors.numpy.save_file
    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # half a file, then the disk is full (or the directory read-only)
            Path(filename).write_bytes(b"partial")
            raise OSError(err, os.strerror(err))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    with pytest.raises(OSError, match=rf"could not write layer {NAMES[2]}"):
        pack_checkpoint(ckpt, out, progress=False)
    assert not (out / INDEX).exists() and not list(out.rglob("*.tmp")) and not (out / LOCK_NAME).exists()
    for n in NAMES[:2]:  # every finished layer is intact
        assert load_packs(layer_file(out, n))[n].config == DuQuantConfig()
    assert not layer_file(out, NAMES[2]).exists()
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    summary = pack_checkpoint(ckpt, out, progress=False)
    assert (summary.skipped, summary.packed) == (2, 2)
    _assert_consistent(out, DuQuantConfig())


def test_a_failure_writing_the_index_leaves_no_index(ckpt, tmp_path, monkeypatch):
    import duquant_jax.checkpoint as checkpoint

    def no_index(path, write):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "atomic_write", no_index)
    with pytest.raises(OSError, match="could not write .*index.json"):
        pack_checkpoint(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / INDEX).exists()
    assert all(load_packs(layer_file(tmp_path / "out", n)) for n in NAMES)


def test_a_damaged_layer_file_is_repacked_on_resume(ckpt, tmp_path):
    out = tmp_path / "out"
    pack_checkpoint(ckpt, out, progress=False)
    f = layer_file(out, NAMES[1])
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(data)
    notes = []
    summary = pack_checkpoint(ckpt, out, progress=False, echo=notes.append)
    assert (summary.skipped, summary.packed) == (3, 1)
    assert len(notes) == 1 and NAMES[1] in notes[0] and "damaged" in notes[0]
    _assert_consistent(out, DuQuantConfig())


def test_stale_temporaries_of_a_killed_run_are_removed(ckpt, tmp_path):
    out = tmp_path / "out"
    (out / "layers").mkdir(parents=True)
    stale = out / "layers" / ".x.safetensors.abc.tmp"
    stale.write_bytes(b"half")
    pack_checkpoint(ckpt, out, progress=False)
    assert not stale.exists()
    _assert_consistent(out, DuQuantConfig())


def test_a_filesystem_without_locks_goes_on_with_a_note(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    notes = []
    with exclusive(tmp_path / "d", echo=notes.append):
        pass
    assert len(notes) == 1 and "cannot lock" in notes[0] and "No locks available" in notes[0]
    assert not (tmp_path / "d" / LOCK_NAME).exists()
