"""Seeded corruptions of saved quantized models (`interop.save_quantized`), loaded in isolated children.

Shared by tests/test_fuzz_saved_models.py (a CI subset, asserted) and
bench/fuzz_counts.py (many more cases, counted). One base model (`Net`: four
256-wide linears, one per configuration, W8A8 / W4A8 / W4A16 presets and SPEC's
default, a LayerNorm tied to another) is saved twice, unsharded and in >= 3
shards. Each case copies one save, mutates it (the record JSON, a safetensors
header, its data bytes, its tensors with the checksums recomputed, or the shard
index), then a child process builds a fresh `Net`, runs `load_quantized` and a
forward on fixed inputs under every kernel path each layer can take, and the
outputs are compared bit for bit with those of the unmutated save.

Isolation: one long-lived worker (`python tests/fuzz_saved_models.py --worker`)
imports torch once and never runs a torch op; per case it `os.fork()`s a child
that does the load and the forwards and reports through a pipe. A child killed
by a signal is that case's crash (its faulthandler traceback is kept); a child
that does not answer within HANG_S seconds is killed and is that case's hang.

Outcomes: "named error" (the load or forward raised, naming a file, layer,
tensor or field), "loaded exactly right" (bit-identical outputs), and the
failures "crash", "hang", "silent wrong" (ran, outputs differ) and "unnamed
error" (an exception naming nothing of the save, e.g. torch's own IndexError).

    python tests/fuzz_saved_models.py --cases 40 --seed 0      # run and print failures
    python tests/fuzz_saved_models.py --case 0:17              # rebuild one case's directory and run it
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

HANG_S = 60.0
OUTCOMES = ("named error", "loaded exactly right", "undetectable edit", "wrong after reseal", "crash", "hang", "silent wrong", "unnamed error")
# "undetectable edit": the "values" kind ran with other outputs, as it must; "wrong after reseal": a record edit
# whose digest in the shards was recomputed ran with other outputs (only what the tensors show can be
# cross-checked then: reported, not a failure)
FAILURES = ("crash", "hang", "silent wrong", "unnamed error")
KINDS = ("record", "header", "data", "tensors", "index")  # a failure here is a finding
# the kinds in turn, the record (nine mutators) three times in each turn; "values": in-range edits with
# checksums recomputed, undetectable by design (bench/fuzz_counts.py only)
CYCLE = ("record", "header", "record", "data", "record", "tensors", "index")
ALL_CYCLE = (*CYCLE, "values")
LAYERS = {"proj_in": "w8a8", "mlp.up": "w4a8", "mlp.down": "w4a16", "head": "spec"}
WIDTH = 256
SHARD_BYTES = 120_000
CONFIG_FILE = "duquant_quantized.json"
INDEX_FILE = "model.safetensors.index.json"
ALL_PATHS = ["fake-quant", "int-mm", "dequant-bf16", "int8pack", "int4pack", "c-int8"]  # interop.kernels.PATHS (checked by the CI test)


# --- the base model ---------------------------------------------------------------------------------


def _net_class():
    """`Net`, defined lazily so that importing this module imports no torch (the CI subset's parent imports it)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        """Four linears (bias on two), a LayerNorm whose weight is tied to a second one (an alias)."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj_in = nn.Linear(WIDTH, WIDTH)
            self.norm = nn.LayerNorm(WIDTH)
            self.mlp = nn.Module()
            self.mlp.up = nn.Linear(WIDTH, WIDTH, bias=False)
            self.mlp.down = nn.Linear(WIDTH, WIDTH)
            self.norm2 = nn.LayerNorm(WIDTH)
            self.norm2.weight = self.norm.weight
            self.head = nn.Linear(WIDTH, 128, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.proj_in(x))
            h = h + self.mlp.down(torch.relu(self.mlp.up(h)))
            return self.head(self.norm2(h))

    return Net


def build_net():
    """The float base model, the same weights every call (seeded)."""
    return _net_class()()


def _batches(n: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 16, WIDTH, generator=gen) for _ in range(n)]


def inputs():
    """The fixed forward inputs: 4 x 16 tokens and one token."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    return {"4x16": torch.randn(4, 16, WIDTH, generator=gen), "1x1": torch.randn(1, 1, WIDTH, generator=gen)}


def quantized_net():
    """`Net` with one DuQuantLinear per configuration of LAYERS, GPTQ/smoothing statistics observed
    and SPEC's static activation scales calibrated, on seeded random batches. Needs JAX."""
    import torch

    from duquant_jax import DuQuantConfig
    from interop import calibrate, name_filter, observe, quantize_

    model = build_net()
    with torch.no_grad(), observe(model, None, xtx=True) as stats:
        for b in _batches(4, 1):
            model(b)
    for name, preset in LAYERS.items():
        config = DuQuantConfig() if preset == "spec" else DuQuantConfig.preset(preset)
        quantize_(model, config, name_filter(include=rf"^{name}$"), progress=False, stats=stats)
    with torch.no_grad(), calibrate(model):
        for b in _batches(2, 2):
            model(b)
    return model


def save_bases(root: Path) -> dict[str, Path]:
    """Saves the quantized base model under `root`: {"single": one file, "sharded": >= 3 shards}."""
    from interop import save_quantized

    model = quantized_net()
    bases = {"single": save_quantized(model, root / "single"), "sharded": save_quantized(model, root / "sharded", max_shard_bytes=SHARD_BYTES)}
    n = len(json.loads((bases["sharded"] / CONFIG_FILE).read_text())["files"])
    assert n >= 3, f"the sharded base has {n} shards; lower SHARD_BYTES"
    return bases


# --- safetensors bytes ------------------------------------------------------------------------------


