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

The compiled helpers of `interop.compiled` (our C code, built on the machine)
go through this door too: `dequant_int4pack`, `dequant_rows`,
`quantize_tokens` and `int8_panels` check that every pointer the C code will
walk stays inside its tensor (shapes, row ranges on block boundaries,
contiguity, dtypes) and refuse otherwise; the C functions themselves check
nothing.
"""

from __future__ import annotations

import torch

ALIGNMENT = 64  # bytes: a cache line and an AVX-512 register; above every requirement measured
PANELS_MAX_GROUP_8 = 65536  # columns of one int32 sum of 8-bit codes (u <= 255, |x| <= 128: 65536 * 32640 < 2^31)
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
def _require(ok: bool, kernel: str, message) -> None:
    """Raises NativeKernelError naming `kernel` unless `ok`; `message` is a string or a callable that makes one
    (formatted only on failure: the checks run before every call, and most calls pass)."""
    if not ok:
        raise NativeKernelError(f"{kernel}: {message() if callable(message) else message}")


def _operand(kernel: str, name: str, t: object, dtype: torch.dtype, dims: int = 2, cpu_only: bool = True) -> None:
    _require(isinstance(t, torch.Tensor), kernel, lambda: f"{name} must be a tensor; got {type(t).__name__}")
    assert isinstance(t, torch.Tensor)
    _require(t.dtype == dtype, kernel, lambda: f"{name} must be {dtype}; got {t.dtype}")
    _require(t.dim() == dims, kernel, lambda: f"{name} must be {dims}-D; got shape {tuple(t.shape)}")
    _require(t.device.type == "cpu" or not cpu_only, kernel, lambda: f"{name} must be on the CPU; got {t.device}")


def _state_operand(kernel: str, name: str, t: torch.Tensor) -> None:
    """A weight-side operand: must already be contiguous and aligned (set so once, at load)."""
    _require(t.is_contiguous(), kernel, lambda: f"{name} must be contiguous; got strides {t.stride()}")
    _require(
        is_aligned(t), kernel,
        lambda: f"{name} must start on a {ALIGNMENT}-byte boundary; it starts at offset {t.data_ptr() % ALIGNMENT} "
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
    _require(b.shape[0] == k, kernel, lambda: f"b must have {k} rows (a is {tuple(a.shape)}); got shape {tuple(b.shape)}")
    _require(tuple(out.shape) == (m, b.shape[1]), kernel, lambda: f"out must have shape {(m, b.shape[1])}; got {tuple(out.shape)}")
    _require(a.device == b.device == out.device, kernel, lambda: f"operands on different devices: {a.device}, {b.device}, {out.device}")
    for name, t in (("a", a), ("b", b)):
        _require(1 in t.stride() or t.numel() <= 1, kernel, lambda: f"{name} must have a unit stride; got strides {t.stride()}")
    if a.device.type == "cuda":
        _require(m > 16 and k % 8 == 0 and b.shape[1] % 8 == 0, kernel, lambda: f"on CUDA needs m > 16, k and n multiples of 8; got {m}, {k}, {b.shape[1]}")
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
    _require(k % 16 == 0, kernel, lambda: f"in_features must be a multiple of 16 (the kernel crashes or returns NaN otherwise); got {k}")
    _require(x.shape[1] == k, kernel, lambda: f"x must have {k} columns; got shape {tuple(x.shape)}")
    _require(tuple(scales.shape) == (n,), kernel, lambda: f"scales must have shape ({n},); got {tuple(scales.shape)}")
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
    _require(group in INT4PACK_GROUPS, kernel, lambda: f"group must be one of {INT4PACK_GROUPS}; got {group!r}")
    _require(k % group == 0, kernel, lambda: f"in_features {k} must be a multiple of the group {group}")
    _require(n % 16 == 0, kernel, lambda: f"out_features must be a multiple of 16; got {n}")
    _require(x.shape[1] == k, kernel, lambda: f"x must have {k} columns; got shape {tuple(x.shape)}")
    want = (k // group, n, 2)
    _require(tuple(scales_zeros.shape) == want, kernel, lambda: f"scales_zeros must have shape {want}; got {tuple(scales_zeros.shape)}")
    _state_operand(kernel, "w", w)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(aligned(x), w, group, aligned(scales_zeros))


def convert_weight_to_int4pack(offset_codes: torch.Tensor, inner_k_tiles: int = 2) -> torch.Tensor:
    """`aten._convert_weight_to_int4pack_for_cpu`: offset codes (n, k) int32 in [0, 15] -> (n, k/2) uint8."""
    kernel = "_convert_weight_to_int4pack_for_cpu"
    _operand(kernel, "offset_codes", offset_codes, torch.int32)
    n, k = offset_codes.shape
    _require(n % 16 == 0 and k % 2 == 0, kernel, lambda: f"needs out % 16 == 0 and even in; got {n} x {k}")
    if offset_codes.numel():
        lo, hi = int(offset_codes.min()), int(offset_codes.max())
        _require(0 <= lo and hi <= 15, kernel, lambda: f"offset codes must lie in [0, 15]; got range [{lo}, {hi}]")
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(aligned(offset_codes), inner_k_tiles)


# -- the compiled helpers (interop.compiled) ----------------------------------------------
def _dequant_operands(kernel: str, scales: torch.Tensor, out: torch.Tensor, out_shape: tuple[int, int]) -> None:
    _operand(kernel, "scales", scales, torch.float32)
    _operand(kernel, "out", out, torch.bfloat16)
    _require(scales.is_contiguous(), kernel, lambda: f"scales must be contiguous; got strides {scales.stride()}")
    _require(out.is_contiguous(), kernel, lambda: f"out must be contiguous; got strides {out.stride()}")
    _require(tuple(out.shape) == out_shape, kernel, lambda: f"out must have shape {out_shape}; got {tuple(out.shape)}")


def _group_count(kernel: str, in_features: int, group: int) -> int:
    _require(isinstance(group, int) and group >= 1, kernel, lambda: f"group must be a positive int; got {group!r}")
    _require(in_features >= 1, kernel, lambda: f"in_features must be positive; got {in_features}")
    return -(-in_features // group)


def _library(kernel: str):
    from interop import compiled

    lib = compiled.load()
    _require(lib is not None, kernel, lambda: f"the compiled helpers are unavailable: {compiled.unavailable()}")
    return lib


def dequant_int4pack(
    qdata: torch.Tensor, in_features: int, r0: int, r1: int, variant: tuple[str, int], scales_t: torch.Tensor, group: int, out: torch.Tensor
) -> torch.Tensor:
    """Rows r0:r1 of an int4pack weight `qdata (out_features, in/2) uint8` -> out (in, r1 - r0) bfloat16,
    `Q * s` in natural row order. `variant` is `qweight.int4pack_variant()`; `scales_t (groups, out_features)`
    float32 holds bfloat16-rounded scales; `group` input columns share one (in_features for one per row).
    r0 must start a block; r1 ends one or the weight (its short last block)."""
    kernel = "duq_dequant_int4pack"
    _operand(kernel, "qdata", qdata, torch.uint8)
    _require(qdata.is_contiguous(), kernel, lambda: f"qdata must be contiguous; got strides {qdata.stride()}")
    n_out, kind, block = qdata.shape[0], variant[0], variant[1]
    _require(qdata.shape[1] * 2 == in_features, kernel, lambda: f"qdata must have in_features / 2 = {in_features / 2} columns; got {qdata.shape[1]}")
    _require(block >= 2 and block % 2 == 0, kernel, lambda: f"the variant's block must be even; got {block}")
    _require(0 <= r0 < r1 <= n_out and r0 % block == 0, kernel, lambda: f"rows {r0}:{r1} must start a block of {block} inside {n_out} rows")
    rows = r1 - r0
    full = rows // block * block
    _require(full == rows or (r1 == n_out and (rows - full) % 2 == 0), kernel, lambda: f"rows {r0}:{r1} must end a block of {block} or the weight")
    groups = _group_count(kernel, in_features, group)
    _dequant_operands(kernel, scales_t, out, (in_features, rows))
    _require(tuple(scales_t.shape) == (groups, n_out), kernel, lambda: f"scales_t must have shape {(groups, n_out)}; got {tuple(scales_t.shape)}")
    lib, threads = _library(kernel), torch.get_num_threads()
    base, s, o = qdata.data_ptr() + r0 * (in_features // 2), scales_t.data_ptr() + r0 * 4, out.data_ptr()
    if full:
        lib.duq_dequant_int4pack(base, full // block, in_features, block, int(kind == "lanes"), s, n_out, group, o, threads)
    if full < rows:  # the short last block: bytes (in, tail / 2), rows 2b and 2b + 1 in byte b
        tail = torch.empty(in_features, rows - full, dtype=torch.bfloat16)
        lib.duq_dequant_int4pack(base + full * (in_features // 2), 1, in_features, rows - full, 0, s + full * 4, n_out, group, tail.data_ptr(), threads)
        out[:, full:].copy_(tail)
    return out


def dequant_rows(codes: torch.Tensor, layout: str, in_features: int, scales: torch.Tensor, group: int, out: torch.Tensor) -> torch.Tensor:
    """Rows of `"nibbles"` `(rows, ceil(in/2)) uint8` or `"int8"` `(rows, in) int8` codes -> out (rows, in)
    bfloat16, `Q * s`; `scales (rows, groups)` float32 bfloat16-rounded, `group` columns per scale."""
    kernel = f"duq_dequant_{layout}"
    _require(layout in ("nibbles", "int8"), kernel, lambda: f"layout must be 'nibbles' or 'int8'; got {layout!r}")
    _operand(kernel, "codes", codes, torch.uint8 if layout == "nibbles" else torch.int8)
    _require(codes.is_contiguous(), kernel, lambda: f"codes must be contiguous; got strides {codes.stride()}")
    rows = codes.shape[0]
    width = -(-in_features // 2) if layout == "nibbles" else in_features
    _require(codes.shape[1] == width, kernel, lambda: f"codes must have {width} columns for in_features={in_features}; got {codes.shape[1]}")
    groups = _group_count(kernel, in_features, group)
    _dequant_operands(kernel, scales, out, (rows, in_features))
    _require(tuple(scales.shape) == (rows, groups), kernel, lambda: f"scales must have shape {(rows, groups)}; got {tuple(scales.shape)}")
    lib, threads = _library(kernel), torch.get_num_threads()
    if layout == "nibbles":
        lib.duq_dequant_nibbles(codes.data_ptr(), rows, width, in_features, scales.data_ptr(), groups, group, out.data_ptr(), threads)
    else:
        lib.duq_dequant_int8(codes.data_ptr(), rows, in_features, scales.data_ptr(), groups, group, out.data_ptr(), threads)
    return out


def token_layout(x: torch.Tensor) -> str | None:
    """How `quantize_tokens` walks a (T, n) tensor: "rows" (row-major, or one token), "columns" (the transpose
    of a row-major (n, T), as `DuQuantLinear.rotate_input` returns), or None when it cannot."""
    if x.dim() != 2 or x.shape[1] == 0:
        return None
    tokens, n = x.shape
    if tokens <= 1 or (x.stride(1) == 1 and x.stride(0) >= n):
        return "rows"
    if x.stride(0) == 1 and x.stride(1) >= tokens:
        return "columns"
    return None


def _token_scale_args(kernel: str, dynamic: bool, clip: float, qa: int, static_scale: torch.Tensor | None) -> torch.Tensor | None:
    """Checks the per-token quantization's arguments (each named); returns the static scale as a (1,) float32 CPU
    tensor, or None when `dynamic`."""
    _require(isinstance(qa, int) and 1 <= qa <= 127, kernel, lambda: f"qa must be an int in 1..127; got {qa!r}")
    _require(0 < clip <= 1, kernel, lambda: f"clip must lie in (0, 1]; got {clip!r}")
    if dynamic:
        return None
    _require(isinstance(static_scale, torch.Tensor) and static_scale.numel() == 1, kernel, "static quantization needs a one-element scale tensor")
    return static_scale.detach().reshape(1).float().cpu().contiguous()


def quantize_tokens(x: torch.Tensor, dynamic: bool, clip: float, qa: int, static_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, n) float32 or bfloat16 -> (xq (T, n) int8, s_t (T, 1) float32), in one pass per token, with
    `interop.kernels.quantize_tokens`'s arithmetic (dynamic per token, or one static scale). x is row-major
    (unit column stride) or the transpose of a row-major (n, T) (unit row stride, as `rotate_input` returns)."""
    kernel = "duq_quantize_tokens"
    _require(isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.bfloat16), kernel,
             lambda: f"x must be a float32 or bfloat16 tensor; got {getattr(x, 'dtype', type(x).__name__)}")
    _require(x.dim() == 2 and x.device.type == "cpu", kernel, lambda: f"x must be 2-D on the CPU; got shape {tuple(x.shape)} on {x.device}")
    tokens, n = x.shape
    layout = token_layout(x)
    rows = layout == "rows"
    _require(layout is not None, kernel, lambda: f"x must be row-major or a transposed row-major tensor (unit stride on one dimension, rows apart by at least their length); got shape {tuple(x.shape)}, strides {x.stride()}")
    static_scale = _token_scale_args(kernel, dynamic, clip, qa, static_scale)
    xq, s_t = torch.empty(tokens, n, dtype=torch.int8), torch.empty(tokens, 1, dtype=torch.float32)
    if tokens:
        lib = _library(kernel)
        if tokens == 1:  # one token: its n values may sit at any common stride; give them a unit one
            x = x.contiguous() if x.stride(1) != 1 else x
        fn, ld = (lib.duq_quantize_tokens, x.stride(0) if tokens > 1 else n) if rows else (lib.duq_quantize_tokens_t, x.stride(1))
        fn(x.data_ptr(), int(x.dtype == torch.bfloat16), tokens, n, ld, int(dynamic), float(clip), qa,
           None if dynamic else static_scale.data_ptr(), xq.data_ptr(), s_t.data_ptr(), torch.get_num_threads())
    return xq, s_t


