"""Checks of `interop.export` (compressed-tensors export) on real models; results go to bench/export_check.md.

    python bench/export_check.py permute            # MiniLM: quality cost of enable_permute=False per preset
    python bench/export_check.py minilm             # MiniLM layers: compressed-tensors' own decompression/forward vs ours
    python bench/export_check.py gemma              # Gemma-3 270M: export, transformers from_pretrained, log-probs vs ours
    python bench/export_check.py sensitivity EXPORT # a W8A8 export: ours vs transformers per layer in situ, and the
                                                    # model's own spread under 1e-6 noise (why whole-model log-probs differ)

Each subcommand prints one JSON object per measurement (the numbers quoted in
bench/export_check.md). Models and data: bench/quality_models.py, bench/quality_data.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_models import GemmaTask, MiniLMTask  # noqa: E402

from duquant_jax import DuQuantConfig  # noqa: E402


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _quantize(task, config: DuQuantConfig, filter_fn=None):
    """A quantized copy of `task`'s float model (observe with XᵀX first when the config needs stats)."""
    from interop import observe, quantize_

    model = task.float_model()
    filter_fn = filter_fn or task.filter_fn
    stats = None
    if config.needs_stats:
        with observe(model, filter_fn, xtx=config.needs_xtx) as stats:
            task.run_calibration(model)
    quantize_(model, config, filter_fn, progress=False, stats=stats)
    return model


def permute_cost(presets: list[str], n_eval: int) -> None:
    """Mean cosine (held-out MiniLM sentences) of each preset with and without enable_permute."""
    task = MiniLMTask(n_eval=n_eval)
    for preset in presets:
        for variant in ({}, {"enable_permute": False}, {"rotation": "none"}, {"rotation": "none", "enable_permute": False}):
            t = time.perf_counter()
            config = DuQuantConfig.preset(preset, **variant)
            value = task.evaluate(_quantize(task, config))
            _emit({"check": "permute", "model": "minilm", "preset": preset, "overrides": variant,
                   "n_eval": len(task.split.eval), "mean_cosine": value, "seconds": round(time.perf_counter() - t, 1)})


GEMMA_EXPORTS = {
    "w8a8-none": dict(preset="w8a8", rotation="none"),
    "w4a16-g128-none": dict(preset="w4a16", rotation="none", enable_permute=False),
    "w8a8-hadamard-nopermute": dict(preset="w8a8", enable_permute=False),  # rotated: online transforms
}


def gemma_config(label: str) -> DuQuantConfig:
    spec = dict(GEMMA_EXPORTS[label])
    return DuQuantConfig.preset(spec.pop("preset"), **spec)


@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """ids (1, T) -> (T-1,) float64 log-probability of each next token."""
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
    return torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]


def _layer_checks(model, export_dir: Path, names: list[str]) -> dict:
    """compressed-tensors' own layers (interop.export.reference: its transform hook, activation quantization and
    decompressed weight) against ours on random inputs (32 tokens per layer).

    Per element, |y_ours - y_ct| / (|x3_t| |W_i|) is reported for our float32 paths and our default (fastest,
    possibly bfloat16) paths. `over_bound` is the largest error divided by its bound: 1e-5 |x3||W| (float32) or
    2e-2 |x3||W| (default), plus, with int activations, the activation-rounding term sqrt(in) (s_ours + s_ct) / 2
    |W_i| (compressed-tensors' dynamic scale is absmax/127.5, ours absmax/127): <= 1 passes.
    """
    from interop.export.reference import ct_linears
    from interop.kernels import kernel_options

    ct = ct_linears(export_dir)
    worst = {"weight_exact": True, "max_rel_err_fp32": 0.0, "max_rel_err_default": 0.0,
             "over_bound_fp32": 0.0, "over_bound_default": 0.0, "transform_max_rel_err": 0.0}
    gen = torch.Generator().manual_seed(3)
    for name in names:
        ours, lin = model.get_submodule(name), ct[name]
        x = torch.randn(32, ours.in_features, generator=gen)
        w_hat = ours.qweight.dequantize()
        if not ours.config.rotate_inputs:
            w_hat = w_hat[:, torch.argsort(ours.perm)]
        worst["weight_exact"] &= bool(torch.equal(lin.weight.float(), w_hat))
        with torch.no_grad():
            x2 = ours.rotate_input(x) if ours.config.rotate_inputs else x
            hooks = [m for k, m in lin.named_children() if k.endswith("_input")]
            if hooks:
                x2_ct = hooks[0](x)
                worst["transform_max_rel_err"] = max(worst["transform_max_rel_err"], float((x2_ct - x2).norm() / x2.norm()))
            y_ct = lin(x)
            with kernel_options(precision="float32"):
                y32 = ours(x)
            y = ours(x)
        denom = x2.norm(dim=1, keepdim=True) * w_hat.norm(dim=1)[None]
        act = 0.0
        if ours.config.quantize_acts:
            step = x2.abs().amax(dim=1, keepdim=True) * (1 / 127 + 1 / 127.5) / 2
            act = step * x2.shape[1] ** 0.5 * w_hat.norm(dim=1)[None]
        for key, got, tol in (("fp32", y32, 1e-5), ("default", y, 2e-2)):
            err = (got - y_ct).abs()
            worst[f"max_rel_err_{key}"] = max(worst[f"max_rel_err_{key}"], float((err / denom).max()))
            worst[f"over_bound_{key}"] = max(worst[f"over_bound_{key}"], float((err / (tol * denom + act)).max()))
    return worst


