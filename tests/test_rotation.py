"""Rotations: canonical signs, identity padding, methods agreeing, zigzag, and the bare-QR trap."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from duquant_jax import DuQuantConfig, forward, pack_weight
from duquant_jax import reference as ref
from duquant_jax.rotation import block_rotations, canonical_signs, left_singular_vectors, tall_r_factor

from helpers import FORWARD_TOL, ORTHO_TOL, ROT_TOL, max_ortho_err, rel_err, to_numpy, well_separated


def test_canonical_signs_make_largest_entry_positive_first_on_tie():
    u = np.array([[-0.6, 0.8, 0.5], [0.8, 0.6, -0.5], [0.0, 0.0, 0.7071]])
    got = np.asarray(canonical_signs(jnp.asarray(u, jnp.float32)))
    # Column 0: largest |.| is 0.8 (positive): kept. Column 1: 0.8 positive: kept.
    # Column 2: largest is 0.7071 (positive): kept; negate a copy to check the flip.
    np.testing.assert_allclose(got, u, atol=1e-7)
    flipped = np.asarray(canonical_signs(jnp.asarray(-u, jnp.float32)))
    np.testing.assert_allclose(flipped, u, atol=1e-7)
    tie = np.array([[-0.5, 0.0], [0.5, 1.0]])  # |-0.5| == |0.5|: the first (negative) decides
    np.testing.assert_allclose(np.asarray(canonical_signs(jnp.asarray(tie))), [[0.5, 0.0], [-0.5, 1.0]])
    np.testing.assert_allclose(ref.canonical_signs(tie), [[0.5, 0.0], [-0.5, 1.0]])


@pytest.mark.parametrize("method", ["qr-svd", "svd", "eigh"])
def test_every_rotation_is_canonical_and_orthogonal(method):
    w = np.random.default_rng(0).standard_normal((70, 90)).astype(np.float32)
    pack = to_numpy(pack_weight(w, DuQuantConfig(rotation_method=method)))
    for r in (pack.r_in, pack.r_out):
        assert max_ortho_err(r) <= ORTHO_TOL
        idx = np.argmax(np.abs(r), axis=-2)
        assert np.all(np.take_along_axis(r, idx[:, None, :], axis=-2) > 0)


def test_short_blocks_are_padded_with_identity_exactly():
    w = np.random.default_rng(1).standard_normal((37, 53)).astype(np.float32)  # tails of 5 and 5
    pack = to_numpy(pack_weight(w, DuQuantConfig(block_size=16, block_out_size=8)))
    assert pack.r_in.shape == (4, 16, 16) and pack.r_out.shape == (5, 8, 8)
    for r, b in ((pack.r_in[-1], 53 - 48), (pack.r_out[-1], 37 - 32)):
        size = r.shape[0]
        np.testing.assert_array_equal(r[b:, b:], np.eye(size - b))
        np.testing.assert_array_equal(r[:b, b:], 0)
        np.testing.assert_array_equal(r[b:, :b], 0)
        assert max_ortho_err(r[:b, :b]) <= ORTHO_TOL


def test_out_smaller_than_block_gives_a_full_orthonormal_rotation():
    w = np.random.default_rng(2).standard_normal((3, 40)).astype(np.float32)
    pack = to_numpy(pack_weight(w, DuQuantConfig(weight_bits=16, act_bits=16)))
    assert pack.r_in.shape == (3, 16, 16)
    assert max_ortho_err(pack.r_in) <= ORTHO_TOL
    x = np.random.default_rng(3).standard_normal((6, 40)).astype(np.float32)
    assert rel_err(forward(pack, x), x.astype(np.float64) @ w.T) <= FORWARD_TOL


def test_zigzag_takes_front_and_back_alternately_with_stable_ties():
    e = np.array([5.0, 1.0, 3.0, 3.0, 0.0, 4.0])
    # descending, ties by index: order = 0, 5, 2, 3, 1, 4
    want = [0, 4, 5, 1, 2, 3]
    np.testing.assert_array_equal(ref.zigzag(e), want)
    from duquant_jax.permutation import zigzag_order

    np.testing.assert_array_equal(zigzag_order(e), want)
    for n in (1, 2, 7, 300):  # the vectorized order equals the literal one, ties included
        e = np.random.default_rng(n).integers(0, 5, n).astype(np.float64)
        np.testing.assert_array_equal(zigzag_order(e), ref.zigzag(e))


def test_lambda_smooth_never_changes_the_permutation():
    w = np.random.default_rng(4).standard_normal((20, 77)).astype(np.float32)
    perms = {tuple(np.asarray(pack_weight(w, DuQuantConfig(lambda_smooth=lam)).perm)) for lam in (0.0, 0.15, 0.9)}
    assert len(perms) == 1


def test_methods_agree_on_well_separated_blocks():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 16, 2000)) * np.arange(1.0, 17.0)[None, :, None]
    x[:, 15] *= 4  # an outlier channel
    sep = np.array([well_separated(b) for b in x])
    assert sep.sum() >= 16
    want = np.stack([ref.left_rotation(b) for b in x])
    for method in ("svd", "qr-svd"):
        got = np.asarray(left_singular_vectors(jnp.asarray(x, jnp.float32), method))
        assert np.abs(got - want)[sep].max() <= ROT_TOL, method


def test_tsqr_r_factor_matches_householder_r_up_to_row_signs():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((5, 3000, 16)).astype(np.float32)
    r = np.asarray(tall_r_factor(jnp.asarray(a), chunk=256), np.float64)
    r_ref = np.linalg.qr(a.astype(np.float64), mode="r")
    np.testing.assert_allclose(np.abs(r), np.abs(r_ref), rtol=2e-4, atol=2e-4)
    # R^T R = A^T A: the Gram matrix is preserved.
    np.testing.assert_allclose(
        np.swapaxes(r, -1, -2) @ r, np.swapaxes(a, -1, -2).astype(np.float64) @ a, rtol=1e-4, atol=1e-2
    )


def test_block_rotations_of_a_zero_block_are_orthogonal():
    m = np.zeros((32, 10), np.float32)
    m[16:] = np.random.default_rng(7).standard_normal((16, 10))
    for method in ("qr-svd", "svd", "eigh"):
        r = np.asarray(block_rotations(jnp.asarray(m), 16, method))
        assert max_ortho_err(r) <= ORTHO_TOL, method


def test_bare_qr_shortcut_breaks_the_forward():
    """The origin's failed speed-up: Q of a QR used as the rotation is not the SVD's U.

    `Q, _ = qr(W_rows.T)` then `Q.T` is (16 x in), not (16 x 16); cut to 16 x 16 it
    is not orthogonal, and the forward stops being exact. Nobody reintroduce it.
    """
    rng = np.random.default_rng(8)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    cfg = DuQuantConfig(weight_bits=16, act_bits=16)
    good = to_numpy(pack_weight(w, cfg))
    x = rng.standard_normal((10, 128)).astype(np.float32)
    y_true = x.astype(np.float64) @ w.T
    assert rel_err(ref.forward(good, x), y_true) <= FORWARD_TOL

    bad_r_out = np.empty_like(good.r_out)
    for r in range(good.r_out.shape[0]):
        q, _ = np.linalg.qr(w[r * 16 : (r + 1) * 16].T, mode="reduced")  # (in, 16)
        bad_r_out[r] = q.T[:, :16]
    assert max_ortho_err(bad_r_out) > 0.1
    # Re-pack W2 with the bad rotation the way the origin did, then run the forward.
    w1 = np.asarray(ref.pack_weight(w, DuQuantConfig(weight_bits=16, act_bits=16, row_rot_mode="none")).w_codes)
    w2_bad = np.concatenate([bad_r_out[r] @ w1[r * 16 : (r + 1) * 16] for r in range(4)])
    bad = good.replace(r_out=bad_r_out, w_codes=w2_bad.astype(np.float32))
    assert rel_err(ref.forward(bad, x), y_true) > 0.1
    # And even a square Q (QR of the 16 x in block itself) is a different rotation from U.
    q_square = np.linalg.qr(w[:16])[0]
    assert np.abs(ref.canonical_signs(q_square) - good.r_out[0]).max() > 0.1
