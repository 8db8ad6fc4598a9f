"""`DuQuantLinear` (W4A8 fake-quant) vs `nn.Linear` latency on CPU, and `quantize_` time.

    python bench/forward_speed.py [--no-write]

Gemma-2B shapes at 1, 16 and 256 tokens, float32 and bfloat16; median of
repeated calls after warm-up. Writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GEMMA_2B, best_time, table, write_section  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402
from interop import DuQuantLinear, calibrate, quantize_  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    torch.manual_seed(0)
    rows = []
    ratios_256 = []
    block_ms = {}  # (dtype, tokens) -> [nn.Linear ms, DuQuantLinear ms] summed over one block's 7 linears
    for name, (out, n_in) in GEMMA_2B.items():
        lin = torch.nn.Linear(n_in, out)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
        dq = DuQuantLinear.from_linear(lin, DuQuantConfig())
        model = torch.nn.Sequential(dq)
        with calibrate(model), torch.no_grad():
            model(torch.randn(64, n_in))
        for dtype in (torch.float32, torch.bfloat16):
            ref_l, dq_l = lin.to(dtype), dq.to(dtype)
            for t in tokens:
                x = torch.randn(t, n_in, dtype=dtype)
                with torch.inference_mode():
                    ref_l(x), dq_l(x)
                    reps = 20 if t < 256 else 5
                    t_ref = best_time(lambda: ref_l(x), reps)
                    t_dq = best_time(lambda: dq_l(x), reps)
                ratio = t_dq / t_ref
                acc = block_ms.setdefault((str(dtype).replace("torch.", ""), t), [0.0, 0.0])
                acc[0] += t_ref
                acc[1] += t_dq
                if t == 256:
                    ratios_256.append(ratio)
                row = [name, f"{out}x{n_in}", str(dtype).replace("torch.", ""), str(t), f"{t_ref * 1e3:.2f}", f"{t_dq * 1e3:.2f}", f"{ratio:.2f}x"]
                rows.append(row)
                print(" | ".join(row), flush=True)
            lin, dq = lin.float(), dq.float()

    block = torch.nn.Sequential(*[torch.nn.Linear(n_in, out) for out, n_in in GEMMA_2B.values()])
    t0 = time.perf_counter()
    quantize_(block, DuQuantConfig(), progress=False)
    t_quant = time.perf_counter() - t0
    per_block = "; ".join(f"{dt} {t} tokens {b / a:.2f}x" for (dt, t), (a, b) in block_ms.items())
    summary = (
        f"W4A8 forward / nn.Linear at 256 tokens, per layer: median {np.median(ratios_256):.2f}x, "
        f"worst {max(ratios_256):.2f}x. Over one whole Gemma-2B block (the 7 linears' times summed): {per_block}. "
        f"`quantize_` on one Gemma-2B block (7 linears, 0.22 B parameters, first call so compilation included): {t_quant:.1f} s."
    )
    print(summary)
    if not args.no_write:
        body = (
            "`python bench/forward_speed.py` — CPU latency, median of repeated calls after warm-up, "
            "`DuQuantLinear` W4A8 calibrated (rotations + activation fake-quant + cached dequantized weight).\n\n"
            + table(["layer", "out x in", "dtype", "tokens", "nn.Linear ms", "DuQuantLinear ms", "ratio"], rows)
            + "\n\n"
            + summary
        )
        write_section("Forward speed (bench/forward_speed.py)", body)


if __name__ == "__main__":
    main()
