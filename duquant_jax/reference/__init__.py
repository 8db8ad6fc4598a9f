"""The literal float64 reference path: NumPy, loops over blocks and columns, written to be read
against docs/ALGORITHM.md line by line. The JAX and PyTorch paths are tested against it.

`spec` holds SPEC's building blocks, `options` the literal forms of the options
added beside it, and `pipeline` composes them into `pack_weight`, `forward` and
`calibrate` for any `DuQuantConfig`.
"""

from duquant_jax.quantize import SCALE_ALPHAS
from duquant_jax.reference.pipeline import (
    calibrate,
    dequantized_weight,
    forward,
    input_side,
    pack_group,
    pack_weight,
    pack_with_input_side,
    rotate_input,
    transform_matrix,
)
from duquant_jax.reference.spec import (
    block_ranges,
    canonical_signs,
    channel_energy,
    left_rotation,
    stack_blocks,
    weight_scales,
    zigzag,
)

__all__ = [
    "SCALE_ALPHAS",
    "block_ranges",
    "calibrate",
    "canonical_signs",
    "channel_energy",
    "dequantized_weight",
    "forward",
    "input_side",
    "left_rotation",
    "pack_group",
    "pack_weight",
    "pack_with_input_side",
    "rotate_input",
    "stack_blocks",
    "transform_matrix",
    "weight_scales",
    "zigzag",
]
