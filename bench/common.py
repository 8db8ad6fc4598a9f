"""Shared benchmark helpers: timing, machine description, RESULTS.md sections."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

from duquant_jax.demo import GEMMA_2B_LINEARS

RESULTS = Path(__file__).with_name("RESULTS.md")

# Gemma-2B linears of one transformer block (out, in), and the 300M action expert's.
GEMMA_2B = GEMMA_2B_LINEARS
GEMMA_2B_BLOCKS = 18
EXPERT_300M = {"q_proj": (1024, 1024), "up_proj": (4096, 1024), "down_proj": (1024, 4096)}


def commit() -> str:
    """The short hash of HEAD, with "+dirty" when tracked files differ from it; "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of `repeats` calls, in seconds (call once before to compile)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> str:
    import jax
    import numpy

    parts = [
        f"{platform.machine()} {os.cpu_count()} cores",
        f"Python {platform.python_version()}",
        f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind})",
        f"numpy {numpy.__version__}",
    ]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    return ", ".join(parts)


def write_section(name: str, body: str) -> None:
    """Replaces (or appends) the section `## name` of bench/RESULTS.md, atomically."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"## {name}\n\nMeasured {stamp} on {machine()}.\n\n{body.strip()}\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in `bench/`; rerun them to refresh a section.\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def paired_interval(a, b, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of `a - b` (paired per-item values: chunk NLLs, sentence cosines) and its 95% bootstrap
    interval over items: `resamples` draws of the items with replacement, the same draws for every call
    with the same item count and seed."""
    import numpy as np

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
