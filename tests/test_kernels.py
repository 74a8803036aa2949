"""The loss kernels of kernels/*.cu through the launch code they share with the cuda backend.

The generic suites (test_losses.py, ...) already run every loss on the
"emulated" backend; this file covers what they cannot see: that each launch
variant (rows per warp, one row per block, class-strided) is taken and
correct, the vector-load path at every alignment, bitwise determinism of the
emulated results, invalid targets under AddressSanitizer, every kernel family
under ThreadSanitizer, and bench/gpu_suite.py --dry-run. Emulated threads are
OS threads: sizes are chosen so each test takes seconds.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpuloss as gl
from gpuloss import reference
from gpuloss.backends import launch

from .cases import make_inputs
from .conftest import assert_matches_reference, run_loss, small_split_slices

ROOT = Path(__file__).resolve().parent.parent
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulated backend needs g++")
EMU = "emulated"


# ---------------------------------------------------------------------------
# Launch geometry (pure Python: runs everywhere).

@pytest.mark.parametrize("classes,variant", [(1, "warp"), (3, "warp"), (31, "warp"), (1000, "warp"),
                                             (1024, "warp"), (1025, "block"), (32003, "block")])
def test_cross_entropy_variant_follows_the_class_count(classes, variant):
    rows = launch.SPLIT_MAX_ROWS  # enough rows that none is split over blocks
    got, blocks, threads, group = launch.xent_launch(rows, classes, 1)
    assert got == variant
    assert threads % 32 == 0 and 32 <= threads <= 1024 and blocks >= 1
    if variant == "warp":
        assert group in (1, 2, 4, 8, 16, 32)
        assert blocks * threads // 32 * (32 // group) >= rows  # every row has lanes
    else:
        assert threads & (threads - 1) == 0  # power of two: block reductions assume whole warps


def test_float64_rows_fit_the_register_file():
    # ~94 registers a thread: 1024 of them would not fit an SM's 64K registers
    assert launch.xent_launch(2, 262144, 1, 8)[2] <= 512


def test_class_axis_not_last_takes_the_strided_variant():
    assert launch.xent_launch(12, 5, 4)[0] == "strided"


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 100, 263])
@pytest.mark.parametrize("classes", [1025, 4097, 8193, 32003, 131072, 262144])
def test_few_long_rows_are_split_by_the_shape_alone(rows, classes):
    variant, blocks, threads, splits = launch.xent_launch(rows, classes, 1)
    n, slice_len = launch.xent_split(rows, classes)
    if variant == "block":  # too short to cut into two slices of SPLIT_MIN_SLICE
        assert n == 1 and min(-(-classes // launch.SPLIT_MIN_SLICE), -(-launch.SPLIT_MAX_ROWS // rows)) < 2
        return
    assert variant == "split" and splits == n >= 2 and blocks == rows * n
    assert slice_len % launch.SPLIT_ALIGN == 0 and slice_len >= launch.SPLIT_MIN_SLICE // 2
    assert (n - 1) * slice_len < classes <= n * slice_len  # every slice has classes, together all of them
    assert blocks <= 2 * launch.SPLIT_MAX_ROWS and threads & (threads - 1) == 0 and 128 <= threads <= 512
    assert launch.xent_launch(rows, classes, 5) == (variant, blocks, threads, splits)  # any class axis
    assert launch.xent_launch(launch.SPLIT_MAX_ROWS, classes, 1)[0] == "block"


@pytest.mark.parametrize("n", [0, 1, 31, 4096, 4097, 10**6, 2**26, 2**34])
def test_grid_covers_small_passes_in_one_sweep_without_idle_warps(n):
    # grid_1d clamps to [1, MAX_BLOCKS] x [32, MAX_THREADS] by construction; what can
    # go wrong is the sizing: one pass must cover n unless the grid is already at
    # its maximum, and no whole warp or block may be left without an item.
    items = launch.ITEMS_PER_THREAD
    blocks, threads = launch.grid_1d(n)
    assert threads % 32 == 0
    full = blocks == launch.MAX_BLOCKS and threads == launch.MAX_THREADS
    assert blocks * threads * items >= n or full, (blocks, threads)
    if n and not full:
        assert (threads - 32) * items < n and (blocks - 1) * threads * items < n, (blocks, threads)


# ---------------------------------------------------------------------------
# Each cross-entropy path against the float64 reference.

def _index_case(rows, classes, dtype, rng, **options):
    logits = (rng.standard_normal((rows, classes)) * 3).astype(dtype)
    y = rng.integers(0, classes, rows)
    if rows > 2:
        y[1] = -100
    return (logits, y), options


@needs_gxx
@pytest.mark.parametrize("rows,classes", [(5, 1), (9, 3), (33, 31), (6, 1000), (3, 32003)])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2, "class_weight": "random"}],
                         ids=["plain", "smooth+cw"])
def test_cross_entropy_paths_match_reference(rows, classes, options, rng):
    options = dict(options)
    if options.get("class_weight") == "random":
        options["class_weight"] = rng.uniform(0.2, 2.0, classes)
    args, _ = _index_case(rows, classes, np.float32, rng)
    for reduction in ("none", "mean"):
        assert_matches_reference("softmax_cross_entropy", args, {**options, "reduction": reduction}, EMU)


# Few rows, many classes: the split variant (two launches, slices combined by softmax_combine).
_SPLIT_OPTIONS = {
    "plain": {},
    "every-option": {"label_smoothing": 0.1, "class_weight": "random", "z_loss": 1e-3, "softcap": 30.0,
                     "weight": "rows"},
    "no-ignore": {"ignore_index": None, "class_weight": "random"},
    "prob": {"prob": True, "label_smoothing": 0.1, "class_weight": "random", "z_loss": 1e-3, "weight": "rows"},
}


def _split_case(rows, classes, options, rng, dtype=np.float32):
    options = dict(options)
    logits = (rng.standard_normal((rows, classes)) * 3).astype(dtype)
    if options.pop("prob", False):
        target = rng.random((rows, classes)).astype(dtype)
        target /= target.sum(axis=1, keepdims=True)
    else:
        target = rng.integers(0, classes, rows)
        if rows > 2 and options.get("ignore_index", -100) is not None:
            target[1] = -100
    if options.get("class_weight") == "random":
        options["class_weight"] = rng.uniform(0.2, 2.0, classes)
    if options.get("weight") == "rows":
        options["weight"] = rng.random(rows)
    return (logits, target), options


# C = 5003 at test thresholds (conftest.small_split_slices): 5 slices of 1024 (the last 907, rows
# after the first misaligned: C is odd), 3 of 1728 for 7 rows (the row cap), 5 to 21 blocks. The
# real sizes (8 to 32 slices a row, up to 224 blocks: minutes on the emulator) run in the slow pass.
SMALL_SPLIT_CLASSES = 5003


@needs_gxx
@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("classes", [1000, pytest.param(SMALL_SPLIT_CLASSES, id="5003-small-slices"),
                                     pytest.param(32003, marks=pytest.mark.slow),
                                     pytest.param(131072, marks=pytest.mark.slow)])
@pytest.mark.parametrize("option", list(_SPLIT_OPTIONS))
def test_few_rows_many_classes_match_reference(rows, classes, option, rng, monkeypatch):
    if classes == SMALL_SPLIT_CLASSES:
        small_split_slices(monkeypatch)
        assert launch.xent_split(rows, classes) == ((3, 1728) if rows == 7 else (5, 1024))
    args, options = _split_case(rows, classes, _SPLIT_OPTIONS[option], rng)
    assert launch.xent_launch(rows, classes, 1)[0] == ("warp" if classes <= 1024 else "split")
    for reduction in ("none", "mean"):
        assert_matches_reference("softmax_cross_entropy", args, {**options, "reduction": reduction}, EMU)


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float64, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", ["sum", "sum_over_batch_size", "sum_by_nonzero_weights", "batch_size"])
def test_split_rows_every_reduction_and_dtype(dtype, reduction, rng):
    for option in ("every-option", "prob"):
        args, options = _split_case(3, 9000, _SPLIT_OPTIONS[option], rng, dtype)
        assert_matches_reference("softmax_cross_entropy", args, {**options, "reduction": reduction}, EMU)


@needs_gxx
def test_split_rows_extreme_values(rng):
    # |x| = 1e4, a row of -inf, a NaN, a +inf, each in another slice than the target
    x = (rng.standard_normal((5, 9000)) * 1e4).astype(np.float32)
    x[1] = -np.inf
    x[2, 7000] = np.nan
    x[3, 8999] = np.inf
    y = np.array([4500, 2, 0, 100, 8998])
    x[4] = -1e4
    x[4, 8998] = 1e4  # a confident row: its tiny loss must keep its digits
    for options in ({}, {"label_smoothing": 0.2, "class_weight": rng.uniform(0.5, 2, 9000)}):
        for reduction in ("none", "sum"):
            loss, grad = assert_matches_reference("softmax_cross_entropy", (x, y),
                                                  {**options, "reduction": reduction}, EMU)
        assert np.isnan(loss) and np.isnan(grad[1:4]).all() and np.isfinite(grad[[0, 4]]).all()


@needs_gxx
def test_split_rows_all_ignored_and_invalid(rng):
    x = rng.standard_normal((3, 9000)).astype(np.float32)
    for reduction in ("mean", "sum_by_nonzero_weights", "sum", "none"):
        loss, grad = gl.softmax_cross_entropy(x, np.full(3, -100), reduction=reduction, return_grad=True,
                                              backend=EMU)
        assert not np.any(loss) and not grad.any()
    loss, grad = gl.softmax_cross_entropy(x, np.array([5, 9000, -100]), reduction="none", return_grad=True,
                                          validate=False, backend=EMU)
    assert np.isfinite(loss[0]) and np.isnan(loss[1]) and loss[2] == 0
    assert np.isfinite(grad[0]).all() and np.isnan(grad[1]).all() and not grad[2].any()


@pytest.mark.parametrize("classes,itemsize,cached", [(1025, 4, True), (12284, 4, True), (12285, 4, False),
                                                     (24568, 2, True), (6142, 8, True), (6143, 8, False)])
def test_rows_that_fit_are_kept_in_shared_memory(classes, itemsize, cached):
    got = launch.row_cache_bytes(classes, 1, itemsize)
    assert (got > 0) == cached and got <= 48 * 1024
    assert launch.row_cache_bytes(classes, 3, itemsize) == 0  # class axis not last: strided rows


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, "bfloat16"], ids=str)
@pytest.mark.parametrize("classes", [1025, 3001, 6142])
def test_shared_memory_rows_match_reference(dtype, classes, rng):
    # one row per block, the row kept in shared memory between the passes (when it fits), at
    # every alignment: the cached copy keeps the row's offset from a 16-byte boundary
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    cached = launch.row_cache_bytes(classes, 1, np.dtype(dtype).itemsize) > 0
    assert launch.xent_launch(300, classes, 1)[0] == "block" and (cached or np.dtype(dtype).itemsize == 8)
    rows = 4
    for offset in (0, 1, 3):
        logits = _offset_view((rng.standard_normal((rows, classes)) * 3).astype(dtype), offset)
        y = rng.integers(0, classes, rows)
        y[1] = -100
        options = {"label_smoothing": 0.1, "class_weight": rng.uniform(0.5, 2, classes), "z_loss": 1e-3,
                   "softcap": 20.0} if offset == 1 else {}
        assert_matches_reference("softmax_cross_entropy", (logits, y), {**options, "reduction": "none"}, EMU)
        probs = rng.random((rows, classes)).astype(dtype)
        assert_matches_reference("softmax_cross_entropy", (logits, probs), {"reduction": "mean"}, EMU)


@needs_gxx
@pytest.mark.parametrize("classes", [7, 1000, 4099])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=lambda d: np.dtype(d).name)
def test_probability_targets_on_every_path(classes, dtype, rng):
    logits = (rng.standard_normal((3, classes)) * 2).astype(dtype)
    t = rng.random((3, classes))
    t /= t.sum(-1, keepdims=True)
    kwargs = {"label_smoothing": 0.1, "class_weight": rng.uniform(0.5, 2, classes), "reduction": "sum"}
    assert_matches_reference("softmax_cross_entropy", (logits, t.astype(dtype)), kwargs, EMU)
    # a float64 target beside float16 logits goes through the <t>_f32 entry
    assert_matches_reference("softmax_cross_entropy", (logits, t), {"reduction": "none"}, EMU)


@needs_gxx
@pytest.mark.parametrize("shape,axis", [((3, 5, 7), 1), ((4, 3, 2, 3), 1), ((6, 2), 0), ((2, 1, 9), 1)])
def test_strided_class_axis(shape, axis, rng):
    args, kwargs = make_inputs("softmax_cross_entropy", shape, np.float32, rng, axis=axis)
    for reduction in ("none", "sum_by_nonzero_weights"):
        assert_matches_reference("softmax_cross_entropy", args,
                                 {**kwargs, "reduction": reduction, "label_smoothing": 0.1}, EMU)


@needs_gxx
@pytest.mark.parametrize("shape,axis", [((5, 300), -1), ((7, 1), -1), ((40, 9), -1), ((4, 50, 3), 1)])
def test_cosine_distance_groups_and_strides(shape, axis, rng):
    rows = int(np.prod(shape)) // shape[axis]
    group = launch.cosine_launch(rows, shape[axis], int(np.prod(shape[axis % len(shape) + 1:])))[2]
    assert group == (1 if axis == 1 else min(32, 1 << max(0, (-(-shape[axis] // 8) - 1).bit_length())))
    args, kwargs = make_inputs("cosine_distance", shape, np.float32, rng, axis=axis)
    for reduction in ("none", "mean"):
        assert_matches_reference("cosine_distance", args, {**kwargs, "reduction": reduction}, EMU)


@needs_gxx
def test_bfloat16_on_every_path(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for classes in (5, 700, 2051):
        logits = (rng.standard_normal((3, classes)) * 2).astype(ml_dtypes.bfloat16)
        y = rng.integers(0, classes, 3)
        _, g = assert_matches_reference("softmax_cross_entropy", (logits, y), {"reduction": "mean"}, EMU)
        assert g.dtype == ml_dtypes.bfloat16
    x = rng.standard_normal((4, 9)).astype(ml_dtypes.bfloat16)
    assert_matches_reference("mean_squared_error", (x, x * 0.5), {"reduction": "sum"}, EMU)


@needs_gxx
@pytest.mark.parametrize("shape,axis", [((4, 10), -1), ((3, 3000), -1), ((2, 7, 3), 1)],
                         ids=["warp", "block", "strided"])
def test_confident_rows_keep_tiny_losses_exact(shape, axis, rng):
    # the target leads by 25: loss ~ C e^-25 (1e-10 to 1e-7), far below float32 epsilon
    logits = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    lshape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    y = rng.integers(0, C, lshape)
    moved = np.moveaxis(logits, axis, -1)
    np.put_along_axis(moved, y[..., None], 25.0, axis=-1)
    loss, grad = gl.softmax_cross_entropy(logits, y, axis=axis, reduction="none", return_grad=True, backend=EMU)
    # exact in long double: rest = sum_{c != y} e^(x_c - x_y), loss = log1p(rest), grad_y = -rest / (1 + rest)
    # (reference.py's float64 lse - x_y is itself off by ~3e-5 relative at losses ~1e-10)
    rows = np.moveaxis(logits, axis, -1).astype(np.longdouble)
    x_y = np.take_along_axis(rows, y[..., None], -1)
    rest = np.exp(rows - x_y).sum(-1) - 1
    assert (rest < 1e-6).all() and (rest > 0).all()
    np.testing.assert_allclose(loss, np.log1p(rest).astype(np.float64), rtol=1e-5)
    g_y = np.take_along_axis(np.moveaxis(grad, axis, -1), y[..., None], -1)[..., 0]
    np.testing.assert_allclose(g_y, (-rest / (1 + rest)).astype(np.float64), rtol=1e-5)  # no cancellation


# ---------------------------------------------------------------------------
# Vector loads: rows at every offset from a 16-byte boundary.

def _offset_view(a: np.ndarray, offset_elems: int) -> np.ndarray:
    """A C-contiguous copy of `a` whose data starts `offset_elems` elements past a 16-byte boundary."""
    item = a.dtype.itemsize
    raw = np.empty(a.size * item + 64, np.uint8)
    start = (-raw.ctypes.data) % 16 + offset_elems * item
    view = raw[start:start + a.size * item].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert view.flags.c_contiguous and view.ctypes.data % 16 == (offset_elems * item) % 16
    return view


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("classes", [37, 1500])  # the warp path and the block path
def test_aligned_and_misaligned_rows(classes, dtype, rng):
    base = (rng.standard_normal((4, classes)) * 3).astype(dtype)
    y = rng.integers(0, classes, 4)
    per_pack = 16 // np.dtype(dtype).itemsize
    results = []
    for offset in range(per_pack):
        x = _offset_view(base, offset)
        loss, g = assert_matches_reference("softmax_cross_entropy", (x, y), {"reduction": "none"}, EMU)
        results.append((loss, g))
    # each offset splits rows differently, so only closeness (checked above) is promised;
    # but every row's result must be the same at all offsets to the kernel's accuracy
    for loss, g in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-3 if dtype == np.float16 else 1e-5)


# ---------------------------------------------------------------------------
# Bitwise determinism and edge sizes.

@needs_gxx
@pytest.mark.parametrize("case", ["warp", "block", "split", "strided", "prob", "elementwise", "cosine"])
def test_emulated_results_are_bitwise_reproducible(case, rng):
    weight = None
    if case in ("warp", "block", "split"):
        rows, classes = {"warp": (5, 60), "block": (5, 3000), "split": (3, 9000)}[case]
        args, kwargs = _index_case(rows, classes, np.float32, rng, label_smoothing=0.1)
        assert launch.xent_launch(rows, classes, 1)[0] == case
        name = "softmax_cross_entropy"
    elif case == "strided":
        name = "softmax_cross_entropy"
        args, kwargs = make_inputs(name, (3, 6, 11), np.float32, rng, axis=1)
    elif case == "prob":
        name = "softmax_cross_entropy"
        logits = rng.standard_normal((4, 1200)).astype(np.float32)
        args, kwargs = (logits, rng.random((4, 1200)).astype(np.float32)), {}
    elif case == "elementwise":
        name = "huber"
        args, kwargs = make_inputs(name, (40, 300), np.float32, rng)  # 3 blocks of partials
        weight = rng.random(40)
    else:
        name = "cosine_distance"
        args, kwargs = make_inputs(name, (30, 17), np.float32, rng)
    if weight is not None:
        kwargs["weight"] = weight
    runs = []
    for _ in range(3):
        out = []
        for reduction in ("none", "mean", "sum_by_nonzero_weights"):
            loss, g = run_loss(name, args, {**kwargs, "reduction": reduction}, EMU)
            out.append((np.asarray(loss).tobytes(), g.tobytes()))
        runs.append(out)
    assert runs[0] == runs[1] == runs[2]


@needs_gxx
@pytest.mark.parametrize("shape,axis", [((0, 1), -1), ((0, 32003), -1), ((1, 1), -1), ((0, 3, 4), 1),
                                        ((2, 1, 3), 1), ((1, 40000), -1)])
def test_edge_sizes(shape, axis, rng):
    args, kwargs = make_inputs("softmax_cross_entropy", shape, np.float32, rng, axis=axis)
    for reduction in ("none", "mean", "sum"):
        assert_matches_reference("softmax_cross_entropy", args, {**kwargs, "reduction": reduction}, EMU)


@needs_gxx
def test_many_partials_in_the_reductions(rng):
    # 3 x 11000 elements: several blocks of partials in the weight, loss and finish passes
    x = rng.standard_normal((3, 11000)).astype(np.float32)
    t = rng.standard_normal((3, 11000)).astype(np.float32)
    w = rng.random((3, 1))
    w[1] = 0.0
    for reduction in ("mean", "sum_by_nonzero_weights", "batch_size"):
        assert_matches_reference("mean_squared_error", (x, t), {"weight": w, "reduction": reduction}, EMU)
    logits = rng.standard_normal((9000, 2)).astype(np.float32)
    y = rng.integers(0, 2, 9000)
    y[::7] = -100
    assert_matches_reference("softmax_cross_entropy", (logits, y), {"reduction": "mean",
                                                                    "weight": rng.random(9000)}, EMU)


# ---------------------------------------------------------------------------
# validate=False: invalid targets give NaN rows, and nothing is read out of bounds.

_INVALID = """
import numpy as np, gpuloss as gl
rng = np.random.default_rng(3)
for shape, axis in [((6, 3), -1), ((6, 40), -1), ((5, 1500), -1), ((2, 4, 3), 1), ((5, 9000), -1)]:
    for dtype in (np.float32, np.float16, np.float64):
        # exact-size arrays: any read past them lands in ASan's redzone
        logits = np.ascontiguousarray(rng.standard_normal(shape).astype(dtype))
        C = shape[axis]
        lshape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
        y = rng.integers(0, C, lshape).reshape(-1)
        # before the first row, past the last row (the reads ASan would catch), ignored, far out
        y[0] = -5; y[-1] = C; y[1] = C; y[2] = -100; y[3] = 10**12
        y = y.reshape(lshape)
        bad = [0, 1, 3, y.size - 1]
        for smoothing in (0.0, 0.3):
            loss, grad = gl.softmax_cross_entropy(logits, y, axis=axis, reduction="none", return_grad=True,
                                                  validate=False, label_smoothing=smoothing,
                                                  class_weight=np.ones(C), backend="emulated")
            f = loss.reshape(-1)
            assert np.isnan(f[bad]).all() and f[2] == 0 and np.isfinite(f[4:-1]).all(), f
            g = np.moveaxis(grad, axis, -1).reshape(-1, C)
            assert np.isnan(g[bad]).all() and (g[2] == 0).all() and np.isfinite(g[4:-1]).all()
            m = gl.softmax_cross_entropy(logits, y, axis=axis, validate=False, backend="emulated")
            assert np.isnan(m), m
