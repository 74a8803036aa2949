"""Whole-or-nothing file writes, shared by the layer graph's snapshots and the emulator's build cache.

A file is written to a temporary name in its own folder, flushed and fsynced,
then renamed over the target with ``os.replace`` (atomic on POSIX within one
file system), and the folder is fsynced so the rename itself survives a crash.
A reader, or a process that was killed, sees the old file or the whole new
one, never a truncated one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, IO


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (best effort: some platforms cannot open a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()   # what open() would give; mkstemp makes 0600


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], object], *,
                     prefix: str | None = None, suffix: str = ".tmp") -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it, rename it over ``path``,
    fsync the folder. The temporary file (``prefix`` default ``.<name>.``, then ``suffix``) is
    removed on any exception, KeyboardInterrupt included; a SIGKILL can leave it behind, never a
    damaged ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix or f".{os.path.basename(path)}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
