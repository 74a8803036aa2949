"""``gpuloss kernels``: registers, shared memory, stack and spills of every
entry point in ``kernels/*.cu``, compiled offline with NVRTC (no GPU needed).

    $ gpuloss kernels --arch sm_90 --arch sm_80,sm_70
"""
from __future__ import annotations

import argparse
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


def run(archs: Sequence[str], sources: Sequence[Path] | None = None, options: Sequence[str] = (),
        show_log: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Compile every source for every arch and print the table; 1 if any compile failed."""
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
    rows: list[nvrtc.KernelResources] = []
    failures = 0
    for arch in archs:
        for path in paths:
            try:
                result = nvrtc.compile_file(path, arch, (*options, "-Xptxas=-v"))
                rows.extend(nvrtc.resources_from_result(result))
            except nvrtc.NvrtcError as exc:
                failures += 1
                print(f"gpuloss kernels: {Path(path).name} ({arch}) failed:\n{exc}", file=err)
                continue
            if show_log:
                print(result.log, file=err)
    print(f"NVRTC {major}.{minor} ({nvrtc.library_path()})", file=out)
    print(format_table(rows), file=out)
    spilled = [r for r in rows if r.spill_stores or r.spill_loads]
    print(f"{len(rows)} entry points, {len(spilled)} with spills, {failures} failed compiles", file=out)
    return 1 if failures else 0


def _main(args: argparse.Namespace) -> int:
    sources = [Path(s) for s in args.source] if args.source else None
    return run(_archs(args.arch), sources, tuple(args.option or ()), show_log=args.log)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "kernels",
        help="registers, shared memory and spills of each kernel (NVRTC, no GPU needed)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--arch", action="append", metavar="SM",
                   help="target, e.g. sm_90; repeat or give a comma list (default sm_90)")
    p.add_argument("--source", action="append", metavar="FILE.cu",
                   help="compile these files instead of every kernels/*.cu")
    p.add_argument("--option", action="append", metavar="OPT",
                   help="extra NVRTC option, e.g. --option=-maxrregcount=64 (repeatable)")
    p.add_argument("--log", action="store_true", help="also print ptxas's full report to stderr")
    p.set_defaults(func=_main)
