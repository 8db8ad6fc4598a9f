"""Whole-checkpoint packing: stream a safetensors checkpoint tensor by tensor into pack files.

Input: one `.safetensors` file, or a directory of shards with the index JSON that
transformers writes (`*.safetensors.index.json`, `{"weight_map": {tensor: shard}}`).

Output directory layout:
  layers/<file name>.safetensors   one pack file per layer (duquant_jax.io), written atomically;
                                    the file name is `duquant_jax.paths.safe_file_name(tensor name)`
  index.json                        written last: config, and every layer's file and shape
  .duquant.lock                     while a run writes (duquant_jax.lock): the owner's pid

Each layer file is complete or absent, so an interrupted run resumes by skipping
the layers whose file already holds a pack of the same shape and config (and
repacks those with another config). `index.json` is the commit marker: a run
removes it before writing anything and writes it after the last layer, so an
index only ever lists layers of the config it records. Every path read from an
index (checkpoint shards, layer files) must resolve inside its directory.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Mapping

import jax
import numpy as np

from duquant_jax import integrity
from duquant_jax.config import DuQuantConfig
from duquant_jax.io import (
    PackFileError,
    atomic_write,
    load_packs,
    read_metadata,
    save_packs,
)
from duquant_jax.lock import exclusive
from duquant_jax.pack import pack_weight
from duquant_jax.shared_input import pack_group
from duquant_jax.packed import Pack
from duquant_jax.paths import contained, hf_blobs_root, safe_file_name
from duquant_jax.peak_memory import peak_rss_gib
from duquant_jax.stats import LayerStats, layer_for_tensor, stats_for_layer

INDEX = "index.json"
INDEX_FORMAT = "duquant-jax-pack-dir"
DEFAULT_EXCLUDE = r"embed|lm_head"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class Checkpoint:
    """Read-only view of a safetensors checkpoint: names, shapes, one tensor at a time.

    `path` is one `.safetensors` file or a directory: with an index JSON
    (`*.safetensors.index.json`), its `weight_map` names each tensor's shard;
    without, every `*.safetensors` in it is a shard. Each shard must resolve
    (symlinks followed) inside the directory, or inside the `blobs/` of the
    Hugging Face cache repository when the directory is one of its snapshots.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            roots = hf_blobs_root(path)
            indexes = sorted(path.glob("*.safetensors.index.json"))
            if indexes:
                self.files = self._weight_map(path, indexes[0], roots)
            else:
                shards = sorted(path.glob("*.safetensors"))
                if not shards:
                    raise FileNotFoundError(f"checkpoint directory {path} holds no .safetensors file")
                files = [contained(path, f.name, what="shard", source=path, extra_roots=roots) for f in shards]
                self.files = {name: f for f in files for name in self._keys(f)}
        elif path.is_file():
            self.files = {name: path for name in self._keys(path)}
        else:
            raise FileNotFoundError(f"checkpoint {path} does not exist: give a .safetensors file or a directory of shards")
        self.path = path

    @staticmethod
    def _weight_map(path: Path, index: Path, roots: tuple[Path, ...]) -> dict[str, Path]:
        """{tensor: shard path} from transformers' index JSON, every shard checked to stay in `path`."""
        contained(path, index.name, what="the index", source=path, extra_roots=roots)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise ValueError(f"checkpoint index {index} has no readable weight_map ({type(e).__name__}: {e}); "
                             "is it transformers' *.safetensors.index.json?") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"checkpoint index {index}: weight_map must be a JSON object; got {type(weight_map).__name__}")
        files, resolved = {}, {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or shard not in resolved:
                file = contained(path, shard, what=f"tensor {name!r}", source=index, extra_roots=roots)
                resolved[shard] = file
            files[name] = resolved[shard]
        return files

    @staticmethod
    def _keys(file: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="numpy") as f:
                return list(f.keys())
        except Exception as e:
            raise ValueError(f"checkpoint file {file} is not a readable safetensors file: {e}") from e

    def _open(self, name: str, framework: str):
        from safetensors import safe_open

        file = self.files[name]
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard {file} of tensor {name} does not exist")
        try:
            return safe_open(str(file), framework=framework)
        except Exception as e:
            raise ValueError(f"checkpoint shard {file} of tensor {name} is not a readable safetensors file: {e}") from e

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name, "numpy") as f:
            try:
                return tuple(f.get_slice(name).get_shape())
            except Exception as e:
                raise ValueError(f"checkpoint shard {self.files[name]} holds no tensor {name} ({e})") from e

    def tensor(self, name: str):
        """One tensor as a JAX array in its stored dtype (bfloat16 included)."""
        with self._open(name, "flax") as f:
            try:
                return f.get_tensor(name)
            except Exception as e:
                raise ValueError(f"checkpoint shard {self.files[name]}: tensor {name} cannot be read ({e})") from e


