"""Seeded corruptions of pack files, checkpoint index JSON and `.npz` exchange files (tests/fuzz_cases.py).

Every case must end in a clear error that names the file, or in a load equal
to the original: never a crash, a hang or a silent wrong load. 400 cases by
default (a few seconds); `DUQUANT_FUZZ_SCALE=10` runs ten times as many with
other seeds. bench/fuzz_counts.py records the counts in bench/RESULTS.md.
"""

from __future__ import annotations

import os

import pytest

from fuzz_cases import all_outcomes, counts

SCALE = int(os.environ.get("DUQUANT_FUZZ_SCALE", "1"))


@pytest.mark.parametrize("seed", range(1 if SCALE == 1 else 3))
def test_every_corruption_ends_in_a_named_error_or_a_correct_load(tmp_path, seed):
    outcomes = all_outcomes(tmp_path, scale=SCALE, seed=seed)
    bad = [o for o in outcomes if o.result not in ("clear error", "loaded correctly")]
    assert not bad, "\n".join(f"{o.target} | {o.mutation} | {o.result} | {o.detail}" for o in bad[:20])
    table = counts(outcomes)
    assert sum(table["all"].values()) == 400 * SCALE
    # data-byte flips in a pack file are never loaded: the checksums catch every one
    flips = [o for o in outcomes if o.target == "pack file" and o.mutation.startswith("data flip")]
    assert flips and all(o.result == "clear error" and "does not match its checksum" in o.detail for o in flips)
    # every truncation is an error
    assert all(o.result == "clear error" for o in outcomes if o.mutation.startswith("truncation"))