def int8_panels(xq: torch.Tensor, s_t: torch.Tensor, panels: torch.Tensor, bits: int, scales: torch.Tensor, group: int,
                out: torch.Tensor) -> torch.Tensor:
    """`duq_w4a8_panels` (`bits` 2..4) or `duq_w8a8_panels` (5..8): int8 codes `xq (T, in)` with per-token scales
    `s_t (T, 1)` (or (T,)) float32, times codes in the "panels" layout `panels` uint8 ((out_features, in/2) for
    4-bit, (out_features, in) for 8-bit) with `scales (out_features, groups)` float32 (`group` input columns
    each; `in` for one per row) -> out (T, out_features) float32, in place."""
    if not _int8_panels_ok(xq, s_t, panels, bits, scales, group, out):
        _check_int8_panels(xq, s_t, panels, bits, scales, group, out)
    if xq.shape[0]:
        _run_panels(_panels_function(bits), xq, s_t, panels.data_ptr(), scales.data_ptr(), panels.shape[0], group, out,
                    torch.get_num_threads())
    return out


def _run_panels(fn, xq, s_t, panels_ptr: int, scales_ptr: int, n_out: int, group: int, out, threads: int) -> None:
    """The panel product call `fn`, on checked operands (xq holds at least one token); its status raised."""
    tokens, n_in = xq.shape
    status = fn(xq.data_ptr(), s_t.data_ptr(), tokens, n_in, panels_ptr, scales_ptr, n_out, group, out.data_ptr(), threads)
    if status:
        raise MemoryError(f"{fn.__name__}: could not allocate its scratch memory ({tokens} tokens, {-(-n_in // group)} groups)")


