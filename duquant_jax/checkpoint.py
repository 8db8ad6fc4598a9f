"""Whole-checkpoint packing: stream a safetensors checkpoint tensor by tensor into pack files.

Input: one `.safetensors` file, or a directory of shards with the index JSON that
transformers writes (`*.safetensors.index.json`, `{"weight_map": {tensor: shard}}`).

Output directory layout:
  layers/<tensor name>.safetensors   one pack file per layer (duquant_jax.io), written atomically
  index.json                          written last: config, and every layer's file and shape

Each layer file is complete or absent, so an interrupted run resumes by skipping
the layers whose file already holds a pack of the same shape and config.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np

from duquant_jax.config import DuQuantConfig
from duquant_jax.io import PackFileError, atomic_write, load_packs, read_metadata, save_packs
from duquant_jax.pack import pack_weight
from duquant_jax.packed import Pack

INDEX = "index.json"
DEFAULT_EXCLUDE = r"embed|lm_head"


class Checkpoint:
    """Read-only view of a safetensors checkpoint: names, shapes, one tensor at a time."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            indexes = sorted(path.glob("*.safetensors.index.json"))
            if indexes:
                try:
                    weight_map = json.loads(indexes[0].read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"checkpoint index {indexes[0]} has no readable weight_map: {e}") from e
                self.files = {name: path / shard for name, shard in weight_map.items()}
            else:
                shards = sorted(path.glob("*.safetensors"))
                if not shards:
                    raise FileNotFoundError(f"checkpoint directory {path} holds no .safetensors file")
                self.files = {name: f for f in shards for name in self._keys(f)}
        elif path.is_file():
            self.files = {name: path for name in self._keys(path)}
        else:
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        self.path = path

    @staticmethod
    def _keys(file: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="numpy") as f:
                return list(f.keys())
        except Exception as e:
            raise ValueError(f"checkpoint file {file} is not a readable safetensors file: {e}") from e

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="numpy") as f:
            return tuple(f.get_slice(name).get_shape())

    def tensor(self, name: str):
        """One tensor as a JAX array in its stored dtype (bfloat16 included)."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="flax") as f:
            return f.get_tensor(name)


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
    return out_dir / "layers" / f"{name}.safetensors"


def _done(path: Path, name: str, shape: tuple[int, ...], config: DuQuantConfig) -> bool:
    """Whether `path` already holds `name`'s pack for this shape and config (resume)."""
    if not path.is_file():
        return False
    try:
        info = read_metadata(path)[name]
    except (PackFileError, KeyError):
        return False
    return info["config"] == config.to_dict() and (info["out_features"], info["in_features"]) == shape


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
) -> PackSummary:
    """Packs every selected layer of `checkpoint` into `out_dir`, one tensor in memory at a time.

    Layers are spread over the layer axis: under `jax.distributed`, process `p`
    of `n` packs layers `p, p+n, ...`; within a process, layer after layer goes
    round-robin to `devices` (default: every local device), up to one in flight
    per device on accelerators. On CPU each pack completes before the next
    starts (concurrent LAPACK kernels deadlock jaxlib 0.10.2), so several CPU
    devices give the same results as one, not more speed.
    """
    from tqdm import tqdm

    ckpt = Checkpoint(checkpoint)
    out_dir = Path(out_dir)
    names = select_layers(ckpt, include, exclude)
    shapes = {n: ckpt.shape(n) for n in names}
    devices = list(devices or jax.local_devices())
    mine = [n for i, n in enumerate(names) if i % jax.process_count() == jax.process_index()]
    t0 = time.perf_counter()
    counts = {"packed": 0, "skipped": 0, "params": 0}
    in_flight: deque[tuple[str, Pack]] = deque()
    bar = tqdm(total=len(mine), desc="duquant pack", unit="layer", disable=not progress)

    def finish_oldest() -> None:
        name, pack = in_flight.popleft()
        save_packs(layer_file(out_dir, name), {name: pack})
        counts["packed"] += 1
        counts["params"] += int(np.prod(shapes[name]))
        bar.set_postfix_str(f"{counts['params'] / (time.perf_counter() - t0) / 1e6:.0f} M params/s")
        bar.update()
        if on_layer is not None:
            on_layer(name)

    for name in mine:
        if _done(layer_file(out_dir, name), name, shapes[name], config):
            counts["skipped"] += 1
            bar.update()
            continue
        device = devices[(counts["packed"] + len(in_flight)) % len(devices)]
        try:
            pack = pack_weight(ckpt.tensor(name), config, device=device, wait=False)
        except (ValueError, TypeError) as e:
            raise type(e)(f"tensor {name}: {e}") from e
        in_flight.append((name, pack))
        if len(in_flight) >= len(devices):
            finish_oldest()
    while in_flight:
        finish_oldest()
    bar.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("duquant pack: every layer written")
    index = {
        "format": "duquant-jax-pack-dir",
        "config": config.to_dict(),
        "checkpoint": str(ckpt.path),
        "layers": {n: {"file": str(layer_file(out_dir, n).relative_to(out_dir)), "shape": list(shapes[n])} for n in names},
    }
    if jax.process_index() == 0:
        atomic_write(out_dir / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return PackSummary(
        index["layers"], counts["packed"], counts["skipped"], counts["params"], time.perf_counter() - t0, peak, len(devices)
    )


def _index(out_dir: Path) -> dict:
    index_path = out_dir / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{out_dir} has no {INDEX}: not a finished `duquant pack` output")
    return json.loads(index_path.read_text())


def pack_dir_layers(out_dir: str | Path) -> list[str]:
    """The layer names of a directory written by `pack_checkpoint`, in checkpoint order."""
    return list(_index(Path(out_dir))["layers"])


def iter_pack_dir(out_dir: str | Path, layers: list[str] | None = None) -> Iterator[tuple[str, Pack]]:
    """Yields (name, pack) from a directory written by `pack_checkpoint`, one layer at a time."""
    out_dir = Path(out_dir)
    index = _index(out_dir)
    for name in layers if layers is not None else list(index["layers"]):
        if name not in index["layers"]:
            raise KeyError(f"{out_dir} has no layer {name!r}")
        yield name, load_packs(out_dir / index["layers"][name]["file"], [name])[name]
