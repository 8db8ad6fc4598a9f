"""The input/output transforms of each rotation family, beside SPEC's SVD rotation.

Each family module holds the deterministic pieces that both the JAX path and the
float64 reference path use (matrices and signs drawn from the config's seed), and
the fitting that needs data:

  hadamard.py  block-diagonal randomized Hadamard (`H_b diag(±1)`)
  greedy.py    the DuQuant paper's greedy rotation and its zigzag permutation
  smooth.py    SmoothQuant-style per-channel smoothing factors

SPEC's SVD family lives in `duquant_jax.rotation` and `duquant_jax.permutation`.
"""
