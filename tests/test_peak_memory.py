"""peak_rss_gib: a process's own peak, not one inherited from the process that started it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from duquant_jax.peak_memory import peak_rss_gib

MODULE = Path(__file__).resolve().parents[1] / "duquant_jax" / "peak_memory.py"
CHILD = f"""
import importlib.util, resource
spec = importlib.util.spec_from_file_location("peak_memory", {str(MODULE)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(m.peak_rss_gib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def test_peak_rss_counts_an_allocation_of_the_process():
    a = np.ones(2**27, np.float32)  # 0.5 GiB, touched
    peak = peak_rss_gib()
    assert peak >= 0.5
    del a
    assert peak_rss_gib() >= peak - 0.01  # a high-water mark: freeing does not lower it (counters are per-thread, synced lazily)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_child_peak_excludes_the_parents_memory():
    held = np.ones(2**27, np.float32)  # the parent holds 0.5 GiB when the child is started
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    own, maxrss = float(out[0]), float(out[1])
    assert own < 0.2, f"the child's own peak ({own:.2f} GiB; its ru_maxrss {maxrss:.2f}) includes the parent's 0.5 GiB"
    del held
