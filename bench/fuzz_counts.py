"""Counts of the corruption fuzz (tests/fuzz_cases.py): tried / clear error / loaded correctly / silent wrong.

    python bench/fuzz_counts.py [--scale 10] [--seeds 1] [--no-write]

Runs `--scale` times the default test's 400 cases (200 pack-file, 100
checkpoint-index, 100 `.npz`) for each seed and writes the counts to
bench/RESULTS.md. A silent wrong load, a crash or a hang fails the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import table, write_section  # noqa: E402
from fuzz_cases import OUTCOMES, all_outcomes, counts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
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
        sys.exit(1)


if __name__ == "__main__":
    main()
