"""GPTQ rounding (`duquant_jax.gptq`) against round-to-nearest and the float64 reference."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax import gptq
from duquant_jax.gptq import gptq_codes, gptq_factor, gptq_round, gptq_round_fitting_scales, inverse_factor
from duquant_jax.quantize import quantize, weight_scales
from duquant_jax.reference import gptq as ref

LAYER = "model.layers.3.mlp.down_proj"
TIE_EPS = 1e-3  # a reference ratio w/s this close to a half-integer is a rounding tie
FACTOR_TOL = 1e-4  # max |U - U_ref| / max |U_ref|, U the upper Cholesky factor of the damped h⁻¹


def input_distribution(n: int, seed: int, rank: int = 16) -> Callable[[int, int], np.ndarray]:
    """A distribution of (tokens, n) inputs with a strongly non-diagonal covariance:
    rank-`rank` mixing (three outlier channels) plus a small isotropic part."""
    mix = np.random.default_rng(seed).standard_normal((rank, n))
    mix[:, :3] *= 8.0

    def draw(tokens: int, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        return (r.standard_normal((tokens, rank)) @ mix + 0.2 * r.standard_normal((tokens, n))).astype(np.float32)

    return draw


def hessian(n: int, tokens: int, seed: int) -> np.ndarray:
    """XᵀX of `tokens` inputs (rank-deficient when tokens < n), three outlier channels."""
    x = np.random.default_rng(seed).standard_normal((tokens, n)).astype(np.float32)
    x[:, :3] *= 30.0
    return x.T @ x


_weight_scales = jax.jit(weight_scales, static_argnums=1)


def row_scales(w: np.ndarray, bits: int) -> np.ndarray:
    return np.asarray(_weight_scales(jnp.asarray(w), bits))


def group_scales(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """(out, ceil(in / group)): SPEC's MSE grid on each group's slice of each row."""
    out, n = w.shape
    full = n // group
    parts = []
    if full:
        parts.append(row_scales(w[:, : full * group].reshape(out * full, group), bits).reshape(out, full))
    if n % group:
        parts.append(row_scales(w[:, full * group :], bits)[:, None])
    return np.concatenate(parts, axis=1)


def scales_for(w: np.ndarray, bits: int, group: int | None) -> np.ndarray:
    return row_scales(w, bits) if group is None else group_scales(w, bits, group)


def column_scales(s: np.ndarray, n: int, group: int | None) -> np.ndarray:
    """Per-row (out,) or per-group (out, n_groups) scales -> broadcastable to (out, n)."""
    return s[:, None] if group is None else np.repeat(s, group, axis=1)[:, :n]


def rtn_codes(w: np.ndarray, s: np.ndarray, bits: int, group: int | None) -> np.ndarray:
    cols = np.broadcast_to(column_scales(s, w.shape[1], group), w.shape)
    return np.asarray(quantize(jnp.asarray(w), jnp.asarray(cols, jnp.float32), bits)).astype(np.int8)


# --- GPTQ does what it is for -------------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("group", [None, 64], ids=["per-row", "group64"])
def test_gptq_output_error_is_below_round_to_nearest_on_held_out_inputs(group, act_order):
    out, n, bits = 64, 256, 4
    draw = input_distribution(n, seed=0)
    x_cal, x_held = draw(1024, 1), draw(1024, 2)
    w = np.random.default_rng(3).standard_normal((out, n)).astype(np.float32)
    s = scales_for(w, bits, group)
    cols = column_scales(s, n, group)
    codes = gptq_codes(w, x_cal.T @ x_cal, s, bits, group_size=group, act_order=act_order)
    err_gptq = np.linalg.norm(x_held @ (w - np.asarray(codes) * cols).T)
    err_rtn = np.linalg.norm(x_held @ (w - rtn_codes(w, s, bits, group) * cols).T)
    assert err_gptq < 0.5 * err_rtn  # measured 0.12-0.21 of round-to-nearest's error


def minmax_scales(w: np.ndarray, bits: int, group: int | None) -> np.ndarray:
    """max |w| / qmax per row or per row and group (cheap scales for the exact-equality checks)."""
    q = 2 ** (bits - 1) - 1
    if group is None:
        return np.abs(w).max(axis=1) / q
    n_groups = -(-w.shape[1] // group)
    return np.stack([np.abs(w[:, g * group : (g + 1) * group]).max(axis=1) / q for g in range(n_groups)], axis=1)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("group", [None, 50], ids=["per-row", "group50"])
def test_diagonal_hessian_gives_round_to_nearest_bitwise(group, act_order):
    # With h = I, or any diagonal h, no error is pushed anywhere: GPTQ is round-to-nearest.
    # A non-constant diagonal with act_order also checks that the permutation is undone.
    rng = np.random.default_rng(0)
    out, n = 24, 200
    w = rng.standard_normal((out, n)).astype(np.float32)
    hs = (np.eye(n, dtype=np.float32), np.diag(rng.uniform(0.1, 10.0, n)).astype(np.float32))
    for bits in range(2, 9):
        s = minmax_scales(w, bits, group) * 0.8  # some weights clamp
        expected = rtn_codes(w, s, bits, group)
        for h in hs:
            codes = gptq_codes(w, h, s, bits, group_size=group, act_order=act_order, block=64)
            np.testing.assert_array_equal(np.asarray(codes), expected, err_msg=f"bits={bits}")


def test_only_the_upper_triangle_of_h_is_read():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    h = hessian(64, 200, seed=4)
    h = np.triu(h) + np.triu(h, 1).T  # exactly symmetric
    s = row_scales(w, 4)
    noisy = h + np.tril(rng.standard_normal(h.shape).astype(np.float32), -1)
    np.testing.assert_array_equal(np.asarray(gptq_codes(w, noisy, s, 4)), np.asarray(gptq_codes(w, h, s, 4)))
    np.testing.assert_array_equal(ref.gptq_codes(w, noisy, s, 4), ref.gptq_codes(w, h, s, 4))


# --- the JAX path equals the float64 reference --------------------------------------------

# out, in, tokens behind h, bits, group, block, act_order: odd `in`, `in` not a multiple of
# `block`, `block` equal to and above `in`, groups that do and do not divide `in`, bits 2..8.
REFERENCE_CASES = [
    (32, 256, 96, 4, None, 128, False),
    (32, 256, 96, 4, None, 128, True),
    (24, 257, 512, 3, 64, 64, True),
    (24, 300, 512, 8, 100, 128, False),
    (24, 300, 64, 2, 37, 32, True),
    (16, 129, 256, 5, None, 16, False),
    (16, 200, 256, 6, 50, 200, True),
    (16, 100, 256, 7, None, 512, False),
]


def assert_equal_up_to_ties(codes: np.ndarray, expected: ref.Rounding) -> int:
    """Codes equal the reference except where the reference's `w / s` was a rounding tie.

    Rows are independent; within a row a code that flips at a tie changes the error pushed
    to every later column, so only each row's first difference (in rounding order) has to
    be a tie, off by one. Returns the number of rows that differ.
    """
    order = expected.order
    codes, ref_codes, ratio = codes[:, order], expected.codes[:, order], expected.ratio[:, order]
    differ = codes != ref_codes
    rows = np.flatnonzero(differ.any(axis=1))
    for r in rows:
        j = int(np.argmax(differ[r]))
        dist = abs(abs(ratio[r, j] - np.floor(ratio[r, j])) - 0.5)
        assert dist < TIE_EPS, f"row {r}, column {order[j]}: codes {codes[r, j]} vs {ref_codes[r, j]}, w/s = {ratio[r, j]!r} is no tie"
        assert abs(int(codes[r, j]) - int(ref_codes[r, j])) == 1
    return len(rows)


@pytest.mark.parametrize("out,n,tokens,bits,group,block,act_order", REFERENCE_CASES)
def test_codes_equal_the_float64_reference_except_at_ties(out, n, tokens, bits, group, block, act_order):
    rng = np.random.default_rng(n + bits)
    w = rng.standard_normal((out, n)).astype(np.float32)
    h = hessian(n, tokens, seed=n)
    s = scales_for(w, bits, group)
    kw = dict(group_size=group, block=block, act_order=act_order)
    codes = gptq_codes(w, h, s, bits, **kw, name=LAYER)
    assert codes.dtype == jnp.int8 and codes.shape == (out, n)
    assert assert_equal_up_to_ties(np.asarray(codes), ref.gptq_rounding(w, h, s, bits, **kw)) <= max(1, out // 50)


def test_codes_equal_the_reference_across_panels(monkeypatch):
    # Panels of 128 columns: the right-looking products between panels, and a padded last block.
    monkeypatch.setattr(gptq, "PANEL", 128)
    out, n, bits, group = 24, 300, 4, 64
    rng = np.random.default_rng(7)
    w = rng.standard_normal((out, n)).astype(np.float32)
    h = hessian(n, 200, seed=7)
    s = scales_for(w, bits, group)
    for act_order in (False, True):
        kw = dict(group_size=group, block=32, act_order=act_order)
        codes = np.asarray(gptq_codes(w, h, s, bits, **kw))
        assert assert_equal_up_to_ties(codes, ref.gptq_rounding(w, h, s, bits, **kw)) <= 1


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_tall_weight_rounded_in_row_chunks_equals_the_reference(monkeypatch, act_order):
    # An output layer's weight goes in chunks of rows (its temporaries bounded): here 7 rows a chunk, the last
    # chunk of 3 padded to 7. Rows are independent given the factor, so the codes are the reference's.
    monkeypatch.setattr(gptq, "ROW_CHUNK_ELEMENTS", 7 * 96)
    out, n, bits, group = 24, 96, 4, 32
    assert gptq.chunk_rows(out, n) == 7
    rng = np.random.default_rng(11)
    w = rng.standard_normal((out, n)).astype(np.float32)
    h = hessian(n, 300, seed=11)
    s = scales_for(w, bits, group)
    kw = dict(group_size=group, block=32, act_order=act_order)
    for weight in (w, jnp.asarray(w)):  # NumPy rows are sliced on the host, a JAX weight's on its device
        codes = gptq_codes(weight, h, s, bits, **kw)
        assert codes.dtype == jnp.int8 and codes.shape == (out, n)
        assert assert_equal_up_to_ties(np.asarray(codes), ref.gptq_rounding(w, h, s, bits, **kw)) <= 1


FITTED_CASES = [  # (out, n, group, block, method): a short last group (300), a group as wide as the block, n < block
    (48, 300, 32, 128, "mse"),
    (40, 256, 128, 128, "mse-fine"),
    (24, 96, 32, 128, "mse-fine"),
    (16, 200, 64, 64, "minmax"),
]


@pytest.mark.parametrize("out,n,group,block,method", FITTED_CASES)
def test_scales_fitted_while_rounding_equal_the_float64_reference(out, n, group, block, method):
    rng = np.random.default_rng(n + group)
    w = rng.standard_normal((out, n)).astype(np.float32)
    h = hessian(n, 400, seed=n)
    codes, scales = gptq_round_fitting_scales(w, gptq_factor(h), 4, group_size=group, block=block, method=method, name=LAYER)
    assert codes.dtype == jnp.int8 and codes.shape == (out, n) and scales.shape == (out, -(-n // group))
    want = ref.gptq_rounding(w, h, None, 4, group_size=group, block=block, fit_scales=method)
    assert assert_equal_up_to_ties(np.asarray(codes), want) <= max(1, out // 50)
    rel = np.abs(np.asarray(scales, np.float64) / want.scales - 1)
    assert np.mean(rel <= 1e-5) >= 0.98, rel.max()
    # the static scales of the same weight differ: the scales come from the error-fed weights
    assert not np.allclose(np.asarray(scales), group_scales(w, 4, group))


def test_scales_fitted_while_rounding_lower_the_output_error_on_held_out_inputs():
    # The same GPTQ with its groups' scales fitted to the error-fed weights, against scales fitted before rounding
    # (static groups): lower output error on inputs the Hessian did not see (bound: no worse, at this seed 5-15% lower).
    n, out, group = 256, 96, 32
    draw = input_distribution(n, seed=21)
    calib, held = draw(2048, 1), draw(1024, 2)
    w = np.random.default_rng(3).standard_normal((out, n)).astype(np.float32)
    f = gptq_factor(calib.T @ calib)
    static = np.asarray(gptq_round(w, f, group_scales(w, 4, group), 4, group_size=group))
    static_w = static * np.repeat(group_scales(w, 4, group), group, axis=1)
    codes, scales = gptq_round_fitting_scales(w, f, 4, group_size=group)
    fitted_w = np.asarray(codes) * np.repeat(np.asarray(scales), group, axis=1)
    err = lambda wq: float(np.linalg.norm(held @ (wq - w).T))  # noqa: E731
    assert err(fitted_w) < err(static_w), (err(fitted_w), err(static_w))


def test_tall_weight_fitting_scales_in_row_chunks_equals_one_call(monkeypatch):
    rng = np.random.default_rng(12)
    out, n, group = 30, 128, 32
    w = rng.standard_normal((out, n)).astype(np.float32)
    f = gptq_factor(hessian(n, 300, seed=12))
    whole = [np.asarray(a) for a in gptq_round_fitting_scales(w, f, 4, group_size=group)]
    monkeypatch.setattr(gptq, "ROW_CHUNK_ELEMENTS", 8 * n)  # chunks of 8 rows, the last of 6 padded
    parts = [np.asarray(a) for a in gptq_round_fitting_scales(w, f, 4, group_size=group)]
    assert (parts[0] != whole[0]).sum() <= 2  # float32 products of another shape: a tie may round the other way
    assert np.mean(np.isclose(parts[1], whole[1], rtol=1e-5)) >= 0.98


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(act_order=True), "need columns in their own order"),
        (dict(group_size=48), "need group_size to divide block; got group_size 48, block 128"),
        (dict(method="l1"), "scale method must be"),
        (dict(group_size=0), "group_size must be an int"),
    ],
)
def test_fitting_scales_rejects_what_it_cannot_do_naming_the_layer(kwargs, message):
    w = np.ones((8, 128), np.float32)
    f = gptq_factor(hessian(128, 200, seed=1), act_order=kwargs.pop("act_order", False))
    args = dict(group_size=32, method="mse") | kwargs
    with pytest.raises(ValueError, match=LAYER) as e:
        gptq_round_fitting_scales(w, f, 4, name=LAYER, **args)
    assert message in str(e.value)


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_factor_equals_the_reference_inverse_cholesky(act_order):
    # U = J inv(chol(J h J)) J equals chol(h⁻¹, upper) of the reference (chol -> inverse -> chol).
    h = hessian(300, 1000, seed=3)
    f = gptq_factor(h, act_order=act_order)
    order, u_ref = ref.hinv_factor(h, act_order=act_order)
    np.testing.assert_array_equal(np.asarray(f.order), order)
    u = np.asarray(inverse_factor(f), np.float64)
    assert np.max(np.abs(u - u_ref)) <= FACTOR_TOL * np.max(np.abs(u_ref))


def test_shared_factor_rounds_like_a_fresh_one():
    # q/k/v share their input: one factor, several weights.
    rng = np.random.default_rng(5)
    h = hessian(128, 512, seed=5)
    f = gptq_factor(h, act_order=True)
    for out in (32, 8):
        w = rng.standard_normal((out, 128)).astype(np.float32)
        s = row_scales(w, 4)
        np.testing.assert_array_equal(
            np.asarray(gptq_round(w, f, s, 4)), np.asarray(gptq_codes(w, h, s, 4, act_order=True))
        )


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_consuming_the_hessian_gives_the_same_codes_and_deletes_it(act_order):
    # consume_h hands h's buffer to the factorization (one (in, in) matrix less at the peak).
    rng = np.random.default_rng(8)
    h = hessian(256, 600, seed=8)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    s = row_scales(w, 4)
    want = np.asarray(gptq_codes(w, h, s, 4, act_order=act_order))
    hj = jnp.array(h)
    got = np.asarray(gptq_codes(w, hj, s, 4, act_order=act_order, consume_h=True))
    np.testing.assert_array_equal(got, want)
    assert hj.is_deleted()
    with pytest.raises(ValueError, match="consume_h needs h as a float32 JAX array"):
        gptq_codes(w, h, s, 4, consume_h=True)  # a NumPy array cannot be given away


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_dead_channels_get_zero_codes_and_leave_the_rest_as_the_reference(act_order):
    rng = np.random.default_rng(11)
    out, n, bits = 16, 96, 4
    x = rng.standard_normal((400, n)).astype(np.float32)
    dead = [0, 17, 95]
    x[:, dead] = 0.0  # inputs that are always zero: diag(h) == 0
    h = x.T @ x
    w = rng.standard_normal((out, n)).astype(np.float32)
    s = row_scales(w, bits)
    codes = np.asarray(gptq_codes(w, h, s, bits, act_order=act_order, block=32))
    assert not codes[:, dead].any()
    assert assert_equal_up_to_ties(codes, ref.gptq_rounding(w, h, s, bits, act_order=act_order, block=32)) <= 1


# --- bad input: errors that name the layer ------------------------------------------------


def _good(out: int = 8, n: int = 16):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((out, n)).astype(np.float32)
    return w, hessian(n, 64, seed=0), row_scales(w, 4)


def _nan_at(a: np.ndarray, idx: tuple[int, ...]) -> np.ndarray:
    a = a.copy()
    a[idx] = np.nan
    return a


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda w, h, s: (w, h[:-1, :-1], s), r"h .*shape \(16, 16\)"),
        (lambda w, h, s: (w, h[:, :-1], s), r"square"),
        (lambda w, h, s: (w, np.diag(h), s), r"square"),
        (lambda w, h, s: (w, None, s), r"h must be .*None"),
        (lambda w, h, s: (w, _nan_at(h, (2, 5)), s), r"h .* 1 NaN/Inf"),
        (lambda w, h, s: (_nan_at(w, (1, 1)), h, s), r"w2 .* 1 NaN/Inf"),
        (lambda w, h, s: (w[0], h, s), r"w2 must be a non-empty 2-D"),
        (lambda w, h, s: (w, -np.eye(16, dtype=np.float32), s), r"not positive definite"),
        (lambda w, h, s: (w, h, s[:-1]), r"w_scale .*shape \(8,\)"),
        (lambda w, h, s: (w, h, np.zeros_like(s)), r"w_scale must be > 0"),
        (lambda w, h, s: (w, h, _nan_at(s, (3,))), r"w_scale .* 1 NaN/Inf"),
    ],
    ids=["h-short", "h-not-square", "h-1d", "h-missing", "h-nan", "w-nan", "w-1d", "h-not-pd", "scale-short", "scale-zero", "scale-nan"],
)
def test_bad_input_raises_an_error_naming_the_layer(change, message):
    w, h, s = change(*_good())
    with pytest.raises(ValueError, match=message) as info:
        gptq_codes(w, h, s, 4, name=LAYER)
    assert LAYER in str(info.value)


def test_indefinite_hessian_is_an_error_even_after_dampening():
    # [[1, 2], [2, 1]] has eigenvalues 3 and -1: 1% of the mean diagonal does not fix it.
    h = np.kron(np.eye(4), np.array([[1.0, 2.0], [2.0, 1.0]])).astype(np.float32)
    with pytest.raises(ValueError, match=rf"'{LAYER}'.*not positive definite even after dampening"):
        gptq_factor(h, name=LAYER)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bits=1), r"bits must be an int in 2\.\.8; got 1"),
        (dict(bits=9), r"bits must be an int in 2\.\.8; got 9"),
        (dict(bits=True), r"bits must be an int"),
        (dict(block=0), r"block must be an int in >= 1; got 0"),
        (dict(group_size=0), r"group_size must be an int in >= 1; got 0"),
        (dict(group_size=5), r"w_scale .*shape \(8, 4\)"),  # per-row scales given with groups
        (dict(damp=-0.1), r"damp must be a finite number >= 0"),
        (dict(damp=float("nan")), r"damp must be a finite number >= 0"),
        (dict(act_order="yes"), r"act_order must be a bool"),
    ],
)
def test_bad_options_raise_an_error_naming_the_layer(kwargs, message):
    w, h, s = _good()
    bits = kwargs.pop("bits", 4)
    with pytest.raises(ValueError, match=message) as info:
        gptq_codes(w, h, s, bits, name=LAYER, **kwargs)
    assert LAYER in str(info.value)


def test_factor_of_another_size_is_an_error_naming_the_layer():
    w, _, s = _good()
    f = gptq_factor(hessian(12, 64, seed=1))
    with pytest.raises(ValueError, match=rf"'{LAYER}'.*factor is for 12 inputs"):
        gptq_round(w, f, s, 4, name=LAYER)


def test_reference_rejects_an_indefinite_hessian_naming_the_layer():
    w, _, s = _good()
    with pytest.raises(ValueError, match=rf"'{LAYER}'.*not positive definite"):
        ref.gptq_codes(w, -np.eye(16), s, 4, name=LAYER)
