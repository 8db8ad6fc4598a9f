"""bench/rss_phases.PhaseSampler: each phase's peak RSS, nested labels, wrapped functions and context managers."""

import contextlib
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from rss_phases import PhaseSampler, rss_gib  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="samples /proc/self/statm")


def _hold(gib: float, seconds: float = 0.1) -> None:
    a = np.ones(int(gib * 2**30) // 4, np.float32)  # touched
    time.sleep(seconds)  # several samples while it is held
    del a


def test_phase_peaks_see_an_allocation_in_their_own_phase_only():
    sampler = PhaseSampler(interval_s=0.002, base="run")
    base = rss_gib()
    owner = types.SimpleNamespace(work=lambda: _hold(0.25), idle=lambda: time.sleep(0.1))
    sampler.wrap(owner, "work", "work")
    sampler.wrap(owner, "idle", "idle")
    owner.work()
    owner.idle()
    peaks = sampler.peaks()
    assert peaks["run/work"] >= base + 0.2, peaks
    assert peaks["run/idle"] < peaks["run/work"] - 0.15, peaks


def test_wrapped_context_labels_the_body_and_nests_under_the_caller():
    sampler = PhaseSampler(interval_s=0.002)
    owner = types.SimpleNamespace(observe=contextlib.nullcontext)
    sampler.wrap_context(owner, "observe", "observe")
    with sampler.phase("block 1"), owner.observe(7) as value:
        assert value == 7
        _hold(0.1)
    sampler.base = "block 2"
    with sampler.phase("read"):
        time.sleep(0.05)
    assert {"block 1/observe", "block 2/read"} <= set(sampler.peaks()), sampler.peaks()
