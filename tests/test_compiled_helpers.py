"""interop.compiled: the C dequantizer and per-token quantizer give torch's bits, are checked before every
call, and are left out cleanly when they cannot be built.

Calls into the compiled library run in a subprocess: a crash fails the test instead of ending the run.
"""

from __future__ import annotations

import os

import pytest
import torch

from interop import compiled, native
from interop.qweight import QuantizedWeight
from helpers import run_child

needs_library = pytest.mark.skipif(compiled.load() is None, reason=f"compiled helpers unavailable: {compiled.unavailable()}")


# Weights: (out, in, bits, group, layout). The int4pack cases include a short last block (80 = 64 + 16 rows
# with blocks of 64) and one group per row; nibbles an odd `in` and a partial last group.
TILE_CASES = [
    (128, 256, 4, 128, "int4pack"),
    (80, 96, 4, 32, "int4pack"),
    (96, 128, 4, None, "int4pack"),
    (48, 77, 4, 32, "nibbles"),
    (33, 64, 3, None, "nibbles"),
    (40, 100, 8, 32, "int8"),
    (24, 64, 6, None, "int8"),
]


@needs_library
def test_compiled_tiles_and_products_equal_torch_ops_bit_for_bit():
    """Every tile the C dequantizer makes equals `bf16(Q * bf16(s))` (groups) or `bf16(Q)` (per row) in natural
    order, for every row range the kernels use; the dequant-bf16 product with the helpers stays within the
    path's bound of the float32 oracle and equals the product made with torch-op tiles."""
    got = run_child(
        f"""
        import json, torch
        from interop import kernels
        from interop.kernels import ActQuant, kernel_options, quantized_matmul
        from interop.qweight import QuantizedWeight
        out = {{}}
        for case in {TILE_CASES!r}:
            n_out, n_in, bits, group, layout = case
            g = torch.Generator().manual_seed(n_out * 1000 + n_in)
            lo = -(2 ** (bits - 1))
            codes = torch.randint(lo, -lo, (n_out, n_in), generator=g, dtype=torch.int8)
            shape = (n_out,) if group is None else (n_out, -(-n_in // group))
            w = QuantizedWeight(codes, torch.rand(shape, generator=g) * 0.02 + 1e-4, bits=bits, group_size=group, layout=layout)
            assert w.layout == layout, (case, w.layout)
            s = w.scales_2d().to(torch.bfloat16).float()
            want = codes.float() if group is None else codes.float() * s.repeat_interleave(group, 1)[:, :n_in]
            want = want.to(torch.bfloat16)
            ok = True
            for rows in (16, 64, 1000):
                for r0, r1 in w.row_tiles(rows):
                    tile, info = w.float_tile(r0, r1, torch.bfloat16, compiled=True)
                    ok &= info.lanes == 0 and not info.split and torch.equal(tile, want[r0:r1].t())
            x = torch.randn(37, n_in, generator=g)
            act = ActQuant("dynamic-token", 8)
            oracle = quantized_matmul(x, w, act, path="fake-quant").double()
            scale = (kernels.fake_quantize(x, act).abs().double() @ w.dequantize().abs().double().t()).clamp(min=1e-30)
            for dtype in (torch.float32, torch.bfloat16):
                with kernel_options(compiled=True):
                    y = quantized_matmul(x.to(dtype), w, act, path="dequant-bf16")
                with kernel_options(compiled=False):
                    y_plain = quantized_matmul(x.to(dtype), w, act, path="dequant-bf16")
                err = ((y.double() - oracle).abs() / scale).max().item()
                out[f"{{case}} {{dtype}} err"] = err
                out[f"{{case}} {{dtype}} vs plain"] = ((y.double() - y_plain.double()).abs() / scale).max().item()
            out[str(case)] = bool(ok)
        print(json.dumps(out))
        """
    )
    for case in TILE_CASES:
        assert got[str(case)], f"compiled tile differs from torch's for {case}"
        for dtype in ("torch.float32", "torch.bfloat16"):
            assert got[f"{case} {dtype} err"] <= 2e-2, (case, dtype, got[f"{case} {dtype} err"])
            # one tile either way at these sizes: the same GEMM on the same bits
            assert got[f"{case} {dtype} vs plain"] == 0, (case, dtype, got[f"{case} {dtype} vs plain"])


