"""Sequential (block by block) against one-pass calibration: Gemma-3 270M perplexity, development and test splits.

    python bench/sequential_quality.py [--presets w4a16,w4a8] [--n-calib 16] [--n-dev 24] [--n-test 48]
    python bench/sequential_quality.py --report       # the section of bench/RESULTS.md from the committed lines

For each GPTQ preset, two models from the same float Gemma-3 270M and calibration chunks:

- one-pass: `interop.observe` over the float model, then `interop.quantize_` (every layer's statistics
  come from float inputs);
- sequential: `interop.quantize_sequential` (block k is observed on the outputs of the *quantized*
  blocks before it, as GPTQ's own procedure and llm-compressor's sequential pipeline do).

Both quantize the 7 projections of every block. Every model is scored on two disjoint sets of
held-out 512-token chunks (after BOS): development (where a default is chosen) and test (reported),
drawn with the calibration chunks from one seeded permutation of the corpus (`quality_data.ThreeWaySplit`).
Scores use our float32 kernel paths (`kernel_options(precision="float32")`), so that the comparison is of
the calibration procedures, not of kernel round-off. Intervals: 95% paired bootstrap over chunks
(2000 resamples, seed 0) of the mean per-chunk NLL difference (sequential − one-pass, and each against
float), shown as perplexity ratios `exp(mean diff)`.

Each measurement is one JSON line in bench/sequential_quality.jsonl with the commit; a run from a tree
with uncommitted changes to tracked files is refused unless `--allow-dirty` (such lines are never
reported).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import commit, paired_interval, write_section  # noqa: E402
from quality_data import ThreeWaySplit  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402

RESULTS = HERE / "sequential_quality.jsonl"
SECTION = "Sequential against one-pass calibration (bench/sequential_quality.py)"


def _emit(record: dict, path: Path) -> None:
    line = json.dumps(record)
    print(line[:400], flush=True)
    with path.open("a") as f:
        f.write(line + "\n")


def _quantized(task, config: DuQuantConfig, mode: str, batches: list[torch.Tensor]):
    from interop import observe, quantize_, quantize_sequential

    model = task.float_model().eval()
    t = time.perf_counter()
    if mode == "one-pass":
        with observe(model, task.filter_fn, xtx=config.needs_xtx) as stats:
            with torch.no_grad():
                for ids in batches:
                    model.model(input_ids=ids, use_cache=False)
        layers = quantize_(model, config, task.filter_fn, progress=False, stats=stats)
    else:
        layers = quantize_sequential(model, config, batches, task.filter_fn, progress=False,
                                     run=lambda m, ids: m.model(input_ids=ids, use_cache=False))
    return model, len(layers), time.perf_counter() - t


def measure(presets: list[str], n_calib: int, n_dev: int, n_test: int, seed: int, allow_dirty: bool, out: Path) -> None:
    from quality_models import GemmaTask

    from interop.kernels import kernel_options

    rev = commit()
    if (rev.endswith("+dirty") or rev == "unknown") and not allow_dirty:
        raise SystemExit(f"the tree has uncommitted changes or no commit ({rev}): commit first, or pass --allow-dirty (never reported)")
    task = GemmaTask(seed=seed, n_calib=n_calib, n_eval=n_dev + n_test)
    split = ThreeWaySplit(seed, len(task.chunks), n_calib, n_dev, n_test)
    batches = [task._ids(int(i)) for i in split.calib]
    parts = {"dev": split.dev, "test": split.test}
    base = {"commit": rev, "model": "gemma3-270m", "split": split.describe(), "torch": torch.__version__,
            "kernels": "precision=float32 for scoring; defaults while quantizing"}

    def score(model) -> dict[str, list[float]]:
        with kernel_options(precision="float32"):
            return {k: task.chunk_nll(model, idx).tolist() for k, idx in parts.items()}

    t = time.perf_counter()
    float_nll = score(task.float_model().eval())
    _emit({**base, "kind": "float", "nll": float_nll, "seconds": round(time.perf_counter() - t, 1),
           "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, out)
    for preset in presets:
        config = DuQuantConfig.preset(preset)
        for mode in ("one-pass", "sequential"):
            model, n_layers, q_s = _quantized(task, config, mode, batches)
            t = time.perf_counter()
            nll = score(model)
            _emit({**base, "kind": "quantized", "preset": preset, "mode": mode, "config": config.to_dict(), "layers": n_layers,
                   "quantize_s": round(q_s, 1), "score_s": round(time.perf_counter() - t, 1), "nll": nll,
                   "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, out)
            del model


def report(path: Path = RESULTS, allow_dirty: bool = False) -> str:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    lines = [r for r in lines if allow_dirty or not r["commit"].endswith("+dirty")]
    if not lines:
        raise SystemExit(f"{path} holds no line from a committed tree")
    floats = [r for r in lines if r["kind"] == "float"]
    fl = floats[-1]
    same = [r for r in lines if r["kind"] == "quantized" and r["split"] == fl["split"]]
    cells: dict[tuple[str, str], dict] = {}
    for r in same:
        cells[(r["preset"], r["mode"])] = r
    sp = fl["split"]
    out = [
        f"Gemma-3 270M (float32 from the GGUF), the 7 projections of every block; {sp['n_calib']} calibration chunks, "
        f"{sp['n_dev']} development and {sp['n_test']} test chunks of 512 tokens after BOS (seed {sp['seed']}); "
        f"commits {', '.join(sorted({r['commit'] for r in [fl, *same]}))}. Perplexity ratios with 95% paired "
        "bootstrap intervals over chunks; scored on our float32 kernel paths.",
        "",
        "| preset | split | float ppl | one-pass / float | sequential / float | sequential / one-pass | quantize s (one-pass, sequential) |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset in sorted({p for p, _ in cells}):
        one, seq = cells.get((preset, "one-pass")), cells.get((preset, "sequential"))
        if one is None or seq is None:
            continue
        for part in ("dev", "test"):
            f, o, s = (np.asarray(r["nll"][part]) for r in (fl, one, seq))
            fmt = lambda m, lo, hi: f"{math.exp(m):.4f} [{math.exp(lo):.4f}, {math.exp(hi):.4f}]"  # noqa: E731
            so = paired_interval(s, o)
            mark = "" if so[1] <= 0 <= so[2] else " (separated)"
            out.append(f"| {preset} | {part} | {math.exp(f.mean()):.3f} | {fmt(*paired_interval(o, f))} | {fmt(*paired_interval(s, f))} | "
                       f"{fmt(*so)}{mark} | {one['quantize_s']:.0f}, {seq['quantize_s']:.0f} |")
    out += ["", "An interval that excludes 1 is marked (separated); otherwise the splits cannot tell the two procedures apart."]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="w4a16,w4a8")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-dev", type=int, default=24)
    ap.add_argument("--n-test", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--allow-dirty", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the JSON lines file (default bench/sequential_quality.jsonl)")
    args = ap.parse_args()
    if args.report:
        body = report(args.out, args.allow_dirty)
        print(body)
        if not args.allow_dirty:
            write_section(SECTION, body)
        return
    torch.manual_seed(0)
    measure(args.presets.split(","), args.n_calib, args.n_dev, args.n_test, args.seed, args.allow_dirty, args.out)


if __name__ == "__main__":
    main()
