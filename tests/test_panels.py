"""The "panels" layout and the compiled integer product on it (`c-int8`, 4- and 8-bit codes): the layout holds the codes exactly, the
product stays within the float32 paths' bound of a float64 oracle, the operands are checked before the C code
runs, and `layout="auto"` takes panels only where the product is built and int8 dot products are emulated.

Bounds: `c-int8` sums codes exactly in int32 and applies the scales in float32 (a fused multiply-add per group,
then `* s_t`), so it must agree with the float64 product of the same integer activations and codes to 1e-5 of
`|x3| @ |W_hat|ᵀ` per element (interop/kernels.py's bound for the float32 paths; measured here: <= 2e-7).
Calls into the compiled product that are not already made by the library's own check run in a subprocess: a
crash fails the test instead of ending the run.
"""

from __future__ import annotations

import pytest
import torch

from interop import compiled, kernel_tuning, native
from interop.panels import PANEL_ROWS
from interop.qweight import QuantizedWeight, pack_nibbles, panels_unavailable
from helpers import run_child

PRODUCT_BOUND = 1e-5
needs_product = pytest.mark.skipif(
    panels_unavailable(16, 16, 4, torch.device("cpu")) is not None,
    reason=f"the compiled panel product is unavailable: {panels_unavailable(16, 16, 4, torch.device('cpu'))}",
)


# (out, in, bits, group): a single panel, several, a short last group, groups of 4 (the smallest), one scale per
# row, 2- and 3-bit codes (held as 4-bit nibbles), in = 4100 (two column blocks of the C product); 8-bit codes per
# row (the w8a8 preset), in groups with a short last one, 6-bit codes, and one 4100-column row sum.
CASES = [(16, 4, 4, None), (48, 100, 4, 32), (160, 640, 4, 32), (32, 96, 4, 4), (64, 256, 4, None), (32, 64, 2, 16),
         (16, 48, 3, None), (32, 4100, 4, 32), (16, 4, 8, None), (48, 100, 8, 32), (64, 640, 8, None), (32, 96, 6, None),
         (16, 4100, 8, None)]


def _weight(out: int, n_in: int, bits: int, group: int | None, seed: int, layout: str = "panels") -> tuple[QuantizedWeight, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = torch.randint(lo, hi, (out, n_in), generator=gen, dtype=torch.int8)
    codes[0], codes[-1] = lo, hi - 1  # the extremes of the code range
    shape = (out,) if group is None else (out, -(-n_in // group))
    scales = torch.rand(shape, generator=gen) * 0.02 + 1e-4
    return QuantizedWeight(codes, scales, bits=bits, group_size=group, layout=layout), codes


@pytest.mark.parametrize("out,n_in,bits,group", CASES)
def test_panels_layout_holds_the_codes_exactly(out, n_in, bits, group):
    """codes(), rows(ids), every code tile, the canonical state and a reload into another layout give back the
    codes the weight was made from."""
    w, codes = _weight(out, n_in, bits, group, seed=out + n_in)
    assert w.layout == "panels" and tuple(w.qdata.shape) == (out, n_in // 2 if bits <= 4 else n_in)
    assert torch.equal(w.codes(), codes)
    ids = torch.tensor([0, out - 1, out // 2, 7, 8, min(15, out - 1)])
    assert torch.equal(w.rows(ids), w.dequantize()[ids])
    for r0, r1 in w.row_tiles(32):
        assert r0 % PANEL_ROWS == 0 and r1 % PANEL_ROWS == 0
        tile = w.code_tile(r0, r1)
        assert torch.equal(tile.b.to(torch.int16) - tile.offset, codes[r0:r1].t().to(torch.int16))
    state = w.state_dict()
    assert torch.equal(state["codes"], pack_nibbles(codes) if bits <= 4 else codes)
    other = QuantizedWeight(torch.zeros_like(codes), torch.ones_like(w.scales), bits=bits, group_size=group,
                            layout="nibbles" if bits <= 4 else "int8")
    other.load_state_dict(state)
    assert torch.equal(other.codes(), codes)
    back = QuantizedWeight(torch.zeros_like(codes), torch.ones_like(w.scales), bits=bits, group_size=group, layout="panels")
    back.load_state_dict(other.state_dict())
    assert torch.equal(back.qdata, w.qdata)


def test_panels_layout_refuses_what_it_cannot_hold_by_name():
    codes = torch.zeros(24, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"layout 'panels' is unavailable: panels need out % 16 == 0 and in % 4 == 0; the weight is 24 x 64"):
        QuantizedWeight(codes, torch.ones(24), bits=4, layout="panels", name="q")
    with pytest.raises(ValueError, match=r"panels need out % 16 == 0 and in % 4 == 0; the weight is 16 x 66"):
        QuantizedWeight(torch.zeros(16, 66, dtype=torch.int8), torch.ones(16), bits=4, layout="panels")
    with pytest.raises(ValueError, match=r"panels need out % 16 == 0 and in % 4 == 0; the weight is 16 x 30"):
        QuantizedWeight(torch.zeros(16, 30, dtype=torch.int8), torch.ones(16), bits=8, layout="panels")


def test_panels_move_off_the_cpu_as_nibbles_and_relayout_round_trips():
    w, codes = _weight(48, 100, 4, 32, seed=1)
    w.relayout("nibbles")
    assert w.layout == "nibbles" and torch.equal(w.codes(), codes)
    w.relayout("panels")
    assert w.layout == "panels" and torch.equal(w.codes(), codes)
    meta = w.to("meta")  # a non-CPU device: the CPU-only layouts become nibbles
    assert meta.layout == "nibbles" and meta.qdata.device.type == "meta"


@needs_product
def test_c_w4a8_product_is_within_the_float32_bound_of_the_float64_oracle():
    """Every case, tokens in every bucket (remainders of the 3-token register block too), dynamic per-token and
    static per-tensor activations, float32 and bfloat16 inputs (bfloat16: the float32 product rounded once);
    also equal, within the same bound, to `int-mm` on the same codes."""
    got = run_child(
        f"""
        import json, torch
        from interop import native
        from interop.kernels import ActQuant, kernel_options, quantize_tokens, quantized_matmul
        from interop.qweight import QuantizedWeight
        worst, vs_int_mm, bf16_equal, paths = 0.0, 0.0, True, set()
        for i, (out, n_in, bits, group) in enumerate({CASES!r}):
            gen = torch.Generator().manual_seed(i)
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
            codes = torch.randint(lo, hi, (out, n_in), generator=gen, dtype=torch.int8)
            codes[0], codes[-1] = lo, hi - 1
            shape = (out,) if group is None else (out, -(-n_in // group))
            w = QuantizedWeight(codes, torch.rand(shape, generator=gen) * 0.02 + 1e-4, bits=bits, group_size=group, layout="panels")
            per_code = w.code_scales(0, out).double()
            for act in (ActQuant("dynamic-token", 8), ActQuant("static-tensor", 8), ActQuant("dynamic-token", 4, clip=0.9)):
                scale = torch.tensor([0.02]) if act.scheme == "static-tensor" else None
                for tokens in (1, 2, 3, 5, 16, 67):
                    x = torch.randn(tokens, n_in, generator=gen) * 3
                    xq, s_t = quantize_tokens(x, act, scale)
                    want = (xq.double() @ (codes.double() * per_code).t()) * s_t.double()
                    den = (xq.double().abs() @ (codes.double().abs() * per_code).t()) * s_t.double()
                    with kernel_options(path="c-int8"):
                        y = quantized_matmul(x, w, act, scale)
                        yb = quantized_matmul(x.to(torch.bfloat16), w, act, scale)
                    paths.add(w.last_path)
                    worst = max(worst, ((y.double() - want).abs() / den.clamp(min=1e-30)).max().item())
                    xqb, s_tb = quantize_tokens(x.to(torch.bfloat16), act, scale)  # bfloat16: the float32 product, rounded
                    yf = native.int8_panels(xqb, s_tb, w.qdata, bits, w.scales_2d(), w.effective_group, torch.empty(tokens, out))
                    bf16_equal &= yb.dtype == torch.bfloat16 and torch.equal(yb, yf.to(torch.bfloat16))
                    with kernel_options(path="int-mm"):
                        yi = quantized_matmul(x, w, act, scale)
                    vs_int_mm = max(vs_int_mm, ((y.double() - yi.double()).abs() / den.clamp(min=1e-30)).max().item())
        print(json.dumps(dict(worst=worst, vs_int_mm=vs_int_mm, bf16_equal=bf16_equal, paths=sorted(paths))))
        """
    )
    assert got["paths"] == ["c-int8"]
    assert got["worst"] <= PRODUCT_BOUND, got
    assert got["vs_int_mm"] <= 2 * PRODUCT_BOUND, got
    assert got["bf16_equal"], got


@needs_product
def test_c_product_of_a_token_is_bit_identical_whatever_the_tokens_beside_it():
    """The C product lays out each panel's scales per call in one of two ways (a thread's own buffer when all
    tokens fit one token block, one shared buffer per column block otherwise) and splits the columns into blocks
    only for many activations; the float sums run in the same order either way. So a token's output row is the
    same bits alone, among 3 or 40 tokens (one token block) and among 67 (two, column blocks too)."""
    got = run_child(
        f"""
        import json, torch
        from interop import native
        from interop.panels import to_panels
        same = []
        for i, (out, n_in, bits, group) in enumerate([(64, 4100, 4, 32), (48, 2048, 4, 32), (32, 640, 8, 32), (32, 4100, 8, None)]):
            gen = torch.Generator().manual_seed(40 + i)
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
            codes = torch.randint(lo, hi, (out, n_in), generator=gen, dtype=torch.int8)
            groups = 1 if group is None else -(-n_in // group)
            scales = native.aligned(torch.rand(out, groups, generator=gen) * 0.02 + 1e-4)
            panels = native.aligned(to_panels(codes, bits))
            xq = torch.randint(-128, 128, (67, n_in), generator=gen, dtype=torch.int8)
            s_t = torch.rand(67, 1, generator=gen) + 0.5
            run = lambda a, b: native.int8_panels(xq[a:b].contiguous(), s_t[a:b].contiguous(), panels, bits, scales,
                                                  group or n_in, torch.empty(b - a, out))
            full = run(0, 67)
            parts = [run(t, t + 1) for t in range(0, 67, 11)] + [run(0, 3), run(20, 60)]
            rows = [full[t:t + 1] for t in range(0, 67, 11)] + [full[0:3], full[20:60]]
            same.append(all(torch.equal(p.view(torch.int32), r.view(torch.int32)) for p, r in zip(parts, rows)))
        print(json.dumps(dict(same=same)))
        """
    )
    assert got["same"] == [True] * 4, got


@needs_product
def test_native_int8_panels_refuses_bad_operands_by_name():
    """Every operand the C product would walk is checked first: dtype, shape, layout facts, contiguity, alignment,
    and the int32 bound of 8-bit codes."""
    w, _ = _weight(32, 64, 4, 32, seed=3)
    xq, s_t = torch.zeros(5, 64, dtype=torch.int8), torch.ones(5, 1)
    y = torch.empty(5, 32)
    scales = w.scales_2d()
    native.int8_panels(xq, s_t, w.qdata, 4, scales, 32, y)  # the good call
    misaligned = torch.empty(32 * 32 + 1, dtype=torch.uint8)[1:].view(32, 32)
    bad = [
        (dict(xq=xq.float()), "xq must be torch.int8"),
        (dict(xq=torch.zeros(5, 62, dtype=torch.int8)), "in must be a positive multiple of 4; got 62"),
        (dict(xq=torch.zeros(5, 128, dtype=torch.int8)[:, ::2]), "xq must be contiguous"),
        (dict(panels=w.qdata[:24]), "out_features must be a positive multiple of 16; got 24"),
        (dict(panels=torch.zeros(32, 16, dtype=torch.uint8)), "panels must have in / 2 = 32 columns; got 16"),
        (dict(panels=misaligned), "panels must start on a 64-byte boundary"),
        (dict(group=6), "group must be a positive multiple of 4; got 6"),
        (dict(group=16), r"scales must have shape \(32, 4\); got \(32, 2\)"),
        (dict(s_t=torch.ones(4, 1)), "s_t must hold 5 contiguous scales"),
        (dict(s_t=torch.ones(5, 1, dtype=torch.float64)), "s_t must be a float32 CPU tensor"),
        (dict(out=torch.empty(5, 16)), r"out must have shape \(5, 32\); got \(5, 16\)"),
        (dict(out=torch.empty(5, 32, dtype=torch.bfloat16)), "out must be torch.float32"),
        (dict(bits=8), "panels must have in = 64 columns; got 32"),
        (dict(bits=9), "bits must be an int in 2..8; got 9"),
    ]
    for change, match in bad:
        args = {**dict(xq=xq, s_t=s_t, panels=w.qdata, bits=4, scales=scales, group=32, out=y), **change}
        with pytest.raises(native.NativeKernelError, match=match):
            native.int8_panels(**args)
    wide = torch.zeros(1, 65540, dtype=torch.int8)  # one 8-bit row sum over 65540 columns could pass int32
    with pytest.raises(native.NativeKernelError, match="8-bit codes need groups of at most 65536 columns"):
        native.int8_panels(wide, torch.ones(1), native.aligned(torch.zeros(16, 65540, dtype=torch.uint8)), 8,
                           torch.ones(16, 1), 65540, torch.empty(1, 16))


@needs_product
def test_bound_panel_product_checks_the_weight_once_and_the_activations_every_call_by_name():
    """`native.PanelsProduct` (the c-int8 path's per-call door) equals `int8_panels`; bad activations and a weight
    changed in place since it was bound are refused by name, never passed to the C code."""
    w, _ = _weight(32, 64, 4, 32, seed=6)
    product = native.PanelsProduct(w.qdata, 4, w.scales_2d(), 32, 64)
    gen = torch.Generator().manual_seed(6)
    xq, s_t = torch.randint(-128, 128, (5, 64), generator=gen, dtype=torch.int8), torch.rand(5, 1, generator=gen)
    want = native.int8_panels(xq, s_t, w.qdata, 4, w.scales_2d(), 32, torch.empty(5, 32))
    assert torch.equal(product(xq, s_t), want)
    assert product(xq[:0], s_t[:0]).shape == (0, 32)
    bad = [
        ((xq.float(), s_t), "xq must be torch.int8"),
        ((torch.zeros(5, 60, dtype=torch.int8), s_t), "panels must have in / 2 = 30 columns; got 32"),
        ((torch.zeros(5, 128, dtype=torch.int8)[:, ::2], s_t), "xq must be contiguous"),
        ((xq, torch.ones(4, 1)), "s_t must hold 5 contiguous scales"),
        ((xq, torch.ones(5, 1, dtype=torch.float64)), "s_t must be a float32 CPU tensor"),
    ]
    for args, match in bad:
        with pytest.raises(native.NativeKernelError, match=match):
            product(*args)
    with pytest.raises(native.NativeKernelError, match="group must be a positive multiple of 4; got 6"):
        native.PanelsProduct(w.qdata, 4, w.scales_2d(), 6, 64)
    codes = w.qdata
    codes.resize_(16, 32)  # the bound weight shrunk in place: same storage, fewer rows than bound
    with pytest.raises(native.NativeKernelError, match=r"scales must have shape \(16, 2\); got \(32, 2\)"):
        product(xq, s_t)


@needs_product
def test_bound_products_are_not_carried_by_copies_or_pickles():
    """A weight's bound c-int8 product is a derived cache: `copy.deepcopy` and pickling rebuild it for the copy's own
    tensors (a bound product holds a C function pointer, which cannot be pickled)."""
    import copy
    import io

    from interop.kernels import ActQuant, kernel_options, quantized_matmul

    w, _ = _weight(32, 64, 4, 32, seed=7)
    act, x = ActQuant("dynamic-token", 8), torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    with kernel_options(path="c-int8"):
        want = quantized_matmul(x, w, act)
        assert "c-int8" in w._derived
        twin = copy.deepcopy(w)
        buf = io.BytesIO()
        torch.save(w, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for other in (twin, loaded):
            assert "c-int8" not in other._derived
            assert torch.equal(quantized_matmul(x, other, act), want)
            assert other._derived["c-int8"].panels is other.qdata


@needs_product
def test_c_w4a8_is_offered_only_for_integer_activations_on_panels():
    from interop.kernels import ActQuant, unavailable

    w, _ = _weight(32, 64, 4, 32, seed=4)
    assert unavailable("c-int8", w, ActQuant("dynamic-token", 8), torch.float32, 16) is None
    assert "needs integer activations" in unavailable("c-int8", w, ActQuant("none"), torch.float32, 16)
    assert "needs integer activations" in unavailable("c-int8", w, ActQuant("dynamic-group", 8, group=32), torch.float32, 16)
    nib, _ = _weight(32, 64, 4, 32, seed=4, layout="nibbles")
    assert "needs the 'panels' layout" in unavailable("c-int8", nib, ActQuant("dynamic-token", 8), torch.float32, 16)
    odd, _ = _weight(32, 66 - 2, 4, 2, seed=5)  # groups of 2 columns
    assert "scale groups of a multiple of 4" in unavailable("c-int8", odd, ActQuant("dynamic-token", 8), torch.float32, 16)


@needs_product
@pytest.mark.parametrize(
    "flags,integer_acts,want",
    [
        ({"avx2", "fma"}, True, "panels"),  # int8 dot products emulated: the compiled product
        ({"avx2", "fma", "avx512_vnni"}, True, "int4pack"),  # torch's int8 GEMM is native: keep its layout
        ({"avx2", "fma"}, False, "int4pack"),  # float activations: the product does not apply
        (set(), True, "int4pack"),  # flags unreadable: nothing assumed missing
    ],
)
def test_auto_layout_takes_panels_only_where_int8_dot_products_are_emulated(monkeypatch, flags, integer_acts, want):
    from interop.qweight import int4pack_variant

    if want == "int4pack" and int4pack_variant() is None:
        want = "nibbles"
    monkeypatch.setattr(kernel_tuning, "cpu_info", lambda: ("test cpu", frozenset(flags)))
    w = QuantizedWeight(torch.zeros(32, 64, dtype=torch.int8), torch.ones(32, 2), bits=4, group_size=32, integer_acts=integer_acts)
    assert w.layout == want
    w8 = QuantizedWeight(torch.zeros(32, 64, dtype=torch.int8), torch.ones(32), bits=8, integer_acts=integer_acts)
    assert w8.layout == ("panels" if want == "panels" else "int8")
    odd = QuantizedWeight(torch.zeros(32, 64, dtype=torch.int8), torch.ones(32, 32), bits=4, group_size=2, integer_acts=integer_acts)
    assert odd.layout != "panels"  # groups of 2 columns: the compiled product cannot run it


def test_panels_are_not_auto_picked_without_the_compiled_product():
    """With the compiled helpers disabled, a W4A8 layer keeps torch's int4 layout and runs."""
    got = run_child(
        """
        import json, torch
        from duquant_jax import DuQuantConfig
        from interop.linear import DuQuantLinear
        from interop.kernels import candidates
        lin = torch.nn.Linear(64, 32)
        layer = DuQuantLinear.from_linear(lin, DuQuantConfig.preset("w4a8", weight_method="rtn", smooth_alpha=None))
        y = layer(torch.randn(3, 64))
        print(json.dumps(dict(layout=layer.qweight.layout, finite=bool(torch.isfinite(y).all()),
                              paths=candidates(layer.qweight, layer.act, torch.float32, 3))))
        """,
        env={"DUQUANT_COMPILED": "0"},
    )
    assert got["layout"] != "panels" and got["finite"] and "c-int8" not in got["paths"]
