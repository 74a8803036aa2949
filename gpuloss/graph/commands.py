"""``gpuloss train`` and ``gpuloss time`` (docs/graph.md §8), registered by ``register(subparsers)``."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["register", "train", "time_net", "DEFAULT_NET", "DEFAULT_SOLVER"]

_HERE = Path(__file__).resolve().parent
DEFAULT_NET = _HERE / "default_net.prototxt"
DEFAULT_SOLVER = _HERE / "default_solver.prototxt"


def register(subparsers) -> None:
    from gpuloss.cli import backend_arg, existing_file, non_negative_int, npz_file, positive_int

    p = subparsers.add_parser(
        "train", help="train a net (by default an MLP on scikit-learn's digits)",
        description="Train a Caffe-style net. With no NET: the packaged default net and solver on "
                    "scikit-learn's digits, a classification loss plus a 0.3-weighted reconstruction loss. "
                    "Snapshots are written atomically (a kill leaves the previous whole file); "
                    "--resume checks a snapshot completely before loading it.")
    p.add_argument("net", nargs="?", type=existing_file("net prototxt"),
                   help="net prototxt file (default: the solver's net, else the packaged digits MLP)")
    p.add_argument("--solver", type=existing_file("solver prototxt"),
                   help="solver prototxt file (default: the packaged default_solver.prototxt)")
    p.add_argument("--data", type=npz_file("file"),
                   help=".npz of training inputs, keyed by input blob name (default: digits)")
    p.add_argument("--test-data", type=npz_file("file"),
                   help=".npz of test inputs (default: the digits test split when --data is unset)")
    p.add_argument("--max-iter", type=non_negative_int, help="override the solver's max_iter")
    p.add_argument("--backend", default="auto", type=backend_arg,
                   help="auto | cpu | cuda | emulated (default: auto)")
    p.add_argument("--resume", type=existing_file("snapshot"), help="snapshot .npz to continue from")
    p.add_argument("--snapshot-prefix", help="override the solver's snapshot_prefix")
    p.add_argument("--seed", type=non_negative_int, help="override the solver's random_seed")
    p.add_argument("--threads", type=positive_int, help="CPU threads for the cpu backend's kernels and BLAS "
                   "(default: 1 for small nets, where waking threads costs more than the work; else all)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: display and test results are printed as plain lines")
    p.add_argument("--dist-timeout", type=positive_int, default=300, metavar="SECONDS",
                   help="under torchrun (data-parallel): seconds a collective may wait for the other ranks "
                        "before the run stops with an error (default 300)")
    p.set_defaults(func=_train_cmd)

    t = subparsers.add_parser("time", help="per-layer forward/backward times, like `caffe time`",
                              description="Median per-layer forward and backward times of NET on random "
                                          "inputs of its declared shapes (labels in range). With no NET: "
                                          "the packaged default net that `gpuloss train` trains.")
    t.add_argument("net", nargs="?", type=existing_file("net prototxt"),
                   help="net prototxt file (default: the packaged digits MLP)")
    t.add_argument("--iterations", type=positive_int, default=50, help="timed iterations (default 50)")
    t.add_argument("--phase", default="TRAIN", choices=("TRAIN", "TEST"))
    t.add_argument("--batch", type=positive_int, help="batch size (default: the declared input shapes')")
    t.add_argument("--backend", default="auto", type=backend_arg,
                   help="auto | cpu | cuda | emulated (default: auto)")
    t.add_argument("--threads", type=positive_int, help="CPU threads (default: 1 for small nets, else all)")
    t.set_defaults(func=_time_cmd)


# -- train ---------------------------------------------------------------------------------------

def _user_errors():
    """The errors a user's prototxt, solver or data can cause: reported in one line, no traceback."""
    from .layer import GraphError
    from .proto import PrototxtError
    return (GraphError, PrototxtError, OSError, MemoryError)


