"""``gpuloss train`` and ``gpuloss time`` (SPEC §5), registered by ``register(subparsers)``."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["register", "train", "time_net", "DEFAULT_NET", "DEFAULT_SOLVER"]

_HERE = Path(__file__).resolve().parent
DEFAULT_NET = _HERE / "default_net.prototxt"
DEFAULT_SOLVER = _HERE / "default_solver.prototxt"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a net (by default an MLP on scikit-learn's digits)",
        description="Train a Caffe-style net. With no NET: the packaged default net and solver on "
                    "scikit-learn's digits, a classification loss plus a 0.3-weighted reconstruction loss.")
    p.add_argument("net", nargs="?", help="net prototxt (default: the packaged digits MLP, or the solver's net)")
    p.add_argument("--solver", help="solver prototxt (default: the packaged default_solver.prototxt)")
    p.add_argument("--data", help=".npz of training inputs, keyed by input blob name (default: digits)")
    p.add_argument("--test-data", help=".npz of test inputs (default: the digits test split with --data unset)")
    p.add_argument("--max-iter", type=int, help="override the solver's max_iter")
    p.add_argument("--backend", default="auto", help="auto | cpu | cuda | emulated (default: auto)")
    p.add_argument("--resume", help="snapshot .npz to continue from")
    p.add_argument("--snapshot-prefix", help="override the solver's snapshot_prefix")
    p.add_argument("--seed", type=int, help="override the solver's random_seed")
    p.add_argument("--threads", type=int, help="CPU threads for the cpu backend's kernels and BLAS "
                   "(default: 1 for small nets, where waking threads costs more than the work; else all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_cmd)

    t = subparsers.add_parser("time", help="per-layer forward/backward times, like `caffe time`",
                              description="Median per-layer forward and backward times of NET on random "
                                          "inputs of its declared shapes (labels in range).")
    t.add_argument("net", help="net prototxt")
    t.add_argument("--iterations", type=int, default=50, help="timed iterations (default 50)")
    t.add_argument("--phase", default="TRAIN", choices=("TRAIN", "TEST"))
    t.add_argument("--batch", type=int, help="batch size (default: the declared input shapes')")
    t.add_argument("--backend", default="auto", help="auto | cpu | cuda | emulated (default: auto)")
    t.add_argument("--threads", type=int, help="CPU threads (default: 1 for small nets, else all)")
    t.set_defaults(func=_time_cmd)


# -- train ---------------------------------------------------------------------------------------

def _user_errors():
    """The errors a user's prototxt, solver or data can cause: reported in one line, no traceback."""
    from .layer import GraphError
    from .proto import PrototxtError
    return (GraphError, PrototxtError, OSError)


def _train_cmd(args) -> int:
    try:
        train(net=args.net, solver=args.solver, data=args.data, test_data=args.test_data,
              max_iter=args.max_iter, backend=args.backend, resume=args.resume,
              snapshot_prefix=args.snapshot_prefix, seed=args.seed, progress=not args.no_progress,
              threads=args.threads)
    except _user_errors() as exc:
        print(f"gpuloss train: {exc}", file=sys.stderr)
        return 2
    return 0


def _load_config(solver, net):
    from .solver import SolverConfig
    cfg = SolverConfig.from_prototxt(solver or DEFAULT_SOLVER)
    if net is not None:
        cfg.net = os.fspath(net)
    elif solver is None or not cfg.net:
        cfg.net = os.fspath(DEFAULT_NET)
    return cfg


