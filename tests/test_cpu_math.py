"""The vectorised float32 math of the cpu backend (gpuloss/backends/cpu_math.py) and the fast
cross entropy path built on it, against float64."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import gpuloss as gl
from gpuloss.backends.cpu_math import exp_nonpositive, maxnum

from .conftest import assert_matches_reference


@njit(cache=True, fastmath={"reassoc", "contract"})
def _exp_all(t, out):
    for i in range(t.size):
        out[i] = exp_nonpositive(t[i])


@njit(cache=True, fastmath={"reassoc", "contract"})
def _max_all(x):
    m = x[0]
    for i in range(x.size):
        m = maxnum(m, x[i])
    return m


def test_exp_relative_error_over_the_whole_softmax_range(rng):
    # [-87, 0]: a dense grid plus random points (at and below -87 the result is 0, see the next test).
    t = np.concatenate([np.linspace(-86.999, 0, 3_000_001, dtype=np.float32),
                        -rng.exponential(5, 1_000_000).astype(np.float32).clip(0, 86.999),
                        np.float32([0.0, -0.0, -1e-30, -1e-7, -0.5, -0.34657359, -0.34657360, -86.9999])])
    out = np.empty_like(t)
    _exp_all(t, out)
    exact = np.exp(t.astype(np.float64))
    rel = np.abs(out - exact) / exact
    assert rel.max() < 1.5e-7, f"max relative error {rel.max():.3g} at t={t[rel.argmax()]}"


def test_exp_underflow_and_minus_inf_give_zero_and_nan_stays_nan():
    t = np.float32([-np.inf, -1e4, -87.0, -88.0, -200.0, -3.4e38, np.nan])
    out = np.ones_like(t)
    _exp_all(t, out)
    assert np.all(out[:-1] == 0.0) and np.isnan(out[-1])


def test_maxnum_reduction_ignores_nan_and_sees_infinities(rng):
    x = rng.standard_normal(1001).astype(np.float32)
    assert _max_all(x) == x.max()
    x[500] = np.nan
    assert _max_all(x) == np.nanmax(x)
    x[7] = np.inf
    assert _max_all(x) == np.inf
    assert _max_all(np.full(33, -np.inf, np.float32)) == -np.inf


@pytest.mark.parametrize("classes", [262144])
def test_cross_entropy_float32_at_the_largest_class_count(classes, rng):
    # docs/api.md §3.2: float32 within 1e-5 relative of float64 for C up to 262144.
    logits = (rng.standard_normal((3, classes)) * 4).astype(np.float32)
    y = rng.integers(0, classes, 3)
    for reduction in ("none", "mean"):
        assert_matches_reference("softmax_cross_entropy", (logits, y),
                                 {"reduction": reduction, "label_smoothing": 0.1}, "cpu")


def test_fast_path_masked_classes_get_exactly_zero_gradient(rng):
    logits = (rng.standard_normal((4, 2000)) * 3).astype(np.float32)
    logits[:, ::3] = -np.inf  # a masked vocabulary
    y = np.array([1, 2, 4, 5])
    loss, grad = gl.softmax_cross_entropy(logits, y, return_grad=True)
    assert np.all(grad[:, ::3] == 0.0)
    assert_matches_reference("softmax_cross_entropy", (logits, y), {"reduction": "none"}, "cpu")


def test_small_confident_losses_keep_their_relative_accuracy(rng):
    # Loss ~ 1e-6: -logp_y = log(s) with s = 1 + tiny; float32 e-terms must not swamp it.
    logits = (rng.standard_normal((5, 1000)) * 0.5).astype(np.float32)
    y = rng.integers(0, 1000, 5)
    logits[np.arange(5), y] = 25.0
    loss, _ = assert_matches_reference("softmax_cross_entropy", (logits, y), {"reduction": "none"}, "cpu")
    assert np.all(loss < 1e-7)
