"""Channel energy and the zigzag permutation (SPEC steps 1-2), on the host in float64.

The permutation is a sort of energies, and float32 energies of channels whose
energies differ by ~1e-6 (common: a 2048 x 2048 layer has thousands of
channels within a few percent) order differently from the float64 reference.
So the energies are computed in float64 by the reference's own function,
which makes `perm` identical to the reference's, at ~50 ms for 16384 x 2048.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from duquant_jax.reference.spec import channel_energy


def zigzag_order(e: np.ndarray) -> np.ndarray:
    """e: (in,) -> perm: (in,) int32, vectorized.

    `order` sorts channels by descending energy (stable: ties by ascending
    index); `perm` takes `order[0], order[n-1], order[1], order[n-2], ...`.
    """
    n = e.shape[0]
    order = np.argsort(-e, kind="stable")
    i = np.arange(n)
    return order[np.where(i % 2 == 0, i // 2, n - 1 - i // 2)].astype(np.int32)


def input_permutation(w: Any, enable_permute: bool, lambda_smooth: float, col_scale: np.ndarray | None = None) -> np.ndarray:
    """w: (out, in) (NumPy or JAX) -> perm: (in,) int32 of `w * col_scale` (in,) (float64; None: of `w`);
    the identity when `enable_permute` is off."""
    n_in = w.shape[1]
    if not enable_permute:
        return np.arange(n_in, dtype=np.int32)
    return zigzag_order(channel_energy(np.asarray(w), lambda_smooth, col_scale))
