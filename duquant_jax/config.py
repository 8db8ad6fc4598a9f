"""`DuQuantConfig`: the settings of SPEC, validated at construction."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

ROW_ROT_MODES = ("restore", "propagate", "none")
ROTATION_METHODS = ("qr-svd", "svd", "eigh")
_UNQUANTIZED_BITS = (0, 16)


def _check_bits(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int in 2..8, or 0/16 for no quantization; got {value!r}")
    if not (2 <= value <= 8 or value in _UNQUANTIZED_BITS):
        raise ValueError(f"{name} must be in 2..8, or 0/16 for no quantization; got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


@dataclasses.dataclass(frozen=True)
class DuQuantConfig:
    """Settings of one DuQuant pack (SPEC "Packing a weight").

    Attributes:
      weight_bits: weight code width, 2..8; 0 or 16 keeps weights unquantized.
      act_bits: activation fake-quant width, 2..8; 0 or 16 turns it off.
      block_size: `B`, channels per input rotation block.
      block_out_size: `Bo`, rows per output rotation block; None means `B`.
      enable_permute: apply the zigzag channel permutation.
      lambda_smooth: energy smoothing `λ` in [0, 1] (never changes the order).
      act_percentile: percentile of `|x2|` per channel for activation scales, in (0, 100].
      calib_batches: at most this many batches count towards calibration.
      row_rot_mode: "restore", "propagate" or "none" (SPEC "Forward pass").
      rotation_method: how each block's left singular vectors are computed:
        "qr-svd" (default: QR's R factor, then the SVD of that b x b factor),
        "svd" (vmapped SVD of each b x N block) or "eigh" (of the b x b Gram matrix).
    """

    weight_bits: int = 4
    act_bits: int = 8
    block_size: int = 16
    block_out_size: int | None = None
    enable_permute: bool = True
    lambda_smooth: float = 0.15
    act_percentile: float = 99.9
    calib_batches: int = 32
    row_rot_mode: str = "restore"
    rotation_method: str = "qr-svd"

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        _check_positive_int("block_size", self.block_size)
        if self.block_out_size is not None:
            _check_positive_int("block_out_size", self.block_out_size)
        _check_positive_int("calib_batches", self.calib_batches)
        if not isinstance(self.enable_permute, bool):
            raise ValueError(f"enable_permute must be a bool; got {self.enable_permute!r}")
        if (
            isinstance(self.lambda_smooth, bool)
            or not isinstance(self.lambda_smooth, (int, float))
            or not 0.0 <= self.lambda_smooth <= 1.0
        ):
            raise ValueError(f"lambda_smooth must be a number in [0, 1]; got {self.lambda_smooth!r}")
        if (
            isinstance(self.act_percentile, bool)
            or not isinstance(self.act_percentile, (int, float))
            or not (0.0 < self.act_percentile <= 100.0)
            or math.isnan(self.act_percentile)
        ):
            raise ValueError(f"act_percentile must be in (0, 100]; got {self.act_percentile!r}")
        if self.row_rot_mode not in ROW_ROT_MODES:
            raise ValueError(f"row_rot_mode must be one of {ROW_ROT_MODES}; got {self.row_rot_mode!r}")
        if self.rotation_method not in ROTATION_METHODS:
            raise ValueError(
                f"rotation_method must be one of {ROTATION_METHODS}; got {self.rotation_method!r}"
            )

    @property
    def out_block_size(self) -> int:
        """`Bo`: `block_out_size`, or `block_size` when that is None."""
        return self.block_size if self.block_out_size is None else self.block_out_size

    @property
    def quantize_weights(self) -> bool:
        return self.weight_bits not in _UNQUANTIZED_BITS

    @property
    def quantize_acts(self) -> bool:
        return self.act_bits not in _UNQUANTIZED_BITS

    @property
    def rotate_rows(self) -> bool:
        return self.row_rot_mode != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DuQuantConfig:
        """Build from a dict; unknown keys are an error that names them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DuQuantConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> DuQuantConfig:
        return cls.from_dict(json.loads(s))


def qmax(bits: int) -> int:
    """Largest positive code of a signed `bits`-bit integer: 2^(bits-1) - 1."""
    return 2 ** (bits - 1) - 1
