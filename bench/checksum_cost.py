"""What the pack files' checksums cost: hash candidates, and loading a Gemma-2B-shaped pack directory.

    python bench/checksum_cost.py [--blocks 2] [--no-write]

1. Throughput of the candidate hashes of the standard library on one 256 MiB
   buffer (one core): why `duquant_jax.integrity` uses CRC-32.
2. `duquant pack` of a generated Gemma-2B-shaped bf16 checkpoint of `--blocks`
   transformer blocks (7 linears each, bench/checkpoint_pack.py), then, on the
   pack directory it wrote: loading every layer with `iter_pack_dir` with and
   without checksum verification, the framework-free `integrity.verify_file`
   over every file, and the checksums' share of `save_packs`. Files are read
   from the page cache (just written), the case where hashing weighs most.
   Per-block figures are scaled by 18 / blocks to the whole Gemma-2B (18 blocks
   of identical shapes), and the table says so. Writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_pack import write_checkpoint  # noqa: E402
from common import GEMMA_2B_BLOCKS, best_time, table, write_section  # noqa: E402

from duquant_jax import integrity  # noqa: E402
from duquant_jax.checkpoint import iter_pack_dir, pack_checkpoint, pack_dir_files  # noqa: E402
from duquant_jax.io import load_packs, save_packs  # noqa: E402

CANDIDATES = {
    "zlib.crc32": lambda b: zlib.crc32(b),
    "zlib.adler32": lambda b: zlib.adler32(b),
    "hashlib.blake2b": lambda b: hashlib.blake2b(b, digest_size=16).digest(),
    "hashlib.sha1": lambda b: hashlib.sha1(b).digest(),
    "hashlib.sha256": lambda b: hashlib.sha256(b).digest(),
}


def hash_rates() -> list[list[str]]:
    buf = np.random.default_rng(0).integers(0, 256, 256 * 2**20, dtype=np.uint8)
    rows = []
    for name, fn in CANDIDATES.items():
        fn(buf)
        t = best_time(lambda: fn(buf), repeats=3)
        rows.append([name, f"{buf.nbytes / t / 1e9:.2f}"])
    return rows


def load_all(out: Path, verify: bool) -> None:
    for _, pack in iter_pack_dir(out, verify=verify):
        pack.w_codes.block_until_ready()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rates = hash_rates()
    print(table(["hash", "GB/s"], rates))
    scale = GEMMA_2B_BLOCKS / args.blocks
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "packs"
        ckpt.mkdir()
        write_checkpoint(ckpt, args.blocks)
        pack_checkpoint(ckpt, out, progress=False)
        files = pack_dir_files(out)
        size = sum(f.stat().st_size for f in files.values())
        load_all(out, True)  # warm: page cache, JAX
        t_on = best_time(lambda: load_all(out, True), repeats=3)
        t_off = best_time(lambda: load_all(out, False), repeats=3)
        t_file = best_time(lambda: [integrity.verify_file(f) for f in files.values()], repeats=3)
        packs = {n: load_packs(f, [n], verify=False)[n] for n, f in list(files.items())[:7]}  # one block
        one = Path(tmp) / "one"

        def save_block() -> None:
            for n, p in packs.items():
                save_packs(one / f"{n}.safetensors", {n: p})

        save_block()
        t_save = best_time(save_block, repeats=3)
        arrays = [np.asarray(a) for p in packs.values() for a in p.arrays().values()]
        t_digest = best_time(lambda: [integrity.array_digest(a) for a in arrays], repeats=3)
    layers = 7 * args.blocks
    body = (
        f"`python bench/checksum_cost.py --blocks {args.blocks}`. Hash candidates of the standard library, "
        "one 256 MiB buffer, one core:\n\n"
        + table(["hash", "GB/s"], rates)
        + "\n\nCRC-32 is the fastest, catches every single-bit flip and every burst of up to 32 bits, and a "
        "stronger hash buys nothing for a checksum stored in the same file (whoever rewrites the data rewrites "
        "it too). Cost on a pack directory of "
        f"{args.blocks} Gemma-2B-shaped blocks ({layers} layers, default W4A8, {size / 2**20:.0f} MiB; files in the "
        f"page cache, best case for the read and so worst case for the checksums' share); the last column scales "
        f"by 18 / {args.blocks} to the whole Gemma-2B (18 identical blocks):\n\n"
        + table(
            ["what", "measured", "whole Gemma-2B, scaled"],
            [
                ["load every layer, checksums verified (`iter_pack_dir`)", f"{t_on:.2f} s", f"{t_on * scale:.1f} s"],
                ["load every layer, `verify=False`", f"{t_off:.2f} s", f"{t_off * scale:.1f} s"],
                ["checksum share of loading", f"{(t_on - t_off) / t_on:.0%}", ""],
                ["`integrity.verify_file` of every file (no framework)", f"{t_file:.2f} s ({size / t_file / 1e9:.1f} GB/s)", f"{t_file * scale:.1f} s"],
                ["`save_packs` of one block's 7 layers", f"{t_save:.2f} s", f"{t_save * GEMMA_2B_BLOCKS:.1f} s"],
                ["of which the checksums (`array_digest` of every tensor)", f"{t_digest:.3f} s ({t_digest / t_save:.0%})", f"{t_digest * GEMMA_2B_BLOCKS:.1f} s"],
            ],
        )
    )
    print(body)
    if not args.no_write:
        write_section("Checksum cost (bench/checksum_cost.py)", body)


if __name__ == "__main__":
    main()
