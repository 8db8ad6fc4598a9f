"""Seeded corruptions of pack files, checkpoint index JSON and `.npz` exchange files, and their outcomes.

Shared by tests/test_fuzz.py (asserts) and bench/fuzz_counts.py (records the
counts in bench/RESULTS.md). Every case must end in a *clear error* (the
module's own error type, naming the file) or a *correct load* (exactly the
original contents); anything else is a *silent wrong load*, a *crash* (any
other exception) or a *hang* (no answer within HANG_S seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import struct
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

HANG_S = 20
OUTCOMES = ("clear error", "loaded correctly", "silent wrong", "crash", "hang")


@dataclasses.dataclass(frozen=True)
class Outcome:
    target: str
    mutation: str
    result: str  # one of OUTCOMES
    detail: str = ""


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float):
    def fire(signum, frame):
        raise _Hang

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _classify(target: str, mutation: str, load: Callable[[], object], same: Callable[[object], bool], errors: tuple, name: str) -> Outcome:
    try:
        with _deadline(HANG_S):
            got = load()
    except _Hang:
        return Outcome(target, mutation, "hang")
    except errors as e:
        if name in str(e):
            return Outcome(target, mutation, "clear error", str(e)[:200])
        return Outcome(target, mutation, "crash", f"{type(e).__name__} not naming {name}: {e}"[:300])
    except Exception as e:  # noqa: BLE001 - anything else is a crash to report
        return Outcome(target, mutation, "crash", f"{type(e).__name__}: {e}"[:300])
    if same(got):
        return Outcome(target, mutation, "loaded correctly")
    return Outcome(target, mutation, "silent wrong")


def counts(outcomes: list[Outcome]) -> dict[str, Counter]:
    """{target: Counter(result)}, plus "all"."""
    table: dict[str, Counter] = {}
    for o in outcomes:
        table.setdefault(o.target, Counter())[o.result] += 1
        table.setdefault("all", Counter())[o.result] += 1
    return table


# --- byte-level mutations -----------------------------------------------------------------------


def _flip(data: bytes, rng: np.random.Generator, lo: int, hi: int) -> tuple[bytes, str]:
    pos = int(rng.integers(lo, hi))
    bit = int(rng.integers(8))
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out), f"bit {bit} of byte {pos}"


def _truncate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    n = int(rng.integers(0, len(data)))
    return data[:n], f"truncated to {n} of {len(data)} bytes"


# --- pack files ---------------------------------------------------------------------------------


def split_header(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's (JSON header, data bytes)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_header(header: dict, body: bytes, declared: int | None = None) -> bytes:
    """The inverse of `split_header`; `declared` overrides the header length written."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + body


