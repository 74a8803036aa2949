"""``gpuloss bench``: time every loss on a backend against PyTorch and the memory floor.

Medians of repeated runs after a warm-up (``time.perf_counter`` on the CPU),
GB/s of the bytes a fused kernel must move, the ratio against PyTorch measured
in the same run with the same thread count, and the *floor*: the time to read
the input twice and write the gradient once with a parallel streaming kernel
(what a perfect fused cross entropy costs in memory traffic).  Results go to
``--save DIR`` (default: ``$XDG_CACHE_HOME/gpuloss/bench``, outside any
checkout, so a quick run never overwrites committed results) as
``<timestamp>-<quick|full>-<backend>-<machine>.json`` and ``.md``, plus a PNG
plot when matplotlib is installed.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# The shapes of issue 6: LLM vocabularies, ImageNet-sized and tiny class counts.
XENT_SHAPES = [(4096, 32000), (512, 128256), (8192, 1000), (65536, 10)]
QUICK_XENT_SHAPES = [(1024, 32000), (2048, 1000), (16384, 10)]
ELEMENTWISE = ["mean_squared_error", "absolute_difference", "huber", "smooth_l1", "hinge", "log_loss",
               "sigmoid_cross_entropy"]
TORCH_ELEMENTWISE = {"mean_squared_error": "mse_loss", "absolute_difference": "l1_loss", "huber": "huber_loss",
                     "smooth_l1": "smooth_l1_loss", "sigmoid_cross_entropy": "binary_cross_entropy_with_logits"}


@dataclass
class Row:
    case: str
    shape: tuple
    dtype: str
    gpuloss_ms: float
    first_call_ms: float
    bytes_moved: int
    gbps: float
    floor_ms: float | None = None
    torch_ms: float | None = None
    speedup_vs_torch: float | None = None
    vs_floor: float | None = None
    notes: str = ""


@dataclass
class Report:
    machine: str
    date: str
    command: str
    backend: str
    threads: int
    copy_gbps: float
    versions: dict
    fresh_copy_gbps: float | None = None  # the copy into a newly allocated array each time
    rows: list = field(default_factory=list)
    # The fused linear + cross entropy case (gpuloss.bench_linear.LinearRow: time and peak memory), with --linear.
    linear_rows: list = field(default_factory=list)
    # Seconds for a new process to import gpuloss and make its first cross-entropy and
    # huber calls: with an empty Numba cache (compiles) and then with the cache warm.
    first_call_cold_s: float | None = None
    first_call_warm_s: float | None = None
    mode: str = "full"          # "quick" or "full": quick results are not comparable with full ones
    timestamp: str = ""         # when the run started, local time, YYYYMMDD-HHMMSS


_FIRST_CALL_SNIPPET = """
import time, numpy as np
t0 = time.perf_counter()
import gpuloss as gl
x = np.random.randn(256, 1000).astype(np.float32)
gl.softmax_cross_entropy(x, np.zeros(256, np.int64), return_grad=True)
gl.softmax_cross_entropy(x, np.zeros(256, np.int64))
gl.huber(x, x, return_grad=True)
print(time.perf_counter() - t0)
"""


def first_call_seconds() -> tuple[float, float]:
    """(cold, warm): a fresh process's import + first calls, with an empty and then a warm Numba cache."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = [float(subprocess.run([sys.executable, "-c", _FIRST_CALL_SNIPPET], env=env, check=True,
                                     capture_output=True, text=True).stdout.split()[-1]) for _ in range(2)]
    return runs[0], runs[1]


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def _timed_once_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


_STREAMING = {}


def _streaming_kernels():
    """(floor, copy): Numba kernels that only move memory, vectorised, on the same threads as gpuloss."""
    if not _STREAMING:
        from numba import njit, prange

        @njit(parallel=True, cache=True, fastmath={"reassoc"})
        def read_twice_write_once(x, out, partial):
            # Pass 1 reads every row (a reduction LLVM vectorises); pass 2 reads it again and writes.
            for n in prange(x.shape[0]):
                s = np.float32(0)
                for c in range(x.shape[1]):
                    s += x[n, c]
                partial[n] = s
            for n in prange(x.shape[0]):
                for c in range(x.shape[1]):
                    out[n, c] = x[n, c]

        @njit(parallel=True, cache=True)
        def copy(src, dst):
            for i in prange(src.shape[0]):
                for j in range(src.shape[1]):
                    dst[i, j] = src[i, j]

        _STREAMING.update(floor=read_twice_write_once, copy=copy)
    return _STREAMING["floor"], _STREAMING["copy"]


