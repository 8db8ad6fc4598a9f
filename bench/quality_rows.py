"""The rows of the quality table: named configurations, and named lists of them for `--configs`.

A row is a recipe for every bit width column: `Row.config(weight_bits, act_bits)`
gives the `DuQuantConfig` (None for the float model). Its labels (rotation,
smoothing, activation scheme, scale granularity, weight method) are read off
that config, so a row is described by what it runs. Add rows to `ROWS` and name
lists of them in `LISTS`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from duquant_jax import DuQuantConfig
from duquant_jax.config import DYNAMIC_ACT_SCHEMES

BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A16": (4, 16), "W4A4": (4, 4)}
LABELS = ("rotation", "smoothing", "act scheme", "granularity", "weight method")


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row.

    Attributes:
      name: unique key (`--configs`, the JSON lines records).
      kind: "config" (a `DuQuantConfig` through `interop.quantize_`), "float" (no
        quantization) or "rtn" (the harness's own per-row RTN baseline, `rtn_baseline.py`)
        or "preset" (`DuQuantConfig.preset(column)` where the core has it).
      options: `DuQuantConfig` fields beside the bit widths.
      sequential: calibrate block by block (`interop.quantize_sequential`: each block observed on
        the quantized blocks' outputs) instead of one observe pass over the float model.
      clip_search: after quantizing, choose each layer's activation clip on the calibration data
        (`interop.search_act_clip`).
      shared_inputs: one input transform per group of layers that read one input
        (`quantize_(input_groups="auto")`), instead of every layer's own (the default).
      only: a regular expression (`re.search`) on layer names: quantize only the task's layers it
        matches, the rest stay float (a sensitivity row: what one kind of projection costs); "" = all.
      tune: after quantizing, train every layer's weight scales on the whole model's output against the float
        model on the calibration data (`interop.tune_scales`), with these keyword arguments (epochs, lr);
        () = no tuning.
    """

    name: str
    kind: str = "config"
    options: tuple[tuple[str, Any], ...] = ()
    sequential: bool = False
    clip_search: bool = False
    shared_inputs: bool = False
    only: str = ""
    tune: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.only:
            re.compile(self.only)  # a bad pattern fails when the rows are built, not in the middle of a run

    def layer_filter(self, task_filter: Callable[[str, Any], bool]) -> Callable[[str, Any], bool]:
        """`task_filter` narrowed to the layers `only` matches (the task's own filter when `only` is "")."""
        if not self.only:
            return task_filter
        pattern = re.compile(self.only)
        return lambda name, module: task_filter(name, module) and pattern.search(name) is not None

    def config(self, weight_bits: int, act_bits: int, column: str = "") -> DuQuantConfig | None:
        if self.kind == "float":
            return None
        if self.kind == "preset":
            if not hasattr(DuQuantConfig, "preset"):
                raise NotImplementedError("DuQuantConfig.preset does not exist yet")
            return DuQuantConfig.preset(column.lower())
        return DuQuantConfig(weight_bits=weight_bits, act_bits=act_bits, **dict(self.options))

    def labels(self, config: DuQuantConfig | None) -> dict[str, str]:
        if self.kind == "float":
            return dict.fromkeys(LABELS, "float model")
        if self.kind == "rtn":
            return {"rotation": "none (harness RTN)", "smoothing": "-", "act scheme": "static-channel",
                    "granularity": "row", "weight method": "rtn"}
        c = config
        rotation = c.rotation if c.rotation == "none" else f"{c.rotation} B={c.block_size}"
        if c.rotation != "none" and c.enable_permute:
            rotation += " +perm"
        if c.rotation != "none" and c.row_rot_mode == "none":
            rotation += ", rows not rotated"
        act = c.act_scheme + (f" g{c.act_group_size}" if c.act_scheme == "dynamic-group" else "")
        act += f" clip {c.act_clip}" if c.act_scheme in DYNAMIC_ACT_SCHEMES and c.act_clip != 1.0 else ""
        labels = {
            "rotation": rotation,
            "smoothing": "-" if c.smooth_alpha is None else f"α={c.smooth_alpha}",
            "act scheme": act,
            "granularity": "row" if c.weight_group_size is None else f"g{c.weight_group_size}",
            "weight method": c.weight_method + (" act-order" if c.weight_method == "gptq" and c.gptq_act_order else "")
            + (", scales fitted per group while rounding" if c.weight_method == "gptq" and not c.gptq_static_groups else "")
            + (f", {c.scale_method} scales" if c.scale_method != "mse" else ""),
        }
        if self.kind == "preset":
            labels["rotation"] = f"preset: {labels['rotation']}"
        if self.sequential:
            labels["weight method"] += ", sequential"
        if self.clip_search:
            labels["act scheme"] += ", clip searched per layer"
        if self.shared_inputs:
            labels["rotation"] += ", one per input group"
        if self.only:
            labels["rotation"] += f", only layers matching {self.only}"
        if self.tune:
            labels["weight method"] += ", scales tuned end to end (" + ", ".join(f"{k} {v}" for k, v in self.tune) + ")"
        return labels