MINILM_CONFIGS = {
    "w8a8-none": dict(preset="w8a8", rotation="none"),
    "w8a8-hadamard (preset)": dict(preset="w8a8"),
    "w4a16-g128-hadamard-rtn": dict(preset="w4a16", weight_method="rtn"),
    "w4a16-g128-none-rtn": dict(preset="w4a16", weight_method="rtn", rotation="none", enable_permute=False),
}


def minilm_checks() -> None:
    """MiniLM's encoder linears: compressed-tensors' own layers (with transform hooks) vs ours; import round trip."""
    import tempfile

    from interop.export import export_compressed_tensors, import_compressed_tensors

    task = MiniLMTask(n_calib=32, n_eval=64)
    float_config = task._model[0].auto_model.config.to_dict()
    for label, spec in MINILM_CONFIGS.items():
        t = time.perf_counter()
        spec = dict(spec)
        config = DuQuantConfig.preset(spec.pop("preset"), **spec)
        model = _quantize(task, config).eval()
        with tempfile.TemporaryDirectory() as d:
            export_compressed_tensors(model, d, float_config=float_config)
            names = [n for n, m in model.named_modules() if type(m).__name__ == "DuQuantLinear"]
            rec = {"check": "minilm-layers", "label": label, "layers": len(names), **_layer_checks(model, Path(d), names)}
            back = import_compressed_tensors(task.float_model(), d)
            rec["import_bit_exact"] = bool((task._embed(back, task.split.eval[:32]) == task._embed(model, task.split.eval[:32])).all())
        rec["seconds"] = round(time.perf_counter() - t, 1)
        _emit(rec)


@contextlib.contextmanager
def ct_activation_rounding():
    """Our kernels with compressed-tensors' dynamic int8 rounding: scale absmax / 127.5, codes clamped to [-128, 127]
    (ours: absmax / 127). Only to show that this convention is the whole difference to its forward."""
    import interop.kernels as k

    def tokens(x2, act, act_scale=None):
        xf = x2.float()
        s = (xf.abs().amax(dim=1, keepdim=True) / ((2**act.bits - 1) / 2)).clamp(min=k.DYNAMIC_EPS)
        return (xf / s).round().clamp(-(2 ** (act.bits - 1)), 2 ** (act.bits - 1) - 1).to(torch.int8), s

    saved = k.quantize_tokens
    k.quantize_tokens = tokens
    try:
        yield
    finally:
        k.quantize_tokens = saved


