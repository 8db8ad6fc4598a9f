"""Which kernel path is fastest here: measure the candidates once per key, cache the winner.

A key names everything a path's speed depends on: the machine (`machine_id`:
CPU model, its vector/matrix extensions, torch's CPU capability and version;
or the GPU), the torch thread count, the weight's shape, bits, groups and
layout, the activation handling, the input dtype, the precision allowed, and
the token-count bucket (`token_bucket`: 1, 2-16, 17-64, 65-256, >256). The
`Autotuner` runs every candidate once (warm-up) and then times it; the
fastest wins and is kept in memory, and, after `use_disk`, in a JSON file
(written atomically; a corrupt or foreign file is reported and replaced, never
trusted). Pure Python and torch: no JAX.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import platform
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch

from duquant_jax.atomic import atomic_write_text

CACHE_FORMAT = "duquant-kernel-choices"
CACHE_VERSION = 1
CACHE_FILE = "kernel-choices.json"
DEFAULT_CACHE_DIR = Path("~/.cache/duquant")

# (largest token count, label, token count the candidates are measured at)
TOKEN_BUCKETS = ((1, "1", 1), (16, "2-16", 16), (64, "17-64", 64), (256, "65-256", 256), (None, ">256", 1024))

# CPU features that decide which kernels are fast (x86 and Arm names as /proc/cpuinfo spells them).
_CPU_FEATURES = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme",
)

Measure = Callable[[str, Callable[[], object]], float]

# CPU instructions for int8 dot products (/proc/cpuinfo names, x86 and Arm): without one, torch emulates `_int_mm`.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


def token_bucket(tokens: int) -> tuple[str, int]:
    """tokens -> (bucket label, the token count its candidates are measured at)."""
    for top, label, rep in TOKEN_BUCKETS:
        if top is None or tokens <= top:
            return label, rep
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=None)
def cpu_info() -> tuple[str, frozenset[str]]:
    """The first CPU's model name and its feature flags from /proc/cpuinfo (x86 "flags", Arm "Features");
    ("", empty) where there is no such file."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def int8_dot_native() -> bool:
    """Whether this CPU has an int8 dot-product instruction (INT8_DOT_FLAGS); True where its flags cannot be read
    (nothing is assumed missing then)."""
    flags = cpu_info()[1]
    return not flags or bool(flags & INT8_DOT_FLAGS)


@functools.lru_cache(maxsize=None)
def cpu_description() -> str:
    """The CPU model and the vector/matrix extensions that matter here, e.g. `AMD EPYC [avx2 avx512_vnni ...]`."""
    model, flags = cpu_info()
    model = model or platform.processor() or platform.machine() or "unknown cpu"
    found = " ".join(f for f in _CPU_FEATURES if f in flags)
    return f"{model} [{found}]" if found else model


