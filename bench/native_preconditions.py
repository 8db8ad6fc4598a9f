"""Which operands crash torch's native quantized kernels: every probe in its own process.

For each kernel the project calls (`torch._int_mm`, `torch._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`), each operand is placed at a byte offset from
an aligned buffer (a slice of a larger one, as a tensor read from a safetensors
file is), for several token counts and input widths, and the *raw* kernel is
called in a fresh process. Outcome: ran (result checked against a float64
product), wrong result, a clean Python error, or the signal that ended the process.
These measurements are what `interop.native` enforces.

    python bench/native_preconditions.py            # writes bench/native_preconditions.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

PROBE = textwrap.dedent(
    """
    import sys, torch
    kernel, operand, off, m, k, n = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])

    def at(src, off_bytes):
        nbytes = src.numel() * src.element_size()
        base = torch.empty(nbytes + 256, dtype=torch.uint8)
        start = (-base.data_ptr()) % 64 + off_bytes
        return base[start:start + nbytes].view(src.dtype).view(src.shape).copy_(src)

    g = torch.Generator().manual_seed(0)
    o = lambda name: off if operand == name else 0
    if kernel == "int8pack":
        x = torch.randn(m, k, generator=g).bfloat16(); w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = (torch.rand(n, generator=g) + 0.5).bfloat16()
        y = torch._weight_int8pack_mm(at(x, o("x")), at(w, o("w")), at(s, o("s")))
        ref = x.double() @ (w.double() * s.double()[:, None]).T
    elif kernel == "int4pack":
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        x = torch.randn(m, k, generator=g).bfloat16(); sz = torch.zeros(k // 32, n, 2, dtype=torch.bfloat16); sz[..., 0] = 1
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(at(x, o("x")), at(w, o("w")), 32, at(sz, o("sz")))
        ref = x.double() @ (codes.double() - 8).T
    else:
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8); b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        out = at(torch.zeros(m, n, dtype=torch.int32), o("out"))
        y = torch._int_mm(at(a, o("a")), at(b, o("b")).t(), out=out)
        ref = a.double() @ b.double().T
    err = float(((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    print("ran" if err < 2e-2 else f"wrong result (rel. err {err:.2g})")
    """
)

OPERANDS = {"int8pack": ("x", "w", "s"), "int4pack": ("x", "w", "sz"), "int_mm": ("a", "b", "out")}
OFFSETS = (0, 1, 2, 4, 8, 16, 32, 48)
TOKENS = (1, 7)
WIDTHS = {"int8pack": (256, 24), "int4pack": (256,), "int_mm": (256, 24)}  # in_features; 24: not a multiple of 16


def run_probe(kernel: str, operand: str, offset: int, tokens: int, width: int, out: int = 128) -> str:
    """One raw kernel call in a fresh process -> its outcome."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, kernel, operand, str(offset), str(tokens), str(width), str(out)],
            capture_output=True, text=True, timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "hang (120 s)"
    if proc.returncode < 0:
        return f"CRASH (signal {-proc.returncode})"
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        if "storage_offset() must be divisible" in last:  # the probe cannot place this dtype there at all
            return "n/a"
        return f"error: {last[:90]}"
    return proc.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("native_preconditions.md")))
    args = parser.parse_args()
    lines = [
        "# Native kernel preconditions, measured (bench/native_preconditions.py)",
        "",
        f"{dt.date.today()}, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}, "
        f"{_cpu_model()}. Each cell: the raw kernel called once in a fresh process with one operand at a byte offset "
        "from a 64-byte boundary (other operands aligned), out = 128; tokens 1 and 7 (two outcomes: they differ by token count). "
        "n/a: a tensor of that dtype cannot start at that offset.",
        "",
    ]
    for kernel, operands in OPERANDS.items():
        for width in WIDTHS[kernel]:
            lines += [f"## {kernel}, in = {width}", "", "| operand | " + " | ".join(f"+{o} B" for o in OFFSETS) + " |", "|---" * (len(OFFSETS) + 1) + "|"]
            for operand in operands:
                cells = []
                for off in OFFSETS:
                    outcomes = {run_probe(kernel, operand, off, t, width) for t in TOKENS}
                    cells.append(" / ".join(sorted(outcomes)) if len(outcomes) > 1 else outcomes.pop())
                lines.append(f"| {operand} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
            lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()
