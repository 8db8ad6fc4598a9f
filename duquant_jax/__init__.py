"""duquant-jax: DuQuant block-rotation weight packing in JAX (see SPEC.md)."""

from duquant_jax.config import DuQuantConfig
from duquant_jax.pack import ActivationStats, calibrate, dequantized_weight, forward, pack_weight, pack_with_rotations, rotate_input
from duquant_jax.packed import Pack

__all__ = [
    "ActivationStats",
    "DuQuantConfig",
    "Pack",
    "calibrate",
    "dequantized_weight",
    "forward",
    "pack_weight",
    "pack_with_rotations",
    "rotate_input",
]
__version__ = "0.1.0"
