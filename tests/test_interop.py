"""PyTorch side: DLPack bridge, DuQuantLinear against the JAX and reference paths, conversion."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from duquant_jax import DuQuantConfig, calibrate, forward, pack_weight  # noqa: E402
from duquant_jax import reference as ref  # noqa: E402
from interop import DuQuantLinear, jax_to_torch, name_filter, quantize_, torch_to_jax  # noqa: E402
from interop import calibrate as calibrate_model  # noqa: E402

from helpers import FORWARD_TOL, rel_err, to_numpy  # noqa: E402

DTYPES = [
    (jnp.float32, torch.float32),
    (jnp.bfloat16, torch.bfloat16),
    (jnp.float16, torch.float16),
    (jnp.int8, torch.int8),
    (jnp.int32, torch.int32),
]


@pytest.mark.parametrize("jdt, tdt", DTYPES)
def test_jax_to_torch_and_back_share_memory(jdt, tdt):
    x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8).astype(jdt)
    t = jax_to_torch(x)
    assert t.dtype == tdt and tuple(t.shape) == (8, 8)
    assert t.data_ptr() == x.unsafe_buffer_pointer()
    back = torch_to_jax(t)
    assert back.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(back.astype(jnp.float32)), np.asarray(x.astype(jnp.float32)))


def test_torch_to_jax_handles_grad_noncontiguous_and_int64():
    p = torch.nn.Parameter(torch.randn(6, 4))
    np.testing.assert_array_equal(np.asarray(torch_to_jax(p)), p.detach().numpy())
    t = torch.randn(6, 4).T  # non-contiguous: made contiguous (a copy), values right
    np.testing.assert_array_equal(np.asarray(torch_to_jax(t)), t.numpy())
    i64 = torch.arange(10, dtype=torch.int64)
    got = torch_to_jax(i64)
    np.testing.assert_array_equal(np.asarray(got), np.arange(10))
    with pytest.raises(ValueError, match="outside int32"):
        torch_to_jax(torch.tensor([2**40]))
    with pytest.raises(TypeError, match="complex64"):
        torch_to_jax(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="bool"):
        jax_to_torch(jnp.zeros(3, bool))


def _layer(mode: str, out=48, n_in=70, seed=0, bits=(4, 8)):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, n_in)).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32)
    cfg = DuQuantConfig(weight_bits=bits[0], act_bits=bits[1], row_rot_mode=mode, block_out_size=8)
    calib = [rng.standard_normal((16, n_in)).astype(np.float32) for _ in range(3)]
    x = rng.standard_normal((2, 5, n_in)).astype(np.float32)
    return w, b, cfg, calib, x


@pytest.mark.parametrize("mode", ["restore", "propagate", "none"])
@pytest.mark.parametrize("bits", [(16, 16), (4, 8)])
def test_torch_forward_matches_jax_and_reference_on_the_same_pack(mode, bits):
    w, b, cfg, calib, x = _layer(mode, bits=bits)
    pack = pack_weight(w, cfg)
    if cfg.quantize_acts:
        pack = calibrate(pack, calib)
    layer = DuQuantLinear.from_pack(pack, bias=torch.from_numpy(b))
    y_torch = layer(torch.from_numpy(x)).numpy()
    y_jax = np.asarray(forward(pack, x, b))
    y_ref = ref.forward(to_numpy(pack), x, b)
    assert rel_err(y_jax, y_torch) <= FORWARD_TOL
    assert rel_err(y_torch, y_ref) <= FORWARD_TOL
    if bits == (16, 16) and mode == "restore":
        assert rel_err(y_torch, x @ w.T + b) <= FORWARD_TOL


@pytest.mark.parametrize("mode", ["restore", "propagate"])
def test_torch_calibration_equals_jax_calibration(mode):
    w, b, cfg, calib, x = _layer(mode)
    pack = pack_weight(w, cfg)
    model = torch.nn.Sequential(DuQuantLinear.from_pack(pack, bias=torch.from_numpy(b)))
    with calibrate_model(model):
        for c in calib:
            model(torch.from_numpy(c))
    want = np.asarray(calibrate(pack, calib).a_scale)
    np.testing.assert_allclose(model[0].a_scale.numpy(), want, rtol=1e-5)
    y_jax = np.asarray(forward(calibrate(pack, calib), x, b))
    assert rel_err(model(torch.from_numpy(x)).detach().numpy(), y_jax) <= FORWARD_TOL


def test_bfloat16_layer_stays_close_to_float32():
    w, b, cfg, calib, x = _layer("restore")
    pack = calibrate(pack_weight(w, cfg), calib)
    f32 = DuQuantLinear.from_pack(pack, bias=torch.from_numpy(b))
    bf16 = DuQuantLinear.from_pack(pack, bias=torch.from_numpy(b)).to(torch.bfloat16)
    assert bf16.r_in.dtype == torch.bfloat16 and bf16.qweight.scales.dtype == torch.float32  # scales never rounded
    assert not [n for n, t in bf16.state_dict().items() if t.dtype.is_floating_point and t.shape == (48, 70)]  # no float weight
    y32 = f32(torch.from_numpy(x))
    y16 = bf16(torch.from_numpy(x).to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa: a few 1e-2 relative, plus a few flipped A8 codes.
    assert rel_err(y16.float().numpy(), y32.numpy()) <= 5e-2


def test_state_dict_round_trips_into_a_fresh_layer():
    w, b, cfg, calib, x = _layer("restore")
    layer = DuQuantLinear.from_pack(calibrate(pack_weight(w, cfg), calib), bias=torch.from_numpy(b))
    sd = layer.state_dict()
    assert {"perm", "r_in", "r_out", "qweight.codes", "qweight.scales", "a_scale", "calibrated", "bias"} <= set(sd)
    assert sd["qweight.codes"].dtype == torch.uint8 and sd["qweight.codes"].shape == (48, 35)  # 4-bit: two codes a byte
    assert not {"b_eff", "r_in_t"} & set(sd)
    fresh = DuQuantLinear.from_pack(pack_weight(np.zeros_like(w) + 1, cfg), bias=torch.zeros(48))
    fresh.load_state_dict(sd)
    xt = torch.from_numpy(x)
    torch.testing.assert_close(fresh(xt), layer(xt))
    assert "W4A8" in repr(layer) and "calibrated=True" in repr(layer)


def test_uncalibrated_w4a8_forward_names_the_layer():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    quantize_(model, DuQuantConfig(), progress=False)
    with pytest.raises(RuntimeError, match=r"layer 0 .*never calibrated"):
        model(torch.randn(2, 32))


def test_quantize_swaps_selected_linears_and_keeps_the_output():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(40, 40))
    model.add_module("act", torch.nn.GELU())
    model.add_module("head", torch.nn.Linear(40, 10))
    x = torch.randn(7, 40)
    y_float = model(x)
    replaced = quantize_(model, DuQuantConfig(weight_bits=16, act_bits=16), name_filter(include=r"_proj$"), progress=False)
    assert list(replaced) == ["q_proj"]
    assert isinstance(model.q_proj, DuQuantLinear) and isinstance(model.head, torch.nn.Linear)
    assert rel_err(model(x).detach().numpy(), y_float.detach().numpy()) <= FORWARD_TOL
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_(torch.nn.Sequential(torch.nn.ReLU()), progress=False)


def test_calibrate_refuses_models_without_layers_and_batches():
    with pytest.raises(ValueError, match="no DuQuantLinear"):
        with calibrate_model(torch.nn.Sequential(torch.nn.ReLU())):
            pass
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    quantize_(model, progress=False)
    with pytest.raises(RuntimeError, match="no batch"):
        with calibrate_model(model):
            pass


def test_torch_compile_runs_the_layer():
    w, b, cfg, calib, x = _layer("restore")
    layer = DuQuantLinear.from_pack(calibrate(pack_weight(w, cfg), calib), bias=torch.from_numpy(b))
    compiled = torch.compile(layer)
    xt = torch.from_numpy(x)
    torch.testing.assert_close(compiled(xt), layer(xt), rtol=1e-5, atol=1e-5)


def test_an_exception_inside_calibrate_freezes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    quantize_(model, progress=False)
    with pytest.raises(KeyError):
        with calibrate_model(model):
            model(torch.randn(4, 16))
            raise KeyError("user code failed")
    assert not bool(model[0].calibrated)
    with pytest.raises(RuntimeError, match="never calibrated"):  # recording stopped, scales not guessed
        model(torch.randn(4, 16))
