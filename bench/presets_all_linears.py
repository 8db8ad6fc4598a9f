"""The presets on every nn.Linear of real models: does observe + quantize_ go through, and how good is it?

    python bench/presets_all_linears.py --models minilm
    python bench/presets_all_linears.py --models gemma --gemma-filters all,proj --saveload

For all-MiniLM-L6-v2 (every `nn.Linear`: the encoder and the BERT pooler) and
Gemma-3 270M (`all`: the default filter `None` of `interop.quantize_`, i.e. the 7
projections of every decoder layer and the tied 262k-word output layer `lm_head`;
`proj`: the 7 projections only), it observes the float model on a small
calibration set (with XᵀX when the preset needs it), quantizes it with each
preset and measures, on held-out data, MiniLM's mean cosine to the float
embeddings and Gemma's perplexity (512-token chunks after BOS). Each cell records
the layers quantized, the time of each step and any error (a failure does not
stop the run). `--saveload` also saves the Gemma W8A8 model (filter `None`) with
`interop.save_quantized`, loads it into a model freshly built from the same config
with `interop.load_quantized`, and compares the two. Results: the model's section
of bench/presets_all_linears.md (rewritten after every cell). Data and models:
bench/quality_data.py and bench/quality_models.py. Run it under
`flock /tmp/duquant-cpu.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402
from quality_models import GEMMA_PROJ, GemmaTask, MiniLMTask  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402
from duquant_jax.config import PRESETS  # noqa: E402
from duquant_jax.peak_memory import peak_rss_gib  # noqa: E402

OUT = Path(__file__).with_name("presets_all_linears.md")
FilterFn = Callable[[str, nn.Module], bool]


def _proj_only(name: str, module: nn.Module) -> bool:
    """Gemma's 7 projections of every decoder layer (the quality benchmark's filter)."""
    return isinstance(module, nn.Linear) and re.search(GEMMA_PROJ, name) is not None


FILTERS: dict[str, FilterFn | None] = {"all": None, "proj": _proj_only}


class Timer(dict):
    """{step: seconds}; `with timer("quantize_s"):` adds the block's wall time."""

    def __call__(self, key: str):
        timer = self

        class _Block:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer[key] = timer.get(key, 0.0) + time.perf_counter() - self.t

        return _Block()


def _gemma_full_calibration(task: GemmaTask) -> Callable[[nn.Module], None]:
    """Calibration through the whole causal LM (so that `lm_head` sees its inputs too)."""

    @torch.no_grad()
    def run(model: nn.Module) -> None:
        for i in task.split.calib:
            model(input_ids=task._ids(i), use_cache=False)

    return run


def quantize_cell(task, preset: str, filter_fn: FilterFn | None, calibrate_fn: Callable[[nn.Module], None],
                  shared=None) -> tuple[nn.Module | None, dict]:
    """Observe (unless `shared` statistics are given) + quantize_ a float copy of `task`'s model with `preset`.

    Never raises. Returns (the quantized model or None on error, record with layers, times, error).
    """
    from interop import observe, quantize_

    config = DuQuantConfig.preset(preset)
    times, record = Timer(), {"preset": preset}
    model = None
    try:
        model = task.float_model()
        stats = shared if config.needs_stats else None
        if config.needs_stats and shared is None:
            with times("observe_s"), observe(model, filter_fn, xtx=config.needs_xtx) as stats:
                calibrate_fn(model)
        with times("quantize_s"):
            record["layers"] = len(quantize_(model, config, filter_fn, progress=False, stats=stats))
    except Exception as e:  # record it and go on with the next cell
        record["error"] = f"{type(e).__name__}: {e}"[:400]
        record["traceback"] = traceback.format_exc(limit=4)
        model = None
    record["times"] = dict(times)
    return model, record


def evaluate_cell(task, model: nn.Module, record: dict) -> None:
    """Adds `value` (the task's metric) and `eval_s` to `record`; an error is recorded."""
    t = time.perf_counter()
    try:
        record["value"] = task.evaluate(model)
    except Exception as e:
        record["error"] = f"evaluate: {type(e).__name__}: {e}"[:400]
    record["times"]["eval_s"] = time.perf_counter() - t


def run_model(task, label: str, filter_fn: FilterFn | None, calibrate_fn, presets: list[str], on_record, shared=None) -> None:
    for preset in presets:
        model, record = quantize_cell(task, preset, filter_fn, calibrate_fn, shared)
        if model is not None:
            evaluate_cell(task, model, record)
        record.update(filter=label, peak_rss_gb=round(peak_rss_gib(), 2))
        del model
        on_record(record)


