"""The one door to torch's native quantized kernels: every call checks the kernel's preconditions first.

A native kernel can end the process (SIGSEGV) on operands it does not expect,
instead of raising. Measured on torch 2.13.0+cpu, AVX-512 (bench/native_preconditions.py,
each probe in its own process; bench/native_preconditions.md):

| kernel | crashes when | raises cleanly when |
| --- | --- | --- |
| `torch._weight_int8pack_mm(x, w, s)` | `x` (bfloat16) is not 32-byte aligned; `w` (int8) is not 16-byte aligned (with more than 1 token); `in % 16 != 0` (crash, or NaN at in = 8, 17) | `x` not contiguous |
| `aten._weight_int4pack_mm_for_cpu(x, w, g, sz)` | nothing found (offsets 1-32 bytes of every operand, 1/7/300 tokens) | `in % g`, `g` not in 32..256, `out % 16` |
| `torch._int_mm(a, b, out=)` (CPU) | nothing found (offsets, strided and sliced operands, odd shapes) | |

Tensors read from a safetensors file sit at whatever byte offset the file
gives them (multiples of 1 to 8 here), so loaded state meets the first row.
Hence two rules:

- State that a kernel reads (weight codes, their scales) is copied into
  `ALIGNMENT`-byte aligned, contiguous storage once, when it is set or loaded
  (`aligned`, used by `QuantizedWeight` and `interop.serialize.load_quantized`);
  a weight operand that is not aligned here is a bug of ours and raises
  `NativeKernelError` rather than risk a crash.
- Activations, made per call, are copied only when they are not aligned and
  contiguous already (ours never are: they are fresh tensors).

Every wrapper checks device, dtypes, dimensions, shapes, contiguity,
alignment and the shape constraints above, with messages that name the
operand and its value. Pure torch: no JAX.
"""

from __future__ import annotations

import torch

ALIGNMENT = 64  # bytes: a cache line and an AVX-512 register; above every requirement measured
INT4PACK_GROUPS = (256, 128, 64, 32)


class NativeKernelError(ValueError):
    """Operands that a native kernel would crash on (or compute garbage with): refused before the call."""


def is_aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    """Whether `t`'s first element sits at an address divisible by `alignment` (an empty tensor always does)."""
    return t.numel() == 0 or t.data_ptr() % alignment == 0