QUANT_CASES = [  # (tokens, n, dtype, scheme, bits, clip, row stride, transposed: x = (rows of tokens)ᵀ)
    (7, 100, "float32", "dynamic-token", 8, 1.0, 100, False),
    (7, 100, "bfloat16", "dynamic-token", 8, 0.85, 100, False),
    (300, 257, "float32", "dynamic-token", 4, 1.0, 300, False),
    (300, 257, "bfloat16", "dynamic-token", 8, 1.0, 257, False),
    (5, 64, "float32", "static-tensor", 8, 1.0, 64, False),
    (1, 2048, "bfloat16", "dynamic-token", 8, 0.9, 2048, False),
    (300, 257, "bfloat16", "dynamic-token", 8, 1.0, 300, True),
    (70, 130, "float32", "dynamic-token", 8, 0.9, 80, True),
    (65, 64, "float32", "static-tensor", 8, 1.0, 65, True),
]


@needs_library
def test_compiled_quantize_tokens_equals_torch_ops():
    """Codes and scales of the C per-token quantizer equal the torch ops' for float32 and bfloat16, clipped and
    not, 4- and 8-bit, static scales, rows further apart than their length, transposed inputs (partial
    chunks of tokens and tiles of channels), all-zero and huge tokens."""
    got = run_child(
        f"""
        import json, torch
        from interop.kernels import ActQuant, kernel_options, quantize_tokens
        out = {{}}
        for case in {QUANT_CASES!r}:
            tokens, n, dtype, scheme, bits, clip, ld, transposed = case
            g = torch.Generator().manual_seed(tokens + n)
            if transposed:
                base = torch.randn(n, ld, generator=g) * torch.logspace(-4, 3, ld)[None, :]
                x = base.to(getattr(torch, dtype))[:, :tokens].t()
                assert x.stride(0) == 1 and x.stride(1) == ld
            else:
                base = torch.randn(tokens, ld, generator=g) * torch.logspace(-4, 3, tokens)[:, None]
                x = base[:, :n].to(getattr(torch, dtype))
            if tokens > 2:
                x[1] = 0
            act, scale = ActQuant(scheme, bits, clip), torch.tensor([0.037])
            with kernel_options(compiled=False):
                want = quantize_tokens(x, act, scale)
            with kernel_options(compiled=True):
                got = quantize_tokens(x, act, scale)
            out[str(case)] = torch.equal(got[0], want[0]) and torch.equal(got[1].reshape(-1), want[1].reshape(-1).expand(tokens).float())
        print(json.dumps(out))
        """
    )
    for case in QUANT_CASES:
        assert got[str(case)], f"compiled quantize_tokens differs from torch's for {case}"


def test_native_dequant_refuses_bad_operands_by_name():
    """Wrong row ranges, shapes, dtypes and strides are refused before the C code runs, naming the operand."""
    g = torch.Generator().manual_seed(0)
    w = QuantizedWeight(torch.randint(-8, 8, (128, 64), generator=g, dtype=torch.int8), torch.rand(128, 2, generator=g) + 0.1,
                        bits=4, group_size=32, layout="nibbles")
    scales = torch.rand(128, 2)
    out = torch.empty(128, 64, dtype=torch.bfloat16)
    with pytest.raises(native.NativeKernelError, match="layout must be"):
        native.dequant_rows(w.qdata, "int4", 64, scales, 32, out)
    with pytest.raises(native.NativeKernelError, match="codes must have 32 columns"):
        native.dequant_rows(w.qdata[:, :16].contiguous(), "nibbles", 64, scales, 32, out)
    with pytest.raises(native.NativeKernelError, match="scales must have shape"):
        native.dequant_rows(w.qdata, "nibbles", 64, scales[:, :1].contiguous(), 32, out)
    with pytest.raises(native.NativeKernelError, match="out must be torch.bfloat16"):
        native.dequant_rows(w.qdata, "nibbles", 64, scales, 32, out.float())
    with pytest.raises(native.NativeKernelError, match="out must be contiguous"):
        native.dequant_rows(w.qdata, "nibbles", 64, scales, 32, torch.empty(64, 128, dtype=torch.bfloat16).t())
    with pytest.raises(native.NativeKernelError, match="group must be a positive int"):
        native.dequant_rows(w.qdata, "nibbles", 64, scales, 0, out)
    packed = torch.zeros(128, 32, dtype=torch.uint8)
    st = torch.rand(2, 128)
    tile = torch.empty(64, 64, dtype=torch.bfloat16)
    with pytest.raises(native.NativeKernelError, match="must start a block of 64"):
        native.dequant_int4pack(packed, 64, 32, 96, ("lanes", 64), st, 32, tile)
    with pytest.raises(native.NativeKernelError, match="must start a block of 64"):
        native.dequant_int4pack(packed, 64, 0, 129, ("lanes", 64), st, 32, tile)
    with pytest.raises(native.NativeKernelError, match="must end a block of 64 or the weight"):
        native.dequant_int4pack(packed, 64, 0, 32, ("lanes", 64), st, 32, tile)
    with pytest.raises(native.NativeKernelError, match="scales_t must have shape"):
        native.dequant_int4pack(packed, 64, 0, 64, ("lanes", 64), st.t().contiguous(), 32, tile)
    with pytest.raises(native.NativeKernelError, match="qdata must have in_features / 2"):
        native.dequant_int4pack(packed, 80, 0, 64, ("lanes", 64), st, 32, tile)