def copy_bandwidth_gbps(nbytes: int = 1 << 28, repeats: int = 5, fresh: bool = False) -> float:
    """Read + write GB/s of a parallel copy of ``nbytes`` (the machine's streaming limit); with
    ``fresh``, into a newly allocated array each time, as a loss returning a gradient must write:
    the operating system zeroes every new page on first touch."""
    _, copy = _streaming_kernels()
    x = np.ones((max(nbytes // 4 // 4096, 1), 4096), np.float32)
    out = np.empty_like(x)
    ms = median_ms((lambda: copy(x, np.empty_like(x))) if fresh else (lambda: copy(x, out)), repeats)
    return 2 * x.nbytes / (ms * 1e-3) / 1e9


def _torch():
    try:
        import torch
    except Exception:
        return None
    return torch


def bench_cross_entropy(shape, dtype, repeats, torch, backend, forward_only=False) -> Row:
    import gpuloss as gl

    rng = np.random.default_rng(0)
    rows, classes = shape
    x = (rng.standard_normal(shape, dtype=np.float32) * 2).astype(dtype)
    y = rng.integers(0, classes, rows)
    run = (lambda: gl.softmax_cross_entropy(x, y, backend=backend)) if forward_only else \
        (lambda: gl.softmax_cross_entropy(x, y, return_grad=True, backend=backend))
    first = _timed_once_ms(run)
    ms = median_ms(run, repeats)
    # A fused pass reads the logits once from memory (re-reads hit cache) and writes the grad once.
    moved = x.nbytes * (1 if forward_only else 2) + y.nbytes
    row = Row(case="softmax_cross_entropy" + (" fwd" if forward_only else " fwd+bwd"), shape=shape,
              dtype=np.dtype(dtype).name, gpuloss_ms=ms, first_call_ms=first, bytes_moved=moved,
              gbps=moved / (ms * 1e-3) / 1e9)
    half = x.dtype.itemsize == 2
    if not forward_only:
        floor_kernel, _ = _streaming_kernels()
        xs = x.view(np.uint16) if half else x  # the floor only moves bytes: 16-bit patterns will do
        out = np.empty_like(xs)
        partial = np.empty(rows)
        row.floor_ms = median_ms(lambda: floor_kernel(xs, out, partial), repeats)
        row.vs_floor = ms / row.floor_ms
        # The call returns a new gradient: the same floor writing into a new array each time.
        fresh_ms = median_ms(lambda: floor_kernel(xs, np.empty_like(xs), partial), repeats)
        row.notes = f"floor into a new array each call (page zeroing included): {fresh_ms:.2f} ms, " \
                    f"{ms / fresh_ms:.2f}x that"
    if torch is not None:
        # bfloat16 has no NumPy dtype in torch: the same bits through int16
        xt = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) if x.dtype.name == "bfloat16" \
            else torch.from_numpy(x)
        yt = torch.from_numpy(y)
        F = torch.nn.functional
        if forward_only:
            def trun():
                with torch.no_grad():
                    F.cross_entropy(xt, yt)
        else:
            def trun():
                xg = xt.detach().requires_grad_(True)
                F.cross_entropy(xg, yt).backward()
        row.torch_ms = median_ms(trun, repeats)
        row.speedup_vs_torch = row.torch_ms / ms
    return row


def bench_elementwise(name, size, repeats, torch, backend) -> Row:
    import gpuloss as gl

    rng = np.random.default_rng(0)
    rows = 1024
    shape = (rows, size // rows)
    pred = rng.random(shape, dtype=np.float32) * 0.98 + 0.01
    target = (rng.random(shape, dtype=np.float32) < 0.5).astype(np.float32)
    weight = rng.random(rows, dtype=np.float32)  # per-sample weights
    fn = getattr(gl, name)

    def run():
        return fn(pred, target, weight=weight, return_grad=True, backend=backend)

    first = _timed_once_ms(run)
    ms = median_ms(run, repeats)
    moved = pred.nbytes * 3  # read pred and target, write grad
    row = Row(case=f"{name} (weighted) fwd+bwd", shape=shape, dtype="float32", gpuloss_ms=ms, first_call_ms=first,
              bytes_moved=moved, gbps=moved / (ms * 1e-3) / 1e9)
    tname = TORCH_ELEMENTWISE.get(name)
    if torch is not None and tname is not None:
        F = torch.nn.functional
        pt, tt, wt = torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(weight)[:, None]

        def trun():
            pg = pt.detach().requires_grad_(True)
            (getattr(F, tname)(pg, tt, reduction="none") * wt).sum().div(wt.sum() * shape[1]).backward()

        row.torch_ms = median_ms(trun, repeats)
        row.speedup_vs_torch = row.torch_ms / ms
        row.notes = "torch: per-element loss x weight, summed (no fused weighted mean)"
    return row


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def run_suite(quick: bool = False, backend: str = "cpu", repeats: int | None = None, progress=True,
              command: str | None = None, linear: bool = False) -> Report:
    """Run every case. ``command`` is recorded as what was run (default: the equivalent
    ``gpuloss bench`` command line)."""
    import numba

    import gpuloss

    torch = _torch()
    threads = numba.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)  # same thread count on both sides
    if repeats is not None and (isinstance(repeats, bool) or int(repeats) != repeats or repeats < 1):
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    repeats = repeats or (3 if quick else 7)
    if command is None:
        command = "gpuloss bench" + (" --quick" if quick else "") + (f" --backend {backend}")
    now = _dt.datetime.now()
    versions = {"gpuloss": gpuloss.__version__, "numpy": np.__version__, "numba": numba.__version__,
                "torch": getattr(torch, "__version__", None), "python": platform.python_version()}
    report = Report(machine=machine_name(), date=now.date().isoformat(), command=command,
                    backend=backend, threads=threads, copy_gbps=copy_bandwidth_gbps(), versions=versions,
                    fresh_copy_gbps=copy_bandwidth_gbps(fresh=True),
                    mode="quick" if quick else "full", timestamp=now.strftime("%Y%m%d-%H%M%S"))
    if backend == "cpu":
        report.first_call_cold_s, report.first_call_warm_s = first_call_seconds()
    shapes = QUICK_XENT_SHAPES if quick else XENT_SHAPES
    jobs = [("xent", s, False) for s in shapes] + [("xent", s, True) for s in shapes]
    # 16-bit logits read as stored: their time against the float32 row of the same shape (in notes)
    jobs += [("xent16", shapes[0], dt) for dt in ("float16", "bfloat16")]
    jobs += [("elementwise", n, None) for n in (ELEMENTWISE[:3] if quick else ELEMENTWISE)]
    size = (1 << 22) if quick else (1 << 25)
    from tqdm import tqdm

    for kind, what, fwd in tqdm(jobs, desc="gpuloss bench", disable=not progress, unit="case"):
        if kind == "xent":
            report.rows.append(bench_cross_entropy(what, np.float32, repeats, torch, backend, forward_only=fwd))
        elif kind == "xent16":
            import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
            row = bench_cross_entropy(what, np.dtype(fwd), repeats, torch, backend)
            f32 = next(r for r in report.rows if r.case == row.case and r.shape == row.shape and r.dtype == "float32")
            row.notes = f"{row.gpuloss_ms / f32.gpuloss_ms:.2f}x the float32 time of the same shape; {row.notes}"
            report.rows.append(row)
        else:
            report.rows.append(bench_elementwise(what, size, repeats, torch, backend))
    if backend == "cpu" and torch is not None:
        # One training step's loss through gpuloss.torch against torch's own (float32 and bfloat16).
        from .bench_torch import torch_module_rows
        report.rows.extend(torch_module_rows(quick=quick, repeats=repeats))
    if linear and backend == "cpu":
        # linear_cross_entropy against torch's F.linear_cross_entropy, naive and chunked (minutes)
        from .bench_linear import run_linear_cases
        report.linear_rows = run_linear_cases(quick=quick, repeats=repeats)
    return report


def _fmt(v, spec=".1f", none="—"):
    return none if v is None else format(v, spec)


def markdown(report: Report) -> str:
    lines = [f"{report.mode.capitalize()} run. Machine: {report.machine}; {report.threads} threads (torch set to the same); backend "
             f"`{report.backend}`; date {report.date}; command `{report.command.strip()}`; parallel copy "
             f"bandwidth {report.copy_gbps:.1f} GB/s (read+write)" + (
                 "" if report.fresh_copy_gbps is None else
                 f", {report.fresh_copy_gbps:.1f} GB/s into a newly allocated array") + "." + (
                 "" if report.first_call_cold_s is None else
                 f" A new process's import + first calls: {report.first_call_cold_s:.1f} s with an empty Numba "
                 f"cache (compiling), {report.first_call_warm_s:.1f} s with it warm."), "",
             "| case | shape | dtype | gpuloss ms | torch ms | speed-up | GB/s | floor ms | x floor | first call ms |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        r = asdict(r)
        lines.append(f"| {r['case']} | {tuple(r['shape'])} | {r['dtype']} | {r['gpuloss_ms']:.2f} | "
                     f"{_fmt(r['torch_ms'], '.2f')} | "
                     f"{_fmt(r['speedup_vs_torch'], '.1f')}{'' if r['speedup_vs_torch'] is None else 'x'} | "
                     f"{r['gbps']:.1f} | {_fmt(r['floor_ms'], '.2f')} | {_fmt(r['vs_floor'], '.2f')} | "
                     f"{r['first_call_ms']:.0f} |")
    notes = [f"- {r.case} {tuple(r.shape)} {r.dtype}: {r.notes}" for r in report.rows if r.notes]
    if notes:
        lines += ["", "Notes:", ""] + notes
    if report.linear_rows:
        from .bench_linear import markdown_rows
        lines += ["", "Fused linear + cross entropy (time and peak memory; gpuloss.bench_linear):", "",
                  markdown_rows(report.linear_rows).rstrip("\n")]
    return "\n".join(lines) + "\n"


def default_results_dir() -> Path:
    """Where results go without ``--save``: the user's cache, never the current folder (a checkout)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpuloss" / "bench"


def result_stem(report: Report) -> str:
    """``<timestamp>-<quick|full>-<backend>-<machine>``: runs never overwrite each other, and a quick
    run is never taken for a full one."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in report.machine.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = report.timestamp or report.date
    return f"{stamp}-{report.mode}-{report.backend}-{slug}"


def write_results(report: Report, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem(report)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    paths[1].write_text(markdown(report))
    png = _plot(report, stem.with_suffix(".png"))
    return paths + ([png] if png else [])


def plot_unavailable_reason() -> str | None:
    """Why no PNG can be drawn here (None: matplotlib imports)."""
    try:
        import matplotlib  # noqa: F401
    except Exception as exc:
        return f"matplotlib is not installed ({type(exc).__name__}), so no plot was written"
    return None


def _plot(report: Report, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = [r for r in report.rows if r.case.endswith("fwd+bwd") and r.case.startswith("softmax")
            and r.dtype == "float32"]
    if not rows:
        return None
    rows.sort(key=lambda r: r.shape[1])
    labels = [f"{r.shape[0]}x{r.shape[1]}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    ax.plot(xs, [r.gpuloss_ms for r in rows], "o-", label="gpuloss (cpu)")
    if all(r.torch_ms for r in rows):
        ax.plot(xs, [r.torch_ms for r in rows], "s-", label="torch")
    ax.plot(xs, [r.floor_ms for r in rows], "k--", label="floor (read 2x + write 1x)")
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_xlabel("logits shape (rows x classes), float32")
    ax.set_title(f"softmax cross entropy fwd+bwd, {report.threads} threads, {report.date}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args) -> int:
    command = "gpuloss " + shlex.join(getattr(args, "argv", None) or ["bench"])
    out_dir = None if args.no_save else Path(args.save or default_results_dir())
    if out_dir is not None:
        # Before the minutes of measuring: a folder that cannot be written fails now, in one line.
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"gpuloss bench: --save {os.fspath(out_dir)!r}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    try:
        report = run_suite(quick=args.quick, backend=args.backend, repeats=args.repeats, command=command,
                           linear=args.linear)
    except KeyboardInterrupt:
        print("gpuloss bench: interrupted; nothing written", file=sys.stderr)
        return 130
    print(markdown(report))
    if out_dir is not None:
        paths = write_results(report, out_dir)
        for p in paths:
            print(f"wrote {p}")
        if not any(p.suffix == ".png" for p in paths):
            print(plot_unavailable_reason() or "no cross-entropy rows to plot, so no plot was written")
    return 0


def _bench_backend(value: str) -> str:
    from gpuloss.cli import backend_arg
    import argparse
    if value.strip().lower() not in ("cpu", "emulated"):
        raise argparse.ArgumentTypeError(f"bench times 'cpu' or 'emulated', got {value!r}")
    return backend_arg(value)


def register(subparsers) -> None:
    import argparse

    from gpuloss.cli import positive_int
    p = subparsers.add_parser(
        "bench", help="time the kernels (GB/s, against PyTorch where installed)",
        description="Time every loss on a CPU backend: the median of repeated runs, GB/s of the bytes a "
                    "fused kernel must move, the ratio against PyTorch in the same run with the same "
                    "threads, and the memory floor (read the input twice, write the gradient once). "
                    "Results are printed and written as JSON, Markdown and (with matplotlib) a PNG to "
                    f"--save DIR (default {default_results_dir()}), named by time, quick/full, backend and "
                    "machine.")
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats (not comparable "
                   "with a full run; the file name says quick)")
    p.add_argument("--backend", default="cpu", type=_bench_backend, help="cpu | emulated (default cpu)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed runs per case, the median is reported (default 7, quick 3)")
    p.add_argument("--save", metavar="DIR", default=None,
                   help=f"folder for the results (default {default_results_dir()})")
    p.add_argument("--out", dest="save", help=argparse.SUPPRESS)   # the former name of --save
    p.add_argument("--no-save", action="store_true", help="print only, write nothing")
    p.add_argument("--linear", action="store_true", help="also time linear_cross_entropy against torch's "
                   "F.linear_cross_entropy with its peak memory (about 11 minutes on 2 cores)")
    p.set_defaults(func=main)
