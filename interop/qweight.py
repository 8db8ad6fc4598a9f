"""`QuantizedWeight`: a linear layer's integer weight codes and scales, held in one integer form.

`W_hat[i, j] = Q[i, j] * scales[i, group(j)]`, with codes `Q (out, in)` in
`[-2^(b-1), 2^(b-1) - 1]` for `bits` b in 2..8 and scales `(out,)` (per row) or
`(out, ceil(in / G))` (per row and group of G consecutive input channels; the
last group may be short). No float copy of the weight is kept: the kernels
(`interop.kernels`) unpack or dequantize tiles per call.

Layouts of the codes in memory (`QuantizedWeight.layout`):

- `"nibbles"`: `(out, ceil(in/2))` uint8, the pack files' layout (SPEC "Pack
  fields"): column 2j in the low nibble, 2j+1 in the high nibble, two's
  complement, a zero nibble padding an odd `in`. bits 2..4.
- `"int8"`: `(out, in)` int8. Any bits; the default for 5..8.
- `"int4pack"`: `(out, in/2)` uint8 in the layout of torch's CPU int4 kernel
  (`torch.ops.aten._convert_weight_to_int4pack_for_cpu`): offset nibbles
  `Q + 8`, rows interleaved in blocks of 64 (AVX-512 builds) or 32 (AVX2).
  bits 2..4, CPU only, `out % 16 == 0`, `in % 32 == 0`; used only after the
  layout this module computes has been checked against torch's own converter
  once per process (`int4pack_variant`). Converting to and from the canonical
  form is a few element-wise passes (about a millisecond per 16 MiB).
- `"panels"`: the layout of `interop.compiled`'s integer product (`c-int8`):
  panels of 16 rows; per panel, per step of 4 input columns, for 2..4 bits
  (`(out, in/2)` uint8) 32 bytes, byte `4r + c` holding `Q + 8` of row `r` (low
  nibble) and of row `r + 8` (high nibble) at column `4s + c`; for 5..8 bits
  (`(out, in)` uint8) 64 bytes, byte `4r + c` of the first 32 holding `Q + 128`
  of row `r`, of the next 32 of row `r + 8`. CPU only, `out % 16 == 0`,
  `in % 4 == 0`.

`layout="auto"` picks `"panels"` where the weight's products take integer
activations (`integer_acts=True`, as `DuQuantLinear` says for "dynamic-token"
and "static-tensor"), the compiled AVX2 product is built here, and the CPU has
no int8 dot-product instruction (no VNNI, AMX or Arm dotprod: there
`torch._int_mm` is emulated, and the panel product measured faster than every
torch path at every token count, bench/RESULTS.md "Kernel speed, avx2");
otherwise, for bits <= 4, `"int4pack"` on a CPU where it is available, else
`"nibbles"`, and `"int8"` for 5..8. `.to(device)` re-picks it for the new
device. Whatever the layout, `state_dict()` holds the canonical form:
`codes` (the nibbles for bits <= 4, int8 codes for 5..8) and `scales` (float32),
and `load_state_dict()` takes it back. Scales stay float32 under `.to(dtype)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Iterator

import torch
from torch import nn

from interop import kernel_tuning, native
from interop.panels import PANEL_ROWS, from_panels, panel_code_tiles, panel_rows, to_panels

LAYOUTS = ("nibbles", "int8", "int4pack", "panels")
INT4PACK_GROUPS = native.INT4PACK_GROUPS  # group sizes torch's CPU int4 kernel takes


# -- canonical nibbles --------------------------------------------------------
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes: (out, in) int8 in [-8, 7] -> (out, ceil(in/2)) uint8, SPEC's nibble order."""
    nib = codes.to(torch.uint8) & 0xF
    if codes.shape[1] % 2:
        nib = nn.functional.pad(nib, (0, 1))
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def nibble_halves(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """packed: (rows, h) uint8 nibbles -> the sign-extended (low, high) nibbles, each (rows, h) int8.

    `low` holds the even columns 0, 2, ..., `high` the odd columns 1, 3, ...
    """
    low = (packed << 4).view(torch.int8) >> 4
    high = packed.view(torch.int8) >> 4
    return low, high


def unpack_nibbles(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """packed: (out, ceil(in/2)) uint8 -> (out, in) int8 codes; inverse of `pack_nibbles`."""
    low, high = nibble_halves(packed)
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


# -- torch's CPU int4 layout --------------------------------------------------
# A variant is (kind, block): rows go in blocks of `block`; "lanes" puts row b of a block in
# the low nibble of byte b and row b + block/2 in the high nibble, one row of bytes per input
# column (torch's AVX-512 and AVX2 kernels); "pairs" puts rows 2j, 2j+1 in byte j (its
# generic kernel, and every short last block). Bytes run block by block, then column by column.
_VARIANTS = (("lanes", 64), ("lanes", 32), ("pairs", 32), ("pairs", 64))


def _to_int4pack(codes: torch.Tensor, variant: tuple[str, int]) -> torch.Tensor:
    """codes: (out, in) int8 in [-8, 7] -> (out, in/2) uint8 in `variant`'s layout."""
    kind, block = variant
    out, n = codes.shape
    u = (codes + 8).to(torch.uint8)
    full = out // block * block
    parts = []
    if full:
        blocks = u[:full].view(full // block, block, n)
        if kind == "lanes":
            half = block // 2
            byte = blocks[:, :half] | (blocks[:, half:] << 4)  # (nb, block/2, in)
        else:
            byte = blocks[:, 0::2] | (blocks[:, 1::2] << 4)
        parts.append(byte.transpose(1, 2).reshape(-1))
    if full < out:
        tail = u[full:]
        parts.append((tail[0::2] | (tail[1::2] << 4)).t().reshape(-1))
    return torch.cat(parts).view(out, n // 2)


def _int4pack_offset_tiles(packed: torch.Tensor, variant: tuple[str, int], r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 (block-aligned, r1 - r0 a whole number of blocks or the tail) of an int4pack
    weight -> (in, r1 - r0) uint8 holding `Q + 8`, input columns in natural order."""
    kind, block = variant
    rows, n = r1 - r0, packed.shape[1] * 2
    flat = packed[r0:r1].reshape(-1)
    full = rows // block * block
    cols = []
    if full:
        byte = flat[: full * n // 2].view(full // block, n, block // 2)
        lo, hi = byte & 0xF, byte >> 4
        if kind == "lanes":
            blk = torch.cat((lo, hi), dim=2)  # (nb, in, block)
        else:
            blk = torch.stack((lo, hi), dim=3).view(full // block, n, block)
        cols.append(blk.permute(1, 0, 2).reshape(n, full))
    if full < rows:
        byte = flat[full * n // 2 :].view(n, (rows - full) // 2)
        cols.append(torch.stack((byte & 0xF, byte >> 4), dim=2).view(n, rows - full))
    return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)


def _int4pack_rows(packed: torch.Tensor, variant: tuple[str, int], ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids (T,)` of an int4pack weight `packed (out, in/2)` -> (T, in) int8 codes, gathered byte by byte
    (no block is unpacked whole): the inverse of `_to_int4pack` at those rows."""
    kind, block = variant
    out, n = packed.shape[0], packed.shape[1] * 2
    full, half = out // block * block, block // 2
    flat = packed.reshape(-1)
    ids = ids.long()
    cols = torch.arange(n, device=packed.device)[None, :]
    k = ids % block
    m, high = (k % half, k >= half) if kind == "lanes" else (k // 2, k % 2 == 1)
    at = (ids // block)[:, None] * (n * half) + cols * half + m[:, None]  # rows of whole blocks
    t = (ids - full).clamp(min=0)  # rows of the short last block: pairs, one row of bytes per column
    at_tail = full * n // 2 + cols * max((out - full) // 2, 1) + (t // 2)[:, None]
    in_full = (ids < full)[:, None]
    byte = flat[torch.where(in_full, at, at_tail)]
    high = torch.where(in_full, high[:, None], (t % 2 == 1)[:, None])
    return (torch.where(high, byte >> 4, byte & 0xF).to(torch.int8) - 8).contiguous()


def _from_int4pack(packed: torch.Tensor, variant: tuple[str, int]) -> torch.Tensor:
    """Inverse of `_to_int4pack`: (out, in/2) uint8 -> (out, in) int8 codes."""
    u = _int4pack_offset_tiles(packed, variant, 0, packed.shape[0])
    return (u.t().to(torch.int8) - 8).contiguous()


@functools.lru_cache(maxsize=None)
def int4pack_variant() -> tuple[str, int] | None:
    """The CPU int4 layout of this torch build, checked against its converter and kernel, or None.

    Converts a probe of 176 x 64 codes (full blocks and a short one) with
    `_convert_weight_to_int4pack_for_cpu`, finds the variant of `_to_int4pack`
    that gives the same bytes, and checks that `_weight_int4pack_mm_for_cpu`
    multiplies it right. None when the ops are missing or nothing matches, so
    that the layout is never used on trust.
    """
    if not native.available("int4pack"):
        return None
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (176, 64), generator=gen, dtype=torch.int8)
    try:
        want = native.convert_weight_to_int4pack((codes + 8).to(torch.int32), 2)
    except (RuntimeError, native.NativeKernelError):
        return None
    for variant in _VARIANTS:
        got = _to_int4pack(codes, variant)
        if got.shape == want.shape and torch.equal(got, want):
            x = torch.eye(64, dtype=torch.bfloat16)  # picks out every code: exact in bfloat16
            sz = torch.zeros(2, 176, 2, dtype=torch.bfloat16)
            sz[..., 0] = 1
            y = native.weight_int4pack_mm(x, native.aligned(got), 32, sz)
            if torch.equal(y.float(), codes.float().T):
                return variant
            return None
    return None


def int4pack_unavailable(out_features: int, in_features: int, bits: int, device: torch.device) -> str | None:
    """Why the int4pack layout cannot hold this weight (None if it can)."""
    if bits > 4:
        return f"int4pack holds 2..4-bit codes; these are {bits}-bit"
    if device.type != "cpu":
        return f"int4pack is the CPU kernel's layout; the weight is on {device}"
    if out_features % 16 or in_features % 32:
        return f"int4pack needs out % 16 == 0 and in % 32 == 0; the weight is {out_features} x {in_features}"
    if int4pack_variant() is None:
        return "this torch build's int4 CPU layout could not be verified"
    return None


# -- the compiled integer product's layout ("panels"; the codec is interop.panels) ----------
def panels_unavailable(out_features: int, in_features: int, bits: int, device: torch.device, product: bool = True,
                       group: int | None = None) -> str | None:
    """Why the panels layout cannot hold this weight, or (`product`) the compiled product cannot run it here, with
    `group` input columns per scale (None: not asked); None if it can."""
    if device.type != "cpu":
        return f"panels are the compiled CPU product's layout; the weight is on {device}"
    if out_features % PANEL_ROWS or in_features % 4:
        return f"panels need out % {PANEL_ROWS} == 0 and in % 4 == 0; the weight is {out_features} x {in_features}"
    if not product:
        return None
    if group is not None and group % 4:
        return f"the panel product needs scale groups of a multiple of 4 columns; the weight's are {group}"
    if group is not None and bits > 4 and group > native.PANELS_MAX_GROUP_8:
        return f"the panel product sums 8-bit codes in int32 over groups of at most {native.PANELS_MAX_GROUP_8} columns; the weight's are {group}"
    from interop import compiled

    lib = compiled.load()
    if lib is None:
        return f"the compiled helpers are unavailable: {compiled.unavailable()}"
    if not lib.duq_panels_simd():
        return "the compiled helpers were built without AVX2 and FMA, which the panel product needs"
    return None


def _auto_panels(out_features: int, in_features: int, bits: int, group: int, device: torch.device) -> bool:
    """Whether `layout="auto"` takes panels for a weight (`group` columns per scale) whose products take integer
    activations: where the compiled product can run it and this CPU lacks an int8 dot-product instruction
    (module docstring)."""
    return panels_unavailable(out_features, in_features, bits, device, group=group) is None and not kernel_tuning.int8_dot_native()


# -- tiles ----------------------------------------------------------------------
class _Scratch(threading.local):
    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}


_SCRATCH = _Scratch()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable per-thread temporary of `shape` (contents undefined), valid until the next
    request of the same `name`.

    Kernels unpack every tile into the same memory, call after call: a fresh
    multi-MiB buffer costs its page faults on every call (measured: a 16384 x 2048
    tile-by-tile dequantization took 29 ms in fresh buffers against 5.5 ms in reused ones).
    The pool holds about one tile of each kind per thread (a few tens of MiB at
    most, shared by every layer); `release_scratch` empties it.
    """
    n = math.prod(shape)
    key = (name, dtype, device)
    buf = _SCRATCH.buffers.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            buf = _SCRATCH.buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def release_scratch() -> None:
    """Frees this thread's kernel temporaries (they are re-made on the next product)."""
    _SCRATCH.buffers.clear()


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
_EIGHTS = 0x0808080808080808


@dataclasses.dataclass(frozen=True)
class CodeTile:
    """Some rows of the codes as the right operand of `x @ b`.

    Attributes:
      b: (in', n) int8 holding `Q + offset` for the n rows (from `float_tile(compiled=True)`: the float tile).
      offset: 0 or 8 (`x @ b = x @ Qᵀ + offset * sum(x)`).
      lanes: 0 when b's columns are the rows in order; h > 0 when the rows come in blocks of 2h
        and b's columns are rows 0..h-1 of every block, then rows h..2h-1 of every block
        (`to_tile_order`, `natural_view` convert).
      split: b's input rows are the even input columns, then the odd ones (in' = 2 ceil(in/2)).
    """

    b: torch.Tensor
    offset: int
    lanes: int
    split: bool


def to_tile_order(t: torch.Tensor, lanes: int) -> torch.Tensor:
    """t: (n, ...) indexed by row -> the same in a tile's column order."""
    if not lanes:
        return t
    n = t.shape[0]
    return t.reshape(n // (2 * lanes), 2, lanes, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def natural_view(t: torch.Tensor, lanes: int) -> torch.Tensor:
    """t: (T, n) in a tile's column order -> a view in row order, (T, n) or (T, n/2h, 2, h)."""
    if not lanes:
        return t
    rows, n = t.shape
    return t.view(rows, 2, n // (2 * lanes), lanes).permute(0, 2, 1, 3)


def rows_view(y: torch.Tensor, lanes: int) -> torch.Tensor:
    """y: (T, n) in row order -> the view `natural_view` of a tile matches: (T, n) or (T, n/2h, 2, h)."""
    if not lanes:
        return y
    rows, n = y.shape
    return y.view(rows, n // (2 * lanes), 2, lanes)


def _compiled_ready() -> bool:
    """Whether `interop.compiled`'s dequantizer is built, checked and enabled here."""
    from interop import compiled

    return compiled.load() is not None


@torch._dynamo.assume_constant_result
def _traced_int4pack_variant() -> tuple[str, int] | None:
    """`int4pack_variant()`; under torch.compile a constant of the graph (the probe is not traced)."""
    return int4pack_variant()


# -- the weight object --------------------------------------------------------
class QuantizedWeight(nn.Module):
    """Integer weight codes `Q (out, in)` and float32 scales, in one stored layout.

    Args:
      codes: (out, in) integer codes in [-2^(bits-1), 2^(bits-1) - 1].
      scales: (out,) per-row scales, or (out, ceil(in / group_size)) per group.
      bits: code width, 2..8.
      group_size: input channels per scale group; None (default) with per-row scales.
      layout: "auto" (default), "nibbles", "int8", "int4pack" or "panels" (module docstring).
      name: the layer's name, for error messages.
      integer_acts: the products take integer activation codes (per-token or per-tensor scales), so that
        `layout="auto"` may pick "panels" (module docstring).

    Attributes:
      path: None, or the kernel path every product with this weight must take
        (`interop.kernels.PATHS`).
      last_path: the path the last product took (None before the first).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        *,
        bits: int,
        group_size: int | None = None,
        layout: str = "auto",
        name: str = "",
        integer_acts: bool = False,
    ):
        super().__init__()
        self.name = name
        self.integer_acts = bool(integer_acts)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"{self._who()}: bits must be an int in 2..8; got {bits!r}")
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"{self._who()}: codes must be a 2-D integer tensor (out, in); got {_describe(codes)}")
        self.bits = bits
        self.out_features, self.in_features = (int(s) for s in codes.shape)
        self.group_size = self._check_group(group_size)
        self._check_range(codes)
        self.register_buffer("scales", self._check_scales(scales, codes.device))
        self.register_buffer("qdata", None, persistent=False)
        self._layout_request = layout
        self.layout = self._resolve_layout(layout, codes.device)
        self.qdata = self._encode(codes.to(torch.int8), self.layout)
        self._derived: dict[str, object] = {}  # derived()
        self.choices: dict[tuple, str] = {}  # kernel choices per call signature (interop.kernels)
        self.path: str | None = None
        self.last_path: str | None = None

    @classmethod
    def from_nibbles(
        cls,
        packed: torch.Tensor,
        in_features: int,
        scales: torch.Tensor,
        *,
        bits: int = 4,
        group_size: int | None = None,
        layout: str = "auto",
        name: str = "",
        integer_acts: bool = False,
    ) -> QuantizedWeight:
        """From SPEC's packed nibbles `packed: (out, ceil(in/2)) uint8` (a pack file's `w_codes_int4`)."""
        if not isinstance(packed, torch.Tensor) or packed.dim() != 2 or packed.dtype != torch.uint8:
            raise ValueError(f"{name or 'QuantizedWeight'}: packed codes must be a 2-D uint8 tensor; got {_describe(packed)}")
        if packed.shape[1] != (in_features + 1) // 2:
            raise ValueError(
                f"{name or 'QuantizedWeight'}: packed codes for in_features={in_features} must have "
                f"{(in_features + 1) // 2} columns; got shape {tuple(packed.shape)}"
            )
        return cls(unpack_nibbles(packed, in_features), scales, bits=bits, group_size=group_size, layout=layout, name=name,
                   integer_acts=integer_acts)

    # -- validation ----------------------------------------------------------
    def _who(self) -> str:
        return f"weight {self.name!r}" if self.name else "QuantizedWeight"

    def _check_group(self, group_size: int | None) -> int | None:
        if group_size is None:
            return None
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{self._who()}: group_size must be an int >= 1 or None; got {group_size!r}")
        return group_size

    def _check_range(self, codes: torch.Tensor) -> None:
        lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise ValueError(
                f"{self._who()}: {self.bits}-bit codes must lie in [{lo}, {hi}]; "
                f"got range [{int(codes.min())}, {int(codes.max())}]"
            )

    def _check_scales(self, scales: torch.Tensor, device: torch.device) -> torch.Tensor:
        if not isinstance(scales, torch.Tensor) or not scales.dtype.is_floating_point:
            raise ValueError(f"{self._who()}: scales must be a float tensor; got {_describe(scales)}")
        want = (self.out_features,) if self.group_size is None else (self.out_features, self.n_groups)
        if tuple(scales.shape) != want:
            raise ValueError(
                f"{self._who()}: scales must have shape {want} "
                f"({'per row' if self.group_size is None else f'groups of {self.group_size}'}); got {tuple(scales.shape)}"
            )
        if not torch.isfinite(scales).all():
            raise ValueError(f"{self._who()}: scales hold NaN or Inf")
        return native.aligned(scales.detach().to(device=device, dtype=torch.float32))

    # -- shape facts ---------------------------------------------------------
    @property
    def n_groups(self) -> int:
        """Scale groups per row (1 with per-row scales)."""
        return 1 if self.group_size is None else math.ceil(self.in_features / self.group_size)

    @property
    def effective_group(self) -> int:
        """Input channels per scale: `group_size`, or `in_features` with per-row scales."""
        return self.in_features if self.group_size is None else self.group_size

    def scales_2d(self) -> torch.Tensor:
        """(out, n_groups) float32 scales (a view)."""
        return self.scales.view(self.out_features, self.n_groups)

    @property
    def canonical_layout(self) -> str:
        return "nibbles" if self.bits <= 4 else "int8"

    def nbytes(self, derived: bool = True) -> int:
        """Bytes held: codes and scales, plus the small per-kernel caches built so far (`derived`)."""
        n = self.qdata.numel() * self.qdata.element_size() + self.scales.numel() * 4
        if derived:
            n += sum(t.numel() * t.element_size() for t in self._derived.values() if isinstance(t, torch.Tensor))
        return n

    def extra_repr(self) -> str:
        g = "per row" if self.group_size is None else f"groups of {self.group_size}"
        return f"out={self.out_features}, in={self.in_features}, bits={self.bits}, scales {g}, layout={self.layout!r}"

    # -- layouts ---------------------------------------------------------------
    def _resolve_layout(self, layout: str, device: torch.device) -> str:
        if layout not in LAYOUTS + ("auto",):
            raise ValueError(f"{self._who()}: layout must be one of {LAYOUTS + ('auto',)}; got {layout!r}")
        if layout == "auto":
            if self.integer_acts and _auto_panels(self.out_features, self.in_features, self.bits, self.effective_group, device):
                return "panels"
            if self.bits > 4:
                return "int8"
            why = int4pack_unavailable(self.out_features, self.in_features, self.bits, device)
            return "nibbles" if why else "int4pack"
        if layout == "nibbles" and self.bits > 4:
            raise ValueError(f"{self._who()}: layout 'nibbles' holds 2..4-bit codes; bits={self.bits}")
        if layout == "int4pack":
            why = int4pack_unavailable(self.out_features, self.in_features, self.bits, device)
            if why:
                raise ValueError(f"{self._who()}: layout 'int4pack' is unavailable: {why}")
        if layout == "panels":
            why = panels_unavailable(self.out_features, self.in_features, self.bits, device, product=False)
            if why:
                raise ValueError(f"{self._who()}: layout 'panels' is unavailable: {why}")
        return layout

    def _encode(self, codes: torch.Tensor, layout: str) -> torch.Tensor:
        """codes (out, in) int8 -> the stored form of `layout`, in aligned contiguous storage (`interop.native`)."""
        if layout == "nibbles":
            return native.aligned(pack_nibbles(codes))
        if layout == "int4pack":
            return native.aligned(_to_int4pack(codes, int4pack_variant()))
        if layout == "panels":
            return native.aligned(to_panels(codes, self.bits))
        return native.aligned(codes)

    def codes(self) -> torch.Tensor:
        """(out, in) int8 codes, unpacked whole (a full-size temporary: for tests and export)."""
        if self.layout == "nibbles":
            return unpack_nibbles(self.qdata, self.in_features)
        if self.layout == "int4pack":
            return _from_int4pack(self.qdata, int4pack_variant())
        if self.layout == "panels":
            return from_panels(self.qdata, self.bits)
        return self.qdata

    def canonical_codes(self) -> torch.Tensor:
        """The codes as `state_dict` holds them: nibbles (bits <= 4) or int8 (bits 5..8)."""
        if self.layout == self.canonical_layout:
            return self.qdata
        codes = self.codes()
        return pack_nibbles(codes) if self.canonical_layout == "nibbles" else codes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) `W_hat = Q * scale` in float32, cast to `dtype` (a full-size temporary)."""
        return (self.codes().float() * self.code_scales(0, self.out_features)).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `ids (T,)` of `W_hat` in float32, cast to `dtype`: (T, in), equal to `dequantize(dtype)[ids]`
        without a full-size temporary (an embedding tied to this weight gathers its rows this way)."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{self._who()}: ids must be a 1-D integer tensor; got {_describe(ids)}")
        if torch.compiler.is_compiling():  # the values are not known while tracing: the same check, run in the graph
            torch._assert_async(((ids >= 0) & (ids < self.out_features)).all(), f"{self._who()}: row ids must be in 0..{self.out_features - 1}")
        elif ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.out_features):
            raise IndexError(f"{self._who()}: row ids must be in 0..{self.out_features - 1}; got {int(ids.min())}..{int(ids.max())}")
        ids = ids.to(self.qdata.device)
        if self.layout == "nibbles":
            codes = unpack_nibbles(self.qdata[ids], self.in_features)
        elif self.layout == "int4pack":
            codes = _int4pack_rows(self.qdata, _traced_int4pack_variant(), ids)
        elif self.layout == "panels":
            codes = panel_rows(self.qdata, self.bits, ids)
        else:
            codes = self.qdata[ids]
        s = self.scales_2d()[ids]
        if self.group_size is not None:
            s = s.repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
        return (codes.float() * s).to(dtype)

    def code_scales(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of each code's scale: (r1 - r0, 1) per row, or (r1 - r0, in) per group."""
        s = self.scales_2d()[r0:r1]
        if self.group_size is None:
            return s
        return s.repeat_interleave(self.group_size, dim=1)[:, : self.in_features]

    def relayout(self, layout: str = "auto") -> QuantizedWeight:
        """Converts the stored codes to `layout` in place (see the module docstring); returns self."""
        new = self._resolve_layout(layout, self.qdata.device)
        if new != self.layout:
            codes = self.codes()
            self.qdata = self._encode(codes, new)
            self.layout = new
            self._derived.clear()
            self.choices.clear()
        self._layout_request = layout
        return self

    # -- tiles for the kernels -------------------------------------------------
    def row_tiles(self, rows: int) -> Iterator[tuple[int, int]]:
        """(r0, r1) row ranges of about `rows` rows; with int4pack, whole row blocks, then the short block alone;
        with panels, whole panels."""
        align = int4pack_variant()[1] if self.layout == "int4pack" else PANEL_ROWS if self.layout == "panels" else 1
        step = max(align, rows // align * align)
        full = self.out_features // align * align
        for r0 in range(0, full, step):
            yield r0, min(r0 + step, full)
        if full < self.out_features:
            yield full, self.out_features

    def code_tile(self, r0: int, r1: int, *, split: bool = False) -> CodeTile:
        """Rows r0:r1 of the codes as a matmul operand (`CodeTile`), unpacked with word-wide bit operations
        where the layout allows (a tile-sized temporary; a view for the int8 layout).

        `split` lets the nibble layout give the even input columns, then the odd ones
        (`split_columns` puts the activations in that order): no interleaving pass.
        """
        n = r1 - r0
        if self.layout == "int8":
            return CodeTile(self.qdata[r0:r1].t(), 0, 0, False)
        if self.layout == "nibbles":
            packed = self.qdata[r0:r1]
            h = packed.shape[1]
            if split and h % 8 == 0:  # both halves as 64-bit words: Q + 8 = (nibble ^ 8) in every byte
                out = scratch("codes", (n, 2 * h), torch.int8, packed.device)
                words, o = packed.view(torch.int64), out.view(torch.int64)
                torch.bitwise_and(words, _LOW_NIBBLES, out=o[:, : h // 8])
                torch.bitwise_right_shift(words, 4, out=o[:, h // 8 :])
                o[:, h // 8 :].bitwise_and_(_LOW_NIBBLES)
                o.bitwise_xor_(_EIGHTS)
                return CodeTile(out.t(), 8, 0, True)
            low, high = nibble_halves(packed)
            if split:
                return CodeTile(torch.cat((low, high), dim=1).t(), 0, 0, True)
            return CodeTile(torch.stack((low, high), dim=-1).view(n, -1)[:, : self.in_features].t(), 0, 0, False)
        if self.layout == "panels":
            return CodeTile(panel_code_tiles(self.qdata, self.bits, r0, r1).view(torch.int8), 0 if self.bits > 4 else 8, 0, False)
        kind, block = int4pack_variant()
        if kind != "lanes" or n % block:  # the short last block (or the generic layout): byte by byte
            return CodeTile(_int4pack_offset_tiles(self.qdata, (kind, block), r0, r1).view(torch.int8), 8, 0, False)
        # (n/block, in, block/2) bytes -> (in, [low nibbles of every block | high nibbles of every block])
        nb, w = n // block, block // 16  # 64-bit words per block and input column
        words = self.qdata[r0:r1].reshape(-1).view(torch.int64).view(nb, self.in_features, w)
        words = scratch("words", (self.in_features, nb, w), torch.int64, words.device).copy_(words.permute(1, 0, 2))
        out = scratch("codes", (self.in_features, 2, nb, w), torch.int64, words.device)
        torch.bitwise_and(words, _LOW_NIBBLES, out=out[:, 0])
        torch.bitwise_right_shift(words, 4, out=out[:, 1])
        out[:, 1].bitwise_and_(_LOW_NIBBLES)
        return CodeTile(out.view(torch.int8).view(self.in_features, n), 8, block // 2, False)

    def float_tile(self, r0: int, r1: int, dtype: torch.dtype, *, split: bool = False, compiled: bool = False) -> tuple[torch.Tensor, CodeTile]:
        """Rows r0:r1 of the weight as `(in', n)` in `dtype`, and the `CodeTile` that says its orders.

        With groups the tile is `W_hat` (each code times its group's scale), columns in
        natural order. With per-row scales it is `Q` alone (exact in any float dtype):
        the caller scales the product's columns by `scales[r0:r1]`, which costs a pass
        over (T, n) instead of (in, n); `split` is honoured then.

        `compiled` (bfloat16 on the CPU only): one pass of `interop.compiled`'s C code
        where it is available, the same bits in natural order (the returned tile's
        `lanes` and `split` say so); else the torch ops below.
        """
        if compiled and dtype == torch.bfloat16 and self.layout != "panels" and self.qdata.device.type == "cpu" and _compiled_ready():
            return self._compiled_float_tile(r0, r1)
        tile = self.code_tile(r0, r1, split=split and self.group_size is None)
        b = tile.b  # (in', n), row- or column-major; w gets the same order, so every pass is contiguous
        w = scratch("float", b.shape[::-1], dtype, b.device).t() if b.stride(0) == 1 else scratch("float", b.shape, dtype, b.device)
        if tile.offset:
            torch.sub(tile.b, tile.offset, out=w)
        else:
            w.copy_(tile.b)
        if self.group_size is None:
            return w, tile
        s = to_tile_order(self.scales_2d()[r0:r1], tile.lanes).to(dtype)  # (n, groups)
        g = self.group_size
        full = self.in_features // g * g
        # broadcast the scales along w's contiguous dimension, so that the multiply runs vectorized
        if w.stride(0) == 1:  # (in, n) column-major: rows of wᵀ hold one output row each
            wt = w.t()
            if full:
                wt[:, :full].unflatten(1, (full // g, g)).mul_(s[:, : full // g, None])
            if full < self.in_features:
                wt[:, full:].mul_(s[:, full // g :])
        else:  # (in, n) row-major: one input column per row of w
            st = s.t().contiguous()  # (groups, n)
            if full:
                w[:full].unflatten(0, (full // g, g)).mul_(st[: full // g, None, :])
            if full < self.in_features:
                w[full:].mul_(st[full // g])
        return w, tile

    def _compiled_float_tile(self, r0: int, r1: int) -> tuple[torch.Tensor, CodeTile]:
        """`float_tile` in bfloat16 by `interop.compiled`: (in, n), natural row order."""
        n, n_in = r1 - r0, self.in_features
        group = self.group_size or n_in  # per row: codes times 1, the caller scales the product
        if self.group_size is None:
            scales = self.derived("unit_scales", lambda: torch.ones(self.out_features, 1, device=self.qdata.device))
        else:
            scales = self.derived("bf16_scales", lambda: self.scales_2d().to(torch.bfloat16).float().contiguous())
        if self.layout == "int4pack":
            w = scratch("float", (n_in, n), torch.bfloat16, self.qdata.device)
            st = scales.view(1, -1) if self.group_size is None else self.derived("bf16_scales_t", lambda: scales.t().contiguous())
            native.dequant_int4pack(self.qdata, n_in, r0, r1, int4pack_variant(), st, group, w)
        else:
            w = scratch("float", (n, n_in), torch.bfloat16, self.qdata.device)
            native.dequant_rows(self.qdata[r0:r1], self.layout, n_in, scales[r0:r1], group, w)
            w = w.t()
        return w, CodeTile(w, 0, 0, False)

    def derived(self, key: str, build):
        """A small per-kernel tensor (e.g. bf16 scales) or a kernel bound to this weight's tensors
        (`native.PanelsProduct`), built once and dropped on `.to()`, a relayout or a load."""
        t = self._derived.get(key)
        if t is None:
            t = self._derived[key] = build()
        return t

    # -- torch.nn.Module plumbing ------------------------------------------------
    def __getstate__(self):  # pickle, copy.deepcopy: the derived caches are rebuilt on first use, not carried
        state = super().__getstate__()
        return {**state, "_derived": {}}

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half() ...
        scales = self.scales
        out = super()._apply(fn, recurse)
        device = self.qdata.device
        # a dtype cast of the module must not round the scales: keep the float32 values
        self.scales = scales.to(device=device, dtype=torch.float32)
        self._derived.clear()
        self.choices.clear()
        if self.layout in ("int4pack", "panels") and device.type != "cpu":  # CPU-only layouts
            codes = self.codes()
            self.layout = "nibbles"
            self.qdata = pack_nibbles(codes)
        if self._layout_request == "auto":
            self.relayout("auto")
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "codes"] = self.canonical_codes() if keep_vars else self.canonical_codes().detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key = prefix + "codes"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        codes = state_dict[key]
        if self.canonical_layout == "nibbles":
            want, dtype = (self.out_features, (self.in_features + 1) // 2), torch.uint8
        else:
            want, dtype = (self.out_features, self.in_features), torch.int8
        if not isinstance(codes, torch.Tensor) or tuple(codes.shape) != want or codes.dtype != dtype:
            error_msgs.append(
                f"{key}: {self.bits}-bit codes of a {self.out_features} x {self.in_features} weight must be "
                f"{dtype} of shape {want}; got {_describe(codes)}"
            )
            return
        codes = codes.to(self.qdata.device)
        full = unpack_nibbles(codes, self.in_features) if dtype == torch.uint8 else codes
        try:  # nibbles hold [-8, 7]: 2- and 3-bit codes can be out of range too
            self._check_range(full)
        except ValueError as e:
            error_msgs.append(f"{key}: {e}")
            return
        self.qdata = self._encode(full, self.layout)
        self._derived.clear()


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
