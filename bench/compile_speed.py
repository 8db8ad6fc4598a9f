"""Eager vs `torch.compile` on a small Gemma-3-shaped model: compile time, prefill and decode speed.

    python bench/compile_speed.py [--layers 2] [--prefill 128] [--decode 16] [--configs float,w8a8,w4a8] [--threads 1] [--no-write]

A `Gemma3TextConfig` with Gemma-3 270M's widths (hidden 640, MLP 2048, 4 query heads,
1 KV head of 256) but `--layers` layers and a 4096-token vocabulary, random weights
(seed 0), nothing downloaded. `w8a8` and `w4a8` are `DuQuantConfig.preset(name)` on
every projection linear (statistics with XᵀX observed on 2 random 64-token prompts),
kernel paths frozen (`interop.kernels.freeze_paths`) before compiling.

For each configuration, eager and `torch.compile(model, dynamic=True)` (inductor):

- graph breaks (`torch._dynamo.explain` on the prefill),
- compile time: the first prefill call, minus an eager call,
- prefill: a `--prefill`-token forward without cache, least time of 5 (the machine is shared),
- decode: `--decode` greedy steps with the KV cache (a `DynamicCache`), 1 / median step time,
- compiles over the whole run (frames compiled, from torch._dynamo's counters): the
  decode steps' growing cache length must not compile per step.

Writes bench/compile_speed.md (unless `--no-write`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).with_name("compile_speed.md")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(layers: int) -> nn.Module:
    """A random Gemma-3 text model of 270M's widths with `layers` layers, float32, eval mode."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=4096, hidden_size=640, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=2048,
        sliding_window=512, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def quantize(model: nn.Module, preset: str) -> nn.Module:
    """`model` with every projection quantized by `preset` (statistics on random prompts), paths frozen."""
    import interop
    from duquant_jax import DuQuantConfig
    from interop.kernels import freeze_paths

    keep = interop.name_filter(include=r"(" + "|".join(PROJ) + r")$")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad(), interop.observe(model, keep, xtx=True) as stats:
        for _ in range(2):
            model(torch.randint(0, 4096, (1, 64), generator=gen), use_cache=False)
    interop.quantize_(model, DuQuantConfig.preset(preset), keep, progress=False, stats=stats)
    freeze_paths(model)
    return model


def least_time(fn, repeats: int = 5) -> float:
    """Least wall time of `repeats` calls (the machine is shared: the least is the least disturbed)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def decode_rate(model: nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Greedy decode tokens per second (1 / the median step time) after a prefill that fills a DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times)


def graph_breaks(model: nn.Module, prompt: torch.Tensor) -> int:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(prompt, use_cache=False)
    torch._dynamo.reset()
    return explained.graph_break_count


def measure(name: str, model: nn.Module, prefill: int, steps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 4096, (1, prefill), generator=gen)
    rows = []
    with torch.no_grad():
        eager_call = least_time(lambda: model(prompt, use_cache=False), 1)
        eager = {
            "prefill": prefill / least_time(lambda: model(prompt, use_cache=False)),
            "decode": decode_rate(model, prompt, steps),
        }
        rows.append({"config": name, "mode": "eager", "breaks": "", "compile_s": "", **eager, "compiles": ""})
        breaks = graph_breaks(model, prompt)
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, dynamic=True)
        t = time.perf_counter()
        compiled(prompt, use_cache=False)
        compile_s = time.perf_counter() - t - eager_call
        decode_rate(compiled, prompt, 4)  # compiles the cached prefill and decode graphs (HF's cache recompiles twice)
        warm = {
            "prefill": prefill / least_time(lambda: compiled(prompt, use_cache=False)),
            "decode": decode_rate(compiled, prompt, steps),
        }
        other = torch.randint(0, 4096, (1, prefill // 2 + 3), generator=gen)
        compiled(other, use_cache=False)  # another prompt length: must reuse the dynamic graph
        frames = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        rows.append({"config": name, "mode": "compiled", "breaks": breaks, "compile_s": compile_s, **warm, "compiles": frames})
    torch._dynamo.reset()
    return rows


def versions() -> str:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        from interop.kernel_tuning import cpu_description

        cpu = cpu_description()
    except Exception:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads; shared with other jobs), "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| config | mode | graph breaks | compile (s) | prefill (tok/s) | decode (tok/s) | graphs compiled |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        c = f"{r['compile_s']:.1f}" if r["compile_s"] != "" else ""
        lines.append(f"| {r['config']} | {r['mode']} | {r['breaks']} | {c} | {r['prefill']:.0f} | {r['decode']:.1f} | {r['compiles']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--configs", default="float,w8a8,w4a8")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: OpenMP spin-waits swamp a shared machine)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs.split(","):
        t = time.perf_counter()
        model = build(args.layers)
        if name != "float":
            model = quantize(model, name)
        print(f"{name}: built in {time.perf_counter() - t:.1f} s", flush=True)
        rows.extend(measure(name, model, args.prefill, args.decode))
        print(table(rows[-2:]), flush=True)
    body = table(rows)
    print(body)
    if not args.no_write:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        OUT.write_text(
            f"# Eager vs torch.compile (bench/compile_speed.py)\n\nMeasured {stamp} on {versions()}.\n\n"
            f"Model: random Gemma-3 text model, 270M widths, {args.layers} layers, vocabulary 4096, float32; "
            f"prefill {args.prefill} tokens (no cache, least of 5), decode {args.decode} greedy steps with a DynamicCache "
            f"(1 / median step). "
            f"Quantized configs: every q/k/v/o/gate/up/down projection, kernel paths frozen before compiling. "
            f"`torch.compile(model, dynamic=True)`, inductor. Graph breaks: `torch._dynamo.explain` of the prefill. "
            f"Compile: first compiled prefill minus one eager prefill. Graphs compiled: dynamo's unique graphs over "
            f"the prefill, 4 warm-up and {args.decode} timed decode steps and a second prompt length.\n\n{body}\n"
        )


if __name__ == "__main__":
    main()
