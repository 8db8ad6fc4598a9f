"""End-to-end scale tuning: every quantized layer's weight scales trained on the whole model's output.

GPTQ rounds each layer to keep that layer's own output close to the float layer's;
the small errors of a hundred layers still add up along the network. `tune_scales`
keeps every integer code and trains only the weight scales `s (out, groups)`, all
layers at once, by Adam on the divergence of the quantized model's outputs from
the float model's on calibration batches (EfficientQAT's "E2E-QP", Chen et al.
2024; PEQA, Kim et al. 2023):

    s = s0 * exp(t),   t (out, groups) = 0 at the start,
    loss = KL(softmax(teacher(x)) || softmax(model(x)))   (or the relative squared error),

with each layer computing `fake_quantize(rotate_input(x)) @ (Q * s)^T` during
training: its own input transform and activation quantizer (the quantizer passed
straight through in the backward pass), its codes `Q` fixed. A scale is one float
per group, so the model keeps its size, layout and kernels; only `scales` change.
Nothing changes until training ends without a non-finite loss: then each layer's
scales are replaced in place and its derived kernel caches dropped.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from interop.kernels import fake_quantize
from interop.linear import DuQuantLinear
from interop.modules import run_batch

LOSSES = ("kl", "mse")

__all__ = ["LOSSES", "tune_scales"]


def _outputs(out: Any) -> torch.Tensor:
    """The tensor a model's output holds: `.logits`, the first element of a tuple, or the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"tune_scales: run(model, batch) must give a tensor, an output with .logits or a tuple whose "
                     f"first element is a tensor; got {type(out).__name__}")


