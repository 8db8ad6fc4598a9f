"""The README's main job: pack a generated Gemma-2B-shaped layer set and check it against the reference."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from duquant_jax import reference
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


def _rel(y: np.ndarray, y_ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))


def check_against_reference(w: jax.Array, config: DuQuantConfig, seed: int) -> dict[str, float]:
    """Packs `w` on both paths and returns SPEC's equivalence figures."""
    got = jax.tree.map(np.asarray, pack_weight(w, config))
    want = reference.pack_weight(np.asarray(w), config)
    eye = np.eye(config.block_size)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, w.shape[1])).astype(np.float32)
    w64 = np.asarray(w, np.float64)
    exact = pack_weight(w, DuQuantConfig(**{**config.to_dict(), "weight_bits": 16, "act_bits": 16}))
    y_true = x.astype(np.float64) @ w64.T
    calibrated = calibrate(pack_weight(w, config), [rng.standard_normal((256, w.shape[1])).astype(np.float32)])
    return {
        "perm_identical": float(np.array_equal(got.perm, want.perm)),
        "ortho_err": float(np.abs(np.swapaxes(got.r_in, 1, 2) @ got.r_in - eye).max()),
        "codes_identical": float(np.mean(got.w_codes == want.w_codes)),
        "codes_max_diff": float(np.abs(got.w_codes.astype(int) - want.w_codes.astype(int)).max()),
        "exact_forward_err": _rel(np.asarray(forward(exact, x), np.float64), y_true),
        "w4a8_forward_err": _rel(np.asarray(forward(calibrated, x), np.float64), y_true),
    }


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
        echo(f"{'layer':<10} {'shape':>12} {'perm':>5} {'ortho':>8} {'codes=':>8} {'max|dQ|':>7} {'exact fwd':>10} {'W4A8 fwd':>9} {'ref s':>6}")
        worst = {"ortho_err": 0.0, "exact_forward_err": 0.0, "codes_identical": 1.0}
        for name, shape in GEMMA_2B_LINEARS.items():
            w = generated_weight(shape, seed=len(name))
            t = time.perf_counter()
            r = check_against_reference(w, config, seed=1)
            echo(
                f"{name:<10} {shape[0]:>5}x{shape[1]:<6} {'ok' if r['perm_identical'] else 'DIFF':>5} "
                f"{r['ortho_err']:8.1e} {r['codes_identical'] * 100:7.3f}% {r['codes_max_diff']:7.0f} "
                f"{r['exact_forward_err']:10.1e} {r['w4a8_forward_err']:9.3f} {time.perf_counter() - t:6.1f}"
            )
            worst["ortho_err"] = max(worst["ortho_err"], r["ortho_err"])
            worst["exact_forward_err"] = max(worst["exact_forward_err"], r["exact_forward_err"])
            worst["codes_identical"] = min(worst["codes_identical"], r["codes_identical"])
        summary.update(worst)
        ok = worst["ortho_err"] <= 1e-5 and worst["exact_forward_err"] <= 1e-5
        echo(f"SPEC bounds (orthogonality <= 1e-5, exact forward <= 1e-5): {'PASS' if ok else 'FAIL'}")
        summary["ok"] = float(ok)
    return summary
