"""The origin project's per-layer `.npz` exchange format (SPEC, last paragraph).

One file per layer: `perm`, `Rin_{k}` (each input block's `b x b` rotation),
`Rout_{k}`, `R_in_blocks` / `R_out_blocks` (the block counts), `weight_scale`
and `meta` (JSON: block_size, block_out_size, enable_permute, lambda_smooth,
in_features, out_features). Codes are not stored: the origin re-quantizes from
the original weight, so importing takes the weight too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from duquant_jax import DuQuantConfig, Pack
from duquant_jax.npz import META_KEYS  # noqa: F401  (the format's meta keys)
from duquant_jax.atomic import atomic_write
from duquant_jax.reference import block_ranges



def export_npz(pack: Pack, path: str | os.PathLike) -> Path:
    """Writes `pack` as one origin-format `.npz` at `path`, atomically."""
    cfg = pack.config
    n_in, n_out = pack.in_features, pack.out_features
    arrays: dict[str, np.ndarray] = {"perm": np.asarray(pack.perm, np.int64)}
    r_in = np.asarray(pack.r_in, np.float32)
    for k, cols in enumerate(block_ranges(n_in, cfg.block_size)):
        arrays[f"Rin_{k}"] = r_in[k, : len(cols), : len(cols)]
    arrays["R_in_blocks"] = np.int64(len(r_in))
    n_out_blocks = 0
    if pack.r_out is not None:
        r_out = np.asarray(pack.r_out, np.float32)
        for k, rows in enumerate(block_ranges(n_out, cfg.out_block_size)):
            arrays[f"Rout_{k}"] = r_out[k, : len(rows), : len(rows)]
        n_out_blocks = len(r_out)
    arrays["R_out_blocks"] = np.int64(n_out_blocks)
    arrays["weight_scale"] = np.asarray(pack.w_scale, np.float32)
    meta = {
        "block_size": cfg.block_size,
        "block_out_size": cfg.out_block_size,
        "enable_permute": cfg.enable_permute,
        "lambda_smooth": cfg.lambda_smooth,
        "in_features": n_in,
        "out_features": n_out,
    }
    arrays["meta"] = np.array(json.dumps(meta))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def import_npz(path: str | os.PathLike, weight, config: DuQuantConfig | None = None) -> Pack:
    """Reads an origin-format `.npz` and packs `weight (out, in)` with its rotations.

    `config` gives the bits and row mode (default: DuQuantConfig()); block sizes,
    permutation and smoothing come from the file's `meta`. Rotations may carry
    any signs: the codes are computed from them, so the forward stays exact.
    The file is read by `duquant_jax.npz` (never unpickled; every key, shape,
    permutation and rotation validated, errors naming the file).
    """
    from duquant_jax.npz import pack_from_npz

    return pack_from_npz(path, weight, config)
