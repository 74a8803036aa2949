"""gpuloss.backends.cpu_half: the cpu backend's float16 / bfloat16 <-> float32 casts, bit for bit
against NumPy (float16) and ml_dtypes (bfloat16) on every 16-bit pattern and on float32 edges."""
from __future__ import annotations

import numpy as np
import pytest

from gpuloss.backends import cpu_half

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays come from ml_dtypes")
HALVES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


@pytest.fixture(autouse=True)
def always_the_numba_path(monkeypatch):
    monkeypatch.setattr(cpu_half, "PARALLEL_MIN", 0)


def _same(a, b):
    """Bitwise equal, except that any NaN matches any NaN of the same sign."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    nan = np.isnan(a32) & np.isnan(b32)
    assert (np.signbit(a32[nan]) == np.signbit(b32[nan])).all()
    bits = a.view(np.uint16 if a.itemsize == 2 else np.uint32) == b.view(np.uint16 if b.itemsize == 2 else np.uint32)
    np.testing.assert_array_equal(bits | nan, True)


@pytest.mark.parametrize("name", HALVES)
def test_every_16bit_pattern_widens_exactly(name):
    h = np.arange(65536, dtype=np.uint16).view(HALVES[name])
    _same(cpu_half.cast(h, np.float32), h.astype(np.float32))


@pytest.mark.parametrize("name", HALVES)
def test_narrowing_rounds_to_nearest_even_like_numpy(name, rng):
    dt = HALVES[name]
    exact = np.arange(65536, dtype=np.uint16).view(dt).astype(np.float64)
    exact = exact[np.isfinite(exact)]
    ulp = np.abs(exact) * 2.0 ** -11 + 2.0 ** -30
    candidates = [
        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        exact, exact + ulp / 4, exact - ulp / 4,
        # halfway points between neighbouring 16-bit values: ties go to the even one
        (exact[:-1] + np.diff(exact) / 2),
        [65504, 65519.996, 65520, 65536, 3.4e38, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-26, 1e-45, 0.0, -0.0,
         np.inf, -np.inf, np.nan, -np.nan],
    ]
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.concatenate([np.asarray(c, np.float64).astype(np.float32) for c in candidates])
        _same(cpu_half.cast(x, dt), x.astype(dt))


def _float16_implementations():
    """cpu_half's float16 conversions: the bit arithmetic always, the F16C / AArch64 instructions
    where this machine has them (elsewhere that case is skipped, with its reason)."""
    hw = pytest.mark.skipif(not cpu_half.HARDWARE_HALF, reason="no half-precision conversion instructions here")
    return [pytest.param(cpu_half._f32_from_f16_bits, cpu_half._f16_bits_from_f32_bits, id="bits"),
            pytest.param(cpu_half._f32_from_f16_hw, cpu_half._f16_bits_from_f32_hw, id="instructions", marks=hw)]


@pytest.mark.parametrize("widen, narrow", _float16_implementations())
def test_both_float16_implementations_match_numpy(widen, narrow, rng):
    from numba import njit

    @njit
    def widen_all(h, out):
        for i in range(h.size):
            out[i] = widen(h[i])

    @njit
    def narrow_all(x, out):
        for i in range(x.size):
            out[i] = narrow(x[i])

    h = np.arange(65536, dtype=np.uint16)
    wide = np.empty(h.size, np.float32)
    widen_all(h, wide)
    _same(wide, h.view(np.float16).astype(np.float32))
    exact = np.unique(wide[np.isfinite(wide)].astype(np.float64))  # sorted: neighbours side by side
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.concatenate([rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                            (exact[:-1] + np.diff(exact) / 2).astype(np.float32),  # the ties: to the even one
                            np.float32([65504, 65519.996, 65520, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-45, -0.0,
                                        np.inf, -np.inf, np.nan, -np.nan])])
        narrow_bits = np.empty(x.size, np.uint16)
        narrow_all(x, narrow_bits)
        _same(narrow_bits.view(np.float16), x.astype(np.float16))


@pytest.mark.parametrize("name", HALVES)
def test_shapes_layouts_and_no_aliasing(name, rng):
    x = rng.standard_normal((3, 70000)).astype(np.float32)[:, ::2]   # a non-contiguous view
    out = cpu_half.cast(x, HALVES[name])
    assert out.shape == x.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out.astype(np.float32), x.astype(HALVES[name]).astype(np.float32))
    same = cpu_half.cast(x, np.float32)
    assert same is x   # nothing to convert


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape", [(300, 7), (257, 32), (40, 1000), (3, 32003)])
def test_16bit_cross_entropy_reads_its_bits_and_equals_the_float32_call(name, shape, rng):
    # The cpu kernels decode 16-bit rows in scratch and encode the gradient: the loss must be that of
    # the float32 call on the widened input, and the gradient its rounding (to 1 ulp of the 16-bit
    # type: the float32 values may differ in their last bit with the buffer's alignment).
    import gpuloss as gl
    dt = HALVES[name]
    x = (rng.standard_normal(shape) * 3).astype(dt)
    y = rng.integers(0, shape[1], shape[0])
    y[::7] = -100
    x[1, 0] = np.nan
    for options in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3, "class_weight": rng.random(shape[1])}):
        loss, grad = gl.softmax_cross_entropy(x, y, reduction="none", return_grad=True, **options)
        loss32, grad32 = gl.softmax_cross_entropy(x.astype(np.float32), y, reduction="none", return_grad=True,
                                                  **options)
        assert grad.dtype == dt and loss.dtype == np.float32
        np.testing.assert_array_equal(loss, loss32)
        a, b = grad.astype(np.float32), grad32.astype(dt).astype(np.float32)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        with np.errstate(invalid="ignore"):  # NaN rows
            ulp = np.spacing(np.abs(b).astype(dt)).astype(np.float32)
        assert np.all((np.abs(a - b) <= ulp) | np.isnan(b))


def _peak_bytes(call):
    """Peak bytes NumPy allocates during ``call()`` (tracemalloc), after one warm-up call (compiles)."""
    import tracemalloc
    call()
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", HALVES)
def test_16bit_cross_entropy_allocates_little_more_than_its_gradient(name, rng):
    import gpuloss as gl
    x = rng.standard_normal((512, 8000)).astype(HALVES[name])
    y = rng.integers(0, 8000, 512)
    peak = _peak_bytes(lambda: gl.softmax_cross_entropy(x, y, return_grad=True))
    # The gradient (x.nbytes) plus per-thread scratch and per-row vectors; a float32 copy of the
    # logits alone would add 2 * x.nbytes.
    assert peak < x.nbytes + 2 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {x.nbytes / 2**20:.1f} MiB input"


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("loss", ["sigmoid_cross_entropy", "huber", "log_loss"])
def test_16bit_element_losses_read_their_bits_and_equal_the_float32_call(name, loss, rng):
    import gpuloss as gl
    dt = HALVES[name]
    shape = (37, 1013)                                   # not a multiple of the kernels' chunk
    x = rng.uniform(0.01, 0.99, shape) if loss == "log_loss" else rng.standard_normal(shape) * 3
    x = x.astype(dt)
    t = (rng.random(shape) < 0.5).astype(np.float32)     # a float32 target beside 16-bit input
    w = rng.random((37, 1)).astype(np.float32)
    for target in (t, t.astype(dt)):
        for reduction in ("none", "mean"):
            out, grad = getattr(gl, loss)(x, target, weight=w, reduction=reduction, return_grad=True)
            out32, grad32 = getattr(gl, loss)(x.astype(np.float32), target.astype(np.float32), weight=w,
                                              reduction=reduction, return_grad=True)
            assert grad.dtype == dt
            np.testing.assert_array_equal(out, out32)
            np.testing.assert_array_equal(grad.astype(np.float32), grad32.astype(dt).astype(np.float32))


@pytest.mark.parametrize("name", HALVES)
def test_16bit_element_losses_allocate_only_their_gradient(name, rng):
    import gpuloss as gl
    x = rng.standard_normal((256, 8192)).astype(HALVES[name])
    t = rng.standard_normal((256, 8192)).astype(HALVES[name])
    peak = _peak_bytes(lambda: gl.huber(x, t, return_grad=True))
    assert peak < x.nbytes + 2**20, f"peak {peak / 2**20:.1f} MiB for a {x.nbytes / 2**20:.1f} MiB input"
