"""The origin's per-layer .npz exchange format: round trip, any signs, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from duquant_jax import DuQuantConfig, forward, pack_weight
from interop.exchange import export_npz, import_npz

from helpers import FORWARD_TOL, rel_err


@pytest.mark.parametrize("shape", [(40, 37), (16, 64)])
def test_npz_round_trip_gives_the_same_pack(tmp_path, shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    pack = pack_weight(w, DuQuantConfig(block_out_size=8))
    path = export_npz(pack, tmp_path / "layer.npz")
    z = np.load(path)
    assert {"perm", "Rin_0", "Rout_0", "R_in_blocks", "R_out_blocks", "weight_scale", "meta"} <= set(z.files)
    assert json.loads(str(z["meta"]))["in_features"] == shape[1]
    back = import_npz(path, w, DuQuantConfig())
    for field in ("perm", "r_in", "r_out", "w_scale"):
        np.testing.assert_allclose(np.asarray(getattr(back, field)), np.asarray(getattr(pack, field)), atol=1e-6)
    assert np.mean(np.asarray(back.w_codes) == np.asarray(pack.w_codes)) >= 0.999


def test_npz_rotations_of_any_sign_keep_the_forward_exact(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 50)).astype(np.float32)
    cfg = DuQuantConfig(weight_bits=16, act_bits=16)
    path = export_npz(pack_weight(w, cfg), tmp_path / "layer.npz")
    z = dict(np.load(path))
    for k in range(int(z["R_in_blocks"])):  # flip every other column, as another SVD may
        z[f"Rin_{k}"][:, ::2] *= -1
    np.savez(tmp_path / "flipped.npz", **z)
    pack = import_npz(tmp_path / "flipped.npz", w, cfg)
    x = rng.standard_normal((5, 50)).astype(np.float32)
    assert rel_err(forward(pack, x), x.astype(np.float64) @ w.T) <= FORWARD_TOL


def test_bad_npz_files_are_named(tmp_path):
    w = np.ones((8, 8), np.float32)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        import_npz(bad, w)
    path = export_npz(pack_weight(np.random.default_rng(2).standard_normal((8, 8)).astype(np.float32)), tmp_path / "l.npz")
    with pytest.raises(ValueError, match=r"packs a \(8, 8\) weight; got \(8, 9\)"):
        import_npz(path, np.ones((8, 9), np.float32))