def train(net=None, solver=None, data=None, test_data=None, *, max_iter=None, backend="auto", resume=None,
          snapshot_prefix=None, seed=None, progress=True, threads=None, out=print) -> dict:
    """Train as ``gpuloss train`` does; returns ``{"iterations", "seconds", "test": {top: mean}}``."""
    from .data import BatchFeeder, load_digits_split, load_npz
    from .layer import GraphError
    from .net import Net
    from .solver import make_solver

    cfg = _load_config(solver, net)
    if max_iter is not None:
        cfg.max_iter = int(max_iter)
    if snapshot_prefix is not None:
        cfg.snapshot_prefix = snapshot_prefix
    if seed is not None:
        cfg.random_seed = seed
    net_seed = cfg.random_seed if cfg.random_seed >= 0 else 0
    train_net = Net.from_prototxt(cfg.net, phase="TRAIN", backend=backend, seed=net_seed)
    test_net = Net.from_prototxt(cfg.net, phase="TEST", backend=train_net.backend, seed=net_seed)
    test_net.share_params_from(train_net)

    if data is None:
        train_arrays, test_arrays = load_digits_split(seed=0)
        source = "scikit-learn digits"
    else:
        train_arrays, test_arrays = load_npz(data), None
        source = os.fspath(data)
    if test_data is not None:
        test_arrays = load_npz(test_data)
    missing = [n for n in train_net.input_names if n not in train_arrays]
    if missing:
        raise GraphError(f"the training data ({source}) lacks {missing}; the net's inputs are "
                         f"{train_net.input_names} (keys of the .npz)")
    train_arrays = {n: train_arrays[n] for n in train_net.input_names}
    batch = train_net.input_shape(train_net.input_names[0])[0]
    feeder = BatchFeeder(train_arrays, batch, seed=net_seed)
    sol = make_solver(train_net, cfg, test_net=test_net)
    if resume:
        sol.restore(resume)
    n_params = sum(int(np.prod(p.data.shape)) for p in train_net.learnable_params)
    n_test = len(next(iter(test_arrays.values()))) if test_arrays else 0
    out(f"training {train_net.name or Path(cfg.net).name} ({n_params} parameters) on {source}: "
        f"{feeder.n} train / {n_test} test samples, batch {batch}, {cfg.type} solver, "
        f"{cfg.max_iter} iterations, backend {train_net.backend}")

    with _cpu_threads(train_net, batch, threads):
        return _train_loop(sol, cfg, feeder, train_net, test_net, test_arrays, n_test, progress, out)


@contextlib.contextmanager
def _cpu_threads(net, batch, n=None):
    """Limit Numba's and the BLAS's thread pools to ``n`` threads for the block.

    ``n=None`` picks: 1 for a small net on a CPU backend, else no limit. A step
    of a small net is microseconds of work per kernel, and each parallel launch
    waits until every pool thread is scheduled: on the digits MLP, 2 busy cores,
    17 ms/step with 2 threads against 0.9 ms/step with 1.
    """
    if net.backend == "cuda":
        yield
        return
    if n is None:
        n_params = sum(int(np.prod(p.data.shape)) for p in net.learnable_params)
        n = 1 if n_params * max(batch, 1) < 50_000_000 else None
    if n is None:
        yield
        return
    import numba
    from threadpoolctl import threadpool_limits   # installed with scikit-learn
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        with threadpool_limits(limits=int(n)):
            yield
    finally:
        numba.set_num_threads(before)


