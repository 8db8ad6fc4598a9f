"""The quantized product of `DuQuantLinear`, by the fastest correct path of this machine.

For rotated activations `x2: (T, in)` (float32, bfloat16 or float16) and a
`QuantizedWeight` (`W_hat = Q * s_w`, per row or per group),
`quantized_matmul(x2, weight, act)` computes `y = x3 @ W_hatᵀ` (T, out) in
x2's dtype, where `x3` is x2 after the activation handling `act` (`ActQuant`):

- `"none"` (A16, weight-only): `x3 = x2`.
- `"dynamic-token"`, `act_bits` a, `clip` c: per token, in float32,
  `s_t = max(c * max_j |x2[t, j]| / qa, 1e-8)` with `qa = 2^(a-1) - 1`,
  `xq = clamp(round_half_even(x2 / s_t), -qa-1, qa)`, `x3 = xq * s_t`
  (an all-zero row gives zeros).
- `"static-tensor"`: the same with one calibrated scale `s_t = s_a` for every token.
- `"static-channel"`: per-channel calibrated scales `s_a (in,)`:
  `x3 = clamp(round(x2 / s_a), ...) * s_a`. Its scales do not factor out of an
  integer product, so it only has float paths: a simulation of A8, not a speed-up.
- `"dynamic-group"`, group size g: `"dynamic-token"`'s rule per token and per group of
  g consecutive channels (a short last group allowed), `x3 = xq * s_tg`; float paths
  only, as "static-channel".

Paths (`PATHS`), each checked against the oracle by `tests/test_kernels.py`:

| path | activations | weights | arithmetic |
| --- | --- | --- | --- |
| `fake-quant` | all | all | float32: `x3` and `W_hat` tiles in float32, float32 GEMM: the oracle |
| `dequant-bf16` | all | all | `W_hat` tiles rounded to bfloat16 (made in one C pass by `interop.compiled` where it is built, else by torch ops: the same bits), times `xq` (exact in bfloat16; `s_t` applied to the output in float32) or x2 / `x3` rounded to bfloat16; bfloat16 GEMM |
| `int-mm` | dynamic-token, static-tensor | all | `torch._int_mm` on int8 `xq` and int8 code tiles: exact int32 sums, then `s_t * s_w` in float32; groups: one int32 product per group |
| `int8pack` | none, dynamic-token, static-tensor | int8 layout, per row, CPU | `torch._weight_int8pack_mm`: bfloat16 input (`xq` is exact in it), bfloat16 scales and output |
| `int4pack` | none, dynamic-token, static-tensor | int4pack layout, CPU | `_weight_int4pack_mm_for_cpu`: bfloat16 input, bfloat16 group scales, float32 accumulation, bfloat16 output |
| `c-int8` | dynamic-token, static-tensor | panels layout, groups of a multiple of 4 (8-bit: at most 65536), CPU with AVX2 | `interop.compiled`'s `duq_w4a8_panels` / `duq_w8a8_panels`: exact int32 sums per group (AVX2 `vpmaddubsw` on 4-bit values; 8-bit codes as two 4-bit halves), `s_w` and `s_t` applied in float32 (a fused multiply-add per group) |

Error against a float64 oracle, per output element and relative to
`|x3| @ |W_hat|ᵀ` (the scale of a dot product's rounding errors): `fake-quant`,
`int-mm` and `c-int8` <= 1e-5 with float32 inputs (the integer sums are exact; only the
float32 scaling rounds); the bfloat16 paths <= 2e-2 (bfloat16 rounding of
activations, scales and outputs, unit roundoff 2^-8 each; measured <= 5e-3
norm-wise). "int4pack" with dynamic-token A8 is the int4 kernel fed the integer
activations `xq` as bfloat16 (exact up to 256) with `s_t` applied afterwards:
its float32 accumulation of integers is exact (|sum| < 2^24 for in <= 16384), but
the kernel rounds its output and the scales to bfloat16, so it is a bfloat16
path, not an exact one. The bfloat16 paths are allowed only under
`precision="any"` (the default; see `KernelOptions`): a float32 model then may
be computed in bfloat16 where that is faster, as the issue asks ("the fastest
float dtype of the machine").

Temporaries: weight tiles of at most TILE_ROWS rows are unpacked per call into
per-thread scratch buffers that are reused (`interop.qweight.scratch`;
`release_scratch()` frees them); a float tile holds at most TILE_BYTES of codes
(torch ops) or FLOAT_TILE_BYTES of bfloat16 (`interop.compiled`, which may make
a weight of up to 8M elements, a 2048 x 2048 projection, in one tile), so the
scratch stays bounded whatever the model.
On the CPU, `quantize_tokens` of float32 and bfloat16 inputs also runs as one C
pass per token there, with the same codes and scales; `kernel_options(compiled=False)`
keeps both to torch ops.

Which path runs: the one forced per call (`path=`), else per weight
(`weight.path`), else globally (`set_kernel_options(path=...)`); else the path
frozen for the call's token-count bucket and dtype (`freeze_paths`, saved with
the model), where the precision option allows it and it can run; otherwise the
`interop.kernel_tuning` autotuner's fastest candidate for this machine, shape,
dtype, token-count bucket and configuration, measured once and cached (memory;
disk after `kernel_tuning.enable_disk_cache()`). `weight.last_path` tells which
path the last eager call took. Inference only: no gradients flow through the codes.

Under `torch.compile`: `prepare` (the activation handling) is traced as ordinary
ops, and the product is one opaque `torch.ops.duquant.quantized_mm`
(`interop.custom_ops`), whose string argument carries the forced path or the
frozen table; it picks the bucket's path from the token count at run time, so
one dynamic-shape graph serves every prompt length (one token apart: dynamo
specialises size 1). Freeze the paths first (`freeze_paths(model)`); without
frozen paths the op runs the autotuner at run time, as eager does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Iterator

import torch

from interop import compiled, kernel_tuning, native
from interop.qweight import (
    INT4PACK_GROUPS, QuantizedWeight, natural_view, panels_unavailable, release_scratch, rows_view, scratch, to_tile_order,
)

__all__ = [
    "ACT_SCHEMES", "FREEZE_TOKENS", "PATHS", "ActQuant", "KernelOptions", "KernelPath", "QuantizedWeight", "candidates",
    "choose_path", "fake_quantize", "freeze_paths", "get_kernel_options", "kernel_options", "path_spec", "prepare",
    "quantize_tokens", "quantized_matmul", "release_scratch", "resolve_path", "set_kernel_options", "unavailable",
    "unfreeze_paths",
]

ACT_SCHEMES = ("none", "dynamic-token", "static-tensor", "static-channel", "dynamic-group")
PRECISIONS = ("any", "float32")
DYNAMIC_EPS = 1e-8  # float32 floor of a dynamic per-token scale
# Weight tiles: 1024 rows (2 MiB of int8 codes at in = 2048, 16 MiB at 16384) measured fastest for
# int-mm on the Gemma-2B shapes here (bench/RESULTS.md); at most TILE_BYTES of int8 codes.
TILE_ROWS = 1024
TILE_BYTES = 16 << 20
# bfloat16 tiles made by interop.compiled in one pass: at most this many bytes (whole 2048 x 2048 weights at once;
# measured fastest against 512-2048 rows on the Gemma-2B shapes, bench/RESULTS.md "Compiled helpers")
FLOAT_TILE_BYTES = 16 << 20


# -- activation handling ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ActQuant:
    """How activations are quantized before the product (module docstring).

    Attributes:
      scheme: "none", "dynamic-token", "static-tensor", "static-channel" or "dynamic-group".
      bits: activation code width, 2..8 (ignored with "none").
      clip: the dynamic schemes clip the per-token (per-group) max by this factor, in (0, 1].
      group: channels per scale group of "dynamic-group" (ignored by the other schemes).
    """

    scheme: str = "none"
    bits: int = 8
    clip: float = 1.0
    group: int = 128

    def __post_init__(self) -> None:
        if self.scheme not in ACT_SCHEMES:
            raise ValueError(f"act scheme must be one of {ACT_SCHEMES}; got {self.scheme!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"act bits must be an int in 2..8; got {self.bits!r}")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not 0 < self.clip <= 1:
            raise ValueError(f"act clip must be a number in (0, 1]; got {self.clip!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"act group must be an int >= 1; got {self.group!r}")
        object.__setattr__(self, "_clip_text", repr(float(self.clip)))

    @property
    def traced_clip(self) -> float:
        """`clip` as dynamo sees a constant: read as a float attribute it becomes a graph input that
        specialising later forces a restart of the whole trace (a second compile)."""
        return float(self._clip_text)

    @property
    def qa(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def integer(self) -> bool:
        """Whether the scale factors out of the product, so that it can run on integer codes."""
        return self.scheme in ("dynamic-token", "static-tensor")

    @classmethod
    def from_config(cls, config) -> ActQuant:
        """From a `DuQuantConfig` (its `act_bits`, `act_scheme`, `act_clip`, `act_group_size`)."""
        if not config.quantize_acts:
            return cls("none")
        return cls(config.act_scheme, config.act_bits, float(config.act_clip), int(config.act_group_size))


def quantize_tokens(x2: torch.Tensor, act: ActQuant, act_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x2: (T, in) -> (`xq` (T, in) int8, `s_t` (T, 1) float32) for "dynamic-token" / "static-tensor".

    Every path that needs integer activations takes them from here, so all of
    them see the same codes and scales (computed in float32).
    """
    if torch.compiler.is_compiling():
        return _quantize_tokens_functional(x2, act, act_scale)
    if _OPTIONS.compiled and _compiled_quantize_ok(x2) and compiled.load() is not None:
        return native.quantize_tokens(x2, act.scheme == "dynamic-token", act.clip, act.qa, act_scale)
    shape, device = tuple(x2.shape), x2.device
    xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else scratch("act", shape, torch.float32, device).copy_(x2)
    qa = act.qa
    if act.scheme == "dynamic-token":
        s = torch.abs(xf, out=scratch("act_abs", shape, torch.float32, device)).amax(dim=1, keepdim=True)
        s = (s if act.clip == 1 else s.mul_(act.clip)).div_(qa).clamp_(min=DYNAMIC_EPS)  # (c * max) / qa
    else:
        s = act_scale.reshape(1, 1).float().expand(xf.shape[0], 1)
    xq = torch.div(xf, s, out=scratch("act_q", shape, torch.float32, device)).round_().clamp_(-qa - 1, qa).to(torch.int8)
    return xq, s