def transform_quantize(x: torch.Tensor, perm: torch.Tensor, diag: torch.Tensor | None, rot: torch.Tensor | None, dynamic: bool,
                       clip: float, qa: int, static_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`duq_transform_quantize`: float32 x (T, n) (unit column stride) -> the codes of
    `rot(x * diag)[..., perm]`'s blocks (`DuQuantLinear.rotate_input` without a pre-rotation), xq (T, n) int8
    and s_t (T, 1) float32, as `quantize_tokens` makes them. `perm` (n,) int64; `diag` (n,) float32 or None;
    `rot` (n_rot, B, B) float32 with n_rot 1 (every block) or ceil(n / B), or None. The C code also refuses a
    permutation index outside [0, n) itself, on every call (the buffers can change in place)."""
    kernel = "duq_transform_quantize"
    T, f32 = torch.Tensor, torch.float32
    ok = (type(x) is T and type(perm) is T and x.dtype is f32 and perm.dtype is torch.int64 and x.is_cpu and perm.is_cpu
          and x.dim() == 2 and perm.dim() == 1 and x.shape[1] == perm.shape[0] and x.stride(1) == 1 and perm.is_contiguous()
          and (diag is None or (type(diag) is T and diag.dtype is f32 and diag.is_cpu and diag.shape == perm.shape and diag.is_contiguous()))
          and (rot is None or (type(rot) is T and rot.dtype is f32 and rot.is_cpu and rot.dim() == 3 and rot.shape[1] == rot.shape[2]
                               and rot.shape[0] in (1, -(-perm.shape[0] // rot.shape[1])) and rot.is_contiguous())))
    if not ok:
        _check_transform_quantize(x, perm, diag, rot)
    static_scale = _token_scale_args(kernel, dynamic, clip, qa, static_scale)
    tokens, n = x.shape
    xq, s_t = torch.empty(tokens, n, dtype=torch.int8), torch.empty(tokens, 1)
    if tokens:
        _run_transform_quantize(_library(kernel).duq_transform_quantize, x, perm, diag, rot, dynamic, float(clip), qa, static_scale,
                                xq, s_t, torch.get_num_threads())
    return xq, s_t


def _run_transform_quantize(fn, x, perm, diag, rot, dynamic: bool, clip: float, qa: int, static_scale, xq, s_t, threads: int) -> None:
    """The `duq_transform_quantize` call `fn`, on checked operands (x holds at least one token); its status raised."""
    tokens, n = x.shape
    status = fn(x.data_ptr(), tokens, n, x.stride(0) if tokens > 1 else n, None if diag is None else diag.data_ptr(), perm.data_ptr(),
                None if rot is None else rot.data_ptr(), 0 if rot is None else rot.shape[0], 0 if rot is None else rot.shape[1],
                int(dynamic), clip, qa, None if dynamic else static_scale.data_ptr(), xq.data_ptr(), s_t.data_ptr(), threads)
    _require(status != -2, "duq_transform_quantize",
             lambda: f"perm must hold indices in [0, {n}); got range [{int(perm.min())}, {int(perm.max())}]")
    if status:
        raise MemoryError(f"duq_transform_quantize: could not allocate its scratch memory ({tokens} tokens, {n} channels)")


def _check_transform_quantize(x, perm, diag, rot) -> None:
    """`transform_quantize`'s tensor operands' preconditions, each named in the NativeKernelError it raises."""
    kernel = "duq_transform_quantize"
    _operand(kernel, "x", x, torch.float32)
    _operand(kernel, "perm", perm, torch.int64, dims=1)
    n = perm.shape[0]
    _require(x.shape[1] == n, kernel, lambda: f"x must have {n} columns (perm's length); got shape {tuple(x.shape)}")
    _require(x.stride(1) == 1 or x.shape[0] == 0, kernel, lambda: f"x must have unit column stride; got strides {x.stride()}")
    _require(perm.is_contiguous(), kernel, lambda: f"perm must be contiguous; got strides {perm.stride()}")
    if diag is not None:
        _operand(kernel, "diag", diag, torch.float32, dims=1)
        _require(diag.shape == perm.shape and diag.is_contiguous(), kernel,
                 lambda: f"diag must be a contiguous ({n},) tensor; got shape {tuple(diag.shape)}, strides {diag.stride()}")
    if rot is not None:
        _operand(kernel, "rot", rot, torch.float32, dims=3)
        _require(rot.shape[1] == rot.shape[2] and rot.shape[1] >= 1, kernel, lambda: f"rot must hold square blocks; got shape {tuple(rot.shape)}")
        blocks = -(-n // rot.shape[1])
        _require(rot.shape[0] in (1, blocks), kernel, lambda: f"rot must hold 1 or {blocks} blocks of {rot.shape[1]}; got {rot.shape[0]}")
        _require(rot.is_contiguous(), kernel, lambda: f"rot must be contiguous; got strides {rot.stride()}")


class TransformQuantize:
    """`transform_quantize` bound to one layer's `perm`, `diag` and `rot` with dynamic per-token codes (`clip`,
    `qa`): the per-call door of a layer's fused input transform (`interop.layer_product`).

    The layer's operands are checked in full once, here; before every call `__call__` checks `x` and that the
    bound tensors are still the ones checked (same storage address, shape, dtype, layout). Any call that fails the
    quick check goes through `transform_quantize`, whose checks name what is wrong (or, stricter than they are,
    pass: then the call is safe). The C code refuses a permutation index outside [0, n) itself, on every call.
    """

    __slots__ = ("perm", "diag", "rot", "clip", "qa", "n", "_fn", "_facts")

    def __init__(self, perm: torch.Tensor, diag: torch.Tensor | None, rot: torch.Tensor | None, clip: float, qa: int):
        kernel = "duq_transform_quantize"
        n = perm.shape[0] if isinstance(perm, torch.Tensor) and perm.dim() == 1 else 0
        _check_transform_quantize(torch.zeros(1, n), perm, diag, rot)  # the layer side, named
        _token_scale_args(kernel, True, clip, qa, None)
        self.perm, self.diag, self.rot, self.clip, self.qa, self.n = perm, diag, rot, float(clip), qa, n
        self._fn = _library(kernel).duq_transform_quantize
        self._facts = self._tensor_facts()

    def _tensor_facts(self) -> tuple:
        return tuple(None if t is None else (t.data_ptr(), t.shape, t.dtype, t.is_contiguous(), t.is_cpu) for t in (self.perm, self.diag, self.rot))

    def fits(self, perm, diag, rot, clip: float, qa: int) -> bool:
        """Whether this binding is for these very tensors and quantization arguments."""
        return perm is self.perm and diag is self.diag and rot is self.rot and clip == self.clip and qa == self.qa

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 x (T, n) (unit column stride) -> xq (T, n) int8, s_t (T, 1) float32, as `transform_quantize`."""
        ok = (type(x) is torch.Tensor and x.dtype is torch.float32 and x.is_cpu and x.dim() == 2 and x.shape[1] == self.n
              and x.stride(1) == 1 and self._tensor_facts() == self._facts)
        if not ok:
            return transform_quantize(x, self.perm, self.diag, self.rot, True, self.clip, self.qa, None)
        tokens, n = x.shape
        xq, s_t = torch.empty(tokens, n, dtype=torch.int8), torch.empty(tokens, 1)
        if tokens:
            self._run(x, xq, s_t, torch.get_num_threads())
        return xq, s_t

    def _run(self, x: torch.Tensor, xq: torch.Tensor, s_t: torch.Tensor, threads: int) -> None:
        """The C call, on operands `__call__` (or `LayerInt8`) has checked; x holds at least one token."""
        _run_transform_quantize(self._fn, x, self.perm, self.diag, self.rot, True, self.clip, self.qa, None, xq, s_t, threads)


