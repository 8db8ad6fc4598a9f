"""Counts of the corruption fuzz: pack files (tests/fuzz_cases.py) and saved quantized models
(tests/fuzz_saved_models.py): tried / each outcome.

    python bench/fuzz_counts.py [--scale 10] [--seeds 1] [--saved-cases 1000] [--saved-seed 100] [--no-write]
    python bench/fuzz_counts.py --skip-packs --saved-cases 300 --no-write      # the saved-model part only

Pack files: runs `--scale` times the default test's 400 cases (200 pack-file,
100 checkpoint-index, 100 `.npz`) for each seed. Saved models: `--saved-cases`
cases of seed `--saved-seed` over every mutation kind (the CI subset,
tests/test_fuzz_saved_models.py, runs 56 of seed 0), each loaded and run in a
forked child; 0 skips them. Writes both tables to bench/RESULTS.md (unless
`--no-write`) and prints every failure. A silent wrong load, a crash, a hang
or an unnamed error fails the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import table, write_section  # noqa: E402
from fuzz_cases import OUTCOMES, all_outcomes, counts  # noqa: E402

import fuzz_saved_models as saved  # noqa: E402


def saved_model_counts(n: int, seed: int, write: bool, log: Path | None = None) -> int:
    """Runs `n` saved-model cases of `seed` (every kind, "values" included); prints (and writes) the
    table of outcomes by mutation kind and every failure, and with `log` writes every outcome to it as
    JSON lines. Returns the number of failures (a broken kernel path on the unmutated save counts)."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        reference, outcomes = saved.run_cases(saved.cases_for(n, seed, saved.ALL_CYCLE), Path(tmp))
    wall = time.perf_counter() - t
    if log is not None:
        log.write_text("".join(json.dumps({**dataclasses.asdict(o), "label": o.case.label}) + "\n" for o in outcomes))
    child_s = sum(o.seconds for o in outcomes)
    mutators: dict[str, Counter] = {}
    bases: dict[str, Counter] = {}
    for o in outcomes:
        mutators.setdefault(o.mutation.split(":")[0], Counter())[o.result] += 1
        bases.setdefault(f"{o.case.kind} ({o.case.base})", Counter())[o.result] += 1
    groups = {**dict(sorted(mutators.items())), **dict(sorted(bases.items())), **saved.counts(outcomes)}
    rows = [[k, str(sum(c.values()))] + [str(c[r]) for r in saved.OUTCOMES] for k, c in groups.items()]
    broken = "".join(f"\n\nKernel path `{p}` fails on the unmutated save, so it is left out of the cases: {w[:200]}" for p, w in reference.broken.items())
    body = (
        f"`python bench/fuzz_counts.py --saved-cases {n} --saved-seed {seed}` ({wall:.0f} s; {len(outcomes) / max(child_s, 1e-9):.1f} "
        f"cases/s in the children, {len(outcomes) / wall:.1f} cases/s with the mutations; the CI subset runs 56 cases of seed 0). "
        "Seeded corruptions of a four-layer quantized model (W8A8, W4A8, W4A16 presets and SPEC's default) saved "
        "unsharded and in 5 shards, each loaded with `load_quantized` into a fresh model in a forked child and run "
        f"on 4x16 tokens and one token under the kernel paths {', '.join(reference.plans)}. Named error: the load "
        "or forward raised naming a file, layer, tensor or field; loaded exactly right: bit-identical outputs; "
        "undetectable edit: an in-range value edit with checksums recomputed (the \"values\" kind, not a failure)."
        + broken + "\n\n" + table(["mutation", "tried", *saved.OUTCOMES], rows)
    )
    print(body)
    if write:
        write_section("Corrupted saved models (bench/fuzz_counts.py)", body)
    bad = [o for o in outcomes if o.result in saved.FAILURES]
    for o in bad:
        print(o.line()[:1200])
    return len(bad) + len(reference.broken)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--saved-cases", type=int, default=1000, help="saved-model cases (0: none)")
    ap.add_argument("--saved-seed", type=int, default=100)
    ap.add_argument("--saved-log", type=Path, help="write every saved-model outcome to this JSON-lines file")
    ap.add_argument("--skip-packs", action="store_true", help="only the saved-model part")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    failed = saved_model_counts(args.saved_cases, args.saved_seed, not args.no_write, args.saved_log) if args.saved_cases else 0
    if args.skip_packs:
        sys.exit(1 if failed else 0)
    t = time.perf_counter()
    outcomes = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            outcomes += all_outcomes(Path(tmp), scale=args.scale, seed=100 + seed)
    by_target = counts(outcomes)
    kinds: dict[str, Counter] = {}
    for o in outcomes:
        kinds.setdefault(f"{o.target}: {o.mutation.split(':')[0]}", Counter())[o.result] += 1
    rows = [[k, str(sum(c.values()))] + [str(c[r]) for r in OUTCOMES] for k, c in {**kinds, **by_target}.items()]
    body = (
        f"`python bench/fuzz_counts.py --scale {args.scale} --seeds {args.seeds}` ({time.perf_counter() - t:.0f} s; "
        "seeds 100.., the default test run uses seed 0 at scale 1: 400 cases). Seeded corruptions of a two-layer pack "
        "file (loaded with `load_packs`), transformers' index JSON of a two-shard checkpoint (`Checkpoint` and every "
        "tensor read through it) and an origin-format `.npz` layer (`duquant_jax.npz.pack_from_npz`). Clear error: the "
        "module's own error, naming the file; loaded correctly: exactly the original contents.\n\n"
        + table(["corruption", "tried", *OUTCOMES], rows)
    )
    print(body)
    bad = sum(by_target["all"][r] for r in ("silent wrong", "crash", "hang"))
    if not args.no_write:
        write_section("Corrupted files (bench/fuzz_counts.py)", body)
    if bad:
        for o in outcomes:
            if o.result in ("silent wrong", "crash", "hang"):
                print(o)
    if bad or failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
