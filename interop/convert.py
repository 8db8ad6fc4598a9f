"""Swap a model's `nn.Linear` layers for `DuQuantLinear` in place, and calibrate them."""

from __future__ import annotations

import re
import warnings
from typing import Mapping, Sequence

import numpy as np
from torch import nn

from duquant_jax import DuQuantConfig
from duquant_jax.calibration import calibration_session
from duquant_jax.stats import LayerStats
from interop.linear import DuQuantLinear
from interop.modules import FilterFn, selected_linears, set_child
from interop.shared_input import SharedInput



def name_filter(include: str | None = None, exclude: str | None = None) -> FilterFn:
    """A filter over module names: `re.search(include)` and not `re.search(exclude)`.

    Example: `name_filter(include=r"(q|k|v|o|gate|up|down)_proj$")`.
    """
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None

    def keep(name: str, module: nn.Module) -> bool:
        return (inc is None or bool(inc.search(name))) and (exc is None or not exc.search(name))

    return keep


def quantize_(
    model: nn.Module,
    config: DuQuantConfig = DuQuantConfig(),
    filter_fn: FilterFn | None = None,
    progress: bool = True,
    stats: Mapping[str, LayerStats] | None = None,
    *,
    output_layer: int | None = None,
    output_layer_act_bits: int = 16,
    input_groups: str | Sequence[Sequence[str]] | None = None,
    consume_stats: bool = False,
) -> dict[str, nn.Module]:
    """Replaces every selected `nn.Linear` of `model` by a `DuQuantLinear`, in place.

    Args:
      model: any torch module.
      config: the packing settings.
      filter_fn: `(name, module) -> bool`; default: every `nn.Linear`.
      progress: show a progress bar over the layers.
      stats: {module name: LayerStats} from `interop.observe`, for configs that need
        activation statistics (smoothing, the "duquant" rotation, GPTQ). A selected
        layer without statistics is an error that names it and says how to collect them.
      output_layer: also quantize the output layer (`model.get_output_embeddings()`)
        weight-only, whatever the filter: 8 (int8 per row) or 4 (int4 in groups of
        32, rounded with GPTQ when `stats` hold the head: `observe(..., output_layer=True)`;
        to nearest, with a warning, when not), with a tied input embedding reading the
        same codes (`interop.output_layer.output_layer_recipe`, `quantize_output_layer`
        for finer control). The main configuration never applies to it then. None
        (default): as the filter says.
      output_layer_act_bits: with `output_layer`: 16 (default: weight-only) or 8 (its input
        quantized to int8 per token at run time, so that the integer products run it: README
        "The output layer and a tied embedding" says what it costs and gains).
      input_groups: give layers that read one input tensor (q/k/v, gate/up) one input
        transform, fitted on their stacked weight (`duquant_jax.shared_input`) and run once
        per input (`interop.shared_input`): faster, but measured 0.5-1% worse perplexity on
        Gemma-3 270M at every preset (README). "auto": the groups the observe pass found
        (`stats.input_groups`); a list of lists of module names: these (they must be
        selected, and read one input); None (default) or []: every layer fitted alone.
      consume_stats: you will not use `stats` again: GPTQ may transform and factor each
        layer's `XᵀX` inside its own buffer (`duquant_jax.hessian_in_place`) instead of a
        copy, one (in, in) float32 matrix less at the peak (1 GiB for a 16384-wide down
        projection), and set its `xtx` to None. Layers of an input group share one `XᵀX`
        and do not consume it.

    Returns:
      {name: the new module} for every layer replaced (`DuQuantLinear`, and the
      `QuantizedEmbedding` of a tied embedding).
    """
    from tqdm import tqdm

    head_name = None
    if output_layer is not None:
        from interop.output_layer import find_output_layer, output_layer_config

        output_layer_config(output_layer, act_bits=output_layer_act_bits)  # checks the values before any layer is packed
        try:
            head_name = find_output_layer(model)
        except ValueError as e:
            raise ValueError(f"quantize_: output_layer={output_layer}: {e} (interop.output_layer.quantize_output_layer(model, head=NAME))") from None
        keep = filter_fn
        filter_fn = lambda n, m: n != head_name and (keep is None or keep(n, m))  # noqa: E731
    selected = selected_linears(model, filter_fn, "quantize_")
    groups = resolve_input_groups(input_groups, stats, dict(selected), config)
    group_of = {n: g for g in groups for n in g}
    linears = dict(selected)
    replaced = {}
    bar = tqdm(total=len(selected), desc="duquant pack", unit="layer", disable=not progress)
    for name, linear in _packing_order(selected, stats, group_of) if consume_stats else selected:
        if name in replaced:
            continue
        layer_stats = None if stats is None else stats.get(name)
        if name in group_of:
            members = group_of[name]
            news = grouped_layers([linears[n] for n in members], config, members, layer_stats)
        else:
            members, news = [name], [DuQuantLinear.from_linear(linear, config, name=name, stats=layer_stats, consume_stats=consume_stats)]
        for n, new in zip(members, news):
            new.train(linears[n].training)
            set_child(model, n, new)
            replaced[n] = new
        if len(news) > 1:
            SharedInput(news, members)
        bar.update(len(news))
    bar.close()
    if head_name is not None:
        from interop.output_layer import output_layer_recipe, quantize_output_layer

        group_size, method = output_layer_recipe(output_layer, stats, head_name)
        replaced.update(quantize_output_layer(model, output_layer, group_size, method=method, stats=stats, head=head_name,
                                              act_bits=output_layer_act_bits))
    order = [n for n, _ in selected]
    return {n: replaced[n] for n in order + [n for n in replaced if n not in linears]}


