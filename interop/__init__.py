"""PyTorch side of duquant-jax: DLPack bridge, DuQuantLinear, model conversion.

Depends on `duquant_jax`; `duquant_jax` never imports torch.
"""

from interop.convert import calibrate, from_pack_dir, name_filter, quantize_
from interop.dlpack import jax_to_torch, torch_to_jax
from interop.linear import DuQuantLinear

__all__ = ["DuQuantLinear", "calibrate",
    "from_pack_dir", "jax_to_torch", "name_filter", "quantize_", "torch_to_jax"]
