"""The literal float64 reference path: NumPy, loops over blocks and columns, written to be read
against docs/ALGORITHM.md line by line. The JAX and PyTorch paths are tested against it.

`spec` holds the SPEC algorithm (SVD rotations, per-row MSE scales, static
per-channel activations); sibling modules hold the options added beside it.
"""

from duquant_jax.reference.spec import (
    block_ranges,
    calibrate,
    canonical_signs,
    channel_energy,
    dequantized_weight,
    forward,
    left_rotation,
    pack_weight,
    rotate_input,
    stack_blocks,
    weight_scales,
    zigzag,
)

__all__ = [
    "block_ranges",
    "calibrate",
    "canonical_signs",
    "channel_energy",
    "dequantized_weight",
    "forward",
    "left_rotation",
    "pack_weight",
    "rotate_input",
    "stack_blocks",
    "weight_scales",
    "zigzag",
]
