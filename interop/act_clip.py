"""Per-layer clip search for per-token activations: each layer's `act_clip` chosen on calibration data.

A `"dynamic-token"` layer quantizes each token with the scale `act_clip * max|x2|` /
qmax. One clip for the whole model (the `w4a4` preset's 0.9) is a compromise: layers
whose tokens have a single large channel want more clipping than layers with flat
tokens. `search_act_clip` runs the calibration batches through the quantized model
once, keeps a seeded sample of each selected layer's rotated inputs `x2` (tokens, in),
and sets each layer's clip to the grid value whose output is closest, in squared
error, to the same layer's product with unquantized activations:

    clip* = argmin_c  || P(x2; ActQuant(c)) - P(x2; float) ||²

(`P` the layer's own product: its quantized weights, its kernel path). The weights
do not change (the clip acts at run time only), so the search needs no re-packing;
each layer's new clip is part of its config and saved with the model. Layers see the
inputs that the already-quantized earlier layers give them (clips are set after
the pass, so every layer's input comes from the model as it was quantized).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
from torch import nn

from duquant_jax.config import DYNAMIC_ACT_SCHEMES
from interop.kernels import ActQuant
from interop.linear import DuQuantLinear
from interop.modules import run_batch

DEFAULT_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)

__all__ = ["DEFAULT_GRID", "search_act_clip", "set_act_clip"]


def set_act_clip(layer: DuQuantLinear, clip: float) -> None:
    """Sets a dynamic-scheme layer's activation clip (its config's `act_clip`), validated by the config."""
    if layer.config.act_scheme not in DYNAMIC_ACT_SCHEMES or not layer.config.quantize_acts:
        raise ValueError(f"{layer.name or 'DuQuantLinear'}: act_clip applies to quantized dynamic activations "
                         f"{DYNAMIC_ACT_SCHEMES}; "
                         f"this layer has act_scheme={layer.config.act_scheme!r}, act_bits={layer.config.act_bits}")
    layer.config = dataclasses.replace(layer.config, act_clip=float(clip))
    layer.act = ActQuant.from_config(layer.config)


def _check_grid(grid: Iterable[float]) -> tuple[float, ...]:
    values = tuple(grid)
    if not values:
        raise ValueError("search_act_clip: grid is empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(f"search_act_clip: grid values must be numbers in (0, 1]; got {v!r}")
    return values


@torch.no_grad()
def search_act_clip(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    grid: Iterable[float] = DEFAULT_GRID,
    run: Callable[[nn.Module, Any], Any] = run_batch,
    max_tokens: int = 4096,
    seed: int = 0,
) -> dict[str, float]:
    """Chooses and sets the activation clip of every quantized `"dynamic-token"` `DuQuantLinear` of `model`.

    Args:
      model: a model quantized with `interop.quantize_` (or loaded), changed in place.
      batches: calibration batches, each passed to `run(model, batch)`.
      grid: the candidate clips, each in (0, 1].
      run: how a batch goes through the model (default `interop.modules.run_batch`: `model(**batch)`,
        `model(*batch)` or `model(batch)`).
      max_tokens: at most this many input tokens (rows of `x2`) kept per layer, a seeded
        uniform sample over all batches (memory: `max_tokens * in_features` float32 per layer).
      seed: seed of that sample.

    Returns:
      {layer name: the clip set}. Raises ValueError naming a bad argument, or when no layer qualifies.
    """
    grid = _check_grid(grid)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"search_act_clip: max_tokens must be a positive int; got {max_tokens!r}")
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, DuQuantLinear) and m.config.quantize_acts and m.config.act_scheme in DYNAMIC_ACT_SCHEMES}
    if not layers:
        raise ValueError(f"search_act_clip: the model has no DuQuantLinear with quantized dynamic activations {DYNAMIC_ACT_SCHEMES}")
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    gen = torch.Generator().manual_seed(seed)
    keys: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook(name: str):
        def pre(module: DuQuantLinear, args: tuple) -> None:
            x2 = module.rotate_input(args[0]).reshape(-1, module.in_features).float()
            # reservoir by random keys: keep the max_tokens rows with the smallest keys seen so far
            k = torch.rand(x2.shape[0], generator=gen)
            kept[name].append(x2.contiguous())
            keys[name].append(k)
            if sum(t.shape[0] for t in kept[name]) > 2 * max_tokens:
                _shrink(kept, keys, name, max_tokens)
        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not any(kept.values()):
        raise ValueError("search_act_clip: no batch reached a selected layer (is `batches` empty, or `run` wrong?)")
    chosen = {}
    for name, layer in layers.items():
        if not kept[name]:
            continue  # never called on the calibration data: keep its clip
        _shrink(kept, keys, name, max_tokens)
        x2 = kept.pop(name)[0]
        ref = layer._product(x2, ActQuant())
        errors = [float(((layer._product(x2, dataclasses.replace(layer.act, clip=float(c))) - ref) ** 2).sum()) for c in grid]
        best = grid[min(range(len(grid)), key=errors.__getitem__)]
        set_act_clip(layer, best)
        chosen[name] = float(best)
    return chosen


def _shrink(kept: dict, keys: dict, name: str, max_tokens: int) -> None:
    """Keeps the `max_tokens` rows of layer `name` with the smallest random keys (one tensor each)."""
    x, k = torch.cat(kept[name]), torch.cat(keys[name])
    if x.shape[0] > max_tokens:
        idx = torch.topk(k, max_tokens, largest=False).indices.sort().values
        x, k = x[idx], k[idx]
    kept[name], keys[name] = [x], [k]
