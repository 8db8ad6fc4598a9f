"""Sequential calibration from a checkpoint, for models bigger than memory: one float block at a time.

```python
from accelerate import init_empty_weights
with init_empty_weights():              # parameters on the meta device, buffers real
    model = AutoModelForCausalLM.from_config(config)
quantize_checkpoint_sequential(model, "ckpt/", "out/", DuQuantConfig.preset("w4a8"), batches)
fresh = AutoModelForCausalLM.from_config(config)
load_quantized(fresh, "out/")
```

The model's parameters stay on the meta device except where needed:

1. Every tensor outside the blocks (embedding, final norm, output layer) is
   read from the checkpoint; each block is replaced by a recorder that keeps
   its call (block 0's hidden states, every block's other arguments) and
   passes the hidden states through, so one pass per batch records what each
   block will be called with, without any block's weights. Those tensors go
   back to the meta device until step 3.
2. Block by block: its float weights are read from the checkpoint's shards,
   it is observed, quantized (GPTQ included) and calibrated on the hidden
   states exactly as `quantize_sequential` does, run quantized to give the
   next block's inputs, written as its own shard of a `save_quantized`
   directory, and released (`model` is left without its blocks: load the
   result into a freshly built model with `load_quantized`).
3. The tensors outside the blocks are read again and become the last shard; the index and the
   record (`duquant_quantized.json`) are written last. The record is planned
   from the configuration, and the first block's input groups (layers that read
   one input, `interop.shared_input`; every later block is quantized with the
   same groups, checked on its statistics), before the first shard is written,
   since every shard records its digest; each quantized layer is checked against
   its plan.

Peak memory: the larger of the tensors outside the blocks (steps 1 and 3) and
one float block with the calibration hidden states (batches x tokens x hidden)
and the packing's temporaries (GPTQ: the block's `XᵀX`s, each transformed and
factored in its own buffer (`duquant_jax.hessian_in_place`), and one layer's
float32 copies of its weight), not the float model. Between blocks the memory
freed is handed back to the system (`interop.sequential.release_memory`).
The recorders assume that a block's other arguments do not depend on the
previous block's output (true of transformers' decoder layers: masks and
rotary embeddings are computed before the loop).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from duquant_jax.atomic import atomic_write_text
from duquant_jax.config import DuQuantConfig
from duquant_jax.field_shapes import expected_shapes
from duquant_jax.paths import contained
from interop.modules import FilterFn, set_child
from interop.saved_checks import ROTATION_FIELDS
from interop.sequential import (
    _default_run, _hidden_out, _no_cache, _quantize_block, _relative_filter, _Stop, checked_inputs, find_blocks, release_memory, run_until_stop,
)
from interop.shared_input import group_buffer_keys
from interop.shared_input import input_groups as linked_groups
from interop.serialize import CONFIG_FILE, _get_tensor, layer_record, make_record, write_index, write_shard


class _Reader:
    """Tensors of a safetensors checkpoint (one file, or shards with or without transformers' index), read one at a time."""

    def __init__(self, checkpoint: str | os.PathLike):
        from safetensors import safe_open

        root = Path(checkpoint)
        self.where: dict[str, Path] = {}
        index = sorted(root.glob("*.safetensors.index.json")) if root.is_dir() else []
        if index:
            weight_map = json.loads(index[0].read_text(encoding="utf-8"))["weight_map"]
            self.where = {k: contained(root, f, what="shard", source=index[0]) for k, f in weight_map.items()}
        else:
            for path in [root] if root.is_file() else sorted(root.glob("*.safetensors")):
                with safe_open(str(path), "pt") as f:
                    self.where.update({k: path for k in f.keys()})
        if not self.where:
            raise ValueError(f"checkpoint {checkpoint} holds no safetensors tensors")

    def _slice(self, key: str, read: Callable):
        from safetensors import safe_open

        path = self.where.get(key)
        if path is None:
            raise ValueError(f"tensor {key!r} is not in the checkpoint")
        with safe_open(str(path), "pt") as f:
            return read(f)

    def get(self, key: str) -> torch.Tensor:
        return self._slice(key, lambda f: f.get_tensor(key))

    def dtype(self, key: str) -> torch.dtype:
        code = self._slice(key, lambda f: f.get_slice(key).get_dtype())
        return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}[code]


