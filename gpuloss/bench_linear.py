"""Benchmark of the fused linear + cross entropy head: time and peak memory, side by side.

The case of the issue: CPU, float32, loss + all gradients (input and weight, no
bias: an LLM head) for ``[N=4096, H=1024, V=32000]`` and ``[N=2048, H=1024,
V=128256]``, against torch's ``F.linear_cross_entropy`` with ``options=None``
(the naive reference: the [N, V] logits and their gradient materialised) and
with ``options=LinearCrossEntropyOptions()`` (torch's chunked path).

Reported per case: the median time of ``repeats`` rounds in which the three
methods take turns (one process, the same thread count; gpuloss's first call
and a small warm-up of each method are off the clock), and the peak *extra* memory of
one call: ``tracemalloc`` for gpuloss (NumPy reports its allocations to it),
and for all three the peak RSS of a fresh process above its RSS just before
the call (``/proc/self/clear_refs`` resets the high-water mark after the
inputs exist and a small warm-up call has loaded every kernel; where that
file cannot be written, ``ru_maxrss``).  Outputs (the gradients) count: both
sides allocate them.

Rows are :class:`gpuloss.benchmark.Row` (plus the memory fields), so the
case can join ``gpuloss bench``'s report.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from .benchmark import Row

SHAPES = [(4096, 1024, 32000), (2048, 1024, 128256)]
QUICK_SHAPES = [(1024, 256, 32000)]
METHODS = ("gpuloss", "torch_naive", "torch_chunked")


@dataclass
class LinearRow(Row):
    """A Row of benchmark.py (gpuloss_ms, torch_ms = torch naive, speedup_vs_torch) and the rest."""

    torch_chunked_ms: float | None = None
    gflops: float | None = None  # of gpuloss: 3 GEMMs of 2 N H V flops each
    gpuloss_tracemalloc_mb: float | None = None
    gpuloss_rss_mb: float | None = None
    torch_naive_rss_mb: float | None = None
    torch_chunked_rss_mb: float | None = None
    chunk_bytes: int | None = None
    memory_ratio_vs_naive: float | None = None  # gpuloss RSS / torch naive RSS (target <= 1/8)
    gradients_mb: float | None = None  # d_input + d_weight: outputs every method allocates
    memory_ratio_excl_gradients: float | None = None  # the same ratio with gradients_mb taken off both
    time_ratio_vs_naive: float | None = None  # gpuloss / torch naive (target <= 1.1)
    time_ratio_vs_chunked: float | None = None  # gpuloss / torch chunked (target <= 1)


def make_inputs(shape, seed: int = 0):
    """float32 ``x [N, H]``, ``W [V, H]`` and int64 targets, made without float64 temporaries."""
    N, H, V = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, H), dtype=np.float32)
    W = rng.standard_normal((V, H), dtype=np.float32)
    W *= np.float32(1.0 / np.sqrt(H))
    y = rng.integers(0, V, N)
    return x, W, y


def rows_per_chunk(V: int, H: int, chunk_bytes: int | None) -> int:
    """Rows per chunk gpuloss uses for float32 at this budget."""
    from .linear import DEFAULT_CHUNK_BYTES, min_chunk_bytes

    return (chunk_bytes or DEFAULT_CHUNK_BYTES) // min_chunk_bytes(V, H, np.float32)


def runner(method: str, x, W, y, chunk_bytes: int | None = None):
    """A function of no arguments computing the loss and the gradients of input and weight with ``method``."""
    if method == "gpuloss":
        import gpuloss as gl

        return lambda: gl.linear_cross_entropy(x, W, y, return_grad=True, chunk_bytes=chunk_bytes)
    import torch
    import torch.nn.functional as F

    xt, Wt, yt = torch.from_numpy(x), torch.from_numpy(W), torch.from_numpy(y)
    if method == "torch_naive":
        options = None
    else:
        # torch's chunked path with as many rows per chunk as gpuloss uses (the same working set).
        # Its zero-argument LinearCrossEntropyOptions() ("auto") took 12.8 s against 0.87 s for
        # options=None at N=1024, H=256, V=32000 on the 2-core EPYC: not a fair stand-in.
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows_per_chunk(W.shape[0], W.shape[1],
                                                                                      chunk_bytes))

    def run():
        xg = xt.detach().requires_grad_(True)
        Wg = Wt.detach().requires_grad_(True)
        F.linear_cross_entropy(xg, Wg, yt, options=options).backward()
        return xg.grad, Wg.grad

    return run


def tracemalloc_peak_mb(fn) -> float:
    """Peak bytes NumPy (and Python) allocate during ``fn()`` above what was live before, in MiB."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del out
    return (peak - before) / 2**20