def _row(name: str, **options: Any) -> Row:
    DuQuantConfig(**options)  # validate now, not in the middle of a run
    return Row(name, "config", tuple(sorted(options.items())))


def _from_preset(name: str, preset: str, **changes: Any) -> Row:
    """A row equal to `DuQuantConfig.preset(preset)` but for `changes` (a development candidate)."""
    options = {k: v for k, v in DuQuantConfig.preset(preset).to_dict().items() if k not in ("weight_bits", "act_bits")}
    return _row(name, **{**options, **changes})


ROWS: dict[str, Row] = {
    r.name: r
    for r in [
        Row("float", "float"),
        Row("rtn", "rtn"),
        _row("spec"),  # SPEC's algorithm: DuQuantConfig(weight_bits, act_bits)
        _row("none", rotation="none", enable_permute=False),
        _row("svd-b128", block_size=128),
        _row("hadamard", rotation="hadamard", block_size=128),
        _row("duquant", rotation="duquant", block_size=128),
        _row("none+smooth", rotation="none", enable_permute=False, smooth_alpha=0.5),
        _row("hadamard+smooth", rotation="hadamard", block_size=128, smooth_alpha=0.5),
        _row("duquant+smooth", rotation="duquant", block_size=128, smooth_alpha=0.5),
        _row("hadamard+dyn", rotation="hadamard", block_size=128, act_scheme="dynamic-token"),
        _row("hadamard+tensor", rotation="hadamard", block_size=128, act_scheme="static-tensor"),
        _row("duquant+smooth+dyn", rotation="duquant", block_size=128, smooth_alpha=0.5, act_scheme="dynamic-token"),
        _row("hadamard+g128", rotation="hadamard", block_size=128, weight_group_size=128),
        _row("hadamard+dyn+g128", rotation="hadamard", block_size=128, act_scheme="dynamic-token", weight_group_size=128),
        _row("duquant+smooth+dyn+g128", rotation="duquant", block_size=128, smooth_alpha=0.5,
             act_scheme="dynamic-token", weight_group_size=128),
        _row("hadamard+gptq", rotation="hadamard", block_size=128, weight_method="gptq"),
        _row("hadamard+dyn+g128+gptq", rotation="hadamard", block_size=128, act_scheme="dynamic-token",
             weight_group_size=128, weight_method="gptq"),
        _row("none+dyn", rotation="none", enable_permute=False, act_scheme="dynamic-token"),
        _row("spec+dyn", act_scheme="dynamic-token"),
        _row("hadamard+dyn-norows", rotation="hadamard", block_size=128, act_scheme="dynamic-token", row_rot_mode="none"),
        _row("hadamard2048+dyn", rotation="hadamard", block_size=2048, act_scheme="dynamic-token"),
        _row("hadamard+smooth+dyn", rotation="hadamard", block_size=128, smooth_alpha=0.5, act_scheme="dynamic-token"),
        _row("duquant+dyn", rotation="duquant", block_size=128, act_scheme="dynamic-token"),
        _row("hadamard+dyn-norows+gptq", rotation="hadamard", block_size=128, act_scheme="dynamic-token",
             row_rot_mode="none", weight_method="gptq"),
        _row("hadamard+dyn-norows+g128", rotation="hadamard", block_size=128, act_scheme="dynamic-token",
             row_rot_mode="none", weight_group_size=128),
        _row("hadamard+dyn-norows+g128+gptq", rotation="hadamard", block_size=128, act_scheme="dynamic-token",
             row_rot_mode="none", weight_group_size=128, weight_method="gptq"),
        _row("hadamard+dyn+gptq", rotation="hadamard", block_size=128, act_scheme="dynamic-token", weight_method="gptq"),
        _row("none+dyn+gptq", rotation="none", enable_permute=False, act_scheme="dynamic-token", weight_method="gptq"),
        _row("spec+dyn+gptq", act_scheme="dynamic-token", weight_method="gptq"),
        _row("duquant+dyn+gptq", rotation="duquant", block_size=128, act_scheme="dynamic-token", weight_method="gptq"),
        _row("duquant+smooth+dyn+gptq", rotation="duquant", block_size=128, smooth_alpha=0.5, act_scheme="dynamic-token",
             weight_method="gptq"),
        _row("hadamard+smooth+dyn-norows+gptq", rotation="hadamard", block_size=128, smooth_alpha=0.5,
             act_scheme="dynamic-token", row_rot_mode="none", weight_method="gptq"),
        _row("hadamard+dyn-norows+g128+gptq-ao", rotation="hadamard", block_size=128, act_scheme="dynamic-token",
             row_rot_mode="none", weight_group_size=128, weight_method="gptq", gptq_act_order=True),
        _row("hadamard+dyn-norows+gptq-ao", rotation="hadamard", block_size=128, act_scheme="dynamic-token",
             row_rot_mode="none", weight_method="gptq", gptq_act_order=True),
        _row("hadamard+dyn-norows+g128+gptq-clip0.9", rotation="hadamard", block_size=128, act_scheme="dynamic-token",
             row_rot_mode="none", weight_group_size=128, weight_method="gptq", act_clip=0.9),
        _row("hadamard2048+dyn-norows+g128+gptq", rotation="hadamard", block_size=2048, act_scheme="dynamic-token",
             row_rot_mode="none", weight_group_size=128, weight_method="gptq"),
        _row("hadamard+smooth+dyn-norows+g128+gptq", rotation="hadamard", block_size=128, smooth_alpha=0.5,
             act_scheme="dynamic-token", row_rot_mode="none", weight_group_size=128, weight_method="gptq"),
        _row("hadamard+dyn-norows+g128+gptq-ao-clip0.8", rotation="hadamard", block_size=128, act_scheme="dynamic-token",
             row_rot_mode="none", weight_group_size=128, weight_method="gptq", gptq_act_order=True, act_clip=0.8),
        _row("hadamard+smooth+dyn-norows+g128+gptq-ao-clip0.9", rotation="hadamard", block_size=128, smooth_alpha=0.5,
             act_scheme="dynamic-token", row_rot_mode="none", weight_group_size=128, weight_method="gptq",
             gptq_act_order=True, act_clip=0.9),
        _row("hadamard2048+dyn-norows+g128+gptq-ao", rotation="hadamard", block_size=2048, act_scheme="dynamic-token",
             row_rot_mode="none", weight_group_size=128, weight_method="gptq", gptq_act_order=True),
        _row("hadamard2048+smooth+dyn-norows+g128+gptq-ao-clip0.9", rotation="hadamard", block_size=2048, smooth_alpha=0.5,
             act_scheme="dynamic-token", row_rot_mode="none", weight_group_size=128, weight_method="gptq",
             gptq_act_order=True, act_clip=0.9),
        _row("hadamard+smooth+dyn-norows+g128", rotation="hadamard", block_size=128, smooth_alpha=0.5,
             act_scheme="dynamic-token", row_rot_mode="none", weight_group_size=128),
        _row("duquant+dyn-norows", rotation="duquant", block_size=128, act_scheme="dynamic-token", row_rot_mode="none"),
        _row("duquant+dyn-norows+gptq", rotation="duquant", block_size=128, act_scheme="dynamic-token",
             row_rot_mode="none", weight_method="gptq"),
        Row("presets", "preset"),
        Row("presets+shared-inputs", "preset", shared_inputs=True),
        Row("presets-sequential", "preset", sequential=True),
        Row("presets+clip-search", "preset", clip_search=True),
        Row("presets-sequential+clip-search", "preset", sequential=True, clip_search=True),
        # W4A4 candidates (issue 16), each the w4a4 preset but for one change; chosen on the development split.
        _from_preset("w4a4-smooth0.6", "w4a4", smooth_alpha=0.6),
        _from_preset("w4a4-smooth0.7", "w4a4", smooth_alpha=0.7),
        _from_preset("w4a4-smooth0.4", "w4a4", smooth_alpha=0.4),
        _from_preset("w4a4-clip0.85", "w4a4", act_clip=0.85),
        _from_preset("w4a4-clip0.95", "w4a4", act_clip=0.95),
        _from_preset("w4a4-duquant", "w4a4", rotation="duquant"),
        _from_preset("w4a4-h512", "w4a4", block_size=512),
        _from_preset("w4a4-damp0.05", "w4a4", gptq_damp=0.05),
        # W4A16 and W4A8 candidates (issue 16): smoothing in W4A16 (as AWQ scales salient input channels up
        # in the weights), activation order in W4A8; chosen on the development split.
        _from_preset("w4a16-smooth0.5", "w4a16", smooth_alpha=0.5),
        _from_preset("w4a16-smooth0.5-noao", "w4a16", smooth_alpha=0.5, gptq_act_order=False),
        _from_preset("w4a16-smooth0.3", "w4a16", smooth_alpha=0.3),
        # The finer weight-scale grid (scale_method="mse-fine") in each 4-bit preset.
        _from_preset("w4a16-msefine", "w4a16", scale_method="mse-fine"),
        _from_preset("w4a16-smooth0.5-msefine", "w4a16", smooth_alpha=0.5, scale_method="mse-fine"),
        _from_preset("w4a8-msefine", "w4a8", scale_method="mse-fine"),
        _from_preset("w4a4-msefine", "w4a4", scale_method="mse-fine"),
        dataclasses.replace(_from_preset("w4a4-msefine+clip-search", "w4a4", scale_method="mse-fine"), clip_search=True),
        dataclasses.replace(_from_preset("w4a8-msefine+clip-search", "w4a8", scale_method="mse-fine"), clip_search=True),
        dataclasses.replace(_from_preset("w4a16-msefine-sequential", "w4a16", scale_method="mse-fine"), sequential=True),
        dataclasses.replace(_from_preset("w4a8-msefine-sequential", "w4a8", scale_method="mse-fine"), sequential=True),
        # No clipping at all (the absmax scale): the opposite of "mse-fine".
        _from_preset("w4a16-minmax", "w4a16", scale_method="minmax"),
        _from_preset("w4a8-minmax", "w4a8", scale_method="minmax"),
        # W4A4 with one activation scale per token and group of 128 channels of x2 (the Hadamard blocks).
        _from_preset("w4a4-actgroup128", "w4a4", act_scheme="dynamic-group", act_group_size=128),
        _from_preset("w4a4-actgroup128-clip1.0", "w4a4", act_scheme="dynamic-group", act_group_size=128, act_clip=1.0),
        _from_preset("w4a4-actgroup64", "w4a4", act_scheme="dynamic-group", act_group_size=64),
        dataclasses.replace(_from_preset("w4a4-actgroup128+clip-search", "w4a4", act_scheme="dynamic-group",
                                         act_group_size=128), clip_search=True),
        # W4A8 with GPTQ in activation order (as the other 4-bit presets), and with 8-bit activation groups.
        _from_preset("w4a8-actorder", "w4a8", gptq_act_order=True),
        _from_preset("w4a8-actgroup128", "w4a8", act_scheme="dynamic-group", act_group_size=128),
        # Weight group sizes other than the preset's (each group's float16 scale: 16 bits per group).
        _from_preset("w4a16-g64", "w4a16", weight_group_size=64),
        _from_preset("w4a8-g64", "w4a8", weight_group_size=64),
        _from_preset("w4a4-g64", "w4a4", weight_group_size=64),
        _from_preset("w4a8-g64-actorder", "w4a8", weight_group_size=64, gptq_act_order=True),
        _from_preset("w4a8-g32", "w4a8", weight_group_size=32),
        _from_preset("w4a8-g128", "w4a8", weight_group_size=128),  # the w4a8 preset before groups of 32
        _from_preset("w4a16-g32", "w4a16", weight_group_size=32),
        # Another draw of the presets' random Hadamard signs: how far the rounding realization alone moves a cell.
        _from_preset("w4a8-seed1", "w4a8", seed=1),
        dataclasses.replace(_from_preset("w4a8-seed1+shared-inputs", "w4a8", seed=1), shared_inputs=True),
        # Sensitivity (issue 16: where the 4-bit presets' distance to float comes from): the column's preset on one
        # kind of projection only, every other layer float. Run with --bits W4A16 or W4A8 (the preset's column).
        *(Row(f"presets-only-{kind}", "preset", only=rf"\.{kind}_proj$")
          for kind in ("q", "k", "v", "o", "gate", "up", "down")),
        # w4a16 with w4a8's recipe (smoothing 0.5, groups of 32, GPTQ in column order).
        _from_preset("w4a16-smooth0.5-noao-g32", "w4a16", smooth_alpha=0.5, gptq_act_order=False, weight_group_size=32),
        # k_proj costs w4a16 five times what it costs w4a8 (whose preset smooths and uses groups of 32): which of the
        # two makes the difference, on k_proj alone (--bits W4A16).
        dataclasses.replace(_from_preset("w4a16-only-k-g32", "w4a16", weight_group_size=32), only=r"\.k_proj$"),
        dataclasses.replace(_from_preset("w4a16-only-k-smooth0.5", "w4a16", smooth_alpha=0.5), only=r"\.k_proj$"),
        dataclasses.replace(_from_preset("w4a16-only-k-g32-smooth0.5", "w4a16", weight_group_size=32, smooth_alpha=0.5),
                            only=r"\.k_proj$"),
        # GPTQ fitting each group's scale when the rounding reaches the group (gptq_static_groups=False, the GPTQ
        # reference code's default) instead of to the weight before rounding; with SPEC's five candidate scales
        # or the 16 of "mse-fine". In column order (act_order needs static groups).
        _from_preset("w4a8-fitgroups", "w4a8", gptq_static_groups=False),
        _from_preset("w4a8-fitgroups-fine", "w4a8", gptq_static_groups=False, scale_method="mse-fine"),
        _from_preset("w4a16-fitgroups", "w4a16", gptq_static_groups=False, gptq_act_order=False),
        _from_preset("w4a16-fitgroups-fine", "w4a16", gptq_static_groups=False, gptq_act_order=False, scale_method="mse-fine"),
        _from_preset("w4a16-fitgroups-fine-g32", "w4a16", gptq_static_groups=False, gptq_act_order=False,
                     scale_method="mse-fine", weight_group_size=32),
        # One Hadamard block over down_proj's whole 2048-wide input (the 640-wide inputs keep blocks of 128: the largest
        # power of two dividing 640); down_proj carries the largest share of the 4-bit presets' excess.
        _from_preset("w4a8-b2048", "w4a8", block_size=2048),
        _from_preset("w4a16-b2048", "w4a16", block_size=2048),
        # Each column's preset, then every weight scale trained on the whole model's output (`interop.tune_scales`:
        # KL divergence from the float model's logits on the calibration chunks; the codes fixed).
        Row("presets+tune", "preset", tune=(("epochs", 2), ("lr", 0.001))),
        Row("presets+tune-e4-lr2e-3", "preset", tune=(("epochs", 4), ("lr", 0.002))),
    ]
}

