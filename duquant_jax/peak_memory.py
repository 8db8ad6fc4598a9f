"""The process's peak resident memory: the kernel's high-water mark of its own address space."""

from __future__ import annotations

import resource
import sys

GIB = 2**30


def peak_rss_gib() -> float:
    """Peak resident set of this process, in GiB, since it started (or since its last exec).

    Read from `VmHWM` in /proc/self/status where it exists (Linux). `getrusage(...).ru_maxrss` is
    only the fallback: Linux carries a process's maxrss across exec, so a child started by a large
    parent (a bench that wrote a checkpoint, then measures a run in a fresh process) reports the
    parent's peak, not its own. Elsewhere ru_maxrss is KiB (Linux) or bytes (macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB
