"""The input transform fused with the per-token quantization (`interop.native.transform_quantize`, the C function
`duq_transform_quantize`): within float32 roundoff of the float64 transform, its operands checked by name before
the C code runs, and taken by `DuQuantLinear` exactly where it applies, eager and compiled alike.

Bounds: the C code sums each rotated block in order in float32, torch's matmul in its own order, so x2 agrees
with float64 to a few float32 unit roundoffs of sum |terms|; a code is then within half a step of x2 / s_t
(plus 1e-3 for that roundoff), and a scale within 2^-18 relative of float64's (measured: 0.4980 steps, 6e-8).
Against the unfused torch path a code may differ by one step where x2 / s_t lies at a rounding tie: at most
0.5% of the codes here (measured: none or a handful in 10^4).
"""

from __future__ import annotations

import pytest
import torch

import interop
from duquant_jax import DuQuantConfig
from interop import compiled, native
from interop.kernels import ActQuant, kernel_options, quantize_tokens
from interop.linear import DuQuantLinear
from helpers import compiled_op_targets

pytestmark = pytest.mark.skipif(compiled.load() is None, reason=f"the compiled helpers are unavailable: {compiled.unavailable()}")
CODE_SLACK, SCALE_RTOL, TIE_SHARE = 1e-3, 2.0**-18, 5e-3


def _oracle(x, perm, diag, rot):
    """float64 x2 = rot(x * diag)[perm] in blocks (rot None: no rotation; a short last block zero-padded)."""
    xp = (x.double() * (1 if diag is None else diag.double()))[:, perm]
    if rot is None:
        return xp
    n, b = xp.shape[1], rot.shape[1]
    blocks = -(-n // b)
    xp = torch.nn.functional.pad(xp, (0, blocks * b - n)).view(-1, blocks, b)
    return torch.einsum("tbk,bkc->tbc", xp, rot.double().expand(blocks, b, b)).reshape(x.shape[0], blocks * b)[:, :n]


def _operands(n, block, n_rot, seed, diag=True):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    d = torch.rand(n, generator=gen) + 0.5 if diag else None
    rot = None if n_rot == 0 else torch.linalg.qr(torch.randn(n_rot, block, block, generator=gen, dtype=torch.float64))[0].float().contiguous()
    return gen, perm, d, rot


@pytest.mark.parametrize("n,block,n_rot,diag", [(640, 128, 1, True), (200, 64, 4, False), (70, 32, 1, True), (96, 32, 0, True), (60, 12, 5, True)])
@pytest.mark.parametrize("tokens", [0, 1, 5, 67])
def test_transform_quantize_is_within_float32_roundoff_of_the_float64_transform(n, block, n_rot, diag, tokens):
    """One rotation for every block or one per block, a short last block (200 = 3 x 64 + 8, 70 = 2 x 32 + 6), no
    rotation, with and without smoothing, blocks of 12 (one 8-wide vector and a scalar tail); 67 tokens run on two
    threads in chunks of 4 with a remainder."""
    gen, perm, d, rot = _operands(n, block, n_rot, seed=n + tokens, diag=diag)
    x = torch.randn(tokens, n, generator=gen) * torch.logspace(-2, 2, n)[torch.randperm(n, generator=gen)]
    for dynamic, clip, qa in ((True, 1.0, 127), (True, 0.9, 7), (False, 1.0, 127)):
        scale = None if dynamic else torch.tensor([0.05])
        xq, s_t = native.transform_quantize(x, perm, d, rot, dynamic, clip, qa, scale)
        assert xq.shape == (tokens, n) and xq.dtype == torch.int8 and s_t.shape == (tokens, 1)
        x2 = _oracle(x, perm, d, rot)
        want_s = (x2.abs().amax(dim=1, keepdim=True) * clip / qa).clamp(min=1e-8) if dynamic else torch.full((tokens, 1), 0.05, dtype=torch.float64)
        assert ((s_t.double() - want_s).abs() <= want_s * SCALE_RTOL).all()
        inside = (x2 / s_t.double()).clamp(-qa - 1, qa)  # codes clamp to the range, as the quotient does here
        assert ((xq.double() - inside).abs() <= 0.5 + CODE_SLACK).all()


def test_transform_quantize_refuses_bad_operands_by_name():
    gen, perm, d, rot = _operands(64, 32, 1, seed=1)
    x = torch.randn(3, 64, generator=gen)
    good = dict(x=x, perm=perm, diag=d, rot=rot, dynamic=True, clip=1.0, qa=127, static_scale=None)
    native.transform_quantize(**good)
    bad_perm = perm.clone()
    bad_perm[7] = 64
    bad = [
        (dict(x=x.double()), "x must be torch.float32"),
        (dict(x=torch.randn(3, 128)[:, ::2]), "x must have unit column stride"),
        (dict(x=torch.randn(3, 60)), r"x must have 64 columns \(perm's length\); got shape \(3, 60\)"),
        (dict(perm=perm.int()), "perm must be torch.int64"),
        (dict(perm=torch.arange(128)[::2]), "perm must be contiguous"),
        (dict(diag=torch.ones(63)), r"diag must be a contiguous \(64,\) tensor"),
        (dict(rot=torch.ones(1, 32, 16)), "rot must hold square blocks"),
        (dict(rot=torch.ones(3, 32, 32)), "rot must hold 1 or 2 blocks of 32; got 3"),
        (dict(rot=rot.transpose(1, 2)), "rot must be contiguous"),
        (dict(qa=128), "qa must be an int in 1..127; got 128"),
        (dict(clip=1.5), r"clip must lie in \(0, 1\]; got 1.5"),
        (dict(dynamic=False), "static quantization needs a one-element scale tensor"),
        (dict(perm=bad_perm), r"perm must hold indices in \[0, 64\); got range \[0, 64\]"),
    ]
    for change, match in bad:
        with pytest.raises(native.NativeKernelError, match=match):
            native.transform_quantize(**{**good, **change})


def _layer(preset: str, **changes) -> DuQuantLinear:
    torch.manual_seed(0)
    config = DuQuantConfig.preset(preset, weight_method="rtn", smooth_alpha=None, **changes)
    return DuQuantLinear.from_linear(torch.nn.Linear(256, 192), config)


def test_layer_takes_the_fused_input_where_it_applies_and_gives_the_unfused_codes():
    layer = _layer("w4a8")
    x = torch.randn(2, 9, 256, generator=torch.Generator().manual_seed(2)) * 3
    assert layer._fusable and layer._fuses(x)
    xq, s_t = layer._fused_input(x, None)
    want_q, want_s = quantize_tokens(layer.rotate_input(x).reshape(-1, 256), layer.act)
    assert torch.allclose(s_t, want_s, rtol=SCALE_RTOL, atol=0)
    diff = (xq.int() - want_q.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= TIE_SHARE
    with torch.inference_mode():
        y = layer(x)
        layer._fusable = False  # the unfused torch path, same kernels
        y0 = layer(x)
    w_abs = (layer.qweight.codes().double() * layer.qweight.code_scales(0, 192).double()).abs()  # |W_hat| (out, in)
    moved = (diff.double() @ w_abs.t()) * s_t.double()  # what the differing codes can move each output by
    roundoff = 1e-5 * (xq.double().abs() @ w_abs.t()) * s_t.double()  # the float32 paths' bound (interop.kernels)
    assert ((y - y0).abs().reshape(-1, 192).double() <= moved + roundoff).all()


def _with_pre_rotation(layer: DuQuantLinear) -> DuQuantLinear:
    layer.r_pre = layer.r_in.clone()
    layer._refresh_derived()
    return layer


@pytest.mark.parametrize(
    "why,layer,x",
    [
        ("bfloat16 input", lambda: _layer("w4a8"), torch.randn(3, 256, dtype=torch.bfloat16)),
        ("float activations", lambda: _layer("w4a16"), torch.randn(3, 256)),
        ("a pre-rotation (the greedy rotation's)", lambda: _with_pre_rotation(_layer("w4a8")), torch.randn(3, 256)),
        ("calibrated per-channel scales", lambda: _layer("w8a8", act_scheme="static-channel"), torch.randn(3, 256)),
    ],
)
def test_layer_keeps_the_torch_transform_where_the_fused_one_does_not_apply(why, layer, x):
    assert not layer()._fuses(x), why


def test_fused_input_is_off_with_the_compiled_helpers_option():
    layer = _layer("w4a8")
    x = torch.randn(3, 256)
    with kernel_options(compiled=False):
        assert not layer._fuses(x)


def test_compiled_layer_runs_the_same_fused_op_and_equals_eager_bit_for_bit():
    """Under `torch.compile(fullgraph=True)` a layer whose input another layer shares calls
    `duquant::transform_quantize` (no torch rotation to differ from eager's codes; a layer alone takes
    `duquant::layer_call`, tests/test_layer_product.py), so compiled and eager outputs are the same bits, at one token
    and at many. Static per-tensor codes take this route."""
    layer = _layer("w4a8", act_scheme="static-tensor")
    with torch.inference_mode(), interop.calibrate(layer):
        layer(torch.randn(16, 256, generator=torch.Generator().manual_seed(4)))
    targets = compiled_op_targets(layer, 256)
    assert any("transform_quantize" in t for t in targets) and any("quantized_mm" in t for t in targets)
    assert not any("index_select" in t or "matmul" in t or "bmm" in t for t in targets), targets
