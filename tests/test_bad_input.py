"""Bad input raises an error that names what is wrong; nothing is silently coerced."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax import DuQuantConfig, calibrate, forward, pack_weight
from duquant_jax import reference as ref

PATHS = [pytest.param(pack_weight, id="jax"), pytest.param(ref.pack_weight, id="reference")]


@pytest.mark.parametrize("pack", PATHS)
@pytest.mark.parametrize(
    "w, message",
    [
        (np.ones((4,), np.float32), r"2-D .*\(4,\)"),
        (np.ones((2, 3, 4), np.float32), r"2-D .*\(2, 3, 4\)"),
        (np.ones((0, 8), np.float32), r"non-empty .*\(0, 8\)"),
        (np.ones((8, 0), np.float32), r"non-empty .*\(8, 0\)"),
    ],
)
def test_bad_weight_shapes_are_named(pack, w, message):
    with pytest.raises(ValueError, match=message):
        pack(w)


@pytest.mark.parametrize("pack", PATHS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_rejected(pack, bad):
    w = np.ones((8, 8), np.float32)
    w[3, 5] = bad
    with pytest.raises(ValueError, match=r"\(8, 8\) holds 1 NaN/Inf"):
        pack(w)


@pytest.mark.parametrize("pack", PATHS)
def test_integer_weight_is_rejected_not_coerced(pack):
    with pytest.raises(TypeError, match="int32"):
        pack(np.ones((8, 8), np.int32))


def test_non_array_weight_and_bad_config_type_are_rejected():
    with pytest.raises(TypeError, match="list"):
        pack_weight([[1.0, 2.0]])
    with pytest.raises(TypeError, match="DuQuantConfig"):
        pack_weight(np.ones((2, 2), np.float32), {"weight_bits": 4})


def test_bfloat16_and_float64_weights_are_accepted():
    w = np.random.default_rng(0).standard_normal((20, 24))
    a = pack_weight(jnp.asarray(w, jnp.bfloat16))
    b = pack_weight(w)  # float64 NumPy: computed in float32
    assert a.w_codes.shape == b.w_codes.shape == (20, 24)


@pytest.fixture(scope="module")
def calibrated():
    rng = np.random.default_rng(1)
    pack = pack_weight(rng.standard_normal((12, 20)).astype(np.float32))
    return calibrate(pack, [rng.standard_normal((4, 20)).astype(np.float32)])


@pytest.mark.parametrize("fwd", [forward, ref.forward], ids=["jax", "reference"])
def test_input_with_wrong_last_dimension_is_named(calibrated, fwd):
    with pytest.raises(ValueError, match=r"in_features=20.*\(3, 19\)"):
        fwd(calibrated, np.ones((3, 19), np.float32))


@pytest.mark.parametrize("fwd", [forward, ref.forward], ids=["jax", "reference"])
def test_integer_input_and_bad_bias_are_rejected(calibrated, fwd):
    with pytest.raises(TypeError, match="int64"):
        fwd(calibrated, np.ones((3, 20), np.int64))
    with pytest.raises(ValueError, match=r"bias must have shape \(12,\)"):
        fwd(calibrated, np.ones((3, 20), np.float32), np.ones(11, np.float32))


@pytest.mark.parametrize("fwd", [forward, ref.forward], ids=["jax", "reference"])
def test_forward_without_calibration_asks_to_calibrate(fwd):
    pack = pack_weight(np.ones((4, 4), np.float32), DuQuantConfig())
    if fwd is ref.forward:
        pack = ref.pack_weight(np.ones((4, 4), np.float32), DuQuantConfig())
    with pytest.raises(ValueError, match="calibrate"):
        fwd(pack, np.ones((2, 4), np.float32))


@pytest.mark.parametrize("cal", [calibrate, ref.calibrate], ids=["jax", "reference"])
def test_calibration_rejects_nan_empty_and_wrong_shape(cal):
    pack = pack_weight(np.eye(8, dtype=np.float32))
    bad = np.ones((2, 8), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="calibration batch 1 .* NaN/Inf"):
        cal(pack, [np.ones((2, 8), np.float32), bad])
    with pytest.raises(ValueError, match="at least one batch|no batch"):
        cal(pack, [])
    with pytest.raises(ValueError, match=r"calibration batch 0 .*in_features=8"):
        cal(pack, [np.ones((2, 7), np.float32)])
