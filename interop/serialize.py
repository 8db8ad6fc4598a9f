"""Saved quantized models: `save_quantized(model, directory)` and `load_quantized(model, directory)`.

Directory layout (transformers' sharded layout, plus one JSON of our own):

  model.safetensors                     every tensor of `model.state_dict()`, or, above
                                        `max_shard_bytes`, model-00001-of-0000N.safetensors ...
  model.safetensors.index.json          (sharded only) {"metadata": {"total_size": N}, "weight_map": {key: file}}
  duquant_quantized.json                written last: the format, every DuQuantLinear's name,
                                        config, shape, dtype and field shapes, and tied aliases
                                        (and "kernel_paths": the frozen kernel choices, and
                                        "tied_embeddings": {embedding: output layer} for
                                        `interop.output_layer.QuantizedEmbedding`, and
                                        "input_groups": lists of layers that share one input
                                        transform (`interop.shared_input`), if any)

Each `DuQuantLinear` contributes its packed state (`qweight.codes` as 4-bit
nibbles or int8, `qweight.scales`, the rotations, `a_scale`, `calibrated`,
`bias`); the rest of the model's weights are stored as they are. Every shard
records a CRC-32 of every tensor (`duquant_jax.integrity`) and of the record
`duquant_quantized.json` (its metadata key `duquant_record_crc32`, itself under
the shard's checksum table), checked on load; every layer's tensors are then
cross-checked against its configuration (`interop.saved_checks`) before any
kernel runs. Format 1 saves (no record digest) still load.

Loading needs no JAX: it imports torch, safetensors, `duquant_jax.config`,
`duquant_jax.field_shapes`, `duquant_jax.integrity` and `duquant_jax.paths` only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from duquant_jax.atomic import atomic_write, atomic_write_text
from duquant_jax.config import DuQuantConfig
from duquant_jax.integrity import ChecksumError, checksum_metadata, digest, dtype_code, read_header, text_digest, verify_file
from duquant_jax.paths import contained
from interop import native, saved_checks
from interop.linear import DuQuantLinear
from interop.modules import set_child
from interop.output_layer import QuantizedEmbedding, check_tieable, tied_embeddings
from interop.saved_checks import SavedModelError
from interop.shared_input import group_buffer_keys, input_groups, link_input_groups

FORMAT = "duquant-quantized-model"
FORMAT_VERSION = 2  # 2: every shard's metadata records the CRC-32 of the record (RECORD_DIGEST_KEY)
READS_VERSIONS = (1, 2)
RECORD_DIGEST_KEY = "duquant_record_crc32"
CONFIG_FILE = "duquant_quantized.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30


_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["SavedModelError", "load_quantized", "save_quantized"]


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return digest(t.reshape(-1).view(torch.uint8).numpy(), dtype_code(t.dtype), t.shape)


def _unique_state(model: nn.Module, own: frozenset[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict without tied duplicates (safetensors stores no shared memory): (tensors, {alias: kept key}).
    Keys in `own` (an input group's shared transform buffers) are stored as copies of their own instead:
    the float model does not tie them, and loading links them again (`interop.shared_input`)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if key in own:
            tensors[key] = t.detach().cpu().clone()
            continue
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    return tensors, aliases


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in state-dict order, cut into shards of at most `max_bytes` (a larger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def make_record(layers: dict[str, dict[str, Any]], aliases: dict[str, str], files: list[str], extra: dict[str, Any] | None = None) -> str:
    """The text of `duquant_quantized.json`: {layer name: `layer_record`}, tied aliases, the shard files,
    and `extra` fields (the frozen kernel choices)."""
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "aliases": aliases,
        "files": files,
        "torch_version": torch.__version__,
        **(extra or {}),
    }
    return json.dumps(record, indent=1)


def layer_record(m: DuQuantLinear) -> dict[str, Any]:
    """One layer's entry of the record: config, dimensions, bias, dtype and the shapes of its varying fields."""
    return {
        "config": m.config.to_dict(),
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "dtype": str(m.r_in.dtype if m.r_in is not None else m.a_scale.dtype).removeprefix("torch."),
        "shapes": m.layout(),
    }


