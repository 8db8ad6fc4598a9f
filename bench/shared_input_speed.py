"""One input transform per group against one per layer, at run time, on the Gemma-2B block's input groups.

    python bench/shared_input_speed.py [--tokens 1,16,256] [--rounds 9] [--presets w8a8,w4a8] [--modes eager,compiled] [--no-write]

The block's two groups of layers that read one input, q/k/v (2048 -> 2048, 256, 256) and gate/up
(2048 -> 16384, 16384), random weights (seed 0), quantized with each preset's layout (weights rounded to
nearest: GPTQ changes codes, not the kernels), statistics on 4 random 256-token inputs. `linked`: the
group shares its transform (`interop.shared_input`: the input is transformed and quantized once);
`alone`: the same packs, each layer transforming its input itself. Timed in bfloat16 and float32 at
each token count, as one call of every member on one input, kernel paths frozen (`freeze_paths`);
`compiled` is `torch.compile(group, dynamic=True)` of the whole group. Variants of one
(group, preset, dtype, tokens) are interleaved round after round; medians. Writes a section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import GEMMA_2B, commit, table, write_section  # noqa: E402
from kernel_speed import DTYPES, _interleaved  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402
from interop import observe, quantize_  # noqa: E402
from interop.kernels import freeze_paths  # noqa: E402

GROUPS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "gate/up": ("gate_proj", "up_proj")}


class Group(nn.Module):
    """The layers of one input group, called on one input: returns every member's output."""

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        torch.manual_seed(0)
        self.names = names
        for n in names:
            out, n_in = GEMMA_2B[n]
            setattr(self, n, nn.Linear(n_in, out, bias=False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n)(x) for n in self.names)


def variants(names: tuple[str, ...], preset: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """{"linked": the group sharing its transform, "alone": the same packs, each layer alone}."""
    group = Group(names).eval()
    gen = torch.Generator().manual_seed(1)
    n_in = GEMMA_2B[names[0]][1]
    with torch.no_grad(), observe(group) as stats:
        for _ in range(4):
            group(torch.randn(256, n_in, generator=gen))
    quantize_(group, DuQuantConfig.preset(preset, weight_method="rtn"), progress=False, stats=stats, input_groups="auto")
    group = group.to(dtype)
    freeze_paths(group, dtype=dtype)
    alone = copy.deepcopy(group)
    getattr(alone, names[0]).input_group.unlink()
    return {"linked": group, "alone": alone}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,256")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--presets", default="w8a8,w4a8")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = []
    for gname, names in GROUPS.items():
        for preset in args.presets.split(","):
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                models = variants(names, preset, dtype)
                for mode in args.modes.split(","):
                    runners = models if mode == "eager" else {k: torch.compile(m, dynamic=True) for k, m in models.items()}
                    for tokens in (int(t) for t in args.tokens.split(",")):
                        x = torch.randn(tokens, GEMMA_2B[names[0]][1], generator=torch.Generator().manual_seed(3)).to(dtype)
                        with torch.inference_mode():
                            got = [runners["linked"](x), runners["alone"](x)]
                            same = all(torch.equal(a, b) for a, b in zip(*got))
                            ms = _interleaved({k: (lambda r=r: r(x)) for k, r in runners.items()}, args.rounds)
                        rows.append([gname, preset, dname, mode, str(tokens), f"{ms['alone']:.2f}", f"{ms['linked']:.2f}",
                                     f"{ms['linked'] / ms['alone']:.2f}x", "yes" if same else "no"])
                        print(" | ".join(rows[-1]), flush=True)
                    torch._dynamo.reset()
    body = (
        f"`python bench/shared_input_speed.py` (commit {commit()}): the Gemma-2B block's input groups, one call of every "
        f"member on one input; `alone`: each layer transforms and quantizes the input itself; `linked`: once for the group "
        f"(`interop.shared_input`). Medians of {args.rounds} interleaved rounds, ms. Last column: the two give bit-identical outputs.\n\n"
        + table(["group", "preset layout", "dtype", "mode", "tokens", "alone ms", "linked ms", "linked / alone", "identical"], rows)
    )
    print(body)
    if not args.no_write:
        write_section("One input transform per group (bench/shared_input_speed.py)", body)


if __name__ == "__main__":
    main()
