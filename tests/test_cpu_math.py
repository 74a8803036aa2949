"""The vectorised float32 math of the cpu backend (gpuloss/backends/cpu_math.py) and the fast
cross entropy path built on it, against float64."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import gpuloss as gl
from gpuloss import reference
from gpuloss.backends.cpu_math import exp_nonpositive, log1p_f32, log1p_unit, log_f32, maxnum

from .conftest import assert_matches_reference


@njit(cache=True, fastmath={"reassoc", "contract"})
def _exp_all(t, out):
    for i in range(t.size):
        out[i] = exp_nonpositive(t[i])


@njit(cache=True, fastmath={"reassoc", "contract"})
def _log_all(x, out):
    for i in range(x.size):
        out[i] = log_f32(x[i])


@njit(cache=True, fastmath={"reassoc", "contract"})
def _log1p_any_all(v, out):
    for i in range(v.size):
        out[i] = log1p_f32(v[i])


@njit(cache=True, fastmath={"reassoc", "contract"})
def _log1p_all(u, out):
    for i in range(u.size):
        out[i] = log1p_unit(u[i])


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


def test_log_relative_error_over_every_float32_exponent(rng):
    # Every 61st positive finite bit pattern (subnormals included) plus random points near 1, where
    # log x is tiny and only a method without cancellation keeps its relative accuracy.
    bits = np.arange(1, 0x7F800000, 61, dtype=np.int64).astype(np.uint32).view(np.float32)
    x = np.concatenate([bits, (1 + rng.uniform(-0.3, 0.4, 1_000_000)).astype(np.float32),
                        np.float32([1 - 2 ** -24, 1 + 2 ** -23, np.sqrt(2), np.finfo(np.float32).max])])
    x = x[x != 1]
    out = np.empty_like(x)
    _log_all(x, out)
    exact = np.log(x.astype(np.float64))
    rel = np.abs(out - exact) / np.abs(exact)
    assert rel.max() < 2.5e-7, f"max relative error {rel.max():.3g} at x={x[rel.argmax()]!r}"


def test_log_special_values_follow_ieee():
    x = np.float32([0.0, -0.0, -1e-30, -1.0, -np.inf, np.inf, np.nan, 1.0])
    out = np.empty_like(x)
    _log_all(x, out)
    assert out[0] == out[1] == -np.inf and np.all(np.isnan(out[2:5])) and out[5] == np.inf
    assert np.isnan(out[6]) and out[7] == 0.0


def test_log1p_on_the_unit_interval(rng):
    u = np.concatenate([np.linspace(0, 1, 1_000_001, dtype=np.float32), rng.random(1_000_000).astype(np.float32),
                        np.float32([1e-45, 1.2e-38, 1e-20, 1e-8, 2 ** -24])])
    u = u[u > 0]
    out = np.empty_like(u)
    _log1p_all(u, out)
    exact = np.log1p(u.astype(np.float64))
    rel = np.abs(out - exact) / exact
    assert rel.max() < 2.5e-7, f"max relative error {rel.max():.3g} at u={u[rel.argmax()]!r}"
    special = np.float32([0.0, np.nan])
    _log1p_all(special, special)
    assert special[0] == 0.0 and np.isnan(special[1])


def test_log1p_of_any_float32(rng):
    v = np.concatenate([rng.uniform(-1, 1, 1_000_000), -rng.uniform(0, 1, 100_000) * 1e-6,
                        rng.exponential(1e-3, 100_000), np.exp(rng.uniform(-80, 80, 100_000)),
                        [-1 + 2 ** -24, -0.2928932, 0.4142135, 2 ** -149, -2 ** -149]]).astype(np.float32)
    v = v[(v != 0) & (v > -1)]
    out = np.empty_like(v)
    _log1p_any_all(v, out)
    exact = np.log1p(v.astype(np.float64))
    rel = np.abs(out - exact) / np.abs(exact)
    assert rel.max() < 3e-7, f"max relative error {rel.max():.3g} at v={v[rel.argmax()]!r}"
    special = np.float32([0.0, -1.0, -2.0, np.inf, np.nan])
    _log1p_any_all(special, special)
    assert special[0] == 0 and special[1] == -np.inf and np.isnan(special[2]) and special[3] == np.inf
    assert np.isnan(special[4])


@pytest.mark.parametrize("name", ["sigmoid_cross_entropy", "log_loss"])
def test_float32_element_losses_keep_per_element_relative_accuracy(name, rng):
    # The vectorised exp/log path, element by element, not only relative to the largest loss:
    # confident elements (loss ~ 1e-9 .. 1e-30) keep their digits.
    n = 20001
    if name == "sigmoid_cross_entropy":
        x = (rng.standard_normal(n) * 30).astype(np.float32)
        t = (x > 0).astype(np.float32)               # every element right: loss = softplus(-|x|)
        kwargs = {}
    else:
        t = (rng.random(n) < 0.5).astype(np.float32)
        x = np.where(t == 1, 1 - rng.uniform(0, 1e-3, n), rng.uniform(0, 1e-3, n)).astype(np.float32)
        kwargs = {"epsilon": 0.0}
    loss, grad = getattr(gl, name)(x, t, reduction="none", return_grad=True, **kwargs)
    ref_loss, ref_grad = getattr(reference, name)(x, t, reduction="none", **kwargs)
    keep = ref_loss > 1e-37                          # float32 normals (below, exp underflows by design)
    assert keep.sum() > n // 2
    rel = np.abs(loss[keep] - ref_loss[keep]) / ref_loss[keep]
    assert rel.max() < 1e-6, f"{name}: max relative error {rel.max():.3g}"
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-37)


def test_cached_cpu_kernels_are_fresh_over_every_cpu_source(tmp_path):
    # A kernel in cpu.py inlines cpu_math / cpu_half code: Numba's own stamp (the defining file) kept an
    # old build after an edit of cpu_math.py alone.  The stamp covers every backends/cpu*.py.
    from gpuloss.backends import _numba_cache as nc
    from gpuloss.backends import cpu, cpu_half, cpu_vocab

    assert {p.name for p in nc.kernel_sources()} >= {"cpu.py", "cpu_math.py", "cpu_half.py", "cpu_vocab.py"}
    for kernel in (cpu._row_max_vec, cpu_half._f16_to_f32, cpu_vocab._stats_scalar, cpu._xent_prob_kernel.parallel):
        locator = kernel._cache._impl.locator
        assert type(locator) in nc.LOCATORS
        assert locator.get_source_stamp() == nc.source_stamp(nc.kernel_sources())
    files = [tmp_path / "cpu.py", tmp_path / "cpu_math.py"]
    for f in files:
        f.write_text("x = 1\n")
    before = nc.source_stamp(files)
    files[1].write_text("x = 22\n")
    assert nc.source_stamp(files) != before