def _divergence(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """(..., n) outputs -> scalar: mean KL(teacher || student) of the softmax over the last dim, or the squared
    error relative to the teacher's mean square."""
    s, t = student.float(), teacher.float()
    if s.shape != t.shape:
        raise ValueError(f"tune_scales: the model's outputs {tuple(s.shape)} and the teacher's {tuple(t.shape)} differ in shape")
    if loss == "kl":
        log_t = torch.log_softmax(t, dim=-1)
        return (log_t.exp() * (log_t - torch.log_softmax(s, dim=-1))).sum(-1).mean()
    return ((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)


class _TrainedScales:
    """One layer's training state: its codes (out, in) int8 (a byte a weight while training; float32 only inside
    the layer's forward), its scales s0 (out, groups) and the log-ratios `t` (out, groups) being trained."""

    def __init__(self, layer: DuQuantLinear):
        w = layer.qweight
        self.layer = layer
        self.group = w.effective_group
        self.codes = w.codes().to(torch.int8)
        self.s0 = w.scales_2d().detach().clone()
        self.t = nn.Parameter(torch.zeros_like(self.s0))

    def scales(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): the layer's transform, its activation quantizer (straight-through), `Q * s`."""
        layer = self.layer
        x2 = layer.rotate_input(x).reshape(-1, layer.in_features).float()
        act = layer.act
        if act.scheme != "none":
            a_scale = layer.a_scale if act.scheme.startswith("static") else None
            x2 = x2 + (fake_quantize(x2.detach(), act, a_scale) - x2).detach()
        n_in = layer.in_features
        weight = self.codes.float() * self.scales().repeat_interleave(self.group, dim=1)[:, :n_in]
        y = (x2 @ weight.t()).reshape(*x.shape[:-1], layer.out_features)
        if layer.config.rotate_rows and layer.config.row_rot_mode == "restore":
            y = layer.restore_output(y)
        return y if layer.b_eff is None else y + layer.b_eff.float()


def _check(epochs: int, lr: float, loss: str) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"tune_scales: epochs must be an int >= 1; got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"tune_scales: lr must be a finite number > 0; got {lr!r}")
    if loss not in LOSSES:
        raise ValueError(f"tune_scales: loss must be one of {LOSSES}; got {loss!r}")


def tune_scales(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    *,
    run: Callable[[nn.Module, Any], Any] = run_batch,
    loss: str = "kl",
    epochs: int = 4,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains the weight scales of every quantized `DuQuantLinear` of `model` to match `teacher`'s outputs.

    Args:
      model: a model quantized with `interop.quantize_` (or loaded), in float32; its layers' scales change in place.
      teacher: the float model it was quantized from (its outputs are the target; it is not changed).
      batches: calibration batches, each passed to `run(model, batch)` and `run(teacher, batch)`; all of them
        once per epoch, in a seeded random order.
      run: how a batch goes through a model (default `interop.modules.run_batch`); its output is a tensor
        (..., n), an output with `.logits`, or a tuple whose first element is one.
      loss: "kl" (outputs are logits: KL divergence of the model's softmax from the teacher's, averaged over
        positions) or "mse" (squared error relative to the teacher's mean square: embeddings, hidden states).
      epochs: passes over `batches` (the default 4 and `lr` 2e-3 were chosen on the quality bench's
        development split, Gemma-3 270M with 16 batches of 512 tokens: README "Presets").
      lr: Adam's learning rate on the scales' log-ratios (2e-3: at most about 0.2% change a step).
      seed: seed of the batch order.
      progress: a progress bar over the steps.

    Returns:
      {"layers": how many, "scales": trained values, "steps", "epoch_loss": [mean loss of each epoch],
       "log_change": {"mean_abs", "max_abs"} of log(s / s0)}.

    Raises ValueError naming a bad argument, when the model has no quantized weights, when `batches` is
    empty, or when the loss turns non-finite (the scales are then left as they were).
    """
    _check(epochs, lr, loss)
    from tqdm import tqdm

    layers = [m for m in model.modules() if isinstance(m, DuQuantLinear) and m.qweight is not None]
    if not layers:
        raise ValueError("tune_scales: the model has no DuQuantLinear with quantized weights (quantize it first)")
    batches = list(batches)
    if not batches:
        raise ValueError("tune_scales: batches is empty")
    states = [_TrainedScales(layer) for layer in layers]
    opt = torch.optim.Adam([s.t for s in states], lr=float(lr))
    grads = {p: p.requires_grad for p in model.parameters()}
    order = torch.Generator().manual_seed(seed)
    epoch_loss: list[float] = []
    bar = tqdm(total=epochs * len(batches), desc="duquant tune scales", unit="batch", disable=not progress)
    try:
        for p in grads:
            p.requires_grad_(False)
        for s in states:
            s.layer.forward = s.forward  # an instance attribute: nn.Module.__call__ runs it instead of the class's
        for _ in range(epochs):
            total = 0.0
            for i in torch.randperm(len(batches), generator=order).tolist():
                with torch.no_grad():
                    target = _outputs(run(teacher, batches[i]))
                with torch.enable_grad():
                    value = _divergence(_outputs(run(model, batches[i])), target, loss)
                    if not torch.isfinite(value):
                        raise ValueError(f"tune_scales: the loss became {float(value.detach())} (lower lr); the scales are unchanged")
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                opt.step()
                total += float(value.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{float(value.detach()):.4g}")
            epoch_loss.append(total / len(batches))
    finally:
        bar.close()
        for s in states:
            s.layer.__dict__.pop("forward", None)
        for p, g in grads.items():
            p.requires_grad_(g)
    with torch.no_grad():
        bad = [s.layer.name or "(unnamed)" for s in states if not torch.isfinite(s.scales()).all()]
        if bad:
            raise ValueError(f"tune_scales: trained scales of {bad[:3]} are not finite (lower lr); the scales are unchanged")
        for s in states:
            w = s.layer.qweight
            w.scales.copy_(s.scales().reshape(w.scales.shape))
            w._derived.clear()  # e.g. bfloat16 copies of the scales
        log_change = torch.cat([s.t.detach().flatten() for s in states]).abs()
    return {"layers": len(states), "scales": int(log_change.numel()), "steps": epochs * len(batches), "epoch_loss": epoch_loss,
            "log_change": {"mean_abs": float(log_change.mean()), "max_abs": float(log_change.max())}}
