"""`duquant pack` end to end on a generated Gemma-2B-shaped checkpoint.

    python bench/checkpoint_pack.py [--blocks 18] [--keep DIR] [--no-write]

Writes 18 blocks x 7 linears of bfloat16 weights (plus an embedding and norms
that the default selection skips) as sharded safetensors with transformers'
index into a temporary directory, then runs `duquant pack` on it in a fresh
process: wall time, peak memory (the packing process's max RSS), layers per
second. The origin's per-block loop is timed on sample blocks of each shape
(bench/pack_speed.py) and scaled to all layers. Writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GEMMA_2B, write_section  # noqa: E402
from pack_speed import origin_loop_seconds  # noqa: E402

from duquant_jax.demo import generated_weight  # noqa: E402


def write_checkpoint(root: Path, blocks: int) -> int:
    """Gemma-2B-shaped bf16 shards, one per transformer block; returns the parameters written."""
    from safetensors.flax import save_file

    weight_map, params = {}, 0
    for b in range(blocks):
        shard = f"model-{b + 1:05d}-of-{blocks:05d}.safetensors"
        tensors = {}
        for name, shape in GEMMA_2B.items():
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"model.layers.{b}.{group}.{name}.weight"
            tensors[key] = generated_weight(shape, seed=b * 10 + len(name)).astype(jnp.bfloat16)
            params += shape[0] * shape[1]
        tensors[f"model.layers.{b}.input_layernorm.weight"] = jnp.ones(2048, jnp.bfloat16)
        if b == 0:
            tensors["model.embed_tokens.weight"] = (0.02 * jax.random.normal(jax.random.PRNGKey(9), (4096, 2048))).astype(jnp.bfloat16)
        save_file(tensors, str(root / shard))
        weight_map.update({k: shard for k in tensors})
        del tensors
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=18)
    ap.add_argument("--keep", help="write the checkpoint and packs here instead of a temporary directory")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        ckpt, out = root / "ckpt", root / "packs"
        ckpt.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        params = write_checkpoint(ckpt, args.blocks)
        print(f"wrote {params / 1e9:.2f} B bf16 parameters in {time.perf_counter() - t:.0f} s", flush=True)
        cmd = [sys.executable, "-m", "duquant_jax.cli", "pack", str(ckpt), "--out", str(out)]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if run.returncode:
            sys.exit(f"duquant pack failed:\n{run.stderr[-2000:]}")
        print(run.stdout)
        stats = {line[:22].strip(): line[22:].strip() for line in run.stdout.splitlines() if len(line) > 22}
        origin = args.blocks * sum(
            origin_loop_seconds(np.asarray(generated_weight(s, seed=1)), 16, 2, "torch") for s in GEMMA_2B.values()
        )
    layers = 7 * args.blocks
    body = (
        f"`python bench/checkpoint_pack.py --blocks {args.blocks}` — `duquant pack` (default W4A8, qr-svd) in a fresh "
        f"process on a generated Gemma-2B-shaped bf16 checkpoint: {args.blocks} shards of 7 linears "
        f"({layers} layers, {params / 1e9:.2f} B parameters) plus an embedding and norms it skips.\n\n"
        f"| what | measured |\n|---|---|\n"
        f"| wall time, process start to exit | {wall:.1f} s |\n"
        f"| packing time (its own summary) | {stats.get('wall time', '?')} |\n"
        f"| peak memory (RSS) | {stats.get('peak memory (RSS)', '?')} |\n"
        f"| throughput | {stats.get('throughput', '?')} |\n"
        f"| origin per-block torch loop, scaled from 2 blocks per side per shape | {origin / 60:.0f} min |\n"
    )
    print(body)
    if not args.no_write:
        write_section("Checkpoint packing (bench/checkpoint_pack.py)", body)


if __name__ == "__main__":
    main()
