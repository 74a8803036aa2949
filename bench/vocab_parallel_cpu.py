"""Vocabulary-parallel cross entropy on CPU processes (gloo) against one process.

    python bench/vocab_parallel_cpu.py OUT_DIR [--rows 4096] [--vocab 128256] [--ranks 2] [--repeats 3]

Times, on float32 logits [rows, vocab] with class-index targets, forward and
backward together (both compute the gradient in the forward pass):

* ``1 process``: ``gpuloss.softmax_cross_entropy(..., return_grad=True)`` on the
  whole logits (the cpu backend, Numba threads = every core);
* ``N ranks``: ``gpuloss.torch.vocab_parallel_cross_entropy`` with each of N
  spawned processes holding ``vocab / N`` classes (Numba threads = 1 per rank),
  gloo over 127.0.0.1; the wall time is the slowest rank's, and the two
  all-reduces alone are timed on the same payload.

It also counts the bytes each rank hands to the collectives per row (the
logits never travel).  Writes ``vocab_parallel_cpu-<date>.json`` and ``.md``
into OUT_DIR.

    python bench/vocab_parallel_cpu.py OUT_DIR --linear [--rows 2048] [--hidden 512] [--vocab 32000]

times the fused linear head instead, float32, loss and the gradients of the
hidden states and of the weight (no bias: an LLM head): 1 process with
``gpuloss.torch.linear_cross_entropy`` against N ranks with
``gpuloss.torch.vocab_parallel_linear_cross_entropy``, each holding ``vocab /
N`` rows of the weight; the collectives alone (the statistics' two
all-reduces and the all-reduce of the hidden states' gradient, per chunk as
the call runs them) are timed on the same payload.  Writes
``vocab_parallel_linear_cpu-<date>.json`` and ``.md``.  On a 2-core machine the ranks share the cores the single
process uses, so the comparison shows the cost of the scheme, not a speed-up.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path


def _data(rows: int, vocab: int, lo: int, hi: int, seed: int):
    """Columns [lo, hi) of the logits and the targets, generated in row blocks (same values for any split)."""
    import numpy as np
    x = np.empty((rows, hi - lo), np.float32)
    for r0 in range(0, rows, 256):
        r1 = min(rows, r0 + 256)
        block = np.random.default_rng([seed, r0]).standard_normal((r1 - r0, vocab), dtype=np.float32)
        x[r0:r1] = block[:, lo:hi] * 2
    y = np.random.default_rng([seed, 1 << 30]).integers(0, vocab, rows)
    return x, y


def _rank(rank, world, port, args, out_path):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import numpy as np
    import torch
    import torch.distributed as dist

    import gpuloss.torch as gt
    from gpuloss.torch.distributed import shard_bounds
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = shard_bounds(args.vocab, world)
    x, y = _data(args.rows, args.vocab, b[rank], b[rank + 1], args.seed)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch.from_numpy(y)
    sizes = list(np.diff(b))
    times, comm = [], []
    for k in range(args.repeats + 1):   # the first call compiles/loads Numba's cache: not timed
        dist.barrier()
        t0 = time.perf_counter()
        loss = gt.vocab_parallel_cross_entropy(xt, yt, shard_sizes=sizes, validate=False)
        loss.backward()
        t1 = time.perf_counter()
        xt.grad = None
        m = torch.zeros(args.rows)
        packed = torch.zeros(args.rows, 2)
        dist.barrier()
        t2 = time.perf_counter()
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        dist.all_reduce(packed)
        t3 = time.perf_counter()
        if k:
            times.append(t1 - t0)
            comm.append(t3 - t2)
    result = dict(rank=rank, times=times, comm=comm, loss=float(loss.detach()))
    dist.destroy_process_group()
    Path(out_path).write_text(json.dumps(result))


def _linear_data(rows: int, hidden: int, vocab: int, lo: int, hi: int, seed: int):
    """Hidden states, rows [lo, hi) of the weight and the targets (the same values for any split)."""
    import numpy as np
    x = np.random.default_rng([seed, 1]).standard_normal((rows, hidden), dtype=np.float32)
    w = np.empty((hi - lo, hidden), np.float32)
    for r0 in range(0, vocab, 4096):   # weight rows in fixed blocks: any shard reads the same numbers
        r1 = min(vocab, r0 + 4096)
        if r1 <= lo or r0 >= hi:
            continue
        block = np.random.default_rng([seed, 2, r0]).standard_normal((r1 - r0, hidden), dtype=np.float32)
        a, b = max(lo, r0), min(hi, r1)
        w[a - lo:b - lo] = block[a - r0:b - r0] * (1.0 / np.sqrt(hidden))
    y = np.random.default_rng([seed, 3]).integers(0, vocab, rows)
    return x, w, y


def _rank_linear(rank, world, port, args, out_path):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import numpy as np
    import torch
    import torch.distributed as dist

    import gpuloss.torch as gt
    from gpuloss.torch.distributed import _chunk_rows_of, shard_bounds
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = shard_bounds(args.vocab, world)
    x, w, y = _linear_data(args.rows, args.hidden, args.vocab, b[rank], b[rank + 1], args.seed)
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    yt = torch.from_numpy(y)
    sizes = [int(s) for s in np.diff(b)]
    rows = _chunk_rows_of(None, None, max(sizes), args.hidden, torch.float32)
    times, comm = [], []
    for k in range(args.repeats + 1):   # the first call compiles/loads Numba's cache: not timed
        dist.barrier()
        t0 = time.perf_counter()
        loss = gt.vocab_parallel_linear_cross_entropy(xt, wt, yt, shard_sizes=sizes, validate=False)
        loss.backward()
        t1 = time.perf_counter()
        xt.grad = wt.grad = None
        dist.barrier()
        t2 = time.perf_counter()
        for s in range(0, args.rows, rows):   # the same collectives, chunk by chunk, without the compute
            e = min(args.rows, s + rows)
            dist.all_reduce(torch.zeros(e - s), op=dist.ReduceOp.MAX)
            dist.all_reduce(torch.zeros(e - s, 2))
            dist.all_reduce(torch.zeros(e - s, args.hidden))
        t3 = time.perf_counter()
        if k:
            times.append(t1 - t0)
            comm.append(t3 - t2)
    result = dict(rank=rank, times=times, comm=comm, loss=float(loss.detach()), chunk_rows=rows)
    dist.destroy_process_group()
    Path(out_path).write_text(json.dumps(result))


def _spawn(target, args):
    import multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["NUMBA_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.get_context("spawn")
    tmp = args.out_dir / ".ranks"
    tmp.mkdir(exist_ok=True)
    procs = [ctx.Process(target=target, args=(r, args.ranks, port, args, str(tmp / f"{r}.json")))
             for r in range(args.ranks)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(1800)
        if pr.is_alive():
            pr.kill()
            raise SystemExit("a rank did not finish in 30 minutes")
    ranks = [json.loads((tmp / f"{r}.json").read_text()) for r in range(args.ranks)]
    for r in range(args.ranks):
        (tmp / f"{r}.json").unlink()
    tmp.rmdir()
    return ranks


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical cores"


def main_linear(args) -> int:
    import torch

    import gpuloss.torch as gt
    from gpuloss.torch.distributed import _chunk_rows_of, shard_bounds

    # One process, every core.
    x, w, y = _linear_data(args.rows, args.hidden, args.vocab, 0, args.vocab, args.seed)
    xt, wt, yt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(w).requires_grad_(True), \
        torch.from_numpy(y)
    def time_single():
        out = []
        for k in range(args.repeats + 1):
            t0 = time.perf_counter()
            loss = gt.linear_cross_entropy(xt, wt, yt)
            loss.backward()
            if k:
                out.append(time.perf_counter() - t0)
            xt.grad = wt.grad = None
        return out, loss

    single, loss1 = time_single()
    # The same process on one thread (Numba, the BLAS, torch): the work per core, without the
    # contention of 2 threads on 2 cores that other jobs also use.
    import numba
    from threadpoolctl import threadpool_limits
    before = (numba.get_num_threads(), torch.get_num_threads())
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        single_1t, _ = time_single()
    numba.set_num_threads(before[0])
    torch.set_num_threads(before[1])
    del x, w, xt, wt

    ranks = _spawn(_rank_linear, args)
    wall = [max(rk["times"][i] for rk in ranks) for i in range(args.repeats)]
    comm = [max(rk["comm"][i] for rk in ranks) for i in range(args.repeats)]
    fwd_bytes = 4 * (1 + 2)                  # MAX of the row max, SUM of (rest, target logit); +4 with smoothing
    bwd_bytes = 4 * args.hidden              # the row of d hidden, all-reduced (SUM)
    v_max = max(int(n) for n in __import__("numpy").diff(shard_bounds(args.vocab, args.ranks)))
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "machine": _machine(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "shape": {"rows": args.rows, "hidden": args.hidden, "vocab": args.vocab}, "dtype": "float32",
        "ranks": args.ranks, "repeats": args.repeats, "chunk_rows": ranks[0]["chunk_rows"],
        "single_process_s": statistics.median(single),
        "single_process_one_thread_s": statistics.median(single_1t),
        "vocab_parallel_s": statistics.median(wall),
        "collectives_alone_s": statistics.median(comm),
        "times_s": {"single_process": single, "single_process_one_thread": single_1t, "vocab_parallel": wall,
                    "collectives_alone": comm},
        "forward_bytes_per_row_per_rank": fwd_bytes,
        "backward_bytes_per_row_per_rank": bwd_bytes,
        "logits_bytes_per_row": 4 * args.vocab,
        "logits_chunk_bytes_per_rank": 4 * ranks[0]["chunk_rows"] * v_max,
        "loss_single": float(loss1.detach()), "loss_vocab_parallel": ranks[0]["loss"],
    }
    stem = f"vocab_parallel_linear_cpu-{_dt.date.today().isoformat()}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    r, h, v = args.rows, args.hidden, args.vocab
    md = [f"# Vocabulary-parallel fused linear head on CPU ({result['date']})", "",
          f"`{result['command']}`", "",
          f"float32 hidden states [{r}, {h}], weight [{v}, {h}] (no bias), class-index targets; loss and the "
          f"gradients of the hidden states and the weight (forward + backward), median of {args.repeats} "
          f"(after one untimed call); {result['machine']}; torch {torch.__version__}.", "",
          "| run | time (s) | what crosses the network per row, per rank |", "|---|---|---|",
          f"| 1 process, `gpuloss.torch.linear_cross_entropy` (all cores) | {result['single_process_s']:.3f} "
          f"| nothing |",
          f"| 1 process, the same, 1 thread | {result['single_process_one_thread_s']:.3f} | nothing |",
          f"| {args.ranks} ranks, `vocab_parallel_linear_cross_entropy`, gloo on 127.0.0.1 (1 thread each, "
          f"{ranks[0]['chunk_rows']} rows per chunk) | {result['vocab_parallel_s']:.3f} | forward {fwd_bytes} "
          f"bytes (16 with label smoothing), gradient of the hidden states {bwd_bytes} bytes; not the "
          f"{4 * v} bytes of the row's logits |",
          f"| the same collectives alone ({r} rows) | {result['collectives_alone_s']:.4f} | "
          f"{(fwd_bytes + bwd_bytes) * r / 2**20:.1f} MiB per rank per call |", "",
          f"Loss: {result['loss_single']:.6f} (1 process), {result['loss_vocab_parallel']:.6f} "
          f"({args.ranks} ranks).", "",
          f"On a machine with {os.cpu_count()} cores the ranks share the cores the single process uses: this "
          "measures the cost of the scheme, not a speed-up (the ranks run single-threaded, which a busy "
          "shared machine favours over one process's threads waiting for each other). Each rank holds 1/N "
          "of the weight, of its gradient and of each chunk's logits; every time of every round is in the "
          "JSON."]
    (args.out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--linear", action="store_true", help="the fused linear head (rows 2048, vocab 32000 by default)")
    p.add_argument("--hidden", type=int, default=512, help="--linear: hidden size (default 512)")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.linear:
        argv_given = sys.argv[1:] if argv is None else list(argv)
        if "--rows" not in argv_given:
            args.rows = 2048
        if "--vocab" not in argv_given:
            args.vocab = 32000
        return main_linear(args)

    import multiprocessing as mp

    import numpy as np

    import gpuloss as gl

    # One process, every core.
    x, y = _data(args.rows, args.vocab, 0, args.vocab, args.seed)
    single = []
    for k in range(args.repeats + 1):
        t0 = time.perf_counter()
        loss1, grad = gl.softmax_cross_entropy(x, y, return_grad=True, backend="cpu")
        if k:
            single.append(time.perf_counter() - t0)
        del grad
    del x

    # N ranks, one Numba thread each.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["NUMBA_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.get_context("spawn")
    tmp = args.out_dir / ".ranks"
    tmp.mkdir(exist_ok=True)
    procs = [ctx.Process(target=_rank, args=(r, args.ranks, port, args, str(tmp / f"{r}.json")))
             for r in range(args.ranks)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(1800)
        if pr.is_alive():
            pr.kill()
            raise SystemExit("a rank did not finish in 30 minutes")
    ranks = [json.loads((tmp / f"{r}.json").read_text()) for r in range(args.ranks)]
    for r in range(args.ranks):
        (tmp / f"{r}.json").unlink()
    tmp.rmdir()
    wall = [max(rk["times"][i] for rk in ranks) for i in range(args.repeats)]
    comm = [max(rk["comm"][i] for rk in ranks) for i in range(args.repeats)]
    bytes_per_row = 4 * (1 + 2)   # float32: MAX of the row max, SUM of (rest, target logit); +4 with smoothing
    logits_bytes_per_row = 4 * args.vocab
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
        "python": sys.version.split()[0],
        "shape": [args.rows, args.vocab], "dtype": "float32", "ranks": args.ranks, "repeats": args.repeats,
        "single_process_s": statistics.median(single),
        "vocab_parallel_s": statistics.median(wall),
        "collectives_alone_s": statistics.median(comm),
        "bytes_per_row_per_rank": bytes_per_row,
        "bytes_per_row_per_rank_with_label_smoothing": bytes_per_row + 4,
        "logits_bytes_per_row": logits_bytes_per_row,
        "loss_single": float(loss1), "loss_vocab_parallel": ranks[0]["loss"],
    }
    stem = f"vocab_parallel_cpu-{_dt.date.today().isoformat()}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Vocabulary-parallel cross entropy on CPU ({result['date']})", "",
          f"float32 logits {args.rows} x {args.vocab}, class-index targets, forward + backward, "
          f"median of {args.repeats} (after one untimed call); {result['machine']}.", "",
          "| run | time (s) | what crosses the network per row |", "|---|---|---|",
          f"| 1 process (all cores) | {result['single_process_s']:.3f} | nothing |",
          f"| {args.ranks} ranks, gloo on 127.0.0.1 (1 thread each) | {result['vocab_parallel_s']:.3f} | "
          f"{bytes_per_row} bytes handed to the all-reduces per rank ({bytes_per_row + 4} with label smoothing), "
          f"not the {logits_bytes_per_row} bytes of the row's logits |",
          f"| the two all-reduces alone ({args.rows} rows) | {result['collectives_alone_s']:.4f} | |", "",
          f"Loss: {result['loss_single']:.6f} (1 process), {result['loss_vocab_parallel']:.6f} "
          f"({args.ranks} ranks).", "",
          f"On a machine with {os.cpu_count()} cores the ranks share the cores the single process uses: this "
          "measures the cost of the scheme (two passes over each shard, the collectives, process overhead), "
          "not a speed-up. The point of vocabulary parallelism is memory and devices: each rank holds 1/N "
          "of the logits and of their gradient."]
    (args.out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
