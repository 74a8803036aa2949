"""What a hostile user found in the functional API (issue 9): each case failed before its fix.

Fully masked rows on every launch variant, no reachable target acting as "ignore
nothing", any byte order, array subclasses, ignore_index outside int64, exact
tiny losses in float64, the same accuracy for any class layout, hinge labels and
one parser for GPULOSS_BACKEND.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import gpuloss as gl
from gpuloss import reference
from gpuloss.backends import default_backend_name, launch

from .cases import LOSSES, make_inputs
from .conftest import BACKENDS, _close, run_loss

INT64_MIN = int(np.iinfo(np.int64).min)

# (shape, axis) reaching every cross-entropy launch variant of kernels/xent.cu: rows per warp,
# one row per block, one thread per measurement (class axis not last, few classes), and the
# warp/block kernels over a class axis that is not last.
VARIANT_SHAPES = [((6, 3), -1), ((5, 1), -1), ((4, 1500), -1), ((3, 5, 4), 1), ((2, 40, 3), 1), ((2, 1100, 2), 1)]
assert {launch.xent_launch(int(np.prod(s)) // s[a], s[a], int(np.prod(s[a % len(s) + 1:])))[0]
        for s, a in VARIANT_SHAPES} == {"warp", "block", "strided"}


def _masked_logits(shape, axis, dtype, rng):
    """Random logits with the first measurement fully masked (-inf everywhere) and a second one
    partly masked; the rest ordinary."""
    x = rng.standard_normal(shape)
    x = np.moveaxis(x, axis, -1)
    flat = x.reshape(-1, x.shape[-1])
    flat[0] = -np.inf
    if flat.shape[0] > 1 and flat.shape[1] > 1:
        flat[1, ::2] = -np.inf
    return np.moveaxis(flat.reshape(x.shape), -1, axis).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", VARIANT_SHAPES)
@pytest.mark.parametrize("targets", ["index", "probability"])
def test_fully_masked_row_is_nan_on_every_launch_variant(shape, axis, dtype, targets, backend, rng):
    x = _masked_logits(shape, axis, dtype, rng)
    C = shape[axis]
    loss_shape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    if targets == "index":
        y = rng.integers(0, C, size=loss_shape)
        ym = np.moveaxis(np.expand_dims(y, axis), axis, -1).reshape(-1)
        if C > 1:  # the partly masked row's target is a live class
            ym[1] = 1
        y = np.moveaxis(ym.reshape(np.moveaxis(np.expand_dims(y, axis), axis, -1).shape), -1, axis).squeeze(axis)
    else:
        y = rng.dirichlet(np.ones(C), size=loss_shape).astype(dtype)
        y = np.moveaxis(y, -1, axis)
        # probability on a masked class is -inf * p: keep the partly masked row's mass on live classes
        ym = np.moveaxis(y, axis, -1).reshape(-1, C)
        if C > 1 and ym.shape[0] > 1:
            ym[1, ::2] = 0.0
            ym[1] /= ym[1].sum()
        y = np.moveaxis(ym.reshape(np.moveaxis(y, axis, -1).shape), -1, axis)
    loss, grad = run_loss("softmax_cross_entropy", (x, y), {"axis": axis, "reduction": "none"}, backend)
    ref_loss, ref_grad = reference.softmax_cross_entropy(x, y, axis=axis, reduction="none")
    first = (0,) * len(loss_shape)
    assert np.isnan(loss[first]), f"a fully masked row gave {loss[first]} instead of NaN"
    _close(loss, ref_loss, 1e-5, "loss")
    _close(grad, ref_grad.astype(dtype), 1e-4, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [1, 3, 1500])
def test_single_and_all_masked_classes_reduce_to_nan(classes, backend, rng):
    x = rng.standard_normal((4, classes)).astype(np.float32)
    x[2] = -np.inf
    loss = run_loss("softmax_cross_entropy", (x, np.zeros(4, np.int64)), {}, backend, return_grad=False)[0]
    assert np.isnan(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_nothing_has_no_sentinel_target(backend, rng):
    """ignore_index=None ignores no value: INT64_MIN (once the internal 'no ignore' mark) is an invalid class."""
    x = rng.standard_normal((4, 5)).astype(np.float32)
    y = np.array([0, 1, INT64_MIN, 2])
    with pytest.raises(ValueError, match=r"target\[2\] = -9223372036854775808 is not a class index"):
        run_loss("softmax_cross_entropy", (x, y), {"ignore_index": None}, backend)
    loss, grad = run_loss("softmax_cross_entropy", (x, y), {"ignore_index": None, "validate": False,
                                                            "reduction": "none"}, backend)
    assert np.isnan(loss[2]) and np.isnan(grad[2]).all()
    assert np.isfinite(loss[[0, 1, 3]]).all()
    # The user's own ignore_index keeps working, whatever its value.
    ref = reference.softmax_cross_entropy(x, y, ignore_index=INT64_MIN)[0]
    _close(run_loss("softmax_cross_entropy", (x, y), {"ignore_index": INT64_MIN}, backend)[0], ref, 1e-5, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint64_targets_do_not_wrap_onto_ignore_index(backend, rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = np.array([1, 2**64 - 100, 3], np.uint64)  # wraps to -100 as an int64
    with pytest.raises(ValueError, match=r"target\[1\] = 18446744073709551516"):
        run_loss("softmax_cross_entropy", (x, y), {}, backend)
    loss, _ = run_loss("softmax_cross_entropy", (x, y), {"validate": False, "reduction": "none"}, backend)
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("value", [2**63, -2**63 - 1, np.uint64(2**64 - 1), 10**30])
def test_ignore_index_outside_int64_is_one_clear_error(value, rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    for backend in [p.values[0] for p in BACKENDS if p.values[0] != "cuda"]:
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            gl.softmax_cross_entropy(x, np.array([0, 1]), ignore_index=value, backend=backend)


def test_ignore_index_accepts_numpy_integers_and_refuses_other_types(rng):
    x = rng.standard_normal((3, 4))
    y = np.array([0, 7, 2])
    _close(gl.softmax_cross_entropy(x, y, ignore_index=np.int32(7)),
           reference.softmax_cross_entropy(x, y, ignore_index=7)[0], 1e-11, "loss")
    for bad in (True, 7.0, "7"):
        with pytest.raises(TypeError, match="ignore_index must be an int or None"):
            gl.softmax_cross_entropy(x, y, ignore_index=bad)


def _swap_order(a):
    return a.astype(a.dtype.newbyteorder("S")) if isinstance(a, np.ndarray) and a.dtype.itemsize > 1 else a


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_any_byte_order_gives_the_native_answer(name, dtype, backend, rng):
    args, kwargs = make_inputs(name, (5, 7), dtype, rng)
    kwargs["weight"] = rng.uniform(0.5, 2.0, size=(5,))
    if name == "softmax_cross_entropy":
        kwargs["class_weight"] = rng.uniform(0.5, 2.0, size=(7,))
    if name == "sigmoid_cross_entropy":
        kwargs["pos_weight"] = rng.uniform(0.5, 2.0, size=(7,))
    native = run_loss(name, args, kwargs, backend)
    for swap_all in (True, False):  # every array swapped, or only the first (mixed byte orders)
        swapped_args = [_swap_order(a) if swap_all or i == 0 else a for i, a in enumerate(args)]
        swapped_kwargs = {k: _swap_order(a) if swap_all else a for k, a in kwargs.items()}
        copies = [a.copy() for a in swapped_args]
        out = run_loss(name, swapped_args, swapped_kwargs, backend)
        np.testing.assert_array_equal(out[0], native[0])
        if out[1] is not None:
            np.testing.assert_array_equal(out[1], native[1])
            assert out[1].dtype.isnative
        for a, c in zip(swapped_args, copies):
            np.testing.assert_array_equal(a, c)  # never modified


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("kind", ["matrix", "masked"])
def test_matrix_and_masked_arrays_are_refused_by_name(name, kind, rng):
    args, kwargs = make_inputs(name, (4, 6), np.float64, rng)
    wrap = np.asmatrix if kind == "matrix" else (lambda a: np.ma.masked_array(a, mask=np.zeros(a.shape, bool)))
    first = next(iter(inspect.signature(getattr(gl, name)).parameters))
    with pytest.raises(TypeError, match=rf"{first} must be a plain numpy.ndarray or cupy.ndarray; got numpy\."):
        getattr(gl, name)(wrap(args[0]), *args[1:], **kwargs)
    if len(args) > 1:
        with pytest.raises(TypeError, match="target must be a plain numpy.ndarray"):
            getattr(gl, name)(args[0], wrap(args[1]), *args[2:], **kwargs)
    with pytest.raises(TypeError, match="weight must be a plain numpy.ndarray"):
        getattr(gl, name)(*args, weight=wrap(np.ones((4, 1))), **kwargs)


def test_other_ndarray_subclasses_are_read_as_plain_arrays(tmp_path, rng):
    x = rng.standard_normal((3, 5))
    y = np.array([0, 4, 2])
    mm = np.memmap(tmp_path / "x.dat", dtype=np.float64, mode="w+", shape=x.shape)
    mm[:] = x
    np.testing.assert_array_equal(gl.softmax_cross_entropy(mm, y), gl.softmax_cross_entropy(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [-1, 0])
def test_confident_rows_keep_tiny_losses(dtype, axis, backend, rng):
    """A target holding the row max by a wide margin: the loss ~ sum exp(-gap) must keep its digits."""
    gaps = rng.uniform(20, 40, size=(6, 1)) if dtype == np.float64 else rng.uniform(14, 20, size=(6, 1))
    x = np.zeros((6, 3)) - gaps * rng.uniform(1.0, 1.5, size=(6, 3))
    y = rng.integers(0, 3, 6)
    x[np.arange(6), y] = 0.0
    x = x.astype(dtype)
    if axis == 0:
        x = np.ascontiguousarray(x.T)
    loss, grad = run_loss("softmax_cross_entropy", (x, y), {"axis": axis, "reduction": "none"}, backend)
    ref_loss, ref_grad = reference.softmax_cross_entropy(x, y, axis=axis, reduction="none")
    assert (ref_loss > 0).all()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5 if dtype == np.float32 else 1e-11,
                               atol=1e-30)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cpu"])
def test_class_axis_not_last_sums_like_the_last_axis(backend, rng):
    """C = 262144 with the class axis first: the same relative accuracy as with it last."""
    classes = 262144
    x = (rng.standard_normal((2, classes)) * 3).astype(np.float32)
    y = rng.integers(0, classes, 2)
    ref = reference.softmax_cross_entropy(x, y, reduction="none")[0]
    last = run_loss("softmax_cross_entropy", (x, y), {"reduction": "none"}, backend, return_grad=False)[0]
    first = run_loss("softmax_cross_entropy", (np.ascontiguousarray(x.T), y), {"axis": 0, "reduction": "none"},
                     backend, return_grad=False)[0]
    err_last = np.max(np.abs(last - ref) / np.abs(ref))
    err_first = np.max(np.abs(first - ref) / np.abs(ref))
    assert err_first <= 1e-6, (err_first, err_last)
    assert err_first <= max(4 * err_last, 2e-7), (err_first, err_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1.0, 2.0, 0.5, np.nan, np.inf])
def test_hinge_refuses_labels_outside_zero_one(bad, backend, rng):
    x = rng.standard_normal((3, 4))
    t = (rng.random((3, 4)) < 0.5).astype(np.float64)
    t[1, 2] = bad
    with pytest.raises(ValueError, match=r"target\[1, 2\] = .* is not a label in \{0, 1\}"):
        run_loss("hinge", (x, t), {}, backend)
    # validate=False applies the formula to the label as it is (y = 2t - 1).
    loss, _ = run_loss("hinge", (x, t), {"validate": False, "reduction": "none"}, backend)
    expected = np.maximum(0.0, 1.0 - (2 * t - 1) * x)
    _close(loss, expected, 1e-12, "hinge loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hinge_accepts_bool_and_integer_labels(backend, rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    t = rng.random((3, 4)) < 0.5
    for labels in (t, t.astype(np.int8), t.astype(np.float32)):
        _close(run_loss("hinge", (x, labels), {}, backend)[0], reference.hinge(x, t.astype(float))[0], 1e-5,
               "hinge")


def test_a_backend_typo_in_the_environment_is_the_same_error_everywhere(monkeypatch, rng):
    monkeypatch.setenv("GPULOSS_BACKEND", "cpuu")
    with pytest.raises(ValueError, match="GPULOSS_BACKEND must be one of .*; got 'cpuu'") as from_loss:
        gl.softmax_cross_entropy(rng.standard_normal((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError) as from_default:
        default_backend_name()
    assert str(from_loss.value) == str(from_default.value)
    with pytest.raises(ValueError, match="GPULOSS_BACKEND"):
        gl.mean_squared_error(np.ones(3), np.zeros(3))


@pytest.mark.parametrize("value,expected", [("", "cpu"), ("auto", "cpu"), (" CPU ", "cpu"), ("cuda", "cpu"),
                                            ("emulated", "emulated")])
def test_environment_backend_for_numpy_arrays(value, expected, monkeypatch):
    """NumPy arrays run on cpu, or on the emulated kernels when GPULOSS_BACKEND says so."""
    from gpuloss import _validate

    monkeypatch.setenv("GPULOSS_BACKEND", value)
    assert _validate.array_module({"x": np.ones(2)}, None).name == expected
