"""The front door: ``gpuloss train | time | bench | kernels | info``.

Each sub-command lives beside the code it drives and registers itself here
through a ``register(subparsers)`` function, so this file stays a table of
contents.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, description) of every sub-command module; each exposes register(subparsers).
_COMMAND_MODULES = (
    "gpuloss.graph.commands",   # train, time
    "gpuloss.benchmark",        # bench
    "gpuloss.kernel_table",     # kernels
    "gpuloss.info",             # info
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuloss", description=__doc__.splitlines()[0])
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
