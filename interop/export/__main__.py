"""`python -m interop.export SAVED --out DIR --model-dir HF_DIR`: a `save_quantized` directory -> compressed-tensors.

The float architecture is built from `--model-dir` (a Hugging Face directory with
config.json; default SAVED's own config.json if it has one) with
`AutoModelForCausalLM.from_config` (`--auto-class` picks another Auto class).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m interop.export", description=__doc__)
    p.add_argument("saved", help="a directory written by interop.save_quantized")
    p.add_argument("--out", required=True, help="the compressed-tensors directory to write")
    p.add_argument("--model-dir", help="Hugging Face directory whose config.json builds the float model")
    p.add_argument("--auto-class", default="AutoModelForCausalLM")
    args = p.parse_args(argv)
    import torch
    import transformers

    from interop.export.compressed_tensors import ExportError, export_compressed_tensors_from_saved

    config = transformers.AutoConfig.from_pretrained(args.model_dir or args.saved)
    fresh = getattr(transformers, args.auto_class).from_config(config, dtype=torch.float32).eval()
    try:
        export_compressed_tensors_from_saved(args.saved, fresh, args.out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
