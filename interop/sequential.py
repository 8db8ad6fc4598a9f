"""Sequential calibration: a model's repeated blocks quantized one at a time, each calibrated on the
outputs of the blocks already quantized (the GPTQ paper's procedure, llm-compressor's sequential pipeline).

```python
from interop import quantize_sequential
quantize_sequential(model, DuQuantConfig.preset("w4a8"), calibration_batches)
```

1. One float forward per batch, stopped after the last block, records every
   block's call: block 0's input hidden states and each block's other
   arguments (attention masks, rotary embeddings: the tensors the model
   computed once and handed to every block).
2. Block by block: the observe pass on the block's selected linears over the
   batches' hidden states, `quantize_` with those statistics (GPTQ
   included), `calibrate` for static activation schemes, then the
   *quantized* block runs on the same hidden states to give the next
   block's inputs.

GPTQ factors each layer's `XᵀX` in the statistics' own buffer (`consume_stats` of
`quantize_`; not with `stats_path`, which keeps them). Activations between blocks
stay in memory: one hidden-state tensor per batch (batches x tokens x hidden),
e.g. 16 x 512 x 640 float32 = 21 MB for Gemma-3 270M. Linears outside the blocks
(the output layer) are left as they are. Pure torch on the run side; packing uses
the JAX path as `quantize_` does.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from duquant_jax.config import DuQuantConfig
from duquant_jax.stats import LayerStats, ModelStats, save_stats
from interop.convert import calibrate, quantize_
from interop.linear import DuQuantLinear
from interop.modules import FilterFn
from interop.modules import run_batch as _default_run
from interop.observe import observe


class _Stop(Exception):
    """Raised after the last block, so that the recording pass skips the rest of the model."""


def find_blocks(model: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks as (name, module), in order.

    With `pattern`, the modules whose dotted name fully matches the regex (e.g.
    `r"model\\.layers\\.\\d+"`). Without it, the children of the largest
    `nn.ModuleList` whose entries all have one class and hold an `nn.Linear`
    (a transformer's decoder layers).
    """
    if pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"blocks must be a valid regex; got {pattern!r} ({e})") from None
        found = [(n, m) for n, m in model.named_modules() if n and rx.fullmatch(n)]
        if not found:
            raise ValueError(f"no module name of the model fully matches blocks={pattern!r}")
        return found
    best: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            if any(isinstance(x, nn.Linear) for x in m[0].modules()):
                best = [(f"{name}.{i}" if name else str(i), c) for i, c in enumerate(m)]
    if not best:
        raise ValueError("found no repeated blocks (an nn.ModuleList of one class holding linears): name them with blocks=REGEX")
    return best


def _record_calls(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], batches: Sequence[Any], run: Callable) -> tuple[list, list]:
    """One float pass per batch -> (block 0's hidden states per batch, per block per batch (other args, kwargs))."""
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    handles = []

    def pre_hook(k: int):
        def hook(module, args, kwargs):
            if not args or not isinstance(args[0], torch.Tensor):
                raise ValueError(f"quantize_sequential: block {blocks[k][0]} must take its hidden states as the first positional argument")
            if k == 0:
                hidden.append(args[0].detach())
            calls[k].append((tuple(args[1:]), {key: _no_cache(v) for key, v in kwargs.items()}))

        return hook

    def stop(module, args, kwargs, output):
        raise _Stop

    for k, (_, block) in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(k), with_kwargs=True))
    handles.append(blocks[-1][1].register_forward_hook(stop, with_kwargs=True))
    try:
        run_until_stop(model, batches, run, "quantize_sequential")
    finally:
        for h in handles:
            h.remove()
    return hidden, calls


def release_memory() -> None:
    """Returns a finished block's memory to the system before the next block: a garbage collection
    (safetensors' writer leaves reference cycles; jaxlib releases host buffers it shared at a
    collection), then glibc's `malloc_trim` (freed heap pages go back; without it the heap kept
    0.3 GiB per block on a Gemma-2B-shaped run). Without glibc only the collection runs."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc's, without a library search
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


def run_until_stop(model: nn.Module, batches: Sequence[Any], run: Callable, who: str) -> None:
    """Runs every batch until the recorders stop it after the last block (an error if one never does)."""
    with torch.no_grad():
        for batch in batches:
            try:
                run(model, batch)
            except _Stop:
                continue
            raise ValueError(f"{who}: the forward pass never reached the last block")


def _no_cache(value: Any) -> Any:
    """None for a key/value cache (a transformers `Cache`: replaying a block must not append to it), else value."""
    return None if any(c.__name__.endswith("Cache") and "cache" in c.__module__ for c in type(value).__mro__) else value


def _hidden_out(output: Any) -> torch.Tensor:
    """A block's output hidden states: the tensor itself, or the first entry of a tuple."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"quantize_sequential: a block must return its hidden states (a tensor or a tuple starting with one); got {type(out).__name__}")
    return out


def _relative_filter(prefix: str, filter_fn: FilterFn | None) -> FilterFn | None:
    """The model-level filter, applied to a block's linears by their full names."""
    if filter_fn is None:
        return None
    return lambda name, module: filter_fn(f"{prefix}.{name}", module)


