"""``gpuloss kernels``: registers, shared memory, stack and spills of every entry point.

Each ``kernels/*.cu`` file is compiled offline with NVRTC (no GPU needed) for
each target, and its rows are printed as soon as it is compiled, with a
progress bar on stderr (a full table takes tens of seconds).

    $ gpuloss kernels --arch sm_90 --arch sm_80,sm_70
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence, TextIO

from gpuloss import nvrtc
from gpuloss._paths import kernel_sources

_COLUMNS = (
    # header, attribute, right-aligned
    ("kernel", "kernel", False),
    ("arch", "arch", False),
    ("regs", "registers", True),
    ("shared B", "shared_bytes", True),
    ("stack B", "stack_bytes", True),
    ("spill st B", "spill_stores", True),
    ("spill ld B", "spill_loads", True),
)


_ARCH = re.compile(r"sm_\d+[a-z]?")

# Fixed widths, so that rows can be printed before every kernel name is known.
_STREAM_WIDTHS = (30, 6, 4, 8, 7, 10, 10)


def _arch_arg(value: str) -> str:
    """``--arch``: ``sm_90``, ``90`` or a comma list of them (a real architecture: a cubin target)."""
    archs = _archs([value])
    if not archs:
        raise argparse.ArgumentTypeError(f"no architecture in {value!r}")
    for arch in archs:
        if not _ARCH.fullmatch(arch):
            raise argparse.ArgumentTypeError(f"{arch!r} is not a real architecture like sm_90 (or 90)")
    return value


def _archs(values: Sequence[str] | None) -> list[str]:
    """``--arch`` may repeat and each value may be a comma list; order kept, duplicates dropped."""
    out: list[str] = []
    for value in values or ["sm_90"]:
        for arch in value.split(","):
            arch = arch.strip()
            if not arch:
                continue
            if arch.isdigit():  # "90" -> "sm_90"
                arch = f"sm_{arch}"
            if arch not in out:
                out.append(arch)
    return out


def format_table(rows: Sequence[nvrtc.KernelResources]) -> str:
    """Fixed-width plain-text table, one line per (kernel, arch)."""
    cells = [[h for h, _, _ in _COLUMNS]] + [[str(getattr(r, attr)) for _, attr, _ in _COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if right else c.ljust(w) for c, w, (_, _, right) in zip(row, widths, _COLUMNS)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    parts = [c.rjust(w) if right else c.ljust(w) for c, w, (_, _, right) in zip(cells, widths, _COLUMNS)]
    return "  ".join(parts).rstrip()


def run(archs: Sequence[str], sources: Sequence[Path] | None = None, options: Sequence[str] = (),
        show_log: bool = False, out: TextIO | None = None, err: TextIO | None = None,
        progress: bool | None = None) -> int:
    """Compile every source for every arch, printing each file's rows as soon as it is compiled;
    1 if any compile failed. ``progress`` (default: when stderr is a terminal) shows a bar."""
    from tqdm import tqdm

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        major, minor = nvrtc.version()
    except nvrtc.NvrtcError as exc:
        print(exc, file=err)
        return 1
    paths = list(kernel_sources() if sources is None else sources)
    if not paths:
        print("gpuloss kernels: no kernels/*.cu found", file=err)
        return 1
    print(f"NVRTC {major}.{minor} ({nvrtc.library_path()})", file=out)
    widths = _STREAM_WIDTHS
    print(_row([h for h, _, _ in _COLUMNS], widths), file=out)
    print("  ".join("-" * w for w in widths), file=out, flush=True)
    units = [(arch, path) for arch in archs for path in paths]
    if progress is None:
        progress = bool(getattr(err, "isatty", lambda: False)())
    bar = tqdm(total=len(units), desc="compiling", unit="file", file=err, disable=not progress, leave=False)
    rows: list[nvrtc.KernelResources] = []
    failures = 0
    for arch, path in units:
        bar.set_postfix_str(f"{Path(path).name} {arch}, {len(rows)} entry points so far", refresh=True)
        try:
            result = nvrtc.compile_file(path, arch, (*options, "-Xptxas=-v"))
            new = nvrtc.resources_from_result(result)
        except (nvrtc.NvrtcError, OSError, ValueError) as exc:
            failures += 1
            bar.clear()
            print(f"gpuloss kernels: {Path(path).name} ({arch}) failed:\n{exc}", file=err)
            bar.update(1)
            continue
        rows.extend(new)
        bar.clear()
        for r in new:   # streamed: each file's entry points as soon as it is compiled
            print(_row([str(getattr(r, attr)) for _, attr, _ in _COLUMNS], widths), file=out, flush=True)
        if show_log:
            print(result.log, file=err)
        bar.update(1)
    bar.close()
    spilled = [r for r in rows if r.spill_stores or r.spill_loads]
    print(f"{len(rows)} entry points, {len(spilled)} with spills, {failures} failed compiles", file=out)
    return 1 if failures else 0


def _main(args: argparse.Namespace) -> int:
    sources = [Path(s) for s in args.source] if args.source else None
    try:
        return run(_archs(args.arch), sources, tuple(args.option or ()), show_log=args.log,
                   progress=False if args.no_progress else None)
    except KeyboardInterrupt:
        print("gpuloss kernels: interrupted", file=sys.stderr)
        return 130


def register(subparsers) -> None:
    from gpuloss.cli import existing_file

    p = subparsers.add_parser(
        "kernels",
        help="registers, shared memory and spills of each kernel (NVRTC, no GPU needed)",
        description="Registers, shared memory, stack and spills of every entry point in kernels/*.cu, "
                    "compiled offline with NVRTC for each --arch (no GPU needed). Rows are printed as each "
                    "file is compiled; a bar on stderr shows the progress. Exit status 1 if a file fails "
                    "to compile.",
    )
    p.add_argument("--arch", action="append", metavar="SM", type=_arch_arg,
                   help="target, e.g. sm_90 or 90; repeat or give a comma list (default sm_90)")
    p.add_argument("--source", action="append", metavar="FILE.cu", type=existing_file("source"),
                   help="compile these files instead of every kernels/*.cu")
    p.add_argument("--option", action="append", metavar="OPT",
                   help="extra NVRTC option, e.g. --option=-maxrregcount=64 (repeatable)")
    p.add_argument("--log", action="store_true", help="also print ptxas's full report to stderr")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)
