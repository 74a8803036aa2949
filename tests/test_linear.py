"""gpuloss.linear_cross_entropy against the unfused path and the float64 reference.

The unfused path is ``softmax_cross_entropy(x @ W.T + b, ...)`` on the same backend,
whose gradient G (d loss / d logits) gives d_input = G @ W, d_W = G.T @ x, d_b = G.sum(0).
Fresh random data on every run (the seed is printed by the ``rng`` fixture).
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import gpuloss as gl
from gpuloss import reference
from gpuloss.linear import DEFAULT_CHUNK_BYTES, min_chunk_bytes

from .cases import REDUCTIONS

try:
    import ml_dtypes
except ImportError:  # bfloat16 cases skip
    ml_dtypes = None

RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
HAS_Z_LOSS = "z_loss" in inspect.signature(gl.softmax_cross_entropy).parameters


def _data(rng, N, H, V, dtype=np.float32, *, bias=True, ignore_frac=0.15, lead=None):
    lead = (N,) if lead is None else lead
    x = (rng.standard_normal(lead + (H,)) * 0.7).astype(dtype)
    W = (rng.standard_normal((V, H)) / np.sqrt(max(H, 1)) * 2).astype(dtype)
    b = rng.standard_normal(V).astype(dtype) if bias else None
    y = rng.integers(0, V, size=lead)
    y[rng.random(lead) < ignore_frac] = -100
    return x, W, b, y


def _per_sample(rng, lead):
    w = rng.uniform(0.1, 2.0, size=lead[:1])
    w[rng.random(w.shape) < 0.2] = 0.0
    return w


def _expected_grads(G, x, W, has_bias):
    """Grads of input / weight / bias from the logits' gradient G (any precision)."""
    H = x.shape[-1]
    G2 = G.reshape(-1, W.shape[0])
    x2 = x.reshape(-1, H)
    return (G2 @ W).reshape(x.shape), G2.T @ x2, (G2.sum(0) if has_bias else None)