# ---- Gemma: the tied lm_head through save_quantized / load_quantized ---------------------


@torch.no_grad()
def gemma_saveload(task: GemmaTask, preset: str = "w8a8") -> dict:
    """quantize_ (filter None) -> save_quantized -> load_quantized into a fresh model of the same config.

    Returns what was observed: lm_head's type and tying before and after, the largest
    logit difference between the saved and the loaded model on one held-out chunk,
    whether the loaded embedding equals the float one, and any error.
    """
    from transformers import AutoModelForCausalLM

    from interop import DuQuantLinear, load_quantized, observe, quantize_, save_quantized

    out: dict = {"preset": preset}
    config = DuQuantConfig.preset(preset)
    t0 = time.perf_counter()
    try:
        model = task.float_model()
        emb = model.get_input_embeddings().weight.detach().clone()
        stats = None
        if config.needs_stats:
            with observe(model, None, xtx=config.needs_xtx) as stats:
                _gemma_full_calibration(task)(model)
        out["layers"] = len(quantize_(model, config, None, progress=False, stats=stats))
        out["lm_head_after_quantize"] = type(model.lm_head).__name__
        out["embed_equal_float_after_quantize"] = bool(torch.equal(model.get_input_embeddings().weight, emb))
        ids = task._ids(int(task.split.eval[0]))
        ref = model(input_ids=ids, use_cache=False).logits
        with tempfile.TemporaryDirectory() as d:
            save_quantized(model, d)
            out["saved_files"] = sorted(p.name for p in Path(d).iterdir())
            out["saved_mb"] = round(sum(p.stat().st_size for p in Path(d).iterdir()) / 2**20, 1)
            torch.manual_seed(1)
            fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
            out["fresh_tied_before_load"] = fresh.lm_head.weight is fresh.get_input_embeddings().weight
            load_quantized(fresh, d)
        out["lm_head_after_load"] = type(fresh.lm_head).__name__
        out["lm_head_is_duquant"] = isinstance(fresh.lm_head, DuQuantLinear)
        out["embed_equal_float_after_load"] = bool(torch.equal(fresh.get_input_embeddings().weight, emb))
        got = fresh(input_ids=ids, use_cache=False).logits
        out["max_abs_logit_diff"] = float((got - ref).abs().max())
        out["chunk_ppl_saved"] = _chunk_ppl(ref, ids)
        out["chunk_ppl_loaded"] = _chunk_ppl(got, ids)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:600]
        out["traceback"] = traceback.format_exc(limit=6)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _chunk_ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """logits (1, T, V), ids (1, T): perplexity of tokens 1.. given the previous ones."""
    nll = nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="mean")
    return float(math.exp(float(nll)))


# ---- report ------------------------------------------------------------------------------


def _fmt_times(t: dict) -> str:
    return ", ".join(f"{k[:-2]} {v:.1f}" for k, v in t.items())


def render(model: str, metric: str, describe: dict, float_value: float | None, float_eval_s: float, records: list[dict],
           saveload: dict | None, versions: str) -> str:
    rows = [["float", "-", "-", "-", f"{float_value:.4f}" if float_value is not None else "-", f"eval {float_eval_s:.1f}", "-", ""]]
    for r in records:
        value = f"{r['value']:.4f}" if "value" in r else "-"
        rows.append([f"`{r['preset']}`", r["filter"], str(r.get("layers", "-")), "yes" if "error" not in r else "**no**", value,
                     _fmt_times(r["times"]), f"{r['peak_rss_gb']:.1f}", r.get("error", "").replace("|", "\\|").replace("\n", " ")])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"Measured {stamp} on {versions}.", "", f"Split: {describe}.", "",
            table(["preset", "filter", "layers", "ok", metric, "seconds", "peak RSS GB (process)", "error"], rows)]
    if saveload is not None:
        body += ["", "Save/load of the tied output layer (`quantize_` filter None -> `save_quantized` -> `load_quantized` into "
                 "`AutoModelForCausalLM.from_config(config)`):", "", "```", *[f"{k}: {v}" for k, v in saveload.items() if k != "traceback"], "```"]
        if "traceback" in saveload:
            body += ["", "```", saveload["traceback"].strip(), "```"]
    return "\n".join(body)


def write_section(name: str, body: str, path: Path = OUT) -> None:
    """Replaces (or appends) `## name` in `path`, atomically."""
    section = f"## {name}\n\n{body.strip()}\n"
    head = ("# Presets on every nn.Linear (bench/presets_all_linears.py)\n\n"
            "Observe + `quantize_(model, DuQuantConfig.preset(p), filter_fn, stats=stats)` on real models; measured numbers only.\n")
    text = path.read_text() if path.exists() else head
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _versions() -> str:
    import transformers

    return f"{machine()}, transformers {transformers.__version__}, load average {os.getloadavg()[0]:.1f}"


