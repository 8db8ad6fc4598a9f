"""Compiled helpers: `interop/csrc/duquant_kernels.c`, built on this machine at first use, loaded with ctypes.

Two jobs that torch ops do in several passes over memory, done in one, with the same bits, and one
product torch has no fast kernel for on CPUs without int8 dot-product instructions:

- The `dequant-bf16` path multiplies activations by bfloat16 weight tiles made
  from the 4- or 8-bit codes on every call: unpack, convert and scale are one
  loop here (4.7x faster than the torch ops on a 2048 x 1024 tile of 4-bit codes
  in groups of 128, bench/RESULTS.md "Compiled helpers").
- Per-token activation quantization (`kernels.quantize_tokens`: max, scale,
  divide, round, clamp) is one pass per token; with a layer's input transform
  before it (`duq_transform_quantize`: smoothing, permutation, block rotation,
  then the codes; float32 inputs, no pre-rotation), one C call per layer and call.
- The `c-int8` path (`duq_w4a8_panels`, `duq_w8a8_panels`): int8 activations times
  4- or 8-bit codes in the "panels" layout with AVX2 integer multiply-adds, exact int32
  sums per scale group, scaled in float32, where torch's int8 GEMM is emulated
  (bench/RESULTS.md "Kernel speed, avx2"). Built without AVX2 and FMA, the library still
  holds a plain C version (checked, but not offered as a path: `duq_panels_simd()` says which).

Building: the first `load()` of a process compiles the source with the C
compiler (`$CC`, else `cc`, else `gcc`) and `-O3 -march=native -fopenmp`
(falling back to fewer flags where the compiler refuses one) into
`~/.cache/duquant/compiled/<key>/` (`$DUQUANT_COMPILED_DIR` overrides), where
`key` hashes the source, the flags, the compiler's version and this CPU's
model and full feature list: a library built for another processor is never loaded (it could
die on an instruction this one lacks). The file is written atomically, so
processes that build at once do not see each other's half-written output.
Before first use the library is checked against torch's own arithmetic on
small random tiles; any difference makes it unavailable.

Unavailable (no compiler, a failed build or check, `$DUQUANT_COMPILED=0`):
`unavailable()` says why, and the kernels use their torch ops instead. The functions trust their operands; `interop.native` checks them
before every call. Pure torch and the standard library: no JAX.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

from duquant_jax.atomic import atomic_write
from interop.kernel_tuning import DEFAULT_CACHE_DIR, cpu_description, cpu_info

__all__ = ["SOURCE", "forget", "load", "unavailable"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "duquant_kernels.c"
LIBRARY = "libduquant_kernels.so"
ABI_VERSION = 5
# tried in order; the first the compiler accepts wins
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
BUILD_TIMEOUT_S = 120

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=None)
def _cpu_fingerprint() -> str:
    """The CPU model and every feature flag the kernel reports (`-march=native` may use any of them)."""
    model, flags = cpu_info()
    return f"{model or platform.processor()} | {' '.join(sorted(flags))} | {cpu_description()}"


@functools.lru_cache(maxsize=None)
def _version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "unknown"


def _cache_root() -> Path:
    root = os.environ.get("DUQUANT_COMPILED_DIR")
    return Path(root).expanduser() if root else DEFAULT_CACHE_DIR.expanduser() / "compiled"


def _key(source: bytes, cc: str, flags: tuple[str, ...]) -> str:
    text = "\n".join((source.hex(), cc, _version(cc), " ".join(flags), _cpu_fingerprint(), platform.machine(), platform.system()))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _library_file(source: bytes, cc: str, flags: tuple[str, ...]) -> Path:
    """Where the library built from `source` by `cc` with `flags` lives (or will)."""
    return _cache_root() / _key(source, cc, flags) / LIBRARY


def _build(cc: str) -> tuple[Path | None, str]:
    """Builds (or finds) the library; returns (its path, "") or (None, why not)."""
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        path = _library_file(source, cc, flags)
        if path.is_file():
            return path, ""

        def compile_to(tmp: str, flags: tuple[str, ...] = flags) -> None:
            cmd = [cc, *flags, "-std=c99", "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}: {done.stderr.strip()[-400:]}")

        try:
            return atomic_write(path, compile_to), ""
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(str(e))
    return None, "; ".join(errors)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.duq_abi_version.restype = c_int
    lib.duq_abi_version.argtypes = []
    lib.duq_dequant_int4pack.restype = None
    lib.duq_dequant_int4pack.argtypes = [ptr, i64, i64, i64, c_int, ptr, i64, i64, ptr, c_int]
    lib.duq_dequant_nibbles.restype = None
    lib.duq_dequant_nibbles.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, c_int]
    lib.duq_dequant_int8.restype = None
    lib.duq_dequant_int8.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, c_int]
    lib.duq_quantize_tokens.restype = None
    lib.duq_quantize_tokens.argtypes = [ptr, c_int, i64, i64, i64, c_int, ctypes.c_float, c_int, ptr, ptr, ptr, c_int]
    lib.duq_quantize_tokens_t.restype = None
    lib.duq_quantize_tokens_t.argtypes = lib.duq_quantize_tokens.argtypes
    lib.duq_panels_simd.restype = c_int
    lib.duq_panels_simd.argtypes = []
    for name in ("duq_w4a8_panels", "duq_w8a8_panels"):
        getattr(lib, name).restype = c_int
        getattr(lib, name).argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, i64, ptr, c_int]
    lib.duq_transform_quantize.restype = c_int
    lib.duq_transform_quantize.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, c_int, ctypes.c_float, c_int, ptr, ptr, ptr, c_int]
    return lib


def _self_check(lib: ctypes.CDLL) -> str | None:
    """Runs each function on small random operands against torch's bfloat16 arithmetic; the first mismatch, or None."""
    import torch  # here, not at import: the module stays importable for its docstring and paths

    if lib.duq_abi_version() != ABI_VERSION:
        return f"the library reports ABI {lib.duq_abi_version()}, expected {ABI_VERSION}"
    gen = torch.Generator().manual_seed(0)
    rows, n_in, group = 48, 80, 32  # a partial last group (80 = 2 x 32 + 16)
    groups = -(-n_in // group)
    codes = torch.randint(-8, 8, (rows, n_in), generator=gen, dtype=torch.int8)
    scales = (torch.rand(rows, groups, generator=gen) * 3e-2 + 1e-4).to(torch.bfloat16).float()
    want = (codes.float() * scales.repeat_interleave(group, 1)[:, :n_in]).to(torch.bfloat16)
    got = torch.empty(rows, n_in, dtype=torch.bfloat16)
    lib.duq_dequant_int8(codes.data_ptr(), rows, n_in, scales.data_ptr(), groups, group, got.data_ptr(), 1)
    if not torch.equal(got, want):
        return "duq_dequant_int8 differs from torch"
    u = (codes + 8).to(torch.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)) ^ 0x88  # two's complement nibbles: (Q + 8) ^ 8 = Q mod 16
    lib.duq_dequant_nibbles(packed.contiguous().data_ptr(), rows, n_in // 2, n_in, scales.data_ptr(), groups, group, got.data_ptr(), 2)
    if not torch.equal(got, want):
        return "duq_dequant_nibbles differs from torch"
    block, h = 16, 8  # int4pack: (blocks, in, block / 2) bytes; lanes: row b low, row b + h high
    ub = u.view(rows // block, block, n_in).permute(0, 2, 1)  # (blocks, in, block)
    for lanes, lo, hi in ((1, ub[..., :h], ub[..., h:]), (0, ub[..., 0::2], ub[..., 1::2])):
        bytes_ = (lo | (hi << 4)).contiguous()
        st = scales.t().contiguous()
        out = torch.empty(n_in, rows, dtype=torch.bfloat16)
        lib.duq_dequant_int4pack(bytes_.data_ptr(), rows // block, n_in, block, lanes, st.data_ptr(), rows, group, out.data_ptr(), 2)
        if not torch.equal(out, want.t()):
            return f"duq_dequant_int4pack (lanes={lanes}) differs from torch"
    x = torch.randn(5, 70, generator=gen) * torch.logspace(-3, 2, 5)[:, None]
    x[2] = 0  # an all-zero token: the 1e-8 floor
    for dtype, clip, qa in ((torch.float32, 1.0, 127), (torch.bfloat16, 0.9, 7)):
        xd = x.to(dtype)
        xf = xd.float()
        m = xf.abs().amax(dim=1, keepdim=True)
        want_s = ((m if clip == 1 else m * clip) / qa).clamp(min=1e-8)
        want_q = (xf / want_s).round().clamp(-qa - 1, qa).to(torch.int8)
        q, st = torch.empty(5, 70, dtype=torch.int8), torch.empty(5)
        ptr = xd.data_ptr()
        lib.duq_quantize_tokens(ptr, int(dtype == torch.bfloat16), 5, 70, 70, 1, clip, qa, None, q.data_ptr(), st.data_ptr(), 2)
        if not (torch.equal(q, want_q) and torch.equal(st, want_s[:, 0])):
            return f"duq_quantize_tokens ({dtype}, clip {clip}) differs from torch"
        xt = xd.t().contiguous()  # (70, 5): the transposed form
        q.zero_()
        lib.duq_quantize_tokens_t(xt.data_ptr(), int(dtype == torch.bfloat16), 5, 70, 5, 1, clip, qa, None, q.data_ptr(), st.data_ptr(), 2)
        if not (torch.equal(q, want_q) and torch.equal(st, want_s[:, 0])):
            return f"duq_quantize_tokens_t ({dtype}, clip {clip}) differs from torch"
    return _check_transform(lib, gen) or _check_panels(lib, gen)


def _check_transform(lib: ctypes.CDLL, gen) -> str | None:
    """`duq_transform_quantize` (smoothing, permutation, one shared or per-block rotation with a short last block,
    none) against the float64 transform: every code within half a step (plus float32 roundoff) of x2 / s_t, every
    scale within float32 roundoff of float64's; an index outside the permutation refused. The first problem, or None."""
    import torch

    n, block, tokens = 70, 32, 6  # 3 blocks, the last short (70 = 2 x 32 + 6)
    x = torch.randn(tokens, n, generator=gen) * torch.logspace(-2, 2, tokens)[:, None]
    x[1] = 0  # an all-zero token: the 1e-8 floor
    perm, diag = torch.randperm(n, generator=gen), torch.rand(n, generator=gen) + 0.5
    for n_rot, use_diag in ((1, True), (3, False), (0, True)):
        rot = torch.linalg.qr(torch.randn(max(n_rot, 1), block, block, generator=gen, dtype=torch.float64))[0].float().contiguous()
        xp = (x.double() * (diag.double() if use_diag else 1))[:, perm]
        if n_rot:
            xp = torch.nn.functional.pad(xp, (0, 3 * block - n)).view(tokens, 3, block)
            x2 = torch.einsum("tbk,bkc->tbc", xp, rot.double().expand(3, block, block)).reshape(tokens, -1)[:, :n]
        else:
            x2 = xp
        want_s = (x2.abs().amax(dim=1) / 127).clamp(min=1e-8)
        q, st = torch.empty(tokens, n, dtype=torch.int8), torch.empty(tokens)
        status = lib.duq_transform_quantize(x.data_ptr(), tokens, n, n, diag.data_ptr() if use_diag else None, perm.data_ptr(),
                                            rot.data_ptr() if n_rot else None, n_rot, block, 1, 1.0, 127, None, q.data_ptr(), st.data_ptr(), 2)
        scale_ok = ((st.double() - want_s).abs() <= want_s * 2.0**-18).all()
        codes_ok = ((q.double() - x2 / st.double()[:, None]).abs() <= 0.5 + 1e-3).all()
        if status or not (scale_ok and codes_ok):
            return f"duq_transform_quantize ({n_rot} rotations, smoothing {use_diag}) differs from the float64 transform"
    bad = perm.clone()
    bad[5] = n
    if lib.duq_transform_quantize(x.data_ptr(), tokens, n, n, None, bad.data_ptr(), None, 0, block, 1, 1.0, 127, None,
                                  q.data_ptr(), st.data_ptr(), 2) != -2:
        return "duq_transform_quantize read a permutation index outside [0, n)"
    return None


# The panel products' float32 arithmetic (fused multiply-adds over groups) is not torch's op for op: it is checked
# against float64 within this many float32 unit roundoffs times the sum of |terms| (the kernels' bound is 1e-5).
PANELS_CHECK_ULPS = 64


def _check_panels(lib: ctypes.CDLL, gen) -> str | None:
    """`duq_w4a8_panels` and `duq_w8a8_panels` on codes and activations at their extremes, a short last group and
    two column blocks (in = 4100 > BLOCK_COLUMNS), against a float64 product; the first problem, or None."""
    import torch

    from interop.panels import to_panels

    cases = [(4, 32, 104, 32, 5), (4, 16, 4100, 32, 2), (4, 16, 64, 64, 1), (8, 32, 104, 104, 3), (8, 16, 4100, 4100, 2)]
    for bits, rows, n_in, group, tokens in cases:
        q = 2 ** (bits - 1)
        codes = torch.randint(-q, q, (rows, n_in), generator=gen, dtype=torch.int8)
        xq = torch.randint(-128, 128, (tokens, n_in), generator=gen, dtype=torch.int8)
        codes[0], codes[1], xq[0] = -q, q - 1, -128  # the int16 sums' extremes
        groups = -(-n_in // group)
        scales = torch.rand(rows, groups, generator=gen) * 3e-2 + 1e-4
        s_t = torch.rand(tokens, generator=gen) + 0.5
        per_code = scales.double().repeat_interleave(group, 1)[:, :n_in]
        want = (xq.double() @ (codes.double() * per_code).t()) * s_t.double()[:, None]
        bound = (xq.double().abs() @ (codes.double().abs() * per_code).t()) * s_t.double()[:, None] * PANELS_CHECK_ULPS * 2.0**-24
        panels, y = to_panels(codes, bits), torch.empty(tokens, rows)
        name = "duq_w4a8_panels" if bits == 4 else "duq_w8a8_panels"
        if getattr(lib, name)(xq.data_ptr(), s_t.data_ptr(), tokens, n_in, panels.data_ptr(), scales.data_ptr(), rows, group, y.data_ptr(), 2):
            return f"{name} could not allocate its scratch memory"
        if not bool(((y.double() - want).abs() <= bound).all()):
            return f"{name} ({rows} x {n_in}, groups of {group}, {tokens} tokens) differs from the float64 product"
    return None


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("DUQUANT_COMPILED", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by DUQUANT_COMPILED"
    if not SOURCE.is_file():
        return None, f"the source {SOURCE} is missing"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc)"
    path, why = _build(cc)
    if path is None:
        return None, f"building {SOURCE.name} failed: {why}"
    try:
        lib = _bind(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as e:
        return None, f"loading {path} failed: {e}"
    problem = _self_check(lib)
    if problem:
        return None, f"{path} failed its check: {problem}"
    return lib, None


def load() -> ctypes.CDLL | None:
    """The bound library, built and checked on first call (once per process), or None (see `unavailable`)."""
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                _STATE["lib"], _STATE["why"] = _load()
    return _STATE["lib"]  # type: ignore[return-value]


def unavailable() -> str | None:
    """Why the compiled helpers cannot be used here, or None when they can."""
    load()
    return _STATE["why"]  # type: ignore[return-value]


def forget() -> None:
    """Drops this process's verdict, so that the next `load()` looks again (tests; after changing the environment)."""
    with _LOCK:
        _STATE.clear()
