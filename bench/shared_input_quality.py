"""One input transform per input group against one per layer: quality, paired, from the quality harness's lines.

    python bench/shared_input_quality.py [--no-write]

bench/shared_input_quality.jsonl holds lines of `bench/quality.py` (schema 2, committed trees) that
quantized the same preset twice, on the same split and kernels: with one input transform per group of
layers that read one input (the line's `input_groups` > 0) and with every layer's own (`input_groups`
0). They were written while the rows had other names (commits 2acf921, 7e2fc61: "presets" was the
joint fit, "presets-per-layer" the per-layer one; the count of groups tells them apart). Pairs are
matched by model, column, kernels and the config's Hadamard seed; each cell is the paired
difference over items with a 95% bootstrap interval (`common.paired_interval`): the perplexity ratio
joint / per-layer for Gemma-3 270M, the cosine difference for MiniLM. Writes a section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import paired_interval, table, write_section  # noqa: E402

LINES = HERE / "shared_input_quality.jsonl"
SECTION = "One input transform per group: quality (bench/shared_input_quality.py)"


def pairs(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{(model, column, kernels, seed): {"joint": line, "alone": line}}, the latest line of each."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r.get("kind") != "result" or "per_item" not in r or r["commit"].endswith("+dirty"):
            continue
        key = (r["model"], r["column"], r["kernels"], (r.get("config") or {}).get("seed", 0))
        out.setdefault(key, {})["joint" if r.get("input_groups", 0) > 0 else "alone"] = r
    return {k: v for k, v in out.items() if len(v) == 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    records = [json.loads(line) for line in LINES.read_text().splitlines() if line.strip()]
    rows = []
    for (model, column, kernels, seed), p in sorted(pairs(records).items()):
        for part in p["joint"]["per_item"]:
            if part not in p["alone"]["per_item"]:
                continue
            a, b = np.asarray(p["joint"]["per_item"][part]), np.asarray(p["alone"]["per_item"][part])
            m, lo, hi = paired_interval(a, b)
            if model == "gemma":
                value = f"{math.exp(m):.4f} [{math.exp(lo):.4f}, {math.exp(hi):.4f}]"
                joint, alone = math.exp(a.mean()), math.exp(b.mean())
            else:
                value = f"{m:+.5f} [{lo:+.5f}, {hi:+.5f}]"
                joint, alone = a.mean(), b.mean()
            verdict = "not separated" if lo <= 0 <= hi else ("joint worse" if (m > 0) == (model == "gemma") else "joint better")
            rows.append([model, column, str(seed), part, str(p["joint"]["input_groups"]), f"{alone:.4f}", f"{joint:.4f}", value, verdict,
                         ", ".join(sorted({p["joint"]["commit"], p["alone"]["commit"]}))])
    body = (
        "Gemma-3 270M (perplexity, 40 development chunks) and MiniLM (mean cosine, 384 development / 768 test sentences), "
        "each preset quantized twice in one run of `bench/quality.py` (default kernels): every layer's own input transform, "
        "and one per group of layers that read one input (q/k/v, gate/up; `quantize_(input_groups=\"auto\")`). "
        "Gemma's w8a8 needs no statistics, so its per-layer line is the plain preset and its joint line observed only to find the groups.\n\n"
        + table(["model", "preset", "Hadamard seed", "part", "groups", "per layer", "joint", "joint vs per layer [95%]", "", "commits"], rows)
    )
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
