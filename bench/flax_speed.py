"""The Flax NNX `DuQuantLinear` on CPU: its integer product against the float path and `nnx.Linear`.

    python bench/flax_speed.py [--tokens 1,16,256] [--layers q_proj,gate_proj,down_proj] [--no-write]

For Gemma-2B shapes, float32 inputs, at 1, 16 and 256 tokens, median of
repeated jitted calls after warm-up:

- `nnx.Linear` (float32 kernel);
- `DuQuantLinear` W4A8 and W8A8, per-token dynamic activations (the integer
  path: codes unpacked from nibbles, `int8 x int8 -> int32` `lax.dot_general`),
  input rotation (Hadamard, blocks of 128) included;
- the product alone, three ways on the same codes: the int8 `dot_general`
  with int32 accumulation; the float path's dequantize-then-float32-product
  inside the jitted call (what a layer without integer products does); and a
  float32 product with a weight dequantized once beforehand (the speed a float
  copy of the weight would buy, at 4-8x the memory).

It also reads XLA's optimized HLO of the integer product to report what the
CPU compiler made of it (a library GEMM call or a loop fusion).
Writes the section "Flax NNX forward" of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GEMMA_2B, table, write_section  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402
from duquant_jax.integer import integer_product, unpack_nibbles  # noqa: E402
from duquant_jax.nn import DuQuantLinear  # noqa: E402


def _median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _hlo_summary(fn, *args) -> str:
    """What the compiled integer product is: the dot's operand types and whether it became a library call."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    dots = re.findall(r"= (\S+) dot\(([^)]*)\)", text)
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    fusions = len(re.findall(r"kind=kLoop|kind=kOutput|kind=kInput", text))
    dot_text = "; ".join(f"{out} dot({ops})" for out, ops in dots[:2]) or "no dot left (lowered into a fusion)"
    return f"{dot_text}; custom calls: {calls or 'none'}; fusions: {fusions}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--layers", default="q_proj,gate_proj,down_proj")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    rows, hlo = [], ""
    rng = np.random.default_rng(0)
    for name in args.layers.split(","):
        out, n_in = GEMMA_2B[name]
        lin = nnx.Linear(n_in, out, use_bias=False, rngs=nnx.Rngs(0))
        layers = {
            bits: DuQuantLinear.from_linear(
                lin, DuQuantConfig(weight_bits=bits, act_bits=8, rotation="hadamard", block_size=128,
                                   row_rot_mode="none", act_scheme="dynamic-token"), name=name)
            for bits in (4, 8)
        }
        codes = unpack_nibbles(layers[4].w_codes[...], n_in)
        w_scale = layers[4].w_scale[...]
        w_hat = codes.astype(jnp.float32) * w_scale[:, None]

        def jitted(module: nnx.Module):
            """The module's call jitted over its state (nnx.split/merge: no per-call graph walk)."""
            graphdef, state = nnx.split(module)
            fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
            return fn, state

        int_fn = jax.jit(lambda xq, c, s: integer_product(xq, c, s, None))
        deq_fn = jax.jit(lambda x, c, s: x @ (c.astype(jnp.float32) * s[:, None]).T)
        float_fn = jax.jit(lambda x, w: x @ w.T)
        for t in tokens:
            x = jnp.asarray(rng.standard_normal((t, n_in)), jnp.float32)
            xq = jnp.asarray(rng.integers(-127, 128, (t, n_in)), jnp.int8)
            reps = 30 if t < 256 else 10
            ms = {
                "nnx.Linear f32": _median_ms(*jitted(lin), x, repeats=reps),
                "DuQuantLinear W4A8": _median_ms(*jitted(layers[4]), x, repeats=reps),
                "DuQuantLinear W8A8": _median_ms(*jitted(layers[8]), x, repeats=reps),
                "int8 dot, int32 acc": _median_ms(int_fn, xq, codes, w_scale, repeats=reps),
                "dequantize + f32 dot": _median_ms(deq_fn, x, codes, w_scale, repeats=reps),
                "f32 dot, weight dequantized once": _median_ms(float_fn, x, w_hat, repeats=reps),
            }
            base = ms["nnx.Linear f32"]
            rows.append([name, f"{out}x{n_in}", str(t)] + [f"{v:.2f}" + ("" if k == "nnx.Linear f32" else f" ({v / base:.2f}x)") for k, v in ms.items()])
            print(" | ".join(rows[-1]), flush=True)
            if name == "q_proj" and t == tokens[-1]:
                hlo = _hlo_summary(lambda xq, c, s: integer_product(xq, c, s, None), xq, codes, w_scale)
    header = ["layer", "out x in", "tokens", "nnx.Linear f32 ms", "DuQuantLinear W4A8", "DuQuantLinear W8A8",
              "int8 dot, int32 acc", "dequantize + f32 dot", "f32 dot, weight dequantized once"]
    body = (
        "`python bench/flax_speed.py` — Flax NNX on CPU (XLA), float32 inputs, median of jitted calls after "
        "warm-up; ratios against `nnx.Linear`. `DuQuantLinear`: Hadamard B=128, per-token dynamic A8, per-row "
        "scales, integer product. The last three columns time the product alone on the same 4-bit codes.\n\n"
        + table(header, rows)
        + f"\n\nXLA's optimized HLO of the integer product (q_proj, {tokens[-1]} tokens): {hlo}.\n"
    )
    print(body)
    if not args.no_write:
        write_section("Flax NNX forward (bench/flax_speed.py)", body)


if __name__ == "__main__":
    main()
