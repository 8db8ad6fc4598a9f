"""duquant-jax: DuQuant block-rotation quantization in JAX (docs/ALGORITHM.md).

Public names are imported lazily, so that `import duquant_jax.config` (or any
other module that needs no JAX) does not import JAX: the PyTorch side loads
quantized models without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DuQuantConfig": "duquant_jax.config",
    "Pack": "duquant_jax.packed",
    "LayerStats": "duquant_jax.stats",
    "ActivationStats": "duquant_jax.pack",
    "calibrate": "duquant_jax.pack",
    "dequantized_weight": "duquant_jax.pack",
    "forward": "duquant_jax.pack",
    "pack_weight": "duquant_jax.pack",
    "pack_with_rotations": "duquant_jax.pack",
    "rotate_input": "duquant_jax.pack",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'duquant_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
