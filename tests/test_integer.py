"""The deployed JAX forward (`duquant_jax.integer`): packed codes and int8 x int8 -> int32 products
equal the float forward to float32 rounding, for every scheme, granularity and row mode."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from duquant_jax import DuQuantConfig, calibrate, forward, pack_weight
from duquant_jax import nn as dnn
from duquant_jax.integer import integer_product, pack_nibbles, packed_forward, stored_codes, unpack_nibbles, uses_integer_product
from duquant_jax.quantize import pack_int4
from helpers import rel_err

CASES = [
    dict(act_scheme="dynamic-token"),
    dict(act_scheme="dynamic-token", weight_bits=8, rotation="hadamard", block_size=32, row_rot_mode="none"),
    dict(act_scheme="dynamic-token", weight_group_size=32, act_clip=0.9, row_rot_mode="propagate"),
    dict(act_scheme="dynamic-token", weight_bits=3, weight_group_size=50, act_bits=4),
    dict(act_scheme="static-tensor", rotation="hadamard", block_size=64),
    dict(act_scheme="static-channel"),
    dict(act_bits=16, weight_group_size=64),
    dict(weight_bits=16, act_bits=16),
]


def _ids(case):
    return ",".join(f"{k}={v}" for k, v in case.items()) or "spec"


def _layer(case, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((48, 200)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    calib = rng.standard_normal((64, 200)).astype(np.float32)
    x = rng.standard_normal((3, 5, 200)).astype(np.float32)
    pack = calibrate(pack_weight(w, DuQuantConfig(**case)), [calib])
    return pack, b, x


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_packed_forward_equals_the_float_forward(case):
    pack, b, x = _layer(case)
    arrays = {k: v for k, v in pack.arrays().items() if k != "a_scale"} | {"w_codes": stored_codes(pack)}
    a_scale = pack.a_scale if pack.config.needs_calibration else None
    y = packed_forward(arrays, a_scale, jnp.asarray(x), jnp.asarray(b), pack.config, pack.in_features)
    assert y.shape == (3, 5, 48)
    assert rel_err(y, forward(pack, x, b)) <= 1e-5


@pytest.mark.parametrize("group", [None, 16, 60])
def test_integer_product_is_exact(group):
    rng = np.random.default_rng(1)
    xq = rng.integers(-128, 128, (7, 100)).astype(np.int8)
    codes = rng.integers(-8, 8, (9, 100)).astype(np.int8)
    n_groups = 1 if group is None else -(-100 // group)
    scale = rng.uniform(0.5, 2, (9,) if group is None else (9, n_groups)).astype(np.float32)
    got = np.asarray(integer_product(jnp.asarray(xq), jnp.asarray(codes), jnp.asarray(scale), group))
    cols = np.repeat(scale[:, None], 100, 1) if group is None else np.repeat(scale, group, 1)[:, :100]
    want = xq.astype(np.float64) @ (codes * cols).T.astype(np.float64)
    # int32 sums are exact; only the float32 scaling rounds: bound by the terms' magnitudes
    scale_of_terms = np.abs(xq).astype(np.float64) @ np.abs(codes * cols).T.astype(np.float64)
    assert np.all(np.abs(got - want) <= 1e-6 * scale_of_terms)


def test_nibbles_round_trip_and_match_the_pack_files():
    codes = np.random.default_rng(2).integers(-8, 8, (5, 13)).astype(np.int8)
    packed = pack_nibbles(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(packed), pack_int4(codes))
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(packed, 13)), codes)


def test_integer_products_serve_only_schemes_whose_scale_factors_out():
    assert uses_integer_product(DuQuantConfig(act_scheme="dynamic-token"))
    assert uses_integer_product(DuQuantConfig(act_scheme="static-tensor"))
    assert not uses_integer_product(DuQuantConfig())  # static-channel: a float simulation
    assert not uses_integer_product(DuQuantConfig(act_bits=16))


def test_nnx_layer_stores_packed_codes_and_runs_the_integer_path():
    class One(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(256, 64, rngs=nnx.Rngs(0))

        def __call__(self, v):
            return self.proj(v)

    model = One()
    w = np.asarray(model.proj.kernel[...]).T
    cfg = DuQuantConfig(rotation="hadamard", block_size=128, act_scheme="dynamic-token", row_rot_mode="none")
    dnn.quantize(model, cfg)
    stored = model.proj.w_codes[...]
    assert stored.dtype == jnp.uint8 and stored.shape == (64, 128)  # two codes a byte
    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    assert rel_err(model(x), forward(pack_weight(w, cfg), x, np.zeros(64, np.float32))) <= 1e-5
    assert rel_err(model(x), x @ w.T) < 0.2