def _packing_order(
    selected: list[tuple[str, nn.Linear]], stats: Mapping[str, LayerStats] | None, group_of: Mapping[str, list[str]]
) -> list[tuple[str, nn.Linear]]:
    """`selected` with the layers whose `XᵀX` will be consumed first, largest first (stable otherwise).

    Packing order does not change any layer's pack (each depends on its own weight and statistics), but it
    sets the peak: a consumed `XᵀX` is freed by its own pack, so packing the widest input first (a 16384-wide
    down projection's 1 GiB) keeps it from sitting under every other layer's temporaries."""
    def consumed_bytes(item: tuple[str, nn.Linear]) -> int:
        name = item[0]
        xtx = None if stats is None or name in group_of or stats.get(name) is None else stats[name].xtx
        return 0 if xtx is None else int(xtx.nbytes)

    return sorted(selected, key=lambda item: -consumed_bytes(item))


def resolve_input_groups(
    input_groups: str | Sequence[Sequence[str]] | None,
    stats: Mapping[str, LayerStats] | None,
    selected: Mapping[str, nn.Linear],
    config: DuQuantConfig,
) -> list[list[str]]:
    """`quantize_`'s input groups among the `selected` layers ({name: nn.Linear}), checked.

    "auto": `stats.input_groups` (members the filter left out are dropped, and groups left
    with one member); named groups must be selected whole. Members must have one input
    width, and with statistics one input (equal `act_absmax`)."""
    if isinstance(input_groups, str) and input_groups == "auto":
        groups, named = (getattr(stats, "input_groups", ()) if stats is not None else ()), False
    elif input_groups is None:
        groups, named = (), True
    elif isinstance(input_groups, (str, bytes)) or not isinstance(input_groups, Sequence):
        raise ValueError(f"quantize_: input_groups must be 'auto', None or a list of lists of module names; got {input_groups!r:.200}")
    else:
        groups, named = input_groups, True
    out, seen = [], set()
    for g in groups:
        if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or not all(isinstance(n, str) for n in g):
            raise ValueError(f"quantize_: each input group must be a list of module names; got {g!r:.200}")
        if named:
            left_out = [n for n in g if n not in selected]
            if left_out:
                raise ValueError(f"quantize_: input group {list(g)} names {left_out}, which the filter did not select as nn.Linear layers")
        members = [n for n in g if n in selected]
        if len(members) < 2:
            continue
        again = [n for n in members if n in seen]
        if again or len(set(members)) != len(members):
            raise ValueError(f"quantize_: input group {list(g)}: {again or members} appear in more than one group or twice")
        seen.update(members)
        widths = {selected[n].in_features for n in members}
        if len(widths) != 1:
            raise ValueError(f"quantize_: input group {members} has input widths {[selected[n].in_features for n in members]}; they cannot read one input")
        if stats is not None and config.needs_stats and all(n in stats for n in members):
            parts: dict[bytes, list[str]] = {}  # members by the values they saw
            for n in members:
                parts.setdefault(np.asarray(stats[n].act_absmax).tobytes(), []).append(n)
            if len(parts) > 1 and named:
                a, b = (p[0] for p in list(parts.values())[:2])
                raise ValueError(f"quantize_: input group {members}: {b} and {a} did not read the same input in the observe pass (their act_absmax differ)")
            if len(parts) > 1:  # found by identity alone (inference-mode tensors have no version counter)
                warnings.warn(f"quantize_: layers {members} read one tensor object but saw different values (changed in place?); "
                              f"grouped by what they saw: {list(parts.values())}", stacklevel=3)
            out.extend(p for p in parts.values() if len(p) > 1)
            continue
        out.append(members)
    return out