def _pack_structured(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    header, body = split_header(data)
    meta = header["__metadata__"]
    keys = [k for k in header if k != "__metadata__"]
    key = keys[int(rng.integers(len(keys)))]
    layers = json.loads(meta["layers"])
    layer = list(layers)[int(rng.integers(len(layers)))]
    kind = int(rng.integers(14))
    if kind == 0:  # same-size dtype swap
        swap = {"F32": "I32", "I32": "F32", "I8": "U8", "U8": "I8", "I64": "F64", "F64": "I64"}
        header[key]["dtype"] = swap.get(header[key]["dtype"], "F32")
        what = f"dtype of {key}"
    elif kind == 1:  # other dtype (size mismatch)
        header[key]["dtype"] = ["F16", "F64", "BF16", "BOOL", "I16", "XX"][int(rng.integers(6))]
        what = f"dtype size of {key}"
    elif kind == 2:  # same element count, other shape
        header[key]["shape"] = list(reversed(header[key]["shape"])) if len(header[key]["shape"]) > 1 else [1] + header[key]["shape"]
        what = f"shape of {key}"
    elif kind == 3:  # huge shape
        header[key]["shape"] = [2**40] + header[key]["shape"][1:]
        what = f"huge shape of {key}"
    elif kind == 4:  # huge offsets
        header[key]["data_offsets"] = [0, 2**62]
        what = f"huge data_offsets of {key}"
    elif kind == 5:  # huge declared header length
        return join_header(header, body, declared=int(rng.choice([2**31, 2**40, 2**63]))), "huge header length"
    elif kind == 6:  # a tensor entry missing
        del header[key]
        what = f"entry {key} removed"
    elif kind == 7:  # a metadata key missing
        k = ["layers", "checksums", "format", "format_version"][int(rng.integers(4))]
        del meta[k]
        what = f"metadata {k} removed"
    elif kind == 8:  # a layer-table key missing
        k = ["config", "in_features", "out_features", "codes", "fields"][int(rng.integers(5))]
        del layers[layer][k]
        meta["layers"] = json.dumps(layers)
        what = f"layer {layer} {k} removed"
    elif kind == 9:  # huge or nonsense declared sizes in the layer table
        v = [10**12, -1, 0, "40", 2.5, None, True][int(rng.integers(7))]
        layers[layer][["in_features", "out_features"][int(rng.integers(2))]] = v
        meta["layers"] = json.dumps(layers)
        what = f"layer {layer} size {v!r}"
    elif kind == 10:  # config field of the wrong type or value
        field, v = [("weight_bits", "4"), ("block_size", 0), ("row_rot_mode", "sideways"), ("weight_bits", 8), ("block_size", 8)][int(rng.integers(5))]
        layers[layer]["config"][field] = v
        meta["layers"] = json.dumps(layers)
        what = f"layer {layer} config {field}={v!r}"
    elif kind == 11:  # field list edited
        fields = layers[layer]["fields"]
        layers[layer]["fields"] = fields[1:] if rng.integers(2) else fields + ["bogus"]
        meta["layers"] = json.dumps(layers)
        what = f"layer {layer} fields edited"
    elif kind == 12:  # checksum table garbage
        meta["checksums"] = ["{", "[]", '{"algorithm": "crc32"}', '{"algorithm": "md5", "tensors": {}}'][int(rng.integers(4))]
        what = "checksum table replaced"
    else:  # deep nesting in the layer table
        meta["layers"] = "[" * 100000 + "]" * 100000
        what = "deeply nested layer table"
    return join_header(header, body), what


def _same_packs(want: dict) -> Callable[[object], bool]:
    def same(got) -> bool:
        if list(got) != list(want):
            return False
        for name, p in want.items():
            q = got[name]
            if q.config != p.config:
                return False
            for field, a in p.arrays().items():
                b = getattr(q, field)
                if b is None or np.asarray(a).dtype != np.asarray(b).dtype or not np.array_equal(np.asarray(a), np.asarray(b)):
                    return False
        return True

    return same


def pack_file_outcomes(tmp: Path, n: int, seed: int = 0) -> list[Outcome]:
    """`n` corruptions of a two-layer pack file (a W4A8 calibrated layer and a W8 one), through `load_packs`."""
    from duquant_jax import DuQuantConfig, calibrate, pack_weight
    from duquant_jax.io import PackFileError, load_packs, save_packs

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    packs = {
        "model.q_proj": calibrate(pack_weight(w), [rng.standard_normal((8, 40)).astype(np.float32)]),
        "model.w8": pack_weight(w[:, :33], DuQuantConfig(weight_bits=8)),
    }
    clean = save_packs(tmp / "clean.safetensors", packs).read_bytes()
    want = load_packs(tmp / "clean.safetensors")
    (header_len,) = struct.unpack("<Q", clean[:8])
    path = tmp / "fuzzed.safetensors"
    out = []
    for i in range(n):
        kind = ("data flip", "data flip", "header flip", "truncation", "structured")[i % 5]
        if kind == "data flip":
            data, what = _flip(clean, rng, 8 + header_len, len(clean))
        elif kind == "header flip":
            data, what = _flip(clean, rng, 0, 8 + header_len)
        elif kind == "truncation":
            data, what = _truncate(clean, rng)
        else:
            data, what = _pack_structured(clean, rng)
        path.write_bytes(data)
        out.append(_classify("pack file", f"{kind}: {what}", lambda: load_packs(path), _same_packs(want), (PackFileError, FileNotFoundError), path.name))
    return out


# --- checkpoint index JSON ----------------------------------------------------------------------

_INDEX = "model.safetensors.index.json"


def _index_structured(index: dict, names: list[str], rng: np.random.Generator) -> tuple[str, str]:
    kind = int(rng.integers(9))
    wm = index["weight_map"]
    name = names[int(rng.integers(len(names)))]
    if kind == 0:
        index["weight_map"] = [list(wm.items()), "model.safetensors", 3, None][int(rng.integers(4))]
        what = "weight_map of the wrong type"
    elif kind == 1:
        del index["weight_map"]
        what = "weight_map removed"
    elif kind == 2:
        wm[name] = [3, None, ["x"], {"a": 1}, ""][int(rng.integers(5))]
        what = f"shard of {name} not a file name"
    elif kind == 3:
        wm[name] = ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", "..", "."][int(rng.integers(5))]
        what = f"shard of {name} outside: {wm[name]}"
    elif kind == 4:
        wm[name] = "model-00009-of-00002.safetensors"
        what = f"shard of {name} missing"
    elif kind == 5:
        other = {v for v in wm.values()} - {wm[name]}
        wm[name] = sorted(other)[0]
        what = f"shard of {name} is another shard"
    elif kind == 6:
        return "[" * 200000 + "]" * 200000, "deeply nested"
    elif kind == 7:
        wm["x" * 10000 + ".weight"] = wm[name]
        what = "an extra tensor the shards lack"
    else:
        return json.dumps(index)[: int(rng.integers(1, 40))], "cut JSON"
    return json.dumps(index), what


def index_outcomes(tmp: Path, n: int, seed: int = 0) -> list[Outcome]:
    """`n` corruptions of transformers' index JSON of a two-shard checkpoint, through `Checkpoint` and its tensors."""
    from safetensors.numpy import save_file

    from duquant_jax.checkpoint import Checkpoint

    rng = np.random.default_rng(seed)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((8, 16)).astype(np.float32) for i in range(4)}
    names = list(tensors)
    d = tmp / "ckpt"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / shard))
    save_file({"outside": np.zeros(1, np.float32)}, str(tmp / "outside.safetensors"))
    index = {"metadata": {"total_size": 1024}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    clean = json.dumps(index, indent=2).encode()

    def load():
        ckpt = Checkpoint(d)
        return {name: (ckpt.shape(name), np.asarray(ckpt.tensor(name))) for name in ckpt.files}

    def same(got) -> bool:
        return list(got) == names and all(np.array_equal(got[k][1], tensors[k]) and got[k][0] == tensors[k].shape for k in names)

    from duquant_jax.paths import UnsafePathError

    out = []
    for i in range(n):
        kind = ("byte flip", "truncation", "structured", "structured")[i % 4]
        if kind == "byte flip":
            data, what = _flip(clean, rng, 0, len(clean))
        elif kind == "truncation":
            data, what = _truncate(clean, rng)
        else:
            text, what = _index_structured(json.loads(clean), names, rng)
            data = text.encode()
        (d / _INDEX).write_bytes(data)
        # a clear error names the index, or the shard it sent us to
        outcome = _classify("checkpoint index", f"{kind}: {what}", load, same, (ValueError, FileNotFoundError, UnsafePathError), "model")
        out.append(outcome)
    return out


# --- .npz exchange files ------------------------------------------------------------------------


def _npz_structured(arrays: dict, rng: np.random.Generator) -> tuple[dict, str]:
    a = dict(arrays)
    meta = json.loads(str(a["meta"]))
    kind = int(rng.integers(12))
    if kind == 0:
        key = sorted(a)[int(rng.integers(len(a)))]
        del a[key]
        what = f"{key} removed"
    elif kind == 1:
        k = list(meta)[int(rng.integers(len(meta)))]
        del meta[k]
        what = f"meta {k} removed"
    elif kind == 2:
        k = list(meta)[int(rng.integers(len(meta)))]
        meta[k] = [10**15, -3, "16", None, 2.5, [], True][int(rng.integers(7))]
        what = f"meta {k}={meta[k]!r}"
    elif kind == 3:
        a["perm"] = a["perm"].astype(np.float64)
        what = "perm as float"
    elif kind == 4:
        p = a["perm"].copy()
        p[0] = p[1]
        a["perm"] = p
        what = "perm with a duplicate"
    elif kind == 5:
        a["perm"] = a["perm"][:-1]
        what = "perm one short"
    elif kind == 6:
        a["Rin_0"] = a["Rin_0"].astype([np.int8, np.float16][int(rng.integers(2))])
        what = f"Rin_0 as {a['Rin_0'].dtype}"
    elif kind == 7:
        a["Rin_1"] = a["Rin_1"][:-1]
        what = "Rin_1 not square"
    elif kind == 8:
        a["R_in_blocks"] = np.int64([10**15, -1, 0, 99][int(rng.integers(4))])
        what = f"R_in_blocks {int(a['R_in_blocks'])}"
    elif kind == 9:
        s = a["weight_scale"].copy()
        s[int(rng.integers(len(s)))] = [0.0, -1.0, np.inf, np.nan][int(rng.integers(4))]
        a["weight_scale"] = s
        what = "weight_scale entry not finite positive"
    elif kind == 10:
        r = a["Rout_0"].copy()
        r[0, 0] += 0.01
        a["Rout_0"] = r
        what = "Rout_0 not orthogonal"
    else:
        a["meta"] = np.array([json.dumps(meta)])
        what = "meta as a 1-element array"
    if kind in (1, 2):
        a["meta"] = np.array(json.dumps(meta))
    return a, what


def npz_outcomes(tmp: Path, n: int, seed: int = 0) -> list[Outcome]:
    """`n` corruptions of an origin-format `.npz` layer, through `duquant_jax.npz.pack_from_npz`."""
    from duquant_jax import DuQuantConfig, pack_weight
    from duquant_jax.npz import pack_from_npz
    from interop.exchange import export_npz

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    clean_path = export_npz(pack_weight(w, DuQuantConfig(block_out_size=8)), tmp / "clean.npz")
    clean = clean_path.read_bytes()
    arrays = dict(np.load(clean_path))
    want = pack_from_npz(clean_path, w)
    path = tmp / "fuzzed.npz"

    def same(got) -> bool:
        if got.config != want.config:
            return False
        return all(np.array_equal(np.asarray(getattr(got, f)), np.asarray(getattr(want, f))) for f in ("perm", "r_in", "r_out", "w_scale", "w_codes"))

    out = []
    for i in range(n):
        kind = ("byte flip", "byte flip", "truncation", "structured")[i % 4]
        if kind == "byte flip":
            data, what = _flip(clean, rng, 0, len(clean))
            path.write_bytes(data)
        elif kind == "truncation":
            data, what = _truncate(clean, rng)
            path.write_bytes(data)
        else:
            mutated, what = _npz_structured(arrays, rng)
            np.savez(path, **mutated)
        out.append(_classify(".npz exchange", f"{kind}: {what}", lambda: pack_from_npz(path, w), same, (ValueError, FileNotFoundError), path.name))
    return out


def all_outcomes(tmp: Path, scale: int = 1, seed: int = 0) -> list[Outcome]:
    """The default mix: 200 pack-file, 100 index and 100 .npz cases per unit of `scale`."""
    out = []
    for name, fn, n in (("pack", pack_file_outcomes, 200), ("index", index_outcomes, 100), ("npz", npz_outcomes, 100)):
        sub = tmp / name
        sub.mkdir(parents=True, exist_ok=True)
        out += fn(sub, n * scale, seed)
    return out

