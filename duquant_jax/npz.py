"""Reading the origin project's per-layer `.npz` exchange files safely (docs/ALGORITHM.md "The .npz exchange format").

`read_npz` loads every member with `allow_pickle=False` (a `.npz` can then
never run code), lets `zipfile` check each member's CRC-32 (the zip format
stores one, so damaged bytes are caught), and validates everything before any
of it is used: the meta JSON's keys and types, the block counts, `perm` a
permutation, every rotation square, finite and orthogonal, the scales finite
and positive. Any failure is a `ValueError` that names the file and the entry.
`pack_from_npz` is the import built on it (`interop.exchange.import_npz`'s job).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from duquant_jax.config import DuQuantConfig

META_KEYS = ("block_size", "block_out_size", "enable_permute", "lambda_smooth", "in_features", "out_features")
ORTHO_TOL = 1e-5  # SPEC's bound on every rotation: max |RᵀR - I|
_MAX_FEATURES = 2**31
_MAX_BLOCK = 4096  # the largest rotation block of either project
# what numpy and zipfile raise on damaged archives (NotImplementedError: a flipped compression method)
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile, zlib.error, RecursionError,
                NotImplementedError, struct.error, MemoryError)


@dataclasses.dataclass(frozen=True)
class NpzLayer:
    """A validated `.npz` layer: perm (in,) int32, r_in (n_in, B, B) and r_out (n_out, Bo, Bo) float32
    (short blocks as `diag(U, I)`; r_out None when the file has no row rotations), w_scale (out,) float32, meta."""

    perm: np.ndarray
    r_in: np.ndarray
    r_out: np.ndarray | None
    w_scale: np.ndarray
    meta: dict[str, Any]


def _int(meta: dict, key: str, hi: int) -> int:
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise ValueError(f"meta {key} must be an int in [1, {hi}]; got {v!r}")
    return v


def _meta(raw: np.ndarray) -> dict[str, Any]:
    if raw.shape != () or raw.dtype.kind != "U":
        raise ValueError(f"meta must be one JSON string; got {raw.dtype} of shape {raw.shape}")
    meta = json.loads(str(raw[()]))
    if not isinstance(meta, dict):
        raise ValueError("meta is not a JSON object")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"meta lacks {missing}")
    for key, hi in (("in_features", _MAX_FEATURES), ("out_features", _MAX_FEATURES), ("block_size", _MAX_BLOCK), ("block_out_size", _MAX_BLOCK)):
        _int(meta, key, hi)
    if not isinstance(meta["enable_permute"], bool):
        raise ValueError(f"meta enable_permute must be true or false; got {meta['enable_permute']!r}")
    lam = meta["lambda_smooth"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
        raise ValueError(f"meta lambda_smooth must be a number in [0, 1]; got {lam!r}")
    return meta


def _count(raw: np.ndarray, key: str, allowed: tuple[int, ...]) -> int:
    if raw.shape != () or raw.dtype.kind not in "iu" or int(raw) not in allowed:
        raise ValueError(f"{key} must be one integer in {sorted(set(allowed))}; got {raw!r}")
    return int(raw)


def _blocks(z, prefix: str, n: int, size: int, count: int) -> np.ndarray:
    """Stacked (count, size, size) float32 from members `{prefix}_0..`, each `b x b` orthogonal.

    Each member is read and checked before the stack is allocated, so memory
    follows the file's real contents, not its declared sizes."""
    blocks = []
    for k in range(count):
        key = f"{prefix}_{k}"
        u = z[key]
        b = min(size, n - k * size)
        if u.shape != (b, b) or u.dtype.kind != "f":
            raise ValueError(f"{key} must be a ({b}, {b}) float rotation; got {u.dtype} of shape {u.shape}")
        u = u.astype(np.float64)
        if not np.isfinite(u).all():
            raise ValueError(f"{key} holds NaN/Inf")
        err = float(np.abs(u.T @ u - np.eye(b)).max())
        if err > ORTHO_TOL:
            raise ValueError(f"{key} is not orthogonal: max |RᵀR - I| = {err:.1e} > {ORTHO_TOL:g}")
        blocks.append(u)
    out = np.zeros((count, size, size), np.float32)
    for k, u in enumerate(blocks):
        b = u.shape[0]
        out[k, :b, :b] = u
        out[k, b:, b:] = np.eye(size - b)
    return out


class _Mismatch(ValueError):
    """A readable file that does not fit the weight it is imported with."""


def read_npz(path: str | os.PathLike, weight_shape: tuple[int, int] | None = None) -> NpzLayer:
    """Reads and validates one origin-format `.npz` layer.

    Args:
      path: the file.
      weight_shape: `(out, in)` of the weight it will be imported with; checked against meta.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: anything unreadable, damaged or inconsistent; the message names `path` and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".npz pack {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("it is a single .npy array, not an .npz archive")
            meta = _meta(z["meta"])
            n_in, n_out, B, Bo = (meta[k] for k in ("in_features", "out_features", "block_size", "block_out_size"))
            if weight_shape is not None and tuple(weight_shape) != (n_out, n_in):
                raise _Mismatch(f"{path} packs a ({n_out}, {n_in}) weight; got {tuple(weight_shape)}")
            # perm and weight_scale are real data of the declared sizes: check them before allocating anything by those sizes
            perm = z["perm"]
            if perm.shape != (n_in,) or perm.dtype.kind not in "iu" or not np.array_equal(np.sort(perm), np.arange(n_in)):
                raise ValueError(f"perm must be a permutation of 0..{n_in - 1}; got {perm.dtype} of shape {perm.shape}")
            w_scale = z["weight_scale"]
            if w_scale.shape != (n_out,) or w_scale.dtype.kind != "f" or not (np.isfinite(w_scale) & (w_scale > 0)).all():
                raise ValueError(f"weight_scale must be ({n_out},) finite positive floats; got {w_scale.dtype} of shape {w_scale.shape}")
            count_in = _count(z["R_in_blocks"], "R_in_blocks", (-(-n_in // B),))
            count_out = _count(z["R_out_blocks"], "R_out_blocks", (0, -(-n_out // Bo)))
            r_in = _blocks(z, "Rin", n_in, B, count_in)
            r_out = _blocks(z, "Rout", n_out, Bo, count_out) if count_out else None
    except _READ_ERRORS as e:
        if isinstance(e, (FileNotFoundError, _Mismatch)):
            raise
        what = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) or isinstance(e, json.JSONDecodeError) else str(e)
        raise ValueError(f"{path} is not a readable DuQuant .npz pack: {' '.join(what.split())}") from None
    return NpzLayer(perm.astype(np.int32), r_in, r_out, w_scale.astype(np.float32), meta)


def pack_from_npz(path: str | os.PathLike, weight: Any, config: DuQuantConfig | None = None):
    """Reads a validated `.npz` layer and packs `weight (out, in)` with its permutation, rotations and scales.

    `config` gives the bits and row mode (default: DuQuantConfig()); block sizes,
    permutation and smoothing come from the file. Rotations of any sign keep the forward exact.
    """
    from duquant_jax.pack import pack_with_rotations

    layer = read_npz(path, tuple(np.shape(weight)))
    base = config or DuQuantConfig()
    fields = {k: layer.meta[k] for k in ("block_size", "block_out_size", "enable_permute", "lambda_smooth")}
    cfg = base.replace(**fields, row_rot_mode=base.row_rot_mode if layer.r_out is not None else "none")
    w_scale = layer.w_scale if cfg.quantize_weights else None
    return pack_with_rotations(weight, layer.perm, layer.r_in, layer.r_out, cfg, w_scale=w_scale)
