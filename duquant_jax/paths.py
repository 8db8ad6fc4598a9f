"""Untrusted names and paths: file names derived from tensor names, paths read from indexes.

Tensor names come from checkpoints made by other people, and index files
(a checkpoint's `weight_map`, a pack directory's `index.json`) name files
by relative paths. Neither may reach the filesystem unchecked:

- `safe_file_name(name)` turns a tensor name into one readable path component
  that can never be a separator, `.`/`..`, empty, absolute, hidden or a
  reserved device name, and never collides with another name's, not even on a
  case-insensitive filesystem.
- `contained(root, entry)` resolves a relative path from an index (symlinks
  included) and refuses anything that ends up outside `root`.

Pure Python: no JAX, no NumPy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Kept as they are; every other byte of the UTF-8 name becomes %XX (uppercase hex).
# Uppercase letters are escaped too, so that two names differing only in case
# stay two files on case-insensitive filesystems (macOS, Windows).
_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789._-")
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}
MAX_STEM = 160  # bytes of the encoded name before a hash replaces the rest (file systems allow 255)


class UnsafePathError(ValueError):
    """A name or path from a file that would reach outside its directory, or cannot be a file name."""


def safe_file_name(name: str, suffix: str = "") -> str:
    """A file name for tensor `name`: readable, injective, one path component.

    Lowercase letters, digits, `.`, `_` and `-` are kept; every other byte of
    the UTF-8 name (uppercase, `/`, `\\`, `%`, spaces, ...) becomes `%XX`, a
    leading `.` becomes `%2E` (no hidden files, never `.` or `..`), and a stem
    that is a reserved device name (`nul`, `con.weight`, ...) gets its first
    letter escaped. An encoded name longer than MAX_STEM bytes keeps its first
    part and ends with `~` and 32 hex digits of the full name's SHA-256 (`~`
    never appears otherwise, so shortened names cannot collide with others).

    Example: "model.layers.0.self_attn.q_proj.weight" is kept as it is;
    "../../x.weight" becomes "%2E.%2F..%2Fx.weight".

    Raises:
      UnsafePathError: `name` is empty or not a string.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"tensor name {name!r} cannot name a file: it is empty or not a string")
    raw = name.encode("utf-8", "surrogatepass")
    out = "".join(chr(c) if c in _SAFE else f"%{c:02X}" for c in raw)
    if out.startswith("."):
        out = "%2E" + out[1:]
    if out.split(".", 1)[0] in _RESERVED:
        out = f"%{ord(out[0]):02X}" + out[1:]
    if len(out) > MAX_STEM:
        head = out[: MAX_STEM - 33]
        cut = head.rfind("%", len(head) - 2)  # never keep half of a %XX escape
        out = (head if cut < 0 else head[:cut]) + "~" + hashlib.sha256(raw).hexdigest()[:32]
    return out + suffix


def contained(root: str | os.PathLike, entry: object, *, what: str, source: str | os.PathLike, extra_roots: tuple[Path, ...] = ()) -> Path:
    """The file that `entry` (a relative path read from `source`) names under `root`, resolved.

    Args:
      root: the directory every entry must stay inside.
      entry: the path as read from the index file (any type: it is checked).
      what: what the entry is, for the error ("layer 'q_proj'", "tensor 'x' shard").
      source: the index file it was read from, for the error.
      extra_roots: other directories a resolved path may land in (a Hugging Face
        cache snapshot's `blobs/`, where its symlinks point).

    Returns:
      The resolved path (symlinks followed), inside `root` or an extra root.

    Raises:
      UnsafePathError: `entry` is not a non-empty string, is absolute, holds a NUL, or
        resolves (through `..` or symlinks) outside `root`. The message names
        `what`, the entry and `source`.
    """
    def refuse(why: str) -> UnsafePathError:
        return UnsafePathError(f"{source}: {what} names file {entry!r}, which {why}; refusing to read it")

    if not isinstance(entry, str) or not entry:
        raise refuse("is not a non-empty relative path")
    if "\x00" in entry:
        raise refuse("holds a NUL byte")
    if os.path.isabs(entry) or Path(entry).anchor or entry.startswith(("/", "\\")):
        raise refuse("is an absolute path")
    base = Path(root).resolve()
    target = (base / entry).resolve()
    for allowed in (base, *(r.resolve() for r in extra_roots)):
        if target == allowed or allowed in target.parents:
            if target == base:
                raise refuse("is the directory itself")
            return target
    raise refuse(f"resolves to {target}, outside {base}")


def hf_blobs_root(directory: str | os.PathLike) -> tuple[Path, ...]:
    """`(…/models--org--name/blobs,)` when `directory` is a Hugging Face cache snapshot, else `()`.

    A snapshot `…/models--org--name/snapshots/<revision>/` holds symlinks into
    the repository's `blobs/`; reading through them is reading the checkpoint.
    """
    d = Path(directory).absolute()
    repo = d.parent.parent
    if d.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--")) and (repo / "blobs").is_dir():
        return (repo / "blobs",)
    return ()
