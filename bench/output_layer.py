"""The quantized output layer (and the embedding tied to it) on Gemma-3 270M: saved bytes and perplexity.

    python bench/output_layer.py [--n-test 24]

Rows: the float model; the float body with the output layer int8 (per row) or int4 (groups of 128),
`interop.output_layer.quantize_output_layer` (the quality the output layer alone costs); the `w4a8`
preset on the 7 projections of every block, without and with `output_layer=4` / `8`
(`interop.quantize_`). Perplexity of the test chunks of `quality_data.ThreeWaySplit` (the split of
bench/sequential_quality.py: seed 0, 16 calibration, 24 development, then test), after BOS, on our
float32 kernel paths, with 95% paired bootstrap intervals over chunks against float. Saved bytes: the
`save_quantized` directory (float32 model from the GGUF; compared with its float32 and bfloat16 parameter bytes, ties counted once). Appends JSON lines to
bench/output_layer.jsonl and writes the section of bench/RESULTS.md; refuses a tree with uncommitted
changes unless `--allow-dirty` (then nothing is written to RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import commit, paired_interval, write_section  # noqa: E402
from quality_data import ThreeWaySplit  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402

RESULTS = HERE / "output_layer.jsonl"
SECTION = "Quantized output layer and tied embedding (bench/output_layer.py)"
ROWS = {
    "float": (None, None),
    "float body, output layer int8": (None, 8),
    "float body, output layer int4 g128": (None, 4),
    "w4a8": ("w4a8", None),
    "w4a8 + output layer int8": ("w4a8", 8),
    "w4a8 + output layer int4 g128": ("w4a8", 4),
}


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-test", type=int, default=24)
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    rev = commit()
    if (rev.endswith("+dirty") or rev == "unknown") and not args.allow_dirty:
        raise SystemExit(f"the tree has uncommitted changes ({rev}): commit first, or pass --allow-dirty")
    from quality_models import GemmaTask

    from interop import observe, quantize_, save_quantized
    from interop.kernels import kernel_options
    from interop.output_layer import quantize_output_layer

    torch.manual_seed(0)
    task = GemmaTask(n_calib=16, n_eval=24 + args.n_test)
    split = ThreeWaySplit(0, len(task.chunks), 16, 24, args.n_test)
    batches = [task._ids(int(i)) for i in split.calib]
    rows = []
    for label, (preset, head_bits) in ROWS.items():
        t = time.perf_counter()
        model = task.float_model().eval()
        if preset is not None:
            config = DuQuantConfig.preset(preset)
            with observe(model, task.filter_fn, xtx=config.needs_xtx) as stats, torch.no_grad():
                for ids in batches:
                    model.model(input_ids=ids, use_cache=False)
            quantize_(model, config, task.filter_fn, progress=False, stats=stats, output_layer=head_bits)
        elif head_bits is not None:
            quantize_output_layer(model, head_bits, 128 if head_bits == 4 else None)
        quantize_s = time.perf_counter() - t
        size = None
        if preset is not None or head_bits is not None:
            with tempfile.TemporaryDirectory() as d:
                save_quantized(model, d)
                size = _dir_bytes(Path(d))
        with kernel_options(precision="float32"):
            nll = task.chunk_nll(model, split.test).tolist()
        rec = {"commit": rev, "row": label, "split": split.describe(), "saved_bytes": size, "quantize_s": round(quantize_s, 1),
               "nll_test": nll, "seconds": round(time.perf_counter() - t, 1)}
        print(json.dumps(rec)[:300], flush=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        rows.append(rec)
        del model
    fl = rows[0]
    float_bytes = sum(t.numel() * 4 for t in {id(t): t for t in task._model.state_dict().values()}.values())  # float32, ties once
    lines = [
        f"Gemma-3 270M (float32 from the GGUF), {fl['split']['n_test']} test chunks of 512 tokens after BOS (ThreeWaySplit "
        f"seed 0), float32 kernel paths; commit {rev}. Perplexity ratio to float with a 95% paired bootstrap interval over chunks.",
        "",
        "| row | saved MB | of the float32 save | of a bf16 save | ppl | ppl / float [95%] |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, lo, hi = paired_interval(r["nll_test"], fl["nll_test"])
        mb = "-" if r["saved_bytes"] is None else f"{r['saved_bytes'] / 1e6:.0f}"
        frac = "-" if r["saved_bytes"] is None else f"{r['saved_bytes'] / float_bytes:.2f}x"
        frac16 = "-" if r["saved_bytes"] is None else f"{r['saved_bytes'] / (float_bytes / 2):.2f}x"
        ppl = math.exp(sum(r["nll_test"]) / len(r["nll_test"]))
        lines.append(f"| {r['row']} | {mb} | {frac} | {frac16} | {ppl:.3f} | {math.exp(m):.4f} [{math.exp(lo):.4f}, {math.exp(hi):.4f}] |")
    body = "\n".join(lines)
    print(body)
    if not rev.endswith("+dirty"):
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
