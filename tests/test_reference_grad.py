"""The oracle's closed-form gradients against central finite differences of its own loss,
and the backends' gradients against finite differences directly (float64, small sizes)."""
from __future__ import annotations

import numpy as np
import pytest

import gpuloss as gl
from gpuloss import reference

from .cases import LOSSES, REDUCTIONS, loss_shape_of, make_inputs, make_weight
from .conftest import BACKENDS

DIFFERENTIABLE = [n for n in LOSSES if n != "weighted_reduce"]


def finite_difference(f, x, h=1e-6):
    """d sum(f(x)) / dx by central differences, one coordinate at a time."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        orig = x[i]
        x[i] = orig + h
        up = np.sum(f(x))
        x[i] = orig - h
        down = np.sum(f(x))
        x[i] = orig
        g[i] = (up - down) / (2 * h)
    return g


def _away_from_kinks(name, args):
    """Move inputs off the points where a loss is not differentiable (|d| = delta, margin = 0, ...)."""
    if name in ("absolute_difference", "huber", "smooth_l1"):
        pred, target = args
        d = pred - target
        near = np.abs(np.abs(d) - 1.0) < 1e-3
        near |= np.abs(d) < 1e-3
        pred = np.where(near, pred + 0.05, pred)
        return (pred, target)
    if name == "hinge":
        x, t = args
        y = 2 * t - 1
        x = np.where(np.abs(1 - y * x) < 1e-3, x + 0.05, x)
        return (x, t)
    return args


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_reference_grad_is_derivative_of_reference_loss(name, reduction, rng):
    shape = (3, 5)
    args, kwargs = make_inputs(name, shape, np.float64, rng)
    args = _away_from_kinks(name, args)
    kwargs.update(weight=make_weight("per_sample", loss_shape_of(name, shape), rng), reduction=reduction)
    if name == "softmax_cross_entropy":
        kwargs.update(label_smoothing=0.2, class_weight=rng.uniform(0.5, 2.0, shape[-1]))
    if name == "sigmoid_cross_entropy":
        kwargs.update(pos_weight=rng.uniform(0.5, 3.0, shape[-1]), label_smoothing=0.1)
    fn = getattr(reference, name)
    _, grad = fn(*args, **kwargs)
    rest = args[1:]
    fd = finite_difference(lambda x: fn(x, *rest, **kwargs)[0], args[0].copy())
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_backend_grad_is_derivative_of_reference_loss(name, backend, rng):
    shape = (4, 3)
    args, kwargs = make_inputs(name, shape, np.float64, rng)
    args = _away_from_kinks(name, args)
    kwargs.update(weight=make_weight("broadcast", loss_shape_of(name, shape), rng), reduction="mean")
    if name == "softmax_cross_entropy":
        t = rng.random(shape)
        args = (args[0], t / t.sum(-1, keepdims=True))  # probability targets this time
        kwargs.update(label_smoothing=0.3)
    _, grad = getattr(gl, name)(*args, return_grad=True, backend=backend, **kwargs)
    ref = getattr(reference, name)
    fd = finite_difference(lambda x: ref(x, *args[1:], **kwargs)[0], args[0].copy())
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)
