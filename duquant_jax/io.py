"""Pack files: many layers' packs in one safetensors file, written atomically.

Layout: tensors `{layer}.perm`, `{layer}.r_in`, `{layer}.r_out`, `{layer}.w_scale`,
`{layer}.a_scale` and the codes as `{layer}.w_codes` (int8), `{layer}.w_codes_int4`
(uint8, two signed nibbles a byte, SPEC "Pack fields") or `{layer}.w2` (float32,
unquantized weights). The metadata holds `format`, `format_version` and, in
`layers`, each layer's config and shape as JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from duquant_jax.config import DuQuantConfig
from duquant_jax.packed import Pack
from duquant_jax.quantize import pack_int4, unpack_int4

FORMAT = "duquant-jax-packs"
FORMAT_VERSION = "1"


class PackFileError(ValueError):
    """A pack file that cannot be read: truncated, corrupted or inconsistent."""


def _codes_kind(pack: Pack) -> str:
    cfg = pack.config
    if not cfg.quantize_weights:
        return "w2"
    return "w_codes_int4" if cfg.weight_bits <= 4 else "w_codes"


def save_packs(path: str | os.PathLike, packs: Mapping[str, Pack]) -> Path:
    """Writes `{layer_name: pack}` to one safetensors file at `path`, atomically.

    The file is written beside `path` under a temporary name and renamed into
    place, so `path` never holds a half-written file.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if not packs:
        raise ValueError("save_packs needs at least one pack")
    tensors: dict[str, np.ndarray] = {}
    layers = {}
    for name, pack in packs.items():
        if not isinstance(pack, Pack):
            raise TypeError(f"layer {name!r}: expected a Pack; got {type(pack).__name__}")
        kind = _codes_kind(pack)
        arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in pack.arrays().items() if k != "w_codes"}
        codes = np.asarray(pack.w_codes)
        arrays[kind] = pack_int4(codes) if kind == "w_codes_int4" else np.ascontiguousarray(codes)
        for k, v in arrays.items():
            tensors[f"{name}.{k}"] = v
        layers[name] = {
            "config": pack.config.to_dict(),
            "in_features": pack.in_features,
            "out_features": pack.out_features,
            "codes": kind,
        }
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": json.dumps(layers)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Calls `write(tmp)` on a temporary file beside `path`, then renames it to `path`.

    `path` either keeps its old content or gets the whole new file; on an error
    the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _open(path: Path):
    """A safetensors handle on `path`; a missing or unreadable file is a named error."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"pack file {path} does not exist")
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise PackFileError(f"pack file {path} is not a readable safetensors file: {e}") from e


def _layer_table(f, path: Path) -> dict[str, dict]:
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise PackFileError(f"pack file {path} is not a duquant-jax pack file (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackFileError(f"pack file {path} has format_version {meta.get('format_version')!r}; this reads {FORMAT_VERSION}")
    try:
        return json.loads(meta["layers"])
    except (KeyError, json.JSONDecodeError) as e:
        raise PackFileError(f"pack file {path} has no readable layer table: {e}") from e


def read_metadata(path: str | os.PathLike) -> dict[str, dict]:
    """The `layers` metadata of a pack file: {name: {config, in_features, out_features, codes}}."""
    path = Path(path)
    with _open(path) as f:
        return _layer_table(f, path)


def load_packs(path: str | os.PathLike, layers: list[str] | None = None) -> dict[str, Pack]:
    """Reads the packs of `path` (all, or the named `layers`) as Packs of JAX arrays."""
    path = Path(path)
    out = {}
    with _open(path) as f:
        table = _layer_table(f, path)
        keys = set(f.keys())
        for name in list(table) if layers is None else layers:
            if name not in table:
                raise KeyError(f"pack file {path} has no layer {name!r}")
            out[name] = _read_layer(f, keys, path, name, table[name])
    return out


def _read_layer(f, keys: set[str], path: Path, name: str, info: dict) -> Pack:
    try:
        cfg = DuQuantConfig.from_dict(info["config"])
        n_in, n_out, kind = int(info["in_features"]), int(info["out_features"]), info["codes"]
    except (KeyError, TypeError, ValueError) as e:
        raise PackFileError(f"pack file {path}, layer {name!r}: bad metadata: {e}") from e
    B, Bo = cfg.block_size, cfg.out_block_size
    expected = {
        "perm": (n_in,),
        "r_in": (-(-n_in // B), B, B),
        "w_scale": (n_out,),
        kind: (n_out, (n_in + 1) // 2) if kind == "w_codes_int4" else (n_out, n_in),
    }
    if cfg.rotate_rows:
        expected["r_out"] = (-(-n_out // Bo), Bo, Bo)
    arrays = {}
    for field, shape in expected.items():
        key = f"{name}.{field}"
        if key not in keys:
            raise PackFileError(f"pack file {path}, layer {name!r}: tensor {key} is missing")
        try:
            a = f.get_tensor(key)
        except Exception as e:
            raise PackFileError(f"pack file {path}, layer {name!r}: tensor {key} cannot be read: {e}") from e
        if tuple(a.shape) != shape:
            raise PackFileError(f"pack file {path}, layer {name!r}: {key} has shape {tuple(a.shape)}, expected {shape}")
        arrays[field] = a
    a_scale = None
    if f"{name}.a_scale" in keys:
        a_scale = f.get_tensor(f"{name}.a_scale")
        if a_scale.shape != (n_in,):
            raise PackFileError(f"pack file {path}, layer {name!r}: a_scale has shape {a_scale.shape}, expected {(n_in,)}")
    codes = arrays.pop(kind)
    if kind == "w_codes_int4":
        codes = unpack_int4(codes, n_in)
    perm = arrays["perm"]
    if not np.array_equal(np.sort(perm), np.arange(n_in)):
        raise PackFileError(f"pack file {path}, layer {name!r}: perm is not a permutation of 0..{n_in - 1}")
    return Pack(
        perm=jnp.asarray(perm),
        r_in=jnp.asarray(arrays["r_in"]),
        r_out=jnp.asarray(arrays["r_out"]) if cfg.rotate_rows else None,
        w_scale=jnp.asarray(arrays["w_scale"]),
        w_codes=jnp.asarray(codes),
        a_scale=None if a_scale is None else jnp.asarray(a_scale),
        config=cfg,
    )
