"""The quantized output layer (and the embedding tied to it) on Gemma-3 270M: saved bytes and perplexity.

    python bench/output_layer.py [--n-test 24] [--dev [--variants A,B]] | --report COMMIT

Rows: the float model; the float body with the output layer as `quantize_(output_layer=8)` and
`output_layer=4` make it (int8 per row; int4 in groups of 32 rounded with GPTQ on its input observed
over the calibration chunks: `interop.output_layer.output_layer_recipe`), the quality the output layer
alone costs; the `w4a8` preset on the 7 projections of every block, without and with `output_layer=4` /
`8` (`interop.quantize_`, the head observed in the same pass as the projections). Perplexity of the test chunks of `quality_data.ThreeWaySplit` (the split of
bench/sequential_quality.py: seed 0, 16 calibration, 24 development, then test), after BOS, on our
float32 kernel paths, with 95% paired bootstrap intervals over chunks against float. Saved bytes: the
`save_quantized` directory (float32 model from the GGUF; compared with its float32 and bfloat16 parameter bytes, ties counted once). Appends JSON lines to
bench/output_layer.jsonl and writes the section of bench/RESULTS.md; refuses a tree with uncommitted
changes unless `--allow-dirty` (then nothing is written to RESULTS.md).

`--dev`: the float body with its output layer in DEV_VARIANTS' widths, group sizes and roundings (round to
nearest, or GPTQ on the output layer's observed input) and activations (float, or int8 per token: `act_bits=8`),
scored on the development chunks, where a choice between them is made; the test split is left for the rows
above. `--variants`: only these DEV_VARIANTS (comma-separated labels), beside the float model.
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
    "float body, output layer int4 g32 gptq": (None, 4),
    "w4a8": ("w4a8", None),
    "w4a8 + output layer int8": ("w4a8", 8),
    "w4a8 + output layer int4 g32 gptq": ("w4a8", 4),
}
# `--dev`: the float body's output layer alone quantized, scored on the development chunks (where choices are made):
# {label: (bits, group size, rounding method, activation bits)}; GPTQ observes the output layer's input on the
# calibration chunks; activation bits 8: its input quantized to int8 per token at run time.
DEV_VARIANTS = {
    "int4 g128 rtn": (4, 128, "rtn", 16),
    "int4 g128 gptq": (4, 128, "gptq", 16),
    "int4 g64 gptq": (4, 64, "gptq", 16),
    "int4 g32 rtn": (4, 32, "rtn", 16),
    "int4 g32 gptq": (4, 32, "gptq", 16),
    "int4 g32 gptq a8": (4, 32, "gptq", 8),
    "int8 rtn": (8, None, "rtn", 16),
    "int8 rtn a8": (8, None, "rtn", 8),
}
DEV_SECTION = "Output layer at 4 bits: group size and rounding, development split (bench/output_layer.py --dev)"


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-test", type=int, default=24)
    ap.add_argument("--allow-dirty", action="store_true")
    ap.add_argument("--report", metavar="COMMIT", help="render the lines of COMMIT from bench/output_layer.jsonl; measure nothing")
    ap.add_argument("--dev", action="store_true", help="score DEV_VARIANTS of the 4-bit output layer on the development split")
    ap.add_argument("--variants", default=None, help="with --dev: only these DEV_VARIANTS labels, comma-separated")
    args = ap.parse_args()
    variants = DEV_VARIANTS
    if args.variants is not None:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in DEV_VARIANTS]
        if unknown or not wanted:
            raise SystemExit(f"--variants: unknown {unknown or args.variants!r}; the variants are {list(DEV_VARIANTS)}")
        variants = {v: DEV_VARIANTS[v] for v in wanted}
    if args.report:
        return report(args.report)
    rev = commit()
    if (rev.endswith("+dirty") or rev == "unknown") and not args.allow_dirty:
        raise SystemExit(f"the tree has uncommitted changes ({rev}): commit first, or pass --allow-dirty")
    if args.dev:
        return dev_variants(rev, args.n_test, variants)
    from quality_models import GemmaTask

    from interop import observe, quantize_, save_quantized
    from interop.kernels import kernel_options
    from interop.output_layer import find_output_layer, output_layer_recipe, quantize_output_layer

    torch.manual_seed(0)
    task = GemmaTask(n_calib=16, n_eval=24 + args.n_test)
    split = ThreeWaySplit(0, len(task.chunks), 16, 24, args.n_test)
    batches = [task._ids(int(i)) for i in split.calib]
    rows = []
    for label, (preset, head_bits) in ROWS.items():
        t = time.perf_counter()
        model = task.float_model().eval()
        config = DuQuantConfig.preset(preset) if preset is not None else None
        stats = None
        if config is not None or head_bits == 4:  # the head's XᵀX for GPTQ: the batches run through the whole model
            keep = task.filter_fn if config is not None else (lambda n, m: False)
            with observe(model, keep, xtx=config is not None and config.needs_xtx, output_layer=head_bits == 4) as stats, \
                    torch.no_grad():
                for ids in batches:
                    (model if head_bits == 4 else model.model)(input_ids=ids, use_cache=False)
        if config is not None:
            quantize_(model, config, task.filter_fn, progress=False, stats=stats, output_layer=head_bits)
        elif head_bits is not None:
            head = find_output_layer(model)
            group_size, method = output_layer_recipe(head_bits, stats, head)
            quantize_output_layer(model, head_bits, group_size, method=method, stats=stats, head=head)
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
    write_report(rows, _float_bytes(task._model), rev)


def dev_variants(rev: str, n_test: int, variants: dict[str, tuple[int, int | None, str, int]]) -> None:
    """The float model and each of `variants` (DEV_VARIANTS) output layers (float body) on the development chunks; JSON lines
    (`"dev_variant"`) appended to bench/output_layer.jsonl, the table to bench/RESULTS.md."""
    from quality_models import GemmaTask

    from interop import observe
    from interop.kernels import kernel_options
    from interop.output_layer import find_output_layer, quantize_output_layer

    torch.manual_seed(0)
    task = GemmaTask(n_calib=16, n_eval=24 + n_test)
    split = ThreeWaySplit(0, len(task.chunks), 16, 24, n_test)
    batches = [task._ids(int(i)) for i in split.calib]
    recs = []
    for label, spec in {"float": None, **variants}.items():
        t = time.perf_counter()
        model = task.float_model().eval()
        if spec is not None:
            bits, group, method, act_bits = spec
            stats = None
            if method == "gptq":
                head = find_output_layer(model)
                with observe(model, lambda n, m: n == head, xtx=True) as stats, torch.no_grad():
                    for ids in batches:
                        model(input_ids=ids, use_cache=False)
            quantize_output_layer(model, bits, group, method=method, stats=stats, act_bits=act_bits)
        with kernel_options(precision="float32"):
            nll = task.chunk_nll(model, split.dev).tolist()
        rec = {"commit": rev, "dev_variant": label, "split": split.describe(), "part": "dev", "nll_dev": nll,
               "seconds": round(time.perf_counter() - t, 1)}
        print(json.dumps(rec)[:200], flush=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        recs.append(rec)
        del model
    fl = recs[0]
    lines = [
        f"Gemma-3 270M, float body, the output layer (and the embedding tied to it) quantized alone; {len(fl['nll_dev'])} "
        f"development chunks of 512 tokens after BOS (ThreeWaySplit seed 0), float32 kernel paths; commit {rev}. "
        "GPTQ observes the output layer's input on the 16 calibration chunks.",
        "",
        "| output layer | ppl | ppl / float [95%] |",
        "|---|---|---|",
    ]
    lines += [f"| {r['dev_variant']} | {_quality_cells(r['nll_dev'], fl['nll_dev'])} |" for r in recs]
    some = list(variants) != list(DEV_VARIANTS)  # a subset gets its own section, beside the whole table's
    _publish(f"{DEV_SECTION[: DEV_SECTION.index(' (')]}: {', '.join(variants)} (bench/output_layer.py --dev --variants)" if some else DEV_SECTION, lines, rev)


def _quality_cells(nll: list[float], float_nll: list[float]) -> str:
    """"ppl | ppl / float [95% paired interval]" of per-chunk NLLs against float's."""
    m, lo, hi = paired_interval(nll, float_nll)
    return f"{math.exp(sum(nll) / len(nll)):.3f} | {math.exp(m):.4f} [{math.exp(lo):.4f}, {math.exp(hi):.4f}]"


