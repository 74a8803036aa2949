"""Every loss x reduction x dtype x weight form, on every backend, against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

from .cases import DTYPES, LOSSES, REDUCTIONS, WEIGHT_FORMS, loss_shape_of, make_inputs, make_weight
from .conftest import BACKENDS, assert_matches_reference

ELEMENTWISE = [n for n in LOSSES if n not in ("softmax_cross_entropy", "cosine_distance", "weighted_reduce")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_form", WEIGHT_FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_reduction_dtype_weight(name, reduction, dtype, weight_form, backend, rng):
    shape = (7, 13)
    args, kwargs = make_inputs(name, shape, dtype, rng)
    kwargs["weight"] = make_weight(weight_form, loss_shape_of(name, shape), rng)
    kwargs["reduction"] = reduction
    assert_matches_reference(name, args, kwargs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [1, 3, 1000, 32003])
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_cross_entropy_odd_sizes(rows, classes, backend, rng):
    args, kwargs = make_inputs("softmax_cross_entropy", (rows, classes), np.float32, rng)
    for reduction in ("none", "mean"):
        assert_matches_reference("softmax_cross_entropy", args, {**kwargs, "reduction": reduction}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("options", [
    {"label_smoothing": 0.1},
    {"class_weight": "random"},
    {"class_weight": "random", "label_smoothing": 0.25, "ignore_index": 2},
    {"label_smoothing": 1.0},
])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sum_by_nonzero_weights"])
def test_cross_entropy_index_options(options, reduction, dtype, backend, rng):
    args, kwargs = make_inputs("softmax_cross_entropy", (9, 11), dtype, rng)
    options = dict(options)
    if options.get("class_weight") == "random":
        options["class_weight"] = rng.uniform(0.0, 3.0, 11)
    if "ignore_index" in options:  # a class index itself may be the ignored label
        logits, y = args
        args = (logits, np.where(y == -100, options["ignore_index"], y))
    assert_matches_reference("softmax_cross_entropy", args, {**kwargs, **options, "reduction": reduction,
                                                            "weight": make_weight("per_sample", (9,), rng)}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_probability_targets(reduction, dtype, backend, rng):
    logits = (rng.standard_normal((6, 5)) * 3).astype(dtype)
    t = rng.random((6, 5))
    t /= t.sum(-1, keepdims=True)
    kwargs = {"label_smoothing": 0.2, "class_weight": rng.uniform(0.5, 2, 5), "reduction": reduction,
              "weight": make_weight("per_sample", (6,), rng)}
    assert_matches_reference("softmax_cross_entropy", (logits, t.astype(dtype)), kwargs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_cross_entropy_any_class_axis(axis, backend, rng):
    shape = (4, 6, 5)
    args, kwargs = make_inputs("softmax_cross_entropy", shape, np.float32, rng, axis=axis)
    kwargs["weight"] = make_weight("broadcast", loss_shape_of("softmax_cross_entropy", shape, axis), rng)
    for reduction in ("none", "mean", "batch_size"):
        assert_matches_reference("softmax_cross_entropy", args, {**kwargs, "reduction": reduction}, backend)
    # probability targets on the same axis
    t = rng.random(shape).astype(np.float32)
    assert_matches_reference("softmax_cross_entropy", (args[0], t), {"axis": axis, "reduction": "sum"}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_unbatched_single_measurement(backend, rng):
    logits = rng.standard_normal(10).astype(np.float32)
    for reduction in REDUCTIONS:
        assert_matches_reference("softmax_cross_entropy", (logits, np.array(4)), {"reduction": reduction}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_cross_entropy_extremes(dtype, backend, rng):
    # |logits| ~ 1e4, masked classes at -inf, a row that is all -inf but for the target.
    args, kwargs = make_inputs("softmax_cross_entropy", (8, 17), dtype, rng, extreme=True)
    logits, y = args
    logits[1, :5] = -np.inf
    y[1] = 7
    logits[2, :] = -np.inf
    logits[2, 3] = 0.0
    y[2] = 3
    for reduction in ("none", "mean"):
        loss, _ = assert_matches_reference("softmax_cross_entropy", (logits, y), {"reduction": reduction}, backend)
        assert np.all(np.isfinite(loss))
    # label smoothing over a masked class is +inf, as in PyTorch
    loss, _ = assert_matches_reference("softmax_cross_entropy", (logits, y),
                                       {"reduction": "none", "label_smoothing": 0.1}, backend)
    assert np.isinf(loss[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_gives_nan_for_that_row_only(backend, rng):
    logits = rng.standard_normal((5, 9)).astype(np.float32)
    logits[3, 4] = np.nan
    y = rng.integers(0, 9, 5)
    loss, grad = assert_matches_reference("softmax_cross_entropy", (logits, y), {"reduction": "none"}, backend)
    assert np.isnan(loss[3]) and np.all(np.isfinite(np.delete(loss, 3)))
    assert np.all(np.isnan(grad[3])) and np.all(np.isfinite(np.delete(grad, 3, axis=0)))
    x = rng.standard_normal((4, 6)).astype(np.float32)
    x[2, 1] = np.nan
    for name in ELEMENTWISE:
        args, kwargs = make_inputs(name, (4, 6), np.float32, rng)
        args = (x if name != "log_loss" else np.where(np.isnan(x), np.nan, args[0]).astype(np.float32),) + args[1:]
        loss, grad = assert_matches_reference(name, args, {"reduction": "none"}, backend)
        assert np.isnan(loss[2, 1]) and np.isnan(grad[2, 1]), name
        assert np.isfinite(np.delete(loss.ravel(), 2 * 6 + 1)).all(), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [5, 40, 3000])
def test_plus_infinity_logit_gives_nan_row(classes, backend, rng):
    # +inf - logsumexp is inf - inf: undefined, so the row is NaN (as the reference and PyTorch's log_softmax).
    logits = rng.standard_normal((3, classes)).astype(np.float32)
    logits[1, 2] = np.inf
    y = np.array([0, 2, 1])
    loss, grad = assert_matches_reference("softmax_cross_entropy", (logits, y), {"reduction": "none"}, backend)
    assert np.isnan(loss[1]) and np.isnan(grad[1]).all() and np.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_extreme_values(name, backend, rng):
    args, kwargs = make_inputs(name, (6, 8), np.float32, rng, extreme=True)
    for reduction in ("none", "sum_over_batch_size"):
        loss, grad = assert_matches_reference(name, args, {**kwargs, "reduction": reduction}, backend)
        assert np.all(np.isfinite(loss))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_input_gives_zero_loss_and_grad(name, reduction, backend, rng):
    shape = (0, 5)
    args, kwargs = make_inputs(name, shape, np.float32, rng)
    loss, grad = assert_matches_reference(name, args, {**kwargs, "reduction": reduction}, backend)
    if reduction != "none":
        assert float(loss) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum_by_nonzero_weights", "sum"])
def test_all_ignored_batch_is_zero_not_nan(reduction, backend, rng):
    logits = rng.standard_normal((6, 4)).astype(np.float32)
    y = np.full(6, -100)
    loss, grad = assert_matches_reference("softmax_cross_entropy", (logits, y),
                                          {"reduction": reduction, "label_smoothing": 0.1}, backend)
    assert float(loss) == 0.0 and not grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_all_zero_weights_is_zero_not_nan(name, backend, rng):
    shape = (5, 6)
    args, kwargs = make_inputs(name, shape, np.float32, rng)
    weight = np.zeros(loss_shape_of(name, shape)[:1])
    for reduction in ("mean", "sum_by_nonzero_weights"):
        loss, grad = assert_matches_reference(name, args, {**kwargs, "weight": weight, "reduction": reduction},
                                              backend)
        assert float(loss) == 0.0
        assert grad is None or not grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_pos_weight_and_smoothing(backend, rng):
    x = (rng.standard_normal((5, 4, 6)) * 4).astype(np.float32)
    t = (rng.random((5, 4, 6)) < 0.4).astype(np.float32)
    for pos_weight in (rng.uniform(0.5, 4, 6), 3.0, rng.uniform(0.5, 4, (4, 1)), rng.uniform(0.5, 4, (4, 6))):
        for reduction in ("none", "mean"):
            assert_matches_reference("sigmoid_cross_entropy", (x, t),
                                     {"pos_weight": pos_weight, "label_smoothing": 0.1, "reduction": reduction,
                                      "weight": make_weight("per_sample", (5,), rng)}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,param,values", [
    ("huber", "delta", [0.1, 1.0, 5.0]),
    ("smooth_l1", "beta", [0.0, 0.5, 2.0]),
    ("log_loss", "epsilon", [0.0, 1e-7, 0.1]),
])
def test_loss_parameters(name, param, values, backend, rng):
    for value in values:
        args, _ = make_inputs(name, (7, 5), np.float64, rng)
        assert_matches_reference(name, args, {param: value, "reduction": "none"}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cosine_distance_axes(axis, backend, rng):
    shape = (3, 8, 5)
    args, kwargs = make_inputs("cosine_distance", shape, np.float32, rng, axis=axis)
    kwargs["weight"] = make_weight("per_sample", loss_shape_of("cosine_distance", shape, axis), rng)
    for reduction in REDUCTIONS:
        assert_matches_reference("cosine_distance", args, {**kwargs, "reduction": reduction}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, rng):
    big = (rng.standard_normal((10, 24)) * 2).astype(np.float32)
    logits = big[::2, ::3]  # strided view, neither C nor F contiguous
    y = rng.integers(0, logits.shape[1], 10)[::2]
    assert not logits.flags.c_contiguous
    assert_matches_reference("softmax_cross_entropy", (logits, y), {"reduction": "none"}, backend)
    assert_matches_reference("softmax_cross_entropy", (logits.T, y), {"axis": 0}, backend)
    t = rng.standard_normal((24, 10)).astype(np.float32).T[::2, ::3]
    for name in ("mean_squared_error", "huber", "absolute_difference"):
        assert_matches_reference(name, (logits, t), {"reduction": "none"}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_inputs_are_never_modified(name, backend, rng):
    args, kwargs = make_inputs(name, (6, 7), np.float32, rng)
    kwargs["weight"] = make_weight("per_sample", loss_shape_of(name, (6, 7)), rng)
    copies = [a.copy() for a in args]
    weight_copy = kwargs["weight"].copy()
    assert_matches_reference(name, args, kwargs, backend)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(kwargs["weight"], weight_copy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_and_bool_targets_for_elementwise(backend, rng):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    for t in ((rng.random((4, 5)) < 0.5), rng.integers(0, 2, (4, 5)).astype(np.int8)):
        for name in ("hinge", "sigmoid_cross_entropy", "mean_squared_error"):
            assert_matches_reference(name, (x, t), {"reduction": "none"}, backend)


def test_bfloat16_inputs(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    logits = rng.standard_normal((5, 33)).astype(bf16)
    y = rng.integers(0, 33, 5)
    loss, grad = assert_matches_reference("softmax_cross_entropy", (logits, y), {}, "cpu")
    assert grad.dtype == bf16
    assert_matches_reference("mean_squared_error", (logits, logits * 0.5), {"reduction": "sum"}, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_loss_at_zero_probability_without_epsilon_is_infinite_not_an_error(backend):
    # IEEE division: -t / (p + 0) is -inf at p = 0 (no ZeroDivisionError inside a kernel).
    probs = np.array([0.0, 1.0, 0.5], np.float32)
    target = np.array([1.0, 0.0, 1.0], np.float32)
    loss, grad = assert_matches_reference("log_loss", (probs, target), {"epsilon": 0.0, "reduction": "none"}, backend)
    assert np.isinf(loss[:2]).all() and np.isinf(grad[:2]).all() and np.isfinite(loss[2])
