"""Times GPTQ rounding of the whole Gemma-2B-shaped layer set against a PyTorch port of the reference loop.

    flock /tmp/duquant-cpu.lock python bench/gptq_speed.py [--blocks 18] [--no-torch] [--no-write]

Each of the `--blocks` transformer blocks has its own four Hessians `XᵀX` (one per
distinct input: q/k/v's, o's, gate/up's, down's), generated as the expectation of
`XᵀX` over 2048 tokens of `x = z · mix + 0.1 · e` with `z` in R^256 (so `H = 2048 ·
(mixᵀ mix + 0.01 I)`: low rank plus diagonal, one `A Aᵀ` product, not a 2048-token
GEMM), with one input channel in 256 an outlier (its column of `mix` x20). Weights are
`duquant_jax.demo.generated_weight`, scales SPEC's per-row MSE grid at 4 bits.

JAX (`duquant_jax.gptq`): `gptq_factor` once per Hessian (q/k/v share theirs, gate/up
too) and `gptq_round` per layer, every call timed; compilation is the first call of
each shape minus the median of the later ones. For the 16384-input down_proj, the
round is split into its column loop (the same per-block rounding scanned over every
block, no products) and the rest (the products that carry errors between blocks).

PyTorch (a child process, so each side's peak RSS is its own): a line-by-line port of
IST-DASLab/gptq `gptq.py: GPTQ.fasterquant` (float32, 2 threads, fixed per-row scales),
run once in full on one layer of each distinct shape with a fresh Hessian, each layer
factorizing its own `H` as the reference does, and scaled to the 126 layers.
Writes the "GPTQ speed" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from duquant_jax.peak_memory import peak_rss_gib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GEMMA_2B, GEMMA_2B_BLOCKS, table, write_section  # noqa: E402

BITS = 4
TOKENS = 2048
RANK = 256
NOISE = 0.1
OUTLIER_EVERY = 256
# The four distinct inputs of a block and the linears that read each.
INPUTS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def hessian_np(n: int, seed: int) -> np.ndarray:
    """(n, n) float32 `TOKENS (mixᵀ mix + NOISE² I)`, outlier channels x20 (NumPy, for torch)."""
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((RANK, n)) / math.sqrt(RANK)).astype(np.float32)
    mix[:, ::OUTLIER_EVERY] *= 20.0
    h = TOKENS * (mix.T @ mix)
    h[np.diag_indices(n)] += TOKENS * NOISE**2
    return h


def jax_part(blocks: int) -> dict:
    from functools import partial

    import jax
    import jax.numpy as jnp
    from jax import lax

    from duquant_jax.demo import generated_weight
    from duquant_jax.gptq import _round_block, gptq_factor, gptq_round
    from duquant_jax.quantize import weight_scales

    @partial(jax.jit, static_argnums=1)
    def _hessian(key: jax.Array, n: int) -> jax.Array:
        mix = jax.random.normal(key, (RANK, n), jnp.float32) / math.sqrt(RANK)
        mix = mix.at[:, ::OUTLIER_EVERY].multiply(20.0)
        h = TOKENS * jnp.dot(mix.T, mix, precision=lax.Precision.HIGHEST)
        return h + jnp.diag(jnp.full((n,), TOKENS * NOISE**2, jnp.float32))

    def hessian(n: int, seed: int) -> jax.Array:
        """(n, n) float32 `TOKENS (mixᵀ mix + NOISE² I)`, outlier channels x20."""
        return _hessian(jax.random.PRNGKey(seed), n)

    scales = jax.jit(weight_scales, static_argnums=1)
    in_of = {"qkv": 2048, "o": 2048, "gate_up": 2048, "down": 16384}
    factor_times: dict[str, list[float]] = {k: [] for k in INPUTS}
    round_times: dict[str, list[float]] = {n: [] for n in GEMMA_2B}
    gen_s = 0.0
    t_all = time.perf_counter()
    for b in range(blocks):
        for inp, layers in INPUTS.items():
            t = time.perf_counter()
            h = hessian(in_of[inp], seed=1000 * b + len(inp)).block_until_ready()
            gen_s += time.perf_counter() - t
            t = time.perf_counter()
            f = gptq_factor(h, name=f"blocks.{b}.{inp}")
            f.l.block_until_ready()
            factor_times[inp].append(time.perf_counter() - t)
            del h
            for name in layers:
                t = time.perf_counter()
                w = generated_weight(GEMMA_2B[name], seed=100 * b + len(name))
                s = scales(w, BITS).block_until_ready()
                gen_s += time.perf_counter() - t
                t = time.perf_counter()
                gptq_round(w, f, s, BITS, name=f"blocks.{b}.{name}")
                round_times[name].append(time.perf_counter() - t)
            del f
        print(f"block {b}: {time.perf_counter() - t_all:.0f} s so far, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    wall = time.perf_counter() - t_all - gen_s

    # The down_proj round split: its column loop alone (every block's rounding, no products).
    out, n = GEMMA_2B["down_proj"]
    block = 128
    w = generated_weight((out, n), seed=7)
    s_row = scales(w, BITS)
    u = jnp.eye(block) + 0.01 * jnp.triu(jnp.ones((block, block)), 1)  # the loop's cost does not depend on u

    @jax.jit
    def column_loop(w: jax.Array, u: jax.Array, s: jax.Array) -> jax.Array:
        wb = w.reshape(out, n // block, block).transpose(1, 0, 2)
        sb = jnp.broadcast_to(s[:, None], (out, block))
        return lax.map(lambda x: _round_block(x, u, sb, jnp.float32(7.0)), wb)

    column_loop(w, u, s_row).block_until_ready()
    t = time.perf_counter()
    column_loop(w, u, s_row).block_until_ready()
    loop_s = time.perf_counter() - t
    return {
        "factor": factor_times,
        "round": round_times,
        "wall": wall,
        "gen": gen_s,
        "down_loop": loop_s,
        "rss": peak_rss_gib(),
    }


def torch_fasterquant(W, H, scale, bits: int, blocksize: int = 128, percdamp: float = 0.01) -> dict:
    """IST-DASLab/gptq `GPTQ.fasterquant`, line by line, with fixed per-row symmetric scales.

    W: (rows, columns), H: (columns, columns), scale: (rows, 1). Returns phase timings.
    """
    import torch

    times = {}
    t = time.perf_counter()
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    maxq = 2 ** (bits - 1) - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    times["factor"] = time.perf_counter() - t
    loop = update = 0.0
    for i1 in range(0, columns, blocksize):
        t = time.perf_counter()
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.clamp(torch.round(w.unsqueeze(1) / scale), -maxq - 1, maxq) * scale
            q = q.flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        loop += time.perf_counter() - t
        t = time.perf_counter()
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        update += time.perf_counter() - t
    times["loop"] = loop
    times["update"] = update
    return times


def torch_part() -> dict:
    import torch

    torch.set_num_threads(2)
    from duquant_jax.demo import generated_weight  # JAX only to draw the same weights
    from duquant_jax.quantize import weight_scales

    shapes = {"q_proj": "qkv", "k_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up", "down_proj": "down"}
    res = {}
    for name, inp in shapes.items():
        out, n = GEMMA_2B[name]
        h = torch.from_numpy(hessian_np(n, seed=len(inp)))
        w_j = generated_weight((out, n), seed=len(name))
        s = torch.from_numpy(np.asarray(weight_scales(w_j, BITS)))[:, None]
        w = torch.from_numpy(np.asarray(w_j))
        t = time.perf_counter()
        times = torch_fasterquant(w, h, s, BITS)
        times["total"] = time.perf_counter() - t
        res[name] = times
        del h
        print(f"torch {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), flush=True)
    res["rss"] = peak_rss_gib()
    res["threads"] = torch.get_num_threads()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=GEMMA_2B_BLOCKS)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference loop")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_child:
        print("RESULT " + json.dumps(torch_part()))
        return

    j = jax_part(args.blocks)
    torch_res = None
    if not args.no_torch:
        proc = subprocess.run(
            [sys.executable, __file__, "--torch-child"], capture_output=True, text=True, check=True
        )
        print(proc.stdout, end="")
        torch_res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])

    n_layers = args.blocks * len(GEMMA_2B)
    med = statistics.median
    compile_s = sum(max(ts[0] - med(ts[1:]), 0.0) for ts in list(j["factor"].values()) + list(j["round"].values()) if len(ts) > 1)
    rows = []
    in_of = {"qkv": 2048, "o": 2048, "gate_up": 2048, "down": 16384}
    for inp, layers in INPUTS.items():
        ft = j["factor"][inp]
        rows.append([f"factor {inp} ({', '.join(layers)})", f"{in_of[inp]}", f"{med(ft[1:] or ft):.2f}", f"{ft[0]:.2f}", ""])
    for name, (out, n) in GEMMA_2B.items():
        rt = j["round"][name]
        tr = ""
        if torch_res and name in torch_res:
            tr = f"{torch_res[name]['total']:.2f}"
        rows.append([f"round {name}", f"{out}x{n}", f"{med(rt[1:] or rt):.2f}", f"{rt[0]:.2f}", tr])
    factor_total = sum(sum(v) for v in j["factor"].values())
    round_total = sum(sum(v) for v in j["round"].values())
    down_round = med(j["round"]["down_proj"][1:] or j["round"]["down_proj"])
    down_factor = med(j["factor"]["down"][1:] or j["factor"]["down"])
    lines = [
        f"`flock /tmp/duquant-cpu.lock python bench/gptq_speed.py --blocks {args.blocks}`: "
        f"{n_layers} layers ({args.blocks} blocks x 7), 4 Hessians per block (q/k/v and gate/up share a factor), "
        f"{BITS}-bit per-row scales, block 128, damp 0.01, no act_order. Hessians: expectation of XᵀX over "
        f"{TOKENS} tokens of a rank-{RANK} mixture plus 0.1 noise, outlier channels x20 (generation not timed).",
        "",
        table(["step", "shape", "JAX s (median)", "JAX first call s", "torch port s (one layer)"], rows),
        "",
        f"**JAX total: {j['wall']:.0f} s** for the {n_layers} layers (factors {factor_total:.0f} s, rounding "
        f"{round_total:.0f} s; first-call overhead, i.e. compilation and first allocations, {compile_s:.0f} s of it: "
        f"each shape's first call minus the median of its later calls); peak RSS {j['rss']:.2f} GiB.",
        "",
        f"down_proj (2048x16384) per layer: Cholesky factor {down_factor:.1f} s; round {down_round:.1f} s, of which "
        f"the column loop {j['down_loop']:.1f} s and the products between blocks {down_round - j['down_loop']:.1f} s.",
    ]
    if torch_res:
        per_block = (
            torch_res["q_proj"]["total"]
            + 2 * torch_res["k_proj"]["total"]
            + torch_res["o_proj"]["total"]
            + 2 * torch_res["gate_proj"]["total"]
            + torch_res["down_proj"]["total"]
        )
        torch_total = per_block * args.blocks
        d = torch_res["down_proj"]
        lines += [
            "",
            f"PyTorch port of `fasterquant` ({torch_res['threads']} threads, float32), one full layer per shape "
            f"(k/v counted as k, up as gate), each layer factorizing its own H as the reference does: "
            f"{per_block:.0f} s per block, **{torch_total / 60:.1f} min for the {n_layers} layers** "
            f"(scaled x{args.blocks}), **{torch_total / j['wall']:.1f}x** the JAX total; peak RSS "
            f"{torch_res['rss']:.2f} GiB. Its down_proj: factor (chol, cholesky_inverse, chol) {d['factor']:.1f} s, "
            f"column loop {d['loop']:.1f} s, block updates {d['update']:.1f} s.",
        ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("GPTQ speed", body)


if __name__ == "__main__":
    main()
