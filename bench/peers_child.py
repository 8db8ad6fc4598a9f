"""Runs inside a peer's own virtual environment (made by `bench/peers.py`): llm-compressor rows.

Gemma (`--task gemma`, the default): for each requested row this loads the float32 Gemma-3 270M afresh from the cache,
runs llm-compressor's `oneshot` with that row's recipe on the calibration chunks,
checks that the quantization is live in the model's forward (see `verify`), scores
the development and test chunks exactly as `bench/quality_models.py`
`GemmaTask.chunk_nll` does, and appends one JSON object per row to `--out`
(flushed as each row finishes, so an interrupted run keeps its finished rows).

MiniLM (`--task minilm`): `bench/peers.py` writes the sentences, their three-way split
and the float model's embeddings from our harness (sentence-transformers' `encode`) into
`--minilm-data` (an .npz); for each row this loads all-MiniLM-L6-v2's BertModel afresh
from `--model-dir` (the PyPI package's folder), quantizes every Linear (the pooler too,
as our harness does) with the row's recipe, calibrating on the calibration sentences
one at a time, and scores each development and test sentence by the cosine of its
embedding (mean pooling over the attention mask, L2-normalized: the model's own
sentence-transformers pipeline, written out here) to the float embedding.

This file imports nothing from the main environment except `bench/quality_data.py`
(numpy only) when it is importable; it needs torch, transformers, datasets and
llmcompressor from the venv. Usage (normally through `bench/peers.py`):

    python bench/peers_child.py --model-dir DIR --tokens FILE.npy --rows ROW[,ROW] --out OUT.jsonl [--quick]
    python bench/peers_child.py --task minilm --model-dir DIR --minilm-data FILE.npz --rows ROW[,ROW] --out OUT.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

BOS_FALLBACK = 2
CHUNK = 512
TOTAL, N_CALIB, N_DEV, N_TEST = 220, 16, 40, 96

AUTOROUND_FEW = 20  # iterations per block of the cheaper AutoRound row (its default is 200)

# Row name -> (column, recipe kind); the recipe is built by `build_recipe`.
ROWS: dict[str, str] = {
    "float": "float",
    "llmc-gptq-w4a16-g128": "W4A16",
    "llmc-smoothquant-gptq-w8a8": "W8A8",
    "llmc-quip-gptq-w4a16-g128": "W4A16",
    "llmc-quip-gptq-w4a4": "W4A4",
    "llmc-quip-gptq-w4a8": "W4A8",
    "llmc-gptq-w4a8": "W4A8",
    # AutoRound (sign-gradient rounding and clipping per block, llm-compressor's AutoRoundModifier over the
    # auto-round package): W4A16 int4 g128, at its default 200 iterations per block and at AUTOROUND_FEW.
    "llmc-autoround-w4a16-g128": "W4A16",
    f"llmc-autoround-w4a16-g128-iters{AUTOROUND_FEW}": "W4A16",
    # SmoothQuant with mappings that match Gemma-3's block (the MLP reads
    # pre_feedforward_layernorm; post_attention_layernorm normalizes the attention output).
    "llmc-smoothquant-gemmamap-gptq-w8a8": "W8A8",
    # Diagnostics (no quantization): does the smoothing alone keep the float function?
    "diag-smoothquant-only": "float",
    "diag-smoothquant-gemmamap-only": "float",
}

# MiniLM rows (every Linear quantized; no SmoothQuant row: llm-compressor has no mappings for BERT's
# post-norm blocks, whose q/k/v read the previous block's output LayerNorm).
MINILM_ROWS: dict[str, str] = {
    "float": "float",
    "llmc-gptq-w8a8": "W8A8",
    "llmc-gptq-w4a16-g128": "W4A16",
    "llmc-gptq-w4a8": "W4A8",
    "llmc-quip-gptq-w4a16-g128": "W4A16",
    "llmc-quip-gptq-w4a8": "W4A8",
    "llmc-quip-gptq-w4a4": "W4A4",
}
MINILM_MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length
MINILM_BATCH = 16  # the harness's encode batch size

# llm-compressor 0.14's registry maps Gemma3ForCausalLM to DEFAULT_SMOOTHQUANT_MAPPINGS,
# whose second entry smooths post_attention_layernorm into gate/up_proj.
GEMMA3_SMOOTHQUANT_MAPPINGS = [
    [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
    [["re:.*gate_proj", "re:.*up_proj"], "re:.*pre_feedforward_layernorm"],
]


def seeded_parts(seed: int, total: int, *sizes: int) -> list[np.ndarray]:
    """`bench/quality_data.py` `seeded_parts`, imported from there when possible, else the same code."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quality_data import seeded_parts as theirs  # type: ignore

        return theirs(seed, total, *sizes)
    except Exception:  # pragma: no cover - fallback replica
        order = np.random.default_rng(seed).permutation(total)
        bounds = np.cumsum([0, *sizes])
        return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def replica_parts(seed: int, total: int, *sizes: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(total)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def build_recipe(row: str):
    """The llm-compressor modifiers of `row` (a list; empty for "float")."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SmoothQuantModifier

    gptq = dict(targets="Linear", ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder="static")
    quip = lambda: QuIPModifier(rotations=["v"], transform_type="random-hadamard", targets="Linear", ignore="lm_head")  # noqa: E731
    if row == "float":
        return []
    if row == "llmc-gptq-w4a16-g128":
        return [GPTQModifier(scheme="W4A16", **gptq)]
    if row == "llmc-smoothquant-gptq-w8a8":
        return [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme="W8A8", **gptq)]
    if row == "llmc-quip-gptq-w4a16-g128":
        return [quip(), GPTQModifier(scheme="W4A16", **gptq)]
    if row == "llmc-quip-gptq-w4a4":
        return [quip(), GPTQModifier(scheme="W4A4", **gptq)]
    if row == "llmc-quip-gptq-w4a8":
        return [quip(), GPTQModifier(scheme="W4A8", **gptq)]
    if row == "llmc-gptq-w4a8":
        return [GPTQModifier(scheme="W4A8", **gptq)]
    if row == "llmc-gptq-w8a8":
        return [GPTQModifier(scheme="W8A8", **gptq)]
    if row.startswith("llmc-autoround-w4a16-g128"):
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        iters = AUTOROUND_FEW if row.endswith(f"-iters{AUTOROUND_FEW}") else 200
        # batch_size 1: the calibration set is 16 chunks of 513 tokens; torch.compile off (CPU, 2 cores)
        return [AutoRoundModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], iters=iters, batch_size=1,
                                  enable_torch_compile=False)]
    if row == "llmc-smoothquant-gemmamap-gptq-w8a8":
        return [SmoothQuantModifier(smoothing_strength=0.8, mappings=GEMMA3_SMOOTHQUANT_MAPPINGS), GPTQModifier(scheme="W8A8", **gptq)]
    if row == "diag-smoothquant-only":
        return [SmoothQuantModifier(smoothing_strength=0.8)]
    if row == "diag-smoothquant-gemmamap-only":
        return [SmoothQuantModifier(smoothing_strength=0.8, mappings=GEMMA3_SMOOTHQUANT_MAPPINGS)]
    raise SystemExit(f"unknown row {row!r}; known: {', '.join(ROWS)}")


def recipe_text(modifiers) -> str:
    """The recipe as llm-compressor serializes it (YAML), or the modifiers' repr if that fails."""
    if not modifiers:
        return ""
    try:
        from llmcompressor.recipe import Recipe

        return Recipe.from_modifiers(modifiers).yaml()
    except Exception as e:  # pragma: no cover
        return "# Recipe.yaml() failed: " + repr(e) + "\n" + "\n".join(repr(m) for m in modifiers)


def load_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def chunk_ids(chunks: np.ndarray, i: int, bos: int):
    import torch

    ids = np.concatenate([[bos], chunks[i]])
    return torch.from_numpy(ids.astype(np.int64))[None]


def chunk_nll(model, chunks: np.ndarray, indices, bos: int) -> list[float]:
    """`GemmaTask.chunk_nll`: mean NLL (nats/token) of each chunk after BOS."""
    import torch
    from torch import nn

    out = []
    with torch.no_grad():
        for i in indices:
            ids = chunk_ids(chunks, int(i), bos)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            out.append(float(nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean")))
    return out


def linear_names(model) -> list[str]:
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def verify(model, float_weights: dict, row: str, sample: str = "model.layers.3.mlp.down_proj",
           targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) -> dict:
    """Checks that the quantization is live in `model`'s forward; returns the evidence.

    - every quantized linear (`targets`: the last name parts; empty: every Linear) has a
      `quantization_scheme`, its status is FROZEN (fake-quantized forward, not compressed),
      lm_head has none;
    - the weights that forward uses differ from the float ones (relative L2 change);
    - for int weights, `weight / weight_scale` is integral within the bit range on one
      sample layer (the stored weight is the GPTQ-quantized one);
    - the whole-layer effect of the compressed-tensors wrapper: a random input through
      the sample layer with `quantization_enabled` True vs False (differs only when
      activation quantization is on, since the weight is already on its grid);
    - QuIP: the online input transform (a forward pre-hook / submodule) is present and
      changes the sample layer's output vs `F.linear(x, W)`.
    """
    import torch
    from torch import nn

    ev: dict = {}
    names = linear_names(model)
    ev["linears"] = len(names)
    proj = [n for n in names if not targets or n.split(".")[-1] in targets]
    ev["projections"] = len(proj)
    ev["other_linears"] = [n for n in names if n not in proj]
    mods = dict(model.named_modules())
    statuses = {}
    schemes = set()
    for n in proj:
        m = mods[n]
        s = getattr(m, "quantization_scheme", None)
        statuses[str(getattr(m, "quantization_status", None))] = statuses.get(str(getattr(m, "quantization_status", None)), 0) + 1
        if s is not None:
            w = s.weights
            a = s.input_activations
            schemes.add(f"w:{w.num_bits}b {w.strategy} g{w.group_size} sym={w.symmetric} actorder={w.actorder}" if w else "w:none")
            schemes.add(f"a:{a.num_bits}b {a.strategy} dynamic={a.dynamic} sym={a.symmetric}" if a else "a:none")
    ev["statuses"] = statuses
    ev["schemes"] = sorted(schemes)
    ev["lm_head_scheme"] = str(getattr(mods.get("lm_head"), "quantization_scheme", None))
    # relative weight change over all projections
    changes = []
    for n in proj:
        w = mods[n].weight.detach().float()
        f = float_weights[n]
        changes.append(float((w - f).norm() / f.norm()))
    ev["weight_rel_change"] = {"min": min(changes), "max": max(changes), "mean": float(np.mean(changes))} if changes else None
    m = mods[sample]
    ev["sample"] = sample
    s = getattr(m, "quantization_scheme", None)
    if s is not None and s.weights is not None and hasattr(m, "weight_scale"):
        w = m.weight.detach().float()
        scale = m.weight_scale.detach().float()
        if s.weights.group_size:
            g = s.weights.group_size
            q = w.reshape(w.shape[0], -1, g) / scale.reshape(w.shape[0], -1, 1)
        else:
            q = w / scale.reshape(w.shape[0], -1)
        q = q.flatten()
        ev["sample_int_grid"] = {
            "max_abs_frac": float((q - q.round()).abs().max()),
            "min": float(q.round().min()),
            "max": float(q.round().max()),
            "distinct": int(torch.unique(q.round()).numel()),
        }
    hooks = {
        "forward_pre_hooks": len(m._forward_pre_hooks),
        "forward_hooks": len(m._forward_hooks),
        "children": [c for c, _ in m.named_children()],
    }
    ev["sample_hooks"] = hooks
    torch.manual_seed(0)
    x = torch.randn(2, 7, m.in_features) * 3
    with torch.no_grad():
        y_on = m(x)
        m.quantization_enabled = False
        y_off = m(x)
        m.quantization_enabled = True
        y_plain = nn.functional.linear(x, m.weight, m.bias)
    ev["sample_rel_diff_enabled_vs_disabled"] = float((y_on - y_off).norm() / y_off.norm())
    ev["sample_rel_diff_module_vs_F_linear_W"] = float((y_on - y_plain).norm() / y_plain.norm())
    return ev


def versions() -> dict:
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers

    return {
        "llmcompressor": getattr(llmcompressor, "__version__", "?"),
        "compressed_tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def sentence_embeddings(model, tokenizer, texts: list[str]):
    """(len(texts), hidden) float32 NumPy: all-MiniLM-L6-v2's sentence-transformers pipeline written out
    (tokenize with padding and truncation to MINILM_MAX_TOKENS, the BertModel, mean over the attention
    mask, L2 normalization), in batches of MINILM_BATCH."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), MINILM_BATCH):
            enc = tokenizer(texts[i : i + MINILM_BATCH], padding=True, truncation=True, max_length=MINILM_MAX_TOKENS,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, p=2, dim=1).float().numpy())
    return np.concatenate(out)


def cosines(got: np.ndarray, ref: np.ndarray) -> list[float]:
    """Per-row cosine, as `quality_models.MiniLMTask.item_cosines`."""
    return (np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))).tolist()


def _failed(rec: dict, e: Exception) -> None:
    """Marks a row's record as failed, with the error and the end of its traceback (also on stderr)."""
    rec["ok"] = False
    rec["error"] = f"{type(e).__name__}: {e}"
    rec["traceback"] = traceback.format_exc()[-6000:]
    print(rec["traceback"], file=sys.stderr, flush=True)


def _write_row(rec: dict, out: Path, t_row: float) -> None:
    """Appends a finished row's record to `out` (flushed), prints its summary and frees the row's state."""
    rec["row_s"] = time.time() - t_row
    rec["when"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
    print(json.dumps({k: rec.get(k) for k in ("row", "ok", "value", "times", "error")}), flush=True)
    _reset_session()


def minilm_main(args, rows: list[str]) -> int:
    """The MiniLM rows (module docstring): one JSON object per row appended to `args.out`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModel, AutoTokenizer

    data = np.load(args.minilm_data, allow_pickle=False)
    texts = [str(t) for t in data["sentences"]]
    parts = {k: data[k].astype(np.int64) for k in ("calib", "dev", "test")}
    if args.quick:
        parts = {"calib": parts["calib"][:4], "dev": parts["dev"][:16], "test": parts["test"][:16]}
    ref = {k: data[f"ref_{k}"][: len(parts[k])] for k in ("dev", "test")}
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    vers = versions()
    print(json.dumps({"versions": vers, "sentences": len(texts), **{k: len(v) for k, v in parts.items()}}), flush=True)
    calib_ds = Dataset.from_dict(dict(tokenizer([texts[i] for i in parts["calib"]], truncation=True,
                                                max_length=MINILM_MAX_TOKENS)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        t_row = time.time()
        rec: dict = {"model": "minilm", "row": row, "column": MINILM_ROWS[row], "versions": vers, "quick": args.quick}
        try:
            model = AutoModel.from_pretrained(args.model_dir, dtype=torch.float32).eval()
            float_weights = {n: m.weight.detach().clone().float() for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear)}
            modifiers = build_recipe(row)
            rec["recipe"] = recipe_text(modifiers)
            quantize_s = 0.0
            if modifiers:
                from llmcompressor import oneshot

                t = time.time()
                model = oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, dataset=calib_ds,
                                num_calibration_samples=len(parts["calib"]), shuffle_calibration_samples=False,
                                max_seq_length=MINILM_MAX_TOKENS, batch_size=1, sequential_targets=["BertLayer"])
                quantize_s = time.time() - t
                model.eval()
                rec["verify"] = verify(model, float_weights, row, sample="encoder.layer.3.intermediate.dense", targets=())
                print(json.dumps({"row": row, "verify": rec["verify"]}), flush=True)
            del float_weights
            t = time.time()
            rec["per_item"] = {k: cosines(sentence_embeddings(model, tokenizer, [texts[i] for i in parts[k]]), ref[k])
                               for k in ("dev", "test")}
            rec["times"] = {"quantize_s": quantize_s, "eval_s": time.time() - t}
            rec["indices"] = {k: v.tolist() for k, v in parts.items()}
            rec["value"] = {k: float(np.mean(v)) for k, v in rec["per_item"].items()}
            rec["ok"] = True
        except Exception as e:
            _failed(rec, e)
        _write_row(rec, out, t_row)
        model = None
    return 0


def _reset_session() -> None:
    """llm-compressor keeps one global session: reset it between rows."""
    try:
        from llmcompressor.core import active_session

        active_session().reset()
    except Exception:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("gemma", "minilm"), default="gemma")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--tokens", help="gemma: the tokens-*.npy file of the corpus (int32 ids, no special tokens)")
    p.add_argument("--minilm-data", help="minilm: the .npz of sentences, split and float embeddings (bench/peers.py)")
    p.add_argument("--rows", required=True, help="comma-separated row names: " + ", ".join(ROWS))
    p.add_argument("--out", required=True, help="JSONL file to append one object per row to")
    p.add_argument("--quick", action="store_true", help="1 calibration chunk, 2 dev and 1 test chunk (a smoke test)")
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    known = MINILM_ROWS if args.task == "minilm" else ROWS
    for r in rows:
        if r not in known:
            raise SystemExit(f"unknown {args.task} row {r!r}; known: {', '.join(known)}")
    if args.task == "minilm":
        if not args.minilm_data:
            raise SystemExit("--task minilm needs --minilm-data")
        return minilm_main(args, rows)
    if not args.tokens:
        raise SystemExit("--task gemma needs --tokens")
    from datasets import Dataset
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    bos = tokenizer.bos_token_id
    if bos != BOS_FALLBACK:
        raise SystemExit(f"tokenizer.bos_token_id is {bos}, expected {BOS_FALLBACK}")
    ids = np.load(args.tokens)
    n = len(ids) // CHUNK
    if n != TOTAL:
        raise SystemExit(f"{args.tokens}: {n} chunks of {CHUNK}, expected {TOTAL}")
    chunks = np.asarray(ids[: n * CHUNK]).reshape(n, CHUNK)
    calib, dev, test = seeded_parts(0, TOTAL, N_CALIB, N_DEV, N_TEST)
    for a, b in zip((calib, dev, test), replica_parts(0, TOTAL, N_CALIB, N_DEV, N_TEST)):
        assert np.array_equal(a, b), "quality_data.seeded_parts disagrees with the replica"
    if args.quick:
        calib, dev, test = calib[:1], dev[:2], test[:1]
    vers = versions()
    print(json.dumps({"versions": vers, "calib": calib.tolist(), "bos": bos}), flush=True)

    calib_ds = Dataset.from_dict({
        "input_ids": [[bos] + chunks[i].astype(int).tolist() for i in calib],
        "attention_mask": [[1] * (CHUNK + 1) for _ in calib],
    })

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        t_row = time.time()
        rec: dict = {"row": row, "column": ROWS[row], "versions": vers, "quick": args.quick}
        try:
            model = load_model(args.model_dir)
            names = linear_names(model)
            rec["linears_before"] = names if len(names) < 10 else {"count": len(names), "non_proj": [n for n in names if not n.endswith("_proj")]}
            float_weights = {n: m.weight.detach().clone().float() for n, m in model.named_modules() if n.endswith("_proj")}
            modifiers = build_recipe(row)
            rec["recipe"] = recipe_text(modifiers)
            quantize_s = 0.0
            if modifiers:
                from llmcompressor import oneshot

                t = time.time()
                model = oneshot(
                    model=model,
                    tokenizer=tokenizer,
                    recipe=modifiers,
                    dataset=calib_ds,
                    num_calibration_samples=len(calib),
                    shuffle_calibration_samples=False,
                    max_seq_length=CHUNK + 1,
                    batch_size=1,
                )
                quantize_s = time.time() - t
                model.eval()
                rec["verify"] = verify(model, float_weights, row)
                print(json.dumps({"row": row, "verify": rec["verify"]}), flush=True)
            del float_weights
            t = time.time()
            rec["per_item"] = {"dev": chunk_nll(model, chunks, dev, bos), "test": chunk_nll(model, chunks, test, bos)}
            eval_s = time.time() - t
            rec["indices"] = {"calib": calib.tolist(), "dev": dev.tolist(), "test": test.tolist()}
            rec["value"] = {k: math.exp(float(np.mean(v))) for k, v in rec["per_item"].items()}
            rec["times"] = {"quantize_s": quantize_s, "eval_s": eval_s}
            rec["ok"] = True
        except Exception as e:
            _failed(rec, e)
        _write_row(rec, out, t_row)
        model = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