def select_layers(ckpt: Checkpoint, include: str | None, exclude: str | None) -> list[str]:
    """Names to pack: `include` and not `exclude` (regex, searched). Without `include`, every 2-D
    `*.weight` not matching `exclude` (default: embeddings and lm_head). With `include`, a
    matched tensor that is not 2-D is an error naming it; so is an include that matches nothing."""
    pattern = DEFAULT_EXCLUDE if exclude is None else exclude
    exc = re.compile(pattern) if pattern else None
    names = [n for n in ckpt.files if not (exc and exc.search(n))]
    if include is None:
        return [n for n in names if n.endswith(".weight") and len(ckpt.shape(n)) == 2]
    inc = re.compile(include)
    chosen = [n for n in names if inc.search(n)]
    if not chosen:
        raise ValueError(f"--include {include!r} matches no tensor of {ckpt.path}")
    for n in chosen:
        if len(ckpt.shape(n)) != 2:
            raise ValueError(f"tensor {n} matched by --include {include!r} is not 2-D: shape {ckpt.shape(n)}")
    return chosen


def layer_file(out_dir: Path, name: str) -> Path:
    """`out_dir/layers/<safe_file_name(name)>.safetensors`: never outside `out_dir/layers`."""
    return Path(out_dir) / "layers" / safe_file_name(name, ".safetensors")


def _config_of(info: dict) -> DuQuantConfig | None:
    """The config a pack file records (a dict written before a field existed gives it its default), or None
    when it records none that reads."""
    try:
        return DuQuantConfig.from_dict(info.get("config"))
    except (TypeError, ValueError):
        return None


def _reuse(path: Path, name: str, shape: tuple[int, ...], config: DuQuantConfig) -> str | None:
    """None when `path` already holds `name`'s pack for this shape and config, intact (resume);
    else why it must be (re)packed: "absent", or a reason to tell the user."""
    if not path.is_file():
        return "absent"
    try:
        integrity.verify_file(path)  # every byte, against its checksum; format-1 files have none: repack
        info = read_metadata(path)[name]
    except (PackFileError, integrity.ChecksumError, KeyError, OSError) as e:
        return f"it is unreadable or damaged ({e})"
    if _config_of(info) != config:
        return "it was packed with another config"
    if (info.get("out_features"), info.get("in_features")) != tuple(shape):
        return "it was packed from a tensor of another shape"
    return None


@dataclasses.dataclass
class PackSummary:
    layers: dict[str, dict]
    packed: int
    skipped: int
    params: int
    seconds: float
    peak_rss_gib: float
    devices: int = 1

    def table(self) -> str:
        rate = self.params / self.seconds / 1e6 if self.seconds else float("nan")
        return "\n".join(
            [
                f"{'layers packed':<22}{self.packed}",
                f"{'layers resumed':<22}{self.skipped}",
                f"{'parameters packed':<22}{self.params / 1e9:.3f} B",
                f"{'wall time':<22}{self.seconds:.1f} s",
                f"{'throughput':<22}{rate:.1f} M params/s, {self.packed / self.seconds if self.seconds else 0:.2f} layers/s",
                f"{'peak memory (RSS)':<22}{self.peak_rss_gib:.2f} GiB",
                f"{'devices':<22}{self.devices}",
            ]
        )


def pack_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: DuQuantConfig = DuQuantConfig(),
    include: str | None = None,
    exclude: str | None = None,
    progress: bool = True,
    on_layer: Callable[[str], None] | None = None,
    devices: list | None = None,
    echo: Callable[[str], None] = _stderr,
    stats: Mapping[str, LayerStats] | None = None,
    input_groups: bool = False,
) -> PackSummary:
    """Packs every selected layer of `checkpoint` into `out_dir`, one tensor in memory at a time.

    Layers are spread over the layer axis: under `jax.distributed`, process `p`
    of `n` packs layers `p, p+n, ...`; within a process, layer after layer goes
    round-robin to `devices` (default: every local device), up to one in flight
    per device on accelerators. On CPU each pack completes before the next
    starts (concurrent LAPACK kernels deadlock jaxlib 0.10.2), so several CPU
    devices give the same results as one, not more speed.

    While it runs, `out_dir` is locked (duquant_jax.lock; process 0 holds the
    lock under `jax.distributed`) and has no `index.json`. A layer file that is
    intact and holds this config's pack of the same shape is kept; any other is
    repacked. `echo` receives notes (a stale lock taken over, a layer repacked).
    `stats` ({layer: LayerStats}, e.g. `load_stats(path)`) serves configs that need
    activation statistics; a tensor matches its layer as in `stats.layer_for_tensor`.
    With `input_groups`, the layers of each of `stats.input_groups` are packed with one
    input transform (`duquant_jax.shared_input`) and the index records them.

    Raises:
      BusyError: another run is writing `out_dir`.
      OSError: a layer or the index could not be written; every finished layer
        stays readable and no index is written.
    """
    ckpt = Checkpoint(checkpoint)
    out_dir = Path(out_dir)
    names = select_layers(ckpt, include, exclude)
    shapes = {n: ckpt.shape(n) for n in names}
    files = {n: layer_file(out_dir, n) for n in names}
    layer_stats = {n: _stats_for(n, shapes[n], config, stats) for n in names}  # every layer checked before any is written
    units = _units(names, stats if input_groups else None)
    args = (ckpt, out_dir, config, names, units, shapes, files, progress, on_layer, devices, echo, layer_stats)
    if jax.process_count() > 1:  # the lock is process 0's; the others write under it
        return _pack_locked(*args)
    with exclusive(out_dir, echo=echo):
        return _pack_locked(*args)


