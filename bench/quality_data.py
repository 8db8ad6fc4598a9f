"""Offline text for the quality benchmark: the CPython documentation in `pydoc_data.topics`.

Gemma gets 512-token chunks of the whole text; MiniLM gets its prose sentences.
Both are split by a seeded permutation into calibration and evaluation sets that
never overlap (`Split`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np


def corpus() -> str:
    """Every topic of `pydoc_data.topics` (the `help()` texts of the CPython docs), sorted by key."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_digest() -> str:
    """Short sha256 of `corpus()`: it changes with the Python version, and so would the split."""
    return hashlib.sha256(corpus().encode()).hexdigest()[:12]


def seeded_parts(seed: int, total: int, *sizes: int) -> list[np.ndarray]:
    """Consecutive parts of `sizes` items of `np.random.default_rng(seed).permutation(total)`, each sorted."""
    order = np.random.default_rng(seed).permutation(total)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclasses.dataclass(frozen=True)
class Split:
    """A seeded split of `total` items: `calib` and `eval` index arrays, disjoint.

    The items are permuted with `np.random.default_rng(seed)`; the first `n_calib`
    calibrate, the next `n_eval` evaluate.
    """

    seed: int
    total: int
    n_calib: int
    n_eval: int

    def __post_init__(self) -> None:
        if self.n_calib < 0 or self.n_eval < 1 or self.n_calib + self.n_eval > self.total:
            raise ValueError(f"split of {self.total} items cannot hold {self.n_calib} calibration + {self.n_eval} evaluation items")

    @property
    def calib(self) -> np.ndarray:
        return seeded_parts(self.seed, self.total, self.n_calib, self.n_eval)[0]

    @property
    def eval(self) -> np.ndarray:
        return seeded_parts(self.seed, self.total, self.n_calib, self.n_eval)[1]

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ThreeWaySplit:
    """A seeded split of `total` items into disjoint `calib`, `dev` and `test` index arrays.

    The same permutation as `Split` (`seeded_parts`): the first `n_calib`
    calibrate (so `calib` equals `Split(seed, total, n_calib, ...)`'s), the next `n_dev`
    are the development set (every choice is made there), the next `n_test` the test set
    (only reported). `n_calib_extra` more calibration items come from after the test set,
    so that more calibration data leaves the development and test items as they are.
    """

    seed: int
    total: int
    n_calib: int
    n_dev: int
    n_test: int
    n_calib_extra: int = 0

    def __post_init__(self) -> None:
        if (self.n_calib < 0 or self.n_calib_extra < 0 or self.n_dev < 1 or self.n_test < 1
                or self.n_calib + self.n_dev + self.n_test + self.n_calib_extra > self.total):
            raise ValueError(f"split of {self.total} items cannot hold {self.n_calib} (+{self.n_calib_extra}) calibration "
                             f"+ {self.n_dev} development + {self.n_test} test items")

    @property
    def calib(self) -> np.ndarray:
        parts = seeded_parts(self.seed, self.total, self.n_calib, self.n_dev, self.n_test, self.n_calib_extra)
        return np.sort(np.concatenate([parts[0], parts[3]]))

    @property
    def dev(self) -> np.ndarray:
        return seeded_parts(self.seed, self.total, self.n_calib, self.n_dev, self.n_test)[1]

    @property
    def test(self) -> np.ndarray:
        return seeded_parts(self.seed, self.total, self.n_calib, self.n_dev, self.n_test)[2]

    def describe(self) -> dict:
        """The fields, `n_calib_extra` only when it is not 0 (so the lines of the plain split keep their form)."""
        d = dataclasses.asdict(self)
        if not self.n_calib_extra:
            del d["n_calib_extra"]
        return d


def token_chunks(ids: np.ndarray, length: int = 512) -> np.ndarray:
    """ids: (n,) -> (n // length, length): consecutive non-overlapping chunks, the tail dropped."""
    n = len(ids) // length
    return np.asarray(ids[: n * length]).reshape(n, length)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences of `corpus()`: paragraphs split at sentence ends, whitespace collapsed.

    Kept: `min_words..max_words` words, at least 80% letters or spaces, not code
    (no `>>>`, braces or `=`), first occurrence only; in corpus order.
    """
    out, seen = [], set()
    for para in re.split(r"\n\s*\n", corpus()):
        if para.startswith((" ", "\t")):  # indented: code or a table
            continue
        for s in _SENTENCE_END.split(" ".join(para.split())):
            words = s.split()
            letters = sum(c.isalpha() or c == " " for c in s)
            if not (min_words <= len(words) <= max_words) or letters < 0.8 * len(s):
                continue
            if any(t in s for t in (">>>", "{", "}", "=")) or s in seen:
                continue
            seen.add(s)
            out.append(s)
    return out
