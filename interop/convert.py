"""Swap a model's `nn.Linear` layers for `DuQuantLinear` in place, and calibrate them."""

from __future__ import annotations

import re
from typing import Mapping

from torch import nn

from duquant_jax import DuQuantConfig
from duquant_jax.calibration import calibration_session
from duquant_jax.stats import LayerStats
from interop.linear import DuQuantLinear
from interop.modules import FilterFn, selected_linears, set_child



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
        128), with a tied input embedding reading the same codes
        (`interop.output_layer.quantize_output_layer`; finer control there). The
        main configuration never applies to it then. None (default): as the filter says.

    Returns:
      {name: the new module} for every layer replaced (`DuQuantLinear`, and the
      `QuantizedEmbedding` of a tied embedding).
    """
    from tqdm import tqdm

    head_name = None
    if output_layer is not None:
        from interop.output_layer import find_output_layer, output_layer_config

        output_layer_config(output_layer)  # checks the value before any layer is packed
        try:
            head_name = find_output_layer(model)
        except ValueError as e:
            raise ValueError(f"quantize_: output_layer={output_layer}: {e} (interop.output_layer.quantize_output_layer(model, head=NAME))") from None
        keep = filter_fn
        filter_fn = lambda n, m: n != head_name and (keep is None or keep(n, m))  # noqa: E731
    selected = selected_linears(model, filter_fn, "quantize_")
    replaced = {}
    for name, linear in tqdm(selected, desc="duquant pack", unit="layer", disable=not progress):
        layer_stats = None if stats is None else stats.get(name)
        new = DuQuantLinear.from_linear(linear, config, name=name, stats=layer_stats)
        new.train(linear.training)
        set_child(model, name, new)
        replaced[name] = new
    if head_name is not None:
        from interop.output_layer import quantize_output_layer

        replaced.update(quantize_output_layer(model, output_layer, 128 if output_layer == 4 else None, head=head_name))
    return replaced


def from_pack_dir(model: nn.Module, packs_dir, progress: bool = True) -> dict[str, DuQuantLinear]:
    """Swaps `model`'s `nn.Linear` layers for the packs of a `duquant pack` output directory, in place.

    A module matches the pack of tensor `T` when `T == name + ".weight"` or, for
    a model that wraps the checkpoint's (sentence-transformers' `0.auto_model.`),
    when `name + ".weight"` ends with `"." + T`. Each pack must fit the layer's
    shape; the layer's bias is kept. Returns {module name: new layer}.
    """
    from tqdm import tqdm

    from duquant_jax.checkpoint import iter_pack_dir, pack_dir_layers

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