LISTS: dict[str, list[str]] = {
    "baselines": ["float", "rtn", "spec"],
    "rotations": ["none", "svd-b128", "hadamard", "duquant"],
    "smoothing": ["none+smooth", "hadamard+smooth", "duquant+smooth"],
    "act-schemes": ["hadamard+dyn", "hadamard+tensor", "duquant+smooth+dyn"],
    "groups": ["hadamard+g128", "hadamard+dyn+g128", "duquant+smooth+dyn+g128"],
    "gptq": ["hadamard+gptq", "hadamard+dyn+g128+gptq"],
    "presets": ["presets"],
    "stage1": ["float", "rtn", "spec", "none", "none+dyn", "spec+dyn", "hadamard", "hadamard+dyn", "hadamard+dyn-norows",
               "hadamard2048+dyn", "hadamard+smooth", "hadamard+smooth+dyn", "duquant", "duquant+dyn", "duquant+smooth",
               "duquant+smooth+dyn", "hadamard+g128", "hadamard+dyn+g128"],
    "stage2": ["hadamard+dyn-norows+gptq", "hadamard+dyn-norows+g128+gptq", "none+dyn+gptq", "spec+dyn+gptq",
               "hadamard+dyn-norows+g128", "duquant+dyn+gptq", "hadamard+dyn+gptq", "hadamard+smooth+dyn-norows+gptq",
               "duquant+smooth+dyn+gptq"],
}
WHOLE = [n for n, r in ROWS.items() if not r.only]  # rows that quantize every layer (candidate lists draw on these)
LISTS["input-groups"] = ["presets", "presets+shared-inputs"]
LISTS["realizations"] = ["w4a8-seed1", "w4a8-seed1+shared-inputs"]  # with --bits W4A8
LISTS["w4a4-candidates"] = ["presets"] + [n for n in WHOLE if n.startswith("w4a4-")] + [
    "presets-sequential", "presets+clip-search", "presets-sequential+clip-search"]