class PanelsProduct:
    """`int8_panels` bound to one weight (`panels`, `bits`, `scales`, `group`): the per-call door of the c-int8 path.

    The weight's operands are checked in full once, here (`_check_int8_panels`); before every call `__call__`
    checks the activations and that the weight's tensors are still the ones checked (same storage address and
    shape: a weight changed in place since fails the quick check, and the full checks then run again and name
    what is wrong). What is left per call is a few attribute tests and the C call: the product of one decode
    token takes ~20-60 us, and the generic door's checks and lookups took about as long again.
    """

    __slots__ = ("panels", "scales", "bits", "group", "n_in", "n_out", "_fn", "_facts")

    def __init__(self, panels: torch.Tensor, bits: int, scales: torch.Tensor, group: int, in_features: int):
        n_out = panels.shape[0] if isinstance(panels, torch.Tensor) and panels.dim() == 2 else 0
        xq, s_t = torch.zeros(1, in_features, dtype=torch.int8), torch.ones(1, 1)
        _check_int8_panels(xq, s_t, panels, bits, scales, group, torch.empty(1, n_out))  # the weight side, named
        self.panels, self.scales, self.bits, self.group = panels, scales, bits, group
        self.n_in, self.n_out = in_features, n_out
        self._fn = _panels_function(bits)
        self._facts = self._weight_facts()

    def _weight_facts(self) -> tuple:
        p, s = self.panels, self.scales
        return (p.data_ptr(), p.shape, p.dtype, p.is_contiguous(), s.data_ptr(), s.shape, s.dtype, s.is_contiguous())

    def __call__(self, xq: torch.Tensor, s_t: torch.Tensor) -> torch.Tensor:
        """int8 codes `xq (T, in)`, float32 scales `s_t (T, 1)` -> (T, out) float32 (a fresh tensor)."""
        T = torch.Tensor
        ok = (type(xq) is T and type(s_t) is T and xq.dtype is torch.int8 and s_t.dtype is torch.float32
              and xq.is_cpu and s_t.is_cpu and xq.dim() == 2 and xq.shape[1] == self.n_in and xq.is_contiguous()
              and s_t.numel() == xq.shape[0] and s_t.is_contiguous() and self._weight_facts() == self._facts)
        if not ok:  # the full checks name what is wrong (or, stricter than they are, pass: then the call is safe)
            tokens = xq.shape[0] if isinstance(xq, torch.Tensor) and xq.dim() == 2 else 0
            return int8_panels(xq, s_t, self.panels, self.bits, self.scales, self.group, torch.empty(tokens, self.n_out))
        tokens = xq.shape[0]
        out = torch.empty(tokens, self.n_out)
        if tokens:
            self._run(xq, s_t, out, torch.get_num_threads())
        return out

    def _run(self, xq: torch.Tensor, s_t: torch.Tensor, out: torch.Tensor, threads: int) -> None:
        """The C call, on operands `__call__` (or `LayerInt8`) has checked; xq holds at least one token."""
        _run_panels(self._fn, xq, s_t, self._facts[0], self._facts[4], self.n_out, self.group, out, threads)


