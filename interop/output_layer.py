"""The output layer (`lm_head`) quantized weight-only, and the input embedding tied to it reading the same codes.

```python
from interop.output_layer import quantize_output_layer
quantize_output_layer(model, bits=8)                  # per-row int8; bits=4, group_size=32 for grouped int4
```

Language models often tie the output layer to the input embedding (Gemma: 168 M of
Gemma-3 270M's 268 M parameters are that one matrix). `quantize_output_layer`
replaces the output layer by a weight-only `DuQuantLinear` (no rotation, no
permutation, no smoothing: its codes are the weight's own rows) and, when the
embedding shares the weight, the embedding by a `QuantizedEmbedding` that gathers
and dequantizes rows of those same codes. One copy of the codes is held and saved
(`save_quantized` records the tie under "tied_embeddings"; `load_quantized`
restores it).
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
from torch import nn

from duquant_jax.config import DuQuantConfig
from duquant_jax.stats import LayerStats
from interop.linear import DuQuantLinear
from interop.modules import set_child


OUTPUT_ACT_BITS = (16, 8)


def output_layer_config(bits: int = 8, group_size: int | None = None, method: str = "rtn", act_bits: int = 16) -> DuQuantConfig:
    """The configuration of a quantized output layer: `bits` 8 (per row) or 4 (`group_size`) weights, and
    float activations (`act_bits=16`, weight-only) or int8 ones with one scale per token (`act_bits=8`, dynamic:
    the integer products run; no rotation, so an embedding can still share the codes)."""
    if bits not in (4, 8):
        raise ValueError(f"output layer: bits must be 8 or 4; got {bits!r}")
    if act_bits not in OUTPUT_ACT_BITS:
        raise ValueError(f"output layer: act_bits must be 16 (float activations) or 8 (int8 per token); got {act_bits!r}")
    acts = {"act_bits": 16} if act_bits == 16 else {"act_bits": 8, "act_scheme": "dynamic-token"}
    return DuQuantConfig(weight_bits=bits, rotation="none", enable_permute=False, weight_group_size=group_size,
                         weight_method=method, **acts)


INT4_GROUP_SIZE = 32
"""Input channels per scale of `quantize_(output_layer=4)`'s int4 head. Chosen on Gemma-3 270M's development
split (bench/output_layer.py `--dev`): groups of 32 against 128 cost 16 MB more scales there and take the float
body's head from 1.22x to 1.05x float perplexity with GPTQ (1.16x rounded to nearest)."""


def output_layer_recipe(bits: int, stats: Mapping[str, LayerStats] | None, head_name: str) -> tuple[int | None, str]:
    """(group size, rounding method) of `quantize_(output_layer=bits)`'s head.

    8: per-row scales, rounded to nearest (it measures as float). 4: groups of `INT4_GROUP_SIZE`,
    GPTQ when `stats` hold the head's `XᵀX` (`observe(..., output_layer=True)`), else rounded to
    nearest with a warning that says what that costs and how to collect them.
    """
    output_layer_config(bits)  # checks `bits`
    if bits == 8:
        return None, "rtn"
    head_stats = None if stats is None else stats.get(head_name)
    if head_stats is not None and head_stats.xtx is not None:
        return INT4_GROUP_SIZE, "gptq"
    warnings.warn(
        f"output_layer=4: no XᵀX statistics for the output layer {head_name!r}, so it is rounded to nearest "
        f"(on Gemma-3 270M's development split 1.16x float perplexity, against 1.05x with GPTQ): pass stats "
        f"from interop.observe(model, ..., output_layer=True) with the batches run through the whole model",
        stacklevel=3,
    )
    return INT4_GROUP_SIZE, "rtn"


def check_tieable(head: DuQuantLinear, name: str = "") -> None:
    """Raises ValueError unless `head`'s codes are its weight's rows in their own column order (what an
    embedding can gather): quantized weights, no input rotation, no smoothing, the identity permutation."""
    who = f"output layer {name!r}" if name else "output layer"
    if not isinstance(head, DuQuantLinear) or head.qweight is None:
        raise ValueError(f"{who}: an embedding can only share the codes of a DuQuantLinear with quantized weights")
    c = head.config
    if c.rotate_inputs or c.smooth_alpha is not None or head.in_diag is not None:
        raise ValueError(f"{who}: an embedding cannot share codes in a rotated or smoothed basis "
                         f"(rotation={c.rotation!r}, smooth_alpha={c.smooth_alpha!r}): use output_layer_config()")
    if not torch.equal(head.perm, torch.arange(head.in_features, device=head.perm.device)):
        raise ValueError(f"{who}: an embedding cannot share permuted codes: quantize it with enable_permute=False")