x = rng.standard_normal((3, 5)).astype(np.float32)
labels = (x > 0).astype(np.float32)  # hinge takes 0/1 labels only
for name in ("mean_squared_error", "sigmoid_cross_entropy", "hinge", "huber"):
    getattr(gl, name)(x, labels, weight=np.ones(3), reduction="mean", return_grad=True, backend="emulated")
gl.sigmoid_cross_entropy(x, x, pos_weight=np.ones(5), return_grad=True, backend="emulated")
gl.cosine_distance(x, x, axis=0, weight=np.ones((1, 5)), return_grad=True, backend="emulated")
gl.weighted_reduce(x, np.ones(3), reduction="sum_by_nonzero_weights", backend="emulated")
print("done")
"""


@needs_gxx
@pytest.mark.slow
def test_invalid_targets_under_address_sanitizer():
    from gpuloss.backends.emulated import run_sanitized

    run = run_sanitized(_INVALID, "address")
    assert run.ok, str(run)
    assert "done" in run.stdout


@needs_gxx
def test_invalid_targets_give_nan_rows(rng):
    logits = rng.standard_normal((5, 40)).astype(np.float32)
    y = np.array([0, 40, -100, -3, 7])
    loss, grad = gl.softmax_cross_entropy(logits, y, reduction="none", return_grad=True, validate=False,
                                          backend=EMU)
    assert np.isnan(loss[[1, 3]]).all() and loss[2] == 0 and np.isfinite(loss[[0, 4]]).all()
    assert np.isnan(grad[[1, 3]]).all() and not grad[2].any() and np.isfinite(grad[[0, 4]]).all()
    with pytest.raises(ValueError, match=r"target\[1\] = 40"):
        gl.softmax_cross_entropy(logits, y, backend=EMU)


_EVERY_FAMILY = """
import numpy as np, gpuloss as gl
rng = np.random.default_rng(5)
for shape, axis in [((5, 3), -1), ((4, 70), -1), ((2, 1100), -1), ((2, 3, 4), 1), ((2, 9000), -1)]:
    logits = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    y = rng.integers(0, C, tuple(s for i, s in enumerate(shape) if i != axis % len(shape)))
    gl.softmax_cross_entropy(logits, y, axis=axis, label_smoothing=0.1, return_grad=True, backend="emulated")
    t = rng.random(shape).astype(np.float32)
    gl.softmax_cross_entropy(logits, t, axis=axis, reduction="sum", return_grad=True, backend="emulated")
