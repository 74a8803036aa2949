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
import signal
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


@contextlib.contextmanager
def _signals_held():
    """Block SIGINT and SIGTERM for this thread inside the block (delivered right after it)."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):   # no pthread_sigmask on this platform
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
    # Ctrl-C / SIGTERM (raised as exceptions by the training loop) are held back while the temporary
    # file is created and its name kept, and may only arrive inside the try below, which removes it.
    fd = tmp = None
    try:
        with _signals_held():
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix or f".{os.path.basename(path)}.",
                                       suffix=suffix)
        with os.fdopen(fd, "wb") as fh:
            fd = None   # the file object owns it now
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    fsync_dir(directory)