def grouped_layers(linears: Sequence[nn.Linear], config: DuQuantConfig, names: Sequence[str], stats: LayerStats | None) -> list[DuQuantLinear]:
    """The `DuQuantLinear` of each of `linears` (one input), packed with one input transform (`duquant_jax.shared_input.pack_group`)."""
    from duquant_jax.shared_input import pack_group
    from interop.dlpack import torch_to_jax

    packs = pack_group([torch_to_jax(m.weight.detach()) for m in linears], config, stats, names=names)
    return [DuQuantLinear.replacing(m, pack, name) for m, pack, name in zip(linears, packs, names)]


def from_pack_dir(model: nn.Module, packs_dir, progress: bool = True) -> dict[str, DuQuantLinear]:
    """Swaps `model`'s `nn.Linear` layers for the packs of a `duquant pack` output directory, in place.

    A module matches the pack of tensor `T` when `T == name + ".weight"` or, for
    a model that wraps the checkpoint's (sentence-transformers' `0.auto_model.`),
    when `name + ".weight"` ends with `"." + T`. Each pack must fit the layer's
    shape; the layer's bias is kept. Layers packed as one input group (`--stats` with
    input groups) are linked to share the transform at run time. Returns {module name: new layer}.
    """
    from tqdm import tqdm

    from duquant_jax.checkpoint import iter_pack_dir, pack_dir_groups, pack_dir_layers

    tensors = set(pack_dir_layers(packs_dir))
    matches = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        key = name + ".weight"
        hits = [t for t in tensors if key == t or key.endswith("." + t)]
        if len(hits) == 1:
            matches[hits[0]] = (name, m)
    if not matches:
        raise ValueError(f"from_pack_dir: no nn.Linear of the model matches a layer of {packs_dir}")
    replaced = {}
    for tensor, pack in tqdm(iter_pack_dir(packs_dir, list(matches)), total=len(matches), desc="duquant load", disable=not progress):
        name, linear = matches[tensor]
        if (pack.out_features, pack.in_features) != tuple(linear.weight.shape):
            raise ValueError(f"pack {tensor} is {pack.out_features}x{pack.in_features}; layer {name} is {tuple(linear.weight.shape)}")
        new = DuQuantLinear.from_pack(pack, bias=linear.bias, dtype=linear.weight.dtype, name=name)
        new.train(linear.training)
        set_child(model, name, new)
        replaced[name] = new
    for group in pack_dir_groups(packs_dir):  # packed with one input transform: run it once per input
        if all(t in matches for t in group):
            SharedInput([replaced[matches[t][0]] for t in group], [matches[t][0] for t in group])
    return replaced


def calibrate(model: nn.Module):
    """A context manager that calibrates every `DuQuantLinear` of `model` on the batches run inside it.

    Inside, each layer records SPEC's statistics (the per-batch percentile of
    `|x2|`, element-wise max over at most `calib_batches` batches) and runs
    without activation quantization; on a clean exit each layer freezes its
    activation scales. A layer that saw no batch stays uncalibrated (with a
    warning), and its W*A8 forward will raise. On an exception nothing is frozen.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DuQuantLinear)}
    return calibration_session(layers, "quantize_")
