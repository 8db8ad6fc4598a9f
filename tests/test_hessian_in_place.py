"""GPTQ's Hessian transformed and factored in its own host buffer (`duquant_jax.hessian_in_place`):
the same factor as the XLA programs (`hessian_in_basis` + `gptq_factor`) up to float32 rounding, the
statistics given up only when asked (`consume_stats`), and the tiled helpers equal to NumPy's whole-matrix
expressions."""

from __future__ import annotations

import numpy as np
import pytest

from duquant_jax import DuQuantConfig, LayerStats, pack_weight
from duquant_jax.gptq import gptq_factor
from duquant_jax.hessian_in_place import aligned_copy, factor_in_place, symmetrize_, transpose_, usable
from duquant_jax.pack import hessian_in_basis


def _hessian(n: int, seed: int, dead: tuple[int, ...] = ()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3 * n, n)).astype(np.float32) * rng.uniform(0.1, 3.0, n).astype(np.float32)
    x[:, list(dead)] = 0
    h = x.T.astype(np.float64) @ x
    return ((h + h.T) / 2).astype(np.float32)


def _transform(n: int, block: int, seed: int, rotate: bool = True, smooth: bool = True):
    """perm, r_in, in_diag, r_pre of an input transform with every piece (or only a permutation)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n).astype(np.int32)
    if not rotate:
        return perm, None, None, None
    blocks = -(-n // block)
    r_in = np.stack([np.linalg.qr(rng.standard_normal((block, block)))[0] for _ in range(blocks)]).astype(np.float32)
    r_pre = np.stack([np.linalg.qr(rng.standard_normal((block, block)))[0] for _ in range(blocks)]).astype(np.float32)
    in_diag = rng.uniform(0.5, 2.0, n).astype(np.float32) if smooth else None
    return perm, r_in, in_diag, r_pre


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("n", "block", "rotate"), [(384, 64, True), (300, 128, True), (257, 64, False)])
def test_in_place_factor_equals_the_xla_programs(n, block, rotate, act_order):
    """Same rounding order and dead columns exactly; the factor within 1e-5 of its largest entry (LAPACK's and
    XLA's Cholesky sum in different orders). Panels and tiles that do not divide `n` are covered (n=300, 257)."""
    h = _hessian(n, seed=n, dead=() if rotate else (3, 100, n - 1))  # a rotation mixes dead channels away
    pieces = _transform(n, block, seed=1, rotate=rotate)
    want = gptq_factor(hessian_in_basis(h, *pieces), damp=0.01, act_order=act_order)
    got = factor_in_place(aligned_copy(h), *pieces, damp=0.01, act_order=act_order)
    np.testing.assert_array_equal(np.asarray(got.order), np.asarray(want.order))
    np.testing.assert_array_equal(np.asarray(got.dead), np.asarray(want.dead))
    assert int(np.sum(np.asarray(got.dead))) == (0 if rotate else 3)
    l_got, l_want = np.asarray(got.l), np.asarray(want.l)
    assert np.all(np.triu(l_got, 1) == 0)
    assert np.abs(l_got - l_want).max() <= 1e-5 * np.abs(l_want).max()


def test_the_factor_lives_in_the_given_buffer():
    h = aligned_copy(_hessian(256, seed=0))
    factor = factor_in_place(h, *_transform(256, 64, seed=0), damp=0.01, act_order=False)
    assert np.shares_memory(np.asarray(factor.l), h)


def test_tiled_transpose_and_symmetrize_equal_numpy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 37)).astype(np.float32)
    np.testing.assert_array_equal(transpose_(a.copy(), tile=8), a.T)
    np.testing.assert_array_equal(symmetrize_(a.copy(), tile=8), (a + a.T) / np.float32(2))


def test_not_positive_definite_and_nan_are_named_errors():
    n = 128
    h = -np.eye(n, dtype=np.float32)
    with pytest.raises(ValueError, match=r"layer 'mlp\.down'.*not positive definite"):
        factor_in_place(aligned_copy(h), *_transform(n, 64, 0, rotate=False), damp=0.01, act_order=False, name="mlp.down")
    h = _hessian(n, seed=1)
    h[5, 7] = np.nan
    with pytest.raises(ValueError, match=r"NaN/Inf"):
        factor_in_place(aligned_copy(h), *_transform(n, 64, 0), damp=0.01, act_order=True, name="mlp.down")