def _close(actual, expected, rtol, what, scale):
    """|actual - expected| <= rtol * scale elementwise, scale = a magnitude of the sum's terms."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err = np.max(np.abs(actual - expected), initial=0.0)
    assert err <= rtol * scale + 1e-300, f"{what}: max error {err:.3e} > {rtol:.1e} x scale {scale:.3e}"


def _scales(G, x, W):
    """Magnitudes for the grads: the sums of |terms| (a cancelling sum is accurate relative to these)."""
    aG = np.abs(G.reshape(-1, W.shape[0]).astype(np.float64))
    ax = np.abs(x.reshape(-1, x.shape[-1]).astype(np.float64))
    aW = np.abs(W.astype(np.float64))
    return (max(np.max(aG @ aW, initial=0), 1e-30), max(np.max(aG.T @ ax, initial=0), 1e-30),
            max(np.max(aG.sum(0), initial=0), 1e-30))


def _check_against(loss, grads, ref_loss, G, x, W, b, rtol, what):
    # Every loss here is a sum of non-negative terms (no cancellation): relative to its largest value.
    ref_loss = np.asarray(ref_loss, np.float64)
    ls = max(np.max(np.abs(ref_loss), initial=0.0), 1e-30)
    _close(loss, ref_loss, rtol, f"{what} loss", ls)
    if grads is None:
        return
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    exp = _expected_grads(np.asarray(G, np.float64), x64, W64, b is not None)
    sc = _scales(G, x64, W64)
    assert grads.input.dtype == x.dtype and grads.input.shape == x.shape
    assert grads.linear_weight.dtype == W.dtype and grads.linear_weight.shape == W.shape
    _close(grads.input, exp[0], rtol, f"{what} d_input", sc[0])
    _close(grads.linear_weight, exp[1], rtol, f"{what} d_linear_weight", sc[1])
    if b is None:
        assert grads.linear_bias is None
    else:
        assert grads.linear_bias.dtype == b.dtype and grads.linear_bias.shape == b.shape
        _close(grads.linear_bias, exp[2], rtol, f"{what} d_linear_bias", sc[2])


def _reference(x, W, b, y, **kw):
    logits = x.astype(np.float64) @ W.astype(np.float64).T
    if b is not None:
        logits = logits + b.astype(np.float64)
    return reference.softmax_cross_entropy(logits, y, **kw)


# ---------------------------------------------------------------------------------------------
# Agreement with the unfused path and the float64 reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_reduction_matches_unfused_and_reference(rng, reduction, dtype):
    N, H, V = 53, 24, 37
    x, W, b, y = _data(rng, N, H, V, dtype)
    kw = dict(weight=_per_sample(rng, (N,)), class_weight=rng.uniform(0.2, 2.0, V), label_smoothing=0.1,
              reduction=reduction)
    # 7 rows per chunk: 53 rows split 7 x 7 + 4
    cb = 7 * min_chunk_bytes(V, H, dtype)
    loss, grads = gl.linear_cross_entropy(x, W, y, linear_bias=b, return_grad=True, chunk_bytes=cb, **kw)
    assert np.asarray(loss).dtype == np.dtype(dtype)
    rtol = RTOL[np.dtype(dtype)]
    logits = x @ W.T + b
    u_loss, G = gl.softmax_cross_entropy(logits, y, return_grad=True, **kw)
    _check_against(loss, grads, u_loss, G, x, W, b, rtol, "vs unfused")
    ref_loss, ref_G = _reference(x, W, b, y, **kw)
    _check_against(loss, grads, ref_loss, ref_G, x, W, b, rtol, "vs reference")
    # Without the gradient: the same loss, bit for bit.
    np.testing.assert_array_equal(gl.linear_cross_entropy(x, W, y, linear_bias=b, chunk_bytes=cb, **kw), loss)


@pytest.mark.parametrize("options", [
    dict(),
    dict(class_weight=True),
    dict(ignore_index=None),
    dict(ignore_index=3),
    dict(label_smoothing=0.25),
    dict(weight="per_sample"),
    dict(weight="scalar"),
    dict(weight="per_sample", class_weight=True, label_smoothing=0.05, ignore_index=2),
], ids=["plain", "class_weight", "ignore_none", "ignore_3", "smoothing", "per_sample", "scalar", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum_by_nonzero_weights", "none"])
def test_options_match_reference(rng, options, reduction):
    N, H, V = 41, 16, 9
    x, W, b, y = _data(rng, N, H, V, np.float64)
    kw = dict(options, reduction=reduction)
    if kw.get("class_weight") is True:
        kw["class_weight"] = rng.uniform(0.2, 2.0, V)
    if kw.get("weight") == "per_sample":
        kw["weight"] = _per_sample(rng, (N,))
    elif kw.get("weight") == "scalar":
        kw["weight"] = 1.7
    if kw.get("ignore_index", -100) is None:
        y = rng.integers(0, V, N)  # no -100 allowed when nothing is ignored
    elif kw.get("ignore_index", -100) != -100:
        y[y == -100] = kw["ignore_index"]
    cb = 5 * min_chunk_bytes(V, H, np.float64)
    loss, grads = gl.linear_cross_entropy(x, W, y, linear_bias=b, return_grad=True, chunk_bytes=cb, **kw)
    ref_loss, ref_G = _reference(x, W, b, y, **kw)
    _check_against(loss, grads, ref_loss, ref_G, x, W, b, 1e-12, str(options))


def test_probability_targets_and_no_bias(rng):
    N, H, V = 30, 12, 7
    x, W, _, _ = _data(rng, N, H, V, np.float64, bias=False)
    t = rng.random((N, V))
    t /= t.sum(1, keepdims=True)
    kw = dict(weight=_per_sample(rng, (N,)), class_weight=rng.uniform(0.5, 1.5, V), label_smoothing=0.2)
    for reduction in REDUCTIONS:
        loss, grads = gl.linear_cross_entropy(x, W, t, return_grad=True, reduction=reduction,
                                              chunk_bytes=4 * min_chunk_bytes(V, H, np.float64), **kw)
        ref_loss, ref_G = _reference(x, W, None, t, reduction=reduction, **kw)
        _check_against(loss, grads, ref_loss, ref_G, x, W, None, 1e-12, f"probabilities {reduction}")


@pytest.mark.parametrize("V", [1, 3, 32003])
def test_odd_vocabulary_sizes(rng, V):
    N, H = (6, 8) if V > 1000 else (29, 10)
    for dtype in (np.float32, np.float64):
        x, W, b, y = _data(rng, N, H, V, dtype)
        rows = 4 if V > 1000 else 3
        loss, grads = gl.linear_cross_entropy(x, W, y, linear_bias=b, return_grad=True,
                                              chunk_bytes=rows * min_chunk_bytes(V, H, dtype))
        ref_loss, ref_G = _reference(x, W, b, y)
        _check_against(loss, grads, ref_loss, ref_G, x, W, b, RTOL[np.dtype(dtype)], f"V={V} {np.dtype(dtype)}")
        if V == 1:  # one class: every loss is 0 and so is every gradient
            assert float(loss) == 0.0 and not np.any(grads.input) and not np.any(grads.linear_weight)


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 5, 16, 17, 100])
def test_uneven_chunks_agree(rng, rows_per_chunk):
    N, H, V = 17, 20, 33
    x, W, b, y = _data(rng, N, H, V, np.float64)
    w = _per_sample(rng, (N,))
    cb = rows_per_chunk * min_chunk_bytes(V, H, np.float64) + 3  # a few spare bytes: still that many rows
    loss, grads = gl.linear_cross_entropy(x, W, y, linear_bias=b, weight=w, label_smoothing=0.1,
                                          return_grad=True, chunk_bytes=cb)
    ref_loss, ref_G = _reference(x, W, b, y, weight=w, label_smoothing=0.1)
    _check_against(loss, grads, ref_loss, ref_G, x, W, b, 1e-12, f"{rows_per_chunk} rows per chunk")


def test_default_chunk_splits_rows(rng):
    """With the default budget, a vocabulary big enough to need several chunks agrees with the unfused path."""
    V, H = 20000, 4
    rows = DEFAULT_CHUNK_BYTES // min_chunk_bytes(V, H, np.float32)
    N = rows * 2 + 3  # three chunks, the last one short
    x, W, b, y = _data(rng, N, H, V, np.float32)
    loss, grads = gl.linear_cross_entropy(x, W, y, linear_bias=b, return_grad=True)
    u_loss, G = gl.softmax_cross_entropy(x @ W.T + b, y, return_grad=True)
    _check_against(loss, grads, u_loss, G, x, W, b, 1e-5, "default chunk")


def test_leading_dims_and_vector_input(rng):
    B, T, H, V = 3, 5, 8, 11
    x, W, b, y = _data(rng, None, H, V, np.float64, lead=(B, T))
    w = _per_sample(rng, (B, T))  # per-sample on the first axis: a prefix of the loss shape
    for reduction in ("none", "batch_size", "mean"):
        loss, grads = gl.linear_cross_entropy(x, W, y, linear_bias=b, weight=w, reduction=reduction,
                                              return_grad=True, chunk_bytes=4 * min_chunk_bytes(V, H, np.float64))
        ref_loss, ref_G = _reference(x, W, b, y, weight=w, reduction=reduction)
        assert np.shape(loss) == np.shape(ref_loss)
        _check_against(loss, grads, ref_loss, ref_G, x, W, b, 1e-12, f"[B, T, H] {reduction}")
    # [H] input, 0-d target: one measurement
    xv, yv = x[0, 0], np.array(4)
    loss, grads = gl.linear_cross_entropy(xv, W, yv, linear_bias=b, return_grad=True)
    ref_loss, ref_G = _reference(xv, W, b, yv)
    assert grads.input.shape == (H,)
    _check_against(loss, grads, ref_loss, ref_G, xv, W, b, 1e-12, "[H] input")


def test_empty_batch_and_zero_denominator(rng):
    H, V = 6, 5
    W = rng.standard_normal((V, H))
    b = rng.standard_normal(V)
    loss, grads = gl.linear_cross_entropy(np.zeros((0, H)), W, np.zeros(0, np.int64), linear_bias=b,
                                          return_grad=True)
    assert float(loss) == 0.0 and grads.input.shape == (0, H)
    assert not np.any(grads.linear_weight) and not np.any(grads.linear_bias)
    # every target ignored: the mean has denominator 0 -> loss 0 and gradients 0, never NaN
    x = rng.standard_normal((4, H))
    loss, grads = gl.linear_cross_entropy(x, W, np.full(4, -100), linear_bias=b, return_grad=True)
    assert float(loss) == 0.0
    for g in grads:
        assert np.all(g == 0)


def test_bitwise_deterministic_run_to_run(rng):
    N, H, V = 300, 64, 1000
    x, W, b, y = _data(rng, N, H, V, np.float32)
    w = _per_sample(rng, (N,))
    cb = 37 * min_chunk_bytes(V, H, np.float32)
    runs = [gl.linear_cross_entropy(x, W, y, linear_bias=b, weight=w, label_smoothing=0.1, return_grad=True,
                                    chunk_bytes=cb) for _ in range(3)]
    for loss, grads in runs[1:]:
        np.testing.assert_array_equal(loss, runs[0][0])
        for a, e in zip(grads, runs[0][1]):
            np.testing.assert_array_equal(a, e)


def test_inputs_are_not_modified(rng):
    x, W, b, y = _data(rng, 10, 6, 7, np.float32)
    copies = [a.copy() for a in (x, W, b, y)]
    gl.linear_cross_entropy(x, W, y, linear_bias=b, return_grad=True, chunk_bytes=3 * min_chunk_bytes(7, 6, "f4"))
    for a, c in zip((x, W, b, y), copies):
        np.testing.assert_array_equal(a, c)


# ---------------------------------------------------------------------------------------------
# 16-bit inputs: float32 logits, float32 accumulation, grads returned in the input dtype


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_inputs(rng, dtype):
    if dtype == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("ml_dtypes is not installed")
        dtype = ml_dtypes.bfloat16
    N, H, V = 45, 32, 50
    x, W, b, y = _data(rng, N, H, V, np.float32)
    x, W, b = x.astype(dtype), W.astype(dtype), b.astype(dtype)
    w = _per_sample(rng, (N,))
    cb = 6 * min_chunk_bytes(V, H, dtype)
    loss, grads = gl.linear_cross_entropy(x, W, y, linear_bias=b, weight=w, label_smoothing=0.1, return_grad=True,
                                          chunk_bytes=cb)
    assert np.asarray(loss).dtype == np.float32
    # The reference sees the same 16-bit values exactly (upcast): only float32 math and the final
    # rounding of the gradients to 16 bits separate them.
    ref_loss, ref_G = _reference(x, W, b, y, weight=w, label_smoothing=0.1)
    _close(loss, ref_loss, 1e-5, "16-bit loss", abs(float(ref_loss)))
    exp = _expected_grads(ref_G, x.astype(np.float64), W.astype(np.float64), True)
    sc = _scales(ref_G, x.astype(np.float64), W.astype(np.float64))
    grad_rtol = 1e-2 if np.dtype(dtype) == np.float16 else 2e-2  # one rounding to 11 / 8 significant bits
    for got, want, s, name in zip(grads, exp, sc, ("input", "linear_weight", "linear_bias")):
        assert got.dtype == np.dtype(dtype), name
        _close(got.astype(np.float64), want, grad_rtol, f"16-bit d_{name}", s)
    # Same chunks as the float32 path on the upcast values: the float32 accumulation gives the same bits,
    # rounded once to 16 bits at the end (a 16-bit accumulator would not).
    loss32, grads32 = gl.linear_cross_entropy(x.astype(np.float32), W.astype(np.float32), y,
                                              linear_bias=b.astype(np.float32), weight=w, label_smoothing=0.1,
                                              return_grad=True, chunk_bytes=6 * min_chunk_bytes(V, H, np.float32))
    _close(loss, loss32, 1e-6, "16-bit vs float32 loss", abs(float(loss32)))
    np.testing.assert_array_equal(grads.linear_weight, grads32.linear_weight.astype(dtype))


# ---------------------------------------------------------------------------------------------
# The emulated backend (kernels/*.cu compiled for the host): tiny cases, it is slow


@pytest.mark.emulated
@pytest.mark.parametrize("reduction", ["mean", "none", "sum_by_nonzero_weights"])
def test_emulated_backend_matches_reference(rng, reduction):
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("the emulated backend needs g++")
    N, H, V = 9, 5, 7
    for dtype in (np.float32, np.float64):
        x, W, b, y = _data(rng, N, H, V, dtype)
        kw = dict(weight=_per_sample(rng, (N,)), class_weight=rng.uniform(0.5, 1.5, V), label_smoothing=0.1,
                  reduction=reduction)
        loss, grads = gl.linear_cross_entropy(x, W, y, linear_bias=b, return_grad=True, backend="emulated",
                                              chunk_bytes=4 * min_chunk_bytes(V, H, dtype), **kw)
        ref_loss, ref_G = _reference(x, W, b, y, **kw)
        _check_against(loss, grads, ref_loss, ref_G, x, W, b, RTOL[np.dtype(dtype)], f"emulated {reduction}")


# ---------------------------------------------------------------------------------------------
# z_loss / softcap / return_z_loss: passed through to softmax_cross_entropy


needs_z = pytest.mark.skipif(not HAS_Z_LOSS, reason="softmax_cross_entropy has no z_loss/softcap yet")


@needs_z
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
def test_z_loss_and_softcap_pass_through(rng, reduction):
    N, H, V = 23, 12, 19
    x, W, b, y = _data(rng, N, H, V, np.float64)
    x *= 4  # logits large enough for the cap to bend them
    kw = dict(weight=_per_sample(rng, (N,)), reduction=reduction, z_loss=1e-2, softcap=3.0)
    cb = 4 * min_chunk_bytes(V, H, np.float64)
    loss, z_term, grads = gl.linear_cross_entropy(x, W, y, linear_bias=b, return_grad=True, return_z_loss=True,
                                                  chunk_bytes=cb, **kw)
    u_loss, u_z, G = gl.softmax_cross_entropy(x @ W.T + b, y, return_grad=True, return_z_loss=True, **kw)
    _check_against(loss, grads, u_loss, G, x, W, b, 1e-12, "z_loss+softcap vs unfused")
    _close(z_term, u_z, 1e-12, "z_term", max(np.max(np.abs(u_z)), 1e-30))
    assert np.any(np.asarray(z_term) != 0)
    # Without softcap / z the losses differ: the options really reached the kernel.
    plain = gl.linear_cross_entropy(x, W, y, linear_bias=b, chunk_bytes=cb, weight=kw["weight"], reduction=reduction)
    assert not np.allclose(plain, loss)
    only_loss, only_z = gl.linear_cross_entropy(x, W, y, linear_bias=b, return_z_loss=True, chunk_bytes=cb, **kw)
    np.testing.assert_array_equal(only_loss, loss)
    np.testing.assert_array_equal(only_z, z_term)


@needs_z
def test_z_loss_refused_like_cross_entropy(rng):
    x, W, b, y = _data(rng, 4, 3, 5, np.float32)
    for bad in (dict(z_loss=-1.0), dict(softcap=0.0), dict(softcap=-2.0), dict(return_z_loss=1)):
        with pytest.raises((TypeError, ValueError)) as ours:
            gl.linear_cross_entropy(x, W, y, **bad)
        with pytest.raises((TypeError, ValueError)) as theirs:
            gl.softmax_cross_entropy(x @ W.T, y, **bad)
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value), bad


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the arguments and shapes


def test_shape_mismatches_name_arguments(rng):
    x, W, b, y = _data(rng, 6, 4, 5, np.float32)
    with pytest.raises(ValueError, match=r"linear_weight must have shape \(V, H\) with H = input.shape\[-1\] = 4.*"
                                         r"got \(5, 3\)"):
        gl.linear_cross_entropy(x, W[:, :3], y)
    with pytest.raises(ValueError, match=r"linear_weight .*got \(20,\)"):
        gl.linear_cross_entropy(x, W.reshape(-1), y)
    with pytest.raises(ValueError, match=r"linear_bias must have shape \(V,\) = \(5,\).*got \(4,\)"):
        gl.linear_cross_entropy(x, W, y, linear_bias=b[:4])
    with pytest.raises(ValueError, match=r"target \(class indices\) must have the shape of input without its last "
                                         r"axis, \(6,\).*got \(5,\)"):
        gl.linear_cross_entropy(x, W, y[:5])
    with pytest.raises(ValueError, match=r"target \(probabilities\) must have shape .*\(6, 5\).*got \(6, 4\)"):
        gl.linear_cross_entropy(x, W, np.full((6, 4), 0.25, np.float32))
    with pytest.raises(ValueError, match="input must have a feature axis"):
        gl.linear_cross_entropy(np.ones((), np.float32), W, y)
    with pytest.raises(ValueError, match=r"linear_weight must have at least one row"):
        gl.linear_cross_entropy(x, W[:0], y)
    with pytest.raises(TypeError, match=r"linear_weight must have the dtype of input \(float32\); got float64"):
        gl.linear_cross_entropy(x, W.astype(np.float64), y)
    with pytest.raises(TypeError, match=r"linear_bias must have the dtype of input"):
        gl.linear_cross_entropy(x, W, y, linear_bias=b.astype(np.float64))
    with pytest.raises(TypeError, match=r"input must have a floating dtype"):
        gl.linear_cross_entropy(x.astype(np.int32), W, y)
    with pytest.raises(TypeError, match=r"linear_weight must be a numpy.ndarray"):
        gl.linear_cross_entropy(x, W.tolist(), y)
    with pytest.raises(ValueError, match=r"weight of shape \(5,\) does not fit the loss of shape \(6,\)"):
        gl.linear_cross_entropy(x, W, y, weight=np.ones(5))
    with pytest.raises(ValueError, match=r"class_weight must have shape \(5,\); got \(4,\)"):
        gl.linear_cross_entropy(x, W, y, class_weight=np.ones(4))


def test_budget_too_small_is_a_clear_error(rng):
    x, W, b, y = _data(rng, 6, 4, 5000, np.float32)
    need = min_chunk_bytes(5000, 4, np.float32)
    assert need == (2 * 5000 + 4) * 4
    with pytest.raises(ValueError, match=rf"chunk_bytes=1000 is too small for one row of V=5000 logits.*"
                                         rf"chunk_bytes >= {need}"):
        gl.linear_cross_entropy(x, W, y, chunk_bytes=1000)
    with pytest.raises(TypeError, match="chunk_bytes must be an int"):
        gl.linear_cross_entropy(x, W, y, chunk_bytes=1e9)
    # exactly one row is enough
    loss = gl.linear_cross_entropy(x, W, y, chunk_bytes=need)
    np.testing.assert_allclose(loss, gl.softmax_cross_entropy(x @ W.T, y), rtol=1e-5)


@pytest.mark.parametrize("bad", [
    dict(reduction="avg"), dict(label_smoothing=1.5), dict(label_smoothing="0.1"), dict(ignore_index=1.0),
    dict(ignore_index=True), dict(return_grad=1), dict(validate="yes"), dict(backend="tpu"),
    dict(weight="heavy"), dict(class_weight=np.ones(5, np.complex64)),
], ids=lambda d: next(iter(d)))
def test_refused_like_cross_entropy(rng, bad):
    """Everything softmax_cross_entropy refuses is refused with its exception and message."""
    x, W, b, y = _data(rng, 6, 4, 5, np.float32)
    with pytest.raises((TypeError, ValueError)) as ours:
        gl.linear_cross_entropy(x, W, y, linear_bias=b, **bad)
    with pytest.raises((TypeError, ValueError)) as theirs:
        gl.softmax_cross_entropy(x @ W.T + b, y, **bad)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


def test_bad_target_named_by_position(rng):
    x, W, b, y = _data(rng, 12, 4, 5, np.float32, ignore_frac=0.0, lead=(3, 4))
    y[2, 1] = 5
    with pytest.raises(ValueError) as ours:
        gl.linear_cross_entropy(x, W, y)
    with pytest.raises(ValueError) as theirs:
        gl.softmax_cross_entropy(x @ W.T, y)
    assert str(ours.value) == str(theirs.value)
    assert "target[2, 1] = 5" in str(ours.value)
    # validate=False: NaN for that row instead, like the cross entropy
    loss = gl.linear_cross_entropy(x, W, y, validate=False, reduction="none")
    assert np.isnan(loss[2, 1]) and np.isfinite(np.delete(loss.reshape(-1), 9)).all()
    # ignore_index=None ignores nothing: -100 is then a bad class index like any other
    with pytest.raises(ValueError, match=r"target\[1\] = -100 is not a class index in \[0, 5\); pass"):
        gl.linear_cross_entropy(x.reshape(12, 4)[:2], W, np.array([0, -100]), ignore_index=None)