x = rng.standard_normal((6, 700)).astype(np.float32)
gl.huber(x, x * 0.5, weight=rng.random(6), reduction="sum_by_nonzero_weights", return_grad=True,
         backend="emulated")
gl.cosine_distance(x, x, return_grad=True, backend="emulated")
gl.weighted_reduce(x, rng.random(6), backend="emulated")
print("done")
"""


@needs_gxx
@pytest.mark.slow
def test_every_kernel_family_is_race_free_under_thread_sanitizer():
    from gpuloss.backends.emulated import run_sanitized

    run = run_sanitized(_EVERY_FAMILY, "thread")
    assert run.ok, str(run)
    assert "done" in run.stdout


# ---------------------------------------------------------------------------
# bench/gpu_suite.py without a GPU.

def test_gpu_suite_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run",
                           "--results-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".json") for n in written) and any(n.endswith(".md") for n in written), written
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["dry_run"] is True
    shapes = {tuple(c["shape"]) for c in data["cross_entropy"]}
    assert {(4096, 32000), (512, 128256), (8192, 1000), (65536, 10)} <= shapes
    assert {c["dtype"] for c in data["cross_entropy"]} == {"float32", "bfloat16"}
    assert all(c["elements"] == 2**26 for c in data["elementwise"])
    if shutil.which("g++"):  # the bf16 fallback launch was checked against the public function
        assert any("bf16 fallback launch == public function" in n for n in data["notes"]), data["notes"]
