"""The compiled helpers (`interop.compiled`) against the torch ops they replace, on the Gemma-2B block's shapes.

    python bench/compiled_helpers.py [--tokens 1,16,256] [--rounds 15] [--no-write]

Per distinct Gemma-2B linear shape, bfloat16 activations:

- the `dequant-bf16` product (per-token int8 activations, or none) with the
  helpers (`kernel_options(compiled=True)`, the default) and without, for 4-bit
  codes in groups of 128 (the `w4a8` / `w4a16` presets' layout), 8-bit in groups
  of 128, and 4-bit per row; beside them `nn.Linear` in bfloat16 and the path
  the autotuner picks with the helpers (its time);
- the per-token activation quantization alone (`kernels.quantize_tokens`), with and without.

Timing as bench/kernel_speed.py: every variant of one (shape, tokens) warmed
up, then timed once per round, round after round; medians over the rounds.
Random codes and scales. Writes the section "Compiled helpers" of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import GEMMA_2B, commit, table, write_section  # noqa: E402

from interop import compiled, kernel_tuning  # noqa: E402
from interop.kernels import ActQuant, choose_path, kernel_options, quantize_tokens, quantized_matmul  # noqa: E402
from interop.qweight import QuantizedWeight  # noqa: E402

CONFIGS = {  # name: (bits, group, activations)
    "W4A8 g128": (4, 128, ActQuant("dynamic-token", 8)),
    "W4A16 g128": (4, 128, ActQuant("none")),
    "W8A8 g128": (8, 128, ActQuant("dynamic-token", 8)),
    "W4A16 row": (4, None, ActQuant("none")),
}


def _weight(out: int, n_in: int, bits: int, group: int | None) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(out + n_in)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (out, n_in), generator=gen, dtype=torch.int8)
    shape = (out,) if group is None else (out, -(-n_in // group))
    return QuantizedWeight(codes, torch.rand(shape, generator=gen) * 0.01 + 1e-3, bits=bits, group_size=group)


def _medians(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """ms per variant: each warmed up twice, then one call per round, interleaved."""
    for fn in variants.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _with(flag: bool, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with kernel_options(compiled=flag):
            return fn()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if compiled.load() is None:
        raise SystemExit(f"the compiled helpers are unavailable here: {compiled.unavailable()}")
    token_counts = [int(t) for t in args.tokens.split(",")]
    shapes = {}
    for name, shape in GEMMA_2B.items():
        shapes.setdefault(shape, []).append(name)
    product_rows, prepare_rows, seen, totals = [], [], set(), {}
    for (out, n_in), names in shapes.items():
        label = "/".join(names)
        lin = torch.nn.Linear(n_in, out, bias=False).to(torch.bfloat16)
        weights = {c: _weight(out, n_in, bits, group) for c, (bits, group, _) in CONFIGS.items()}
        for tokens in token_counts:
            x = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
            variants: dict[str, Callable[[], object]] = {"linear": lambda lin=lin, x=x: lin(x)}
            picks = {}
            for c, (_, _, act) in CONFIGS.items():
                w = weights[c]
                for flag in (False, True):
                    variants[f"{c} {flag}"] = _with(flag, lambda w=w, act=act, x=x: quantized_matmul(x, w, act, path="dequant-bf16"))
                with kernel_options(compiled=True):
                    picks[c] = choose_path(w, act, torch.bfloat16, tokens)
                variants[f"{c} auto"] = _with(True, lambda w=w, act=act, x=x, p=picks[c]: quantized_matmul(x, w, act, path=p))
            act8 = ActQuant("dynamic-token", 8)
            for flag in (False, True):
                variants[f"prepare {flag}"] = _with(flag, lambda x=x, act8=act8: quantize_tokens(x, act8))
            ms = _medians(variants, args.rounds)
            for k, v in ms.items():  # the whole block: each shape as often as the block has it
                totals[(tokens, k)] = totals.get((tokens, k), 0.0) + v * len(names)
            base = ms["linear"]
            for c in CONFIGS:
                off, on, auto = ms[f"{c} False"], ms[f"{c} True"], ms[f"{c} auto"]
                product_rows.append([
                    label, f"{out}x{n_in}", str(tokens), c, f"{base:.2f}", f"{off:.2f} ({off / base:.2f}x)",
                    f"{on:.2f} ({on / base:.2f}x)", f"{off / on:.2f}x", f"{picks[c]} {auto:.2f} ({auto / base:.2f}x)",
                ])
            p_off, p_on = ms["prepare False"], ms["prepare True"]
            if (tokens, n_in) not in seen:  # it depends on the input's shape only
                seen.add((tokens, n_in))
                prepare_rows.append([f"{tokens}x{n_in}", f"{p_off:.3f}", f"{p_on:.3f}", f"{p_off / p_on:.1f}x"])
            print(label, tokens, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    block_rows = []
    for tokens in token_counts:
        base = totals[(tokens, "linear")]
        for c in CONFIGS:
            off, on, auto = (totals[(tokens, f"{c} {k}")] for k in ("False", "True", "auto"))
            block_rows.append([str(tokens), c, f"{base:.2f}", f"{off:.2f} ({off / base:.2f}x)", f"{on:.2f} ({on / base:.2f}x)", f"{auto:.2f} ({auto / base:.2f}x)"])
    body = (
        f"`python bench/compiled_helpers.py --tokens {args.tokens} --rounds {args.rounds}` (commit {commit()}); CPU: "
        f"{kernel_tuning.cpu_description()}; torch threads {torch.get_num_threads()}. bfloat16 activations, times in ms "
        "(medians over interleaved rounds), ratios to bfloat16 `nn.Linear`. `dequant-bf16` forced, without the helpers "
        "(torch ops make each weight tile) and with them (one C pass per tile, wider tiles); `auto`: the path the "
        "autotuner picks with the helpers.\n\n"
        + table(["layer", "out x in", "tokens", "config", "nn.Linear bf16", "dequant-bf16, torch ops", "dequant-bf16, compiled",
                 "speed-up", "auto (compiled)"], product_rows)
        + "\n\nThe whole block (7 linears), ms:\n\n"
        + table(["tokens", "config", "nn.Linear bf16", "dequant-bf16, torch ops", "dequant-bf16, compiled", "auto (compiled)"], block_rows)
        + "\n\nPer-token int8 activation quantization (`kernels.quantize_tokens`), ms:\n\n"
        + table(["tokens x in", "torch ops", "compiled", "speed-up"], prepare_rows)
    )
    if not args.no_write:
        write_section("Compiled helpers", body)
    print(body)


if __name__ == "__main__":
    main()
