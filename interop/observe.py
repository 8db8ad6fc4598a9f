"""The observe pass in PyTorch: input statistics of a float model's `nn.Linear` layers.

```python
with interop.observe(model, filter_fn, xtx=True) as stats:
    for batch in calib_batches:
        model(batch)
stats.save("stats.safetensors")       # duquant_jax.stats.load_stats reads it back
```
"""

from __future__ import annotations

import weakref
from typing import ContextManager

import torch
from torch import nn

from duquant_jax.stats import LayerStats, ModelStats, observe_session
from interop.modules import FilterFn, selected_linears



class _InputTracker:
    """Tells input tensors apart for one observe pass: a serial number per live tensor object (its
    `id` is not enough: a freed tensor's id comes back) and its version counter (an in-place change
    makes it another input; inference-mode tensors have none, and `quantize_` then also requires
    equal statistics). Layers whose calls saw the same sequence of inputs read one input."""

    def __init__(self) -> None:
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self._next = 0
        self.seen: dict[str, list[tuple[int, int]]] = {}

    def record(self, name: str, x: torch.Tensor) -> None:
        entry = self._live.get(id(x))
        if entry is None or entry[0]() is not x:
            entry = (weakref.ref(x), self._next)
            self._next += 1
            self._live[id(x)] = entry
        self.seen.setdefault(name, []).append((entry[1], -1 if x.is_inference() else x._version))

    def groups(self, order: list[str]) -> list[list[str]]:
        """Layers (in `order`) whose every call read the same tensor as each other's, in groups of two or more."""
        by_inputs: dict[tuple, list[str]] = {}
        for name in order:
            if self.seen.get(name):
                by_inputs.setdefault(tuple(self.seen[name]), []).append(name)
        return [g for g in by_inputs.values() if len(g) > 1]


class _Recorder:
    """Forward pre-hook of one `nn.Linear`: accumulates its input's statistics in torch, on its device.

    `absmax (in,)` by element-wise maximum and `xtx (in, in)` by `addmm_` of each
    batch's `xᵀx`, both float32; the activations themselves are never kept.
    """

    def __init__(self, name: str, linear: nn.Linear, xtx: bool, tracker: _InputTracker):
        self.name, self.tracker = name, tracker
        n, device = linear.in_features, linear.weight.device
        self.absmax = torch.zeros(n, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(n, n, dtype=torch.float32, device=device) if xtx else None
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != self.absmax.shape[0]:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"observe: layer {self.name}: input must have shape (..., {self.absmax.shape[0]}); got {shape}")
        self.tracker.record(self.name, x)
        with torch.no_grad():
            x2 = x.detach().reshape(-1, x.shape[-1]).to(device=self.absmax.device, dtype=torch.float32)
            if x2.shape[0] == 0:
                return
            torch.maximum(self.absmax, x2.abs().amax(dim=0), out=self.absmax)
            if self.xtx is not None:
                self.xtx.addmm_(x2.T, x2)
        self.tokens += x2.shape[0]

    def result(self) -> LayerStats:
        xtx = None
        if self.xtx is not None:
            xtx = symmetrize_(self.xtx).cpu().numpy()
        return LayerStats(self.absmax.cpu().numpy(), xtx, self.tokens, layer=self.name)


def symmetrize_(a: torch.Tensor, tile: int = 2048) -> torch.Tensor:
    """`a` (n, n) replaced in place by `0.5 * (a + aᵀ)`, bit for bit, one pair of `tile x tile` tiles at a time.

    The whole-matrix expression holds two more (n, n) temporaries: 2 GiB for a 16384-wide `XᵀX`
    (an MLP's down projection), more than the model's block itself; a tile pair needs 2 tiles.
    """
    n = a.shape[0]
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            upper, lower = a[i : i + tile, j : j + tile], a[j : j + tile, i : i + tile]
            mean = (upper + lower.T) * 0.5
            upper.copy_(mean)
            lower.copy_(mean.T)
    return a


def observe(
    model: nn.Module, filter_fn: FilterFn | None = None, *, xtx: bool = False, output_layer: bool = False
) -> ContextManager[ModelStats]:
    """Records the input statistics of every selected `nn.Linear` on the batches run inside the block.

    Args:
      model: a float torch model; run your calibration batches through it inside
        the `with` block (under `torch.no_grad()` or not: nothing is kept for autograd).
      filter_fn: `(name, module) -> bool` over `named_modules()` names, as for
        `interop.quantize_`; default: every `nn.Linear`.
      xtx: also accumulate `XᵀX` (in, in) in float32 per layer (GPTQ needs it).
      output_layer: also record the output layer (`model.get_output_embeddings()`, an
        `nn.Linear`), whatever the filter, always with its `XᵀX` (a hidden-size square):
        what `quantize_(output_layer=4)` needs to round it with GPTQ. Run the batches
        through the whole model then, not only its body.

    Returns:
      a context manager whose `as` target is a `ModelStats`, filled on a clean exit
      with {name: LayerStats}: `act_absmax` `max|x_j|`, `xtx` or None, `tokens`.
      A layer that saw no batch is left out (with a warning); no batch at all is
      an error. The hooks are removed on exit, also on an exception, and then the
      statistics stay empty and say they are incomplete.
    """
    head = None
    if output_layer:
        from interop.output_layer import find_output_layer

        head = find_output_layer(model)
        keep = filter_fn
        filter_fn = lambda n, m: n == head or keep is None or keep(n, m)  # noqa: E731
    selected = selected_linears(model, filter_fn, "observe")
    recorders: list[_Recorder] = []
    handles: list = []
    tracker = _InputTracker()

    def start() -> None:
        for name, linear in selected:
            recorders.append(_Recorder(name, linear, xtx or name == head, tracker))
            handles.append(linear.register_forward_pre_hook(recorders[-1], with_kwargs=True))

    def stop() -> None:
        for h in handles:
            h.remove()
        handles.clear()

    results = lambda: {r.name: r.result() for r in recorders}  # noqa: E731
    return observe_session(start, stop, results, "nn.Linear", lambda: tracker.groups([n for n, _ in selected]))
