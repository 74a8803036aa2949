"""Random inputs for every loss, shared by the test modules (fresh data on every call)."""
from __future__ import annotations

import math

import numpy as np

LOSSES = ("softmax_cross_entropy", "sigmoid_cross_entropy", "log_loss", "mean_squared_error",
          "absolute_difference", "huber", "smooth_l1", "hinge", "cosine_distance", "weighted_reduce")
REDUCTIONS = ("none", "sum", "mean", "sum_over_batch_size", "sum_by_nonzero_weights", "batch_size")
DTYPES = (np.float16, np.float32, np.float64)
WEIGHT_FORMS = ("none", "scalar", "per_sample", "broadcast")


def loss_shape_of(name: str, shape: tuple, axis: int = -1) -> tuple:
    ax = axis % len(shape)
    if name == "softmax_cross_entropy":
        return shape[:ax] + shape[ax + 1:]
    if name == "cosine_distance":
        return shape[:ax] + (1,) + shape[ax + 1:]
    return shape


def make_weight(form: str, loss_shape: tuple, rng):
    """A weight of the given form (docs/api.md §2.3.1); about a fifth of the entries are exactly 0."""
    def draw(shape):
        w = rng.uniform(0.1, 2.0, size=shape)
        w[rng.random(shape) < 0.2] = 0.0
        return w
    if form == "none":
        return None
    if form == "scalar":
        return float(rng.uniform(0.5, 2.0))
    if form == "per_sample":  # a leading prefix: TensorFlow's per-sample weights
        return draw(loss_shape[:1])
    if form == "broadcast":  # same rank, size-1 dims where the loss has more
        shape = tuple(1 if (i % 2 == 1 and s > 1) else s for i, s in enumerate(loss_shape))
        return draw(shape)
    raise ValueError(form)


def make_inputs(name: str, shape: tuple, dtype, rng, *, axis: int = -1, extreme: bool = False):
    """(args, kwargs) for gpuloss.<name> on fresh random data of ``shape`` (first argument's shape)."""
    dtype = np.dtype(dtype)
    scale = 1e4 if extreme else 3.0
    if name == "softmax_cross_entropy":
        logits = (rng.standard_normal(shape) * scale).astype(dtype)
        C = shape[axis]
        y = rng.integers(0, C, size=loss_shape_of(name, shape, axis))
        y[rng.random(y.shape) < 0.15] = -100
        return (logits, y), {"axis": axis}
    if name == "sigmoid_cross_entropy":
        x = (rng.standard_normal(shape) * scale).astype(dtype)
        return (x, rng.random(shape).round(1).astype(dtype)), {}
    if name == "log_loss":
        p = rng.uniform(0.01, 0.99, size=shape).astype(dtype)
        return (p, (rng.random(shape) < 0.5).astype(dtype)), {}
    if name == "hinge":
        return ((rng.standard_normal(shape) * scale).astype(dtype), (rng.random(shape) < 0.5).astype(dtype)), {}
    if name == "cosine_distance":
        p = rng.standard_normal(shape)
        t = rng.standard_normal(shape)
        p /= np.linalg.norm(p, axis=axis, keepdims=True) + 1e-30
        t /= np.linalg.norm(t, axis=axis, keepdims=True) + 1e-30
        return (p.astype(dtype), t.astype(dtype)), {"axis": axis}
    if name == "weighted_reduce":
        return ((rng.standard_normal(shape) * scale).astype(dtype),), {}
    pred = (rng.standard_normal(shape) * scale).astype(dtype)
    target = (rng.standard_normal(shape) * scale).astype(dtype)
    return (pred, target), {}


def tolerance(dtype) -> tuple[float, float]:
    """(loss rtol, grad rtol) against the float64 reference (docs/api.md §3.2: 1e-5 for float32)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return 1e-11, 1e-10
    if dtype.itemsize == 2:  # loss in float32; grad rounded to 16 bits
        return 2e-5, 2e-3 if dtype == np.float16 else 1.6e-2
    return 1e-5, 1e-4


def size_of(shape) -> int:
    return math.prod(shape)
