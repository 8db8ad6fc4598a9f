"""Quantized product kernels (`interop.kernels`) against `nn.Linear`, per path, on the Gemma-2B block.

    python bench/kernel_speed.py [--tokens 1,16,256] [--rounds 15] [--layers q_proj,...] [--threads N] [--groups 128]
        [--dtypes float32,bfloat16] [--tag NAME] [--all-paths] [--no-write]

For each linear of one Gemma-2B block, in float32 and bfloat16 (`--dtypes`) at 1, 16 and
256 tokens: `nn.Linear` in both dtypes; every kernel path of W8A8 and W4A8
(dynamic per-token activations) and W8A16 / W4A16, with per-row scales and with
groups of 128; the path the autotuner picks (measured once per key, as a model
would); torchao's int8 configurations (when torchao is installed); and the cost
of the rotations a `DuQuantLinear` adds around the product (a row gather and a
block-diagonal product of the input, blocks of 16 and 128, and "restore"'s
output rotation, blocks of 16), which the integer codes cannot absorb.

Timing: every variant of one (layer, dtype, tokens) is warmed up, then timed
once per round, round after round, and its median over the rounds reported:
interleaving spreads the bursts of load of a shared machine over all variants
alike. Random codes and scales (the product's speed does not depend on their
values). Paths this CPU would run emulated (`interop.kernels.emulated_here`: int8 or
bfloat16 GEMMs without the instructions, seconds to minutes a call) are left out, as the
autotuner leaves them out (`--all-paths` times them too). Each weight is held in the layout a `DuQuantLinear` of its configuration
gets on this machine (`layout="auto"`, integer activations said), so the `(auto)`
columns are what a model runs. Writes the section "Kernel speed" of
bench/RESULTS.md (`--tag NAME`: "Kernel speed, NAME", and kernel_speed_NAME.md/.png,
for another machine's run beside it).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import GEMMA_2B, best_time, commit, table, write_section  # noqa: E402

from interop import kernel_tuning  # noqa: E402
from interop.kernels import NATIVE_CPU_FLAGS, ActQuant, candidates, emulated_here, quantized_matmul  # noqa: E402
from interop.qweight import QuantizedWeight  # noqa: E402

def configs(groups: tuple[int, ...] = (128,)) -> dict[str, tuple[int, int | None, ActQuant]]:
    """{name: (weight bits, group size, activation handling)}: W8A8, W4A8, W8A16, W4A16 per row, then with each of `groups`."""
    out: dict[str, tuple[int, int | None, ActQuant]] = {}
    for group in (None, *groups):
        suffix = "" if group is None else f" g{group}"
        out[f"W8A8{suffix}"] = (8, group, ActQuant("dynamic-token", 8))
        out[f"W4A8{suffix}"] = (4, group, ActQuant("dynamic-token", 8))
        out[f"W8A16{suffix}"] = (8, group, ActQuant("none"))
        out[f"W4A16{suffix}"] = (4, group, ActQuant("none"))
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROTATIONS = ("rot in B=16", "rot out B=16", "rot in B=128")


def _weight(out: int, n_in: int, bits: int, group: int | None, seed: int, integer_acts: bool = False) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (out, n_in), generator=gen, dtype=torch.int8)
    shape = (out,) if group is None else (out, -(-n_in // group))
    return QuantizedWeight(codes, torch.rand(shape, generator=gen) * 0.01 + 1e-3, bits=bits, group_size=group,
                           integer_acts=integer_acts)


def _rotation(n: int, tokens: int, dtype: torch.dtype, block: int) -> Callable[[], torch.Tensor]:
    """DuQuantLinear.rotate_input's work on n channels: gather rows of xᵀ, one bmm of the (n/B, B, B) blocks."""
    x = torch.randn(tokens, n, dtype=dtype)
    perm = torch.randperm(n)
    r = torch.linalg.qr(torch.randn(n // block, block, block))[0].to(dtype)

    def rotate():
        xt = x.t().contiguous().index_select(0, perm)
        return torch.bmm(r, xt.view(n // block, block, tokens)).view(n, tokens).t()

    return rotate


def _torchao_models(lin: torch.nn.Linear, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {}
    out = {}
    for name, cfg in (("torchao int8-dyn", Int8DynamicActivationInt8WeightConfig()), ("torchao int8-wo", Int8WeightOnlyConfig())):
        m = torch.nn.Sequential(torch.nn.Linear(lin.in_features, lin.out_features, bias=False)).to(dtype)
        with torch.no_grad():
            m[0].weight.copy_(lin.weight)
        quantize_(m, cfg)
        out[name] = m
    return out


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each fn over `rounds` rounds, each round timing every fn once (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(best_time(fn, 1) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--rounds", type=int, default=15, help="timing rounds (half as many at 256 tokens)")
    ap.add_argument("--layers", default=",".join(GEMMA_2B), help="comma-separated subset of the Gemma-2B block")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); the section name says it")
    ap.add_argument("--groups", default="128", help="comma-separated weight group sizes timed beside per-row scales")
    ap.add_argument("--tag", default=None, help="write 'Kernel speed, TAG' and kernel_speed_TAG.md/.png (another machine's run)")
    ap.add_argument("--all-paths", action="store_true", help="also time the paths this CPU runs emulated")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="input dtypes of the quantized products (both nn.Linear dtypes are always timed)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", args.tag):
        raise SystemExit(f"--tag must be 1-40 letters, digits, '_' or '-' (it names files); got {args.tag!r}")
    cfgs = configs(tuple(int(g) for g in args.groups.split(",") if g.strip()))
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise SystemExit(f"--dtypes must name some of {list(DTYPES)}; got {args.dtypes!r}")
    layers = {k: GEMMA_2B[k] for k in args.layers.split(",")}
    torch.manual_seed(0)
    kernel_tuning.set_tuner(kernel_tuning.Autotuner())  # in memory: every key measured afresh in this run
    rev = commit()
    load_before = os.getloadavg()[0]

    per_layer, detail, memory = [], [], []
    block: dict[tuple[str, int], dict[str, float]] = {}
    ao_cols: list[str] = []
    for li, (name, (out, n_in)) in enumerate(layers.items()):
        weights = {c: _weight(out, n_in, bits, group, seed=li, integer_acts=act.integer) for c, (bits, group, act) in cfgs.items()}
        lin = torch.nn.Linear(n_in, out, bias=False)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
        linears = {d: torch.nn.Linear(n_in, out, bias=False).to(dt) for d, dt in DTYPES.items()}
        for d, m in linears.items():
            with torch.no_grad():
                m.weight.copy_(lin.weight)
        for dname, dtype in ((d, DTYPES[d]) for d in dtypes):
            ao = _torchao_models(lin, dtype)
            ao_cols = list(ao) or ao_cols
            for t in tokens:
                x = torch.randn(t, n_in)
                xs = {d: x.to(dt) for d, dt in DTYPES.items()}
                xd = xs[dname]
                fns: dict[str, Callable[[], object]] = {}
                for d in DTYPES:
                    fns[f"nn.Linear {d}"] = lambda m=linears[d], v=xs[d]: m(v)
                for aname, m in ao.items():
                    fns[aname] = lambda m=m, xd=xd: m(xd)
                paths_of = {}
                for cname, (_, _, act) in cfgs.items():
                    w = weights[cname]
                    paths_of[cname] = [p for p in candidates(w, act, dtype, t)
                                       if args.all_paths or emulated_here(p, torch.device("cpu")) is None]
                    for p in paths_of[cname]:
                        fns[f"{cname} | {p}"] = lambda w=w, act=act, p=p, xd=xd: quantized_matmul(xd, w, act, path=p)
                    fns[cname] = lambda w=w, act=act, xd=xd: quantized_matmul(xd, w, act)  # the autotuner's pick
                fns["rot in B=16"] = _rotation(n_in, t, dtype, 16)
                fns["rot out B=16"] = _rotation(out, t, dtype, 16)
                fns["rot in B=128"] = _rotation(n_in, t, dtype, 128)
                with torch.inference_mode():
                    ms = _interleaved(fns, args.rounds if t < 256 else max(3, args.rounds // 2))
                chosen = {c: weights[c].last_path for c in cfgs}
                acc = block.setdefault((dname, t), {})
                for k, v in ms.items():
                    acc[k] = acc.get(k, 0.0) + v
                best_float = min(ms["nn.Linear float32"], ms["nn.Linear bfloat16"])
                row = [name, f"{out}x{n_in}", dname, str(t), f"{ms['nn.Linear float32']:.2f}", f"{ms['nn.Linear bfloat16']:.2f}"]
                row += [f"{ms[a]:.2f}" for a in ao]
                row += [f"{chosen[c]} {ms[c]:.2f} ({ms[c] / best_float:.2f}x)" for c in cfgs]
                per_layer.append(row)
                for cname in cfgs:
                    for p in paths_of[cname]:
                        detail.append([name, cname, dname, str(t), p, f"{ms[f'{cname} | {p}']:.2f}", "yes" if p == chosen[cname] else ""])
                print(" | ".join(row), flush=True)
        for cname, w in weights.items():
            memory.append([name, f"{out}x{n_in}", cname, w.layout, str(w.nbytes()), f"{w.nbytes() / (out * n_in * 2):.3f}"])
        memory.append([name, f"{out}x{n_in}", "nn.Linear bfloat16", "-", str(out * n_in * 2), "1.000"])

    summary, lines = [], []
    for (dname, t), acc in block.items():
        f32, bf16 = acc["nn.Linear float32"], acc["nn.Linear bfloat16"]
        best = min(f32, bf16)
        cells = [dname, str(t), f"{f32:.2f}", f"{bf16:.2f}"] + [f"{acc[c]:.2f}" for c in ao_cols]
        cells += [f"{acc[c]:.2f} ({acc[c] / best:.2f}x)" for c in cfgs]
        cells += [f"{acc[r]:.2f}" for r in ROTATIONS]
        summary.append(cells)
        rot = acc["rot in B=16"] + acc["rot out B=16"]
        lines.append(
            f"- {dname}, {t} tokens: best float {best:.2f} ms ({'float32' if f32 <= bf16 else 'bfloat16'} nn.Linear); "
            + ", ".join(f"{c} {acc[c] / best:.2f}x" for c in cfgs)
            + f" of it; W4A8 with its rotations (B=16, in and out) {(acc['W4A8'] + rot) / best:.2f}x; "
            f"bfloat16 nn.Linear over W8A8 {bf16 / acc['W8A8']:.2f}x, over W4A8 {bf16 / acc['W4A8']:.2f}x"
            + "".join(f"; {a} {acc[a] / best:.2f}x" for a in ao_cols)
            + "."
        )
    header = ["dtype", "tokens", "nn.Linear f32", "nn.Linear bf16"] + ao_cols + [f"{c} (auto)" for c in cfgs] + list(ROTATIONS)
    load_after = os.getloadavg()[0]
    suffix = "" if not args.threads else f", {args.threads} thread{'s' if args.threads > 1 else ''}"
    stem = "kernel_speed" + ("" if not args.threads else f"_{args.threads}thread")
    if args.tag:
        suffix, stem = f"{suffix}, {args.tag}", f"{stem}_{args.tag}"
    largest = max(layers, key=lambda k: layers[k][0] * layers[k][1])
    body = (
        f"`python bench/kernel_speed.py{''.join(' ' + a for a in sys.argv[1:])}` (commit {rev}) — one Gemma-2B block's 7 linears, ms summed over the block; every "
        "variant timed in interleaved rounds, median over the rounds; `(auto)`: the path the autotuner picked "
        "for each layer (measured once per key, in this run); ratios against the faster of float32 and "
        "bfloat16 `nn.Linear`. "
        f"CPU: {kernel_tuning.cpu_description()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads; 1-minute load average {load_before:.1f} before, {load_after:.1f} after "
        "(the machine is shared: other jobs ran beside this one). "
        + ("Every path timed (`--all-paths`)." if args.all_paths else
           "Left out as emulated here: " + (", ".join(f"`{p}` ({why})" for p in NATIVE_CPU_FLAGS
                                                      if (why := emulated_here(p, torch.device("cpu")))) or "nothing") + ".")
        + "\n\n"
        + table(header, summary)
        + "\n\n"
        + "\n".join(lines)
        + f"\n\n![block time against the best float path]({stem}.png)\n\n"
        + f"Bytes held by the {largest} weight ({layers[largest][0]}x{layers[largest][1]}) in each form (codes, float32 "
        "scales and the kernels' small derived tensors; rotations not included) against the bfloat16 `nn.Linear` "
        f"weight; every layer's in [{stem}.md]({stem}.md).\n\n"
        + table(["form", "layout", "bytes", "of bf16"], [m[2:] for m in memory if m[0] == largest])
        + f"\n\nPer layer, the path the autotuner took and every path's time: [{stem}.md]({stem}.md).\n"
    )
    detail_body = (
        f"# Kernel speed per layer{suffix}\n\nWritten by `python bench/kernel_speed.py` with the section "
        f"\"Kernel speed{suffix}\" of RESULTS.md (same run).\n\n"
        "Per layer: the path the autotuner took, its time in ms and its ratio to the best float path.\n\n"
        + table(["layer", "out x in", "dtype", "tokens", "nn.Linear f32", "nn.Linear bf16"] + ao_cols + list(cfgs), per_layer)
        + "\n\nEvery path (ms; `auto`: the autotuner's pick):\n\n"
        + table(["layer", "config", "dtype", "tokens", "path", "ms", "auto"], detail)
        + "\n\nBytes held by each weight form against the bfloat16 `nn.Linear` weight:\n\n"
        + table(["layer", "out x in", "form", "layout", "bytes", "of bf16"], memory)
        + "\n"
    )
    print("\n".join(lines))
    if not args.no_write:
        here = Path(__file__).resolve().parent
        (here / f"{stem}.md").write_text(detail_body)
        plot(header, summary, here / f"{stem}.png", f"Gemma-2B block{suffix}")
        write_section(f"Kernel speed{suffix} (bench/kernel_speed.py)", body)


def plot(header: list[str], summary: list[list[str]], path: Path, title: str) -> None:
    """One panel per dtype: each configuration's block time over the best float path's, against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [h for h in header if h.endswith("(auto)")]
    dtypes = list(dict.fromkeys(r[0] for r in summary))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, d in zip(axes[0], dtypes):
        rows = [r for r in summary if r[0] == d]
        tokens = [int(r[1]) for r in rows]
        for c in configs:
            i = header.index(c)
            ax.plot(tokens, [float(r[i].split("(")[1].rstrip("x)")) for r in rows], marker="o", label=c.replace(" (auto)", ""))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.set_xlabel("tokens")
        ax.set_ylabel("time / best float nn.Linear")
        ax.set_title(f"{title}, {d} inputs", fontsize=10)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