def _one_line(command: str, exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        text = f"out of memory{': ' + str(exc) if str(exc) else ''}"
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = str(exc)
    return f"gpuloss {command}: " + _cli_text(text)


def _cli_text(text: str) -> str:
    # The functional API (and Net) suggest an argument the command line cannot pass.
    text = re.sub(r";?\s*(?:pass|build the Net with) validate=False[^;]*",
                  "; fix the data: the command line always checks labels", text)
    return " ".join(text.split())


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the snapshot being written is cleaned up."""


@contextlib.contextmanager
def _terminate_as_exception():
    def handler(signum, frame):
        raise _Terminated()
    try:
        before = signal.signal(signal.SIGTERM, handler)
    except ValueError:   # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _train_cmd(args) -> int:
    status: dict = {}
    try:
        with _terminate_as_exception():
            train(net=args.net, solver=args.solver, data=args.data, test_data=args.test_data,
                  max_iter=args.max_iter, backend=args.backend, resume=args.resume,
                  snapshot_prefix=args.snapshot_prefix, seed=args.seed, progress=not args.no_progress,
                  threads=args.threads, dist_timeout=args.dist_timeout, _status=status)
    except _user_errors() as exc:
        print(_with_rank(_one_line("train", exc)), file=sys.stderr)
        return 2
    except _distributed_failure() as exc:
        where = f" at iteration {status['iter']}" if "iter" in status else ""
        print(f"gpuloss train: stopped{where}: {_cli_text(str(exc))}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated) as exc:
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated"
        where = f" at iteration {status['iter']}" if "iter" in status else ""
        snap = f"; newest snapshot: {status['snapshot']}" if status.get("snapshot") else "; no snapshot written"
        print(f"gpuloss train: {what}{where}{snap}", file=sys.stderr)
        return 130 if what == "interrupted" else 128 + signal.SIGTERM
    return 0


def _with_rank(line: str) -> str:
    """``gpuloss train: rank R of W: ...`` when this process is one of several ranks (their lines interleave)."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK")
    if rank is None or not world.isdigit() or int(world) <= 1:
        return line
    head, sep, rest = line.partition(": ")
    return f"{head}{sep}rank {rank} of {world}: {rest}"


def _distributed_failure():
    from .distributed import DistributedFailure
    return (DistributedFailure,)


def _load_config(solver, net):
    from .solver import SolverConfig
    cfg = SolverConfig.from_prototxt(Path(solver) if solver is not None else DEFAULT_SOLVER)
    if net is not None:
        cfg.net = os.fspath(net)
    elif solver is None or not cfg.net:
        cfg.net = os.fspath(DEFAULT_NET)
    return cfg


def _check_arrays(arrays: dict, net, source: str) -> dict:
    """The net's inputs from ``arrays``: each present, real-valued, shaped as declared past the batch axis,
    all of one non-zero length. Checked before the first iteration, not found at the thousandth."""
    from .layer import GraphError
    missing = [n for n in net.input_names if n not in arrays]
    if missing:
        raise GraphError(f"the {source} lacks {missing}; the net's inputs are {net.input_names} "
                         f"(keys of the .npz)")
    out = {}
    for name in net.input_names:
        a = arrays[name]
        declared = net.input_shape(name)
        if a.dtype.kind not in "biuf":
            raise GraphError(f"the {source}: array {name!r} has dtype {a.dtype}; inputs must be real numbers")
        if a.ndim != len(declared) or tuple(a.shape[1:]) != tuple(declared[1:]):
            raise GraphError(f"the {source}: array {name!r} has shape {a.shape}; the net declares {declared} "
                             f"(any number of samples, the other dimensions as declared)")
        out[name] = a
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise GraphError(f"the {source}: arrays must hold the same number of samples, got {lengths}")
    if next(iter(lengths.values()), 0) == 0:
        raise GraphError(f"the {source} holds no samples")
    return out


def _check_snapshot_folder(prefix: str) -> None:
    """Create the snapshot folder and prove it takes a file, before the first iteration: a bad
    snapshot_prefix must not be found when the run's final snapshot fails."""
    from .layer import GraphError
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".gpuloss-write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise GraphError(f"snapshot_prefix {prefix!r}: cannot write snapshots in {directory!r} "
                         f"({exc.strerror or exc})") from None


