"""Exports of quantized models to formats other engines read: compressed-tensors (vLLM, transformers).

    python -m interop.export SAVED_DIR --out DIR [--model-dir FLOAT_HF_DIR]

Names are imported lazily (see `interop.export.compressed_tensors`).
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE = "interop.export.compressed_tensors"
_EXPORTS = (
    "ExportError",
    "check_plain_loadable",
    "export_compressed_tensors",
    "export_compressed_tensors_from_saved",
    "import_compressed_tensors",
    "layer_scheme",
    "online_transforms",
)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'interop.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE), name)
    globals()[name] = value
    return value
