"""Cross-checks of a saved quantized model, before any kernel runs.

A layer's record in `duquant_quantized.json` claims a configuration and
dimensions; its tensors must be exactly what that configuration stores
(`duquant_jax.field_shapes.expected_shapes`): code dtype and layout against
`weight_bits`, scale shape against `weight_group_size`, `a_scale` against
`act_scheme`, rotation shapes against the rotation family and block sizes,
dtypes against the record's dtype; and their values must be usable (a
permutation that is one, finite scales and rotations). Every mismatch is a
`SavedModelError` naming the file, the layer and the field. Pure torch: no JAX.
"""

from __future__ import annotations

from typing import Mapping

import torch

from duquant_jax.config import DuQuantConfig
from duquant_jax.field_shapes import expected_shapes

ROTATION_FIELDS = ("in_diag", "r_pre", "r_in", "r_out", "out_diag")


class SavedModelError(ValueError):
    """A saved quantized model that cannot be loaded: missing, damaged, or not matching the model."""


def check_record_shapes(name: str, config: DuQuantConfig, n_in: int, n_out: int, shapes: Mapping, source: str) -> None:
    """The record's field shapes (`DuQuantLinear.layout()`) are the ones `config` stores for an n_out x n_in layer."""
    want = expected_shapes(config, n_in, n_out)
    fields = [f for f in ROTATION_FIELDS if want[f] is not None] + (["w_scale"] if want["w_scale"] is not None else []) + ["a_scale"]
    extra = sorted(set(shapes) - set(fields))
    if extra:
        raise SavedModelError(f"{source}: layer {name!r}: field {extra[0]!r} is not stored by its configuration ({_summary(config)})")
    for field in fields:
        got = shapes.get(field)
        if not isinstance(got, list) or [int(d) if isinstance(d, int) and not isinstance(d, bool) else None for d in got] != list(want[field]):
            raise SavedModelError(
                f"{source}: layer {name!r}: field {field!r} has shape {got!r}; its configuration ({_summary(config)}) "
                f"and dimensions {n_out}x{n_in} store {list(want[field])}"
            )


def expected_tensors(config: DuQuantConfig, n_in: int, n_out: int, dtype: torch.dtype, bias: bool) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """State-dict suffix -> (dtype, shape) of every tensor a `DuQuantLinear` of this configuration saves."""
    want = expected_shapes(config, n_in, n_out)
    tensors = {"perm": (torch.int64, want["perm"])}
    tensors.update({f: (dtype, want[f]) for f in ROTATION_FIELDS if want[f] is not None})
    if config.quantize_weights:
        tensors["qweight.codes"] = (torch.uint8 if config.weight_bits <= 4 else torch.int8, want["w_codes"])
        tensors["qweight.scales"] = (torch.float32, want["w_scale"])
    else:
        tensors["w2"] = (dtype, want["w_codes"])
    tensors["a_scale"] = (torch.float32, want["a_scale"])
    tensors["calibrated"] = (torch.bool, ())
    if bias:
        tensors["bias"] = (dtype, (n_out,))
    return tensors


def check_layer_tensors(
    name: str,
    config: DuQuantConfig,
    n_in: int,
    n_out: int,
    dtype: torch.dtype,
    bias: bool,
    state: Mapping[str, torch.Tensor],
    where: Mapping[str, str],
) -> None:
    """Every tensor of layer `name` in `state` has the dtype and shape its configuration stores, none is
    missing and none is extra; `where[key]` names the file holding each key (for messages)."""
    want = expected_tensors(config, n_in, n_out, dtype, bias)
    prefix = f"{name}."
    for suffix, (w_dtype, w_shape) in want.items():
        key = prefix + suffix
        t = state.get(key)
        if t is None:
            raise SavedModelError(f"layer {name!r}: tensor {key!r} is in no shard; its configuration ({_summary(config)}) stores it")
        if t.dtype != w_dtype or tuple(t.shape) != tuple(w_shape):
            raise SavedModelError(
                f"{where.get(key, '?')}: layer {name!r}: tensor {key!r} is {t.dtype} of shape {tuple(t.shape)}; "
                f"its configuration ({_summary(config)}, {dtype}) stores {w_dtype} of shape {tuple(w_shape)}"
            )
    for key in state:
        if key.startswith(prefix) and key[len(prefix):] not in want:
            raise SavedModelError(f"{where.get(key, '?')}: layer {name!r}: tensor {key!r} is not stored by its configuration ({_summary(config)})")


def check_layer_values(name: str, config: DuQuantConfig, state: Mapping[str, torch.Tensor], where: Mapping[str, str]) -> None:
    """Values a kernel relies on: `perm` is a permutation of 0..in-1; scales, rotations and `a_scale` are
    finite, weight scales >= 0, and a calibrated static scheme's `a_scale` > 0."""
    prefix = f"{name}."

    def fail(suffix: str, why: str) -> None:
        key = prefix + suffix
        raise SavedModelError(f"{where.get(key, '?')}: layer {name!r}: tensor {key!r} {why}")

    perm = state[prefix + "perm"]
    if not torch.equal(torch.sort(perm).values, torch.arange(perm.numel(), dtype=perm.dtype)):
        fail("perm", f"is not a permutation of 0..{perm.numel() - 1}")
    for suffix in (*ROTATION_FIELDS, "qweight.scales", "w2", "a_scale", "bias"):
        t = state.get(prefix + suffix)
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            fail(suffix, "holds NaN or Inf")
    scales = state.get(prefix + "qweight.scales")
    if scales is not None and bool((scales < 0).any()):
        fail("qweight.scales", "holds negative scales")
    calibrated, a_scale = bool(state[prefix + "calibrated"]), state[prefix + "a_scale"]
    if config.needs_calibration and calibrated and not bool((a_scale > 0).all()):
        fail("a_scale", "holds scales <= 0 in a calibrated layer")
    if not config.needs_calibration and (calibrated or bool(a_scale.any())):
        fail("a_scale", f"holds calibrated scales, which its configuration ({_summary(config)}) never has")


def _summary(config: DuQuantConfig) -> str:
    group = "per row" if config.weight_group_size is None else f"g{config.weight_group_size}"
    return f"W{config.weight_bits}A{config.act_bits} {config.rotation} B={config.block_size} {group} {config.act_scheme}"
