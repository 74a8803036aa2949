"""docs/api.md §4: every bad input raises a clear exception naming the argument."""
from __future__ import annotations

import re

import numpy as np
import pytest

import gpuloss as gl

from .conftest import BACKENDS


@pytest.fixture
def xy(rng):
    return rng.standard_normal((4, 5)).astype(np.float32), rng.integers(0, 5, 4)


def test_wrong_target_shape_names_both_shapes(xy):
    x, _ = xy
    with pytest.raises(ValueError, match=r"target .*\(4,\).*got \(3,\)"):
        gl.softmax_cross_entropy(x, np.zeros(3, np.int64))


def test_probability_target_shape(xy):
    x, _ = xy
    with pytest.raises(ValueError, match=r"target \(probabilities\) must have the shape of logits"):
        gl.softmax_cross_entropy(x, np.zeros((4, 4), np.float32))


def test_class_axis_out_of_range(xy):
    x, y = xy
    with pytest.raises(ValueError, match=r"axis=2 is out of range for logits of rank 2"):
        gl.softmax_cross_entropy(x, y, axis=2)
    with pytest.raises(TypeError, match=r"axis must be an int"):
        gl.softmax_cross_entropy(x, y, axis=1.0)


def test_non_floating_logits(xy):
    _, y = xy
    with pytest.raises(TypeError, match=r"logits must have a floating dtype .*got int64"):
        gl.softmax_cross_entropy(np.zeros((4, 5), np.int64), y)
    with pytest.raises(TypeError, match=r"pred must have a floating dtype"):
        gl.mean_squared_error(np.zeros(3, np.int32), np.zeros(3, np.float32))


def test_logits_must_be_an_array(xy):
    _, y = xy
    with pytest.raises(TypeError, match=r"logits must be a numpy.ndarray or cupy.ndarray; got builtins.list"):
        gl.softmax_cross_entropy([[1.0, 2.0]], y)


def test_target_of_wrong_dtype(xy):
    x, _ = xy
    with pytest.raises(TypeError, match=r"target must be integer class indices or floating probabilities; got bool"):
        gl.softmax_cross_entropy(x, np.zeros(4, bool))
    with pytest.raises(TypeError, match=r"target must have a real dtype; got complex128"):
        gl.mean_squared_error(np.zeros(3), np.zeros(3, complex))


def test_elementwise_shapes_must_match():
    with pytest.raises(ValueError, match=r"target must have the shape of pred \(3, 2\); got \(2, 3\)"):
        gl.huber(np.zeros((3, 2)), np.zeros((2, 3)))


def test_mixed_devices_is_type_error(xy):
    x, y = xy

    class FakeCupy:  # a stand-in that looks like a cupy array to the device check
        __module__ = "cupy._core.core"
        dtype = np.dtype(np.float32)
        shape = (4, 5)
        ndim = 2

    with pytest.raises(TypeError, match=r"arrays on different devices: logits on the GPU \(cupy\) but target"):
        gl.softmax_cross_entropy(FakeCupy(), y)


