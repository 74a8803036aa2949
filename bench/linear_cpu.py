"""Fused linear + cross entropy on the CPU: gpuloss against torch's F.linear_cross_entropy.

    python bench/linear_cpu.py OUT_DIR [--quick] [--repeats R] [--chunk-mib M ...]

Times (median of R runs) and peak extra memory (tracemalloc for gpuloss; peak RSS of
a fresh process for gpuloss, torch naive and torch chunked) for [N=4096, H=1024,
V=32000] and [N=2048, H=1024, V=128256], float32, loss + gradients of input and
weight.  Writes OUT_DIR/<date>-linear-cpu-<machine>.json and .md (machine, date,
command, versions and the table).  Several --chunk-mib values give one row each.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from gpuloss.bench_linear import markdown_rows, run_linear_cases  # noqa: E402
from gpuloss.benchmark import machine_name  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the JSON and Markdown results")
    p.add_argument("--quick", action="store_true", help="one small shape, one run each")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (median; default 3)")
    p.add_argument("--chunk-mib", type=int, nargs="*", default=[None],
                   help="gpuloss chunk_bytes in MiB (default: gpuloss's default)")
    args = p.parse_args(argv)
    import numba
    import torch

    import gpuloss
    from gpuloss.linear import DEFAULT_CHUNK_BYTES

    t0 = time.time()
    rows = []
    for mib in args.chunk_mib:
        rows += run_linear_cases(quick=args.quick, repeats=args.repeats, chunk_bytes=None if mib is None else mib << 20,
                                 progress=lambda m: print(f"[{time.time() - t0:6.0f} s] {m}", flush=True))
    machine = machine_name()
    report = {
        "machine": machine, "date": dt.date.today().isoformat(),
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "threads": numba.get_num_threads(), "default_chunk_bytes": DEFAULT_CHUNK_BYTES,
        "versions": {"gpuloss": gpuloss.__version__, "numpy": np.__version__, "numba": numba.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
        "wall_s": time.time() - t0,
        "rows": [asdict(r) for r in rows],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in machine.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stem = out / f"{report['date']}-linear-cpu-{slug}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = (f"# linear_cross_entropy, CPU float32\n\nMachine: {machine}; {report['threads']} threads (torch set to the "
          f"same); date {report['date']}; command `{report['command']}`; versions {report['versions']}; "
          f"gpuloss default chunk_bytes {DEFAULT_CHUNK_BYTES >> 20} MiB.\n\n"
          "Times: median ms of loss + gradients of input and weight (no bias). Memory: peak MiB above the "
          "pre-call level, gradients included (both sides allocate them); RSS from a fresh process per method. "
          "torch chunked = `LinearCrossEntropyOptions(batch_chunk_size=<gpuloss's rows per chunk>)`. "
          "Targets of the issue: gpuloss / naive time <= 1.1, gpuloss / chunked time <= 1, peak extra memory "
          "<= 1/8 (0.125) of torch naive's.\n\n"
          + markdown_rows(rows))
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
