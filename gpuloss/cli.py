"""The ``gpuloss`` command: train and time Caffe-style nets, benchmark and inspect the loss kernels.

Each sub-command lives beside the code it drives and registers itself here
through a ``register(subparsers)`` function, so this file stays a table of
contents; it also holds the argument types the sub-commands share. A bad
argument is reported in one line on stderr with exit status 2, never a
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import zipfile
from pathlib import Path

__all__ = ["main", "build_parser", "positive_int", "non_negative_int", "backend_arg", "existing_file",
           "npz_file"]

# Every sub-command module; each exposes register(subparsers).
_COMMAND_MODULES = (
    "gpuloss.graph.commands",   # train, time
    "gpuloss.benchmark",        # bench
    "gpuloss.kernel_table",     # kernels
    "gpuloss.info",             # info
)

_DESCRIPTION = "gpuloss: fused CUDA/Numba training losses and a small Caffe-style layer graph."
_EPILOG = """`gpuloss COMMAND --help` describes each command's options."""


class _Parser(argparse.ArgumentParser):
    """argparse with errors in one line (``prog: error: message``) and exit status 2."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types shared by the sub-commands ---------------------------------------------------

def _int(value: str) -> int:
    try:
        return int(value, 10)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def positive_int(value: str) -> int:
    n = _int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def non_negative_int(value: str) -> int:
    n = _int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


BACKEND_CHOICES = ("auto", "cpu", "cuda", "emulated")


def backend_arg(value: str) -> str:
    """A backend name that can run here: ``cuda`` needs CuPy and a device, ``emulated`` a C++ compiler."""
    name = value.strip().lower()
    if name not in BACKEND_CHOICES:
        raise argparse.ArgumentTypeError(f"unknown backend {value!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    from gpuloss.backends import cuda_unavailable_reason, default_backend_name
    if name == "auto":
        try:
            resolved = default_backend_name()   # GPULOSS_BACKEND may name a bad or missing backend
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if resolved != "cpu":
            backend_arg(resolved)
        return name
    if name == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise argparse.ArgumentTypeError(f"backend 'cuda' is unavailable: {reason}")
    if name == "emulated":
        cxx = os.environ.get("GPULOSS_CXX", "g++")
        if shutil.which(cxx) is None:
            raise argparse.ArgumentTypeError(f"backend 'emulated' is unavailable: the C++ compiler {cxx!r} "
                                             f"is not on PATH")
    return name


def existing_file(what: str):
    """An argument type: a path to an existing file (a command-line argument is always a path)."""
    def check(value: str) -> Path:
        path = Path(value)
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{what} {value!r}: no such file")
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{what} {value!r}: not a file")
        return path
    check.__name__ = what.replace(" ", "_")
    return check


def npz_file(what: str):
    """An argument type: an existing ``.npz`` archive (checked by its content, not its name)."""
    exists = existing_file(what)

    def check(value: str) -> Path:
        path = exists(value)
        try:
            ok = zipfile.is_zipfile(path)
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{what} {value!r}: cannot read it ({exc.strerror})") from None
        if not ok:
            raise argparse.ArgumentTypeError(f"{what} {value!r}: not an .npz archive (numpy.savez writes one)")
        return path
    check.__name__ = what.replace(" ", "_")
    return check


# -- the parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from gpuloss import __version__

    parser = _Parser(prog="gpuloss", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gpuloss {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    args.argv = argv   # what was run, for commands that record it (bench)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
