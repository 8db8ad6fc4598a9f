"""`DuQuantConfig`: the settings of SPEC, validated at construction."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

ROW_ROT_MODES = ("restore", "propagate", "none")
ROTATION_METHODS = ("qr-svd", "svd", "eigh")
ROTATIONS = ("svd", "hadamard", "duquant", "none")
ACT_SCHEMES = ("static-channel", "dynamic-token", "static-tensor", "dynamic-group")
DYNAMIC_ACT_SCHEMES = ("dynamic-token", "dynamic-group")
WEIGHT_METHODS = ("rtn", "gptq")
SCALE_METHODS = ("mse", "mse-fine", "minmax")
CONFIG_VERSION = 2
_UNQUANTIZED_BITS = (0, 16)


def _check_bits(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int in 2..8, or 0/16 for no quantization; got {value!r}")
    if not (2 <= value <= 8 or value in _UNQUANTIZED_BITS):
        raise ValueError(f"{name} must be in 2..8, or 0/16 for no quantization; got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


def _check_number(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name} must be a number in {interval}; got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class DuQuantConfig:
    """Settings of one DuQuant pack. `DuQuantConfig()` is SPEC's algorithm exactly
    (docs/ALGORITHM.md); every other option is added beside it and is off by default.

    SPEC's fields:
      weight_bits: weight code width, 2..8; 0 or 16 keeps weights unquantized.
      act_bits: activation quantization width, 2..8; 0 or 16 turns it off.
      block_size: `B`, channels per input rotation block (for "hadamard" a power of two).
      block_out_size: `Bo`, rows per output rotation block; None means `B`.
      enable_permute: apply the family's channel permutation (SPEC's zigzag by weight
        energy for "svd", "hadamard" and "none"; the paper's zigzag by activation
        magnitude for "duquant").
      lambda_smooth: energy smoothing `λ` in [0, 1] (never changes the order).
      act_percentile: percentile of `|x2|` per channel for static activation scales, in (0, 100].
      calib_batches: at most this many batches count towards calibration.
      row_rot_mode: "restore", "propagate" or "none" (SPEC "Forward pass").
      rotation_method: how the "svd" family's left singular vectors are computed:
        "qr-svd" (default: QR's R factor, then the SVD of that b x b factor),
        "svd" (vmapped SVD of each b x N block) or "eigh" (of the b x b Gram matrix).

    Options added beside SPEC (docs/ALGORITHM.md "Options"):
      rotation: the rotation family: "svd" (SPEC, default), "hadamard" (block-diagonal
        randomized Hadamard), "duquant" (the DuQuant paper's greedy rotations and
        zigzag, fitted on activation statistics) or "none" (no rotation at all, of
        inputs or rows, whatever row_rot_mode says).
      seed: seed of every random draw (Hadamard signs, the greedy rotation's base).
      smooth_alpha: SmoothQuant migration strength in [0, 1]; None (default) turns
        smoothing off. Needs activation statistics.
      greedy_steps: most greedy rotation steps of the "duquant" family.
      weight_group_size: one weight scale per row and per group of this many
        consecutive input channels (in the rotated basis); None (default): per row.
      scale_method: "mse" (SPEC's grid of five candidates, default), "mse-fine" (16 candidates:
        the absmax scale shrunk by 0 to 30% in steps of 2%, the least squared error wins) or "minmax".
      weight_method: "rtn" (round to nearest, default) or "gptq" (needs statistics with XᵀX).
      gptq_damp: GPTQ dampening, a fraction of the mean diagonal of H, in [0, 1].
      gptq_block: GPTQ lazy-batch block size (columns).
      gptq_act_order: GPTQ rounds columns in descending order of diag(H).
      gptq_static_groups: True (default): GPTQ rounds with the scales fitted to the weight before
        any rounding (the reference code's `static_groups`). False: each group's scale is fitted
        when the rounding reaches the group's first column, to the weights as the error feedback
        of the columns before has left them (the reference code's default). False needs
        weight_group_size dividing gptq_block and no act_order.
      act_scheme: "static-channel" (SPEC, default: calibrated per-channel scales),
        "dynamic-token" (per-token absmax at run time), "static-tensor" (one
        calibrated scale per layer) or "dynamic-group" (at run time, one absmax scale
        per token and per group of `act_group_size` consecutive channels of x2).
      act_clip: the dynamic schemes' scales are `act_clip * max|x2|` (per token, or per
        token and group), in (0, 1].
      act_group_size: channels per activation scale group of "dynamic-group" (in the
        rotated basis; a short last group allowed); unused by the other schemes.
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
    rotation: str = "svd"
    seed: int = 0
    smooth_alpha: float | None = None
    greedy_steps: int = 256
    weight_group_size: int | None = None
    scale_method: str = "mse"
    weight_method: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = False
    gptq_static_groups: bool = True
    act_scheme: str = "static-channel"
    act_clip: float = 1.0
    act_group_size: int = 128

    VERSION: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        _check_positive_int("block_size", self.block_size)
        if self.block_out_size is not None:
            _check_positive_int("block_out_size", self.block_out_size)
        _check_positive_int("calib_batches", self.calib_batches)
        for name in ("enable_permute", "gptq_act_order", "gptq_static_groups"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}")
        _check_number("lambda_smooth", self.lambda_smooth, 0.0, 1.0)
        _check_number("act_percentile", self.act_percentile, 0.0, 100.0, lo_open=True)
        _check_choice("row_rot_mode", self.row_rot_mode, ROW_ROT_MODES)
        _check_choice("rotation_method", self.rotation_method, ROTATION_METHODS)
        _check_choice("rotation", self.rotation, ROTATIONS)
        _check_choice("act_scheme", self.act_scheme, ACT_SCHEMES)
        _check_choice("weight_method", self.weight_method, WEIGHT_METHODS)
        _check_choice("scale_method", self.scale_method, SCALE_METHODS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32); got {self.seed!r}")
        if self.smooth_alpha is not None:
            _check_number("smooth_alpha", self.smooth_alpha, 0.0, 1.0)
        _check_positive_int("greedy_steps", self.greedy_steps)
        if self.weight_group_size is not None:
            _check_positive_int("weight_group_size", self.weight_group_size)
        _check_number("gptq_damp", self.gptq_damp, 0.0, 1.0)
        _check_positive_int("gptq_block", self.gptq_block)
        _check_number("act_clip", self.act_clip, 0.0, 1.0, lo_open=True)
        _check_positive_int("act_group_size", self.act_group_size)
        if not self.gptq_static_groups and self.weight_method == "gptq" and self.quantize_weights:
            if self.weight_group_size is None or self.gptq_block % self.weight_group_size:
                raise ValueError(
                    "gptq_static_groups=False fits each group's scale inside GPTQ's blocks: it needs weight_group_size "
                    f"to divide gptq_block; got weight_group_size={self.weight_group_size!r}, gptq_block={self.gptq_block!r}"
                )
            if self.gptq_act_order:
                raise ValueError("gptq_static_groups=False rounds columns in their own order: it needs gptq_act_order=False")
        if self.rotation == "hadamard":
            for name, size in (("block_size", self.block_size), ("block_out_size", self.out_block_size)):
                if not _is_power_of_two(size):
                    raise ValueError(f'rotation "hadamard" needs {name} to be a power of two; got {size!r}')

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
        """Whether output rows are rotated: row_rot_mode is not "none" and rotation is not "none"."""
        return self.row_rot_mode != "none" and self.rotation != "none"

    @property
    def rotate_inputs(self) -> bool:
        return self.rotation != "none"

    @property
    def needs_calibration(self) -> bool:
        """Whether a forward needs calibrated activation scales (static schemes with act_bits 2..8)."""
        return self.quantize_acts and self.act_scheme not in DYNAMIC_ACT_SCHEMES

    @property
    def needs_act_absmax(self) -> bool:
        """Whether packing needs per-channel activation maxima (smoothing, the "duquant" family)."""
        return self.smooth_alpha is not None or self.rotation == "duquant"

    @property
    def needs_xtx(self) -> bool:
        """Whether packing needs the input second-moment matrix XᵀX (GPTQ)."""
        return self.weight_method == "gptq" and self.quantize_weights

    @property
    def needs_stats(self) -> bool:
        return self.needs_act_absmax or self.needs_xtx

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DuQuantConfig:
        """Build from a dict; unknown keys are an error that names them.

        Dicts written by version 1 (SPEC's fields only) load with every new
        option at its default, which is SPEC's behaviour.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a DuQuantConfig must be read from a dict; got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DuQuantConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> DuQuantConfig:
        return cls.from_dict(json.loads(s))

    def replace(self, **changes: Any) -> DuQuantConfig:
        """A copy with `changes` applied (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DuQuantConfig:
        """The recommended configuration for `name` in PRESETS ("w8a8", "w4a8", "w4a16", "w4a4"),
        chosen from the measured quality table (README "Presets", bench/RESULTS.md "Quality"),
        with `overrides` applied. Presets that round with GPTQ need statistics with XᵀX.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; the presets are {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# The recommended configurations (DuQuantConfig.preset), from bench/RESULTS.md "Quality" (held-out,
# Gemma-3 270M and MiniLM): a Hadamard rotation of the inputs (blocks of 128, output rows left
# unrotated: rotating them measured worse) with per-token activation scales, so that the integer
# kernels apply; at 4 bits, GPTQ (in activation order, except where smoothing and activation order
# together measured worse than either alone: w4a8) and weight groups of 128, of 32 in w4a8 (on the
# development split, groups of 32 tied groups of 128 on Gemma-3 270M and beat them on MiniLM at W4A8;
# at W4A16 they measured worse on Gemma, so w4a16 keeps 128).
# W4A8 and W4A4 add smoothing (alpha 0.5): it moves activation outliers into the weights,
# where GPTQ absorbs them (W4A16 leaves activations in float and the weights as they are); 4-bit
# activations take one scale per token and group of 64 channels ("dynamic-group", chosen on the
# development split over one per token and groups of 128), clipped to 0.9 of each group's absmax.
_DEPLOY = dict(rotation="hadamard", block_size=128, row_rot_mode="none", act_scheme="dynamic-token")
_GPTQ_G128 = dict(weight_group_size=128, weight_method="gptq", gptq_act_order=True)
PRESETS: dict[str, dict[str, Any]] = {
    "w8a8": dict(_DEPLOY, weight_bits=8, act_bits=8),
    "w4a8": dict(_DEPLOY, weight_bits=4, act_bits=8, smooth_alpha=0.5,
                 **{**_GPTQ_G128, "gptq_act_order": False, "weight_group_size": 32}),
    "w4a16": dict(_DEPLOY, weight_bits=4, act_bits=16, **_GPTQ_G128),
    "w4a4": dict(_DEPLOY, weight_bits=4, act_bits=4, smooth_alpha=0.5, act_clip=0.9, **_GPTQ_G128,
                 act_scheme="dynamic-group", act_group_size=64),
}


def qmax(bits: int) -> int:
    """Largest positive code of a signed `bits`-bit integer: 2^(bits-1) - 1."""
    return 2 ** (bits - 1) - 1