def _units(names: list[str], stats: Mapping[str, LayerStats] | None) -> list[tuple[str, ...]]:
    """The packing units, in checkpoint order: each selected input group of `stats.input_groups`
    (as tensor names, at its first member's place) is one unit, packed with one input transform
    (`duquant_jax.shared_input`); every other tensor is a unit of its own."""
    groups = getattr(stats, "input_groups", ()) if stats is not None else ()
    if not groups:
        return [(n,) for n in names]
    tensor_of = {}
    for n in names:
        layer = layer_for_tensor(stats, n)
        if layer is not None:
            tensor_of[layer] = n
    unit_of = {}
    for g in groups:
        members = tuple(tensor_of[layer] for layer in g if layer in tensor_of)
        if len(members) > 1:
            unit_of.update({t: members for t in members})
    units, placed = [], set()
    for n in names:
        unit = unit_of.get(n, (n,))
        if unit[0] not in placed:
            placed.add(unit[0])
            units.append(unit)
    return units


def _stats_for(tensor: str, shape: tuple[int, ...], config: DuQuantConfig, stats: Mapping[str, LayerStats] | None) -> LayerStats | None:
    if not config.needs_stats:
        return None
    layer = None if stats is None else layer_for_tensor(stats, tensor)
    return stats_for_layer(config, stats, layer or tensor.removesuffix(".weight"), shape[1])


def _pack_locked(ckpt, out_dir, config, names, units, shapes, files, progress, on_layer, devices, echo, layer_stats) -> PackSummary:
    from tqdm import tqdm

    single = jax.process_count() == 1
    if jax.process_index() == 0:
        (out_dir / INDEX).unlink(missing_ok=True)  # the directory is unfinished until the new index
    if single:
        for tmp in (out_dir / "layers").glob(".*.tmp"):  # left by a killed run; nobody else writes here now
            tmp.unlink(missing_ok=True)
    devices = list(devices or jax.local_devices())
    mine = [u for i, u in enumerate(units) if i % jax.process_count() == jax.process_index()]
    t0 = time.perf_counter()
    counts = {"packed": 0, "skipped": 0, "params": 0}
    in_flight: deque[tuple[str, Pack]] = deque()
    # progress: a bar on a terminal, nothing in logs and pipes
    bar = tqdm(total=sum(map(len, mine)), desc="duquant pack", unit="layer", disable=None if progress else True)

    def finish_oldest() -> None:
        name, pack = in_flight.popleft()
        try:
            save_packs(files[name], {name: pack})
        except OSError as e:
            raise OSError(e.errno, f"could not write layer {name} to {files[name]}: {e.strerror or e}") from e
        counts["packed"] += 1
        counts["params"] += int(np.prod(shapes[name]))
        bar.set_postfix_str(f"{counts['params'] / (time.perf_counter() - t0) / 1e6:.0f} M params/s")
        bar.update()
        if on_layer is not None:
            on_layer(name)

    with bar:  # closed before any error goes up, so the error is the last line
        for unit in mine:
            whys = [_reuse(files[name], name, shapes[name], config) for name in unit]
            if all(why is None for why in whys):
                counts["skipped"] += len(unit)
                bar.update(len(unit))
                continue
            for name, why in zip(unit, whys):
                if why not in (None, "absent"):
                    echo(f"note: repacking {name}: {files[name]} is there but {why}")
            device = devices[(counts["packed"] + len(in_flight)) % len(devices)]
            try:
                if len(unit) == 1:
                    packs = [pack_weight(ckpt.tensor(unit[0]), config, layer_stats[unit[0]], device=device, wait=False)]
                else:  # a group repacks whole: its members share the input transform
                    packs = pack_group([ckpt.tensor(n) for n in unit], config, layer_stats[unit[0]], names=unit, device=device)
            except (ValueError, TypeError) as e:
                raise type(e)(f"tensor {unit[0] if len(unit) == 1 else list(unit)}: {e}") from e
            in_flight.extend(zip(unit, packs))
            while len(in_flight) >= len(devices):
                finish_oldest()
        while in_flight:
            finish_oldest()
    if not single:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("duquant pack: every layer written")
    index = {
        "format": INDEX_FORMAT,
        "format_version": "2",
        "config": config.to_dict(),
        "checkpoint": str(ckpt.path),
        "layers": {n: {"file": files[n].relative_to(out_dir).as_posix(), "shape": list(shapes[n])} for n in names},
    }
    groups = [list(u) for u in units if len(u) > 1]
    if groups:  # an optional key: readers without it see ungrouped layers
        index["input_groups"] = groups
    if jax.process_index() == 0:
        try:
            atomic_write(out_dir / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1), encoding="utf-8"))
        except OSError as e:
            raise OSError(e.errno, f"could not write {out_dir / INDEX}: {e.strerror or e}") from e
    peak = peak_rss_gib()
    return PackSummary(
        index["layers"], counts["packed"], counts["skipped"], counts["params"], time.perf_counter() - t0, peak, len(devices)
    )