def _compiled_quantize_ok(x2: torch.Tensor) -> bool:
    """Whether `native.quantize_tokens` takes x2 as it is: float32 or bfloat16 on the CPU, in a layout it walks."""
    return x2.device.type == "cpu" and x2.dtype in (torch.float32, torch.bfloat16) and native.token_layout(x2) is not None


def _quantize_tokens_functional(x2: torch.Tensor, act: ActQuant, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_tokens` without scratch buffers or in-place ops (the same arithmetic), for dynamo to trace."""
    xf, qa = x2.float(), act.qa
    if act.scheme == "dynamic-token":
        s = xf.abs().amax(dim=1, keepdim=True)
        clip = act.traced_clip
        s = (s if clip == 1 else s * clip) / qa
        s = s.clamp(min=1e-8)  # DYNAMIC_EPS, as a literal: dynamo traces a global float as a dynamic input
    else:
        s = act_scale.reshape(1, 1).float().expand(xf.shape[0], 1)
    # row-major codes, as the eager path gives them: written so by the fused kernel, not copied by a product later
    return (xf / s).round().clamp(-qa - 1, qa).to(torch.int8).contiguous(), s


def prepare(x2: torch.Tensor, act: ActQuant, act_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x2: (T, in) -> (`a`, `s_t`), what every path's product takes (`KernelPath.product`):

    - "none": `(x2, None)`;
    - "dynamic-token", "static-tensor": `(xq (T, in) int8, s_t (T, 1) float32)` (`quantize_tokens`);
    - "static-channel", "dynamic-group": `(x3 (T, in) float32, None)` (`fake_quantize`).

    Under `torch.compile` this is ordinary traced torch code, so inductor fuses it with the rotation.
    """
    if act.scheme == "none":
        return x2, None
    if act.integer:
        return quantize_tokens(x2, act, act_scale)
    return fake_quantize(x2, act, act_scale), None


def fake_quantize(x2: torch.Tensor, act: ActQuant, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x2: (T, in) -> `x3` (T, in) float32, the activations every path multiplies (module docstring)."""
    if act.scheme == "none":
        return x2.float()
    if act.integer:
        xq, s = quantize_tokens(x2, act, act_scale)
        return xq.float().mul_(s)
    if act.scheme == "dynamic-group":
        return _fake_quantize_groups(x2, act)
    s = act_scale.float()
    return torch.div(x2.float(), s).round_().clamp_(-act.qa - 1, act.qa).mul_(s)


def _fake_quantize_groups(x2: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """"dynamic-group": x2 (T, in) -> x3 (T, in) float32, one scale per token and group of `act.group` channels
    (the last group may be shorter: zero padding changes no group's maximum). Plain ops, so dynamo traces it."""
    t, n = x2.shape
    g = act.group
    groups = -(-n // g)
    xf = x2.float()
    if groups * g != n:
        xf = torch.nn.functional.pad(xf, (0, groups * g - n))
    xg = xf.reshape(t, groups, g)
    clip = act.traced_clip
    s = xg.abs().amax(dim=2, keepdim=True)
    s = (s if clip == 1 else s * clip) / act.qa
    s = s.clamp(min=1e-8)  # DYNAMIC_EPS
    x3 = (xg / s).round().clamp(-act.qa - 1, act.qa) * s
    return x3.reshape(t, groups * g)[:, :n]


# -- paths ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelPath:
    """One way to compute the product.

    Attributes:
      name: the name a user forces it by.
      precision: "float32" (float32 or exact integer arithmetic) or "bfloat16".
      unavailable: `(weight, act, dtype, device, tokens) -> reason or None`, where
        `tokens` is the token count of the call (or of the bucket measured).
      product: `(a, s_t, weight, dtype) -> y (T, out)` in `dtype`, on `prepare`d activations.
    """

    name: str
    precision: str
    unavailable: Callable[[QuantizedWeight, ActQuant, torch.dtype, torch.device, int], str | None]
    product: Callable[[torch.Tensor, torch.Tensor | None, QuantizedWeight, torch.dtype], torch.Tensor]

    def run(self, x2: torch.Tensor, weight: QuantizedWeight, act: ActQuant, act_scale: torch.Tensor | None) -> torch.Tensor:
        """x2 (T, in) -> y (T, out) in x2's dtype: `prepare`, then `product`."""
        a, s_t = prepare(x2, act, act_scale)
        return self.product(a, s_t, weight, x2.dtype)


def _tile_rows(weight: QuantizedWeight) -> int:
    """Rows per weight tile: TILE_ROWS, fewer where `in` is so large that a tile would pass TILE_BYTES."""
    return max(64, min(TILE_ROWS, TILE_BYTES // max(1, weight.in_features)))


def _tiles(weight: QuantizedWeight) -> Iterator[tuple[int, int]]:
    return weight.row_tiles(_tile_rows(weight))


def _output(tokens: int, weight: QuantizedWeight, dtype: torch.dtype, final: torch.dtype) -> torch.Tensor:
    """The (T, out) product buffer: fresh when it is what the caller gets, scratch when `_finish` converts it."""
    shape = (tokens, weight.out_features)
    if dtype == final:
        return torch.empty(shape, dtype=dtype, device=weight.qdata.device)
    return scratch("y", shape, dtype, weight.qdata.device)


def _float_product(x3: torch.Tensor, weight: QuantizedWeight, dtype: torch.dtype, final: torch.dtype) -> torch.Tensor:
    """x3 (T, in) in `dtype` @ W_hat tiles in `dtype` -> (T, out) in `dtype` (per-row scales applied to the product)."""
    y = _output(x3.shape[0], weight, dtype, final)
    x_split, per_row = None, weight.group_size is None
    one_pass = _OPTIONS.compiled and dtype == torch.bfloat16 and weight.qdata.device.type == "cpu" and compiled.load() is not None
    # one-pass tiles are cheap to make, so they may be larger: fewer, wider GEMMs, and none into a column slice of y
    tiles = weight.row_tiles(max(64, FLOAT_TILE_BYTES // (2 * weight.in_features))) if one_pass else _tiles(weight)
    for r0, r1 in tiles:
        w, tile = weight.float_tile(r0, r1, dtype, split=True, compiled=one_pass)
        if tile.split:
            x_split = split_columns(x3) if x_split is None else x_split
        a = x_split if tile.split else x3
        out = y[:, r0:r1]
        if tile.lanes:
            prod = torch.mm(a, w, out=scratch("prod", (a.shape[0], r1 - r0), dtype, a.device))
            if per_row:
                torch.mul(natural_view(prod, tile.lanes), _per_row(weight.scales[r0:r1], tile.lanes), out=rows_view(out, tile.lanes))
            else:
                rows_view(out, tile.lanes).copy_(natural_view(prod, tile.lanes))
        else:
            torch.mm(a, w, out=out)
            if per_row:
                out.mul_(weight.scales[r0:r1])
    return y


def _fake_quant_product(a, s_t, weight, dtype):
    x3 = a.float() if s_t is None else a.float().mul_(s_t)  # x2, x3, or xq * s_t (as fake_quantize)
    return _float_product(x3, weight, torch.float32, dtype).to(dtype)


def _dequant_bf16_product(a, s_t, weight, dtype):
    return _finish(_float_product(_bf16(a), weight, torch.bfloat16, dtype), s_t, dtype)


def split_columns(x: torch.Tensor) -> torch.Tensor:
    """x: (T, in) -> (T, 2 * ceil(in/2)): the even columns, then the odd ones (a zero column pads an odd `in`).

    The order `QuantizedWeight.code_tile(split=True)` gives the nibble layout's codes.
    """
    if x.shape[1] % 2:
        x = torch.nn.functional.pad(x, (0, 1))
    return torch.cat((x[:, 0::2], x[:, 1::2]), dim=1)


def _per_row(s: torch.Tensor, lanes: int) -> torch.Tensor:
    """(n,) row scales, shaped to broadcast against `natural_view` of a tile."""
    return s.view(-1, 2, lanes) if lanes else s


def _int_mm_product(xq, s_t, weight, dtype):
    if xq.dtype != torch.int8 or s_t is None:
        raise ValueError(f"int-mm needs int8 activation codes and their scales; got {xq.dtype}, s_t={'None' if s_t is None else 'tensor'}")
    if weight.group_size is not None:
        y = _output(xq.shape[0], weight, torch.float32, dtype)
        _grouped_int_mm(xq, weight, y)
        return _finish(y, s_t, dtype)
    # per tile, while it is in cache: exact int32 product, offset, `* s_t` and `* s_w` into the output
    tokens, device = xq.shape[0], xq.device
    y = torch.empty(tokens, weight.out_features, dtype=dtype, device=device)
    x_split, offset_sum = None, None
    for r0, r1 in _tiles(weight):
        tile = weight.code_tile(r0, r1, split=True)
        if tile.split:
            x_split = split_columns(xq) if x_split is None else x_split
        acc = native.int_mm(x_split if tile.split else xq, tile.b, scratch("acc", (tokens, r1 - r0), torch.int32, device))
        if tile.offset:  # b holds Q + o: xq (Q + o) = xq Q + o * sum(xq), exact in int32
            if offset_sum is None:
                offset_sum = xq.sum(dim=1, keepdim=True, dtype=torch.int32) * tile.offset
            acc.sub_(offset_sum)
        scaled = torch.mul(acc, s_t, out=scratch("acc_f", (tokens, r1 - r0), torch.float32, device))
        out = rows_view(y[:, r0:r1], tile.lanes)
        torch.mul(natural_view(scaled, tile.lanes), _per_row(weight.scales[r0:r1], tile.lanes), out=out)
    return y


def _grouped_int_mm(xq: torch.Tensor, weight: QuantizedWeight, y: torch.Tensor) -> None:
    """Per group g: exact int32 `xq[:, g] · Q[:, g]`, scaled by `s_w[:, g]` and summed in float32 into y."""
    g, n = weight.group_size, weight.in_features
    bounds = [(c, min(c + g, n)) for c in range(0, n, g)]
    sums = None
    for r0, r1 in _tiles(weight):
        tile = weight.code_tile(r0, r1)
        if tile.offset and sums is None:
            sums = [xq[:, c0:c1].sum(dim=1, keepdim=True, dtype=torch.int32) * tile.offset for c0, c1 in bounds]
        scales = to_tile_order(weight.scales_2d()[r0:r1], tile.lanes)
        acc_f = y[:, r0:r1] if not tile.lanes else scratch("acc_g", (y.shape[0], r1 - r0), torch.float32, y.device)
        acc_f.zero_()
        acc = scratch("acc", (y.shape[0], r1 - r0), torch.int32, y.device)
        for k, (c0, c1) in enumerate(bounds):  # one exact product per scale group
            native.int_mm(xq[:, c0:c1], tile.b[c0:c1], acc)
            if tile.offset:
                acc.sub_(sums[k])
            acc_f.addcmul_(acc, scales[:, k])
        if tile.lanes:
            rows_view(y[:, r0:r1], tile.lanes).copy_(natural_view(acc_f, tile.lanes))


def _bf16(a: torch.Tensor) -> torch.Tensor:
    """The bfloat16 GEMM input: `xq` (exact in bfloat16), x2 or x3, contiguous."""
    return a.to(torch.bfloat16).contiguous()


def _finish(y: torch.Tensor, s_t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """y times the per-token scales (computed in float32, one pass), in `dtype`, in a tensor of the caller's own
    (y is scaled in place only when it already has `dtype`: then it is a fresh buffer, never scratch)."""
    if s_t is None:
        return y.to(dtype)
    if y.dtype == dtype == torch.float32:
        return y.mul_(s_t)
    if y.dtype == dtype:  # through a float32 scratch: the same bits as the mixed-dtype mul_, in a third of its time
        return y.copy_(scratch("finish", tuple(y.shape), torch.float32, y.device).copy_(y).mul_(s_t))
    return torch.mul(y, s_t, out=torch.empty(y.shape, dtype=dtype, device=y.device))


def _c_int8_product(xq, s_t, weight, dtype):
    if s_t is None or xq.dtype is not torch.int8:
        raise ValueError(f"c-int8 needs int8 activation codes and their scales; got {xq.dtype}, s_t={'None' if s_t is None else 'tensor'}")
    y = panels_product(weight)(xq.contiguous(), s_t.contiguous())
    return y if dtype is torch.float32 else y.to(dtype)


def panels_product(weight) -> native.PanelsProduct:
    """The c-int8 product bound to `weight` (built once, rebound when its codes were replaced without a relayout)."""
    product = weight.derived("c-int8", lambda: _panels_product(weight))
    if product.panels is not weight.qdata:
        product = weight._derived["c-int8"] = _panels_product(weight)
    return product


def _panels_product(weight) -> native.PanelsProduct:
    return native.PanelsProduct(weight.qdata, weight.bits, weight.scales_2d(), weight.effective_group, weight.in_features)


def _int8pack_product(a, s_t, weight, dtype):
    scales = weight.derived("scales_bf16", lambda: weight.scales.to(torch.bfloat16))
    return _finish(native.weight_int8pack_mm(_bf16(a), weight.qdata, scales), s_t, dtype)


def int4pack_group(weight: QuantizedWeight) -> int | None:
    """The group size the int4 CPU kernel runs this weight with: the largest of 256, 128, 64, 32
    that divides both `in` and the weight's group (per row: `in`), or None."""
    g = weight.effective_group
    for k in INT4PACK_GROUPS:
        if weight.in_features % k == 0 and g % k == 0:
            return k
    return None


def _int4pack_scales(weight: QuantizedWeight, k: int) -> torch.Tensor:
    """(in / k, out, 2) bfloat16 `[scale, zero]` per kernel group: the weight's scale, zero 0 (codes are `Q + 8`)."""
    starts = torch.arange(0, weight.in_features, k, device=weight.scales.device)
    s = weight.scales_2d()[:, starts // weight.effective_group]  # (out, in / k)
    sz = torch.zeros(s.shape[1], s.shape[0], 2, dtype=torch.bfloat16, device=s.device)
    sz[..., 0] = s.t()
    return sz


def _int4pack_product(a, s_t, weight, dtype):
    k = int4pack_group(weight)
    sz = weight.derived("int4pack_scales", lambda: _int4pack_scales(weight, k))
    return _finish(native.weight_int4pack_mm(_bf16(a), weight.qdata, k, sz), s_t, dtype)


def _always(weight, act, dtype, device, tokens):
    return None


def _int_mm_unavailable(weight, act, dtype, device, tokens):
    if not act.integer:
        return f"int-mm needs integer activations (dynamic-token or static-tensor); got {act.scheme!r}"
    if not native.available("int_mm"):
        return "this torch has no torch._int_mm"
    if device.type == "cuda":  # cuBLASLt's int8 GEMM constraints
        if tokens <= 16:
            return "torch._int_mm on CUDA needs more than 16 tokens"
        if weight.in_features % 8 or weight.out_features % 8:
            return "torch._int_mm on CUDA needs in and out multiples of 8"
    elif device.type != "cpu":
        return f"int-mm runs on CPU and CUDA; the weight is on {device}"
    return None


def _c_int8_unavailable(weight, act, dtype, device, tokens):
    if not act.integer:
        return f"c-int8 needs integer activations (dynamic-token or static-tensor); got {act.scheme!r}"
    if weight.layout != "panels":
        return f"c-int8 needs the 'panels' layout; the weight is stored as {weight.layout!r}"
    return panels_unavailable(weight.out_features, weight.in_features, weight.bits, device, group=weight.effective_group)


def _packed_unavailable(name: str, layout: str):
    def check(weight, act, dtype, device, tokens):
        if act.scheme == "static-channel":
            return f"{name} cannot apply per-channel activation scales"
        if device.type != "cpu":
            return f"{name} is a CPU kernel; the weight is on {device}"
        if weight.layout != layout:
            return f"{name} needs the {layout!r} layout; the weight is stored as {weight.layout!r}"
        if name == "int8pack" and weight.group_size is not None:
            return "int8pack takes one scale per row; this weight has groups"
        if name == "int8pack" and weight.in_features % 16:  # torch 2.13's kernel crashes otherwise
            return f"int8pack needs in % 16 == 0; in={weight.in_features}"
        if name == "int4pack" and int4pack_group(weight) is None:
            return f"int4pack needs a group size in {INT4PACK_GROUPS} dividing in={weight.in_features} and the weight's group {weight.effective_group}"
        return None

    return check


PATHS: dict[str, KernelPath] = {
    p.name: p
    for p in (
        KernelPath("fake-quant", "float32", _always, _fake_quant_product),
        KernelPath("int-mm", "float32", _int_mm_unavailable, _int_mm_product),
        KernelPath("dequant-bf16", "bfloat16", _always, _dequant_bf16_product),
        KernelPath("int8pack", "bfloat16", _packed_unavailable("int8pack", "int8"), _int8pack_product),
        KernelPath("int4pack", "bfloat16", _packed_unavailable("int4pack", "int4pack"), _int4pack_product),
        KernelPath("c-int8", "float32", _c_int8_unavailable, _c_int8_product),
    )
}

# Paths whose products run at speed on a CPU only with one of these instructions (/proc/cpuinfo names, x86 and
# Arm); without them torch emulates the arithmetic. Measured on an AVX2-only AMD EPYC (torch 2.13, 2 threads,
# a 16384x2048 W4A8 g128 product of 256 tokens): int-mm 20 s and dequant-bf16 82 s a call, against 0.42 s for
# int4pack and 0.58 s for fake-quant, so that measuring them once cost the autotuner 3.5 minutes per shape.
NATIVE_CPU_FLAGS: dict[str, frozenset[str]] = {
    "int-mm": kernel_tuning.INT8_DOT_FLAGS,
    "dequant-bf16": frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
}


def emulated_here(name: str, device: torch.device) -> str | None:
    """Why path `name` would run emulated (slowly) on `device`'s CPU, or None: it is native there, needs no
    such instruction, the device is not a CPU, or the CPU's flags cannot be read (then nothing is assumed)."""
    need = NATIVE_CPU_FLAGS.get(name)
    if need is None or device.type != "cpu":
        return None
    flags = kernel_tuning.cpu_info()[1]
    if not flags or flags & need:
        return None
    return f"this CPU has none of {sorted(need)}, so torch emulates {name}'s arithmetic"


# Without autotuning: the first available path of these (measured on a Zen 4 CPU, bench/RESULTS.md; `c-int8`,
# which only a "panels" weight offers, first: the layout is picked where it measured fastest at every token count).
FALLBACK_ORDER = {
    "1": ("c-int8", "int4pack", "int-mm", "int8pack", "dequant-bf16", "fake-quant"),
    "2-16": ("c-int8", "int-mm", "int4pack", "dequant-bf16", "int8pack", "fake-quant"),
    "other": ("c-int8", "int-mm", "dequant-bf16", "int4pack", "int8pack", "fake-quant"),
}


# -- options ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Process-wide kernel settings (`set_kernel_options`, `kernel_options`).

    Attributes:
      path: force this path for every product (None: choose).
      autotune: measure candidates per key (True) or take the first available of
        `FALLBACK_ORDER` without measuring (False).
      precision: "any" (default: bfloat16 paths may serve float32 inputs) or
        "float32" (only paths with float32 or exact integer arithmetic).
      compiled: use `interop.compiled`'s C code where it is built (the same bits, one pass):
        `dequant-bf16`'s weight tiles and `quantize_tokens` on the CPU; False: torch ops only.
      native_only: choose (measure, or take from the fallback order) only among the paths this
        CPU runs natively (`emulated_here`: `int-mm` needs int8 dot-product instructions,
        `dequant-bf16` bfloat16 ones), unless none is; a forced path runs regardless.
        False: every path that can compute the product.
    """

    path: str | None = None
    autotune: bool = True
    precision: str = "any"
    compiled: bool = True
    native_only: bool = True

    def __post_init__(self) -> None:
        if self.path is not None and self.path not in PATHS:
            raise ValueError(f"kernel path must be one of {tuple(PATHS)} or None; got {self.path!r}")
        if not isinstance(self.autotune, bool):
            raise ValueError(f"autotune must be a bool; got {self.autotune!r}")
        if not isinstance(self.compiled, bool):
            raise ValueError(f"compiled must be a bool; got {self.compiled!r}")
        if not isinstance(self.native_only, bool):
            raise ValueError(f"native_only must be a bool; got {self.native_only!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {self.precision!r}")


_OPTIONS = KernelOptions()


def get_kernel_options() -> KernelOptions:
    return _OPTIONS


def set_kernel_options(**changes) -> KernelOptions:
    """Changes the process-wide options (validated); returns the previous ones."""
    global _OPTIONS
    old, _OPTIONS = _OPTIONS, dataclasses.replace(_OPTIONS, **changes)
    return old


@contextlib.contextmanager
def kernel_options(**changes) -> Iterator[KernelOptions]:
    """`with kernel_options(path="int-mm"): ...` applies `changes` inside the block only."""
    old = set_kernel_options(**changes)
    try:
        yield _OPTIONS
    finally:
        set_kernel_options(**dataclasses.asdict(old))


# -- choosing and running -----------------------------------------------------------
def unavailable(name: str, weight: QuantizedWeight, act: ActQuant, dtype: torch.dtype, tokens: int) -> str | None:
    """Why path `name` cannot compute this product (None if it can)."""
    if name not in PATHS:
        return f"unknown kernel path {name!r}; the paths are {tuple(PATHS)}"
    return PATHS[name].unavailable(weight, act, dtype, weight.qdata.device, tokens)


def candidates(weight: QuantizedWeight, act: ActQuant, dtype: torch.dtype, tokens: int, precision: str = "any") -> list[str]:
    """The paths that can compute this product under `precision`, in `PATHS` order."""
    return [
        name
        for name, p in PATHS.items()
        if (precision == "any" or p.precision == "float32") and p.unavailable(weight, act, dtype, weight.qdata.device, tokens) is None
    ]


def choice_key(weight: QuantizedWeight, act: ActQuant, dtype: torch.dtype, bucket: str, precision: str) -> str:
    """The autotuner's key: machine, threads, shape, codes, layout, activations, dtype, token bucket, precision,
    "compiled-dequant" where `dequant-bf16` uses `interop.compiled` (its speed differs), and "all-paths" when
    `native_only` is off (the choice was among more paths)."""
    device = weight.qdata.device
    machine = kernel_tuning.machine_id(device.type, device.index or 0)
    if device.type == "cpu" and _OPTIONS.compiled and compiled.load() is not None:
        precision = f"{precision} | compiled-dequant"
    if not _OPTIONS.native_only:  # a choice among every path, emulated ones included
        precision = f"{precision} | all-paths"
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    group = "row" if weight.group_size is None else f"g{weight.group_size}"
    a = "a16" if act.scheme == "none" else f"{act.scheme}{act.bits}" + (f"g{act.group}" if act.scheme == "dynamic-group" else "")
    return (
        f"{machine} | {threads}t | {weight.out_features}x{weight.in_features} w{weight.bits} {group} {weight.layout} | "
        f"{a} | {str(dtype).replace('torch.', '')} | T{bucket} | {precision}"
    )


def choose_path(weight: QuantizedWeight, act: ActQuant, dtype: torch.dtype, tokens: int, act_scale: torch.Tensor | None = None) -> str:
    """The path a product of `tokens` tokens takes when none is forced: cached, measured, or the fallback order."""
    opts, tuner = _OPTIONS, kernel_tuning.get_tuner()
    bucket, rep = kernel_tuning.token_bucket(tokens)
    # the weight remembers its choices (dropped when it moves or changes layout), so that a call
    # costs one dict lookup; the tuner's generation changes when it forgets or changes its file
    memo = (bucket, dtype, act, opts.precision, opts.autotune, opts.compiled, opts.native_only, torch.get_num_threads(),
            id(tuner), tuner.generation)
    name = weight.choices.get(memo)
    if name is not None:
        return name
    names = candidates(weight, act, dtype, rep, opts.precision)
    names = [n for n in names if PATHS[n].unavailable(weight, act, dtype, weight.qdata.device, tokens) is None]
    if opts.native_only:
        names = [n for n in names if emulated_here(n, weight.qdata.device) is None] or names
    if not opts.autotune:
        order = FALLBACK_ORDER.get(bucket, FALLBACK_ORDER["other"])
        name = next(n for n in order if n in names)
    else:
        key = choice_key(weight, act, dtype, bucket, opts.precision)
        known = tuner.lookup(key)
        if known is not None and known.path in names:
            name = known.path
        else:
            name = tuner.choose(key, _probes(names, weight, act, dtype, rep, act_scale)).path
    weight.choices[memo] = name
    return name


def _probes(names, weight, act, dtype, tokens, act_scale) -> dict[str, Callable[[], object]]:
    """One closure per candidate that runs it on a fixed random input of `tokens` tokens."""
    device = weight.qdata.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, weight.in_features, generator=gen).to(device=device, dtype=dtype)
    if act.scheme == "static-channel" and act_scale is None:
        act_scale = torch.full((weight.in_features,), 0.05, device=device)
    elif act.scheme == "static-tensor" and act_scale is None:
        act_scale = torch.tensor([0.05], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def probe(name):
        run = PATHS[name].run

        def call():
            with torch.inference_mode():
                y = run(x, weight, act, act_scale)
            sync()
            return y

        return call

    return {name: probe(name) for name in names}


def _check_inputs(x2: torch.Tensor, weight: QuantizedWeight, act: ActQuant, act_scale: torch.Tensor | None) -> None:
    who = f"weight {weight.name!r}" if weight.name else "quantized_matmul"
    if not isinstance(x2, torch.Tensor) or not x2.dtype.is_floating_point or x2.dtype == torch.float64:
        raise ValueError(f"{who}: x2 must be a float32, bfloat16 or float16 tensor; got {getattr(x2, 'dtype', type(x2).__name__)}")
    if x2.dim() < 1 or x2.shape[-1] != weight.in_features:
        raise ValueError(f"{who}: x2 must have last dimension {weight.in_features}; got shape {tuple(x2.shape)}")
    if act.scheme == "static-tensor":
        if act_scale is None or act_scale.numel() != 1:
            raise ValueError(f"{who}: static-tensor activations need one scale; got {None if act_scale is None else tuple(act_scale.shape)}")
    elif act.scheme == "static-channel":
        if act_scale is None or tuple(act_scale.shape) != (weight.in_features,):
            raise ValueError(
                f"{who}: static-channel activations need scales of shape ({weight.in_features},); "
                f"got {None if act_scale is None else tuple(act_scale.shape)}"
            )


def _who(weight: QuantizedWeight) -> str:
    return f"weight {weight.name!r}" if weight.name else "quantized_matmul"


def resolve_path(weight: QuantizedWeight, act: ActQuant, dtype: torch.dtype, tokens: int, spec: str = "", act_scale: torch.Tensor | None = None) -> str:
    """The path a product of `tokens` tokens takes: forced (`spec` a path name, else `weight.path`, else the
    global option), else the frozen choice of its bucket (`spec` a table, else `weight.frozen_paths`) where
    the precision option allows it and it can run, else the autotuner's (`choose_path`).

    Whether a path can run depends on the weight, the activations, the dtype and the token bucket only, so the
    verdict is remembered on the weight (`weight.choices`, dropped when it moves or changes layout) and a call
    costs a few dict lookups to route, not the checks."""
    bucket = kernel_tuning.token_bucket(tokens)[0]
    forced, table = _parse_spec(spec)
    forced = forced or weight.path or _OPTIONS.path
    if forced is not None:
        name = forced
    else:
        if table is None:
            table = frozen_table(weight, dtype)
        name = table.get(bucket) if table else None
        if name is None or not _allowed(name):
            return choose_path(weight, act, dtype, tokens, act_scale)  # remembers its own choice, per tuner state
    key = ("why", name, bucket, dtype, act)
    why = weight.choices.get(key)
    if why is None:
        why = weight.choices[key] = unavailable(name, weight, act, dtype, tokens) or ""
    if not why:
        return name
    if forced is not None:
        raise ValueError(f"{_who(weight)}: kernel path {name!r} cannot run here: {why}")
    return choose_path(weight, act, dtype, tokens, act_scale)


def _allowed(name: str) -> bool:
    return name in PATHS and (_OPTIONS.precision == "any" or PATHS[name].precision == "float32")


# -- frozen choices (ahead of torch.compile) ----------------------------------------------
FREEZE_TOKENS = (1, 16, 64, 256, 1024)  # one token count per bucket of kernel_tuning.TOKEN_BUCKETS
BUCKET_LABELS = tuple(label for _, label, _ in kernel_tuning.TOKEN_BUCKETS)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def frozen_table(weight: QuantizedWeight, dtype: torch.dtype) -> dict[str, str] | None:
    """{bucket label: path} frozen for inputs of `dtype` (`freeze_paths`), or None."""
    frozen = getattr(weight, "frozen_paths", None)
    return frozen.get(dtype_name(dtype)) if frozen else None


def check_frozen(frozen: object, who: str) -> dict[str, dict[str, str]]:
    """Validates `{dtype name: {bucket label: path}}` (as saved); returns a copy. Raises ValueError naming the bad entry."""
    if not isinstance(frozen, dict):
        raise ValueError(f"{who}: frozen kernel paths must be an object {{dtype: {{bucket: path}}}}; got {type(frozen).__name__}")
    out = {}
    for dtype, table in frozen.items():
        if dtype not in ("float32", "bfloat16", "float16") or not isinstance(table, dict):
            raise ValueError(f"{who}: frozen kernel paths: bad dtype entry {dtype!r}")
        for bucket, path in table.items():
            if bucket not in BUCKET_LABELS:
                raise ValueError(f"{who}: frozen kernel paths: bucket must be one of {BUCKET_LABELS}; got {bucket!r}")
            if path not in PATHS:
                raise ValueError(f"{who}: frozen kernel paths: path must be one of {tuple(PATHS)}; got {path!r}")
        out[dtype] = dict(table)
    return out


def path_spec(weight: QuantizedWeight, dtype: torch.dtype, path: str | None = None) -> str:
    """The `paths` argument of the custom op (`interop.custom_ops`): a forced path name, the frozen
    table "1=int4pack,2-16=int-mm,...", or "" (the autotuner decides at run time)."""
    name = path or weight.path
    if name is not None:
        return name
    table = frozen_table(weight, dtype)
    return ",".join(f"{b}={p}" for b, p in table.items()) if table else ""


@functools.lru_cache(maxsize=256)
def _parse_spec(spec: str) -> tuple[str | None, dict[str, str] | None]:
    """`path_spec`'s string -> (forced path or None, {bucket: path} or None)."""
    if not spec:
        return None, None
    if "=" not in spec:
        if spec not in PATHS:
            raise ValueError(f"paths must be a kernel path {tuple(PATHS)}, a frozen table or ''; got {spec!r}")
        return spec, None
    table = dict(entry.split("=", 1) for entry in spec.split(","))
    check_frozen({"float32": table}, "quantized_mm")
    return None, table


def freeze_paths(model: torch.nn.Module, tokens: tuple[int, ...] = FREEZE_TOKENS, dtype: torch.dtype | None = None) -> dict[str, dict[str, str]]:
    """Runs the autotuner (or reads its cache; the fallback order under `autotune=False`) for every
    quantized `DuQuantLinear` of `model` at each token count of `tokens`, and freezes the chosen path per
    token bucket on the layer's weight (`weight.frozen_paths[dtype name][bucket]`), ahead of
    `torch.compile`. Frozen choices are saved by `save_quantized` and reloaded by `load_quantized`.

    Args:
      model: a model quantized by `interop.quantize_` (or loaded by `load_quantized`).
      tokens: token counts, ints >= 1; each freezes its bucket (`kernel_tuning.token_bucket`).
      dtype: the input dtype to freeze for; default each layer's own dtype.

    Returns:
      {layer name: {bucket label: path}}.
    """
    from interop import custom_ops
    from interop.linear import DuQuantLinear

    if not isinstance(tokens, (tuple, list)) or not tokens or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tokens):
        raise ValueError(f"tokens must be a non-empty sequence of ints >= 1; got {tokens!r}")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16, float16 or None; got {dtype!r}")
    result = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, DuQuantLinear) or layer.qweight is None:
            continue
        weight, act, dt = layer.qweight, layer.act, dtype or layer.param_dtype
        scale = layer.a_scale if act.scheme in ("static-channel", "static-tensor") else None
        table = {kernel_tuning.token_bucket(t)[0]: choose_path(weight, act, dt, t, scale) for t in tokens}
        frozen = dict(getattr(weight, "frozen_paths", None) or {})
        frozen[dtype_name(dt)] = {b: table[b] for b in BUCKET_LABELS if b in table}
        weight.frozen_paths = frozen
        custom_ops.register(weight)
        result[name] = frozen[dtype_name(dt)]
    if not result:
        raise ValueError("freeze_paths: the model has no quantized DuQuantLinear layer (run interop.quantize_ first)")
    return result


def unfreeze_paths(model: torch.nn.Module) -> None:
    """Forgets every frozen choice of `model`'s layers (the autotuner decides again)."""
    for m in model.modules():
        if isinstance(m, QuantizedWeight):
            m.frozen_paths = None


@torch.compiler.assume_constant_result
def _compiled_built() -> bool:
    return compiled.load() is not None


def compiled_helpers_on() -> bool:
    """Whether the compiled helpers run: the option on (`kernel_options(compiled=...)`) and the library built here.
    Under `torch.compile` the option is guarded and the library's availability a constant of the graph."""
    return _OPTIONS.compiled and _compiled_built()


def quantized_matmul(
    x2: torch.Tensor,
    weight: QuantizedWeight,
    act: ActQuant = ActQuant(),
    act_scale: torch.Tensor | None = None,
    *,
    path: str | None = None,
    prepared: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """`y = x3 @ W_hatᵀ` (module docstring): x2 (..., in) -> y (..., out) in x2's dtype.

    Under `torch.compile` the activation handling is traced and the product is one
    `torch.ops.duquant.quantized_mm` (`interop.custom_ops`), which picks the path at run time
    from what `path_spec` passed it.

    Args:
      x2: rotated activations, float32, bfloat16 or float16, any leading shape.
      weight: the layer's `QuantizedWeight`.
      act: the activation handling.
      act_scale: the calibrated scale: one value for "static-tensor", (in,) for
        "static-channel"; unused otherwise.
      path: force this path for this call (else `weight.path`, else the global
        option, else the frozen choice of the token bucket, else the autotuner's choice).
      prepared: `prepare(x2 (T, in), act, act_scale)` already computed (layers that read one
        input share it, `interop.shared_input`).
    """
    _check_inputs(x2, weight, act, act_scale)
    lead = x2.shape[:-1]
    x = x2.reshape(-1, weight.in_features)
    if torch.compiler.is_compiling():
        return _traced_product(x, weight, act, act_scale, path, prepared).reshape(*lead, weight.out_features)
    tokens = x.shape[0]
    if tokens == 0:
        return x2.new_zeros(*lead, weight.out_features)
    if path is not None and path not in PATHS:
        raise ValueError(f"{_who(weight)}: kernel path {path!r} cannot run here: {unavailable(path, weight, act, x.dtype, tokens)}")
    name = resolve_path(weight, act, x.dtype, tokens, path or "", act_scale)
    weight.last_path = name
    with torch.no_grad():
        y = PATHS[name].run(x, weight, act, act_scale) if prepared is None else PATHS[name].product(*prepared, weight, x.dtype)
    return y.reshape(*lead, weight.out_features)


def _traced_product(x: torch.Tensor, weight: QuantizedWeight, act: ActQuant, act_scale: torch.Tensor | None, path: str | None,
                    prepared: tuple | None = None) -> torch.Tensor:
    """x (T, in) -> (T, out) as traced ops (`prepare`, unless `prepared`) and one `duquant::quantized_mm`."""
    from interop.custom_ops import quantized_mm

    a, s_t = prepare(x, act, act_scale) if prepared is None else prepared
    return quantized_mm(
        a, s_t, weight.qdata, weight.scales, weight.in_features, weight.out_features, weight.bits,
        weight.group_size or 0, weight.layout, path_spec(weight, x.dtype, path), act.scheme, act.bits,
        act.traced_clip, x.dtype,
    )