def test_backend_and_array_type_must_agree(xy):
    x, y = xy
    with pytest.raises(TypeError, match=r"backend='cuda' takes cupy arrays; got numpy arrays"):
        gl.softmax_cross_entropy(x, y, backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        gl.softmax_cross_entropy(x, y, backend="tpu")


def test_unknown_reduction(xy):
    x, y = xy
    with pytest.raises(ValueError, match=r"reduction must be one of 'none', 'sum', 'mean'.*got 'avg'"):
        gl.softmax_cross_entropy(x, y, reduction="avg")
    assert gl.Reduction("sum_by_nonzero_weights") is gl.Reduction.SUM_BY_NONZERO_WEIGHTS


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan")])
def test_label_smoothing_range(xy, eps):
    x, y = xy
    with pytest.raises(ValueError, match=r"label_smoothing must be a finite number with 0.0 <= label_smoothing <= 1.0"):
        gl.softmax_cross_entropy(x, y, label_smoothing=eps)
    with pytest.raises(ValueError, match=r"label_smoothing"):
        gl.sigmoid_cross_entropy(x, x, label_smoothing=eps)


@pytest.mark.parametrize("name,kw", [("huber", {"delta": 0.0}), ("huber", {"delta": -1.0}),
                                     ("smooth_l1", {"beta": -0.5}), ("log_loss", {"epsilon": -1e-7})])
def test_loss_parameters_out_of_range(name, kw):
    arg = next(iter(kw))
    with pytest.raises(ValueError, match=rf"{arg} must be a finite number"):
        getattr(gl, name)(np.full(3, 0.5), np.full(3, 0.5), **kw)


@pytest.mark.parametrize("bad_shape", [(5,), (4, 2), (2, 1, 1), (3, 5)])
def test_weight_shape_that_does_not_broadcast_names_both_shapes(bad_shape):
    p = np.zeros((4, 5))
    with pytest.raises(ValueError, match=re.escape(f"weight of shape {bad_shape} does not fit the loss of shape (4, 5)")):
        gl.mean_squared_error(p, p, weight=np.ones(bad_shape))


def test_class_weight_shape_and_pos_weight_shape(xy):
    x, y = xy
    with pytest.raises(ValueError, match=r"class_weight must have shape \(5,\); got \(4,\)"):
        gl.softmax_cross_entropy(x, y, class_weight=np.ones(4))
    with pytest.raises(ValueError, match=r"pos_weight of shape \(3,\) does not broadcast to the loss of shape \(4, 5\)"):
        gl.sigmoid_cross_entropy(x, x, pos_weight=np.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_class_index_names_first_position(backend):
    from .conftest import to_backend

    x = np.zeros((2, 3, 4), np.float32)
    y = np.zeros((2, 3), np.int64)
    y[1, 0] = 4
    y[1, 2] = -3
    with pytest.raises(ValueError, match=r"target\[1, 0\] = 4 is not a class index in \[0, 4\) nor ignore_index=-100"):
        gl.softmax_cross_entropy(to_backend(backend, x), to_backend(backend, y), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_false_gives_nan_for_bad_rows_only(backend, rng):
    from .conftest import run_loss

    x = rng.standard_normal((5, 4)).astype(np.float32)
    y = np.array([0, 9, 2, -7, 3])
    loss, grad = run_loss("softmax_cross_entropy", (x, y), {"reduction": "none", "validate": False}, backend)
    assert np.isnan(loss[[1, 3]]).all() and np.isfinite(loss[[0, 2, 4]]).all()
    assert np.isnan(grad[[1, 3]]).all() and np.isfinite(grad[[0, 2, 4]]).all()
    total, _ = run_loss("softmax_cross_entropy", (x, y), {"reduction": "mean", "validate": False}, backend)
    assert np.isnan(total)


def test_zero_classes_and_zero_d_logits():
    with pytest.raises(ValueError, match=r"logits must have at least one class"):
        gl.softmax_cross_entropy(np.zeros((3, 0), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"logits must have a class axis"):
        gl.softmax_cross_entropy(np.ones((), np.float32), np.zeros((), np.int64))


def test_flags_must_be_bool(xy):
    x, y = xy
    with pytest.raises(TypeError, match=r"return_grad must be a bool"):
        gl.softmax_cross_entropy(x, y, return_grad="yes")
    with pytest.raises(TypeError, match=r"ignore_index must be an int or None"):
        gl.softmax_cross_entropy(x, y, ignore_index=1.5)


def test_ignore_index_none_ignores_nothing(xy):
    x, y = xy
    y = y.copy()
    y[2] = -100
    with pytest.raises(ValueError, match=r"target\[2\] = -100 is not a class index in \[0, 5\)"):
        gl.softmax_cross_entropy(x, y, ignore_index=None)
    y[2] = 1
    np.testing.assert_array_equal(gl.softmax_cross_entropy(x, y, ignore_index=None, reduction="none"),
                                  gl.softmax_cross_entropy(x, y, reduction="none"))


class _FakeCupy:
    """An array module with ``cuda`` (what _validate.constant takes for CuPy) that counts fills."""

    def __init__(self):
        self.fills = []
        self.current = 0
        fake = self

        class Device:
            def __init__(self, device=None):
                self.id = fake.current if device is None else device

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        self.cuda = type("cuda", (), {"Device": Device})

    def full(self, shape, value, dtype):
        self.fills.append((self.current, np.dtype(dtype).str, value))
        return np.full(shape, value, dtype)


def test_device_weights_of_none_or_a_number_fill_once_per_device_dtype_and_value():
    # docs/design.md §4: after the first call, weight=None costs no fill kernel on the device.
    from gpuloss import _validate as v

    xp = _FakeCupy()
    shape = (int(np.random.default_rng().integers(2, 50)),)
    for _ in range(3):
        values, block = v.weight_layout("weight", None, shape, xp, np.float32)
        assert values.tolist() == [1.0] and block == shape[0]
    assert len(xp.fills) == 1
    first = v.weight_layout("weight", 2.5, shape, xp, np.float32)[0]
    assert v.weight_layout("weight", 2.5, shape, xp, np.float32)[0] is first
    assert v.weight_layout("weight", 2.5, shape, xp, np.float64)[0] is not first  # another dtype
    xp.current = 1
    assert v.weight_layout("weight", 2.5, shape, xp, np.float32)[0] is not first  # another device
    assert len(xp.fills) == 4
    # -0.0 is not 0.0, and a NaN weight finds its own entry again instead of filling every call
    zero, minus_zero = (v.weight_layout("weight", w, shape, xp, np.float32)[0] for w in (0.0, -0.0))
    assert np.signbit(minus_zero[0]) and not np.signbit(zero[0])
    nan = v.weight_layout("weight", float("nan"), shape, xp, np.float32)[0]
    assert v.weight_layout("weight", float("nan"), shape, xp, np.float32)[0] is nan
    # on the host every call gets its own array (nothing shared with the caller)
    a, b = (v.weight_layout("weight", None, shape, np, np.float32)[0] for _ in range(2))
    assert a is not b