# ---- main --------------------------------------------------------------------------------


def observe_once(task, calibrate_fn: Callable[[nn.Module], None], filter_fn: FilterFn | None = None):
    """(statistics with XᵀX of the filter's nn.Linear layers, seconds): one observe pass that every preset reuses."""
    from interop import observe

    model = task.float_model()
    t = time.perf_counter()
    with observe(model, filter_fn, xtx=True) as stats:
        calibrate_fn(model)
    return stats, time.perf_counter() - t


def _bench(task, name: str, metric: str, filters: list[tuple[str, FilterFn | None, Callable]], presets: list[str], saveload: bool,
           shared_calibration: Callable | None = None, shared_filter: FilterFn | None = None) -> None:
    t = time.perf_counter()
    float_value = task.evaluate(task.float_model())
    float_eval_s = time.perf_counter() - t
    print(f"{name} float {metric} {float_value:.4f} ({float_eval_s:.1f} s)", flush=True)
    records: list[dict] = []
    state = {"saveload": None}
    shared, notes = None, ""
    if shared_calibration is not None:
        shared, observe_s = observe_once(task, shared_calibration, shared_filter)
        what = "filter None, every nn.Linear, whole causal LM" if shared_filter is None else "the 7 projections, decoder only"
        notes = (f"Statistics: one observe pass ({what}, xtx=True) of {observe_s:.1f} s, "
                 "reused by every preset and filter (so the cells' times have no observe step).")
        print(notes, flush=True)

    def flush() -> None:
        body = render(name, metric, task.describe(), float_value, float_eval_s, records, state["saveload"], _versions())
        write_section(name, body.replace("\n\n|", f"\n\n{notes}\n\n|", 1) if notes else body)

    def on_record(r: dict) -> None:
        print({k: v for k, v in r.items() if k != "traceback"}, flush=True)
        if "traceback" in r:
            print(r["traceback"], flush=True)
        records.append(r)
        flush()

    for label, filter_fn, calibrate_fn in filters:
        run_model(task, label, filter_fn, calibrate_fn, presets, on_record, shared)
    if saveload:
        state["saveload"] = gemma_saveload(task)
        print(state["saveload"], flush=True)
        flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="minilm,gemma")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--gemma-filters", default="all,proj", help="'all' (filter None, lm_head included) and/or 'proj'")
    p.add_argument("--minilm-calib", type=int, default=64, help="calibration sentences")
    p.add_argument("--minilm-eval", type=int, default=256, help="held-out sentences")
    p.add_argument("--gemma-calib", type=int, default=8, help="calibration chunks of 512 tokens")
    p.add_argument("--gemma-eval", type=int, default=8, help="held-out chunks of 512 tokens")
    p.add_argument("--saveload", action="store_true", help="Gemma W8A8 (filter None) through save_quantized/load_quantized")
    p.add_argument("--observe-once", action="store_true", help="Gemma: one observe pass (filter None, xtx) for every preset and filter")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    presets = [p for p in args.presets.split(",") if p]  # "" runs no cell (e.g. only --saveload)
    for m in args.models.split(","):
        if m == "minilm":
            task = MiniLMTask(seed=0, n_calib=args.minilm_calib, n_eval=args.minilm_eval)
            _bench(task, "MiniLM (all-MiniLM-L6-v2), every nn.Linear", "mean cosine", [("all", None, task.run_calibration)], presets, False)
        elif m == "gemma":
            task = GemmaTask(seed=0, n_calib=args.gemma_calib, n_eval=args.gemma_eval)
            filters = []
            for f in [f for f in args.gemma_filters.split(",") if f]:
                calib = _gemma_full_calibration(task) if f == "all" else task.run_calibration
                filters.append((f, FILTERS[f], calib))
            name = f"Gemma-3 270M ({args.gemma_calib} calibration / {args.gemma_eval} held-out chunks; filters: {args.gemma_filters or '-'})"
            lm_head = any(label == "all" for label, *_ in filters)
            once = None if not (args.observe_once and presets) else _gemma_full_calibration(task) if lm_head else task.run_calibration
            _bench(task, name, "perplexity", filters, presets, args.saveload, once, None if lm_head else _proj_only)
        else:
            raise SystemExit(f"--models: unknown model {m!r}; choose from minilm, gemma")


if __name__ == "__main__":
    main()
