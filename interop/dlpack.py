"""JAX <-> PyTorch without copies (DLPack) where both sit on the same device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

SUPPORTED_TORCH = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32, torch.int64, torch.uint8)
SUPPORTED_JAX = tuple(jnp.dtype(d) for d in ("float32", "bfloat16", "float16", "int8", "int32", "int64", "uint8"))


def _same_device(x: jax.Array) -> bool:
    platform = next(iter(x.devices())).platform
    return platform == "cpu" or (platform == "gpu" and torch.cuda.is_available())


def jax_to_torch(x: jax.Array) -> torch.Tensor:
    """A torch view of `x` through DLPack (zero-copy on the same device), else one copy to CPU.

    Shared memory: writing into the tensor changes `x`; `.clone()` it where
    either side may mutate.
    """
    if not isinstance(x, jax.Array):
        raise TypeError(f"x must be a jax.Array; got {type(x).__name__}")
    if x.dtype not in SUPPORTED_JAX:
        raise TypeError(f"jax_to_torch supports {[str(d) for d in SUPPORTED_JAX]}; got {x.dtype}")
    if _same_device(x):
        return torch.from_dlpack(x)
    host = np.asarray(x)  # the one explicit copy, off a device torch cannot see
    if host.dtype == jnp.bfloat16:
        return torch.from_numpy(host.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(host.copy())


def torch_to_jax(t: torch.Tensor) -> jax.Array:
    """A JAX array sharing `t`'s memory where DLPack allows it.

    Gradients are detached, a non-contiguous tensor is made contiguous first
    (a copy). int64 becomes int32 unless JAX's x64 mode is on (JAX itself
    copies then); values outside int32 are an error rather than a wrap.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in SUPPORTED_TORCH:
        raise TypeError(f"torch_to_jax supports {[str(d) for d in SUPPORTED_TORCH]}; got {t.dtype}")
    t = t.detach().resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.int64 and not jax.config.read("jax_enable_x64"):
        if t.numel() and (t.min() < -(2**31) or t.max() >= 2**31):
            raise ValueError("int64 tensor holds values outside int32 and JAX's x64 mode is off")
        t = t.to(torch.int32)
    if t.device.type == "cpu" or (t.device.type == "cuda" and jax.default_backend() == "gpu"):
        return jax.dlpack.from_dlpack(t)
    return jnp.asarray(t.cpu().numpy())
