"""The observe pass for Flax NNX models: input statistics of a float model's `nnx.Linear` layers.

NNX has no forward hooks, so each selected `nnx.Linear` is swapped, for the
duration of the block, for an `ObservedLinear` that wraps it and records its
input in NNX variables (so it also works under `nnx.jit`); on exit the original
modules are put back. Exported as `duquant_jax.nn.observe`.

```python
with duquant_jax.nn.observe(model, xtx=True) as stats:
    for batch in calib_batches:
        model(batch)
stats.save("stats.safetensors")
```
"""

from __future__ import annotations

from typing import ContextManager

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from duquant_jax.nn_graph import FilterFn, selected_linears, set_child
from duquant_jax.stats import LayerStats, ModelStats, observe_session


class ObserveStat(nnx.Variable):
    """Running input statistics of an observed layer: absmax, xtx, token count."""


class ObservedLinear(nnx.Module):
    """An `nnx.Linear` that also accumulates its input's statistics, in float32.

    Variables: `absmax (in,)` (`max|x_j|`), `xtx (in, in)` (`sum xᵀx`, only when
    asked for) and `tokens ()` int32. The wrapped layer's output is unchanged.
    """

    def __init__(self, linear: nnx.Linear, xtx: bool, name: str = ""):
        n = linear.in_features
        self.linear = linear
        self.name = name
        self.absmax = ObserveStat(jnp.zeros(n, jnp.float32))
        self.xtx = ObserveStat(jnp.zeros((n, n), jnp.float32)) if xtx else None
        self.tokens = ObserveStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.linear.in_features
        if x.ndim < 1 or x.shape[-1] != n:
            raise ValueError(f"observe: layer {self.name}: input must have shape (..., {n}); got {x.shape}")
        x2 = jnp.asarray(x).reshape(-1, n).astype(jnp.float32)
        if x2.shape[0]:
            self.absmax[...] = jnp.maximum(self.absmax[...], jnp.max(jnp.abs(x2), axis=0))
            if self.xtx is not None:
                self.xtx[...] = self.xtx[...] + jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST)
            self.tokens[...] = self.tokens[...] + x2.shape[0]
        return self.linear(x)

    def result(self) -> LayerStats:
        xtx = None
        if self.xtx is not None:
            xtx = np.asarray(self.xtx[...])
            xtx = 0.5 * (xtx + xtx.T)
        return LayerStats(np.asarray(self.absmax[...]), xtx, int(self.tokens[...]), layer=self.name)


def observe(model: nnx.Module, filter_fn: FilterFn | None = None, *, xtx: bool = False) -> ContextManager[ModelStats]:
    """Records the input statistics of every selected `nnx.Linear` on the batches run inside the block.

    Args:
      model: a float NNX model; run your calibration batches through it inside the
        `with` block (eagerly or under `nnx.jit`).
      filter_fn: `(name, module) -> bool` over module paths joined by "."
        (`blocks.0.q_proj`), as for `duquant_jax.nn.quantize`; default: every `nnx.Linear`.
      xtx: also accumulate `XᵀX` (in, in) in float32 per layer (GPTQ needs it).

    Returns:
      a context manager whose `as` target is a `ModelStats`, filled on a clean exit
      (the same contract as `interop.observe`). The original layers are put back
      on exit, also on an exception.
    """
    selected = selected_linears(model, filter_fn, "observe")
    swapped: list[tuple[tuple, nnx.Linear, ObservedLinear]] = []

    def start() -> None:
        for path, name, linear in selected:
            wrapper = ObservedLinear(linear, xtx, name=name)
            set_child(model, path, wrapper)
            swapped.append((path, linear, wrapper))

    def stop() -> None:
        for path, linear, _ in reversed(swapped):
            set_child(model, path, linear)

    return observe_session(start, stop, lambda: {w.name: w.result() for *_, w in swapped}, "nnx.Linear")
