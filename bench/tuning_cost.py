"""What the kernel autotuner's first measurement costs: seconds to choose a path per key, on this machine.

    python bench/tuning_cost.py [--tokens 1,16,256] [--modes native,all] [--no-write]

A model's first product of each (shape, dtype, token bucket) measures every candidate path
(`interop.kernels.choose_path`): on a CPU that lacks the instructions a path needs, torch emulates
it and a single call can take a minute. For the four distinct linear shapes of one Gemma-2B block
in the `w4a8` preset's layout (4-bit codes in groups of 128, int4pack; int8 per-token activations),
float32 and bfloat16 inputs, this times `choose_path` with a fresh in-memory tuner (no disk cache):

- `native`: the default, `kernel_options(native_only=True)`: paths this CPU runs natively only
  (`interop.kernels.emulated_here`);
- `all`: `native_only=False`, every path that can compute the product.

Reports per key the seconds, the path chosen and every candidate's measured ms, and the total per
mode; writes the section "Autotuner cost" of bench/RESULTS.md (the CPU named there: the answer
depends on its instructions).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import GEMMA_2B, commit, table, write_section  # noqa: E402

from interop import kernel_tuning  # noqa: E402
from interop.kernels import NATIVE_CPU_FLAGS, ActQuant, choose_path, emulated_here, kernel_options  # noqa: E402
from kernel_speed import _weight  # noqa: E402  (random codes and scales: speed does not depend on them)

MODES = {"native": True, "all": False}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--modes", default="native,all")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {list(MODES)}")
    rev = commit()
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, shape in GEMMA_2B.items():
        shapes.setdefault(shape, []).append(name)
    act = ActQuant("dynamic-token", 8)
    rows, totals = [], {}
    for mode in modes:
        tuner = kernel_tuning.set_tuner(kernel_tuning.Autotuner())  # fresh, in memory: every key measured
        total = 0.0
        try:
            with kernel_options(native_only=MODES[mode], path=None, autotune=True, precision="any"):
                for dname, dtype in DTYPES.items():
                    for i, ((out, n_in), names) in enumerate(shapes.items()):
                        weight = _weight(out, n_in, 4, 128, seed=i)
                        for t in tokens:
                            t0 = time.perf_counter()
                            path = choose_path(weight, act, dtype, t)
                            seconds = time.perf_counter() - t0
                            total += seconds
                            times = kernel_tuning.get_tuner().report()[-1].times
                            cells = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
                            rows.append([mode, dname, "/".join(names), f"{out}x{n_in}", str(t), f"{seconds:.1f}", path, cells])
                            print(" | ".join(rows[-1]), flush=True)
        finally:
            kernel_tuning.set_tuner(tuner)
        totals[mode] = total
    device = torch.device("cpu")
    skipped = {n: emulated_here(n, device) for n in NATIVE_CPU_FLAGS}
    skipped_text = "; ".join(f"`{n}`: {why}" for n, why in skipped.items() if why) or "none (this CPU runs every path natively)"
    body = "\n\n".join([
        f"`python bench/tuning_cost.py --tokens {args.tokens} --modes {args.modes}` (commit {rev}); CPU: "
        f"{kernel_tuning.cpu_description()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads. Seconds for `choose_path` to measure and pick a path per key (a fresh "
        "in-memory tuner: what a model's first product of each shape, dtype and token bucket costs), the `w4a8` "
        "layout (int4 g128, int8 per-token activations) on the Gemma-2B block's four shapes. Paths `native_only` "
        f"leaves unmeasured here: {skipped_text}.",
        table(["mode", "dtype", "layers", "out x in", "tokens", "tuning s", "chosen", "candidates (ms a call)"], rows),
        "Total: " + ", ".join(f"`{m}` {s:.1f} s" for m, s in totals.items()) + ".",
    ])
    print(body)
    if not args.no_write and not rev.endswith("+dirty"):
        write_section("Autotuner cost (bench/tuning_cost.py)", body)


if __name__ == "__main__":
    main()
