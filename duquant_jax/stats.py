"""Activation statistics that packing needs (smoothing, the "duquant" rotation, GPTQ).

`LayerStats` holds one linear layer's input statistics, accumulated over the
observe pass's batches (never whole activations); `ModelStats` maps layer names
to them; `StatsAccumulator` accumulates them in NumPy from batches of any
framework; `save_stats` / `load_stats` keep them in one safetensors file.

This module imports neither JAX nor torch. The observe passes that fill it:
`interop.observe` (PyTorch) and `duquant_jax.nn.observe` (Flax NNX).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

FORMAT = "duquant-jax-stats"
FORMAT_VERSION = "1"

# `xtx` must equal its transpose to this fraction of its largest entry (float32 GEMMs
# are not always bitwise symmetric), and `diag(xtx) >= (1 - DIAG_TOL) * act_absmax**2 - DIAG_FLOOR`
# (see `_diag_deficit` for why this is what float32 accumulation guarantees).
SYMMETRY_TOL = 1e-5
DIAG_TOL = 1e-3
DIAG_FLOOR = float(np.finfo(np.float32).tiny)  # 2**-126 ~ 1.18e-38, float32's smallest normal

COLLECT_HINT = (
    "collect them with `with interop.observe(model, xtx=...) as stats:` (PyTorch) or "
    "`with duquant_jax.nn.observe(model, xtx=...) as stats:` (Flax NNX), running calibration "
    "batches through the float model inside the block; pass `stats=` to quantize_, `stats[layer]` "
    "to pack_weight, or `stats.save(path)` and `duquant pack CHECKPOINT --stats path`"
)


class StatsError(ValueError):
    """Activation statistics that are inconsistent (shape, NaN/Inf, sign, symmetry)."""


class StatsFileError(ValueError):
    """A statistics file that cannot be read: missing, truncated, corrupted or inconsistent."""


def _name(layer: str) -> str:
    return f"layer {layer!r}" if layer else "layer (unnamed)"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class LayerStats:
    """Statistics of one linear layer's input `x (..., in)`, over every token observed.

    Validated at construction (a bad value raises `StatsError` naming `layer`); the
    arrays are stored as NumPy float32 whatever framework they came from.

    Attributes:
      act_absmax: (in,) float32, `max |x_j|` per input channel.
      xtx: (in, in) float32 `sum_t x_t x_tᵀ` (the second-moment matrix `XᵀX`, not
        normalized), or None when it was not recorded.
      tokens: how many tokens (rows of `X`) were observed.
      layer: the layer's name, for error messages only.
    """

    act_absmax: Any
    xtx: Any = None
    tokens: int = 0
    layer: str = ""

    def __post_init__(self) -> None:
        who = _name(self.layer)
        absmax = np.asarray(self.act_absmax)
        if absmax.ndim != 1 or absmax.shape[0] < 1:
            raise StatsError(f"{who}: act_absmax must have shape (in,) with in >= 1; got {absmax.shape}")
        absmax = _as_float32(absmax, "act_absmax", who)
        if not np.all(np.isfinite(absmax)):
            raise StatsError(f"{who}: act_absmax has NaN/Inf at channels {np.flatnonzero(~np.isfinite(absmax))[:8].tolist()}")
        if np.any(absmax < 0):
            raise StatsError(f"{who}: act_absmax must be >= 0; got {float(absmax.min())} at channel {int(absmax.argmin())}")
        tokens = self.tokens
        if isinstance(tokens, (bool, np.bool_)) or not isinstance(tokens, (int, np.integer)) or tokens < 0:
            raise StatsError(f"{who}: tokens must be an int >= 0; got {tokens!r}")
        object.__setattr__(self, "act_absmax", absmax)
        object.__setattr__(self, "tokens", int(tokens))
        if self.xtx is not None:
            object.__setattr__(self, "xtx", _checked_xtx(np.asarray(self.xtx), absmax, who))

    @property
    def in_features(self) -> int:
        return int(np.shape(self.act_absmax)[0])

    def __repr__(self) -> str:
        xtx = "none" if self.xtx is None else f"{self.xtx.shape}"
        return f"LayerStats(layer={self.layer!r}, in_features={self.in_features}, tokens={self.tokens}, xtx={xtx})"

    def merge(self, other: LayerStats) -> LayerStats:
        """The statistics of both token sets: max of absmax, sum of xtx and tokens.

        xtx is kept only when both have it.
        """
        if other.in_features != self.in_features:
            raise StatsError(f"{_name(self.layer)}: cannot merge statistics of {self.in_features} and {other.in_features} channels")
        xtx = None if self.xtx is None or other.xtx is None else self.xtx + other.xtx
        return LayerStats(np.maximum(self.act_absmax, other.act_absmax), xtx, self.tokens + other.tokens, layer=self.layer)


def _as_float32(a: np.ndarray, field: str, who: str) -> np.ndarray:
    """A real array (float, int or bfloat16) as float32, not copied when it is float32 already (an `XᵀX` of a
    16384-wide input is 1 GiB); bool, complex and objects are errors."""
    if a.dtype.kind in "bcOUSM":
        raise StatsError(f"{who}: {field} must be a real-valued array; got dtype {a.dtype}")
    try:
        return a.astype(np.float32, copy=False)
    except (TypeError, ValueError) as e:
        raise StatsError(f"{who}: {field} cannot be read as float32 (dtype {a.dtype}): {e}") from e


def _checked_xtx(xtx: np.ndarray, absmax: np.ndarray, who: str) -> np.ndarray:
    n = absmax.shape[0]
    if xtx.shape != (n, n):
        raise StatsError(f"{who}: xtx must have shape (in, in) = {(n, n)}; got {xtx.shape}")
    xtx = _as_float32(xtx, "xtx", who)
    finite, scale, asym = _finite_scale_asymmetry(xtx)
    if not finite:
        raise StatsError(f"{who}: xtx has NaN/Inf entries")
    if asym > SYMMETRY_TOL * scale:
        raise StatsError(f"{who}: xtx is not symmetric (max |xtx - xtxᵀ| = {asym:.3g}, largest entry {scale:.3g})")
    diag = np.diag(xtx)
    neg = np.flatnonzero(diag < 0)
    if neg.size:
        j = int(neg[0])
        raise StatsError(f"{who}: xtx has a negative diagonal: diag(xtx)[{j}] = {float(diag[j]):.6g} (a sum of squares is >= 0)")
    low = np.flatnonzero(_diag_deficit(diag, absmax) > 0)
    if low.size:
        j = int(low[0])
        raise StatsError(
            f"{who}: xtx does not match act_absmax: diag(xtx)[{j}] = {float(diag[j]):.6g} < "
            f"act_absmax[{j}]² = {float(absmax[j]) ** 2:.6g} (a sum of squares is at least its largest term)"
        )
    return xtx


def _finite_scale_asymmetry(xtx: np.ndarray, rows: int = 1024) -> tuple[bool, float, float]:
    """(whether every entry is finite, max |xtx|, max |xtx - xtxᵀ|) of a square `xtx`, `rows` rows at a time.

    Whole-matrix expressions would hold up to three (in, in) temporaries (3 GiB for a
    16384-wide `XᵀX`); a band of rows needs two bands.
    """
    scale, asym = 0.0, 0.0
    for i in range(0, xtx.shape[0], rows):
        band = xtx[i : i + rows]
        if not np.isfinite(band).all():
            return False, float("nan"), float("nan")
        scale = max(scale, float(np.abs(band).max(initial=0.0)))
        asym = max(asym, float(np.abs(band - xtx[:, i : i + rows].T).max(initial=0.0)))
    return True, scale, asym


def _diag_deficit(diag: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """(in,) float64: how far `diag (in,)` falls below the least float32 accumulation can give; > 0 is corrupt.

    `diag(xtx)[j]` is a float32 sum of the float32 squares `x_tj²`, over the tokens of
    every batch and in any order (GEMM blocking, threads, batch sums, `merge`). All terms
    are >= 0 and rounding is monotone, so every partial sum, and hence the total, is at
    least the largest rounded term `fl(m²)`, `m = act_absmax[j]`. That term is:
      - `m²(1 - 2⁻²⁴)` or more when `m²` is a float32 normal; `DIAG_TOL` (1e-3) also covers
        GEMMs that round their inputs to TF32 (to nearest: relative 2⁻¹¹ per factor);
      - anything from 0 to about `m²` when `m² < 2⁻¹²⁶`: it underflows to a denormal or,
        with flush-to-zero (XLA on CPU does it; `torch.set_flush_denormal(True)`, fast-math
        builds), to 0, as does a denormal activation itself: a loss below `DIAG_FLOOR`.
    So the bound is `(1 - DIAG_TOL) m² - DIAG_FLOOR`, with `m²` exact in float64 (the square
    of a float32 fits in a float64's 53 bits). An absmax whose float32 square overflows
    would have made xtx Inf, which is refused first; a channel that is always 0 gives 0 >= 0.
    """
    m2 = np.square(absmax.astype(np.float64))
    return ((1 - DIAG_TOL) * m2 - DIAG_FLOOR) - diag.astype(np.float64)


def check_input_groups(groups: Any, widths: Mapping[str, int]) -> tuple[tuple[str, ...], ...]:
    """Validates groups of layer names that read one input: each a list of at least two distinct
    names of `widths` ({name: in_features}) with one input width, no name in two groups."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise StatsError(f"input_groups must be a list of lists of layer names; got {type(groups).__name__}")
    out, seen = [], {}
    for i, g in enumerate(groups):
        if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or not all(isinstance(n, str) for n in g):
            raise StatsError(f"input group {i} must be a list of layer names; got {g!r:.200}")
        if len(g) < 2 or len(set(g)) != len(g):
            raise StatsError(f"input group {i} must name at least two distinct layers; got {list(g)!r:.200}")
        for n in g:
            if n not in widths:
                raise StatsError(f"input group {i} names {n!r}, which has no statistics")
            if n in seen:
                raise StatsError(f"layer {n!r} is in input groups {seen[n]} and {i}; a layer reads one input")
            seen[n] = i
        if len({widths[n] for n in g}) != 1:
            raise StatsError(f"input group {i}: its layers have different input widths {[widths[n] for n in g]}; they cannot read one input")
        out.append(tuple(g))
    return tuple(out)


class ModelStats(Mapping[str, LayerStats]):
    """Activation statistics of a model's linear layers: a mapping {layer name: LayerStats}.

    An observe pass hands one out at the start of its `with` block and fills it
    on a clean exit; until then (or when the block raised) reading it raises
    `RuntimeError`, so incomplete statistics are never used by mistake.
    """

    def __init__(self, layers: Mapping[str, LayerStats] | None = None, input_groups: Sequence[Sequence[str]] = ()):
        self._layers: dict[str, LayerStats] = {}
        self._groups: tuple[tuple[str, ...], ...] = ()
        self._state = "complete"
        if layers is not None:
            self._set(layers, input_groups)

    @classmethod
    def pending(cls) -> ModelStats:
        """An empty object that an observe pass fills on exit (`_finish`) or marks failed (`_fail`)."""
        stats = cls()
        stats._state = "pending"
        return stats

    def _set(self, layers: Mapping[str, LayerStats], input_groups: Sequence[Sequence[str]] = ()) -> None:
        for name, s in layers.items():
            if not isinstance(name, str) or not name:
                raise StatsError(f"layer names must be non-empty strings; got {name!r}")
            if not isinstance(s, LayerStats):
                raise StatsError(f"{_name(name)}: expected LayerStats; got {type(s).__name__}")
        # Each entry carries its key as its name, for error messages.
        self._layers = {n: s if s.layer == n else dataclasses.replace(s, layer=n) for n, s in layers.items()}
        self._groups = check_input_groups(input_groups, {n: s.in_features for n, s in layers.items()})

    def _finish(self, layers: Mapping[str, LayerStats], input_groups: Sequence[Sequence[str]] = ()) -> None:
        self._set(layers, input_groups)
        self._state = "complete"

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """The layers that read one input tensor, as groups of names (q/k/v, gate/up): found by the
        observe pass (every batch gave each member of a group the very same tensor), or given.
        `interop.quantize_(input_groups="auto")` fits one input transform per group
        (`duquant_jax.shared_input`)."""
        self._layers_or_raise()
        return self._groups

    def _fail(self) -> None:
        self._layers = {}
        self._state = "failed"

    @property
    def complete(self) -> bool:
        """False inside the observe block, and for good when the block raised."""
        return self._state == "complete"

    def _layers_or_raise(self) -> dict[str, LayerStats]:
        if self._state == "pending":
            raise RuntimeError("activation statistics are incomplete: the observe block has not exited yet")
        if self._state == "failed":
            raise RuntimeError("activation statistics are incomplete: the observe block raised an exception, so nothing was recorded")
        return self._layers

    def __getitem__(self, name: str) -> LayerStats:
        layers = self._layers_or_raise()
        if name not in layers:
            raise KeyError(f"no activation statistics for layer {name!r} ({len(layers)} layers recorded); {COLLECT_HINT}")
        return layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers_or_raise())

    def __len__(self) -> int:
        return len(self._layers_or_raise())

    def __repr__(self) -> str:
        if not self.complete:
            return f"ModelStats(<{self._state}>)"
        with_xtx = sum(s.xtx is not None for s in self._layers.values())
        groups = f", {len(self._groups)} input groups" if self._groups else ""
        return f"ModelStats({len(self._layers)} layers, {with_xtx} with xtx{groups})"

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the statistics to one safetensors file (`save_stats`)."""
        return save_stats(path, self)


@contextlib.contextmanager
def observe_session(
    start: Callable[[], None],
    stop: Callable[[], None],
    results: Callable[[], Mapping[str, LayerStats]],
    kind: str,
    groups: Callable[[], Sequence[Sequence[str]]] | None = None,
) -> Iterator[ModelStats]:
    """One observe pass, for the PyTorch and the Flax observers alike.

    Calls `start()` (install the recorders), yields a pending `ModelStats`, and
    always calls `stop()` (remove them, also after a partial `start`). On a clean
    exit the statistics are `results()`, less the layers that saw no token (with
    a warning; none at all is an error), and the input groups are `groups()` among
    the layers kept; on an exception they stay empty and say so.
    """
    stats = ModelStats.pending()
    ok = False
    try:
        start()
        yield stats
        ok = True
    finally:
        stop()
        if not ok:
            stats._fail()
    try:
        layers = dict(results())
        seen = {n: s for n, s in layers.items() if s.tokens > 0}
        if not seen:
            raise RuntimeError(f"observe: no batch reached any selected {kind} inside the block")
        missed = [n for n in layers if n not in seen]
        if missed:
            warnings.warn(f"observe: these layers saw no batch and have no statistics: {missed}", stacklevel=3)
        found = [] if groups is None else [[n for n in g if n in seen] for g in groups()]
        stats._finish(seen, [g for g in found if len(g) > 1])
    except BaseException:
        stats._fail()
        raise


class StatsAccumulator:
    """Accumulates one layer's `LayerStats` from batches `(..., in)` of any framework, in NumPy.

    `act_absmax` by element-wise maximum, `xtx` (when asked for) by adding each
    batch's `xᵀx`, computed and summed in `dtype` (float32 by default).
    """

    def __init__(self, in_features: int, *, xtx: bool = False, dtype: Any = np.float32, layer: str = ""):
        if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1; got {in_features!r}")
        self.layer = layer
        self.dtype = np.dtype(dtype)
        self.absmax = np.zeros(int(in_features), np.float32)
        self.xtx = np.zeros((int(in_features),) * 2, self.dtype) if xtx else None
        self.tokens = 0

    def update(self, x: Any) -> None:
        """x: (..., in) batch (NumPy, JAX, or a CPU torch tensor without grad)."""
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.absmax.shape[0]:
            raise ValueError(f"{_name(self.layer)}: a batch must have shape (..., {self.absmax.shape[0]}); got {x.shape}")
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return
        np.maximum(self.absmax, np.abs(x2).max(axis=0).astype(np.float32), out=self.absmax)
        if self.xtx is not None:
            xd = x2.astype(self.dtype)
            self.xtx += xd.T @ xd
        self.tokens += x2.shape[0]

    def result(self) -> LayerStats:
        """The statistics so far (validated); xtx symmetrized and stored as float32."""
        xtx = None if self.xtx is None else (0.5 * (self.xtx + self.xtx.T)).astype(np.float32)
        return LayerStats(self.absmax.copy(), xtx, self.tokens, layer=self.layer)


def save_stats(path: str | os.PathLike, stats: Mapping[str, LayerStats]) -> Path:
    """Writes `{layer: LayerStats}` to one safetensors file at `path`, atomically.

    Tensors `{layer}.act_absmax` and `{layer}.xtx`; the metadata holds `format`,
    `format_version` and, in `layers`, each layer's `in_features`, `tokens` and
    whether it has xtx, as JSON.
    """
    from safetensors.numpy import save_file

    from duquant_jax.atomic import atomic_write

    if isinstance(stats, ModelStats):
        stats._layers_or_raise()
    if not stats:
        raise ValueError("save_stats needs statistics of at least one layer")
    tensors: dict[str, np.ndarray] = {}
    table = {}
    for name, s in stats.items():
        if not isinstance(s, LayerStats):
            raise TypeError(f"{_name(name)}: expected LayerStats; got {type(s).__name__}")
        tensors[f"{name}.act_absmax"] = np.ascontiguousarray(s.act_absmax)
        if s.xtx is not None:
            tensors[f"{name}.xtx"] = np.ascontiguousarray(s.xtx)
        table[name] = {"in_features": s.in_features, "tokens": s.tokens, "xtx": s.xtx is not None}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": json.dumps(table)}
    groups = stats.input_groups if isinstance(stats, ModelStats) else ()
    if groups:  # an optional key: files without it read as before
        metadata["input_groups"] = json.dumps([list(g) for g in groups])
    return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_stats(path: str | os.PathLike) -> ModelStats:
    """Reads a file written by `save_stats`; every problem is a `StatsFileError` naming the file (and layer)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"statistics file {path} does not exist; {COLLECT_HINT}")
    try:
        f = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise StatsFileError(f"statistics file {path} is not a readable safetensors file: {e}") from e
    with f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise StatsFileError(f"statistics file {path} is not a duquant-jax statistics file (format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StatsFileError(f"statistics file {path} has format_version {meta.get('format_version')!r}; this reads {FORMAT_VERSION}")
        try:
            table = json.loads(meta["layers"])
            if not isinstance(table, dict):
                raise TypeError("the layer table is not a JSON object")
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise StatsFileError(f"statistics file {path} has no readable layer table: {e}") from e
        keys = set(f.keys())
        layers = {}
        for name, info in table.items():
            try:
                n, tokens, has_xtx = int(info["in_features"]), int(info["tokens"]), bool(info["xtx"])
            except (KeyError, TypeError, ValueError) as e:
                raise StatsFileError(f"statistics file {path}, layer {name!r}: bad metadata: {e}") from e
            arrays = {}
            fields = {"act_absmax": (n,), **({"xtx": (n, n)} if has_xtx else {})}
            for field, shape in fields.items():
                key = f"{name}.{field}"
                if key not in keys:
                    raise StatsFileError(f"statistics file {path}, layer {name!r}: tensor {key} is missing")
                try:
                    a = f.get_tensor(key)
                except Exception as e:
                    raise StatsFileError(f"statistics file {path}, layer {name!r}: tensor {key} cannot be read: {e}") from e
                if tuple(a.shape) != shape:
                    raise StatsFileError(f"statistics file {path}, layer {name!r}: {key} has shape {tuple(a.shape)}, expected {shape}")
                arrays[field] = a
            try:
                layers[name] = LayerStats(arrays["act_absmax"], arrays.get("xtx"), tokens, layer=name)
            except StatsError as e:
                raise StatsFileError(f"statistics file {path}: {e}") from e
        try:
            groups = json.loads(meta.get("input_groups", "[]"))
            return ModelStats(layers, groups)
        except (json.JSONDecodeError, StatsError) as e:
            raise StatsFileError(f"statistics file {path} has bad input_groups: {e}") from e


def layer_for_tensor(stats: Mapping[str, LayerStats], tensor: str) -> str | None:
    """The layer of `stats` whose weight is checkpoint tensor `tensor`, or None.

    The rule of `interop.from_pack_dir`: layer `L` matches when `L + ".weight" == tensor`
    or, for a model that wraps the checkpoint's (sentence-transformers'
    `0.auto_model.`), when `L + ".weight"` ends with `"." + tensor`. Several
    matches are an error naming them.
    """
    hits = [name for name in stats if name + ".weight" == tensor]
    if not hits:
        hits = [name for name in stats if (name + ".weight").endswith("." + tensor)]
    if len(hits) > 1:
        raise StatsError(f"tensor {tensor!r} matches the statistics of several layers: {hits}")
    return hits[0] if hits else None


def stats_for_layer(config: Any, stats: Mapping[str, LayerStats] | None, layer: str, in_features: int) -> LayerStats | None:
    """The statistics that packing `layer` with `config` needs, checked; None when it needs none.

    Args:
      config: a `DuQuantConfig` (its `needs_stats` / `needs_xtx` decide).
      stats: {layer: LayerStats}, e.g. a `ModelStats` or `load_stats(path)`; may be None.
      layer: the layer's name in `stats`.
      in_features: the layer's input width, which the statistics must have.

    Raises:
      StatsError naming the layer and saying how to collect statistics, when they are
      missing, lack `xtx` that the config needs, or have the wrong width.
    """
    if not config.needs_stats:
        return None
    wants = "XᵀX (observe with xtx=True)" if config.needs_xtx else "per-channel activation maxima"
    if stats is None:
        raise StatsError(f"{_name(layer)}: this config needs activation statistics ({wants}) and none were given; {COLLECT_HINT}")
    if layer not in stats:
        raise StatsError(f"{_name(layer)}: this config needs activation statistics ({wants}) and the statistics have none for it; {COLLECT_HINT}")
    s = stats[layer]
    if s.in_features != in_features:
        raise StatsError(f"{_name(layer)}: statistics have {s.in_features} input channels, the layer has {in_features}")
    if config.needs_xtx and s.xtx is None:
        raise StatsError(f"{_name(layer)}: this config (weight_method={config.weight_method!r}) needs XᵀX and the statistics have none; {COLLECT_HINT} with xtx=True")
    return s
