"""Pack files: many layers' packs in one safetensors file, written atomically, checksummed.

Layout (docs/ALGORITHM.md "Pack files"): tensors `{layer}.{field}` for every
array field the pack has (`perm`, `r_in`, `r_out`, `w_scale`, `a_scale`,
`in_diag`, `r_pre`, `out_diag`) and the codes as `{layer}.w_codes` (int8),
`{layer}.w_codes_int4` (uint8, two signed nibbles a byte) or `{layer}.w2`
(float32, unquantized weights). The metadata holds `format`, `format_version`,
`layers` (each layer's config, shape, codes kind and the fields stored, as
JSON) and `checksums` (duquant_jax.integrity: a CRC-32 of every tensor and of
`layers`), which `load_packs` verifies unless told `verify=False`.

Format "1" files (no checksums, no optional fields) are still read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from duquant_jax import integrity
from duquant_jax.atomic import atomic_write  # noqa: F401  (re-exported: duquant_jax.io.atomic_write)
from duquant_jax.config import DuQuantConfig
from duquant_jax.packed import ARRAY_FIELDS, Pack
from duquant_jax.quantize import pack_int4, unpack_int4

FORMAT = "duquant-jax-packs"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
CODE_KINDS = ("w_codes", "w_codes_int4", "w2")
_MAX_FEATURES = 2**31  # a declared size beyond this is damage, not a layer


class PackFileError(ValueError):
    """A pack file that cannot be read: truncated, corrupted or inconsistent."""


def _codes_kind(pack: Pack) -> str:
    cfg = pack.config
    if not cfg.quantize_weights:
        return "w2"
    return "w_codes_int4" if cfg.weight_bits <= 4 else "w_codes"


def save_packs(path: str | os.PathLike, packs: Mapping[str, Pack]) -> Path:
    """Writes `{layer_name: pack}` to one safetensors file at `path`, atomically.

    Every array field the pack has is stored (the optional ones too); the
    metadata records each tensor's CRC-32. The file is written beside `path`
    under a temporary name and renamed into place, so `path` never holds a
    half-written file.
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
            "fields": sorted(arrays),
        }
    layer_table = json.dumps(layers)
    checksums = integrity.checksum_metadata({k: integrity.array_digest(v) for k, v in tensors.items()}, {"layers": layer_table})
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": layer_table, integrity.METADATA_KEY: checksums}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _open(path: Path):
    """A safetensors handle on `path`; a missing or unreadable file is a named error."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"pack file {path} does not exist")
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise PackFileError(f"pack file {path} is not a readable safetensors file: {e}") from e


def _header(f, path: Path, verify: bool) -> tuple[dict[str, dict], integrity.Checksums | None]:
    """The layer table and (format 2, with `verify`) the checksum table, both validated."""
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise PackFileError(f"pack file {path} is not a duquant-jax pack file (format={meta.get('format')!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise PackFileError(f"pack file {path} has format_version {version!r}; this version reads {READABLE_VERSIONS}")
    sums = None
    if version != "1":
        try:
            sums = integrity.Checksums.from_metadata(meta, f"pack file {path}")
            if sums is None:
                raise PackFileError(f"pack file {path} (format {version}) has no checksum table; the file is damaged")
            if verify:
                sums.check_metadata(meta)
        except integrity.ChecksumError as e:
            raise PackFileError(str(e)) from None
    try:
        table = json.loads(meta["layers"])
    except (KeyError, ValueError, RecursionError) as e:
        raise PackFileError(f"pack file {path} has no readable layer table: {e}") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise PackFileError(f"pack file {path}: the layer table is not a JSON object of objects")
    return table, sums if verify else None


def read_metadata(path: str | os.PathLike) -> dict[str, dict]:
    """The `layers` metadata of a pack file: {name: {config, in_features, out_features, codes[, fields]}}."""
    path = Path(path)
    with _open(path) as f:
        return _header(f, path, verify=True)[0]


def load_packs(path: str | os.PathLike, layers: list[str] | None = None, *, verify: bool = True) -> dict[str, Pack]:
    """Reads the packs of `path` (all, or the named `layers`) as Packs of JAX arrays.

    Args:
      path: a file written by `save_packs`.
      layers: names to read; default all.
      verify: check every tensor read against its recorded CRC-32 (format 2;
        format 1 files have none). `False` skips the check (about 4 GB/s of
        hashing saved; shapes, dtypes and the permutation are still checked).

    Raises:
      FileNotFoundError: `path` does not exist.
      KeyError: a named layer is not in the file.
      PackFileError: the file is truncated, damaged (a checksum mismatch names the
        file, the layer and the tensor) or inconsistent.
    """
    path = Path(path)
    out = {}
    with _open(path) as f:
        table, sums = _header(f, path, verify)
        keys = set(f.keys())
        for name in list(table) if layers is None else layers:
            if name not in table:
                raise KeyError(f"pack file {path} has no layer {name!r}")
            out[name] = _read_layer(f, keys, path, name, table[name], sums)
    return out


def _feature_count(info: dict, key: str) -> int:
    n = info[key]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_FEATURES:
        raise ValueError(f"{key} must be an int in [1, {_MAX_FEATURES}]; got {n!r}")
    return n


def _rotation_ok(shape: tuple[int, ...], n: int, block: int, exact: bool) -> bool:
    """A stack `(k, b, b)` for `n` channels: SPEC's exact `(ceil(n/B), B, B)` with `exact`, else
    any `b` with one shared matrix (`k == 1`) or one per block (`k == ceil(n/b)`)."""
    if exact:
        return shape == (-(-n // block), block, block)
    return len(shape) == 3 and shape[1] == shape[2] >= 1 and shape[0] in (1, -(-n // shape[1]))


def _expected(cfg: DuQuantConfig, n_in: int, n_out: int, kind: str) -> dict[str, Callable[[tuple[int, ...]], bool]]:
    """For each field a stored layer may have, a test of its shape."""
    svd = cfg.rotation == "svd"
    if cfg.quantize_weights and cfg.weight_group_size is not None:
        scale_shape = (n_out, -(-n_in // cfg.weight_group_size))
    else:
        scale_shape = (n_out,)
    a_shapes = {"static-channel": {(n_in,)}, "static-tensor": {(1,)}, "dynamic-token": set(), "dynamic-group": set()}[cfg.act_scheme]
    codes_shape = (n_out, (n_in + 1) // 2) if kind == "w_codes_int4" else (n_out, n_in)
    return {
        "perm": lambda s: s == (n_in,),
        "r_in": lambda s: _rotation_ok(s, n_in, cfg.block_size, svd),
        "r_out": lambda s: _rotation_ok(s, n_out, cfg.out_block_size, svd),
        "w_scale": lambda s: s == scale_shape,
        kind: lambda s: s == codes_shape,
        "a_scale": lambda s: s in a_shapes,
        "in_diag": lambda s: s == (n_in,),
        "r_pre": lambda s: _rotation_ok(s, n_in, cfg.block_size, False),
        "out_diag": lambda s: s == (n_out,),
    }


_DTYPE_KINDS = {"perm": "iu", "w_codes": "i", "w_codes_int4": "u", "w2": "f"}  # every other field: "f"


def _read_layer(f, keys: set[str], path: Path, name: str, info: dict, sums: integrity.Checksums | None) -> Pack:
    where = f"pack file {path}, layer {name!r}"
    try:
        cfg = DuQuantConfig.from_dict(info["config"])
        n_in, n_out, kind = _feature_count(info, "in_features"), _feature_count(info, "out_features"), info["codes"]
        if kind not in CODE_KINDS:
            raise ValueError(f"codes must be one of {CODE_KINDS}; got {kind!r}")
        fields = info.get("fields")
        if fields is None:  # format 1: SPEC's fields, a_scale when present
            fields = ["perm", "r_in", "w_scale", kind] + (["r_out"] if cfg.rotate_rows else [])
            fields += ["a_scale"] if f"{name}.a_scale" in keys else []
        if not isinstance(fields, list) or not all(isinstance(x, str) for x in fields):
            raise ValueError(f"fields must be a list of names; got {fields!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise PackFileError(f"{where}: bad metadata: {e}") from None
    expected = _expected(cfg, n_in, n_out, kind)
    unknown = sorted(set(fields) - set(expected))
    required = {"perm", "w_scale", kind}
    if cfg.rotation == "svd":  # SPEC's family: exactly today's tensors
        required |= {"r_in"} | ({"r_out"} if cfg.rotate_rows else set())
    if not cfg.rotate_rows:
        unknown += ["r_out"] if "r_out" in fields else []
    if not cfg.rotate_inputs:
        unknown += ["r_in"] if "r_in" in fields else []
    missing = sorted(required - set(fields))
    if unknown or missing:
        raise PackFileError(f"{where}: bad field list {sorted(fields)} (not allowed {unknown}, missing {missing})")
    arrays = {}
    for field in fields:
        key = f"{name}.{field}"
        if key not in keys:
            raise PackFileError(f"{where}: tensor {key} is missing")
        try:
            a = f.get_tensor(key)
        except Exception as e:
            raise PackFileError(f"{where}: tensor {key} cannot be read: {e}") from e
        if not expected[field](tuple(a.shape)):
            raise PackFileError(f"{where}: {key} has shape {tuple(a.shape)}, which does not fit {n_out}x{n_in} and its config")
        if a.dtype.kind not in _DTYPE_KINDS.get(field, "f"):
            raise PackFileError(f"{where}: {key} has dtype {a.dtype}, which does not fit the field")
        if sums is not None:
            try:
                sums.check_array(key, a)
            except integrity.ChecksumError as e:
                raise PackFileError(f"{where}: {str(e).removeprefix(sums.source + ': ')}") from None
        arrays[field] = a
    codes = arrays.pop(kind)
    if kind == "w_codes_int4":
        codes = unpack_int4(codes, n_in)
    perm = arrays["perm"]
    if not np.array_equal(np.sort(perm), np.arange(n_in)):
        raise PackFileError(f"{where}: perm is not a permutation of 0..{n_in - 1}")
    return _to_pack(arrays, codes, cfg)


def _to_pack(arrays: dict[str, np.ndarray], codes: np.ndarray, cfg: DuQuantConfig) -> Pack:
    import jax.numpy as jnp

    get: Callable[[str], Any] = lambda k: None if k not in arrays else jnp.asarray(arrays[k])  # noqa: E731
    fields = {k: get(k) for k in ARRAY_FIELDS if k != "w_codes"}
    return Pack(w_codes=jnp.asarray(codes), config=cfg, **fields)

