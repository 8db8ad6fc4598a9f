"""Seeded corruptions of saved quantized models (tests/fuzz_saved_models.py), a CI subset.

56 cases (24 of the record JSON, 8 of each other kind: safetensors headers, data
bytes, consistent tensor rewrites, the shard index), each loaded and run in a forked
child of one worker process. Every case must end in an error that names what is
wrong, or in outputs bit-identical to the unmutated save's: never a crash, a
hang, a silent wrong load or an error naming nothing. The unmutated saves must
run under every kernel path. About 30 s. `bench/fuzz_counts.py` runs 1000+.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_saved_models import ALL_PATHS, CYCLE, FAILURES, KINDS, Outcome, Reference, cases_for, run_cases

N_CASES = 56  # 8 turns of CYCLE: 24 record, 8 of each other kind
SEED = 0


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory) -> tuple[Reference, list[Outcome]]:
    return run_cases(cases_for(N_CASES, SEED), Path(tmp_path_factory.mktemp("fuzz_saved")))


def _report(bad: list[Outcome]) -> str:
    lines = [f"{len(bad)} failing case(s); rerun one with `python tests/fuzz_saved_models.py --case SEED:INDEX`:"]
    return "\n".join(lines + [o.line()[:1500] for o in bad])


def test_fuzzer_knows_every_kernel_path():
    from interop import kernels

    assert sorted(ALL_PATHS) == sorted(kernels.PATHS)


def test_unmutated_saves_run_under_every_kernel_path(fuzz_run):
    reference, _ = fuzz_run
    assert not reference.broken, "\n".join(f"kernel path {p}: {what}" for p, what in reference.broken.items())


@pytest.mark.parametrize("kind", KINDS)
def test_every_mutation_ends_in_a_named_error_or_an_exact_load(fuzz_run, kind):
    _, outcomes = fuzz_run
    mine = [o for o in outcomes if o.case.kind == kind]
    assert len(mine) == N_CASES // len(CYCLE) * CYCLE.count(kind)
    bad = [o for o in mine if o.result in FAILURES]
    assert not bad, _report(bad)