class QuantizedEmbedding(nn.Module):
    """An input embedding tied to a quantized output layer: row `i` is the output layer's `W_hat[i]`.

    It holds no tensor of its own (the codes stay in `head.qweight`, saved once under the
    head's name); the output is `W_hat[ids]` in `dtype`, times `embed_scale` when the
    embedding it replaces has one (Gemma's scaled embedding).

    Args:
      head: the output layer (`check_tieable`).
      head_name: its module name (recorded in saves).
      like: the `nn.Embedding` replaced: its `num_embeddings`, `embedding_dim`,
        `padding_idx`, dtype and `embed_scale` are kept.
      check: run `check_tieable(head)` now.
    """

    def __init__(self, head: DuQuantLinear, head_name: str, like: nn.Embedding, *, check: bool = True):
        super().__init__()
        if check:  # load_quantized checks once the head's tensors are loaded
            check_tieable(head, head_name)
        if (like.num_embeddings, like.embedding_dim) != (head.out_features, head.in_features):
            raise ValueError(f"embedding of shape {(like.num_embeddings, like.embedding_dim)} cannot share "
                             f"output layer {head_name!r} of shape {(head.out_features, head.in_features)}")
        object.__setattr__(self, "head", head)  # not a submodule: its tensors are stored once, under its own name
        self.head_name = head_name
        self.num_embeddings, self.embedding_dim, self.padding_idx = like.num_embeddings, like.embedding_dim, like.padding_idx
        self.dtype = like.weight.dtype
        scale = getattr(like, "embed_scale", None)
        self.register_buffer("embed_scale", None if scale is None else torch.as_tensor(scale).detach().clone(), persistent=False)

    def _apply(self, fn, recurse=True):  # .to(dtype), .half(), ...: the rows follow, as an nn.Embedding's weight would
        out = super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return out

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.qweight.rows(input_ids.reshape(-1), self.dtype)
        out = rows.view(*input_ids.shape, self.embedding_dim)
        return out if self.embed_scale is None else out * self.embed_scale.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to {self.head_name!r}"


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def find_output_layer(model: nn.Module, head: str | None = None) -> str:
    """The output layer's module name: `head`, or that of `model.get_output_embeddings()`; it must be an nn.Linear."""
    module = model.get_submodule(head) if head else getattr(model, "get_output_embeddings", lambda: None)()
    if not isinstance(module, nn.Linear):
        raise ValueError(f"no nn.Linear output layer found (head={head!r}; get_output_embeddings() is used when it is None): "
                         "name it with head=")
    return head or _name_of(model, module)


def quantize_output_layer(
    model: nn.Module,
    bits: int = 8,
    group_size: int | None = None,
    *,
    method: str = "rtn",
    stats: Mapping[str, LayerStats] | None = None,
    head: str | None = None,
    embedding: str | None = None,
    act_bits: int = 16,
) -> dict[str, nn.Module]:
    """Quantizes `model`'s output layer and ties its input embedding to the codes, in place.

    Args:
      model: a torch model (a transformers model finds both layers itself).
      bits: 8 (int8 per row) or 4 (with `group_size`, e.g. 128).
      group_size: input channels per scale group; None for per-row scales.
      method: "rtn" or "gptq" (GPTQ needs `stats` with XᵀX of the head's input).
      stats: `interop.observe` statistics holding the head's layer, for GPTQ.
      head: the output layer's module name (default: `model.get_output_embeddings()`).
      embedding: the input embedding's module name (default: `model.get_input_embeddings()`);
        it is replaced only when it shares the head's weight tensor.
      act_bits: 16 (default: weight-only, float activations) or 8 (the head's input quantized to int8
        per token at run time, so that the integer products apply; `output_layer_config`).

    Returns:
      {name: new module}: the head's `DuQuantLinear`, and the `QuantizedEmbedding` when tied.
    """
    from interop.convert import quantize_

    head_name = find_output_layer(model, head)
    head_mod = model.get_submodule(head_name)
    emb_mod = model.get_submodule(embedding) if embedding else getattr(model, "get_input_embeddings", lambda: None)()
    tied = isinstance(emb_mod, nn.Embedding) and emb_mod.weight is head_mod.weight
    if embedding and not tied:
        raise ValueError(f"quantize_output_layer: embedding {embedding!r} does not share the weight of {head_name!r}")
    config = output_layer_config(bits, group_size, method, act_bits)
    new = quantize_(model, config, lambda n, m: n == head_name, progress=False, stats=stats)
    if tied:
        emb_name = embedding or _name_of(model, emb_mod)
        q = QuantizedEmbedding(new[head_name], head_name, emb_mod)
        set_child(model, emb_name, q)
        new[emb_name] = q
    return new


def tied_embeddings(model: nn.Module) -> dict[str, str]:
    """{embedding name: output layer name} of every `QuantizedEmbedding` of `model` (what saves record)."""
    return {name: m.head_name for name, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}
