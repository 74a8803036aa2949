"""How many kernels a loss call launches, and that nothing else runs on the device in between.

docs/design.md §4: cross entropy is at most two launches per call (the
divisor, then the loss kernel whose last block reduces), one when the divisor
is a number of the shape; the same for the element-wise losses and cosine
distance. On a GPU every extra launch is latency (a few microseconds each at
small sizes) and a CuPy helper (fill, cast, reduction) would be one too.

These tests run the real launch code on the emulated backend with two
instruments: every ``_launch`` is recorded, and the backend's array module is
a proxy that records every call made inside the backend method. A second,
identical call (the first may allocate the backend's persistent buffers) must
then use ``xp.empty`` only, and every array a kernel receives must be an input,
a view of this call's ``xp.empty`` allocations or one of the backend's
persistent buffers (the dummies and the ticket counters): a cast or copy made
by an array method (``astype``, ``copy``) would be a fresh array and fail.
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import itertools
import shutil
import textwrap

import numpy as np
import pytest

import gpuloss as gl
from gpuloss.backends import launch

from .conftest import small_split_slices

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulated backend needs g++")

REDUCTIONS = ("none", "mean", "sum", "sum_over_batch_size", "sum_by_nonzero_weights", "batch_size")
# Reductions whose divisor depends on the weights: the one case with a second launch.
WEIGHTED = ("mean", "sum_by_nonzero_weights")


class _RecordingNumpy:
    """numpy, recording the functions called while ``active`` is set."""

    def __init__(self, log: list):
        self._log = log
        self.active = False
        self.__name__ = "numpy"

    def __getattr__(self, name):
        attr = getattr(np, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            if self.active:
                self._log.append((name, args, out))
            return out

        return call


class Recorder:
    def __init__(self, be):
        self.be = be
        self.calls: list = []  # xp calls inside the backend method
        self.launches: list = []  # (kernel name, args)
        self.inputs: list = []


@contextlib.contextmanager
def recording(monkeypatch):
    from gpuloss.backends.emulated_backend import BACKEND as be

    rec = Recorder(be)
    proxy = _RecordingNumpy(rec.calls)
    monkeypatch.setattr(be, "xp", proxy)
    real_launch = be._launch

    def counted(name, blocks, threads, args, **kw):
        rec.launches.append((name, args))
        return real_launch(name, blocks, threads, args, **kw)

    monkeypatch.setattr(be, "_launch", counted)
    for method in ("cross_entropy", "elementwise", "cosine_distance", "weighted_reduce"):
        real = getattr(be, method)

        def wrapped(plan, *arrays, _real=real):
            rec.inputs = [a for a in arrays if isinstance(a, np.ndarray)]
            proxy.active = True
            try:
                return _real(plan, *arrays)
            finally:
                proxy.active = False

        monkeypatch.setattr(be, method, wrapped)
    yield rec


def _persistent(be) -> list:
    return list(be._dummies.values()) + list(be._tickets.values())


def _check_call(rec: Recorder, expected_launches: int, what: str):
    names = [n for n, _ in rec.launches]
    assert len(names) == expected_launches, f"{what}: launches {names}"
    helpers = [name for name, args, out in rec.calls
               if not (name == "empty" or (name == "ascontiguousarray" and out is args[0]))]
    assert not helpers, f"{what}: array-module work beside the launches: {helpers}"
    owned = [out for name, _, out in rec.calls if name == "empty"] + _persistent(rec.be) + rec.inputs
    for name, args in rec.launches:
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray) and a.size:
                assert any(np.shares_memory(a, b) for b in owned), \
                    f"{what}: argument {i} of {name} is an array made outside xp.empty ({a.dtype}, {a.shape})"


def _run_twice(rec: Recorder, fn):
    fn()  # may allocate the backend's persistent buffers (dummies, tickets) and compile
    rec.calls.clear()
    rec.launches.clear()
    return fn()


# ---------------------------------------------------------------------------
# Cross entropy: every reduction, with and without each option.

_OPTIONS = [dict(), dict(return_grad=True, return_z_loss=True, z_loss=1e-3),
            dict(class_weight="random", ignore_index=None, label_smoothing=0.1),
            dict(return_grad=True, class_weight="random", ignore_index=-100, softcap=5.0, weight="rows")]


def _xent_case(shape, axis, target_kind, options, rng):
    logits = rng.standard_normal(shape).astype(np.float32)
    classes = shape[axis]
    lshape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    options = dict(options)
    if target_kind == "prob":
        target = rng.random(shape).astype(np.float32)
    else:
        target = rng.integers(0, classes, lshape).astype(np.int64 if target_kind == "int64" else np.int32)
        if target.size > 1 and options.get("ignore_index", -100) is not None:
            target.reshape(-1)[1] = -100
    if options.get("class_weight") == "random":
        options["class_weight"] = rng.uniform(0.5, 2.0, classes).astype(np.float32)
    if options.get("weight") == "rows":
        options["weight"] = rng.random(lshape[:1]).astype(np.float32)
    return logits, target, options


# (shape, axis, split thresholds lowered by conftest.small_split_slices) for each launch variant. The
# split ones: 2 rows of 2 slices (1024 and 976 classes), 4 blocks a launch (the emulator's cost);
# at the real thresholds (slices of >= 4096 classes, 9 and 12 blocks) in the slow pass, for one
# target kind (test_empty_batches_and_all_ignored_rows_launch_no_more counts them there too).
_XENT_SHAPES = {"warp": ((5, 40), -1, False), "block": ((3, 1500), -1, False), "strided": ((2, 5, 3), 1, False),
                "split": ((2, 2000), -1, True), "split-strided": ((1, 2000, 2), 1, True)}
_XENT_CASES = [pytest.param(*_XENT_SHAPES[name], kind, id=f"{kind}-{name}")
               for kind in ("int64", "int32", "prob") for name in _XENT_SHAPES]
_XENT_CASES += [pytest.param((3, 9000), -1, False, "int64", id="int64-split-4096", marks=pytest.mark.slow),
                pytest.param((2, 8200, 2), 1, False, "int64", id="int64-split-strided-4096",
                             marks=pytest.mark.slow)]


@needs_gxx
@pytest.mark.parametrize("shape,axis,small_slices,target_kind", _XENT_CASES)
def test_cross_entropy_is_at_most_two_launches(shape, axis, small_slices, target_kind, monkeypatch, rng):
    if small_slices:
        small_split_slices(monkeypatch)
    classes = shape[axis]
    rows = int(np.prod(shape)) // classes
    split = launch.xent_launch(rows, classes, 1)[0] == "split"  # statistics, then gradient: always two
    assert split == (small_slices or classes > 4096)  # each case takes the variant it is named for
    with recording(monkeypatch) as rec:
        for reduction, options in itertools.product(REDUCTIONS, _OPTIONS):
            logits, target, kw = _xent_case(shape, axis, target_kind, options, rng)
            kw.update(reduction=reduction, axis=axis, validate=False, backend="emulated")
            out = _run_twice(rec, lambda: gl.softmax_cross_entropy(logits, target, **kw))
            _check_call(rec, 2 if split or reduction in WEIGHTED else 1, f"{reduction} {options}")
            # and the answer is the cpu backend's
            ref = gl.softmax_cross_entropy(logits, target, **{**kw, "backend": "cpu"})
            for got, want in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@needs_gxx
def test_empty_batches_and_all_ignored_rows_launch_no_more(monkeypatch):
    with recording(monkeypatch) as rec:
        for reduction in REDUCTIONS:
            logits = np.zeros((0, 7), np.float32)
            _run_twice(rec, lambda: gl.softmax_cross_entropy(logits, np.zeros(0, np.int64), reduction=reduction,
                                                             return_grad=True, backend="emulated"))
            _check_call(rec, 1, f"N = 0, {reduction}")
            for classes in (7, 9000):  # the warp and the split variant
                logits = np.ones((4, classes), np.float32)
                loss, grad = _run_twice(rec, lambda: gl.softmax_cross_entropy(
                    logits, np.full(4, -100), reduction=reduction, return_grad=True, backend="emulated"))
                _check_call(rec, 2 if classes > 1024 or reduction in WEIGHTED else 1, f"all ignored, {reduction}")
                assert not np.any(loss) and not grad.any()


# ---------------------------------------------------------------------------
# The element-wise losses, weighted_reduce and cosine distance: the same structure.

@needs_gxx
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_elementwise_and_cosine_are_at_most_two_launches(reduction, monkeypatch, rng):
    x = rng.standard_normal((6, 70)).astype(np.float32)
    t = rng.standard_normal((6, 70)).astype(np.float32)
    w = rng.random((6, 1)).astype(np.float32)
    expected = 2 if reduction in WEIGHTED else 1
    calls = {
        "huber": lambda: gl.huber(x, t, weight=w, reduction=reduction, return_grad=True, backend="emulated"),
        "sigmoid": lambda: gl.sigmoid_cross_entropy(x, (t > 0).astype(np.float32), reduction=reduction,
                                                    pos_weight=np.full(70, 2.0, np.float32), backend="emulated"),
        "weighted_reduce": lambda: gl.weighted_reduce(x, w, reduction=reduction, backend="emulated"),
        "cosine": lambda: gl.cosine_distance(x, t, weight=w, reduction=reduction, return_grad=True,
                                             backend="emulated"),
    }
    with recording(monkeypatch) as rec:
        for name, fn in calls.items():
            got = _run_twice(rec, fn)
            _check_call(rec, expected, f"{name} {reduction}")
            want = {"huber": lambda: gl.huber(x, t, weight=w, reduction=reduction, return_grad=True),
                    "sigmoid": lambda: gl.sigmoid_cross_entropy(x, (t > 0).astype(np.float32), reduction=reduction,
                                                                pos_weight=np.full(70, 2.0, np.float32)),
                    "weighted_reduce": lambda: gl.weighted_reduce(x, w, reduction=reduction),
                    "cosine": lambda: gl.cosine_distance(x, t, weight=w, reduction=reduction, return_grad=True),
                    }[name]()
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# The ticket counters: allocated once per stream, left at 0 by every launch.

@needs_gxx
def test_ticket_counters_are_allocated_once_and_left_at_zero(rng):
    from gpuloss.backends.emulated_backend import BACKEND as be

    x = rng.standard_normal((9, 1100)).astype(np.float32)
    y = rng.integers(0, 1100, 9)
    gl.softmax_cross_entropy(x, y, return_grad=True, backend="emulated")
    tickets = dict(be._tickets)
    assert len(tickets) == 1
    (t,) = tickets.values()
    assert t.dtype == np.uint32 and t.size == launch.TICKET_SLOTS and not t.any()
    first = gl.softmax_cross_entropy(x, y, return_grad=True, backend="emulated")
    again = gl.softmax_cross_entropy(x, y, return_grad=True, backend="emulated")
    assert be._tickets == tickets and be._tickets[()] is t and not t.any()
    assert first[0].tobytes() == again[0].tobytes() and first[1].tobytes() == again[1].tobytes()


# ---------------------------------------------------------------------------
# No host synchronisation: the launch code never reads a device value back.

_SYNCING = {"item", "get", "tolist", "asnumpy", "synchronize", "__float__", "__int__", "__bool__"}


def test_launch_code_reads_nothing_back_from_the_device():
    tree = ast.parse(textwrap.dedent(inspect.getsource(launch)))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _SYNCING:
            if node.func.attr != "get" or not node.args:  # dict.get(key) is not cupy's ndarray.get()
                bad.append(f"line {node.lineno}: .{node.func.attr}()")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("float", "int", "bool"):
            # float(...) / int(...) of a plain number is fine; of an array it would synchronise
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Subscript) or (isinstance(arg, ast.Name) and arg.id in ("scal", "out", "w")):
                bad.append(f"line {node.lineno}: {node.func.id}() of an array")
    assert not bad, bad


def test_each_stream_has_its_own_ticket_counters():
    """On CuPy the counters are keyed by (device, stream): two streams may run kernels at once and
    must not draw tickets from one counter; the per-thread default stream is one stream per thread."""
    import threading
    import types

    current = {"stream": 7, "device": 0}
    cuda = types.SimpleNamespace(
        get_current_stream=lambda: types.SimpleNamespace(ptr=current["stream"]),
        runtime=types.SimpleNamespace(getDevice=lambda: current["device"]))
    fake_xp = types.SimpleNamespace(cuda=cuda, zeros=np.zeros, __name__="fakecupy")
    be = launch.LaunchBackend("fake", fake_xp, loader=lambda: None)

    def counters():
        return be._ticket(launch.TICKET_LOSS).base

    a = counters()
    assert counters() is a and a.dtype == np.uint32 and not a.any()  # allocated once, zeroed once
    current["stream"] = 8
    b = counters()
    assert b is not a
    current["device"] = 1
    assert counters() is not b
    current.update(stream=2, device=0)  # cudaStreamPerThread: a different stream in every host thread
    mine = counters()
    other = []
    t = threading.Thread(target=lambda: other.append(counters()))
    t.start()
    t.join()
    assert other[0] is not mine and counters() is mine