def save_quantized(model: nn.Module, directory: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes `model` (with its `DuQuantLinear` layers) to `directory`; returns the directory.

    The record (`duquant_quantized.json`) is made first, and every shard's
    checksummed metadata holds its CRC-32 (`RECORD_DIGEST_KEY`), so that a
    changed record, or a shard of another save, is refused on load.

    Args:
      model: a torch model quantized by `interop.quantize_` (or `from_pack_dir`).
      directory: created if needed. A previous save there is replaced: its
        `duquant_quantized.json` is removed first and written last, so an
        interrupted save is never mistaken for a complete one.
      max_shard_bytes: the largest shard; above it the tensors are sharded with
        an index like transformers'.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be an int >= 1; got {max_shard_bytes!r}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, DuQuantLinear)}
    if not layers:
        raise ValueError("save_quantized: the model has no DuQuantLinear layer (run interop.quantize_ first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).unlink(missing_ok=True)
    groups = input_groups(model)
    tensors, aliases = _unique_state(model, group_buffer_keys(model))
    shards = _shards(tensors, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    extra = _frozen_paths_record(layers)
    tied = tied_embeddings(model)
    if tied:
        extra["tied_embeddings"] = tied
    if groups:
        extra["input_groups"] = groups
    record_text = make_record({name: layer_record(m) for name, m in layers.items()}, aliases, names, extra)
    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    for name, shard in zip(names, shards):
        write_shard(directory / name, shard, record_text)
    if len(shards) > 1:
        write_index(directory, {key: name for name, shard in zip(names, shards) for key in shard}, tensors.values())
    atomic_write_text(directory / CONFIG_FILE, record_text)
    return directory


def write_shard(path: Path, tensors: dict[str, torch.Tensor], record_text: str) -> None:
    """One shard, atomically: `tensors` (contiguous, CPU) with the record's CRC-32 and every tensor's in its metadata."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, RECORD_DIGEST_KEY: text_digest(record_text)}
    meta["checksums"] = checksum_metadata({k: _tensor_digest(t) for k, t in tensors.items()}, meta)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def write_index(directory: Path, weight_map: dict[str, str], tensors: Iterable[torch.Tensor] | None = None, *, total_size: int | None = None) -> None:
    """transformers' shard index: {key: shard file}, and the tensors' bytes (given, or summed over `tensors`)."""
    if total_size is None:
        total_size = sum(t.numel() * t.element_size() for t in tensors or ())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=1))


def _read_record(directory: Path) -> tuple[dict[str, Any], str]:
    """The record and the CRC-32 of its text (validated structure)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise SavedModelError(
            f"{directory} holds no {CONFIG_FILE}: not a saved quantized model, or its save did not finish "
            "(run save_quantized again)"
        )
    try:
        text = path.read_text(encoding="utf-8")
        record = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SavedModelError(f"{path} is not readable JSON ({e}): the save is damaged") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SavedModelError(f"{path} is not a duquant quantized-model record (format={record.get('format') if isinstance(record, dict) else None!r})")
    if record.get("format_version") not in READS_VERSIONS:
        raise SavedModelError(f"{path} has format_version {record.get('format_version')!r}; this version reads {READS_VERSIONS}")
    for key, kind in (("layers", dict), ("aliases", dict), ("files", list)):
        if not isinstance(record.get(key), kind):
            raise SavedModelError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    files = record["files"]
    if not files or not all(isinstance(f, str) for f in files) or len(set(files)) != len(files):
        raise SavedModelError(f"{path}: 'files' must list distinct shard names; got {files[:5]!r}")
    return record, text_digest(text)


def _layer_from_record(name: str, info: Any, module: nn.Module, source: Path) -> tuple[DuQuantLinear, torch.dtype]:
    try:
        config = DuQuantConfig.from_dict(info["config"])
        n_in, n_out, shapes = info["in_features"], info["out_features"], info["shapes"]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (n_in, n_out)):
            raise TypeError(f"in_features and out_features must be ints >= 1; got {n_in!r}, {n_out!r}")
        dtype = _FLOAT_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise TypeError(f"dtype must be one of {sorted(_FLOAT_DTYPES)}; got {info['dtype']!r}")
        if not isinstance(shapes, dict) or not isinstance(info["bias"], bool):
            raise TypeError("shapes must be an object and bias a bool")
        bias = info["bias"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SavedModelError(f"{source}: layer {name!r} has a bad record ({e})") from None
    have = (module.in_features, module.out_features) if isinstance(module, (nn.Linear, DuQuantLinear)) else None
    if have != (n_in, n_out):
        raise SavedModelError(
            f"{source}: layer {name!r} was saved as a {n_out}x{n_in} linear; the model has "
            f"{'no linear there' if have is None else f'a {have[1]}x{have[0]} one'}: build the same architecture"
        )
    saved_checks.check_record_shapes(name, config, n_in, n_out, shapes, str(source))
    return DuQuantLinear.empty(config, n_in, n_out, shapes, bias=bias, dtype=dtype, name=name), dtype


def _check_shard_header(path: Path, record_digest: str, version: int) -> dict[str, int]:
    """The shard's {tensor name: bytes}, after checking that its metadata belongs to this record."""
    try:
        header, _ = read_header(path)
    except ChecksumError as e:
        raise SavedModelError(f"{path} is not a readable safetensors file ({e}): the save is damaged") from None
    meta = header.pop("__metadata__", {})
    stored = meta.get(RECORD_DIGEST_KEY)
    if stored is None and (version > 1 or RECORD_DIGEST_KEY in meta):
        raise SavedModelError(f"{path} records no digest of {CONFIG_FILE}: it is not a shard of this save")
    if stored is not None and stored != record_digest:
        raise SavedModelError(
            f"{path}: {CONFIG_FILE} does not match the digest its shards recorded (crc32 {record_digest}, "
            f"recorded {stored}): the record was changed or the shard belongs to another save"
        )
    return {key: entry["data_offsets"][1] - entry["data_offsets"][0] for key, entry in header.items()}


def _read_shards(directory: Path, files: list[Path], record_digest: str, version: int, verify: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every shard's tensors, in aligned storage (`interop.native`), and {key: shard path}; a key in two shards is an error."""
    from safetensors.torch import load_file

    where: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for path in files:
        if not path.is_file():
            raise SavedModelError(f"{directory}: shard {path.name} is missing: the save is incomplete")
        for key, nbytes in _check_shard_header(path, record_digest, version).items():
            if key in where:
                raise SavedModelError(f"tensor {key!r} is in two shards, {where[key]} and {path}: the save is damaged")
            where[key], sizes[key] = str(path), nbytes
    _check_index(directory, files, where, sizes)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if verify:
                verify_file(path)
            state.update(native.aligned_state(load_file(str(path))))
        except ChecksumError:
            raise
        except Exception as e:  # safetensors' own errors for a damaged header
            raise SavedModelError(f"{path} is not a readable safetensors file ({e}): the save is damaged") from None
    return state, where


def _check_index(directory: Path, files: list[Path], where: dict[str, str], sizes: dict[str, int]) -> None:
    """A sharded save's index must exist, map every key to the shard that holds it (transformers reads it)
    and give the shards' tensor bytes as `metadata.total_size`."""
    path = directory / INDEX_FILE
    if len(files) == 1 and not path.exists():
        return
    if not path.is_file():
        raise SavedModelError(f"{directory}: {INDEX_FILE} is missing: the save is incomplete")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
        raise SavedModelError(f"{path} is not a readable shard index ({e}): the save is damaged") from None
    want = {key: Path(file).name for key, file in where.items()}
    total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    if len(files) > 1 and total != sum(sizes.values()):
        raise SavedModelError(f"{path}: metadata.total_size is {total!r}; the shards hold {sum(sizes.values())} bytes of tensors")
    if weight_map != want:
        bad = sorted(set(weight_map) ^ set(want)) or sorted(k for k in want if weight_map.get(k) != want[k])
        raise SavedModelError(f"{path} does not match the shards (first difference: {bad[0]!r}): the save is damaged")


def load_quantized(model: nn.Module, directory: str | os.PathLike, *, verify: bool = True) -> nn.Module:
    """Loads a saved quantized model into `model`, a freshly built float model of the same architecture.

    Every saved `DuQuantLinear` replaces the `nn.Linear` of the same name (no
    re-packing), then every tensor is loaded as saved (dtypes included), so the
    outputs equal the saved model's bit for bit. Imports no JAX.

    Before any tensor reaches a layer: the record must match the digest every
    shard recorded, no key may be in two shards, a sharded save's index must
    match its shards, and every layer's tensors must have the dtypes and shapes
    its configuration stores (`interop.saved_checks`). Tensors are copied into
    aligned storage once, here (native kernels crash on unaligned operands).

    Args:
      model: the float model; changed in place and returned.
      directory: written by `save_quantized`.
      verify: check every tensor's CRC-32 (on by default; `False` skips it for speed;
        the record's digest and the cross-checks run either way).

    Raises:
      SavedModelError: a missing or damaged file, a path outside `directory`, a
        record that does not match its shards, or a layer that does not match its
        configuration or the model (the message names the file, layer and field).
      ChecksumError: a tensor whose bytes do not match their checksum.
    """
    directory = Path(directory)
    record, record_digest = _read_record(directory)
    source = directory / CONFIG_FILE
    files = [contained(directory, f, what="shard", source=source) for f in record["files"]]
    state, where = _read_shards(directory, files, record_digest, record["format_version"], verify)
    for name, info in record["layers"].items():
        try:
            module = model.get_submodule(name) if isinstance(name, str) and name else None
        except AttributeError:
            module = None
        if module is None:
            raise SavedModelError(f"{source}: layer {name!r} is not a module of the model: build the same architecture")
        layer, dtype = _layer_from_record(name, info, module, source)
        saved_checks.check_layer_tensors(name, layer.config, layer.in_features, layer.out_features, dtype, layer.bias is not None, state, where)
        saved_checks.check_layer_values(name, layer.config, state, where)
        set_child(model, name, layer)
    tied = _tie_embeddings(model, record, source)
    aliases = record["aliases"]
    model_state = model.state_dict()
    for alias, key in aliases.items():
        if not isinstance(key, str) or key not in state:
            raise SavedModelError(f"{source}: alias {alias!r} points at {key!r}, which no shard holds")
        if alias not in model_state or alias in state:
            raise SavedModelError(f"{source}: alias {alias!r} is {'saved as a tensor too' if alias in state else 'not a tensor of the model'}")
        if _get_tensor(model, alias) is not _get_tensor(model, key):
            raise SavedModelError(f"{source}: alias {alias!r} -> {key!r}: the model does not tie these tensors: build the same architecture")
        if model_state[alias].shape != state[key].shape:
            raise SavedModelError(
                f"{source}: alias {alias!r} points at {key!r} of shape {tuple(state[key].shape)}; the model's "
                f"{alias!r} has shape {tuple(model_state[alias].shape)}"
            )
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches against the float model's own tensors
        raise SavedModelError(f"{directory} does not match the model: {e}") from None
    missing = [k for k in result.missing_keys if k not in aliases]
    if missing or result.unexpected_keys:
        raise SavedModelError(
            f"{directory} does not match the model: missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )
    for alias, key in aliases.items():  # tied tensors: the alias becomes the very same object again
        set_child(model, alias, _get_tensor(model, key))
    for emb in tied:
        try:
            check_tieable(emb.head, emb.head_name)
        except ValueError as e:
            raise SavedModelError(f"{source}: tied_embeddings: {e}") from None
    _apply_frozen_paths(model, record, source)
    _link_groups(model, record, source)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:  # non-persistent buffers (rotary frequencies, ...) are in no state_dict and no file
        raise SavedModelError(
            f"{directory}: the model was built on the meta device and {len(left)} tensors are in no saved file "
            f"(non-persistent buffers, e.g. {left[:3]}): build the model on the CPU instead"
        )
    return model


def _tie_embeddings(model: nn.Module, record: dict[str, Any], source: Path) -> list[QuantizedEmbedding]:
    """The record's "tied_embeddings" ({embedding: output layer}): each `nn.Embedding` of the model becomes a
    `QuantizedEmbedding` reading the (already placed) output layer's codes; checked once they are loaded."""
    tied = record.get("tied_embeddings", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in tied.items()):
        raise SavedModelError(f"{source}: 'tied_embeddings' must map embedding names to output layer names; got {tied!r:.200}")
    out = []
    for emb_name, head_name in tied.items():
        if head_name not in record["layers"]:
            raise SavedModelError(f"{source}: tied_embeddings: {emb_name!r} is tied to {head_name!r}, which is no quantized layer of the save")
        try:
            like = model.get_submodule(emb_name)
        except AttributeError:
            like = None
        if not isinstance(like, nn.Embedding):
            raise SavedModelError(f"{source}: tied_embeddings: {emb_name!r} is not an nn.Embedding of the model: build the same architecture")
        try:
            emb = QuantizedEmbedding(model.get_submodule(head_name), head_name, like, check=False)
        except ValueError as e:
            raise SavedModelError(f"{source}: tied_embeddings: {e}") from None
        set_child(model, emb_name, emb)
        out.append(emb)
    return out


def _link_groups(model: nn.Module, record: dict[str, Any], source: Path) -> None:
    """The record's "input_groups" (lists of layer names sharing one input transform), linked again once
    their tensors are loaded; members whose transform tensors differ are refused."""
    groups = record.get("input_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups):
        raise SavedModelError(f"{source}: 'input_groups' must be a list of lists of layer names; got {groups!r:.200}")
    for g in groups:
        unknown = [n for n in g if n not in record["layers"]]
        if unknown:
            raise SavedModelError(f"{source}: input group {g} names {unknown}, which are no quantized layers of the save")
    try:
        link_input_groups(model, groups)
    except (TypeError, ValueError) as e:
        raise SavedModelError(f"{source}: input_groups: {e}") from None


def _frozen_paths_record(layers: dict[str, DuQuantLinear]) -> dict[str, Any]:
    """{"kernel_paths": {layer: {dtype: {bucket: path}}}} for the layers with frozen kernel choices
    (`interop.kernels.freeze_paths`); {} when none has any (the record is then as before)."""
    frozen = {name: m.kernel_paths for name, m in layers.items() if m.kernel_paths}
    return {"kernel_paths": frozen} if frozen else {}


def _apply_frozen_paths(model: nn.Module, record: dict[str, Any], source: Path) -> None:
    """Puts the record's frozen kernel choices back on the loaded layers (no re-measuring)."""
    from interop.kernels import check_frozen

    frozen = record.get("kernel_paths", {})
    if not isinstance(frozen, dict):
        raise SavedModelError(f"{source}: 'kernel_paths' must be an object; got {type(frozen).__name__}")
    for name, paths in frozen.items():
        layer = record["layers"].get(name) and model.get_submodule(name)
        if not isinstance(layer, DuQuantLinear) or layer.qweight is None:
            raise SavedModelError(f"{source}: kernel_paths names {name!r}, which is no quantized layer of the save")
        try:
            layer.qweight.frozen_paths = check_frozen(paths, f"layer {name!r}")
        except ValueError as e:
            raise SavedModelError(f"{source}: {e}") from None


def _get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    owner, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)
