"""Quality of quantized real models, offline: Gemma-3 270M perplexity and all-MiniLM-L6-v2 cosine.

    python bench/quality.py --models minilm,gemma --configs presets,baselines     # measure (committed tree)
    python bench/quality.py --configs w4a4-candidates --bits W4A4 --score default=dev  # choose on dev
    python bench/quality.py --report            # table -> bench/RESULTS.md, plot -> bench/quality.png

Each corpus is cut by one seeded permutation into three disjoint parts
(`quality_data.ThreeWaySplit`): calibration (the observe pass, GPTQ, activation
calibration), development (every choice: presets, clip ratios, alpha, block sizes)
and test (only the report). For each model, row (`quality_rows.py`) and bit-width
column, a cell builds the float model, observes the calibration data when the
config needs statistics, quantizes with `interop.quantize_` (the 7 projections of
every Gemma layer, every Linear of MiniLM), calibrates static activation schemes,
and scores the held-out parts item by item under each kernel mode of `--score`:
`default` (what a user gets: autotuner on, `precision="any"`) and `float32`
(autotuner off, float32 or exact integer paths only). One JSON line per (cell,
kernel mode) is appended as soon as it is measured, with the per-item values
(chunk NLLs, sentence cosines), the split, the kernel options and the commit;
a tree with uncommitted changes is refused unless `--allow-dirty`, and such lines
never reach the report. `--report` renders the latest committed line of each
cell with 95% paired bootstrap intervals over items (`common.paired_interval`)
against the float model and against the best peer row of the same bit widths
(`bench/peers.py`, whose lines live in bench/peers.jsonl).
Run it under `flock /tmp/duquant-cpu.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, paired_interval, table, write_section  # noqa: E402
from quality_rows import BITS, LABELS, LISTS, ROWS, Row, select  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "quality.jsonl"
PEERS = HERE / "peers.jsonl"
PLOT = HERE / "quality.png"
SECTION = "Quality (bench/quality.py)"
SCHEMA = 2

# Kernel modes a cell is scored under: the options a user gets, and exact paths only.
TUNED_PRESET_ROW = "presets+tune-e4-lr2e-3"  # the recipe the README recommends: each column's preset, then `interop.tune_scales`
KERNEL_MODES = {"default": {"autotune": True, "precision": "any"}, "float32": {"autotune": False, "precision": "float32"}}

# Issue 16's targets on the test split: (model, preset column, op, value); Gemma as a ratio to float perplexity.
TARGETS = {
    ("gemma", "W8A8"): ("<=", 1.005), ("gemma", "W4A8"): ("<=", 1.03), ("gemma", "W4A16"): ("<=", 1.03),
    ("gemma", "W4A4"): ("<=", 1.25),
    ("minilm", "W8A8"): (">=", 0.9995), ("minilm", "W4A8"): (">=", 0.992), ("minilm", "W4A4"): (">=", 0.975),
}


# ---- running one cell -------------------------------------------------------------------


def _quantize(task, model: torch.nn.Module, row: Row, config: DuQuantConfig | None, times: dict) -> dict:
    """Observe (when needed), quantize and calibrate `model` in place; fills `times`; returns notes."""
    from interop import observe, quantize_
    from interop.shared_input import input_groups

    notes: dict = {}
    if row.kind == "float":
        return notes
    layers = row.layer_filter(task.filter_fn)
    if row.kind == "rtn":
        from rtn_baseline import calibrate_rtn, quantize_rtn_

        with _timed(times, "quantize_s"):
            notes["layers"] = len(quantize_rtn_(model, config, layers))
        if config.quantize_acts:
            with _timed(times, "calibrate_s"), calibrate_rtn(model):
                task.run_calibration(model)
        return notes
    if row.sequential:
        from interop import quantize_sequential

        batches, run = task.calibration_batches()
        with _timed(times, "quantize_s"):
            notes["layers"] = len(quantize_sequential(model, config, batches, layers, run=run, progress=False))
        notes["input_groups"] = len(input_groups(model))
        _after(task, model, row, config, times, notes)
        return notes
    stats = None
    find_groups = row.shared_inputs  # a config without statistics observes for its input groups
    if config.needs_stats or find_groups:
        with _timed(times, "observe_s"), observe(model, layers, xtx=config.needs_xtx) as stats:
            task.run_calibration(model)
    with _timed(times, "quantize_s"):
        groups = "auto" if row.shared_inputs else None
        notes["layers"] = len(quantize_(model, config, layers, progress=False, stats=stats, input_groups=groups))
    notes["input_groups"] = len(input_groups(model))
    _after(task, model, row, config, times, notes)
    return notes


def _after(task, model: torch.nn.Module, row: Row, config: DuQuantConfig, times: dict, notes: dict) -> None:
    """The steps after packing: static activation calibration, the per-layer clip search, scale tuning."""
    from interop import calibrate, search_act_clip, tune_scales

    if config.needs_calibration:
        with _timed(times, "calibrate_s"), calibrate(model):
            task.run_calibration(model)
    if row.clip_search:
        batches, run = task.calibration_batches()
        with _timed(times, "clip_search_s"):
            clips = search_act_clip(model, batches, run=run)
        notes["act_clips"] = {str(c): sum(v == c for v in clips.values()) for c in sorted(set(clips.values()))}
    if row.tune:
        batches, run, loss = task.tuning_batches()
        teacher = task.float_model()
        with _timed(times, "tune_s"):
            notes["tune"] = tune_scales(model, teacher, batches, run=run, loss=loss, progress=False, **dict(row.tune))
        del teacher


@contextlib.contextmanager
def _timed(times: dict, key: str) -> Iterator[None]:
    """Adds the seconds the block took to `times[key]`."""
    t = time.perf_counter()
    try:
        yield
    finally:
        times[key] = times.get(key, 0.0) + time.perf_counter() - t


def parse_score(spec: str) -> dict[str, tuple[str, ...]]:
    """`"default=dev,test;float32=test"` -> {"default": ("dev", "test"), "float32": ("test",)}."""
    out: dict[str, tuple[str, ...]] = {}
    for item in (x.strip() for x in spec.split(";") if x.strip()):
        mode, _, parts = item.partition("=")
        mode = mode.strip()
        names = tuple(p.strip() for p in parts.split(",") if p.strip())
        if mode not in KERNEL_MODES:
            raise SystemExit(f"--score: unknown kernel mode {mode!r} in {spec!r}; choose from {sorted(KERNEL_MODES)}")
        bad = [n for n in names if n not in ("dev", "test")]
        if not names or bad:
            raise SystemExit(f"--score: {mode!r} needs parts from dev, test; got {parts!r}")
        out[mode] = names
    if not out:
        raise SystemExit(f"--score: nothing to score in {spec!r}")
    return out


def _versions() -> dict:
    import jax
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "jax": jax.__version__,
            "threads": torch.get_num_threads()}


def run_cell(task, row: Row, column: str, score: dict[str, tuple[str, ...]], rev: str) -> list[dict]:
    """Measures one (model, row, column) cell: quantizes once, then scores each kernel mode of `score` on its
    parts. One record per mode (the float row: one, kernels "none", every part asked for); never raises:
    a failure is recorded as `error`."""
    from interop.kernels import kernel_options

    wbits, abits = BITS.get(column, (16, 16))
    base = {
        "kind": "result", "schema": SCHEMA, "model": task.name, "row": row.name, "column": column, "metric": task.metric,
        "split": task.describe(), "commit": rev, "versions": _versions(),
    }
    if row.kind == "float":
        score = {"none": tuple(dict.fromkeys(p for parts in score.values() for p in parts))}
    times: dict = {}
    records = []
    try:
        config = row.config(wbits, abits, column)
        base["config"] = None if config is None else config.to_dict()
        base["labels"] = row.labels(config)
        t0 = time.perf_counter()
        model = task.float_model()
        times["copy_s"] = time.perf_counter() - t0
        base.update(_quantize(task, model, row, config, times))
        times["prepare_s"] = sum(times.get(k, 0.0) for k in ("observe_s", "quantize_s", "calibrate_s", "clip_search_s", "tune_s"))
    except Exception as e:  # keep going: one unsupported option must not stop a long run
        return [{**base, "kernels": "none", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6),
                 "times": {k: round(v, 2) for k, v in times.items()}}]
    parts = task.parts()
    for mode, names in score.items():
        rec = {**base, "kernels": mode, "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "loadavg_start": round(os.getloadavg()[0], 2)}
        eval_s: dict = {}
        try:
            with kernel_options(**KERNEL_MODES.get(mode, {})) as opts:
                rec["kernel_options"] = dict(vars(opts)) if mode != "none" else None
                per_item = {}
                for name in names:
                    t = time.perf_counter()
                    per_item[name] = [float(v) for v in task.per_item(model, parts[name])]
                    eval_s[name] = round(time.perf_counter() - t, 1)
            rec["per_item"] = per_item
            rec["value"] = {name: task.summarize(v) for name, v in per_item.items()}
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=6)
        rec["times"] = {**{k: round(v, 2) for k, v in times.items()}, "eval_s": eval_s}
        rec["loadavg_end"] = round(os.getloadavg()[0], 2)
        records.append(rec)
    del model
    return records


def append(path: Path, record: dict) -> None:
    """Appends one JSON line and flushes it to disk (a killed run keeps every finished cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{i} is not valid JSON (an interrupted write?); skipped", file=sys.stderr)
    return out


def _make_task(name: str, args):
    from quality_models import TASKS

    if name == "gemma":
        return TASKS[name](seed=args.seed, n_calib=args.calib_chunks, n_eval=args.dev_chunks, n_test=args.test_chunks,
                           n_calib_extra=args.extra_calib_chunks)
    if name == "minilm":
        return TASKS[name](seed=args.seed, n_calib=args.calib_sentences, n_eval=args.dev_sentences, n_test=args.test_sentences,
                           n_calib_extra=args.extra_calib_sentences)
    raise SystemExit(f"--models: unknown model {name!r}; choose from gemma, minilm")


def _done(records: list[dict], task, row: Row, column: str, score: dict[str, tuple[str, ...]]) -> bool:
    """Whether every kernel mode of `score` was measured on every asked part of the same split, without error."""
    want = {"none": tuple(p for parts in score.values() for p in parts)} if row.kind == "float" else score
    got = {}
    for r in records:
        if (r.get("schema") == SCHEMA and r.get("kind") == "result" and r["model"] == task.name and r["row"] == row.name
                and r["column"] == column and r.get("split") == task.describe() and "error" not in r):
            got.setdefault(r["kernels"], set()).update(r["per_item"])
    return all(set(parts) <= got.get(mode, set()) for mode, parts in want.items())


def run(args) -> None:
    rows = select(args.configs)
    columns = [c.strip() for c in args.bits.split(",") if c.strip()]
    for c in columns:
        if c not in BITS:
            raise SystemExit(f"--bits: unknown column {c!r}; choose from {list(BITS)}")
    score = parse_score(args.score)
    rev = commit()  # the code this process loaded; the tree may change while it runs
    if (rev.endswith("+dirty") or rev == "unknown") and not args.allow_dirty:
        raise SystemExit(f"the tree is {rev!r}: commit first (a report counts committed code only), or pass --allow-dirty "
                         "for lines the report leaves out")
    previous = read_records(args.out) if args.skip_done else []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t = time.perf_counter()
        task = _make_task(model_name, args)
        print(f"[{model_name}] loaded in {time.perf_counter() - t:.1f} s; split {task.describe()}", flush=True)
        for row in rows:
            for column in (["float"] if row.kind == "float" else columns):
                if args.skip_done and _done(previous, task, row, column, score):
                    print(f"[{model_name}] {row.name} {column}: already measured, skipped", flush=True)
                    continue
                for rec in run_cell(task, row, column, score, rev):
                    append(args.out, rec)
                    if "error" in rec:
                        print(f"[{model_name}] {row.name} {column} {rec['kernels']}: ERROR {rec['error']}", flush=True)
                    else:
                        values = ", ".join(f"{k} {v:.4f}" for k, v in rec["value"].items())
                        print(f"[{model_name}] {row.name} {column} {rec['kernels']}: {task.metric} {values}  times {rec['times']}", flush=True)


# ---- report ------------------------------------------------------------------------------


def _wanted_split(model: str, args) -> dict:
    """The split fields `args` asks for (compared with each record's; a plain split's record has no
    `n_calib_extra`, so 0 extra items is asked for as None)."""
    if model == "gemma":
        return {"seed": args.seed, "n_calib": args.calib_chunks, "n_dev": args.dev_chunks, "n_test": args.test_chunks,
                "n_calib_extra": args.extra_calib_chunks or None}
    return {"seed": args.seed, "n_calib": args.calib_sentences, "n_dev": args.dev_sentences, "n_test": args.test_sentences,
            "n_calib_extra": args.extra_calib_sentences or None}


def _dirty(rec: dict) -> bool:
    return rec.get("commit", "unknown").endswith("+dirty") or rec.get("commit") == "unknown"


def cells_of(records: list[dict], args) -> dict[tuple[str, str, str, str], dict]:
    """{(model, row, column, kernels): {"per_item": {part: values}, "record": latest line, "commits": [...]}}.

    Only schema-2 results without error, on the split `args` asks for, from committed trees
    (unless `--allow-dirty`). Parts measured in several lines merge, later lines winning; a line
    with another config than the cell's latest starts the cell afresh."""
    out: dict = {}
    for r in records:
        if r.get("schema") != SCHEMA or r.get("kind") != "result" or "error" in r or "per_item" not in r:
            continue
        # a peer's line may come from a tree whose other files were being edited: its code is bench/peers*.py,
        # and the report names such lines (`dirty_peers`); our own lines must come from a committed tree
        peer_ok = r.get("kernels") == "peer"
        if (_dirty(r) and not (args.allow_dirty or peer_ok)) or any(r["split"].get(k) != v for k, v in _wanted_split(r["model"], args).items()):
            continue
        key = (r["model"], r["row"], r["column"], r["kernels"])
        cell = out.get(key)
        if cell is None or not _same_config(cell["record"].get("config"), r.get("config")) or _grouped(cell["record"]) != _grouped(r):
            cell = out[key] = {"per_item": {}, "commits": []}
        cell["per_item"].update(r["per_item"])
        cell["record"] = r
        if r["commit"] not in cell["commits"]:
            cell["commits"].append(r["commit"])
    return out


def _grouped(record: dict) -> bool:
    """Whether the line's layers that read one input shared one input transform (lines written before
    input groups existed were fitted layer by layer)."""
    return record.get("input_groups", 0) > 0


def _interval(model: str, values, reference) -> tuple[float, float, float]:
    """Gemma: the perplexity ratio to `reference` (paired per-chunk NLLs) and its 95% interval;
    MiniLM: the mean cosine and its interval."""
    if model == "gemma":
        return tuple(math.exp(x) for x in paired_interval(values, reference))  # type: ignore[return-value]
    return paired_interval(values, np.zeros(len(values)))


def _fmt(model: str, iv: tuple[float, float, float] | None) -> str:
    if iv is None:
        return ""
    d = 4 if model == "gemma" else 5
    return f"{iv[0]:.{d}f} [{iv[1]:.{d}f}, {iv[2]:.{d}f}]"


def _versus(model: str, a, b) -> str:
    """How the paired interval of `a - b` reads: better, worse, or not separated (lower NLL, higher cosine is better)."""
    m, lo, hi = paired_interval(a, b)
    better, worse = (hi < 0, lo > 0) if model == "gemma" else (lo > 0, hi < 0)
    word = "better" if better else "worse" if worse else "not separated"
    d = 4 if model == "gemma" else 6
    return f"{word} (Δ {'log ppl' if model == 'gemma' else 'cosine'} {m:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}])"


def _same_config(a: dict | None, b: dict | None) -> bool:
    """Whether two recorded configs are the same `DuQuantConfig`: a line written before a field existed
    reads with that field at its default (`DuQuantConfig.from_dict`), as a saved model does."""
    if a is None or b is None:
        return a is b
    return DuQuantConfig.from_dict(a) == DuQuantConfig.from_dict(b)


def _is_preset(cell: dict, column: str, tuned: bool = False) -> bool:
    """Whether the cell measured `DuQuantConfig.preset(column)` as `quantize_` gives it (no extra step), or with
    `tuned` the recommended recipe: the preset and `interop.tune_scales` as the row TUNED_PRESET_ROW runs it."""
    name = cell["record"]["row"]
    row = ROWS.get(name)
    if tuned:
        plain = name == TUNED_PRESET_ROW
    else:
        plain = row is None or not (row.sequential or row.clip_search or row.shared_inputs or row.only or row.tune)
    return plain and _same_config(cell["record"].get("config"), DuQuantConfig.preset(column.lower()).to_dict())


def _preset_cell(mine: dict, column: str, mode: str, part: str | None = None, tuned: bool = False) -> dict | None:
    """The cell of `column`'s preset (with `tuned`: and scale tuning) under kernel `mode` (with values on `part`,
    when given), or None."""
    return next((c for k, c in mine.items() if k[2] == column and k[3] == mode and _is_preset(c, column, tuned)
                 and (part is None or part in c["per_item"])), None)


def report(args) -> str:
    records = read_records(args.out) + read_records(args.peers)
    cells = cells_of(records, args)
    if not cells:
        raise SystemExit(f"--report: no committed schema-{SCHEMA} results in {args.out} on the split these arguments ask for")
    commits = sorted({c for k, cell in cells.items() if k[3] != "peer" for c in cell["commits"]})
    dirty_peers = sorted(k[1] for k, cell in cells.items() if k[3] == "peer" and any(c.endswith("+dirty") for c in cell["commits"]))
    parts = [
        "`python bench/quality.py --report` renders `bench/quality.jsonl` (our rows) and `bench/peers.jsonl` (peers, "
        "`bench/peers.py`): only lines measured from a committed tree, on the split below; the latest line of each "
        f"(cell, kernel mode) counts. Commits: {', '.join(f'`{c}`' for c in commits)}. "
        "Gemma-3 270M: perplexity of 512-token chunks of `pydoc_data.topics` scored after BOS, the 7 projections x 18 "
        "layers quantized, the float32 model dequantized from the Q4_K_M GGUF the reference; figures are ratios to its "
        "perplexity on the same chunks, with a 95% paired bootstrap interval over chunks of the per-chunk NLL difference. "
        "all-MiniLM-L6-v2: mean cosine of held-out sentence embeddings to the float model's, every Linear quantized, "
        "interval over sentences. Kernels: `default` = what a user gets (autotuner on, `precision=\"any\"`), "
        "`float32` = autotuner off, float32 or exact integer products only; `peer` = the peer's own forward.",
    ]
    if dirty_peers:
        parts.append("Peer rows measured while other tracked files of the tree were uncommitted (their code is "
                     "bench/peers.py and bench/peers_child.py): " + ", ".join(f"`{n}`" for n in dirty_peers) + ".")
    for model in ("gemma", "minilm"):
        mine = {k: v for k, v in cells.items() if k[0] == model}
        flt = mine.get((model, "float", "float", "none"))
        if not mine or (model == "gemma" and flt is None):
            continue
        sp = next(iter(mine.values()))["record"]["split"]
        parts.append(f"### {model}")
        parts.append(f"Split: seed {sp['seed']}, {sp['total']} {sp.get('unit', 'items')}: {sp['n_calib']} calibration, "
                     f"{sp['n_dev']} development, {sp['n_test']} test.")
        ref = flt["per_item"] if flt else {}
        if flt and model == "gemma":
            parts.append("Float model perplexity: " + ", ".join(
                f"{p} {math.exp(np.mean(v)):.3f}" for p, v in flt["per_item"].items()) + ".")
        parts.append(_presets_section(model, mine, ref))
        parts.append(_rows_section(model, mine, ref))
    body = "\n\n".join(p for p in parts if p)
    if not args.no_write:
        write_section(SECTION, body)
        plot(cells, PLOT)
        print(f"wrote the section {SECTION!r} of bench/RESULTS.md and {PLOT.name}")
    print(body)
    return body


def _iv(model: str, cell: dict | None, part: str, ref: dict) -> tuple[float, float, float] | None:
    """The cell's figure on `part` and its interval (`_interval`); `ref`: the float model's values by part."""
    if cell is None or part not in cell["per_item"]:
        return None
    r = ref.get(part)
    if model == "gemma" and (r is None or len(r) != len(cell["per_item"][part])):
        return None
    return _interval(model, cell["per_item"][part], r)


def _best_peer(model: str, mine: dict, column: str) -> tuple[str, dict] | None:
    """The peer row of `column` with the best test figure."""
    peers = [(k[1], c) for k, c in mine.items() if k[3] == "peer" and k[2] == column and "test" in c["per_item"]]
    if not peers:
        return None
    sign = 1 if model == "gemma" else -1
    return min(peers, key=lambda pc: sign * float(np.mean(pc[1]["per_item"]["test"])))


def _presets_section(model: str, mine: dict, ref: dict) -> str:
    rows, targets = [], []
    for column, tuned, mode in ((c, t, m) for c in BITS for t in (False, True) for m in KERNEL_MODES):
        peer = _best_peer(model, mine, column)
        cell = _preset_cell(mine, column, mode, tuned=tuned)
        if cell is None:
            continue
        recipe = f"`{column.lower()}`" + (" + `tune_scales`" if tuned else "")
        test, dev = _iv(model, cell, "test", ref), _iv(model, cell, "dev", ref)
        half = "" if test is None else f"{100 * (test[2] - test[1]) / 2:.2f}%" if model == "gemma" else f"{(test[2] - test[1]) / 2:.5f}"
        versus = ""
        if peer is not None and "test" in cell["per_item"]:
            versus = f"{peer[0]}: {_fmt(model, _iv(model, peer[1], 'test', ref))}; preset {_versus(model, cell['per_item']['test'], peer[1]['per_item']['test'])}"
        target = TARGETS.get((model, column))
        verdict = ""
        if target and test is not None:
            op, bound = target
            ok = test[0] <= bound if op == "<=" else test[0] >= bound
            sure = test[2] <= bound if op == "<=" else test[1] >= bound
            clear = test[1] > bound if op == "<=" else test[2] < bound
            verdict = f"{op} {bound}: " + ("met, interval inside" if sure else "met, interval straddles" if ok else
                                          "NOT met, interval outside" if clear else "NOT met, interval straddles")
            if not any(t.startswith(f"- {model} {recipe} ") for t in targets):  # default kernels first
                targets.append(f"- {model} {recipe} {op} {bound}: test {_fmt(model, test)} ({mode} kernels): "
                               f"{verdict.split(': ', 1)[1]}")
        kernels = ""
        if mode == "float32":
            default = _preset_cell(mine, column, "default", tuned=tuned)
            shared = [p for p in ("test", "dev") if default and p in default["per_item"] and p in cell["per_item"]]
            if shared:
                kernels = f"{shared[0]}: default kernels {_versus(model, default['per_item'][shared[0]], cell['per_item'][shared[0]])}"
        rows.append([recipe, mode, _fmt(model, dev), _fmt(model, test), half, verdict, versus, kernels])
    if not rows:
        return ""
    what = "perplexity / float" if model == "gemma" else "mean cosine"
    head = ["preset", "kernels", f"dev {what}", f"test {what} [95%]", "test half-width", "target (test)", "best peer, test; preset against it (paired)", "default against float32 kernels (paired)"]
    return ("Presets (`DuQuantConfig.preset`; `+ tune_scales`: and `interop.tune_scales` after quantizing, as the row "
            f"`{TUNED_PRESET_ROW}` runs it), chosen on the development split, reported on the test split:\n\n"
            + table(head, rows) + ("\n\nTargets (issue 16; default kernels where their test line exists):\n\n" + "\n".join(targets) if targets else ""))


def _rows_section(model: str, mine: dict, ref: dict) -> str:
    """Every row measured, dev and test, by bit width (default kernels; peers their own)."""
    order = {name: i for i, name in enumerate(ROWS)}
    modes = ("default", "float32", "peer")
    names = sorted({(k[1], k[3]) for k in mine if k[1] != "float" and k[3] in modes
                    and (k[3] != "float32" or not any(j[1] == k[1] and j[3] == "default" for j in mine))},
                   key=lambda nk: (modes.index(nk[1]), order.get(nk[0], len(order)), nk[0]))
    rows = []
    for name, mode in names:
        cols = []
        for column in BITS:
            cell = mine.get((model, name, column, mode))
            d, t = _iv(model, cell, "dev", ref), _iv(model, cell, "test", ref)
            d4 = 4 if model == "gemma" else 5
            cols.append(" / ".join(x for x in (f"dev {d[0]:.{d4}f}" if d else "", f"test {_fmt(model, t)}" if t else "") if x))
        any_cell = next(mine[(model, name, c, mode)] for c in BITS if (model, name, c, mode) in mine)
        labels = any_cell["record"].get("labels") or {}
        row = ROWS.get(name)
        if row is not None and row.kind == "preset":  # one config per column: name what the row adds
            extra = [w for w, on in (("sequential", row.sequential), ("clip searched per layer", row.clip_search),
                                     ("one input transform per input group", row.shared_inputs),
                                     (f"only layers matching {row.only}", row.only),
                                     ("scales tuned end to end (" + ", ".join(f"{k} {v}" for k, v in row.tune) + ")",
                                      row.tune)) if on]
            labels = {"rotation": "each column's preset" + "".join(f", {w}" for w in extra)}
        if mode == "peer":
            peer = any_cell["record"].get("peer", {})
            labels = {"rotation": f"{peer.get('name', 'peer')} {peer.get('version', '')}".strip()}
        rows.append([f"{name}" + {"peer": " (peer)", "float32": " (float32 kernels)"}.get(mode, "")]
                    + [labels.get(lab, "") for lab in LABELS] + cols)
    if not rows:
        return ""
    return ("Every row measured (our rows with default kernels, or float32 kernels where only those were run; dev: point "
            "estimate; test: with its interval):\n\n" + table(["row"] + list(LABELS) + list(BITS), rows) + _dev_choices(model, mine)
            + _sensitivity(model, mine, ref))


def _sensitivity(model: str, mine: dict, ref: dict) -> str:
    """Per column, what each kind of projection costs alone (`presets-only-<kind>` rows, development split, Gemma):
    its ratio to float with the interval, and its excess (ratio - 1) as a share of the whole preset's."""
    if model != "gemma":
        return ""
    out = []
    for column in BITS:
        whole = _iv(model, _preset_cell(mine, column, "default"), "dev", ref)
        rows, total = [], 0.0
        for name in LISTS["sensitivity"]:
            iv = _iv(model, mine.get((model, name, column, "default")), "dev", ref)
            if iv is not None:
                share = f"{100 * (iv[0] - 1) / (whole[0] - 1):+.0f}%" if whole and whole[0] != 1 else ""
                rows.append([f"`{ROWS[name].only}`", _fmt(model, iv), share])
                total += iv[0] - 1
        if rows:
            rows.append(["1 + the sum of the excesses", f"{1 + total:.4f}", ""])
            if whole:
                rows.append(["the whole preset", _fmt(model, whole), "100%"])
            out.append(f"`{column.lower()}` on one kind of projection only, every other layer float (default kernels, "
                       "development split):\n\n" + table(["quantized", "dev perplexity / float [95%]", "share of the preset's excess"], rows))
    return "\n\n" + "\n\n".join(out) if out else ""


def _dev_choices(model: str, mine: dict) -> str:
    """Each development candidate against the preset of its column, paired on the development chunks, same kernels."""
    lines = []
    for (m, name, column, mode), cell in sorted(mine.items()):
        if (mode not in KERNEL_MODES or _is_preset(cell, column) or name in LISTS["baselines"] or "dev" not in cell["per_item"]
                or (name in ROWS and ROWS[name].only)):  # a sensitivity row (some layers only) is no candidate
            continue
        preset = _preset_cell(mine, column, mode, part="dev")
        if preset is not None:
            lines.append(f"- {column} `{name}` ({mode} kernels) against the preset: "
                         f"{_versus(model, cell['per_item']['dev'], preset['per_item']['dev'])}")
    return ("\n\nDevelopment candidates against their column's preset (paired over the development items):\n\n"
            + "\n".join(lines)) if lines else ""


def plot(cells: dict, path: Path) -> None:
    """Per model: each preset (default kernels) and peer row's test figure with its 95% interval, by bit width;
    Gemma as the perplexity ratio to float, MiniLM as 1 - mean cosine; log scale, lower is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("gemma", "minilm") if any(k[0] == m for k in cells)]
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 6), squeeze=False)
    for j, model in enumerate(models):
        ax = axes[0][j]
        flt = cells.get((model, "float", "float", "none"))
        ref = flt["per_item"] if flt else {}
        bars = []
        for (m, name, column, mode), cell in cells.items():
            if m != model or mode not in KERNEL_MODES and mode != "peer" or (mode != "peer" and not _is_preset(cell, column)):
                continue
            if column not in BITS:  # a peer's own float row (its pipeline check): no bit-width bar
                continue
            default = cells.get((m, name, column, "default"))
            if mode == "float32" and default is not None and "test" in default["per_item"]:
                continue  # one bar per preset: the default kernels' where measured
            iv = _iv(model, cell, "test", ref)
            if iv is None:
                continue
            if model == "minilm":
                iv = (1 - iv[0], 1 - iv[2], 1 - iv[1])
            label = name if mode == "peer" else "preset" + (" (float32 kernels)" if mode == "float32" else "")
            bars.append((list(BITS).index(column), iv, f"{column} {label}", mode))
        bars.sort(key=lambda b: (b[0], b[1][0]))
        ys = range(len(bars))
        ax.barh(ys, [b[1][0] for b in bars], xerr=[[b[1][0] - b[1][1] for b in bars], [b[1][2] - b[1][0] for b in bars]],
                color=["#888" if b[3] == "peer" else "#2a7" for b in bars], capsize=3)
        ax.set_yticks(list(ys), [b[2] for b in bars], fontsize=7)
        if model == "gemma":
            ax.set_xlim(left=0.95)
        else:
            ax.set_xscale("log")
        if model == "gemma":
            ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{model}, test split: {'perplexity / float' if model == 'gemma' else '1 - mean cosine'} "
                     "(green: our presets, grey: peers; 95% intervals)", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,gemma", help="comma-separated: minilm, gemma")
    ap.add_argument("--configs", default="baselines", help=f"comma-separated rows or lists; lists: {', '.join(LISTS)}")
    ap.add_argument("--bits", default=",".join(BITS), help=f"comma-separated columns from {', '.join(BITS)}")
    ap.add_argument("--score", default="default=dev,test;float32=test",
                    help="kernel modes and the held-out parts each scores: 'MODE=PART,PART;MODE=...' with modes "
                         f"{', '.join(KERNEL_MODES)} and parts dev, test")
    ap.add_argument("--seed", type=int, default=0, help="seed of the three-way split")
    ap.add_argument("--calib-chunks", type=int, default=16, help="Gemma calibration chunks (512 tokens each)")
    ap.add_argument("--dev-chunks", type=int, default=40, help="Gemma development chunks")
    ap.add_argument("--test-chunks", type=int, default=96, help="Gemma test chunks")
    ap.add_argument("--extra-calib-chunks", type=int, default=0,
                    help="more Gemma calibration chunks, taken after the test chunks (development and test stay the same)")
    ap.add_argument("--extra-calib-sentences", type=int, default=0,
                    help="more MiniLM calibration sentences, taken after the test sentences")
    ap.add_argument("--calib-sentences", type=int, default=256, help="MiniLM calibration sentences")
    ap.add_argument("--dev-sentences", type=int, default=384, help="MiniLM development sentences")
    ap.add_argument("--test-sentences", type=int, default=768, help="MiniLM test sentences")
    ap.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="JSON lines file the results are appended to")
    ap.add_argument("--peers", type=Path, default=PEERS, help="with --report: the peers' JSON lines (bench/peers.py)")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="measure from a tree with uncommitted changes (those lines stay out of the report), or with "
                         "--report: count such lines")
    ap.add_argument("--skip-done", action="store_true", help="skip cells already measured without error on the same split")
    ap.add_argument("--report", action="store_true", help="render the table from --out into bench/RESULTS.md and the plot")
    ap.add_argument("--no-write", action="store_true", help="with --report: print only")
    args = ap.parse_args(argv)
    args.out, args.peers = args.out.resolve(), args.peers.resolve()
    if args.report:
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