class LayerInt8:
    """A layer's bound input transform (`TransformQuantize`) and bound panel product (`PanelsProduct`) run as one
    call: float32 x (T, in) -> y (T, out) float32, bit-identical to `product(*transform(x))`.

    Before every call it checks x and that both bindings' tensors are still the ones checked, in one expression; a
    call that fails it goes through the two doors, whose checks name what is wrong. What it saves against them is
    Python: one set of checks and allocations for the two C calls (a decode token's projection, ~20 us of C, took
    ~20 us more through the two doors).
    """

    __slots__ = ("transform", "product")

    def __init__(self, transform: TransformQuantize, product: PanelsProduct):
        _require(transform.n == product.n_in, "LayerInt8",
                 lambda: f"the transform's {transform.n} channels must be the product's in_features {product.n_in}")
        self.transform, self.product = transform, product

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t, p = self.transform, self.product
        ok = (type(x) is torch.Tensor and x.dtype is torch.float32 and x.is_cpu and x.dim() == 2 and x.shape[1] == t.n
              and x.stride(1) == 1 and t._tensor_facts() == t._facts and p._weight_facts() == p._facts)
        if not ok:
            return p(*t(x))
        tokens = x.shape[0]
        xq, s_t, out = torch.empty(tokens, t.n, dtype=torch.int8), torch.empty(tokens, 1), torch.empty(tokens, p.n_out)
        if tokens:
            threads = torch.get_num_threads()
            t._run(x, xq, s_t, threads)
            p._run(xq, s_t, out, threads)
        return out