def _fresh(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor whose data starts on an `ALIGNMENT`-byte boundary."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if is_aligned(t) or device.type != "cpu":
        return t
    nbytes = t.numel() * t.element_size()  # the allocator gave less than ALIGNMENT: over-allocate and slice
    buf = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    start = -buf.data_ptr() % ALIGNMENT
    return buf[start : start + nbytes].view(dtype).view(shape)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when contiguous and aligned, else a contiguous aligned copy (same values, dtype, device)."""
    if t.is_contiguous() and is_aligned(t):
        return t
    return _fresh(tuple(t.shape), t.dtype, t.device).copy_(t)


def aligned_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of a loaded state dict in aligned contiguous storage (copies only those that are not)."""
    return {k: aligned(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


# -- checks -------------------------------------------------------------------------
def _require(ok: bool, kernel: str, message: str) -> None:
    if not ok:
        raise NativeKernelError(f"{kernel}: {message}")


def _operand(kernel: str, name: str, t: object, dtype: torch.dtype, dims: int = 2, cpu_only: bool = True) -> None:
    _require(isinstance(t, torch.Tensor), kernel, f"{name} must be a tensor; got {type(t).__name__}")
    assert isinstance(t, torch.Tensor)
    _require(t.dtype == dtype, kernel, f"{name} must be {dtype}; got {t.dtype}")
    _require(t.dim() == dims, kernel, f"{name} must be {dims}-D; got shape {tuple(t.shape)}")
    _require(t.device.type == "cpu" or not cpu_only, kernel, f"{name} must be on the CPU; got {t.device}")


def _state_operand(kernel: str, name: str, t: torch.Tensor) -> None:
    """A weight-side operand: must already be contiguous and aligned (set so once, at load)."""
    _require(t.is_contiguous(), kernel, f"{name} must be contiguous; got strides {t.stride()}")
    _require(
        is_aligned(t), kernel,
        f"{name} must start on a {ALIGNMENT}-byte boundary; it starts at offset {t.data_ptr() % ALIGNMENT} "
        "(weight state must go through interop.native.aligned when it is set or loaded)",
    )


# -- the kernels ----------------------------------------------------------------------
def int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`torch._int_mm(a, b, out=out)`: a (m, k) int8 @ b (k, n) int8 -> out (m, n) int32, exact.

    Strided operands are allowed (measured safe on CPU); on CUDA cuBLASLt needs
    m > 16 and k, n multiples of 8.
    """
    kernel = "_int_mm"
    for name, t, dtype in (("a", a, torch.int8), ("b", b, torch.int8), ("out", out, torch.int32)):
        _operand(kernel, name, t, dtype, cpu_only=False)
    m, k = a.shape
    _require(b.shape[0] == k, kernel, f"b must have {k} rows (a is {tuple(a.shape)}); got shape {tuple(b.shape)}")
    _require(tuple(out.shape) == (m, b.shape[1]), kernel, f"out must have shape {(m, b.shape[1])}; got {tuple(out.shape)}")
    _require(a.device == b.device == out.device, kernel, f"operands on different devices: {a.device}, {b.device}, {out.device}")
    for name, t in (("a", a), ("b", b)):
        _require(1 in t.stride() or t.numel() <= 1, kernel, f"{name} must have a unit stride; got strides {t.stride()}")
    if a.device.type == "cuda":
        _require(m > 16 and k % 8 == 0 and b.shape[1] % 8 == 0, kernel, f"on CUDA needs m > 16, k and n multiples of 8; got {m}, {k}, {b.shape[1]}")
    return torch._int_mm(a, b, out=out)


def weight_int8pack_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`torch._weight_int8pack_mm`: x (m, k) bfloat16, w (n, k) int8, scales (n,) bfloat16 -> (m, n) bfloat16.

    Preconditions (module docstring): k % 16 == 0; w contiguous and aligned;
    x is made contiguous and aligned here if it is not.
    """
    kernel = "_weight_int8pack_mm"
    _operand(kernel, "x", x, torch.bfloat16)
    _operand(kernel, "w", w, torch.int8)
    _operand(kernel, "scales", scales, torch.bfloat16, dims=1)
    n, k = w.shape
    _require(k % 16 == 0, kernel, f"in_features must be a multiple of 16 (the kernel crashes or returns NaN otherwise); got {k}")
    _require(x.shape[1] == k, kernel, f"x must have {k} columns; got shape {tuple(x.shape)}")
    _require(tuple(scales.shape) == (n,), kernel, f"scales must have shape ({n},); got {tuple(scales.shape)}")
    _state_operand(kernel, "w", w)
    return torch._weight_int8pack_mm(aligned(x), w, aligned(scales))


def weight_int4pack_mm(x: torch.Tensor, w: torch.Tensor, group: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    """`aten._weight_int4pack_mm_for_cpu`: x (m, k) bfloat16, w (n, k/2) uint8 (its packed layout),
    `group` in 32..256 dividing k, scales_zeros (k/group, n, 2) bfloat16 -> (m, n) bfloat16."""
    kernel = "_weight_int4pack_mm_for_cpu"
    _operand(kernel, "x", x, torch.bfloat16)
    _operand(kernel, "w", w, torch.uint8)
    _operand(kernel, "scales_zeros", scales_zeros, torch.bfloat16, dims=3)
    n, k = w.shape[0], w.shape[1] * 2
    _require(group in INT4PACK_GROUPS, kernel, f"group must be one of {INT4PACK_GROUPS}; got {group!r}")
    _require(k % group == 0, kernel, f"in_features {k} must be a multiple of the group {group}")
    _require(n % 16 == 0, kernel, f"out_features must be a multiple of 16; got {n}")
    _require(x.shape[1] == k, kernel, f"x must have {k} columns; got shape {tuple(x.shape)}")
    want = (k // group, n, 2)
    _require(tuple(scales_zeros.shape) == want, kernel, f"scales_zeros must have shape {want}; got {tuple(scales_zeros.shape)}")
    _state_operand(kernel, "w", w)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(aligned(x), w, group, aligned(scales_zeros))


def convert_weight_to_int4pack(offset_codes: torch.Tensor, inner_k_tiles: int = 2) -> torch.Tensor:
    """`aten._convert_weight_to_int4pack_for_cpu`: offset codes (n, k) int32 in [0, 15] -> (n, k/2) uint8."""
    kernel = "_convert_weight_to_int4pack_for_cpu"
    _operand(kernel, "offset_codes", offset_codes, torch.int32)
    n, k = offset_codes.shape
    _require(n % 16 == 0 and k % 2 == 0, kernel, f"needs out % 16 == 0 and even in; got {n} x {k}")
    if offset_codes.numel():
        lo, hi = int(offset_codes.min()), int(offset_codes.max())
        _require(0 <= lo and hi <= 15, kernel, f"offset codes must lie in [0, 15]; got range [{lo}, {hi}]")
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(aligned(offset_codes), inner_k_tiles)


def available(name: str) -> bool:
    """Whether this torch build has native kernel `name` ("int_mm", "int8pack", "int4pack")."""
    aten = torch.ops.aten
    if name == "int_mm":
        return hasattr(torch, "_int_mm")
    if name == "int8pack":
        return hasattr(torch, "_weight_int8pack_mm")
    if name == "int4pack":
        return hasattr(aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(aten, "_weight_int4pack_mm_for_cpu")
    raise ValueError(f"unknown native kernel {name!r}; known: int_mm, int8pack, int4pack")
