"""SmoothQuant-style smoothing: `x -> x / s`, `W -> W diag(s)`, so `x Wᵀ` is unchanged.

`s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)` per input channel `j`, from the
observed activation maxima and the weight's column maxima; as in the DuQuant
paper's code, `s` is clamped to at least `SMOOTH_MIN` (a channel that never
fires, or a zero weight column, stays finite) and `max|W_j|` to at least
`WEIGHT_MIN`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SMOOTH_MIN = 1e-2
WEIGHT_MIN = 1e-5


def smoothing_factors(act_absmax: Any, w_absmax: Any, alpha: float) -> np.ndarray:
    """act_absmax: (in,) max|X_j|, w_absmax: (in,) max_i |W_ij| -> s: (in,) float64."""
    a = np.asarray(act_absmax, np.float64)
    w = np.maximum(np.asarray(w_absmax, np.float64), WEIGHT_MIN)
    return np.maximum(a**alpha / w ** (1.0 - alpha), SMOOTH_MIN)