def test_native_quantize_tokens_refuses_bad_operands_by_name():
    x = torch.randn(4, 16)
    with pytest.raises(native.NativeKernelError, match="float32 or bfloat16"):
        native.quantize_tokens(x.half(), True, 1.0, 127, None)
    with pytest.raises(native.NativeKernelError, match="must be row-major or a transposed row-major"):
        native.quantize_tokens(torch.randn(8, 16)[::2, ::2], True, 1.0, 127, None)
    with pytest.raises(native.NativeKernelError, match="qa must be an int in 1..127"):
        native.quantize_tokens(x, True, 1.0, 128, None)
    with pytest.raises(native.NativeKernelError, match="one-element scale"):
        native.quantize_tokens(x, False, 1.0, 127, torch.ones(2))


def test_compiled_helpers_left_out_when_disabled_or_unbuildable(tmp_path):
    """`DUQUANT_COMPILED=0` and a compiler that fails both leave the library out with the reason, and the
    kernels still compute the same product with torch ops; nothing half-built stays in the cache folder."""
    probe = """
        import json, torch
        from interop import compiled
        from interop.kernels import ActQuant, quantized_matmul
        from interop.qweight import QuantizedWeight
        g = torch.Generator().manual_seed(0)
        w = QuantizedWeight(torch.randint(-8, 8, (64, 64), generator=g, dtype=torch.int8), torch.rand(64, 2, generator=g) + 0.1,
                            bits=4, group_size=32)
        y = quantized_matmul(torch.randn(3, 64, generator=g), w, ActQuant("dynamic-token", 8), path="dequant-bf16")
        print(json.dumps({"why": compiled.unavailable(), "finite": bool(torch.isfinite(y).all()), "y": y.sum().item()}))
    """
    off = run_child(probe, {"DUQUANT_COMPILED": "0"})
    assert off["why"] == "disabled by DUQUANT_COMPILED" and off["finite"]
    broken = run_child(probe, {"CC": "false", "DUQUANT_COMPILED_DIR": str(tmp_path)})
    assert broken["why"].startswith("building duquant_kernels.c failed") and "exited with 1" in broken["why"], broken["why"]
    assert broken["y"] == off["y"]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a failed build left files behind"


@needs_library
def test_compiled_library_is_built_once_and_reused(tmp_path):
    """A fresh cache folder gets one library; a second process loads it without rebuilding (same file, same mtime)."""
    probe = """
        import json
        from interop import compiled
        lib = compiled.load()
        print(json.dumps({"path": lib._name if lib is not None else None, "why": compiled.unavailable()}))
    """
    first = run_child(probe, {"DUQUANT_COMPILED_DIR": str(tmp_path)})
    assert first["why"] is None and first["path"].startswith(str(tmp_path)), first
    stamp = os.stat(first["path"]).st_mtime_ns
    second = run_child(probe, {"DUQUANT_COMPILED_DIR": str(tmp_path)})
    assert second["path"] == first["path"] and os.stat(first["path"]).st_mtime_ns == stamp
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 1


def test_compiled_option_is_validated():
    from interop.kernels import KernelOptions

    with pytest.raises(ValueError, match="compiled must be a bool; got 'yes'"):
        KernelOptions(compiled="yes")