def _meta_keys(module: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """State-dict keys of `module` whose tensors are on the meta device (less `skip`)."""
    skip = set(skip)
    return [k for k, t in module.state_dict(keep_vars=True).items() if t.device.type == "meta" and k not in skip]


def _materialize(module: nn.Module, prefix: str, reader: _Reader, aliases: dict[str, str] | None = None) -> None:
    """Reads every meta tensor of `module` (state-dict keys under `prefix`) from the checkpoint, assigned in
    place; each alias is then tied to its key again (a tied output layer is often absent from checkpoints)."""
    aliases = aliases or {}
    state = {k: reader.get(f"{prefix}{k}") for k in _meta_keys(module, aliases)}
    module.load_state_dict(state, strict=False, assign=True)
    for alias, key in aliases.items():
        set_child(module, alias, _get_tensor(module, key))
    left = _meta_keys(module)
    if left:
        raise ValueError(f"could not read {prefix}{left[0]} from the checkpoint")


class _Recorder(nn.Module):
    """Stands in for block k: records its call and returns the hidden states unchanged."""

    def __init__(self, k: int, last: bool, hidden: list, calls: list):
        super().__init__()
        self.k, self.last, self.hidden, self.calls = k, last, hidden, calls

    def forward(self, hidden_states, *args, **kwargs):
        if self.k == 0:
            self.hidden.append(hidden_states.detach())
        self.calls[self.k].append((tuple(args), {key: _no_cache(v) for key, v in kwargs.items()}))
        if self.last:
            raise _Stop
        return hidden_states


def _release_outside(model: nn.Module, blocks: Sequence[str]) -> None:
    """Every parameter and persistent buffer outside the blocks back on the meta device (aliases too, so that a
    tied output layer does not keep the embedding alive): while the blocks are quantized they are not needed,
    and the embedding is often the largest tensor of the model (1 GB of Gemma-2B's 5 GB)."""
    for key, t in model.state_dict(keep_vars=True).items():
        if any(key.startswith(b + ".") for b in blocks) or t.device.type == "meta":
            continue
        meta = torch.empty_like(t, device="meta")
        set_child(model, key, nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta)


def _record_calls(model, found, batches, run) -> tuple[list, list]:
    hidden: list[torch.Tensor] = []
    calls: list[list] = [[] for _ in found]
    for k, (name, _) in enumerate(found):
        set_child(model, name, _Recorder(k, k == len(found) - 1, hidden, calls))
    try:
        run_until_stop(model, batches, run, "quantize_checkpoint_sequential")
    finally:
        for name, block in found:
            set_child(model, name, block)
    return hidden, calls


def _plan(model: nn.Module, found, config: DuQuantConfig, filter_fn: FilterFn | None, reader: _Reader) -> dict[str, dict[str, Any]]:
    """Every layer's record entry, planned from the meta model and the configuration (`layer_record`'s form)."""
    plan = {}
    for prefix, block in found:
        rel = _relative_filter(prefix, filter_fn)
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear) and (rel is None or rel(name, m)):
                full = f"{prefix}.{name}"
                want = expected_shapes(config, m.in_features, m.out_features)
                shapes = {f: list(want[f]) for f in ROTATION_FIELDS if want[f] is not None}
                if config.quantize_weights:
                    shapes["w_scale"] = list(want["w_scale"])
                shapes["a_scale"] = list(want["a_scale"])
                dtype = reader.dtype(f"{full}.weight") if want["r_in"] is not None else torch.float32
                plan[full] = {
                    "config": config.to_dict(), "in_features": m.in_features, "out_features": m.out_features,
                    "bias": m.bias is not None, "dtype": str(dtype).removeprefix("torch."), "shapes": shapes,
                }
    if not plan:
        raise ValueError("quantize_checkpoint_sequential: no nn.Linear of the blocks passed the filter")
    return plan


def _aliases(model: nn.Module, blocks: Sequence[str]) -> dict[str, str]:
    """Tied tensors outside the blocks: {alias key: the first key of the same parameter}."""
    first: dict[int, str] = {}
    aliases = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if any(key.startswith(b + ".") for b in blocks):
            continue
        if id(t) in first:
            aliases[key] = first[id(t)]
        else:
            first[id(t)] = key
    return aliases


def _record(plan: dict, aliases: dict, files: list[str], blocks: Sequence[str], block_groups: list[list[str]]) -> str:
    """The saved model's record; the first quantized block's input groups, repeated in every block."""
    groups = [[f"{b}.{n}" for n in g] for b in blocks for g in block_groups]
    groups = [g for g in groups if sum(n in plan for n in g) > 1]
    groups = [[n for n in g if n in plan] for g in groups]
    return make_record(plan, aliases, files, {"input_groups": groups} if groups else None)