def _train_loop(sol, cfg, feeder, train_net, test_net, test_arrays, n_test, progress, out):
    from tqdm import tqdm

    def postfix(values: dict) -> dict:
        return {k: f"{v:.4f}" for k, v in values.items()}

    start = time.perf_counter()
    bar = tqdm(total=cfg.max_iter, initial=sol.iter, disable=not progress, unit="it", dynamic_ncols=True,
               mininterval=0.2)
    shown: dict = {}
    total = None
    while sol.iter < cfg.max_iter:
        total = sol.step(feeder.batch(sol.iter))
        it = sol.iter
        if cfg.display and (it % cfg.display == 0 or it == cfg.max_iter):
            # Reading the values is the one host synchronisation of a display interval.
            shown = {f"{t.top}(x{t.weight:g})" if t.weight != 1 else t.top: float(t.value)
                     for t in train_net.loss_terms}
            shown["total"] = float(total)
            bar.set_postfix(postfix(shown), refresh=False)
        if cfg.test_interval and test_arrays and it % cfg.test_interval == 0 and it < cfg.max_iter:
            tested = evaluate(test_net, test_arrays)
            shown.update({f"test_{k}": v for k, v in tested.items()})
            bar.set_postfix(postfix(shown), refresh=False)
        if cfg.snapshot and cfg.snapshot_prefix and it % cfg.snapshot == 0:
            sol.snapshot()
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    if cfg.snapshot_after_train and cfg.snapshot_prefix:
        out(f"snapshot: {sol.snapshot()}")
    result = {"iterations": sol.iter, "seconds": seconds, "test": {}}
    if test_arrays:
        result["test"] = tested = evaluate(test_net, test_arrays)
        parts = [f"{k} = {v:.4f}" for k, v in tested.items() if k not in _accuracy_tops(test_net)]
        if parts:
            out("test " + ", ".join(parts))
        accs = [f"{v:.4f}" for k, v in tested.items() if k in _accuracy_tops(test_net)]
        out(f"trained {sol.iter} iterations in {seconds:.1f} s; "
            + (f"test accuracy: {', '.join(accs)} ({n_test} samples)" if accs else "no Accuracy layer to test"))
    else:
        last = "" if total is None else f"; final total loss {float(total):.4f}"
        out(f"trained {sol.iter} iterations in {seconds:.1f} s{last} (no test data)")
    return result


def _accuracy_tops(net) -> set:
    return {t for l in net.layers if l.type == "Accuracy" for t in l.top}


def evaluate(net, arrays: dict) -> dict:
    """Mean of every scalar output blob (tops no layer reads: losses, accuracies) over the whole set,
    in batches of the net's declared batch size, weighted by batch length."""
    names = net.input_names
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(f"test data lacks {missing}; the net's inputs are {names}")
    n = len(arrays[names[0]])
    batch = max(1, net.input_shape(names[0])[0])
    read = {b for l in net.layers for b in l.bottom}
    outputs = [t for l in net.layers for t in l.top if t not in read]
    sums = {}
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        net.forward(**{k: arrays[k][lo:hi] for k in names})
        for t in outputs:
            d = net.blobs[t].data
            if d is not None and d.ndim == 0:
                sums[t] = sums.get(t, 0) + d * (hi - lo)   # stays on the device until read below
    return {t: float(s) / n for t, s in sums.items()}


# -- time ----------------------------------------------------------------------------------------

def _time_cmd(args) -> int:
    try:
        time_net(args.net, iterations=args.iterations, phase=args.phase, batch=args.batch, backend=args.backend,
                 threads=args.threads)
    except _user_errors() as exc:
        print(f"gpuloss time: {exc}", file=sys.stderr)
        return 2
    return 0


def time_net(path, *, iterations=50, phase="TRAIN", batch=None, backend="auto", threads=None,
             out=print) -> list[dict]:
    """Print and return per-layer median forward/backward times (ms), as ``caffe time`` does."""
    from .net import Net
    net = Net.from_prototxt(path, phase=phase, backend=backend)
    inputs = net.example_inputs(batch=batch)
    with _cpu_threads(net, len(next(iter(inputs.values()), [])), threads):
        rows = net.time(iterations=iterations, inputs=inputs)
    width = max([len(r["layer"]) for r in rows] + [5])
    twidth = max([len(r["type"]) for r in rows] + [4])
    out(f"{net.name or Path(os.fspath(path)).name}: {len(rows)} layers, {iterations} iterations, "
        f"backend {net.backend}, medians")
    out(f"{'layer':<{width}}  {'type':<{twidth}}  {'forward ms':>11}  {'backward ms':>11}")
    for r in rows:
        out(f"{r['layer']:<{width}}  {r['type']:<{twidth}}  {r['forward_ms']:>11.4f}  {r['backward_ms']:>11.4f}")
    f = sum(r["forward_ms"] for r in rows)
    b = sum(r["backward_ms"] for r in rows)
    out(f"Forward pass (sum of layer medians): {f:.4f} ms.")
    out(f"Backward pass (sum of layer medians): {b:.4f} ms.")
    out(f"Forward-Backward: {f + b:.4f} ms.")
    return rows
