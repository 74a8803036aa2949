"""z-loss (PaLM §5) and logit soft-capping (Gemma 2) in softmax_cross_entropy, on every backend.

The float64 reference renders both formulas directly (gpuloss.reference); every
launch variant of kernels/xent.cu and both cpu paths (float32 vectorised,
float64 scalar) are checked against it, and the reference itself against finite
differences.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpuloss as gl
from gpuloss import reference

from .cases import REDUCTIONS, tolerance
from .conftest import BACKENDS, _close, to_backend, to_host

SHAPES = [((7, 3), -1), ((5, 1), -1), ((3, 1500), -1), ((2, 5, 3), 1), ((2, 40, 3), 1)]


def _call(backend, x, y, **kw):
    out = gl.softmax_cross_entropy(to_backend(backend, x), to_backend(backend, y), backend=backend, **kw)
    return tuple(to_host(o) for o in out) if isinstance(out, tuple) else to_host(out)


def _inputs(shape, axis, dtype, targets, rng, scale=4.0):
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    C = shape[axis]
    loss_shape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    if targets == "index":
        y = rng.integers(0, C, size=loss_shape)
        y[rng.random(loss_shape) < 0.2] = -100
    else:
        y = np.moveaxis(rng.dirichlet(np.ones(C), size=loss_shape), -1, axis).astype(np.float32)
    return x, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("targets", ["index", "probability"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("extras", [{"z_loss": 1e-2}, {"softcap": 2.5}, {"z_loss": 0.3, "softcap": 1.5}])
def test_extras_match_the_reference(shape, axis, targets, dtype, extras, backend, rng):
    x, y = _inputs(shape, axis, dtype, targets, rng)
    C = shape[axis]
    kw = dict(axis=axis, class_weight=rng.uniform(0.2, 2.0, C), label_smoothing=0.1,
              weight=rng.uniform(0.0, 2.0, shape[:1]), **extras)
    ref_loss, ref_z, ref_grad = reference.softmax_cross_entropy(x, y, return_z_loss=True, **kw)
    loss, z, grad = _call(backend, x, y, return_z_loss=True, return_grad=True, **kw)
    loss_rtol, grad_rtol = tolerance(dtype)
    _close(loss, ref_loss, loss_rtol, "loss")
    _close(z, ref_z, loss_rtol, "z term")
    _close(grad, ref_grad.astype(dtype), grad_rtol, "grad")
    assert grad.dtype == dtype and np.asarray(z).dtype == np.asarray(loss).dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_term_is_reduced_like_the_loss(reduction, backend, rng):
    x, y = _inputs((6, 9), -1, np.float64, "index", rng)
    kw = dict(z_loss=0.05, reduction=reduction, weight=rng.uniform(0.0, 1.0, 6))
    ref_loss, ref_z, _ = reference.softmax_cross_entropy(x, y, return_z_loss=True, **kw)
    loss, z = _call(backend, x, y, return_z_loss=True, **kw)
    _close(loss, ref_loss, 1e-10, "loss")
    _close(z, ref_z, 1e-10, "z")
    # The z term is part of the loss: without it the loss drops by exactly the z term.
    plain = _call(backend, x, y, **{**kw, "z_loss": 0.0})
    _close(np.asarray(loss) - np.asarray(z), plain, 1e-10, "loss - z")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_extras_in_half_precision(dtype, backend, rng):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays come from ml_dtypes")
        dtype = ml_dtypes.bfloat16
    x, y = _inputs((4, 50), -1, np.float32, "index", rng)
    x = x.astype(dtype)
    kw = dict(z_loss=1e-3, softcap=3.0)
    ref_loss, ref_grad = reference.softmax_cross_entropy(x.astype(np.float64), y, **kw)
    loss, grad = _call(backend, x, y, return_grad=True, **kw)
    loss_rtol, grad_rtol = tolerance(np.float16) if dtype == np.float16 else (2e-5, 1.6e-2)
    assert np.asarray(loss).dtype == np.float32 and grad.dtype == np.dtype(dtype)
    _close(loss, ref_loss, loss_rtol, "loss")
    _close(grad.astype(np.float64), ref_grad, grad_rtol, "grad")


def test_softcap_bounds_the_logits_and_z_loss_penalises_large_lse(rng):
    """Properties that hold whatever the implementation: a capped huge logit behaves like s, and the
    z term is c * lse^2 on its own (a one-hot row of equal logits has lse = x + log C)."""
    x = np.array([[1e4, 0.0, -1e4]])
    capped = gl.softmax_cross_entropy(x, np.array([1]), softcap=5.0)
    expected = gl.softmax_cross_entropy(np.array([[5.0, 0.0, -5.0]]), np.array([1]))
    np.testing.assert_allclose(capped, expected, rtol=1e-12)
    flat = np.full((1, 4), 2.0)
    _, z = gl.softmax_cross_entropy(flat, np.array([0]), z_loss=0.5, return_z_loss=True)
    np.testing.assert_allclose(z, 0.5 * (2.0 + np.log(4.0)) ** 2, rtol=1e-14)


@pytest.mark.parametrize("targets", ["index", "probability"])
def test_reference_gradient_of_the_extras_by_finite_differences(targets, rng):
    x, y = _inputs((3, 5), -1, np.float64, targets, rng, scale=2.0)
    kw = dict(z_loss=0.2, softcap=1.7, label_smoothing=0.2, class_weight=rng.uniform(0.5, 1.5, 5))
    _, grad = reference.softmax_cross_entropy(x, y, **kw)
    h = 1e-6
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (reference.softmax_cross_entropy(up, y, **kw)[0]
                        - reference.softmax_cross_entropy(down, y, **kw)[0]) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extras_keep_nan_rows_and_ignored_rows(backend, rng):
    x, _ = _inputs((4, 6), -1, np.float32, "index", rng)
    x[1, 2] = np.nan
    y = np.array([0, 1, -100, 3])
    loss, z, grad = _call(backend, x, y, z_loss=0.1, softcap=2.0, reduction="none", return_z_loss=True,
                          return_grad=True)
    assert np.isnan(loss[1]) and np.isnan(z[1]) and np.isnan(grad[1]).all()
    assert loss[2] == 0 and z[2] == 0 and (grad[2] == 0).all()
    assert np.isfinite(loss[[0, 3]]).all() and (z[[0, 3]] > 0).all()


@pytest.mark.parametrize("name,value,error", [("z_loss", -0.1, ValueError), ("z_loss", np.nan, ValueError),
                                              ("z_loss", "0.1", TypeError), ("softcap", 0.0, ValueError),
                                              ("softcap", -1.0, ValueError), ("softcap", np.inf, ValueError),
                                              ("return_z_loss", 1, TypeError)])
def test_bad_extras_are_refused_by_name(name, value, error, rng):
    with pytest.raises(error, match=name):
        gl.softmax_cross_entropy(rng.standard_normal((2, 3)), np.array([0, 1]), **{name: value})


def test_return_shapes(rng):
    x, y = rng.standard_normal((3, 4)), np.array([0, 1, 2])
    assert np.ndim(gl.softmax_cross_entropy(x, y, z_loss=0.1)) == 0
    assert len(gl.softmax_cross_entropy(x, y, z_loss=0.1, return_z_loss=True)) == 2
    loss, z, grad = gl.softmax_cross_entropy(x, y, z_loss=0.1, return_z_loss=True, return_grad=True)
    assert grad.shape == x.shape and np.ndim(z) == 0
    loss, z = gl.softmax_cross_entropy(x, y, return_z_loss=True)
    assert float(z) == 0.0
