"""Activation statistics that packing needs (smoothing, the "duquant" rotation, GPTQ).

`LayerStats` holds one linear layer's input statistics, accumulated over the
observe pass's batches (never whole activations).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Statistics of one linear layer's input `x (..., in)`, over every token observed.

    Attributes:
      act_absmax: (in,) float32, `max |x_j|` per input channel.
      xtx: (in, in) float32 `sum_t x_t x_tᵀ` (the second-moment matrix `XᵀX`, not
        normalized), or None when it was not recorded.
      tokens: how many tokens (rows of `X`) were observed.
    """

    act_absmax: Any
    xtx: Any = None
    tokens: int = 0

    @property
    def in_features(self) -> int:
        return int(np.shape(self.act_absmax)[0])
