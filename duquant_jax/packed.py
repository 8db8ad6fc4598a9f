"""`Pack`: the results of packing one weight (docs/ALGORITHM.md "Pack fields"), a JAX pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from duquant_jax.config import DuQuantConfig

ARRAY_FIELDS = ("in_diag", "r_pre", "perm", "r_in", "r_out", "out_diag", "w_scale", "w_codes", "a_scale")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pack:
    """One packed linear layer.

    The array fields hold JAX arrays on the JAX path and NumPy arrays on the
    reference path; `config` is static pytree metadata. The input transform is

        x2 = rot(rot(x * in_diag, r_pre)[..., perm], r_in)

    where `rot(x, r)` multiplies each block of `r.shape[-1]` channels by its matrix
    (one matrix per block, or one `(1, b, b)` matrix shared by every block). SPEC's
    algorithm uses only `perm` and per-block `r_in`; the other optional fields are None.

    Attributes:
      perm: (in,) int32, input channel permutation (`x1 = x[..., perm]`).
      r_in: (n_in, B, B) or (1, B, B) float32 input rotations (a short tail block of a
        per-block stack is `diag(U, I)`); None with rotation "none".
      r_out: (n_out, Bo, Bo) or (1, Bo, Bo) float32 output rotations; None when rows are
        not rotated.
      w_scale: (out,) float32 per-row weight scale, or (out, ceil(in / G)) with weight groups
        of G input channels (1 when weights are unquantized).
      w_codes: (out, in) int8 codes `Q`, so that `W_hat = Q * scale` (each code times its
        row's / group's scale). When weights are unquantized (weight_bits 0/16) it holds
        the transformed weight `W2` itself in float32.
      a_scale: static activation scales: (in,) for "static-channel", (1,) for
        "static-tensor"; None until calibrated, and always None for the dynamic schemes.
      config: the DuQuantConfig that produced it.
      in_diag: (in,) float32 factor applied to the input first (smoothing `1/s` times the
        Hadamard family's random signs); None for none.
      r_pre: (n_in, B, B) or (1, B, B) float32 block rotation applied before `perm`
        (the "duquant" family's first greedy rotation); None for none.
      out_diag: (out,) float32 output-row signs of the "hadamard"/"duquant" row rotation:
        the full output rotation is `diag(r_out) @ diag(out_diag)`; None for none.
    """

    perm: Any
    r_in: Any
    r_out: Any
    w_scale: Any
    w_codes: Any
    a_scale: Any
    config: DuQuantConfig = dataclasses.field(metadata=dict(static=True))
    in_diag: Any = None
    r_pre: Any = None
    out_diag: Any = None

    @property
    def out_features(self) -> int:
        return int(self.w_codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.w_codes.shape[1])

    @property
    def is_calibrated(self) -> bool:
        return self.a_scale is not None

    @property
    def group_size(self) -> int | None:
        """Input channels per weight scale group; None with one scale per row."""
        return self.config.weight_group_size if self.config.quantize_weights else None

    def replace(self, **changes: Any) -> Pack:
        return dataclasses.replace(self, **changes)

    def arrays(self) -> dict[str, Any]:
        """The array fields that are present, by name."""
        return {k: getattr(self, k) for k in ARRAY_FIELDS if getattr(self, k) is not None}