_RSS_SNIPPET = r"""
import json, os, resource, sys
import numpy as np
sys.path.insert(0, {root!r})
from gpuloss.bench_linear import make_inputs, runner
method, shape, chunk_bytes = {method!r}, {shape!r}, {chunk_bytes!r}
if method != "gpuloss":
    import torch
    torch.set_num_threads({threads})
import gpuloss
x, W, y = make_inputs(shape)
# Warm up on small data big enough for the parallel kernels and BLAS's threaded paths, so that
# loading code (Numba's cache, LLVM, thread pools, BLAS buffers) happens before the measurement.
# gpuloss's warm-up runs in 4 chunks: the first chunk's GEMM and the accumulating one both get used.
small = make_inputs((256, 256, 4096), seed=1)
runner(method, *small, 64 * (2 * 4096 + 256) * 4)()
del small

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return None

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    how = "VmHWM after clear_refs"
except OSError:
    how = "ru_maxrss"
before = status("VmRSS:")
if how == "ru_maxrss":
    before = max(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
out = runner(method, x, W, y, chunk_bytes)()
peak = status("VmHWM:") if how != "ru_maxrss" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"extra_mb": (peak - before) / 2**20, "how": how}}))
"""


def fresh_process_peak_rss_mb(method: str, shape, chunk_bytes: int | None = None, threads: int = 1) -> float:
    """Peak RSS above the pre-call RSS of one ``method`` call in a new Python process, in MiB."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _RSS_SNIPPET.format(root=root, method=method, shape=tuple(shape), chunk_bytes=chunk_bytes, threads=threads)
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["extra_mb"])


def bench_linear(shape, repeats: int = 3, *, torch=None, chunk_bytes: int | None = None, rss: bool = True,
                 progress=None) -> LinearRow:
    """One LinearRow for ``shape = (N, H, V)``: medians of the three methods, peak memory of each."""
    from .linear import DEFAULT_CHUNK_BYTES

    say = progress or (lambda msg: None)
    N, H, V = shape
    x, W, y = make_inputs(shape)
    run = runner("gpuloss", x, W, y, chunk_bytes)
    say(f"{shape}: gpuloss first call")
    t0 = time.perf_counter()
    run()
    first_ms = (time.perf_counter() - t0) * 1e3
    # The methods take turns, one run each per round: on a shared machine the load drifts, and
    # interleaving spreads that drift over all three instead of biasing whichever ran last.
    methods = METHODS if torch is not None else ("gpuloss",)
    runs = {m: run if m == "gpuloss" else runner(m, x, W, y, chunk_bytes) for m in methods}
    samples = {m: [] for m in methods}
    for i in range(repeats):
        for m in methods:
            say(f"{shape}: round {i + 1}/{repeats}: {m}")
            t0 = time.perf_counter()
            runs[m]()
            samples[m].append((time.perf_counter() - t0) * 1e3)
    med = {m: statistics.median(v) for m, v in samples.items()}
    ms = med["gpuloss"]
    flops = 3 * 2 * N * H * V
    moved = x.nbytes * 2 + W.nbytes * 2 + y.nbytes  # read x, W; write d_x, d_W (the logits never reach memory)
    row = LinearRow(case="linear_cross_entropy fwd+bwd", shape=tuple(shape), dtype="float32", gpuloss_ms=ms,
                    first_call_ms=first_ms, bytes_moved=moved, gbps=moved / (ms * 1e-3) / 1e9,
                    gflops=flops / (ms * 1e-3) / 1e9, chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
                    notes=f"no bias; torch_ms is torch naive (options=None); torch chunked: batch_chunk_size="
                          f"{rows_per_chunk(V, H, chunk_bytes)} (gpuloss's rows per chunk); runs in ms: "
                          + "; ".join(f"{m} {[round(t) for t in v]}" for m, v in samples.items()))
    if torch is not None:
        row.torch_ms = med["torch_naive"]
        row.speedup_vs_torch = row.torch_ms / ms
        row.time_ratio_vs_naive = ms / row.torch_ms
        row.torch_chunked_ms = med["torch_chunked"]
        row.time_ratio_vs_chunked = ms / row.torch_chunked_ms
    say(f"{shape}: gpuloss tracemalloc")
    row.gpuloss_tracemalloc_mb = tracemalloc_peak_mb(run)
    del runs
    del x, W, y, run
    if rss:
        threads = torch.get_num_threads() if torch is not None else 1
        for method in METHODS if torch is not None else ("gpuloss",):
            say(f"{shape}: {method} peak RSS (fresh process)")
            setattr(row, f"{method}_rss_mb", fresh_process_peak_rss_mb(method, shape, chunk_bytes, threads))
        row.gradients_mb = (N * H + V * H) * 4 / 2**20
        if row.torch_naive_rss_mb:
            row.memory_ratio_vs_naive = row.gpuloss_rss_mb / row.torch_naive_rss_mb
            row.memory_ratio_excl_gradients = ((row.gpuloss_rss_mb - row.gradients_mb)
                                               / (row.torch_naive_rss_mb - row.gradients_mb))
    return row


def _f(v, spec=".1f"):
    return "—" if v is None else format(v, spec)


def markdown_rows(rows) -> str:
    """The table of the linear case (times in ms, memory in MiB)."""
    lines = ["| shape (N, H, V) | chunk MiB | gpuloss ms | torch naive ms | torch chunked ms | gpuloss / naive | "
             "gpuloss / chunked | gpuloss GFLOP/s | gpuloss tracemalloc MiB | gpuloss RSS MiB | torch naive RSS MiB | "
             "torch chunked RSS MiB | gradients MiB | gpuloss / naive RSS | same, gradients off both |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {tuple(r.shape)} | {_f(r.chunk_bytes and r.chunk_bytes / 2**20, '.0f')} | "
                     f"{r.gpuloss_ms:.0f} | {_f(r.torch_ms, '.0f')} | "
                     f"{_f(r.torch_chunked_ms, '.0f')} | {_f(r.time_ratio_vs_naive, '.2f')} | "
                     f"{_f(r.time_ratio_vs_chunked, '.2f')} | {_f(r.gflops)} | {_f(r.gpuloss_tracemalloc_mb)} | "
                     f"{_f(r.gpuloss_rss_mb)} | {_f(r.torch_naive_rss_mb)} | {_f(r.torch_chunked_rss_mb)} | "
                     f"{_f(r.gradients_mb)} | {_f(r.memory_ratio_vs_naive, '.3f')} | "
                     f"{_f(r.memory_ratio_excl_gradients, '.3f')} |")
    return "\n".join(lines) + "\n"


def run_linear_cases(quick: bool = False, repeats: int | None = None, chunk_bytes: int | None = None,
                     progress=None) -> list[LinearRow]:
    """Every shape of the case with torch (where installed) at numba's thread count on both sides."""
    import numba

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(numba.get_num_threads())
    repeats = repeats or (1 if quick else 3)
    small = make_inputs((256, 256, 4096), seed=1)
    for method in METHODS if torch is not None else ("gpuloss",):  # one-time initialisation, off the clock
        runner(method, *small, 64 * (2 * 4096 + 256) * 4)()
    return [bench_linear(s, repeats, torch=torch, chunk_bytes=chunk_bytes, progress=progress)
            for s in (QUICK_SHAPES if quick else SHAPES)]
