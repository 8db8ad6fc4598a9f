"""The shapes a layer's packed fields must have, from its configuration and dimensions alone.

Used to cross-check stored state against the configuration it claims (a saved
model's layers, before any kernel runs). Pure Python: no JAX, no NumPy.
"""

from __future__ import annotations

import math

from duquant_jax.config import DuQuantConfig
from duquant_jax.transforms.blocks import largest_divisor_block, largest_power_of_two_block

Shape = tuple[int, ...]


def _square(n: int, b: int) -> Shape:
    return (n, b, b)


def rotation_block(config: DuQuantConfig, n: int, block_size: int) -> int:
    """The block of the one shared matrix of the "hadamard" (power of two) or "duquant" (divisor) family."""
    if config.rotation == "hadamard":
        return largest_power_of_two_block(n, block_size)
    return largest_divisor_block(n, block_size)


def expected_shapes(config: DuQuantConfig, in_features: int, out_features: int) -> dict[str, Shape | None]:
    """Field name -> shape, or None where the configuration stores no such field.

    Fields: `perm`, `in_diag`, `r_pre`, `r_in`, `r_out`, `out_diag`, `w_scale`
    (None with unquantized weights), `w_codes` ((out, ceil(in/2)) nibbles for
    2..4 bits, (out, in) int8 codes for 5..8, (out, in) float W2 unquantized),
    and `a_scale` ((1,) for "static-tensor", else (in,)).
    """
    n, out, c = in_features, out_features, config
    shapes: dict[str, Shape | None] = {"perm": (n,), "r_pre": None, "r_out": None, "out_diag": None}
    smooth = c.smooth_alpha is not None
    shapes["in_diag"] = (n,) if smooth or c.rotation == "hadamard" else None
    if c.rotation == "svd":
        shapes["r_in"] = _square(math.ceil(n / c.block_size), c.block_size)
        if c.rotate_rows:
            shapes["r_out"] = _square(math.ceil(out / c.out_block_size), c.out_block_size)
    elif c.rotation in ("hadamard", "duquant"):
        shapes["r_in"] = _square(1, rotation_block(c, n, c.block_size))
        if c.rotation == "duquant":
            shapes["r_pre"] = shapes["r_in"]
        if c.rotate_rows:
            shapes["r_out"] = _square(1, largest_power_of_two_block(out, c.out_block_size))
            shapes["out_diag"] = (out,)
    else:
        shapes["r_in"] = None
    if c.quantize_weights:
        shapes["w_scale"] = (out,) if c.weight_group_size is None else (out, math.ceil(n / c.weight_group_size))
        shapes["w_codes"] = (out, (n + 1) // 2) if c.weight_bits <= 4 else (out, n)
    else:
        shapes["w_scale"] = None
        shapes["w_codes"] = (out, n)
    shapes["a_scale"] = (1,) if c.act_scheme == "static-tensor" else (n,)
    return shapes