def test_usable_needs_a_writable_c_ordered_float32_square():
    h = aligned_copy(_hessian(64, seed=0))
    assert usable(h)
    assert not usable(h.astype(np.float64)) and not usable(np.asfortranarray(h[:, :32])) and not usable(h[:, :32])
    ro = h.copy()
    ro.flags.writeable = False
    assert not usable(ro)


def _layer(seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    x = rng.standard_normal((1024, 256)).astype(np.float32) @ (0.3 * rng.standard_normal((256, 256)) + np.eye(256)).astype(np.float32)
    return w, LayerStats(np.abs(x).max(axis=0), (x.T.astype(np.float64) @ x).astype(np.float32), 1024, layer="mlp.up")


@pytest.mark.parametrize("preset", ["w4a8", "w4a16"])
def test_consumed_statistics_give_the_same_pack_and_fail_loudly_afterwards(preset):
    """consume_stats=True factors the statistics' own buffer: the same codes as a pack that keeps them
    (which factors a copy and leaves `xtx` bit for bit as it was); the consumed stats hold no `xtx`."""
    config = DuQuantConfig.preset(preset)
    w, kept = _layer()
    before = kept.xtx.copy()
    want = pack_weight(w, config, kept)
    np.testing.assert_array_equal(kept.xtx, before)
    _, given = _layer()
    got = pack_weight(w, config, given, consume_stats=True)
    np.testing.assert_array_equal(np.asarray(got.w_codes), np.asarray(want.w_codes))
    np.testing.assert_array_equal(np.asarray(got.w_scale), np.asarray(want.w_scale))
    assert given.xtx is None
    with pytest.raises(ValueError, match="xtx"):
        pack_weight(w, config, given)


def test_read_only_statistics_are_not_consumed():
    config = DuQuantConfig.preset("w4a8")
    w, stats = _layer(1)
    stats.xtx.flags.writeable = False
    before = stats.xtx.copy()
    pack_weight(w, config, stats, consume_stats=True)
    assert stats.xtx is not None
    np.testing.assert_array_equal(stats.xtx, before)


def test_consumed_weight_gives_the_same_codes_and_is_deleted():
    """gptq_round(consume_w=True) rounds inside W2's buffer: the same codes, and W2 is gone afterwards."""
    import jax.numpy as jnp

    from duquant_jax.gptq import gptq_round
    from duquant_jax.quantize import weight_scales

    rng = np.random.default_rng(5)
    w = rng.standard_normal((96, 512)).astype(np.float32)
    x = rng.standard_normal((2048, 512)).astype(np.float32)
    factor = gptq_factor(x.T @ x)
    s = np.asarray(weight_scales(jnp.asarray(w), 4, group_size=128))
    kept = np.asarray(gptq_round(jnp.asarray(w), factor, s, 4, group_size=128))
    w2 = jnp.asarray(w)
    np.testing.assert_array_equal(np.asarray(gptq_round(w2, factor, s, 4, group_size=128, consume_w=True)), kept)
    assert w2.is_deleted()


def test_packing_order_puts_the_widest_consumed_statistics_first_and_grouped_layers_last():
    """quantize_(consume_stats=True) packs the largest XᵀX (freed by its pack) first; grouped layers, which never consume, last."""
    from torch import nn

    from interop.convert import _packing_order

    def stats(n):
        return LayerStats(act_absmax=np.ones(n, np.float32), xtx=np.eye(n, dtype=np.float32), tokens=1)

    layers = [("q", nn.Linear(64, 64)), ("k", nn.Linear(64, 8)), ("up", nn.Linear(64, 256)), ("down", nn.Linear(256, 64))]
    got = [n for n, _ in _packing_order(layers, {n: stats(m.in_features) for n, m in layers}, {"q": ["q", "k"], "k": ["q", "k"]})]
    assert got == ["down", "up", "q", "k"]
