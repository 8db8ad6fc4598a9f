"""The `duquant` command line."""

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="duquant", description="DuQuant block-rotation packing in JAX")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="pack a generated Gemma-2B-shaped layer set and check it against the reference")
    demo.add_argument("--blocks", type=int, default=1, help="transformer blocks of 7 linears (Gemma-2B has 18)")
    demo.add_argument("--no-verify", action="store_true", help="skip the float64 reference check")
    _config_args(demo)
    a = ap.parse_args(argv)
    try:
        config = _config(a)
    except ValueError as e:
        ap.error(str(e))
    if a.command == "demo":
        from duquant_jax.demo import run_demo

        if a.blocks < 1:
            ap.error(f"--blocks must be >= 1; got {a.blocks}")
        summary = run_demo(blocks=a.blocks, config=config, verify=not a.no_verify)
        return 0 if summary.get("ok", 1.0) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