def _index(out_dir: Path) -> dict:
    """`out_dir/index.json`, validated: format, config, and each layer's file and shape."""
    path = out_dir / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{out_dir} has no {INDEX}: not a finished `duquant pack` output (run `duquant pack` into it to finish it)"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise ValueError(f"format is not {INDEX_FORMAT!r}")
        DuQuantConfig.from_dict(index["config"])
        layers = index["layers"]
        if not isinstance(layers, dict):
            raise ValueError("layers is not an object")
        for name, entry in layers.items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
                raise ValueError(f"layer {name!r} has no valid shape")
        for g in index.get("input_groups", []):
            if not (isinstance(g, list) and len(g) > 1 and all(isinstance(n, str) and n in layers for n in g)):
                raise ValueError(f"input group {g!r:.200} does not name two or more of its layers")
    except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as e:
        raise PackFileError(f"{path} is damaged or not a `duquant pack` index ({type(e).__name__}: {e}); run `duquant pack` again to rewrite it") from None
    return index


def pack_dir_layers(out_dir: str | Path) -> list[str]:
    """The layer names of a directory written by `pack_checkpoint`, in checkpoint order."""
    return list(_index(Path(out_dir))["layers"])


def pack_dir_groups(out_dir: str | Path) -> list[list[str]]:
    """The input groups of a `pack_checkpoint` directory (tensor names packed with one input transform)."""
    return [list(g) for g in _index(Path(out_dir)).get("input_groups", [])]


def pack_dir_files(out_dir: str | Path) -> dict[str, Path]:
    """{layer: its pack file} of a `pack_checkpoint` directory, every file checked to lie inside it.

    Raises:
      UnsafePathError: an index entry names a file outside `out_dir` (absolute, `..`, a symlink out).
    """
    out_dir = Path(out_dir)
    return _files(out_dir, _index(out_dir))


def _files(out_dir: Path, index: dict) -> dict[str, Path]:
    source = out_dir / INDEX
    return {
        name: contained(out_dir, entry.get("file"), what=f"layer {name!r}", source=source)
        for name, entry in index["layers"].items()
    }


def iter_pack_dir(out_dir: str | Path, layers: list[str] | None = None, *, verify: bool = True) -> Iterator[tuple[str, Pack]]:
    """Yields (name, pack) from a directory written by `pack_checkpoint`, one layer at a time.

    Each layer's file must lie inside `out_dir`, pass its checksums (unless
    `verify=False`) and hold a pack of the index's config and shape.
    """
    out_dir = Path(out_dir)
    index = _index(out_dir)
    files = _files(out_dir, index)
    config = DuQuantConfig.from_dict(index["config"])
    for name in layers if layers is not None else list(index["layers"]):
        if name not in index["layers"]:
            raise KeyError(f"{out_dir} has no layer {name!r}")
        try:
            pack = load_packs(files[name], [name], verify=verify)[name]
        except KeyError:
            raise PackFileError(f"pack file {files[name]} does not hold layer {name!r}, as {out_dir / INDEX} says") from None
        want = tuple(index["layers"][name]["shape"])
        if pack.config != config or (pack.out_features, pack.in_features) != want:
            raise PackFileError(
                f"pack file {files[name]} holds layer {name!r} packed with another config or shape than {out_dir / INDEX} "
                "records (the directory mixes two runs): run `duquant pack` into it again"
            )
        yield name, pack
