"""The "hadamard" family: `x -> (x * signs) diag(H_b, H_b, ...)`, a randomized block Hadamard.

`H_b` is the normalized Sylvester Hadamard matrix of order `b` (a power of two):
`H_1 = [1]`, `H_2b = [[H_b, H_b], [H_b, -H_b]] / sqrt(2)`; symmetric and orthogonal.
`b` is the largest power of two <= `block_size` that divides the dimension, so
every channel is rotated and one `b x b` matrix serves every block (a dimension
with no power-of-two factor above 1 is left unrotated, with its signs).
The random signs come from the config's seed: one stream for input channels,
another for output rows.
"""

from __future__ import annotations

import numpy as np

from duquant_jax.transforms.blocks import largest_power_of_two_block

INPUT_STREAM, OUTPUT_STREAM = 0, 1


def hadamard_matrix(b: int) -> np.ndarray:
    """(b, b) float64 normalized Sylvester Hadamard matrix; `b` a power of two."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"a Hadamard block must be a power of two; got {b}")
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]]) / np.sqrt(2.0)
    return h


def random_signs(n: int, seed: int, stream: int) -> np.ndarray:
    """(n,) float64 of ±1 drawn from `(seed, stream)`."""
    rng = np.random.default_rng([seed, stream])
    return np.where(rng.integers(0, 2, size=n) == 1, 1.0, -1.0)


def block_for(n: int, block_size: int) -> int:
    """The Hadamard block used for a dimension of `n` channels."""
    return largest_power_of_two_block(n, block_size)
