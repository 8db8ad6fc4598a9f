"""compressed-tensors' own reading of an export: its compressors, its quantized forward, its transform hooks.

Needs the `compressed-tensors` package (not a dependency of duquant-jax: the
checks and benches that use this import it). `ct_linears(directory)` rebuilds
the exported layers as compressed-tensors builds them when transformers loads a
checkpoint (`apply_quantization_config`, `ModelCompressor.compress_model`, the
checkpoint's tensors, `decompress_model`), plus `apply_transform_config` with
the checkpoint's transform matrices, so that calling a returned layer runs
compressed-tensors' code only: the input transform hook, its activation
quantization and its dequantized weight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from interop.export.compressed_tensors import WEIGHTS_FILE


def _container(shapes: dict[str, tuple[int, int, bool]], dtype: torch.dtype) -> nn.Module:
    """A module tree with an nn.Linear (in, out, bias) at every dotted name of `shapes`."""
    root = nn.Module()
    for name, (n_in, n_out, bias) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(n_in, n_out, bias=bias, dtype=dtype))
    return root


def ct_linears(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict[str, nn.Linear]:
    """{layer name: nn.Linear run by compressed-tensors} for every quantized layer of an export."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors.torch import load_file

    directory = Path(directory)
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    state = load_file(str(directory / WEIGHTS_FILE))
    side = json.loads((directory / "duquant" / "layers.json").read_text())["layers"]
    shapes = {n: (i["in_features"], i["out_features"], i["bias"]) for n, i in side.items()}
    model = _container(shapes, dtype)
    qconfig = QuantizationConfig.model_validate(qc)
    apply_quantization_config(model, qconfig, run_compressed=False)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)
    tc = qc.get("transform_config") or {}
    if tc:
        apply_transform_config(model, TransformConfig.model_validate(tc))
    prefixes = tuple(f"{n}." for n in shapes)
    mine = {k: v for k, v in state.items() if k.startswith(prefixes)}
    result = model.load_state_dict(mine, strict=False)
    wanted = [k for k in result.missing_keys if not k.endswith("_zero_point")]
    if wanted or result.unexpected_keys:
        raise RuntimeError(f"compressed-tensors layout mismatch: missing {wanted[:5]}, unexpected {result.unexpected_keys[:5]}")
    compressor.decompress_model(model)
    return {n: model.get_submodule(n) for n in shapes}