def checked_inputs(config: DuQuantConfig, batches: Iterable[Any], who: str) -> list:
    """The batches as a list, after checking that `config` is a DuQuantConfig and that there is a batch."""
    if not isinstance(config, DuQuantConfig):
        raise TypeError(f"config must be a DuQuantConfig; got {type(config).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{who} needs at least one calibration batch")
    return batches


def quantize_sequential(
    model: nn.Module,
    config: DuQuantConfig,
    batches: Iterable[Any],
    filter_fn: FilterFn | None = None,
    *,
    blocks: str | None = None,
    run: Callable[[nn.Module, Any], Any] = _default_run,
    progress: bool = True,
    stats_path: str | os.PathLike | None = None,
    input_groups: str | None = None,
) -> dict[str, DuQuantLinear]:
    """Quantizes the selected linears of `model`'s repeated blocks one block at a time, in place.

    Args:
      model: a float torch model.
      config: the packing settings (statistics are collected as it needs them).
      batches: calibration batches; each is passed to `run(model, batch)`
        (default: `model(**batch)` for a dict, `model(*batch)` for a tuple, else `model(batch)`).
      filter_fn: `(full name, module) -> bool` over the blocks' linears; default: every one.
      blocks: a regex fully matching the blocks' module names; default: found (`find_blocks`).
      run: how a batch goes through the model.
      progress: a progress bar over the blocks.
      stats_path: also write the statistics each layer was quantized with (block k's
        observed on the quantized blocks' outputs) to this file (`save_stats` format,
        full layer names), for configs that need statistics. `duquant pack --stats
        FILE` on the float checkpoint then packs every layer exactly as this run did:
        the JAX route of sequential calibration. Every block's statistics are held
        until the end (XᵀX is in² float32 per layer: 0.4 GB for Gemma-3 270M's GPTQ).
        The file records each block's input groups (`duquant pack --input-groups` uses them).
      input_groups: "auto": one input transform per group of layers that read one input,
        as each block's observe pass finds them (`quantize_`'s option); None (default): every
        layer alone.

    Returns:
      {full name: DuQuantLinear} of every layer replaced.
    """
    from tqdm import tqdm

    batches = checked_inputs(config, batches, "quantize_sequential")
    found = find_blocks(model, blocks)
    hidden, calls = _record_calls(model, found, batches, run)
    if stats_path is not None and not config.needs_stats:
        raise ValueError(f"quantize_sequential: stats_path={str(stats_path)!r} but the config needs no statistics (nothing to write)")
    replaced: dict[str, DuQuantLinear] = {}
    sink: tuple[dict[str, LayerStats], list] | None = None if stats_path is None else ({}, [])
    with torch.no_grad():
        for k, (prefix, block) in enumerate(tqdm(found, desc="duquant sequential", unit="block", disable=not progress)):
            block_calls = list(zip(hidden, calls[k]))
            rel = _relative_filter(prefix, filter_fn)
            if any(isinstance(m, nn.Linear) and (rel is None or rel(n, m)) for n, m in block.named_modules()):
                replaced.update(_quantize_block(block, prefix, config, rel, block_calls, sink, input_groups))
            hidden = [_hidden_out(block(h, *a, **kw)) for h, (a, kw) in block_calls]  # the quantized block's outputs
            del block_calls
            release_memory()
    if sink is not None:
        save_stats(stats_path, ModelStats(*sink))
    return replaced


def _quantize_block(
    block: nn.Module, prefix: str, config: DuQuantConfig, rel: FilterFn | None, block_calls: list, sink: tuple | None = None,
    input_groups: str | list | None = None,
) -> dict[str, DuQuantLinear]:
    """Observe, quantize and (static schemes) calibrate one block on its recorded calls; {full name: layer}.
    With `sink` ({name: LayerStats}, [input groups]), the block's statistics and input groups are added
    to it under the layers' full names. `input_groups`: as `quantize_`'s, in the block's own names."""
    stats = None
    if config.needs_stats:
        with observe(block, rel, xtx=config.needs_xtx) as stats:
            for h, (a, kw) in block_calls:
                block(h, *a, **kw)
        if sink is not None:
            sink[0].update({f"{prefix}.{n}": LayerStats(st.act_absmax, st.xtx, st.tokens, layer=f"{prefix}.{n}") for n, st in stats.items()})
            sink[1].extend([f"{prefix}.{n}" for n in g] for g in stats.input_groups)
    # Without a sink nothing reads the statistics again: GPTQ factors each XᵀX in its own buffer.
    new = quantize_(block, config, rel, progress=False, stats=stats, input_groups=input_groups, consume_stats=sink is None)
    if config.needs_calibration:
        with calibrate(block):
            for h, (a, kw) in block_calls:
                block(h, *a, **kw)
    named = {}
    for name, layer in new.items():
        layer.name = f"{prefix}.{name}"
        if layer.qweight is not None:
            layer.qweight.name = layer.name
        named[layer.name] = layer
    return named
