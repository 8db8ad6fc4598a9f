"""One writer per output directory: a lock file that holds its owner's pid.

`exclusive(directory)` creates `directory/.duquant.lock`, takes an exclusive
`flock` on it and writes its pid, host and start time into it. A second writer
finds the lock held and is refused with an error that names the owner. The
kernel drops a `flock` when its process dies however it dies, so a lock file
left by a killed run is recognized as stale (its lock is free) and taken over
with a message. Pure Python (POSIX `fcntl`; no JAX).

On a filesystem without `flock` (some network filesystems) the run goes on
unlocked with a note; the pack directory's other protections (atomic files,
the index written last, checksums) still hold.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

LOCK_NAME = ".duquant.lock"


class BusyError(RuntimeError):
    """Another live process holds the lock on the directory."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


def _pid_running(pid: object) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, *, what: str = "duquant pack", echo: Callable[[str], None] = _stderr) -> Iterator[Path]:
    """Holds the lock of `directory` (created if needed) for the body; yields the lock file's path.

    Raises:
      BusyError: another process holds it; the message names its pid and host.
    """
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            info = _owner(fd)
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a filesystem without locks
                echo(f"note: cannot lock {path} ({e.strerror}); make sure no other run writes to {directory}")
                try:
                    yield path
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                return
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise BusyError(
                f"{directory} is being written by another {what} ({_describe(info)}); "
                "wait for it to finish or choose another output directory"
            ) from None
        try:  # the owner we waited on may have removed the file: lock the file the path names now
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        stale = _owner(fd)
        if stale:
            state = "still running, without the lock" if _pid_running(stale.get("pid")) and stale.get("host") == socket.gethostname() else "no longer running"
            echo(f"note: {path} was left by an earlier run ({_describe(stale)}, {state}); taking it over")
        started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started, "what": what}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, mine, 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # closing drops the flock, after the file is gone