def _panels_function(bits: int):
    """The compiled panel product for `bits` codes (2..4: `duq_w4a8_panels`, 5..8: `duq_w8a8_panels`); refused where
    the library was built without AVX2 and FMA (its plain-C version is for the self-check only)."""
    kernel = "duq_w4a8_panels" if bits <= 4 else "duq_w8a8_panels"
    lib = _library(kernel)
    _require(bool(lib.duq_panels_simd()), kernel, "the compiled helpers were built without AVX2 and FMA")
    return getattr(lib, kernel)


def _int8_panels_ok(xq, s_t, panels, bits, scales, group, out) -> bool:
    """Every condition `_check_int8_panels` checks, as one expression (the check before every call, cheap when it
    passes; `_check_int8_panels` then names what failed)."""
    T, C = torch.Tensor, torch.int8
    if not (type(xq) is T and type(s_t) is T and type(panels) is T and type(scales) is T and type(out) is T
            and type(bits) is int and type(group) is int and 2 <= bits <= 8):
        return False
    xs, ps, ss, os_ = xq.shape, panels.shape, scales.shape, out.shape
    if not (len(xs) == 2 and len(ps) == 2 and len(ss) == 2 and len(os_) == 2):
        return False
    tokens, n_in = xs
    n_out = ps[0]
    return (
        xq.dtype is C and panels.dtype is torch.uint8 and scales.dtype is torch.float32 and out.dtype is torch.float32
        and s_t.dtype is torch.float32 and xq.is_cpu and panels.is_cpu and scales.is_cpu and out.is_cpu and s_t.is_cpu
        and n_in % 4 == 0 and n_in >= 4 and n_out % 16 == 0 and n_out >= 16
        and ps[1] == (n_in // 2 if bits <= 4 else n_in)
        and group >= 4 and group % 4 == 0 and (bits <= 4 or min(group, n_in) <= PANELS_MAX_GROUP_8)
        and ss[0] == n_out and ss[1] == -(-n_in // group)
        and s_t.numel() == tokens and s_t.is_contiguous() and os_[0] == tokens and os_[1] == n_out
        and xq.is_contiguous() and out.is_contiguous() and panels.is_contiguous() and scales.is_contiguous()
        and is_aligned(panels) and is_aligned(scales)
    )


def _check_int8_panels(xq, s_t, panels, bits, scales, group, out) -> None:
    """`int8_panels`'s preconditions, each named in the NativeKernelError it raises."""
    _require(isinstance(bits, int) and 2 <= bits <= 8, "int8_panels", lambda: f"bits must be an int in 2..8; got {bits!r}")
    kernel = "duq_w4a8_panels" if bits <= 4 else "duq_w8a8_panels"
    _operand(kernel, "xq", xq, torch.int8)
    _operand(kernel, "panels", panels, torch.uint8)
    _operand(kernel, "scales", scales, torch.float32)
    _operand(kernel, "out", out, torch.float32)
    _require(isinstance(s_t, torch.Tensor) and s_t.dtype == torch.float32 and s_t.device.type == "cpu", kernel,
             lambda: f"s_t must be a float32 CPU tensor; got {getattr(s_t, 'dtype', type(s_t).__name__)}")
    tokens, n_in = xq.shape
    n_out = panels.shape[0]
    _require(n_in % 4 == 0 and n_in >= 4, kernel, lambda: f"in must be a positive multiple of 4; got {n_in}")
    _require(n_out % 16 == 0 and n_out >= 16, kernel, lambda: f"out_features must be a positive multiple of 16; got {n_out}")
    width = n_in // 2 if bits <= 4 else n_in
    _require(panels.shape[1] == width, kernel, lambda: f"panels must have {'in / 2' if bits <= 4 else 'in'} = {width} columns; got {panels.shape[1]}")
    _require(isinstance(group, int) and not isinstance(group, bool) and group >= 4 and group % 4 == 0, kernel,
             lambda: f"group must be a positive multiple of 4; got {group!r}")
    _require(bits <= 4 or min(group, n_in) <= PANELS_MAX_GROUP_8, kernel,
             lambda: f"8-bit codes need groups of at most {PANELS_MAX_GROUP_8} columns (int32 sums); got {min(group, n_in)}")
    groups = -(-n_in // group)
    _require(tuple(scales.shape) == (n_out, groups), kernel, lambda: f"scales must have shape {(n_out, groups)}; got {tuple(scales.shape)}")
    _require(s_t.numel() == tokens and s_t.is_contiguous(), kernel, lambda: f"s_t must hold {tokens} contiguous scales; got shape {tuple(s_t.shape)}, strides {s_t.stride()}")
    _require(tuple(out.shape) == (tokens, n_out), kernel, lambda: f"out must have shape {(tokens, n_out)}; got {tuple(out.shape)}")
    for name, t in (("xq", xq), ("out", out)):
        _require(t.is_contiguous(), kernel, lambda: f"{name} must be contiguous; got strides {t.stride()}")
    _state_operand(kernel, "panels", panels)
    _state_operand(kernel, "scales", scales)


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