def _publish(section: str, lines: list[str], rev: str) -> None:
    """Prints the table and writes it as `section` of bench/RESULTS.md unless `rev` is dirty."""
    body = "\n".join(lines)
    print(body)
    if not rev.endswith("+dirty"):
        write_section(section, body)


def _float_bytes(model: torch.nn.Module) -> int:
    """The float model's tensor bytes at float32, a tied weight counted once (`parameters()` yields it once)."""
    return sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])


def write_report(rows: list[dict], float_bytes: int, rev: str, note: str = "") -> None:
    """The table of `rows` (the float row first), printed and written to bench/RESULTS.md unless `rev` is dirty."""
    fl = rows[0]
    lines = [
        f"Gemma-3 270M (float32 from the GGUF), {fl['split']['n_test']} test chunks of 512 tokens after BOS (ThreeWaySplit "
        f"seed 0), float32 kernel paths; commit {rev}. Perplexity ratio to float with a 95% paired bootstrap interval over chunks. "
        f"Saved bytes against the float model's tensors ({float_bytes / 1e6:.0f} MB at float32, the tied weight once; half that at bfloat16).{note}",
        "",
        "| row | saved MB | of the float32 bytes | of the bf16 bytes | ppl | ppl / float [95%] |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mb = "-" if r["saved_bytes"] is None else f"{r['saved_bytes'] / 1e6:.0f}"
        frac = "-" if r["saved_bytes"] is None else f"{r['saved_bytes'] / float_bytes:.2f}x"
        frac16 = "-" if r["saved_bytes"] is None else f"{r['saved_bytes'] / (float_bytes / 2):.2f}x"
        lines.append(f"| {r['row']} | {mb} | {frac} | {frac16} | {_quality_cells(r['nll_test'], fl['nll_test'])} |")
    _publish(SECTION, lines, rev)


def report(rev: str) -> None:
    """Renders the committed lines of commit `rev` (every row of ROWS measured there) without measuring."""
    from quality_models import GemmaTask

    found = {}
    for line in RESULTS.read_text().splitlines():
        rec = json.loads(line)
        if rec["commit"] == rev and rec.get("row") in ROWS:
            found[rec["row"]] = rec
    missing = [r for r in ROWS if r not in found]
    if missing:
        raise SystemExit(f"bench/output_layer.jsonl has no line of commit {rev} for {missing}")
    write_report([found[r] for r in ROWS], _float_bytes(GemmaTask(n_calib=1, n_eval=1)._model), rev,
                 " Rendered by `--report` from the lines of that commit in bench/output_layer.jsonl (the date above is the rendering's).")


if __name__ == "__main__":
    main()