def train(net=None, solver=None, data=None, test_data=None, *, max_iter=None, backend="auto", resume=None,
          snapshot_prefix=None, seed=None, progress=True, threads=None, out=print, dist_timeout=300.0,
          _status=None) -> dict:
    """Train as ``gpuloss train`` does; returns ``{"iterations", "seconds", "test": {top: mean}}``.

    ``net``, ``solver``, ``data``, ``test_data`` and ``resume`` are paths (never
    prototxt text). Everything that can be checked is checked before the first
    iteration: the solver, the net, the data's keys and shapes, the snapshot to
    resume from, and that the snapshot folder can be written.

    Started as one of several ranks (torchrun: ``WORLD_SIZE`` > 1) it trains
    data-parallel (gpuloss/graph/distributed.py): the first line says so, each
    rank reads its share of every batch, gradients are averaged after backward,
    only rank 0 prints and writes snapshots.
    """
    from .data import BatchFeeder, load_digits_split, load_npz
    from .layer import GraphError
    from .net import Net
    from .solver import make_solver

    from . import distributed
    status = {} if _status is None else _status
    dp = None
    if distributed.launched():
        if backend in ("cuda", "auto") and _cuda_answers(backend):
            distributed.select_local_device()
    cfg = _load_config(solver, net)
    overrides = {k: v for k, v in (("max_iter", max_iter), ("snapshot_prefix", snapshot_prefix),
                                   ("random_seed", seed)) if v is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)   # checked again, as a file's values are
    if cfg.snapshot and not cfg.snapshot_prefix:
        raise GraphError(f"the solver asks for a snapshot every {cfg.snapshot} iterations but gives no "
                         f"snapshot_prefix (set one in the solver or pass --snapshot-prefix)")
    net_seed = cfg.random_seed if cfg.random_seed >= 0 else 0
    net_path = Path(cfg.net)   # a path, never prototxt text
    train_net = Net.from_prototxt(net_path, phase="TRAIN", backend=backend, seed=net_seed)
    test_net = Net.from_prototxt(net_path, phase="TEST", backend=train_net.backend, seed=net_seed)
    test_net.share_params_from(train_net)
    if distributed.launched():
        dp = distributed.DataParallel(train_net.backend, timeout_s=float(dist_timeout))
        if not dp.is_main:   # only rank 0 prints the progress and the results
            out, progress = (lambda *a, **k: None), False
        out(dp.describe())
    if not train_net.input_names:
        raise GraphError(f"{net_path}: the net has no inputs to feed data to")

    if data is None:
        train_arrays, test_arrays = load_digits_split(seed=0)
        source = "scikit-learn digits"
    else:
        train_arrays, test_arrays = load_npz(data), None
        source = os.fspath(data)
    if test_data is not None:
        test_arrays = load_npz(test_data)
    train_arrays = _check_arrays(train_arrays, train_net, f"training data ({source})")
    if test_arrays:
        test_arrays = _check_arrays(test_arrays, test_net, "test data"
                                    + (f" ({os.fspath(test_data)})" if test_data is not None else ""))
    batch = train_net.input_shape(train_net.input_names[0])[0] if train_net.input_shape(
        train_net.input_names[0]) else 0
    if batch < 1:
        raise GraphError(f"{net_path}: input {train_net.input_names[0]!r} declares batch size {batch}; "
                         f"training needs >= 1")
    if dp is not None:
        dp.check_batch(batch)
    feeder = BatchFeeder(train_arrays, batch, seed=net_seed)   # global batches: the same on every rank
    sol = make_solver(train_net, cfg, test_net=test_net)
    if resume:
        sol.restore(resume)   # checks the whole file first; a bad one changes nothing
    if dp is not None:
        dp.broadcast_params(train_net.learnable_params)
        sol.grad_hook = lambda: dp.average_gradients(sol.params)
    if cfg.snapshot_prefix and (cfg.snapshot or cfg.snapshot_after_train) and (dp is None or dp.is_main):
        _check_snapshot_folder(cfg.snapshot_prefix)
    n_params = sum(int(np.prod(p.data.shape)) for p in train_net.learnable_params)
    n_test = len(next(iter(test_arrays.values()))) if test_arrays else 0
    out(f"training {train_net.name or net_path.name} ({n_params} parameters) on {source}: "
        f"{feeder.n} train / {n_test} test samples, batch {batch}"
        f"{f' ({batch // dp.world} per rank)' if dp is not None else ''}, {cfg.type} solver, "
        f"{cfg.max_iter} iterations, backend {train_net.backend}")
    if resume:
        out(f"resuming from {os.fspath(resume)} at iteration {sol.iter}")
        status["snapshot"] = os.fspath(resume)
    status["iter"] = sol.iter

    try:
        with _cpu_threads(train_net, batch, threads):
            return _train_loop(sol, cfg, feeder, train_net, test_net, test_arrays, n_test, progress, out, status,
                               dp)
    finally:
        if dp is not None:
            dp.close()


def _cuda_answers(backend: str) -> bool:
    from gpuloss.backends import cuda_unavailable_reason
    return backend == "cuda" or cuda_unavailable_reason() is None


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

    from .layer import GraphError
    most = numba.config.NUMBA_NUM_THREADS
    if not 1 <= int(n) <= most:   # refused, not clamped: the user asked for something else
        raise GraphError(f"threads must be in [1, {most}] (NUMBA_NUM_THREADS), got {n}")
    before = numba.get_num_threads()
    numba.set_num_threads(int(n))
    try:
        with threadpool_limits(limits=int(n)):
            yield
    finally:
        numba.set_num_threads(before)


