"""Validation of user inputs: each failure names the argument and what is wrong with it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.config import DuQuantConfig
from duquant_jax.stats import COLLECT_HINT, LayerStats


@jax.jit
def _count_nonfinite(a: jax.Array) -> jax.Array:
    return jnp.sum(~jnp.isfinite(a))


def count_nonfinite(a: Any) -> int:
    """Number of NaN/Inf entries of a float array (NumPy or JAX)."""
    if isinstance(a, np.ndarray) and a.dtype in (np.float32, np.float64, np.float16):
        return int(np.count_nonzero(~np.isfinite(a)))
    return int(_count_nonfinite(jnp.asarray(a)))


def is_float_dtype(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def check_weight(w: Any, name: str = "w", finite: bool = True) -> tuple[int, int]:
    """Checks a `(out, in)` float weight (and, with `finite`, that it has no NaN/Inf); returns `(out, in)`."""
    shape = tuple(getattr(w, "shape", ()))
    dtype = getattr(w, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be a NumPy or JAX array; got {type(w).__name__}")
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (out, in); got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} must have non-empty dimensions; got shape {shape}")
    if not is_float_dtype(dtype):
        raise TypeError(f"{name} must have a floating dtype; got {dtype} (cast it explicitly)")
    bad = count_nonfinite(w) if finite else 0
    if bad:
        raise ValueError(f"{name} of shape {shape} holds {bad} NaN/Inf entries")
    return int(shape[0]), int(shape[1])


def check_input(x: Any, in_features: int, name: str = "x", finite: bool = False) -> None:
    """Checks an input `(..., in)` float array; with `finite`, also no NaN/Inf."""
    shape = tuple(getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be a NumPy or JAX array; got {type(x).__name__}")
    if len(shape) == 0 or shape[-1] != in_features:
        raise ValueError(f"{name} must have last dimension in_features={in_features}; got shape {shape}")
    if not is_float_dtype(dtype):
        raise TypeError(f"{name} must have a floating dtype; got {dtype}")
    if finite:
        bad = count_nonfinite(x)
        if bad:
            raise ValueError(f"{name} of shape {shape} holds {bad} NaN/Inf entries")


def check_bias(bias: Any, out_features: int) -> None:
    if bias is None:
        return
    shape = tuple(getattr(bias, "shape", ()))
    if shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},); got {shape}")


def require_scales(a_scale: Any, where: str = "this pack") -> None:
    """Activation quantization needs calibrated scales: never guess them."""
    if a_scale is None:
        raise ValueError(
            f"{where} quantizes activations (act_bits in 2..8) but has no activation scales: "
            "run calibrate(...) on representative batches first"
        )


def check_stats(stats: Any, config: DuQuantConfig, shape: tuple[int, int], name: str = "") -> None:
    """Raises a ValueError naming the layer when `config` needs statistics `stats` does not hold."""
    where = f"layer {name}: " if name else ""
    if not config.needs_stats:
        return
    needs = [n for n, on in (("smooth_alpha", config.smooth_alpha is not None), ('rotation "duquant"', config.rotation == "duquant"), ('weight_method "gptq"', config.needs_xtx)) if on]
    if stats is None:
        raise ValueError(f"{where}{' and '.join(needs)} needs activation statistics and none were given: {COLLECT_HINT}")
    if not isinstance(stats, LayerStats):
        raise TypeError(f"{where}stats must be a duquant_jax.stats.LayerStats; got {type(stats).__name__}")
    out, n_in = shape
    if config.needs_act_absmax:
        a = stats.act_absmax
        if a is None or tuple(np.shape(a)) != (n_in,):
            raise ValueError(f"{where}act_absmax must have shape ({n_in},); got {None if a is None else tuple(np.shape(a))}")
        a = np.asarray(a)
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"{where}act_absmax must be finite and non-negative")
    if config.needs_xtx:
        h = stats.xtx
        if h is None:
            raise ValueError(f'{where}weight_method "gptq" needs XᵀX in the statistics (observe with xtx=True): {COLLECT_HINT}')
        if tuple(np.shape(h)) != (n_in, n_in):
            raise ValueError(f"{where}xtx must have shape ({n_in}, {n_in}); got {tuple(np.shape(h))}")