def gemma_checks(labels: list[str], n_calib: int, n_chunks: int, out_root: Path, rotated: bool) -> None:
    """Export Gemma-3 270M, load it with transformers, compare per-token log-probs with ours."""
    from transformers import AutoModelForCausalLM

    from interop.export import check_plain_loadable, export_compressed_tensors, import_compressed_tensors
    from interop.kernels import kernel_options

    task = GemmaTask(n_calib=n_calib, n_eval=n_chunks)
    chunks = [task._ids(int(i)) for i in task.split.eval[:n_chunks]]
    float_lp = torch.cat([token_logprobs(task._model, ids) for ids in chunks])
    for label in labels + (["w8a8-hadamard"] if rotated else []):
        t = time.perf_counter()
        config = DuQuantConfig.preset("w8a8") if label == "w8a8-hadamard" else gemma_config(label)
        model = _quantize(task, config).eval()
        out = out_root / f"gemma-{label}"
        export_compressed_tensors(model, out)
        rec = {"check": "gemma", "label": label, "config": config.to_dict(), "export_dir": str(out),
               "export_mb": round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20, 1),
               "n_chunks": n_chunks, "tokens": int(float_lp.numel())}
        with kernel_options(precision="float32"):
            ours32 = torch.cat([token_logprobs(model, ids) for ids in chunks])
        ours = torch.cat([token_logprobs(model, ids) for ids in chunks])
        rec["nll_float"], rec["nll_ours_fp32"], rec["nll_ours_default"] = (float(-v.mean()) for v in (float_lp, ours32, ours))
        names = [n for n, _ in model.named_modules() if n.endswith(("layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "layers.17.self_attn.o_proj"))]
        rec["ct_layers"] = {"layers": names, **_layer_checks(model, out, names)}
        if config.quantize_acts:
            with kernel_options(precision="float32"), ct_activation_rounding():
                ct_round = torch.cat([token_logprobs(model, ids) for ids in chunks])
            rec["nll_ours_ct_rounding"] = float(-ct_round.mean())
        rec["mean_abs_dlogprob_float_vs_ours_fp32"] = float((float_lp - ours32).abs().mean())
        fresh = task.float_model()
        back = import_compressed_tensors(fresh, out)
        rec["import_bit_exact"] = bool(all(torch.equal(token_logprobs(back, ids), token_logprobs(model, ids)) for ids in chunks[:1]))
        del back, fresh
        try:
            check_plain_loadable(out)
        except Exception as e:
            rec["plain_loader_refused"] = str(e)[:200]
        else:
            hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
            rec["hf_linear_types"] = sorted({type(m).__name__ for n, m in hf.named_modules() if n.endswith("q_proj")})
            hf_lp = torch.cat([token_logprobs(hf, ids) for ids in chunks])
            rec["nll_transformers"] = float(-hf_lp.mean())
            rec["max_abs_dlogprob_hf_vs_ours_fp32"] = float((hf_lp - ours32).abs().max())
            rec["mean_abs_dlogprob_hf_vs_ours_fp32"] = float((hf_lp - ours32).abs().mean())
            rec["max_abs_dlogprob_hf_vs_ours_default"] = float((hf_lp - ours).abs().max())
            if config.quantize_acts:
                rec["max_abs_dlogprob_hf_vs_ours_ct_rounding"] = float((hf_lp - ct_round).abs().max())
                rec["mean_abs_dlogprob_hf_vs_ours_ct_rounding"] = float((hf_lp - ct_round).abs().mean())
            rec["ppl_transformers"], rec["ppl_ours_fp32"] = math.exp(rec["nll_transformers"]), math.exp(rec["nll_ours_fp32"])
            del hf
        rec["seconds"] = round(time.perf_counter() - t, 1)
        _emit(rec)
        del model


def _capture_inputs(model, names: list[str]) -> tuple[dict, list]:
    """Forward hooks that keep the input of each named module (name -> tensor) on the next forward."""
    caps, handles = {}, []
    for n, m in model.named_modules():
        if n in names:
            handles.append(m.register_forward_hook(lambda _m, a, _o, n=n: caps.__setitem__(n, a[0].detach().clone())))
    return caps, handles


def sensitivity(export_dir: Path, n_chunks: int, seeds: int, noise: float) -> None:
    """Why a W8A8 export's whole-model log-probs differ from ours in transformers although every layer agrees.

    1. In situ, per layer: the inputs transformers' model feeds each quantized layer, run through our layer with
       compressed-tensors' activation rounding (`ct_activation_rounding`) and our float32 paths: max error relative
       to the output's absmax (float round-off when the two agree).
    2. The inputs of q_proj and down_proj of every block, ours against transformers', on the same tokens: how a
       difference grows through the blocks.
    3. The model's own spread: transformers' model against itself with the embedding multiplied by (1 + noise·N(0,1))
       for `seeds` seeds: mean |Δ log-prob| and NLL range. A difference between ours and transformers no larger than
       this is the model's sensitivity (an activation code that flips on round-off changes what follows), not a
       mismatch of the two implementations.
    """
    from transformers import AutoModelForCausalLM

    from interop.export import import_compressed_tensors
    from interop.kernels import kernel_options

    task = GemmaTask(n_calib=1, n_eval=n_chunks)
    chunks = [task._ids(int(i)) for i in task.split.eval[:n_chunks]]
    ours = import_compressed_tensors(task.float_model(), export_dir).eval()
    hf = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    linears = [n for n, m in ours.named_modules() if type(m).__name__ == "DuQuantLinear"]
    caps, handles = _capture_inputs(hf, linears)
    mine, mine_handles = _capture_inputs(ours, linears)
    ids = chunks[0][:, :256]
    with torch.no_grad(), kernel_options(precision="float32"), ct_activation_rounding():
        out_hf = {}
        hooks = [hf.get_submodule(n).register_forward_hook(lambda _m, _a, o, n=n: out_hf.__setitem__(n, o.detach().clone())) for n in linears]
        hf(input_ids=ids, use_cache=False)
        ours(input_ids=ids, use_cache=False)
        for h in handles + mine_handles + hooks:
            h.remove()
        per_layer = max(float((ours.get_submodule(n)(caps[n]) - out_hf[n]).abs().max() / out_hf[n].abs().max()) for n in linears)
    growth = {n.split(".")[2] + "." + n.split(".")[-1]: float((mine[n] - caps[n]).abs().max() / mine[n].abs().max())
              for n in linears if n.endswith(("q_proj", "down_proj"))}
    _emit({"check": "sensitivity", "export_dir": str(export_dir), "layers": len(linears), "tokens": int(ids.shape[1]),
           "per_layer_in_situ_max_rel_err": per_layer, "input_rel_diff_by_block": growth})

    def logprobs(model, ct: bool = False):
        with torch.no_grad(), kernel_options(precision="float32"), ct_activation_rounding() if ct else contextlib.nullcontext():
            return torch.cat([token_logprobs(model, c) for c in chunks])

    lp_hf, lp_ours, lp_ours_ct = logprobs(hf), logprobs(ours), logprobs(ours, ct=True)
    emb = hf.model.embed_tokens.weight
    clean = emb.data.clone()
    spread = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        emb.data.copy_(clean * (1 + noise * torch.randn(clean.shape, generator=gen)))
        lp = logprobs(hf)
        spread.append({"seed": seed, "mean_abs_dlogprob": float((lp - lp_hf).abs().mean()),
                       "max_abs_dlogprob": float((lp - lp_hf).abs().max()), "nll": float(-lp.mean())})
    emb.data.copy_(clean)

    def diff(a):
        return {"mean_abs_dlogprob": float((a - lp_hf).abs().mean()), "max_abs_dlogprob": float((a - lp_hf).abs().max()), "nll": float(-a.mean())}

    _emit({"check": "sensitivity-logprobs", "tokens": int(lp_hf.numel()), "noise": noise, "nll_transformers": float(-lp_hf.mean()),
           "ours_vs_transformers": diff(lp_ours), "ours_ct_rounding_vs_transformers": diff(lp_ours_ct),
           "transformers_noisy_vs_itself": spread})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("permute")
    a.add_argument("--presets", default="w8a8,w4a16,w4a8,w4a4")
    a.add_argument("--n-eval", type=int, default=384)
    g = sub.add_parser("gemma")
    g.add_argument("--labels", default="w8a8-none,w4a16-g128-none")
    g.add_argument("--n-calib", type=int, default=4)
    g.add_argument("--n-chunks", type=int, default=3)
    g.add_argument("--out", type=Path, default=Path("/tmp/duquant-export"))
    g.add_argument("--rotated", action="store_true", help="also export the w8a8 preset (rotated) and check the refusal")
    sub.add_parser("minilm")
    n = sub.add_parser("sensitivity")
    n.add_argument("export_dir", type=Path, help="a W8A8 rotation-free export written by the gemma subcommand")
    n.add_argument("--n-chunks", type=int, default=3)
    n.add_argument("--seeds", type=int, default=4)
    n.add_argument("--noise", type=float, default=1e-6)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.cmd == "permute":
        permute_cost(args.presets.split(","), args.n_eval)
    elif args.cmd == "minilm":
        minilm_checks()
    elif args.cmd == "gemma":
        gemma_checks(args.labels.split(","), args.n_calib, args.n_chunks, args.out, args.rotated)
    elif args.cmd == "sensitivity":
        sensitivity(args.export_dir, args.n_chunks, args.seeds, args.noise)


if __name__ == "__main__":
    main()
