"""The quality benchmark's "no rotation" baseline, implemented in the harness (torch only).

Plain per-row round-to-nearest: each `nn.Linear`'s weight is fake-quantized per
output row with SPEC's MSE-grid scale (step 7: candidates `base / alpha`, alpha in
0.5..1.5, least MSE, first on a tie), with no permutation and no rotation; its
input is fake-quantized with static per-channel scales calibrated exactly as
SPEC calibrates `x2` (the `act_percentile` percentile of `|x|` per batch, max over
at most `calib_batches` batches), here on `x` itself. Once the core packs
`DuQuantConfig(rotation="none", enable_permute=False)`, that config is the same
baseline and this module can go.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from duquant_jax.calibration import calibration_session
from duquant_jax.config import DuQuantConfig, qmax
from interop.linear import abs_percentile

SCALE_ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5)


def mse_row_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """w: (out, in) float -> (out,) SPEC's MSE-grid scale per row."""
    q = qmax(bits)
    base = torch.clamp(w.abs().amax(dim=1) / q, min=1e-8)
    best, best_err = base, torch.full_like(base, float("inf"))
    for alpha in SCALE_ALPHAS:
        s = base / alpha
        err = ((torch.clamp(torch.round(w / s[:, None]), -q - 1, q) * s[:, None] - w) ** 2).mean(dim=1)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


class RTNLinear(nn.Module):
    """Per-row RTN weights (SPEC's MSE-grid scale), per-channel static activation fake-quant, no rotation.

    Buffers: `w_hat (out, in)` the dequantized weight, `a_scale (in,)` once calibrated.
    Calibrate with `calibrate_rtn(model)`.
    """

    def __init__(self, linear: nn.Linear, config: DuQuantConfig, name: str = ""):
        super().__init__()
        self.config, self.name = config, name
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        if config.quantize_weights:
            s = mse_row_scales(w, config.weight_bits)
            q = qmax(config.weight_bits)
            w = torch.clamp(torch.round(w / s[:, None]), -q - 1, q) * s[:, None]
        self.register_buffer("w_hat", w.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.register_buffer("a_scale", None)
        self._running: torch.Tensor | None = None
        self._batches = -1  # -1: not calibrating

    def start_calibration(self) -> None:
        self._running, self._batches = None, 0

    def abort_calibration(self) -> None:
        self._batches = -1

    def finish_calibration(self) -> bool:
        seen, self._batches = self._batches, -1
        if seen <= 0 or self._running is None:
            return False
        if self.config.quantize_acts:
            self.a_scale = torch.clamp(self._running / qmax(self.config.act_bits), min=1e-6)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._batches >= 0:
            if self._batches < self.config.calib_batches:
                p = abs_percentile(x, self.config.act_percentile)
                self._running = p if self._running is None else torch.maximum(self._running, p)
                self._batches += 1
        elif self.config.quantize_acts:
            if self.a_scale is None:
                raise RuntimeError(f"RTN baseline layer {self.name} was never calibrated: run calibrate_rtn(model) first")
            qa = qmax(self.config.act_bits)
            s = self.a_scale.to(x.dtype)
            x = torch.clamp(torch.round(x / s), -qa - 1, qa) * s
        return nn.functional.linear(x, self.w_hat, self.bias)


def quantize_rtn_(model: nn.Module, config: DuQuantConfig, filter_fn: Callable[[str, nn.Module], bool]) -> dict[str, RTNLinear]:
    """Swaps every selected `nn.Linear` for an `RTNLinear`, in place; returns {name: layer}."""
    selected = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and filter_fn(n, m)]
    if not selected:
        raise ValueError("quantize_rtn_: no nn.Linear passed the filter")
    out = {}
    for name, linear in selected:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = RTNLinear(linear, config, name=name)
        setattr(parent, child, new)
        out[name] = new
    return out


def calibrate_rtn(model: nn.Module):
    """Context manager: calibrates every `RTNLinear` of `model` on the batches run inside it."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RTNLinear)}
    return calibration_session(layers, "quantize_rtn_")
