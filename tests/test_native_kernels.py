"""interop.native: every native kernel call checks its preconditions; operands that crash torch's kernels
(bench/native_preconditions.md) are copied (activations) or refused by name (weight state), never passed on.

The probes run in a subprocess: a crash fails the test instead of ending the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from interop import native

# Offsets in bytes from an aligned buffer; 2, 4, 8, 16 and 48 crash torch 2.13's _weight_int8pack_mm
# for the bfloat16 input, 1, 2, 4 and 8 for the int8 weight (measured, bench/native_preconditions.md).
OFFSETS = (0, 2, 4, 8, 16, 32, 48)

PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from interop import native

    def at(src, off):
        nbytes = src.numel() * src.element_size()
        base = torch.empty(nbytes + 256, dtype=torch.uint8)
        start = (-base.data_ptr()) % 64 + off
        return base[start:start + nbytes].view(src.dtype).view(src.shape).copy_(src)

    g = torch.Generator().manual_seed(0)
    m, k, n = 7, 256, 128
    x = torch.randn(m, k, generator=g).bfloat16()
    w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) + 0.5).bfloat16()
    w4 = native.convert_weight_to_int4pack(torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32))
    sz = torch.zeros(k // 128, n, 2, dtype=torch.bfloat16); sz[..., 0] = 1
    xi = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    want8 = native.weight_int8pack_mm(x, w8, s)
    want4 = native.weight_int4pack_mm(x, w4, 128, sz)
    want_mm = native.int_mm(xi, w8.t(), torch.empty(m, n, dtype=torch.int32))
    out = {}
    for off in OFFSETS:
        out[f"int8pack x {off}"] = torch.equal(native.weight_int8pack_mm(at(x, off), w8, s), want8)
        out[f"int8pack s {off}"] = torch.equal(native.weight_int8pack_mm(x, w8, at(s, off)), want8)
        out[f"int4pack x {off}"] = torch.equal(native.weight_int4pack_mm(at(x, off), w4, 128, sz), want4)
        out[f"int_mm a {off}"] = torch.equal(native.int_mm(at(xi, off), w8.t(), torch.empty(m, n, dtype=torch.int32)), want_mm)
        for kernel, call in (("int8pack", lambda w: native.weight_int8pack_mm(x, w, s)), ("int4pack", lambda w: native.weight_int4pack_mm(x, w, 128, sz))):
            w = at(w8 if kernel == "int8pack" else w4, off)
            try:
                y = call(w)
                out[f"{kernel} w {off}"] = "ran" if off % 64 == 0 and torch.equal(y, want8 if kernel == "int8pack" else want4) else "ran wrongly"
            except native.NativeKernelError as e:
                out[f"{kernel} w {off}"] = "refused" if "w must start on a 64-byte boundary" in str(e) else str(e)
    print(json.dumps(out))
    """
).replace("OFFSETS", repr(OFFSETS))


@pytest.fixture(scope="module")
def probe() -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the probe process failed (return code {proc.returncode}):\n{proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("operand", ["int8pack x", "int8pack s", "int4pack x", "int_mm a"])
def test_unaligned_activations_are_copied_and_give_the_same_product(probe, operand):
    assert all(probe[f"{operand} {off}"] is True for off in OFFSETS), {off: probe[f"{operand} {off}"] for off in OFFSETS}


@pytest.mark.parametrize("kernel", ["int8pack", "int4pack"])
def test_unaligned_weight_state_is_refused_by_name_not_passed_on(probe, kernel):
    assert probe[f"{kernel} w 0"] == "ran"
    assert all(probe[f"{kernel} w {off}"] == "refused" for off in OFFSETS if off), {off: probe[f"{kernel} w {off}"] for off in OFFSETS}


def test_aligned_copies_only_what_needs_it():
    t = torch.arange(64, dtype=torch.int8)
    assert native.aligned(t) is t or not native.is_aligned(t)
    view = torch.empty(200, dtype=torch.uint8)[3:131]
    copy = native.aligned(view)
    assert native.is_aligned(copy) and torch.equal(copy, view) and copy.data_ptr() != view.data_ptr()
    strided = torch.randn(8, 8)[:, ::2]
    assert native.aligned(strided).is_contiguous() and torch.equal(native.aligned(strided), strided)
    state = native.aligned_state({"a": view, "b": t, "n": 3})
    assert native.is_aligned(state["a"]) and state["n"] == 3


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: native.weight_int8pack_mm(torch.zeros(2, 24, dtype=torch.bfloat16), torch.zeros(16, 24, dtype=torch.int8), torch.ones(16, dtype=torch.bfloat16)), "multiple of 16.*got 24"),
        (lambda: native.weight_int8pack_mm(torch.zeros(2, 32), torch.zeros(16, 32, dtype=torch.int8), torch.ones(16, dtype=torch.bfloat16)), "x must be torch.bfloat16; got torch.float32"),
        (lambda: native.weight_int8pack_mm(torch.zeros(2, 32, dtype=torch.bfloat16), torch.zeros(16, 32, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16)), r"scales must have shape \(16,\)"),
        (lambda: native.weight_int8pack_mm(torch.zeros(2, 48, dtype=torch.bfloat16), torch.zeros(16, 32, dtype=torch.int8), torch.ones(16, dtype=torch.bfloat16)), "x must have 32 columns"),
        (lambda: native.weight_int4pack_mm(torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(16, 32, dtype=torch.uint8), 16, torch.zeros(4, 16, 2, dtype=torch.bfloat16)), "group must be one of"),
        (lambda: native.weight_int4pack_mm(torch.zeros(2, 96, dtype=torch.bfloat16), torch.zeros(16, 48, dtype=torch.uint8), 64, torch.zeros(1, 16, 2, dtype=torch.bfloat16)), "96 must be a multiple of the group 64"),
        (lambda: native.weight_int4pack_mm(torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(8, 32, dtype=torch.uint8), 32, torch.zeros(2, 8, 2, dtype=torch.bfloat16)), "multiple of 16; got 8"),
        (lambda: native.int_mm(torch.zeros(2, 8, dtype=torch.int8), torch.zeros(9, 4, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int32)), "b must have 8 rows"),
        (lambda: native.int_mm(torch.zeros(2, 8, dtype=torch.int8), torch.zeros(8, 4, dtype=torch.int8), torch.zeros(2, 4)), "out must be torch.int32"),
        (lambda: native.convert_weight_to_int4pack(torch.full((16, 32), 16, dtype=torch.int32)), r"\[0, 15\]; got range \[16, 16\]"),
        (lambda: native.available("nope"), "unknown native kernel 'nope'"),
    ],
)
def test_bad_operands_are_named_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
