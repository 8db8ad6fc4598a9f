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

from duquant_jax import DuQuantConfig, Pack, pack_with_rotations
from duquant_jax.io import atomic_write
from duquant_jax.reference import block_ranges

META_KEYS = ("block_size", "block_out_size", "enable_permute", "lambda_smooth", "in_features", "out_features")


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


def _stack(blocks: list[np.ndarray], size: int, path: Path, key: str) -> np.ndarray:
    out = np.tile(np.eye(size, dtype=np.float32), (len(blocks), 1, 1))
    for k, u in enumerate(blocks):
        b = u.shape[0]
        if u.shape != (b, b) or b > size:
            raise ValueError(f"{path}: {key}_{k} has shape {u.shape}, expected a square block of at most {size}")
        out[k, :b, :b] = u
    return out


def import_npz(path: str | os.PathLike, weight, config: DuQuantConfig | None = None) -> Pack:
    """Reads an origin-format `.npz` and packs `weight (out, in)` with its rotations.

    `config` gives the bits and row mode (default: DuQuantConfig()); block sizes,
    permutation and smoothing come from the file's `meta`. Rotations may carry
    any signs: the codes are computed from them, so the forward stays exact.
    """
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise KeyError(f"meta lacks {missing}")
        n_in_blocks, n_out_blocks = int(z["R_in_blocks"]), int(z["R_out_blocks"])
        r_in_list = [z[f"Rin_{k}"] for k in range(n_in_blocks)]
        r_out_list = [z[f"Rout_{k}"] for k in range(n_out_blocks)]
        perm, w_scale = z["perm"], z["weight_scale"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable DuQuant .npz pack: {e}") from e
    base = config or DuQuantConfig()
    cfg = DuQuantConfig(
        **{
            **base.to_dict(),
            "block_size": int(meta["block_size"]),
            "block_out_size": int(meta["block_out_size"]),
            "enable_permute": bool(meta["enable_permute"]),
            "lambda_smooth": float(meta["lambda_smooth"]),
            "row_rot_mode": base.row_rot_mode if n_out_blocks else "none",
        }
    )
    shape = tuple(np.shape(weight))
    if shape != (int(meta["out_features"]), int(meta["in_features"])):
        raise ValueError(f"{path} packs a ({meta['out_features']}, {meta['in_features']}) weight; got {shape}")
    r_in = _stack(r_in_list, cfg.block_size, path, "Rin")
    r_out = _stack(r_out_list, cfg.out_block_size, path, "Rout") if cfg.rotate_rows else None
    return pack_with_rotations(weight, perm, r_in, r_out, cfg, w_scale=w_scale if cfg.quantize_weights else None)