@functools.lru_cache(maxsize=None)
def machine_id(device_type: str = "cpu", index: int = 0) -> str:
    """What a measured choice is valid for: the processor and the torch build."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda {name} sm{major}{minor} torch {torch.__version__}"
    if device_type == "cpu":
        return f"cpu {cpu_description()} torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"
    return f"{device_type} torch {torch.__version__}"


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Least wall time of `repeats` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@dataclasses.dataclass(frozen=True)
class Choice:
    """A key's winning path, the candidates' times in seconds, and where it came from ("measured" or "disk")."""

    key: str
    path: str
    times: Mapping[str, float]
    source: str
    errors: Mapping[str, str] = dataclasses.field(default_factory=dict)


class Autotuner:
    """Measures candidate paths once per key and remembers the fastest.

    Every candidate runs once (warm-up; one that raises is dropped, its error
    kept), then `repeats` rounds time each remaining candidate once per round,
    interleaved, so that a burst of load on a shared machine hits every
    candidate alike; a candidate's time is its least sample.

    Args:
      measure: `(path name, fn) -> seconds` of one call of `fn`; default: its wall
        time. Tests pass a fake.
      repeats: timed rounds.
      slow_factor: a candidate whose warm-up took this many times the fastest
        warm-up is timed in the first round only (its warm-up may have met a one-time
        cost or a burst of load), and not at all when its warm-up took over
        `retime_limit_s` (its warm-up is then its time): an emulated kernel can take a
        minute a call.
      retime_limit_s: see `slow_factor`.
    """

    def __init__(self, measure: Measure | None = None, *, repeats: int = 5, slow_factor: float = 20.0,
                 retime_limit_s: float = 1.0):
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1; got {repeats!r}")
        if not isinstance(retime_limit_s, (int, float)) or isinstance(retime_limit_s, bool) or not retime_limit_s >= 0:
            raise ValueError(f"retime_limit_s must be a number >= 0; got {retime_limit_s!r}")
        self.measure: Measure = measure or (lambda name, fn: best_of(fn, 1))
        self.repeats = repeats
        self.slow_factor = slow_factor
        self.retime_limit_s = retime_limit_s
        self._memory: dict[str, Choice] = {}
        self._file: Path | None = None
        self._disk: dict[str, dict] | None = None  # the file's entries, read once
        self._lock = threading.Lock()
        self.generation = 0  # bumped whenever remembered choices may change meaning (clear, use_disk)

    # -- disk --------------------------------------------------------------------
    def use_disk(self, directory: str | os.PathLike | None = None) -> Path:
        """Keeps choices in `directory/kernel-choices.json` too (default `~/.cache/duquant`); returns the file."""
        path = Path(directory if directory is not None else DEFAULT_CACHE_DIR).expanduser() / CACHE_FILE
        with self._lock:
            self._file, self._disk = path, None
            self.generation += 1
        return path

    def no_disk(self) -> None:
        with self._lock:
            self._file, self._disk = None, None
            self.generation += 1

    @property
    def cache_file(self) -> Path | None:
        return self._file

    def _read_file(self, warn: bool = True) -> dict[str, dict]:
        """The file's entries; {} (with a warning) when it is missing, unreadable or not ours."""
        path = self._file
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if not (isinstance(data, dict) and data.get("format") == CACHE_FORMAT and data.get("version") == CACHE_VERSION):
                raise ValueError(f"not a {CACHE_FORMAT} file of version {CACHE_VERSION}")
            entries = data["entries"]
            if not isinstance(entries, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("path"), str) for v in entries.values()
            ):
                raise ValueError("malformed entries")
            return entries
        except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            if warn:
                warnings.warn(f"kernel choice cache {path} is unreadable ({e}); measuring again and rewriting it", stacklevel=4)
            return {}

    def _write_entry(self, choice: Choice) -> None:
        path = self._file
        entries = self._read_file(warn=False)  # merge with what other processes wrote meanwhile
        entries[choice.key] = {
            "path": choice.path,
            "times_ms": {k: round(v * 1e3, 4) for k, v in choice.times.items()},
            "measured": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        text = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True)
        atomic_write_text(path, text)
        self._disk = entries

    # -- choosing ----------------------------------------------------------------
    def lookup(self, key: str) -> Choice | None:
        """The remembered choice for `key` (memory, then disk), or None."""
        choice = self._memory.get(key)
        if choice is not None or self._file is None:
            return choice
        with self._lock:
            if self._disk is None:
                self._disk = self._read_file()
            entry = self._disk.get(key)
        if entry is None:
            return None
        times = entry.get("times_ms")
        times = {k: v / 1e3 for k, v in times.items() if isinstance(v, (int, float))} if isinstance(times, dict) else {}
        choice = self._memory[key] = Choice(key, entry["path"], times, "disk")
        return choice

    def choose(self, key: str, candidates: Mapping[str, Callable[[], object]]) -> Choice:
        """The remembered choice for `key` if it names a candidate, else the fastest candidate, measured now."""
        known = self.lookup(key)
        if known is not None and known.path in candidates:
            self._memory[key] = known
            return known
        if not candidates:
            raise ValueError(f"no kernel path can compute {key}")
        warm, errors = {}, {}
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:  # a candidate that fails here is simply not chosen
                errors[name] = f"{type(e).__name__}: {e}"
                continue
            warm[name] = time.perf_counter() - t0
        if not warm:
            raise RuntimeError(f"every kernel path failed for {key}: {errors}")
        fastest = min(warm.values())
        slow = {n for n, t in warm.items() if math.isfinite(self.slow_factor) and t > self.slow_factor * fastest}
        untimed = {n for n in slow if warm[n] > self.retime_limit_s}  # lost by over slow_factor x, and costly
        times: dict[str, float] = {n: warm[n] for n in untimed}
        for r in range(self.repeats):
            for name in warm:
                if name not in untimed and (r == 0 or name not in slow):
                    t = self.measure(name, candidates[name])
                    times[name] = min(t, times.get(name, t))
        winner = min(times, key=times.get)
        choice = Choice(key, winner, times, "measured", errors)
        with self._lock:
            self._memory[key] = choice
            if self._file is not None:
                try:
                    self._write_entry(choice)
                except OSError as e:
                    warnings.warn(f"could not write the kernel choice cache {self._file}: {e}", stacklevel=2)
        return choice

    def report(self) -> list[Choice]:
        """Every choice made or read in this process, in the order made."""
        return list(self._memory.values())

    def clear(self) -> None:
        """Forgets the choices in memory (the disk file stays)."""
        with self._lock:
            self._memory.clear()
            self._disk = None
            self.generation += 1


_TUNER = Autotuner()


def get_tuner() -> Autotuner:
    """The process-wide tuner `interop.kernels` uses."""
    return _TUNER


def set_tuner(tuner: Autotuner) -> Autotuner:
    """Replaces the process-wide tuner (e.g. one with a fake `measure`); returns the previous one."""
    global _TUNER
    if not isinstance(tuner, Autotuner):
        raise TypeError(f"set_tuner needs an Autotuner; got {type(tuner).__name__}")
    old, _TUNER = _TUNER, tuner
    return old


def enable_disk_cache(directory: str | os.PathLike | None = None) -> Path:
    """Keeps the process-wide tuner's choices on disk (default `~/.cache/duquant/kernel-choices.json`)."""
    return _TUNER.use_disk(directory)
