"""Agreement with torch.nn.functional on the same inputs, for the reductions torch has."""
from __future__ import annotations

import numpy as np
import pytest

from .conftest import BACKENDS, run_loss

torch = pytest.importorskip("torch", reason="the torch comparison needs PyTorch (pip install -e .[test])")
F = torch.nn.functional


def _torch_loss_and_grad(fn, x, *args, **kwargs):
    xt = torch.tensor(x, requires_grad=True)
    out = fn(xt, *args, **kwargs)
    out.sum().backward()
    return out.detach().numpy(), xt.grad.numpy()


def _check(ours, theirs, rtol=1e-5):
    (loss, grad), (tloss, tgrad) = ours, theirs
    np.testing.assert_allclose(loss, tloss, rtol=rtol, atol=rtol * (np.abs(tloss).max(initial=0) + 1e-30))
    np.testing.assert_allclose(grad, tgrad, rtol=rtol * 10, atol=rtol * (np.abs(tgrad).max(initial=0) + 1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("options", [
    {}, {"label_smoothing": 0.15}, {"weight": True}, {"weight": True, "label_smoothing": 0.3},
    {"ignore_index": 1, "weight": True, "label_smoothing": 0.05},
])
@pytest.mark.parametrize("shape,axis", [((8, 11), 1), ((4, 7, 5), 1), ((3, 6), 1)])
def test_cross_entropy_index_targets(shape, axis, options, reduction, backend, rng):
    x = rng.standard_normal(shape) * 2
    C = shape[axis]
    y = rng.integers(0, C, size=shape[:axis] + shape[axis + 1:])
    ignore = options.get("ignore_index", -100)
    y[rng.random(y.shape) < 0.2] = ignore
    y.flat[0] = (ignore + 1) % C  # torch's mean over an all-ignored batch is NaN; ours is 0 (docs/api.md §5)
    cw = rng.uniform(0.2, 2.0, C) if options.get("weight") else None
    eps = options.get("label_smoothing", 0.0)
    ours = run_loss("softmax_cross_entropy", (x, y), {"axis": axis, "class_weight": cw, "ignore_index": ignore,
                                                      "label_smoothing": eps, "reduction": reduction}, backend)
    theirs = _torch_loss_and_grad(F.cross_entropy, x, torch.tensor(y), weight=None if cw is None else
                                  torch.tensor(cw), ignore_index=ignore, label_smoothing=eps, reduction=reduction)
    _check(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_cross_entropy_probability_targets(reduction, backend, rng):
    x = rng.standard_normal((6, 9)) * 2
    t = rng.random((6, 9))
    t /= t.sum(-1, keepdims=True)
    cw = rng.uniform(0.2, 2.0, 9)
    ours = run_loss("softmax_cross_entropy", (x, t), {"class_weight": cw, "label_smoothing": 0.1,
                                                      "reduction": reduction}, backend)
    theirs = _torch_loss_and_grad(F.cross_entropy, x, torch.tensor(t), weight=torch.tensor(cw),
                                  label_smoothing=0.1, reduction=reduction)
    _check(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_cross_entropy_float32_matches_torch_float32(reduction, backend, rng):
    x = (rng.standard_normal((16, 1000)) * 4).astype(np.float32)
    y = rng.integers(0, 1000, 16)
    ours = run_loss("softmax_cross_entropy", (x, y), {"reduction": reduction}, backend)
    theirs = _torch_loss_and_grad(F.cross_entropy, x, torch.tensor(y), reduction=reduction)
    _check(ours, theirs, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_binary_cross_entropy_with_logits(reduction, backend, rng):
    x = rng.standard_normal((5, 7)) * 5
    t = rng.random((5, 7))
    pw = rng.uniform(0.3, 4.0, 7)
    for pos_weight in (None, pw):
        ours = run_loss("sigmoid_cross_entropy", (x, t), {"pos_weight": pos_weight, "reduction": reduction}, backend)
        theirs = _torch_loss_and_grad(F.binary_cross_entropy_with_logits, x, torch.tensor(t),
                                      pos_weight=None if pos_weight is None else torch.tensor(pos_weight),
                                      reduction=reduction)
        _check(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ours_name,torch_fn,kw,torch_kw", [
    ("mean_squared_error", F.mse_loss, {}, {}),
    ("absolute_difference", F.l1_loss, {}, {}),
    ("huber", F.huber_loss, {"delta": 0.7}, {"delta": 0.7}),
    ("smooth_l1", F.smooth_l1_loss, {"beta": 0.5}, {"beta": 0.5}),
    ("smooth_l1", F.smooth_l1_loss, {"beta": 0.0}, {"beta": 0.0}),
])
def test_regression_losses(ours_name, torch_fn, kw, torch_kw, reduction, backend, rng):
    p = rng.standard_normal((6, 5))
    t = rng.standard_normal((6, 5))
    ours = run_loss(ours_name, (p, t), {**kw, "reduction": reduction}, backend)
    theirs = _torch_loss_and_grad(torch_fn, p, torch.tensor(t), reduction=reduction, **torch_kw)
    _check(ours, theirs)


def test_all_ignored_mean_is_zero_where_torch_gives_nan(rng):
    # The one documented departure: docs/api.md §5 makes an empty mean 0 (loss and grad), never NaN.
    x = rng.standard_normal((4, 5))
    y = np.full(4, -100)
    ours = run_loss("softmax_cross_entropy", (x, y), {}, "cpu")
    theirs = _torch_loss_and_grad(F.cross_entropy, x, torch.tensor(y))
    assert float(ours[0]) == 0.0 and not ours[1].any()
    assert np.isnan(theirs[0])
