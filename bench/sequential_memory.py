"""Sequential calibration from a checkpoint on a Gemma-2B-shaped model: peak memory and wall time.

    python bench/sequential_memory.py [--blocks 18] [--preset w4a8] [--batches 4] [--tokens 256] [--work DIR] [--in-memory]

Writes a random-weight bfloat16 checkpoint of a transformers `GemmaConfig` with
Gemma-2B's shapes (hidden 2048, MLP 16384, 8 heads of 256, one KV head, a
256000-word tied embedding; nothing downloaded) as shards with transformers'
index, then, each in a fresh process (max RSS measured there):

- `quantize_checkpoint_sequential` of a meta-device model from those shards
  (the preset's linears of every block), written as a `save_quantized` directory;
- with `--in-memory`: the whole float model loaded, `quantize_sequential`, `save_quantized`,
  and every saved layer compared with the checkpoint run's, tensor for tensor.

Reports peak RSS against the float model's bf16 bytes and its parts (the
embedding, one block, the activations, GPTQ's largest factor), and writes
bench/sequential_memory.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

GEMMA_2B = dict(
    vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
    head_dim=256, max_position_embeddings=8192, tie_word_embeddings=True,
)


def gemma_config(blocks: int):
    import transformers

    return transformers.GemmaConfig(num_hidden_layers=blocks, torch_dtype="bfloat16", **GEMMA_2B)


def write_checkpoint(root: Path, blocks: int) -> int:
    """Random bf16 weights for every tensor of the model, one shard per block plus one for the rest; returns bytes."""
    import accelerate
    import torch
    import transformers
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    with accelerate.init_empty_weights():
        meta = transformers.GemmaForCausalLM(gemma_config(blocks))
    keys = [k for k in meta.state_dict() if k != "lm_head.weight"]  # tied to the embedding
    shards: dict[str, list[str]] = {}
    for k in keys:
        block = k.split(".")[2] if k.startswith("model.layers.") else "rest"
        shards.setdefault(block, []).append(k)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    shapes = {k: t.shape for k, t in meta.state_dict().items()}
    for i, (block, names) in enumerate(shards.items()):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k in names:
            shape = shapes[k]
            t = torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape, generator=gen) * (0.02 if len(shape) == 2 else 1)
            tensors[k] = t.to(torch.bfloat16)
        save_file(tensors, str(root / file))
        weight_map.update({k: file for k in names})
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _batches(n: int, tokens: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, GEMMA_2B["vocab_size"], (1, tokens), generator=gen) for _ in range(n)]


def _sample_phases(n_blocks: int):
    """A PhaseSampler over the checkpoint run's steps: reading, recording, each block's observe pass, each
    layer's pack (fit, round to nearest, GPTQ's factor and rounding), calibration and shard writes; its base
    label is "outside the blocks", then "block k" (1-based), then "after the blocks" once `n_blocks` are done."""
    import duquant_jax.gptq as gptq
    import duquant_jax.hessian_in_place as hessian_in_place
    import duquant_jax.pack as pack
    import interop.linear as linear
    import interop.sequential as sequential
    import interop.sequential_checkpoint as checkpoint
    from rss_phases import PhaseSampler  # bench/

    sampler = PhaseSampler(base="outside the blocks")
    for owner, name, label in [
        (checkpoint, "_materialize", "read"), (checkpoint, "_record_calls", "record calls"), (checkpoint, "write_shard", "write shard"),
        (checkpoint, "_quantize_block", "quantize"), (pack, "fit", "fit"), (pack, "_pack_rtn", "round to nearest"),
        (hessian_in_place, "factor_in_place", "GPTQ factor"), (gptq, "gptq_round", "GPTQ rounding"),
    ]:
        sampler.wrap(owner, name, label)
    sampler.wrap_context(sequential, "observe", "observe pass")
    sampler.wrap_context(sequential, "calibrate", "calibration pass")
    from_linear = linear.DuQuantLinear.from_linear.__func__

    def labelled(cls, lin, *a, name=None, **kw):
        with sampler.phase(f"pack {name.rsplit('.', 1)[-1] if name else 'layer'}"):
            return from_linear(cls, lin, *a, name=name, **kw)

    linear.DuQuantLinear.from_linear = classmethod(labelled)
    blocks = [0]  # blocks begun: the first after `_release_outside`, each next one after a block's `release_memory`
    release, outside = checkpoint.release_memory, checkpoint._release_outside

    def next_block() -> None:
        blocks[0] += 1
        sampler.base = f"block {blocks[0]}" if blocks[0] <= n_blocks else "after the blocks"

    def released_outside(*a, **kw):
        outside(*a, **kw)
        next_block()

    def released_block() -> None:
        release()
        next_block()

    checkpoint._release_outside, checkpoint.release_memory = released_outside, released_block
    return sampler


def _child(args) -> None:
    """In a fresh process: one run; prints a JSON line with wall time and max RSS (and, from the
    checkpoint, the peak of each phase)."""
    import accelerate
    import jax
    import torch
    import transformers

    from duquant_jax import DuQuantConfig
    from duquant_jax.peak_memory import peak_rss_gib
    from interop import name_filter, quantize_sequential, save_quantized
    from interop.sequential_checkpoint import quantize_checkpoint_sequential
    from rss_phases import rss_gib  # bench/

    config = DuQuantConfig.preset(args.preset)
    only = name_filter(include=r"(q|k|v|o|gate|up|down)_proj$")
    torch.manual_seed(0)
    jax.numpy.ones(1).block_until_ready()  # the JAX runtime started, as for any pack
    runtime_gib = rss_gib()  # the process before any model: libraries and runtimes
    t0 = time.perf_counter()
    phases = {}
    if args.child == "checkpoint":
        sampler = _sample_phases(args.blocks)
        with accelerate.init_empty_weights():
            model = transformers.GemmaForCausalLM(gemma_config(args.blocks)).to(torch.bfloat16)
        quantize_checkpoint_sequential(model, args.work / "ckpt", args.work / "seq", config, _batches(args.batches, args.tokens), only, progress=False)
        phases = {k: round(v, 4) for k, v in sampler.peaks().items()}
    else:
        from safetensors.torch import load_file

        with accelerate.init_empty_weights():  # then every tensor read from the shards: the whole float model in memory
            model = transformers.GemmaForCausalLM(gemma_config(args.blocks)).to(torch.bfloat16)
        for shard in sorted((args.work / "ckpt").glob("*.safetensors")):
            model.load_state_dict(load_file(str(shard)), strict=False, assign=True)
        model.tie_weights()
        left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if left:
            raise RuntimeError(f"not in the checkpoint: {left[:3]}")
        loaded = time.perf_counter() - t0
        quantize_sequential(model, config, _batches(args.batches, args.tokens), only, progress=False)
        save_quantized(model, args.work / "mem")
        print(json.dumps({"load_s": loaded}))
    wall = time.perf_counter() - t0
    print(json.dumps({"run": args.child, "wall_s": wall, "max_rss_gib": peak_rss_gib(),
                      "runtime_gib": runtime_gib, "phases": phases}))


def _run_child(args, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--blocks", str(args.blocks), "--preset", args.preset,
           "--batches", str(args.batches), "--tokens", str(args.tokens), "--work", str(args.work)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{kind} run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    return result


def _compare(work: Path) -> tuple[int, list[str]]:
    """Tensors of the two saves that differ (by key), and how many were compared."""
    from safetensors import safe_open

    def tensors(d: Path):
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    yield k, h.get_tensor(k)

    mem = dict(tensors(work / "mem"))
    diff, n = [], 0
    for k, t in tensors(work / "seq"):
        n += 1
        if k not in mem or mem[k].dtype != t.dtype or not bool((mem[k] == t).all()):
            diff.append(k)
    return n, diff


def _phase_lines(phases: dict[str, float]) -> list[str]:
    """The measured peaks: outside the blocks, the largest over the blocks of each step, and each block's peak."""
    import re

    def step(key: str, bare: str) -> str:  # the phase below the base label, or `bare` for the base alone
        return key.split("/", 1)[1] if "/" in key else bare

    inside: dict[str, tuple[float, str]] = {}
    per_block: dict[int, float] = {}
    for key, gib in phases.items():
        m = re.match(r"block (\d+)", key)
        if m:
            k = int(m.group(1))
            per_block[k] = max(per_block.get(k, 0.0), gib)
            name = step(key, "(between steps)")
            if gib > inside.get(name, (0.0, ""))[0]:
                inside[name] = (gib, m.group(1))
    rows = [(f"outside the blocks: {step(k, 'setup')}" if k.startswith("outside") else
             f"after the blocks: {step(k, 'final shard')}", v, "")
            for k, v in phases.items() if not k.startswith("block ")]
    rows += [(f"in a block: {name}", gib, f"block {k}") for name, (gib, k) in inside.items()]
    rows.sort(key=lambda r: -r[1])
    lines = ["", "Measured peak RSS by step (sampled every 5 ms; a step's figure includes everything alive then):", "",
             "| step | peak RSS GiB | where |", "|---|---|---|"]
    lines += [f"| {name} | {gib:.2f} | {where} |" for name, gib, where in rows[:14]]
    lines += ["", "Each block's peak (GiB): " + ", ".join(f"{per_block[k]:.2f}" for k in sorted(per_block)) + "."]
    return lines


