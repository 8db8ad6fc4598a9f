"""Run in a fresh process by tests/test_reload_every_config.py: load a saved bank of quantized layers
and run every kernel path the tuner may try, on several token counts, against the float64 oracle.

Pure torch (the saved model must load and run without JAX): `python reload_kernel_check.py SAVED OUT.json`.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

TOKENS = (1, 7, 64, 300)
FLOAT32_TOL = 1e-5  # as tests/test_kernels.py: per element, relative to |x3| @ |W_hat|ᵀ
BF16_TOL = 2e-2


class LayerBank(nn.Module):
    """One nn.Linear per spec `(name, in, out, bias)`, deterministically initialised."""

    def __init__(self, specs: list[tuple[str, int, int, bool]]):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleDict()
        for name, n_in, n_out, bias in specs:
            layer = nn.Linear(n_in, n_out, bias=bias)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(n_out, n_in, generator=gen) / n_in**0.5)
                if bias:
                    layer.bias.copy_(torch.randn(n_out, generator=gen) * 0.1)
            self.layers[name] = layer


def inputs(n_in: int, tokens: int, seed: int) -> torch.Tensor:
    """(tokens, n_in) float32 activations with a few outlier channels, fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=gen)
    x[:, :: max(1, n_in // 8)] *= 8.0
    return x


def _err(y: torch.Tensor, ref: torch.Tensor, size: torch.Tensor) -> float:
    return float(((y.double() - ref).abs() / size.clamp_min(1e-30)).max())


def check_layer(layer, fake_quantize, quantized_matmul, candidates, paths) -> list[dict]:
    """Every candidate path x token count x input dtype of one DuQuantLinear: its error against the oracle."""
    rows = []
    w = layer.qweight
    for tokens in TOKENS:
        for dtype in (torch.float32, torch.bfloat16):
            x = inputs(layer.in_features, tokens, seed=tokens).to(dtype)
            with torch.no_grad():
                x2 = layer.rotate_input(x)
                scale = layer.a_scale if layer.act.scheme in ("static-channel", "static-tensor") else None
                if w is None:  # unquantized weights: a plain float product, no kernel choice
                    y = layer(x)
                    rows.append({"path": "float", "tokens": tokens, "dtype": str(dtype), "err": 0.0 if torch.isfinite(y).all() else 1.0, "tol": 0.0})
                    continue
                x3 = fake_quantize(x2, layer.act, scale).double()
                w_hat = w.dequantize().double()
                ref, size = x3 @ w_hat.T, x3.abs() @ w_hat.abs().T
                for name in candidates(w, layer.act, x2.dtype, tokens):
                    y = quantized_matmul(x2, w, layer.act, scale, path=name)
                    exact = paths[name].precision == "float32" and dtype == torch.float32
                    rows.append({"path": name, "tokens": tokens, "dtype": str(dtype), "err": _err(y, ref, size), "tol": FLOAT32_TOL if exact else BF16_TOL})
                y_default = layer(x)  # the autotuner's own choice, as a user runs it
                rows.append({"path": "default", "tokens": tokens, "dtype": str(dtype), "err": 0.0 if torch.isfinite(y_default).all() else 1.0, "tol": 0.0})
    return rows


def main(saved: str, out: str) -> None:
    from interop import load_quantized
    from interop.kernels import PATHS, candidates, fake_quantize, kernel_options, quantized_matmul
    from interop.linear import DuQuantLinear

    with open(f"{saved}/specs.json") as f:
        specs = [tuple(s) for s in json.load(f)]
    model = load_quantized(LayerBank(specs), saved)
    results = {}
    for name, layer in model.named_modules():
        if isinstance(layer, DuQuantLinear):
            results[name] = check_layer(layer, fake_quantize, quantized_matmul, candidates, PATHS)
    with torch.no_grad(), kernel_options(path="fake-quant"):  # the oracle path: the same in every process
        fixed = {name: layer(inputs(layer.in_features, 5, seed=99)).tolist() for name, layer in model.layers.items()}
    with open(out, "w") as f:
        json.dump({"results": results, "fixed": fixed, "jax_imported": "jax" in sys.modules}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
