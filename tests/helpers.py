"""Shared test helpers: SPEC's equivalence bounds and structured weights."""

from __future__ import annotations

import jax
import numpy as np

from duquant_jax import Pack
from duquant_jax.equivalence import (  # noqa: F401  (re-exported for the tests)
    FORWARD_TOL,
    ORTHO_TOL,
    ROT_TOL,
    max_ortho_err,
    rel_err,
    separated_blocks,
    well_separated,
)


def to_numpy(pack: Pack) -> Pack:
    return jax.tree.map(np.asarray, pack)


def assert_pack_near_reference(got: Pack, want: Pack) -> None:
    """A JAX pack (as NumPy) against the float64 reference's for the options beside SPEC: the same
    permutation, every transform field within 1e-4, orthogonal rotations, scales within 1e-4
    relative, codes off by at most 1 and equal for >= 99.9% of them."""
    np.testing.assert_array_equal(got.perm, want.perm)
    for field in ("in_diag", "r_pre", "r_in", "r_out", "out_diag"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.shape == b.shape, field
            assert np.abs(a - b).max() <= 1e-4, field
    for r in (got.r_pre, got.r_in, got.r_out):
        if r is not None:
            assert max_ortho_err(r) <= ORTHO_TOL
    assert got.w_scale.shape == want.w_scale.shape
    np.testing.assert_allclose(got.w_scale, want.w_scale, rtol=1e-4)
    diff = np.abs(got.w_codes.astype(int) - want.w_codes.astype(int))
    assert diff.max() <= 1 and np.mean(diff == 0) >= 0.999


def structured_weight(kind: str, out: int, n_in: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, n_in)).astype(np.float32)
    if kind == "outlier_columns":
        w[:, rng.choice(n_in, size=max(1, n_in // 50), replace=False)] *= 50.0
    elif kind == "low_rank":
        w = (rng.standard_normal((out, 3)) @ rng.standard_normal((3, n_in))).astype(np.float32)
    elif kind == "zero_block":
        w[:, : min(n_in, 20)] = 0.0
    elif kind == "heavy_tails":
        w = rng.standard_t(df=2, size=(out, n_in)).astype(np.float32)
    elif kind != "gaussian":
        raise ValueError(kind)
    return w


def write_checkpoint(path, names: list[str], shape: tuple[int, int] = (32, 48), seed: int = 0):
    """A one-file safetensors checkpoint of small float32 Gaussian weights named `names`; returns `path`."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    save_file({n: (0.02 * rng.standard_normal(shape)).astype(np.float32) for n in names}, str(path))
    return path


class Stop(Exception):
    """Raised by `stop_after` to interrupt a run."""


def stop_after(count: int):
    """An `on_layer` callback that raises `Stop` when the `count`-th layer is done."""
    seen = []

    def on_layer(name: str) -> None:
        seen.append(name)
        if len(seen) == count:
            raise Stop

    return on_layer


def compiled_op_targets(layer, n_in: int, lengths=(1, 7, 40), seed: int = 3) -> list[str]:
    """Compiles `layer` (fullgraph, dynamic shapes), asserts its outputs are eager's bits for (T, n_in) inputs of each
    length, and returns the call targets of the traced graphs, as strings."""
    import torch

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        run = torch.compile(layer, fullgraph=True, backend=backend, dynamic=True)
        gen = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            for tokens in lengths:
                x = torch.randn(tokens, n_in, generator=gen)
                assert torch.equal(run(x), layer(x)), tokens
    finally:
        torch._dynamo.reset()
    return [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]


def run_child(code: str, env: dict[str, str] | None = None, timeout: int = 300) -> dict:
    """Runs `code` in a fresh interpreter at the repository root (a crash fails the calling test, not the run);
    returns the JSON it prints last."""
    import json
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"child exited with {done.returncode}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])
