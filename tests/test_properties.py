"""Hypothesis property tests over shapes, axes, weights and options, against the reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuloss as gl

from .cases import LOSSES, REDUCTIONS, WEIGHT_FORMS, loss_shape_of, make_inputs, make_weight
from .conftest import assert_matches_reference

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
shapes = st.lists(st.integers(0, 6), min_size=1, max_size=4).map(tuple)


@SETTINGS
@given(shape=shapes, data=st.data())
def test_any_loss_any_shape_axis_weight(shape, data):
    name = data.draw(st.sampled_from(LOSSES))
    if name in ("softmax_cross_entropy", "cosine_distance") and shape[-1] == 0:
        shape = shape[:-1] + (1,)
    axis = -1
    if name in ("softmax_cross_entropy", "cosine_distance"):
        axis = data.draw(st.integers(-len(shape), len(shape) - 1))
        if shape[axis] == 0:
            return
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    args, kwargs = make_inputs(name, shape, dtype, rng, axis=axis)
    loss_shape = loss_shape_of(name, shape, axis)
    form = data.draw(st.sampled_from(WEIGHT_FORMS if loss_shape else ("none", "scalar")))
    kwargs["weight"] = make_weight(form, loss_shape, rng)
    kwargs["reduction"] = data.draw(st.sampled_from(REDUCTIONS))
    if name == "softmax_cross_entropy":
        kwargs["label_smoothing"] = data.draw(st.sampled_from([0.0, 0.1, 1.0]))
        if data.draw(st.booleans()):
            kwargs["class_weight"] = rng.uniform(0, 2, shape[axis])
    assert_matches_reference(name, args, kwargs, "cpu")


@SETTINGS
@given(rows=st.integers(1, 20), classes=st.integers(1, 50), scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
       seed=st.integers(0, 2**32 - 1))
def test_cross_entropy_loss_is_nonnegative_and_grad_rows_sum_to_zero(rows, classes, scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, classes)) * scale).astype(np.float32)
    y = rng.integers(0, classes, rows)
    loss, grad = gl.softmax_cross_entropy(x, y, reduction="none", return_grad=True)
    assert np.all(loss >= 0)
    # softmax(x) - onehot sums to 0 over classes
    np.testing.assert_allclose(grad.astype(np.float64).sum(-1), 0.0, atol=1e-5)


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 2**32 - 1),
       reduction=st.sampled_from(REDUCTIONS))
def test_weighted_reduce_equals_loss_reduction(shape, seed, reduction):
    """Reducing the 'none' output with weighted_reduce gives the reduced loss (one reduction code path)."""
    rng = np.random.default_rng(seed)
    p, t = rng.standard_normal(shape), rng.standard_normal(shape)
    w = make_weight("per_sample", shape, rng)
    per_element = gl.mean_squared_error(p, t, reduction="none")
    direct = gl.mean_squared_error(p, t, weight=w, reduction=reduction)
    via = gl.weighted_reduce(per_element, weight=w, reduction=reduction)
    np.testing.assert_allclose(via, direct, rtol=1e-12)