def _memory_lines(mem: dict, n: int, diff: list[str], float_bytes: int) -> list[str]:
    return [
        f"In memory (the whole checkpoint loaded + `quantize_sequential` + `save_quantized`): peak RSS {mem['max_rss_gib']:.2f} GiB "
        f"({mem['max_rss_gib'] * 2**30 / float_bytes:.2f}x the float bytes), wall {mem['wall_s']:.0f} s (of which loading {mem['load_s']:.0f} s).",
        f"Saved tensors compared with the checkpoint run: {n}; different: {len(diff)}{' (' + ', '.join(diff[:5]) + ')' if diff else ''}.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=18)
    ap.add_argument("--preset", default="w4a8")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/duquant-sequential-bench"))
    ap.add_argument("--in-memory", action="store_true", help="also run the in-memory path and compare every tensor")
    ap.add_argument("--in-memory-only", action="store_true",
                    help="only the in-memory run, compared with the checkpoint run already in --work; appended to --out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("sequential_memory.md"))
    args = ap.parse_args()
    if args.child:
        return _child(args)
    from common import commit  # bench/

    t0 = time.perf_counter()
    if not (args.work / "ckpt" / "model.safetensors.index.json").exists():
        float_bytes = write_checkpoint(args.work / "ckpt", args.blocks)
    else:
        float_bytes = json.loads((args.work / "ckpt" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(f"checkpoint: {float_bytes / 2**30:.2f} GiB of bf16 in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.in_memory_only:
        mem = _run_child(args, "memory")
        n, diff = _compare(args.work)
        with args.out.open("a") as f:
            f.write("\n" + "\n".join(_memory_lines(mem, n, diff, float_bytes)) + "\n")
        print(mem, n, diff[:5])
        return
    seq = _run_child(args, "checkpoint")
    print(seq, flush=True)
    h, m, v = GEMMA_2B["hidden_size"], GEMMA_2B["intermediate_size"], GEMMA_2B["vocab_size"]
    block_bytes = 2 * (h * 256 * (8 + 1 + 1) + 8 * 256 * h + 3 * h * m)
    parts = {
        "embedding (bf16)": v * h * 2,
        "one float block (bf16)": block_bytes,
        "activations (float hidden states, bf16)": args.batches * args.tokens * h * 2,
        "GPTQ's largest XᵀX (down_proj, float32; transformed and factored in its own buffer)": m * m * 4,
        "one down_proj's float32 weight copies (the weight, its transformed copy, GPTQ's state and differences)": 4 * m * h * 4,
    }
    lines = [
        "# Sequential calibration from a checkpoint (bench/sequential_memory.py)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {__import__('torch').__version__}, "
        f"jax {__import__('jax').__version__}; Gemma-2B-shaped random bf16 checkpoint, {args.blocks} blocks, "
        f"preset `{args.preset}` on the 7 projections, {args.batches} calibration batches of {args.tokens} tokens.",
        "",
        "| what | GiB |",
        "|---|---|",
        f"| float model, bf16 bytes | {float_bytes / 2**30:.2f} |",
        f"| the process before the model (torch, JAX, transformers; measured) | {seq['runtime_gib']:.2f} |",
        *[f"| {k} | {b / 2**30:.2f} |" for k, b in parts.items()],
        f"| **peak RSS, `quantize_checkpoint_sequential`** | **{seq['max_rss_gib']:.2f}** ({seq['max_rss_gib'] * 2**30 / float_bytes:.2f}x the float bytes) |",
        "",
        f"Wall time from the checkpoint: {seq['wall_s']:.0f} s. Commit {commit()}.",
        *(_phase_lines(seq["phases"]) if seq.get("phases") else []),
    ]
    if args.in_memory:
        mem = _run_child(args, "memory")
        n, diff = _compare(args.work)
        lines += _memory_lines(mem, n, diff, float_bytes)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
