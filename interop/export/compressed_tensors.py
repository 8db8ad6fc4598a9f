"""Export a model quantized by `interop.quantize_` as a compressed-tensors checkpoint, and import it back.

Written directory (a Hugging Face model directory that vLLM and transformers read):

  config.json                 the float model's config + `quantization_config`
                              (`quant_method: "compressed-tensors"`, one config group per
                              layer scheme, `ignore`, and `transform_config` when inputs rotate)
  model.safetensors           every tensor: quantized layers in compressed-tensors' layout
                              (codes and scales converted exactly, never re-quantized),
                              transform matrices, everything else as it is
  model.safetensors.index.json  the weight map (so that loaders read model.safetensors only)
  duquant/layers.json         our own record (DuQuantConfig, shapes, dtype per layer) and
  duquant/fields.safetensors  the pack fields (perm, in_diag, r_pre, r_in) for `import_compressed_tensors`

Field mapping (DuQuantConfig -> compressed-tensors `QuantizationScheme`):

  weight_bits b in {4, 8}          weights.num_bits b, type "int", symmetric, no zero point
  weight_group_size None / G       weights.strategy "channel" (weight_scale (out, 1)) / "group", group_size G
  act_scheme "dynamic-token"       input_activations {num_bits act_bits, strategy "token", dynamic true}
  act_scheme "static-tensor"       input_activations {strategy "tensor", dynamic false}, input_scale (1,)
  act_bits 0 / 16                  no input_activations (weight-only)
  W8 with int activations          format "int-quantized": weight int8 (out, in)
  otherwise                        format "pack-quantized": weight_packed int32 (out, ceil(in*b/32)),
                                   codes + 2^(b-1), element i of every 32 at bit i*b; weight_shape int64 (2,)
  rotation (x -> x V)              transform_config: a "random-hadamard" scheme at location "input"
                                   with V = diag(in_diag) · diag(r_pre) · P · diag(r_in), stored as
                                   `<layer>.<group>_input.weight` = V * sqrt(n) (the loaders divide by
                                   sqrt(n)): (b, b) with head_dim b when V is one b x b block repeated,
                                   else the whole (in, in) matrix; layers with equal V share a group
                                   (vLLM needs one transform for fused q/k/v and gate/up)
  rotation "none", perm != id      no transform: the code columns are un-permuted (per-row scales)

Refused (ExportError names the field, its value and what to change): act_scheme
"static-channel" or "dynamic-group", act_clip != 1, output-row rotations (rotate_rows), weight_bits
outside {4, 8} or unquantized weights, groups that do not divide in_features, and
a permutation with groups and no rotation.

compressed-tensors' `head_dim` repeats ONE block matrix over all blocks; our
Hadamard draws its signs per channel (`in_diag`), so its blocks differ and V is
stored whole (in x in), block-diagonal or not: the permutation costs no extra space.

transformers (5.x) does not read `transform_config`: a rotated export loaded by
`from_pretrained` would run without its rotations. `online_transforms(directory)`
tells whether a directory has any; `check_plain_loadable` refuses such a directory.
compressed-tensors' own `apply_transform_config` (and vLLM on CUDA) apply them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from duquant_jax.config import DuQuantConfig
from interop.export import _EXPORTS as _PACKAGE_EXPORTS
from interop.linear import DuQuantLinear, rotate_blocks
from interop.modules import set_child

SIDECAR_DIR = "duquant"
SIDECAR_RECORD = "layers.json"
SIDECAR_FIELDS = "fields.safetensors"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPORT_FORMAT = "duquant-compressed-tensors-export"
EXPORT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = sorted([*_PACKAGE_EXPORTS, "pack_int32", "unpack_int32"])  # the package's lazy names, plus the int32 packing


class ExportError(ValueError):
    """A configuration or directory that the compressed-tensors format cannot hold (the message says what to change)."""


# -- packing (compressed-tensors' dense int32 packing) ----------------------------------
def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: (out, in) int8 in [-2^(b-1), 2^(b-1)) -> (out, ceil(in*b/32)) int32.

    compressed-tensors' `pack_to_int32`: codes offset by 2^(b-1); within each run of
    32 columns, element i occupies bits i*b .. i*b+b-1 of the run's b words (little end
    first), so for b = 4 word k holds columns 8k..8k+7, low nibble first.
    """
    out, n = codes.shape
    u = (codes.to(torch.int64) + (1 << (bits - 1))).clamp_(0, (1 << bits) - 1)
    pad = (-n) % 32
    u = nn.functional.pad(u, (0, pad))
    bit = (u.unsqueeze(-1) >> torch.arange(bits)) & 1  # (out, n', b)
    bit = bit.reshape(out, -1, 32)  # (out, words, 32 bits)
    words = (bit << torch.arange(32)).sum(-1)  # int64 in [0, 2^32)
    words = words[:, : -(-n * bits // 32)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_int32`: (out, ceil(in*b/32)) int32 -> (out, in) int8 codes."""
    out, words = packed.shape
    w = packed.to(torch.int64) & 0xFFFFFFFF
    need = -(-in_features // 32) * bits  # whole runs of 32 columns
    w = nn.functional.pad(w, (0, need - words))
    bit = ((w.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(out, -1, bits)
    u = (bit << torch.arange(bits)).sum(-1)[:, :in_features]
    return (u - (1 << (bits - 1))).to(torch.int8)


# -- schemes ---------------------------------------------------------------------------
def _refuse(name: str, field: str, value: Any, what: str) -> ExportError:
    return ExportError(f"layer {name!r}: {field}={value!r} cannot be exported to compressed-tensors: {what}")


def _check_exportable(name: str, cfg: DuQuantConfig, in_features: int, perm_is_identity: bool) -> None:
    if not cfg.quantize_weights:
        raise _refuse(name, "weight_bits", cfg.weight_bits, "unquantized weights have no compressed-tensors scheme; use 4 or 8")
    if cfg.weight_bits not in (4, 8):
        raise _refuse(name, "weight_bits", cfg.weight_bits, "vLLM reads int4 and int8 weights only; use 4 or 8")
    if cfg.quantize_acts and cfg.act_scheme == "static-channel":
        raise _refuse(name, "act_scheme", cfg.act_scheme,
                      "static per-channel activation scales do not factor out of the integer product; "
                      'use act_scheme="dynamic-token" (or "static-tensor")')
    if cfg.quantize_acts and cfg.act_scheme == "dynamic-group":
        raise _refuse(name, "act_scheme", cfg.act_scheme,
                      "per-group activation scales have no integer kernel in vLLM; "
                      'use act_scheme="dynamic-token" (one scale per token)')
    if cfg.quantize_acts and cfg.act_clip != 1:
        raise _refuse(name, "act_clip", cfg.act_clip, "the format has no clipping of per-token scales; use act_clip=1.0")
    if cfg.rotate_rows:
        raise _refuse(name, "row_rot_mode", cfg.row_rot_mode,
                      f'output-row rotations (rotation={cfg.rotation!r}) are not exported; use row_rot_mode="none"')
    g = cfg.weight_group_size
    if g is not None and in_features % g:
        raise _refuse(name, "weight_group_size", g, f"groups must divide in_features={in_features}; pick a divisor")
    if g is not None and not perm_is_identity and not cfg.rotate_inputs:
        raise _refuse(name, "enable_permute", True,
                      "with rotation \"none\" and groups the permuted code columns cannot be un-permuted "
                      "(groups would straddle); use enable_permute=False")


def layer_scheme(layer: DuQuantLinear) -> tuple[str, dict[str, Any]]:
    """(format, compressed-tensors QuantizationScheme as a dict without targets) of one layer."""
    cfg = layer.config
    weights = {"num_bits": cfg.weight_bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "channel" if cfg.weight_group_size is None else "group"}
    if cfg.weight_group_size is not None:
        weights["group_size"] = cfg.weight_group_size
    scheme: dict[str, Any] = {"weights": weights, "input_activations": None, "output_activations": None}
    if cfg.quantize_acts:
        token = cfg.act_scheme == "dynamic-token"
        scheme["input_activations"] = {"num_bits": cfg.act_bits, "type": "int", "symmetric": True,
                                       "dynamic": token, "strategy": "token" if token else "tensor"}
    fmt = "int-quantized" if cfg.weight_bits == 8 and cfg.quantize_acts else "pack-quantized"
    return fmt, scheme


# -- transforms ------------------------------------------------------------------------
def input_matrix(layer: DuQuantLinear) -> torch.Tensor | None:
    """The layer's input transform V (in, in) float64 (`x2 = x V`, perm included), None if V is a pure permutation."""
    if layer.in_diag is None and layer.r_pre is None and layer.r_in is None:
        return None
    v = torch.eye(layer.in_features, dtype=torch.float64)
    if layer.in_diag is not None:
        v = v * layer.in_diag.double()
    if layer.r_pre is not None:
        v = rotate_blocks(v, layer.r_pre.double())
    v = v[:, layer.perm]
    if layer.r_in is not None:
        v = rotate_blocks(v, layer.r_in.double())
    return v


def _compact(v: torch.Tensor, block: int) -> torch.Tensor | None:
    """V's b x b block when V (in, in) is block-diagonal with one block repeated, else None."""
    n = v.shape[0]
    if n % block:
        return None
    first = v[:block, :block]
    return first if torch.equal(v, torch.block_diag(*[first] * (n // block))) else None


def _transform(layer: DuQuantLinear) -> tuple[torch.Tensor, int | None] | None:
    """(stored matrix, head_dim or None) of the online input transform, or None.

    Stored as `V * sqrt(n)` (n x n, n = head_dim or in) in the layer's dtype: both
    compressed-tensors' "random-hadamard" transform and vLLM's dense fallback divide
    the stored matrix by sqrt(n) (vLLM does so for every type, "random-matrix" too).
    """
    v = input_matrix(layer)
    if v is None:
        return None
    block = None if layer.r_in is None else layer.r_in.shape[-1]
    small = None if block is None or block == layer.in_features else _compact(v, block)
    m, head_dim = (small, block) if small is not None else (v, None)
    return (m * math.sqrt(m.shape[0])).to(layer.param_dtype), head_dim


# -- layer tensors ---------------------------------------------------------------------
def _layer_tensors(name: str, layer: DuQuantLinear, fmt: str, unpermute: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors' tensors of one layer (codes and scales exactly as stored)."""
    codes = layer.codes().to(torch.int8)
    if unpermute:
        codes = codes[:, torch.argsort(layer.perm)]
    scales = layer.qweight.scales.float()
    scales = scales.reshape(-1, 1) if scales.dim() == 1 else scales
    out = {f"{name}.weight_scale": scales.contiguous()}
    if fmt == "int-quantized":
        out[f"{name}.weight"] = codes.contiguous()
    else:
        out[f"{name}.weight_packed"] = pack_int32(codes, layer.config.weight_bits)
        out[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
    if layer.config.quantize_acts and layer.config.act_scheme == "static-tensor":
        out[f"{name}.input_scale"] = layer.a_scale.float().reshape(1).clone()
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().clone()
    return out


def _record(name: str, layer: DuQuantLinear, unpermute: bool) -> dict[str, Any]:
    return {"config": layer.config.to_dict(), "in_features": layer.in_features, "out_features": layer.out_features,
            "bias": layer.bias is not None, "dtype": str(layer.param_dtype).removeprefix("torch."),
            "shapes": layer.layout(), "unpermuted": unpermute, "calibrated": bool(layer.calibrated)}


def _float_tensors(model: nn.Module, layers: Mapping[str, DuQuantLinear]) -> dict[str, torch.Tensor]:
    """Every tensor of `model` outside the DuQuantLinear layers, tied duplicates dropped."""
    prefixes = tuple(f"{n}." for n in layers)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, t in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = t.detach().contiguous().cpu()
    return out


def _ignored_linears(model: nn.Module, layers: Mapping[str, DuQuantLinear]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]


def _float_config(model: nn.Module, float_config: Mapping[str, Any] | None) -> dict[str, Any]:
    if float_config is not None:
        return dict(float_config)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ExportError("export_compressed_tensors: the model has no Hugging Face `config`; pass float_config={...}")
    d = config.to_dict()
    d.pop("quantization_config", None)
    return d


def export_compressed_tensors(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    float_config: Mapping[str, Any] | None = None,
) -> Path:
    """Writes `model` (quantized by `interop.quantize_`) as a compressed-tensors checkpoint in `directory`.

    Args:
      model: a model whose quantized layers are `DuQuantLinear`; unchanged.
      directory: created if missing; files of an earlier export are overwritten.
      float_config: the float model's config.json dict; default `model.config.to_dict()`.

    Returns: the directory. Raises ExportError for a layer the format cannot hold.
    """
    from safetensors.torch import save_file

    layers = {n: m for n, m in model.named_modules() if isinstance(m, DuQuantLinear)}
    if not layers:
        raise ExportError("export_compressed_tensors: the model has no DuQuantLinear layer (run interop.quantize_ first)")
    from interop.output_layer import tied_embeddings

    tied = tied_embeddings(model)
    if tied:
        emb, head = next(iter(tied.items()))
        raise ExportError(
            f"export_compressed_tensors: embedding {emb!r} reads the codes of the quantized output layer {head!r} "
            "(quantize_output_layer / output_layer=): compressed-tensors has no tied quantized embedding; export a "
            "model whose output layer is left float"
        )
    config = _float_config(model, float_config)
    tensors = _float_tensors(model, layers)
    groups: dict[str, dict[str, Any]] = {}
    transforms: dict[str, dict[str, Any]] = {}
    matrices: list[tuple[torch.Tensor, int | None, str]] = []
    record: dict[str, Any] = {}
    fields: dict[str, torch.Tensor] = {}
    formats: set[str] = set()
    for name, layer in layers.items():
        identity = bool(torch.equal(layer.perm, torch.arange(layer.in_features, device=layer.perm.device)))
        _check_exportable(name, layer.config, layer.in_features, identity)
        fmt, scheme = layer_scheme(layer)
        formats.add(fmt)
        key = json.dumps(scheme, sort_keys=True)
        group = groups.setdefault(key, {**scheme, "targets": [], "format": fmt})
        group["targets"].append(name)
        transform = _transform(layer)
        unpermute = transform is None and not identity
        tensors.update(_layer_tensors(name, layer, fmt, unpermute))
        if transform is not None:
            tname = _transform_group(matrices, transforms, transform, name)
            tensors[f"{name}.{tname}_input.weight"] = transform[0].contiguous().clone()
        record[name] = _record(name, layer, unpermute)
        fields.update({f"{name}.{f}": getattr(layer, f).detach().contiguous().cpu().clone()
                       for f in ("perm", "in_diag", "r_pre", "r_in") if getattr(layer, f) is not None})
    qconfig = _quantization_config(groups, formats, _ignored_linears(model, layers), transforms)
    directory = Path(directory)
    (directory / SIDECAR_DIR).mkdir(parents=True, exist_ok=True)
    config["quantization_config"] = qconfig
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: WEIGHTS_FILE for k in sorted(tensors)}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=1))
    save_file(fields, str(directory / SIDECAR_DIR / SIDECAR_FIELDS))
    side = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "layers": record}
    (directory / SIDECAR_DIR / SIDECAR_RECORD).write_text(json.dumps(side, indent=1))
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return directory


def _transform_group(matrices: list, transforms: dict, transform: tuple[torch.Tensor, int | None], name: str) -> str:
    """The transform config group of `transform` (one per distinct matrix), with `name` added to its targets."""
    m, head_dim = transform
    for other, other_head, gname in matrices:
        if other_head == head_dim and other.shape == m.shape and other.dtype == m.dtype and torch.equal(other, m):
            transforms[gname]["apply"][0]["targets"].append(name)
            return gname
    gname = f"duquant_rot{len(matrices)}"
    matrices.append((m, head_dim, gname))
    transforms[gname] = {"type": "random-hadamard", "head_dim": head_dim, "randomize": False, "requires_grad": False,
                         "precision": str(m.dtype).removeprefix("torch."),
                         "apply": [{"targets": [name], "location": "input", "inverse": False, "ignore": []}]}
    return gname


def _quantization_config(groups: dict, formats: set[str], ignore: list[str], transforms: dict) -> dict[str, Any]:
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "transform_config": {"config_groups": transforms} if transforms else {},
        "producer": {"name": "duquant-jax", "export_version": EXPORT_VERSION},
    }


def export_compressed_tensors_from_saved(saved_dir: str | os.PathLike, fresh_model: nn.Module,
                                         out_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """`interop.load_quantized(fresh_model, saved_dir)`, then `export_compressed_tensors` to `out_dir`."""
    from interop.serialize import load_quantized

    return export_compressed_tensors(load_quantized(fresh_model, saved_dir), out_dir, **kwargs)


# -- reading back ----------------------------------------------------------------------
def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ExportError(f"{directory} holds no config.json: not a Hugging Face model directory")
    qc = json.loads(path.read_text()).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        raise ExportError(f"{path}: quantization_config.quant_method is not \"compressed-tensors\"")
    return qc


def online_transforms(directory: str | os.PathLike) -> list[str]:
    """The names of the layers of a compressed-tensors directory that have online transforms ([] if none)."""
    tc = _read_config(Path(directory)).get("transform_config") or {}
    return [t for s in (tc.get("config_groups") or {}).values() for a in s.get("apply", [])
            if a.get("location") in ("input", "output", "q_attn", "k_cache") for t in a.get("targets", [])]


def check_plain_loadable(directory: str | os.PathLike) -> None:
    """Raises ExportError when `directory` has online transforms that transformers' loader would ignore."""
    names = online_transforms(directory)
    if names:
        raise ExportError(
            f"{directory}: {len(names)} layers (e.g. {names[0]!r}) need online input transforms "
            "(quantization_config.transform_config); transformers' from_pretrained ignores them and would run "
            "the model wrong: load it with interop.export.import_compressed_tensors, or export rotation=\"none\""
        )


def _read_sidecar(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = directory / SIDECAR_DIR / SIDECAR_RECORD
    if not path.is_file():
        raise ExportError(f"{directory}: {SIDECAR_DIR}/{SIDECAR_RECORD} is missing: not written by export_compressed_tensors")
    side = json.loads(path.read_text())
    if side.get("format") != EXPORT_FORMAT or side.get("version") != EXPORT_VERSION:
        raise ExportError(f"{path}: format {side.get('format')!r} version {side.get('version')!r}; "
                          f"this version reads {EXPORT_FORMAT!r} version {EXPORT_VERSION}")
    return side["layers"], load_file(str(directory / SIDECAR_DIR / SIDECAR_FIELDS))


def _layer_from_export(name: str, info: dict, state: dict[str, torch.Tensor], fields: dict[str, torch.Tensor],
                       fmt: str) -> DuQuantLinear:
    """One DuQuantLinear from its compressed-tensors tensors and its sidecar fields (exact inverse of the export)."""
    cfg = DuQuantConfig.from_dict(info["config"])
    n_in, n_out = info["in_features"], info["out_features"]
    dtype = _DTYPES[info["dtype"]]
    layer = DuQuantLinear.empty(cfg, n_in, n_out, info["shapes"], bias=info["bias"], dtype=dtype, name=name)
    if fmt == "int-quantized":
        codes = state[f"{name}.weight"].to(torch.int8)
    else:
        codes = unpack_int32(state[f"{name}.weight_packed"], cfg.weight_bits, n_in)
    perm = fields[f"{name}.perm"]
    if info["unpermuted"]:
        codes = codes[:, perm]
    scales = state[f"{name}.weight_scale"].float()
    scales = scales.reshape(-1) if cfg.weight_group_size is None else scales
    from interop.qweight import QuantizedWeight

    qw = QuantizedWeight(codes, scales, bits=cfg.weight_bits, group_size=cfg.weight_group_size, name=name)
    sd = {f"qweight.{k}": v for k, v in qw.state_dict().items()}
    sd["perm"] = perm
    sd.update({f: fields[f"{name}.{f}"] for f in ("in_diag", "r_pre", "r_in") if f"{name}.{f}" in fields})
    if cfg.quantize_acts and cfg.act_scheme == "static-tensor":
        sd["a_scale"] = state[f"{name}.input_scale"].float().reshape(1)
    sd["calibrated"] = torch.tensor(bool(info["calibrated"]))
    if info["bias"]:
        sd["bias"] = state[f"{name}.bias"]
    layer.load_state_dict(sd, strict=False)
    return layer


def _check_transform(name: str, layer: DuQuantLinear, state: dict[str, torch.Tensor]) -> None:
    """The checkpoint's transform matrix must be the one the sidecar fields compose (else the files disagree)."""
    keys = [k for k in state if k.startswith(f"{name}.") and k.endswith("_input.weight")]
    want = _transform(layer)
    if want is None and not keys:
        return
    if want is None or len(keys) != 1 or not torch.equal(state[keys[0]], want[0]):
        raise ExportError(f"layer {name!r}: the checkpoint's input transform does not match {SIDECAR_DIR}/{SIDECAR_FIELDS}")


def import_compressed_tensors(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Loads an export of `export_compressed_tensors` into `model` (the float architecture, freshly built).

    Every exported layer becomes a `DuQuantLinear` again, with the same codes, scales
    and rotations, so the outputs equal the exported model's bit for bit; the other
    tensors load as they are. Raises ExportError when the files disagree.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    qc = _read_config(directory)
    layers, fields = _read_sidecar(directory)
    state = load_file(str(directory / WEIGHTS_FILE))
    formats = {t: g["format"] for g in qc["config_groups"].values() for t in g["targets"]}
    for name, info in layers.items():
        if name not in formats:
            raise ExportError(f"{directory}: layer {name!r} is in {SIDECAR_DIR}/{SIDECAR_RECORD} but in no config group")
        layer = _layer_from_export(name, info, state, fields, formats[name])
        _check_transform(name, layer, state)
        set_child(model, name, layer)
    prefixes = tuple(f"{n}." for n in layers)
    rest = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    result = model.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes) and not _tied(model, k, rest)]
    if missing or result.unexpected_keys:
        raise ExportError(f"{directory} does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model


def _tied(model: nn.Module, key: str, loaded: Mapping[str, torch.Tensor]) -> bool:
    """Whether `key` is a tied alias of a loaded tensor (e.g. lm_head.weight of tied embeddings)."""
    owner, _, attr = key.rpartition(".")
    t = getattr(model.get_submodule(owner) if owner else model, attr, None)
    if t is None:
        return False
    sd = model.state_dict()
    return any(k in loaded and sd[k].data_ptr() == t.data_ptr() for k in sd if k != key)