def split_file(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's (JSON header, data bytes)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_file(header: dict, body: bytes, *, declared: int | None = None, pad: int | None = None) -> bytes:
    """The inverse of `split_file`; `pad` spaces after the JSON (default: to a multiple of 8), `declared` overrides the length."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw) % 8) if pad is None else pad)
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + body


def reseal(header: dict, body: bytes) -> dict:
    """`header` with its checksum table recomputed from the (possibly edited) entries and bytes."""
    from duquant_jax.integrity import checksum_metadata, running_digest

    sums = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        begin, end = e["data_offsets"]
        sums[key] = f"{zlib.crc32(body[begin:end], running_digest(e['dtype'], e['shape'])) & 0xFFFFFFFF:08x}"
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != "checksums"}
    header = dict(header)
    header["__metadata__"] = {**meta, "checksums": checksum_metadata(sums, meta)}
    return header


def _entries(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _shard_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


# --- mutations ----------------------------------------------------------------------------------------
# Each takes (directory, rng) and returns a description; it edits the directory in place.

Rng = np.random.Generator


def _pick(rng: Rng, seq):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def _read_record(d: Path) -> dict:
    return json.loads((d / CONFIG_FILE).read_text())


def _write_record(d: Path, record: Any) -> None:
    (d / CONFIG_FILE).write_text(json.dumps(record, indent=1))


CHOICES = {
    "row_rot_mode": ("restore", "propagate", "none"),
    "rotation_method": ("qr-svd", "svd", "eigh"),
    "rotation": ("svd", "hadamard", "duquant", "none"),
    "act_scheme": ("static-channel", "dynamic-token", "static-tensor"),
    "weight_method": ("rtn", "gptq"),
    "scale_method": ("mse", "mse-fine", "minmax"),
    "dtype": ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "Tensor", "float", "complex64", "float32 "),
    "format": ("duquant-quantized-model", "duquant-quantized-model2", "duquant-pack", ""),
}
INT_VALUES = (0, -1, 1, 2, 4, 8, 16, 128, 255, 2**31, 2**63, 10**30)
VALID_CONFIG = {  # values DuQuantConfig accepts, to get past validation and reach the tensors
    "weight_bits": (2, 3, 4, 5, 8, 0, 16),
    "act_bits": (0, 4, 8, 16),
    "block_size": (8, 16, 32, 64, 128, 256),
    "block_out_size": (None, 8, 16, 128),
    "weight_group_size": (None, 32, 64, 128, 256),
    "act_scheme": CHOICES["act_scheme"],
    "row_rot_mode": CHOICES["row_rot_mode"],
    "rotation": CHOICES["rotation"],
    "enable_permute": (True, False),
    "act_clip": (0.5, 0.9, 1.0),
    "smooth_alpha": (None, 0.5),
    "weight_method": CHOICES["weight_method"],
    "gptq_damp": (0.0, 0.5),
    "act_percentile": (50.0, 99.9, 100.0),
}


def _leaves(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, value) of every leaf and list of a JSON value (lists count as leaves: their shape is mutated)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list) and obj and not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in obj):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _other_value(key: Any, value: Any, rng: Rng) -> Any:
    """A value of the same JSON type as `value`, different from it where possible."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return _pick(rng, [v for v in (*INT_VALUES, value + 1, value - 1, 2 * value) if v != value])
    if isinstance(value, float):
        return _pick(rng, [v for v in (0.0, -1.0, 0.5, 1e308, value * 2, value + 1e-7) if v != value])
    if isinstance(value, str):
        pool = CHOICES.get(key, (value + "x", value.upper(), "", "../" + value, value[:-1]))
        return _pick(rng, [v for v in pool if v != value] or ["x"])
    if isinstance(value, list):
        ops = [
            lambda v: v + [1], lambda v: v[:-1], lambda v: v[::-1], lambda v: [0] * len(v),
            lambda v: [x * 2 if isinstance(x, int) else x for x in v], lambda v: [],
        ]
        out = _pick(rng, ops)(list(value))
        return out if out != value else value + [1]
    if value is None:
        return _pick(rng, [0, 16, "x", False])
    return None


def m_record_value(d: Path, rng: Rng) -> str:
    """A leaf of the record changed to another value of the same type."""
    record = _read_record(d)
    path, value = _pick(rng, [(p, v) for p, v in _leaves(record) if p[0] != "torch_version"])
    new = _other_value(path[-1], value, rng)
    _set(record, path, new)
    _write_record(d, record)
    return f"{'.'.join(map(str, path))}: {value!r} -> {new!r}"


def m_record_config(d: Path, rng: Rng) -> str:
    """A layer's config field changed to another value DuQuantConfig accepts (passes from_dict's checks)."""
    record = _read_record(d)
    layer = _pick(rng, record["layers"])
    field = _pick(rng, VALID_CONFIG)
    config = record["layers"][layer]["config"]
    old = config[field]
    config[field] = _pick(rng, [v for v in VALID_CONFIG[field] if v != old])
    _write_record(d, record)
    return f"layer {layer} config {field}: {old!r} -> {config[field]!r}"


def m_record_keys(d: Path, rng: Rng) -> str:
    """A key removed from, or added to, a dict of the record."""
    record = _read_record(d)
    dicts = [((), record)]
    for name, info in record["layers"].items():
        dicts += [(("layers", name), info), (("layers", name, "config"), info["config"]), (("layers", name, "shapes"), info["shapes"])]
    where, target = _pick(rng, dicts)
    if target and rng.integers(2):
        key = _pick(rng, target)
        del target[key]
        what = f"removed {'.'.join((*where, key))}"
    else:
        key, value = _pick(rng, [("bogus", 1), ("r_pre", [2, 128, 128]), ("w2", [256, 256]), ("in_diag", [256]), ("extra", None)])
        target[key] = value
        what = f"added {'.'.join((*where, key))}={value!r}"
    _write_record(d, record)
    return what


def m_record_layers(d: Path, rng: Rng) -> str:
    """Layer entries swapped, renamed, duplicated or removed."""
    record = _read_record(d)
    layers = record["layers"]
    names = list(layers)
    kind = int(rng.integers(6))
    if kind == 0:
        a, b = rng.choice(len(names), 2, replace=False)
        a, b = names[a], names[b]
        layers[a], layers[b] = layers[b], layers[a]
        what = f"records of {a} and {b} swapped"
    elif kind == 1:
        a = _pick(rng, names)
        new = _pick(rng, ["mlp", "norm", "norm2", "nonexistent", "", "mlp.up.qweight", "proj_in.bias", "..", "mlp.down " ])
        layers[new] = layers.pop(a)
        what = f"layer {a} renamed {new!r}"
    elif kind == 2:
        a = _pick(rng, names)
        del layers[a]
        what = f"layer {a} removed"
    elif kind == 3:
        a, b = _pick(rng, names), _pick(rng, names)
        if a == b:
            b = names[(names.index(a) + 1) % len(names)]
        layers[b] = copy.deepcopy(layers[a])
        what = f"layer {b} given the record of {a}"
    elif kind == 4:  # a JSON object with the same layer twice: the last wins in Python's parser
        a = _pick(rng, names)
        entry = json.dumps({a: layers[names[(names.index(a) + 1) % len(names)]]}, indent=1)[1:-1]
        text = json.dumps(record, indent=1)
        end = text.rindex("}", 0, text.index('"aliases"'))  # the end of "layers": the duplicate goes last, so it wins
        text = text[:end] + "," + entry + text[end:]
        (d / CONFIG_FILE).write_text(text)
        return f"layer {a} listed twice, the second time with the record of the next layer"
    else:
        layers.clear()
        what = "no layers"
    _write_record(d, record)
    return what


def m_record_aliases(d: Path, rng: Rng) -> str:
    """The tied-tensor aliases altered."""
    record = _read_record(d)
    aliases = record["aliases"]
    kind = int(rng.integers(6))
    if kind == 0:
        aliases.clear()
        what = "aliases removed"
    elif kind == 1:
        aliases["norm2.weight"] = _pick(rng, ["norm.bias", "proj_in.bias", "mlp.down.bias", "norm2.bias", "head.a_scale"])
        what = f"alias norm2.weight -> {aliases['norm2.weight']}"
    elif kind == 2:
        aliases["norm2.weight"] = _pick(rng, ["nope", "", "norm.weight.x", 3, None])
        what = f"alias norm2.weight -> {aliases['norm2.weight']!r}"
    elif kind == 3:
        key = _pick(rng, ["norm.bias", "proj_in.bias", "mlp.up.qweight.codes", "head.a_scale", "mlp.down.perm"])
        aliases[key] = "norm.weight"
        what = f"added alias {key} -> norm.weight"
    elif kind == 4:
        key = _pick(rng, ["nothing.weight", "mlp.nothing", "", "norm2.weight.x", "norm2"])
        aliases[key] = "norm.weight"
        what = f"added alias {key!r} (no such attribute) -> norm.weight"
    else:
        record["aliases"] = {"norm.weight": "norm2.weight"}
        what = "alias reversed: norm.weight -> norm2.weight"
    _write_record(d, record)
    return what


def m_record_files(d: Path, rng: Rng) -> str:
    """The record's list of files altered."""
    record = _read_record(d)
    files = record["files"]
    kind = int(rng.integers(8))
    if kind == 0:
        files.pop(int(rng.integers(len(files))))
        what = "a file left out"
    elif kind == 1:
        files.append(_pick(rng, files))
        what = f"{files[-1]} listed twice"
    elif kind == 2:
        files.reverse()
        what = "files in reverse order"
    elif kind == 3:
        bad = _pick(rng, ["../x", "../single/model.safetensors", "/etc/passwd", "/dev/zero", "sub/../../x.safetensors", ".", ""])
        files.insert(int(rng.integers(len(files) + 1)), bad)
        what = f"file {bad!r} added"
    elif kind == 4:
        other = _pick(rng, [CONFIG_FILE, INDEX_FILE, "model-99999-of-00001.safetensors"])
        files.append(other)
        what = f"file {other} added"
    elif kind == 5:
        path = str((d / files[0]).resolve())
        files[0] = path
        what = "first file given as an absolute path inside the directory"
    elif kind == 6:
        (d / "link.safetensors").symlink_to(_pick(rng, ["/etc/passwd", "../elsewhere.safetensors", files[0]]))
        files[0] = "link.safetensors"
        what = f"first file a symlink to {os.readlink(d / 'link.safetensors')}"
    else:
        record["files"] = []
        what = "no files"
    _write_record(d, record)
    return what


def m_record_text(d: Path, rng: Rng) -> str:
    """The record's bytes: a bit flip, truncation, or a non-object / deeply nested JSON."""
    data = (d / CONFIG_FILE).read_bytes()
    kind = int(rng.integers(4))
    if kind == 0:
        pos, bit = int(rng.integers(len(data))), int(rng.integers(8))
        out = bytearray(data)
        out[pos] ^= 1 << bit
        (d / CONFIG_FILE).write_bytes(bytes(out))
        return f"bit {bit} of byte {pos} flipped ({data[pos:pos + 1]!r})"
    if kind == 1:
        n = int(rng.integers(len(data)))
        (d / CONFIG_FILE).write_bytes(data[:n])
        return f"truncated to {n} of {len(data)} bytes"
    if kind == 2:
        text = _pick(rng, ["[]", "null", '"x"', "[" * 100000 + "]" * 100000, '{"format": "duquant-quantized-model", "format_version": 1, "layers": [], "aliases": {}, "files": []}'])
        (d / CONFIG_FILE).write_text(text)
        return f"record replaced by {text[:40]!r}"
    (d / CONFIG_FILE).write_bytes(data.replace(b"{", b"{\xff", 1))
    return "invalid UTF-8"


RECORD_MUTATIONS = (m_record_value, m_record_value, m_record_config, m_record_config, m_record_keys, m_record_layers, m_record_aliases, m_record_files, m_record_text)


def _pick_file(d: Path, rng: Rng) -> Path:
    return _pick(rng, _shard_files(d))


def m_header(d: Path, rng: Rng) -> str:
    """A safetensors header edited (dtype, shape, offsets, entries, metadata, length prefix, padding);
    a third of the edits also recompute the checksums, as a consistent rewrite would."""
    path = _pick_file(d, rng)
    header, body = split_file(path.read_bytes())
    keys = _entries(header)
    key = _pick(rng, keys)
    e = header[key]
    kind = int(rng.integers(12))
    declared = pad = None
    if kind == 0:
        swap = {"F32": "I32", "I32": "F32", "I8": "U8", "U8": "I8", "I64": "F64", "F64": "I64", "BOOL": "U8", "F16": "BF16", "BF16": "F16"}
        e["dtype"] = swap.get(e["dtype"], "F32")
        what = f"dtype of {key} -> {e['dtype']} (same size)"
    elif kind == 1:
        e["dtype"] = _pick(rng, ["F16", "F64", "BF16", "BOOL", "I16", "I64", "XX", "f32"])
        what = f"dtype of {key} -> {e['dtype']}"
    elif kind == 2:
        s = e["shape"]
        e["shape"] = s[::-1] if len(s) > 1 and s[0] != s[-1] else ([1] + s if s else [1])
        what = f"shape of {key} {s} -> {e['shape']} (same count)"
    elif kind == 3:
        e["shape"] = _pick(rng, [[2**40], [0], [], [-1], e["shape"] + [2], [x // 2 for x in e["shape"]]])
        what = f"shape of {key} -> {e['shape']}"
    elif kind == 4:
        b, end = e["data_offsets"]
        shift = int(_pick(rng, [1, -1, 2, 4, 8, -8, 64]))
        e["data_offsets"] = [b + shift, end + shift]
        what = f"data_offsets of {key} shifted by {shift}"
    elif kind == 5:
        other = _pick(rng, keys)
        e["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], e["data_offsets"]
        what = f"data_offsets of {key} and {other} swapped"
    elif kind == 6:
        e["data_offsets"] = _pick(rng, [[0, 2**62], [e["data_offsets"][1], e["data_offsets"][0]], [-1, 3], [0, 0], "x"])
        what = f"data_offsets of {key} -> {e['data_offsets']}"
    elif kind == 7:
        del header[key]
        what = f"entry {key} removed"
    elif kind == 8:
        new = _pick(rng, ["extra.weight", "proj_in.qweight.extra", "norm2.weight", "mlp.up.r_pre"])
        header[new] = dict(e)
        what = f"entry {new} added (a copy of {key}'s entry)"
    elif kind == 9:
        meta = header["__metadata__"]
        mk = _pick(rng, ["format", "checksums"])
        if rng.integers(2):
            del meta[mk]
            what = f"metadata {mk} removed"
        else:
            meta[mk] = _pick(rng, ["", "{", "[]", "duquant-pack", '{"algorithm": "crc32", "tensors": {}}', "[" * 100000 + "]" * 100000])
            what = f"metadata {mk} -> {meta[mk][:40]!r}"
    elif kind == 10:
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        declared = int(_pick(rng, [0, 1, n - 1, n + 1, n + 8, n - 8, 2**31, 2**63, 2**64 - 1]))
        what = f"length prefix {n} -> {declared}"
    else:
        pad = int(rng.integers(0, 16))
        what = f"header padded with {pad} spaces (data starts at {8 + len(json.dumps(header, separators=(',', ':'))) + pad} mod 8 = {(8 + len(json.dumps(header, separators=(',', ':'))) + pad) % 8})"
    # swapped offsets under new checksums would be an in-range value swap (the "values" kind): never resealed
    resealed = kind not in (5, 9, 10, 11) and rng.random() < 1 / 3
    if resealed:
        try:
            header = reseal(header, body)
            what += " (checksums resealed)"
        except (ValueError, TypeError, KeyError, OverflowError):
            pass
    path.write_bytes(join_file(header, body, declared=declared, pad=pad))
    return f"{path.name}: {what}"


def m_data(d: Path, rng: Rng) -> str:
    """A safetensors file's bytes: a bit flip or a byte run in the data, a bit flip in the header, truncation, appended bytes."""
    path = _pick_file(d, rng)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    start = 8 + n
    kind = int(rng.integers(6))
    if kind in (0, 1):
        pos, bit = int(rng.integers(start, len(data))), int(rng.integers(8))
        data[pos] ^= 1 << bit
        what = f"bit {bit} of data byte {pos - start}"
    elif kind == 2:
        pos, k = int(rng.integers(start, len(data))), int(rng.integers(2, 64))
        run = bytes(rng.integers(0, 256, k, dtype=np.uint8)) if rng.integers(2) else b"\x00" * k
        data[pos : pos + k] = run[: len(data) - pos]
        what = f"{k} bytes at data byte {pos - start} overwritten"
    elif kind == 3:
        pos, bit = int(rng.integers(0, start)), int(rng.integers(8))
        data[pos] ^= 1 << bit
        what = f"bit {bit} of header byte {pos} ({bytes(data[pos:pos + 1])!r})"
    elif kind == 4:
        k, total = int(rng.integers(0, len(data))), len(data)
        del data[k:]
        what = f"truncated to {k} of {total} bytes"
    else:
        k = int(_pick(rng, [1, 3, 8, 4096]))
        data += bytes(rng.integers(0, 256, k, dtype=np.uint8))
        what = f"{k} bytes appended"
    path.write_bytes(bytes(data))
    return f"{path.name}: {what}"


def _load_file(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _save_file(path: Path, tensors: dict, meta: dict) -> None:
    """Writes `tensors` with a correct checksum table: the edit is consistent, only the integrity of meaning can catch it."""
    import torch
    from safetensors.torch import save_file

    from duquant_jax.integrity import checksum_metadata, digest, dtype_code

    meta = {k: v for k, v in meta.items() if k != "checksums"}
    sums = {k: digest(t.contiguous().reshape(-1).view(torch.uint8).numpy(), dtype_code(t.dtype), t.shape) for k, t in tensors.items()}
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata={**meta, "checksums": checksum_metadata(sums, meta)})


def _bump(t):
    """A copy of `t` with one element changed to another in-range value (an int code +1 wraps in its type)."""
    new = t.clone()
    flat = new.reshape(-1)
    flat[0] = flat[0] * 2 + 1 if t.dtype.is_floating_point else flat[0] ^ 1
    return new


def _duplicate_in_other_file(d: Path, rng: Rng, path: Path, key: str, t) -> str:
    """`key` also in another shard with one element changed; an unsharded save gets a second listed file."""
    files = _shard_files(d)
    if len(files) > 1:
        other = _pick(rng, [f for f in files if f != path])
        others, other_meta = _load_file(other)
        others[key] = _bump(t)
        _save_file(other, others, other_meta)
        return f"{key} of {path.name} also in {other.name}, changed (checksums recomputed)"
    other = d / "model-extra.safetensors"
    _save_file(other, {key: _bump(t)}, _load_file(path)[1])  # the same metadata as the real shard
    record = _read_record(d)
    record["files"].append(other.name)
    _write_record(d, record)
    return f"{key} also in a second listed file {other.name}, changed (checksums recomputed)"


CONSTRAINED = (".qweight.scales", ".a_scale", ".in_diag", ".out_diag", ".r_in", ".r_out", ".r_pre")  # finite by construction


def m_tensors(d: Path, rng: Rng) -> str:
    """A consistent rewrite that breaks the record's promises, checksums recomputed: a tensor's dtype or
    shape changed, a tensor dropped or added, a NaN/inf in a layer's scales or rotations, a perm that is no permutation, a key in two
    files, another format."""
    import torch

    path = _pick_file(d, rng)
    tensors, meta = _load_file(path)
    key = _pick(rng, tensors)
    t = tensors[key]
    kind = int(rng.integers(8))
    if kind == 0:
        to = _pick(rng, [x for x in (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int32, torch.float32) if x != t.dtype])
        tensors[key] = t.to(to)
        what = f"{key} {t.dtype} -> {to}"
    elif kind == 1:
        n = t.numel()
        shape = _pick(rng, [(n,), (1, n), tuple(reversed(t.shape)), (*t.shape[:-1], max(1, t.shape[-1] // 2)) if t.dim() else (2,), (*t.shape, 1)])
        tensors[key] = t.reshape(-1)[: math.prod(shape)].reshape(shape) if math.prod(shape) <= n else torch.zeros(shape, dtype=t.dtype)
        what = f"{key} {tuple(t.shape)} -> {tuple(shape)}"
    elif kind == 2:
        del tensors[key]
        what = f"{key} removed"
    elif kind == 3:
        # only names no file holds: replacing a tensor that exists would be the "values" kind
        held = {k for f in _shard_files(d) for k in _load_file(f)[0]}
        new = _pick(rng, [k for k in ("extra.weight", "mlp.up.qweight.extra", "head.w2", "proj_in.r_pre", "norm2.weight", "mlp.up.in_diag", "head.in_diag") if k not in held])
        tensors[new] = t.clone()
        what = f"{new} added (a copy of {key})"
    elif kind == 4 and any(k.endswith(CONSTRAINED) for k in tensors):
        key = _pick(rng, [k for k in tensors if k.endswith(CONSTRAINED)])
        new = tensors[key].clone()
        new.reshape(-1)[int(rng.integers(new.numel()))] = _pick(rng, [float("nan"), float("inf"), -float("inf")])
        tensors[key] = new
        what = f"{key}: one element {new.reshape(-1)[~torch.isfinite(new.reshape(-1))][0].item()}"
    elif kind == 5:
        perms = [k for k in tensors if k.endswith(".perm")]
        if perms:
            key = _pick(rng, perms)
            new = tensors[key].clone()
            i = int(rng.integers(1, new.numel()))
            new[i] = _pick(rng, [new[0].item(), -1, new.numel(), 2**40])
            tensors[key] = new
            what = f"{key}[{i}] -> {new[i].item()} (no permutation)"
        else:
            meta["format"] = "duquant-pack"
            what = "metadata format -> 'duquant-pack'"
    elif kind in (4, 6):
        meta["format"] = _pick(rng, ["duquant-pack", "", "other"])
        what = f"metadata format -> {meta['format']!r}"
    else:
        return _duplicate_in_other_file(d, rng, path, key, t)
    _save_file(path, tensors, meta)
    return f"{path.name}: {what} (checksums recomputed)"


def m_values(d: Path, rng: Rng) -> str:
    """An in-range edit no integrity check can see, checksums recomputed: one element changed, or two
    tensors of one shape and dtype swapped. Expected to load and give other outputs (counted apart)."""
    path = _pick_file(d, rng)
    tensors, meta = _load_file(path)
    key = _pick(rng, tensors)
    t = tensors[key]
    same = [k for k, v in tensors.items() if k != key and v.shape == t.shape and v.dtype == t.dtype and not k.endswith(".perm")]
    if same and rng.integers(2):
        other = _pick(rng, same)
        tensors[key], tensors[other] = tensors[other], t
        what = f"{key} and {other} swapped"
    else:
        tensors[key] = _bump(t)
        what = f"{key}[0] changed"
    _save_file(path, tensors, meta)
    return f"{path.name}: {what} (checksums recomputed)"


def m_index(d: Path, rng: Rng) -> str:
    """The shard index of a sharded save: weight_map entries moved, missing, added, outside, or the index gone."""
    path = d / INDEX_FILE
    index = json.loads(path.read_text())
    wm = index["weight_map"]
    key = _pick(rng, wm)
    shards = sorted(set(wm.values()))
    kind = int(rng.integers(8))
    if kind == 0:
        wm[key] = _pick(rng, [s for s in shards if s != wm[key]])
        what = f"{key} mapped to another shard {wm[key]}"
    elif kind == 1:
        del wm[key]
        what = f"{key} missing from the weight_map"
    elif kind == 2:
        wm["extra.weight"] = wm[key]
        what = "an extra tensor the shards lack"
    elif kind == 3:
        wm[key] = _pick(rng, ["../single/model.safetensors", "/etc/passwd", "sub/../../x.safetensors", "..", ""])
        what = f"{key} mapped outside: {wm[key]!r}"
    elif kind == 4:
        index["metadata"]["total_size"] = _pick(rng, [0, -1, 1, 2**63])
        what = f"total_size -> {index['metadata']['total_size']}"
    elif kind == 5:
        path.unlink()
        return "index removed"
    elif kind == 6:
        path.write_text(_pick(rng, ["", "[]", "{", "[" * 100000]))
        return "index unreadable"
    else:  # a duplicate key in the JSON text: two shards for one tensor
        text = json.dumps(index, indent=1)
        other = _pick(rng, [s for s in shards if s != wm[key]])
        text = text.replace('"weight_map": {', f'"weight_map": {{\n  "{key}": "{other}",', 1)
        path.write_text(text)
        return f"{key} listed twice in the weight_map ({other} first)"
    path.write_text(json.dumps(index, indent=1))
    return what


MUTATORS: dict[str, tuple[Callable[[Path, Rng], str], ...]] = {
    "record": RECORD_MUTATIONS,
    "header": (m_header,),
    "data": (m_data,),
    "tensors": (m_tensors,),
    "index": (m_index,),
    "values": (m_values,),
}


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    index: int
    kind: str  # one of KINDS
    base: str  # "single" or "sharded"

    @property
    def label(self) -> str:
        return f"{self.seed}:{self.index}"


def case_plan(seed: int, index: int, kinds: tuple[str, ...] = CYCLE) -> Case:
    """Case `index` of seed `seed`: the kinds of `kinds` in turn, each turn on the unsharded or the sharded
    save in turn (the index only exists in the sharded one)."""
    kind = kinds[index % len(kinds)]
    base = "sharded" if kind == "index" or (index // len(kinds)) % 2 else "single"
    return Case(seed, index, kind, base)


def reseal_record_digest(d: Path, old_text: str) -> bool:
    """Where the shards' metadata records a digest of the record (`duquant_jax.integrity.text_digest` of
    `old_text`, under any key), puts the digest of the record now in `d` there and recomputes the
    shards' checksum tables: a consistent rewrite, so the load's own cross-checks must catch the edit.
    False (nothing changed) when no shard records such a digest or the record is no text."""
    from duquant_jax.integrity import checksum_metadata, text_digest

    try:
        new_digest = text_digest((d / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return False
    old_digest, changed = text_digest(old_text), False
    for path in _shard_files(d):
        if path.is_symlink():
            continue
        try:
            header, body = split_file(path.read_bytes())
        except (ValueError, struct.error):
            continue
        meta = header.get("__metadata__", {})
        keys = [k for k, v in meta.items() if v == old_digest]
        if not keys or "checksums" not in meta:
            continue
        for k in keys:
            meta[k] = new_digest
        table = json.loads(meta["checksums"])
        meta["checksums"] = checksum_metadata(table["tensors"], {k: v for k, v in meta.items() if k != "checksums"})
        path.write_bytes(join_file(header, body))
        changed = True
    return changed


def make_case(case: Case, bases: dict[str, Path], into: Path) -> str:
    """Copies the case's base save to `into` and applies its mutation; returns its description,
    "MUTATOR: what was changed" (e.g. "record_config: layer head config act_bits: 8 -> 0")."""
    shutil.rmtree(into, ignore_errors=True)
    shutil.copytree(bases[case.base], into, symlinks=True)
    rng = np.random.default_rng([case.seed, case.index])
    mutate = _pick(rng, MUTATORS[case.kind])
    what = mutate(into, rng)
    original = (bases[case.base] / CONFIG_FILE).read_text(encoding="utf-8")
    record_changed = (into / CONFIG_FILE).exists() and (into / CONFIG_FILE).read_bytes() != original.encode()
    # half the record edits (and every edit that had to list a file) also reseal the record's digest
    if record_changed and (case.kind != "record" or rng.random() < 0.5) and reseal_record_digest(into, original):
        what += RESEALED
    return f"{mutate.__name__.removeprefix('m_')}: {what}"


# --- the child: load and forward -----------------------------------------------------------------------


def _digest(t) -> str:
    import hashlib

    import torch

    t = t.detach().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{t.dtype}{tuple(t.shape)}:{hashlib.sha256(raw).hexdigest()[:16]}"


def _forward_all(model, plans: list[str]) -> dict[str, str]:
    """{plan|input: digest of the output} over `plans` and every input; a layer that cannot take a
    plan's path stays on the fixed fallback order (autotuning off: the choice is deterministic)."""
    import torch

    from interop import kernels
    from interop.linear import DuQuantLinear

    kernels.set_kernel_options(autotune=False, precision="any")
    layers = [m for m in model.modules() if isinstance(m, DuQuantLinear) and m.qweight is not None]
    out = {}
    with torch.no_grad():
        for name, x in inputs().items():
            tokens = x.numel() // x.shape[-1]
            for plan in plans:
                for m in layers:
                    m.qweight.path = plan if kernels.unavailable(plan, m.qweight, m.act, x.dtype, tokens) is None else None
                out[f"{plan}|{name}"] = _digest(model(x))
    return out


def layer_summary(model) -> dict[str, str]:
    """{name: the layer's repr and its state's dtypes and shapes} for every DuQuantLinear and tensor: what
    a load must reproduce besides the outputs (a W4 layer that loaded as "W2" computes the same, but lies)."""
    from interop.linear import DuQuantLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, DuQuantLinear):
            out.update({f"{name}.config.{k}": repr(v) for k, v in m.config.to_dict().items()})
            out[f"{name}.calibrated"] = repr(bool(m.calibrated))
            out[f"{name}.qweight"] = "None" if m.qweight is None else f"bits={m.qweight.bits} group={m.qweight.group_size}"
    out.update({k: f"{t.dtype}{tuple(t.shape)}" for k, t in model.state_dict().items()})
    return out


def child_main(directory: str, plans: list[str]) -> dict:
    """In the forked child: build Net, load the save, run the forwards. Returns the result to send back."""
    import traceback

    import torch

    from interop.serialize import load_quantized

    torch.set_num_threads(1)
    stage = "load"
    try:
        model = load_quantized(build_net(), directory)
        stage = "forward"
        return {"status": "ok", "outputs": _forward_all(model, plans), "layers": layer_summary(model)}
    except BaseException as e:  # noqa: BLE001 - every exception is an outcome
        tb = traceback.format_exc()
        return {"status": "error", "stage": stage, "type": type(e).__name__, "message": str(e)[:2000], "traceback": tb[-3000:]}


def _run_forked(directory: str, plans: list[str], timeout: float, errfile: str) -> dict:
    """Forks a child that runs `child_main(directory, plans)`; waits at most `timeout` seconds."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        code = 0
        try:
            fd = os.open(errfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            import faulthandler

            faulthandler.enable(file=sys.stderr, all_threads=True)
            data = json.dumps(child_main(directory, plans)).encode()
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    os.close(w)
    chunks, deadline, t0 = [], time.monotonic() + timeout, time.monotonic()
    hung = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            hung = True
            break
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(r)
    if hung:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - t0
    stderr = Path(errfile).read_text(errors="replace")[-3000:] if os.path.exists(errfile) else ""
    if hung:
        return {"status": "hang", "seconds": seconds, "stderr": stderr}
    if os.WIFSIGNALED(status):
        return {"status": "crash", "signal": os.WTERMSIG(status), "seconds": seconds, "stderr": stderr}
    try:
        result = json.loads(b"".join(chunks))
    except ValueError:
        return {"status": "crash", "signal": None, "exit": os.WEXITSTATUS(status), "seconds": seconds, "stderr": stderr}
    result["seconds"] = seconds
    return result


def worker_main() -> None:
    """The long-lived worker: imports torch once, then per request line {"dir", "timeout"} forks a child
    and answers one JSON line. Never runs a torch op itself (so forking stays safe)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # noqa: F401 - imported once, shared by every child

    import interop.kernels  # noqa: F401
    import interop.serialize  # noqa: F401

    errfile = tempfile.mktemp(prefix="fuzz-child-", suffix=".err")
    out = sys.stdout
    sys.stdout = sys.stderr
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        result = _run_forked(req["dir"], req["plans"], float(req.get("timeout", HANG_S)), errfile)
        out.write(json.dumps(result) + "\n")
        out.flush()
    if os.path.exists(errfile):
        os.unlink(errfile)


class Worker:
    """The parent's handle on the worker process: `run(directory)` -> the child's result dict."""

    def __init__(self, timeout: float = HANG_S):
        self.timeout = timeout
        self.plans: list[str] | None = None  # None: every kernel path (set by `reference_result`)
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(Path(__file__).resolve().parents[1]),
        )
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError("the fuzz worker did not start")

    def run(self, directory: Path, plans: list[str] | None = None) -> dict:
        """Loads and runs `directory` in a fresh child under `plans` (default: the worker's)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        plans = plans or self.plans or ALL_PATHS
        self.proc.stdin.write(json.dumps({"dir": str(directory), "plans": plans, "timeout": self.timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:  # the worker itself died: count it as this case's crash and start a new one
            self.proc = None
            return {"status": "crash", "signal": None, "stderr": "the worker process died"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- classification --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    case: Case
    mutation: str
    result: str  # one of OUTCOMES
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"[{self.case.label} {self.case.kind}/{self.case.base}] {self.mutation} | {self.result} | {self.detail}"


def save_names(bases: dict[str, Path]) -> list[str]:
    """What a named error may name: the files, layers, tensors, record fields and config fields of the saves."""
    names = {CONFIG_FILE, INDEX_FILE, ".safetensors", "layers", "aliases", "files", "format", "shard", "checksum", "alias"}
    names |= {p.name for b in bases.values() for p in b.iterdir()}
    record = json.loads((bases["single"] / CONFIG_FILE).read_text())
    for layer, info in record["layers"].items():
        names.add(layer)
        names |= set(info) | set(info["config"]) | set(info["shapes"])
    for b in bases.values():
        for f in _shard_files(b):
            names |= set(_entries(split_file(f.read_bytes())[0]))
    names |= {"norm2.weight", "norm.weight"}
    return sorted(names, key=len, reverse=True)


RECORD_DIFFERS = "but the loaded model differs from the saved one: "
RESEALED = " (record digest resealed)"


def _layer_difference(got: dict[str, str], want: dict[str, str]) -> str:
    """'' when the loaded layers and tensors are the saved ones, else RECORD_DIFFERS and the first differences."""
    diff = [f"{k}: {want.get(k)!r} -> {got.get(k)!r}" for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    return RECORD_DIFFERS + "; ".join(d[:600] for d in diff[:2]) if diff else ""


def classify(case: Case, mutation: str, result: dict, reference: Reference, names: list[str], directory: Path) -> Outcome:
    """The outcome of one case from its child's result."""
    secs = float(result.get("seconds", 0.0))
    status = result["status"]
    if status == "hang":
        return Outcome(case, mutation, "hang", f"no answer in {secs:.0f} s; stderr: {result.get('stderr', '')[-600:]}", secs)
    if status == "crash":
        sig = result.get("signal")
        what = f"signal {signal.Signals(sig).name}" if sig else f"no result (exit {result.get('exit')})"
        return Outcome(case, mutation, "crash", f"{what}; stderr: {result.get('stderr', '')[-1500:]}", secs)
    if status == "ok":
        if result["outputs"] == reference.outputs:
            return Outcome(case, mutation, "loaded exactly right", _layer_difference(result["layers"], reference.layers), secs)
        diff = [k for k in reference.outputs if result["outputs"].get(k) != reference.outputs[k]]
        result_name = "undetectable edit" if case.kind == "values" else "wrong after reseal" if RESEALED in mutation else "silent wrong"
        return Outcome(case, mutation, result_name, f"outputs differ: {diff[:4]}{' ...' if len(diff) > 4 else ''} of {len(reference.outputs)}", secs)
    msg = result["message"]
    text = f"{result['stage']}: {result['type']}: {msg}"
    named = result["type"] in ("SavedModelError", "ChecksumError", "UnsafePathError") or str(directory) in msg
    named = named or any(n in msg for n in names if len(n) > 2)
    if named:
        return Outcome(case, mutation, "named error", text[:400], secs)
    tb = result.get("traceback", "")
    return Outcome(case, mutation, "unnamed error", f"{text[:400]}\n{tb[-1500:]}", secs)


@dataclasses.dataclass
class Reference:
    """The unmutated saves' outputs under every kernel plan that runs, and the plans that do not."""

    outputs: dict[str, str]
    layers: dict[str, str]  # `layer_summary` of the unmutated load
    plans: list[str]
    broken: dict[str, str]  # plan -> what happened to the unmutated save (a crash, an error, differing saves)


def reference_result(worker: Worker, bases: dict[str, Path]) -> Reference:
    """Runs each kernel plan alone on both unmutated saves; a plan that crashes, raises or gives the
    two saves different outputs is left out of the cases (and reported in `broken`)."""
    outputs, layers, plans, broken = {}, {}, [], {}
    for plan in ALL_PATHS:
        results = {name: worker.run(d, [plan]) for name, d in bases.items()}
        bad = {name: r for name, r in results.items() if r["status"] != "ok"}
        if bad:
            name, r = next(iter(bad.items()))
            sig = r.get("signal")
            what = f"signal {signal.Signals(sig).name}" if sig else r.get("type", r["status"])
            broken[plan] = f"unmutated {name} save: {r['status']} ({what}): {(r.get('message') or r.get('stderr', ''))[-1200:]}"
        elif results["single"]["outputs"] != results["sharded"]["outputs"]:
            broken[plan] = "the unsharded and sharded saves give different outputs"
        else:
            plans.append(plan)
            outputs.update(results["single"]["outputs"])
            layers = results["single"]["layers"]
    if not plans:
        raise RuntimeError(f"the unmutated saves run under no kernel plan: {broken}")
    worker.plans = plans
    return Reference(outputs, layers, plans, broken)


def run_cases(
    cases: list[Case], tmp: Path, *, timeout: float = HANG_S, progress: Callable[[Outcome], None] | None = None
) -> tuple[Reference, list[Outcome]]:
    """Builds the bases under `tmp`, then runs every case in the worker: (the reference, the outcomes in order)."""
    bases = save_bases(tmp / "bases")
    names = save_names(bases)
    out = []
    with Worker(timeout) as worker:
        reference = reference_result(worker, bases)
        for case in cases:
            d = tmp / "case"
            mutation = make_case(case, bases, d)
            outcome = classify(case, mutation, worker.run(d), reference, names, d)
            out.append(outcome)
            if progress:
                progress(outcome)
            shutil.rmtree(d, ignore_errors=True)
    return reference, out


def cases_for(n: int, seed: int, kinds: tuple[str, ...] = CYCLE) -> list[Case]:
    """The first `n` cases of `seed` over `kinds`."""
    return [case_plan(seed, i, kinds) for i in range(n)]


def counts(outcomes: list[Outcome]) -> dict[str, Counter]:
    """{kind: Counter(result)} plus "all"."""
    table: dict[str, Counter] = {}
    for o in outcomes:
        table.setdefault(o.case.kind, Counter())[o.result] += 1
        table.setdefault("all", Counter())[o.result] += 1
    return table


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--values", action="store_true", help='also the "values" kind (undetectable in-range edits)')
    ap.add_argument("--case", help="SEED:INDEX: run that one case (its directory is kept and printed)")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main()
        return
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-saved-"))
    if args.case:
        seed, index = map(int, args.case.split(":"))
        case = case_plan(seed, index)
        bases = save_bases(tmp / "bases")
        d = tmp / "case"
        mutation = make_case(case, bases, d)
        with Worker() as worker:
            o = classify(case, mutation, worker.run(d), reference_result(worker, bases), save_names(bases), d)
        print(o.line())
        print(f"directory: {d}")
        return
    t = time.perf_counter()
    reference, outcomes = run_cases(cases_for(args.cases, args.seed, ALL_CYCLE if args.values else CYCLE), tmp, progress=lambda o: print(o.line()[:300], flush=True) if o.result in FAILURES else None)
    shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - t
    for plan, what in reference.broken.items():
        print(f"kernel plan {plan} BROKEN on the unmutated save: {what[:300]}")
    for kind, c in counts(outcomes).items():
        print(kind, dict(c))
    case_s = sum(o.seconds for o in outcomes)
    print(f"{len(outcomes)} cases in {secs:.1f} s (children: {case_s:.1f} s, {len(outcomes) / max(case_s, 1e-9):.1f} cases/s)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
