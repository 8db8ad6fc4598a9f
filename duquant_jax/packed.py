"""`Pack`: the results of packing one weight (SPEC "Pack fields"), a JAX pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from duquant_jax.config import DuQuantConfig

ARRAY_FIELDS = ("perm", "r_in", "r_out", "w_scale", "w_codes", "a_scale")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pack:
    """One packed linear layer.

    The array fields hold JAX arrays on the JAX path and NumPy arrays on the
    reference path; `config` is static pytree metadata.

    Attributes:
      perm: (in,) int32, input channel permutation (`x1 = x[..., perm]`).
      r_in: (n_in, B, B) float32, stacked input rotations, tail block `diag(U, I)`.
      r_out: (n_out, Bo, Bo) float32 stacked output rotations; None with row_rot_mode "none".
      w_scale: (out,) float32 per-row weight scale (1 when weights are unquantized).
      w_codes: (out, in) int8 codes `Q`, so that `W_hat = Q * w_scale[:, None]`. When
        weights are unquantized (weight_bits 0/16) there are no codes: it holds the
        rotated weight `W2` itself in float32.
      a_scale: (in,) float32 per-channel activation scale, None until calibrated.
      config: the DuQuantConfig that produced it.
    """

    perm: Any
    r_in: Any
    r_out: Any
    w_scale: Any
    w_codes: Any
    a_scale: Any
    config: DuQuantConfig = dataclasses.field(metadata=dict(static=True))

    @property
    def out_features(self) -> int:
        return int(self.w_codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.w_codes.shape[1])

    @property
    def is_calibrated(self) -> bool:
        return self.a_scale is not None

    def replace(self, **changes: Any) -> Pack:
        return dataclasses.replace(self, **changes)

    def arrays(self) -> dict[str, Any]:
        """The array fields that are present, by name."""
        return {k: getattr(self, k) for k in ARRAY_FIELDS if getattr(self, k) is not None}