def _train_loop(sol, cfg, feeder, train_net, test_net, test_arrays, n_test, progress, out, status, dp=None):
    from tqdm import tqdm

    def postfix(values: dict) -> dict:
        return {k: f"{v:.4f}" for k, v in values.items()}

    def line(it: int, values: dict) -> str:
        return f"iteration {it}: " + ", ".join(f"{k} = {v:.4f}" for k, v in values.items())

    start = time.perf_counter()
    bar = tqdm(total=cfg.max_iter, initial=sol.iter, disable=not progress, unit="it", dynamic_ncols=True,
               mininterval=0.2)
    shown: dict = {}
    total = None
    while sol.iter < cfg.max_iter:
        inputs = feeder.batch(sol.iter)
        total = sol.step(inputs) if dp is None else dp.step(sol, dp.shard(inputs))
        it = status["iter"] = sol.iter
        if cfg.display and (it % cfg.display == 0 or it == cfg.max_iter):
            # Reading the values is the one host synchronisation of a display interval.
            shown = {f"{t.top}(x{t.weight:g})" if t.weight != 1 else t.top: float(t.value)
                     for t in train_net.loss_terms}
            shown["total"] = float(total)
            if dp is not None:   # each rank's values are means over its share: their mean is the batch's
                shown = dp.mean(shown)
            bar.set_postfix(postfix(shown), refresh=False)
            if not progress:
                out(line(it, shown))
        if cfg.test_interval and test_arrays and it % cfg.test_interval == 0 and it < cfg.max_iter:
            tested = {f"test_{k}": v for k, v in _evaluate(test_net, test_arrays, dp).items()}
            shown.update(tested)
            bar.set_postfix(postfix(shown), refresh=False)
            if not progress:
                out(line(it, tested))
        if cfg.snapshot and cfg.snapshot_prefix and it % cfg.snapshot == 0 and (dp is None or dp.is_main):
            status["snapshot"] = sol.snapshot()
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    if cfg.snapshot_after_train and cfg.snapshot_prefix and (dp is None or dp.is_main):
        status["snapshot"] = sol.snapshot()
        out(f"snapshot: {status['snapshot']}")
    result = {"iterations": sol.iter, "seconds": seconds, "test": {}}
    if test_arrays:
        result["test"] = tested = _evaluate(test_net, test_arrays, dp)
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


def _evaluate(net, arrays: dict, dp) -> dict:
    return evaluate(net, arrays) if dp is None else dp.evaluate(net, arrays, evaluate)


def _accuracy_tops(net) -> set:
    return {t for l in net.layers if l.type == "Accuracy" for t in l.top}


def evaluate(net, arrays: dict) -> dict:
    """Mean of every scalar output blob (tops no layer reads: losses, accuracies) over the whole set,
    in batches of the net's declared batch size, weighted by batch length."""
    from .layer import GraphError
    names = net.input_names
    missing = [n for n in names if n not in arrays]
    if missing:
        raise GraphError(f"test data lacks {missing}; the net's inputs are {names}")
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
        print(_one_line("time", exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpuloss time: interrupted", file=sys.stderr)
        return 130
    return 0


def time_net(path=None, *, iterations=50, phase="TRAIN", batch=None, backend="auto", threads=None,
             out=print) -> list[dict]:
    """Print and return per-layer median forward/backward times (ms), as ``caffe time`` does.
    ``path`` is a net prototxt file (default: the packaged net ``gpuloss train`` trains)."""
    from .layer import GraphError
    from .net import Net
    if iterations < 1:
        raise GraphError(f"iterations must be >= 1, got {iterations}")
    if batch is not None and batch < 1:
        raise GraphError(f"batch must be >= 1, got {batch}")
    path = Path(DEFAULT_NET if path is None else path)   # a path, never prototxt text
    net = Net.from_prototxt(path, phase=phase, backend=backend)
    inputs = net.example_inputs(batch=batch)
    with _cpu_threads(net, len(next(iter(inputs.values()), [])), threads):
        rows = net.time(iterations=iterations, inputs=inputs)
    width = max([len(r["layer"]) for r in rows] + [5])
    twidth = max([len(r["type"]) for r in rows] + [4])
    out(f"{net.name or path.name}: {len(rows)} layers, {iterations} iterations, "
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