LISTS["w4-candidates"] = ["presets"] + [n for n in WHOLE if n.startswith("w4a16-")]  # with --bits W4A16
LISTS["msefine"] = ["presets", "presets+clip-search"] + [n for n in WHOLE if "msefine" in n]  # each row in its own column
LISTS["w4a8-candidates"] = ["presets"] + [n for n in WHOLE if n.startswith("w4a8-")]  # with --bits W4A8
LISTS["g64"] = ["presets"] + [n for n in WHOLE if n.endswith("-g64")]
LISTS["groups-small"] = ["presets"] + [n for n in WHOLE if n.endswith(("-g64", "-g32"))]  # each row in its own column
LISTS["fit-groups"] = ["presets"] + [n for n in WHOLE if "-fitgroups" in n]  # each row in its own column
LISTS["sensitivity"] = [n for n in ROWS if n.startswith("presets-only-")]  # Gemma's projections; with --bits
LISTS["sensitivity-k"] = ["presets-only-k"] + [n for n in ROWS if n.startswith("w4a16-only-k-")]  # with --bits W4A16
LISTS["tune"] = [n for n in ROWS if n.startswith("presets+tune")]
LISTS["all"] = list(dict.fromkeys(name for names in LISTS.values() for name in names))


def select(spec: str) -> list[Row]:
    """Rows named by a comma-separated list of list names (`LISTS`) and row names (`ROWS`), in order, once each."""
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in LISTS:
            names += LISTS[item]
        elif item in ROWS:
            names.append(item)
        else:
            raise SystemExit(f"--configs: unknown row or list {item!r}; lists: {sorted(LISTS)}; rows: {sorted(ROWS)}")
    return [ROWS[n] for n in dict.fromkeys(names)]