def quantize_checkpoint_sequential(
    model: nn.Module,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: DuQuantConfig,
    batches: Iterable[Any],
    filter_fn: FilterFn | None = None,
    *,
    blocks: str | None = None,
    run: Callable[[nn.Module, Any], Any] = _default_run,
    progress: bool = True,
    input_groups: str | None = None,
) -> Path:
    """Quantizes `model`'s blocks one at a time from `checkpoint` and writes a `save_quantized` directory.

    Args:
      model: the architecture with its parameters on the meta device (e.g. built under
        `accelerate.init_empty_weights()`); its non-persistent buffers must be real.
      checkpoint: the float weights: a `.safetensors` file or a directory of shards
        (with or without transformers' index), keys as in `model.state_dict()`.
      out_dir: where the quantized model goes (`load_quantized` reads it).
      config, batches, filter_fn, blocks, run, progress, input_groups: as `quantize_sequential`
        ("auto": the first block's groups, found by its observe pass, are every block's).

    Returns:
      `out_dir`.
    """
    from tqdm import tqdm

    batches = checked_inputs(config, batches, "quantize_checkpoint_sequential")
    reader = _Reader(checkpoint)
    if callable(getattr(model, "tie_weights", None)):  # transformers skips tying under init_empty_weights
        model.tie_weights()
    found = find_blocks(model, blocks)
    names = [n for n, _ in found]
    meta_buffers = [n for n, b in model.named_buffers() if b.device.type == "meta" and n not in model.state_dict()]
    if meta_buffers:
        raise ValueError(f"the model has non-persistent buffers on the meta device (e.g. {meta_buffers[:3]}): build it with buffers on the CPU (accelerate.init_empty_weights keeps them there)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)
    files = [f"model-{i + 1:05d}-of-{len(found) + 1:05d}.safetensors" for i in range(len(found) + 1)]
    plan = _plan(model, found, config, filter_fn, reader)
    aliases = _aliases(model, names)
    record = None  # made once the first block shows its input groups
    block_groups: list[list[str]] = []  # in a block's own names; every block is taken to repeat the first one's
    outside = nn.ModuleDict()  # placeholder so that blocks can be swapped out while the rest is read
    for name in names:
        set_child(model, name, outside)
    _materialize(model, "", reader, aliases)  # everything outside the blocks
    for (name, block) in found:
        set_child(model, name, block)
    hidden, calls = _record_calls(model, found, batches, run)
    _release_outside(model, names)  # read again for the last shard
    weight_map: dict[str, str] = {}
    total = 0
    with torch.no_grad():
        for k in tqdm(range(len(found)), desc="duquant sequential", unit="block", disable=not progress):
            (prefix, block), found[k] = found[k], None  # nothing keeps a finished block alive
            _materialize(block, f"{prefix}.", reader)
            block_calls = list(zip(hidden, calls[k]))
            calls[k] = None
            rel = _relative_filter(prefix, filter_fn)
            quantized = {}
            if any(n.startswith(prefix + ".") for n in plan):
                groups = input_groups if record is None or input_groups is None else [[n for n in g if f"{prefix}.{n}" in plan] for g in block_groups]
                quantized = _quantize_block(block, prefix, config, rel, block_calls, input_groups=groups)
            for full, layer in quantized.items():
                if layer_record(layer) != plan[full]:
                    raise AssertionError(f"layer {full}: its record {layer_record(layer)} differs from the plan {plan[full]}")
            if record is None:  # the first block: its groups (none if it had no quantized layer) stand for all
                block_groups = linked_groups(block) if quantized else []
                record = _record(plan, aliases, files, names, block_groups)
            hidden = [_hidden_out(block(h, *a, **kw)) for h, (a, kw) in block_calls]
            own = group_buffer_keys(block)  # one tensor per group in memory, one copy per member on disk
            state = {f"{prefix}.{key}": t.detach().clone() if key in own else t.detach().contiguous() for key, t in block.state_dict().items()}
            write_shard(out / files[k], state, record)
            weight_map.update({key: files[k] for key in state})
            total += sum(t.numel() * t.element_size() for t in state.values())
            set_child(model, prefix, nn.Identity())  # released: the model is left without its blocks
            del block, block_calls, quantized, state  # before the next block's weights are read
            release_memory()
    _materialize(model, "", reader, aliases)
    rest = {key: t.detach().contiguous() for key, t in model.state_dict().items() if not any(key.startswith(b + ".") for b in names) and key not in aliases}
    write_shard(out / files[-1], rest, record)
    weight_map.update({key: files[-1] for key in rest})
    total += sum(t.numel() * t.element_size() for t in rest.values())
    write_index(out, weight_map, total_size=total)
    atomic_write_text(out / CONFIG_FILE, record)
    return out
