"""PyTorch side of duquant-jax: DuQuantLinear on integer kernels, model conversion, the observe pass,
saving and loading quantized models, the DLPack bridge.

Depends on `duquant_jax`; `duquant_jax` never imports torch. Names are imported
lazily: loading a saved quantized model (`interop.load_quantized`) imports no JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DuQuantLinear": "interop.linear",
    "calibrate": "interop.convert",
    "from_pack_dir": "interop.convert",
    "name_filter": "interop.convert",
    "quantize_": "interop.convert",
    "observe": "interop.observe",
    "quantize_sequential": "interop.sequential",
    "search_act_clip": "interop.act_clip",
    "tune_scales": "interop.scale_tuning",
    "input_groups": "interop.shared_input",
    "link_input_groups": "interop.shared_input",
    "jax_to_torch": "interop.dlpack",
    "torch_to_jax": "interop.dlpack",
    "save_quantized": "interop.serialize",
    "load_quantized": "interop.serialize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'interop' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
