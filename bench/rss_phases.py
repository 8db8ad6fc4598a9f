"""Peak resident memory by phase of a run: a sampling thread reads /proc/self/statm every few milliseconds.

```python
sampler = PhaseSampler()
sampler.wrap(module, "function", "label")           # calls of module.function run under "label"
sampler.wrap_context(module, "observe", "observe")  # the body of `with module.observe(...)` likewise
with sampler.phase("load"):
    ...
sampler.peaks()  # {"load": GiB, "load/label": GiB, ...}: the highest RSS seen while each phase was innermost
```

Phases nest (labels joined by "/"). A sample can miss a peak shorter than the interval; the exact
figure for the whole process is `duquant_jax.peak_memory.peak_rss_gib()` (its own high-water mark).
Linux only (elsewhere every sample reads 0.0).
"""

from __future__ import annotations

import contextlib
import functools
import resource
import threading
import time
from typing import Any, Callable, Iterator

from duquant_jax.peak_memory import GIB


def rss_gib() -> float:
    """The process's resident set now, in GiB (0.0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / GIB
    except OSError:
        return 0.0


class PhaseSampler:
    """Samples RSS every `interval_s` seconds in a daemon thread, keeping the peak of each phase."""

    def __init__(self, interval_s: float = 0.005, base: str = ""):
        self.base = base  # the outermost label, set by the caller as a run moves on (e.g. "block 3")
        self._stack: list[str] = []
        self._peaks: dict[str, float] = {}
        self._interval = interval_s
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="rss-phases").start()

    def _run(self) -> None:
        while True:
            r = rss_gib()
            with self._lock:
                key = "/".join([self.base, *self._stack] if self.base else self._stack) or "-"
                if r > self._peaks.get(key, 0.0):
                    self._peaks[key] = r
            time.sleep(self._interval)

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        with self._lock:
            self._stack.append(label)
        try:
            yield
        finally:
            with self._lock:
                self._stack.pop()

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """Replaces `owner.name` (a function looked up at call time) by one that runs under `label`."""
        fn: Callable = getattr(owner, name)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self.phase(label):
                return fn(*args, **kwargs)

        setattr(owner, name, wrapped)

    def wrap_context(self, owner: Any, name: str, label: str) -> None:
        """Replaces the context manager factory `owner.name`: the body of its `with` runs under `label`."""
        fn: Callable = getattr(owner, name)

        @contextlib.contextmanager
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with fn(*args, **kwargs) as value, self.phase(label):
                yield value

        setattr(owner, name, wrapped)

    def peaks(self) -> dict[str, float]:
        """{phase path: the highest RSS (GiB) sampled while it was the innermost phase}."""
        with self._lock:
            return dict(self._peaks)
