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


@pytest.mark.parametrize("name", HALVES)
def test_shapes_layouts_and_no_aliasing(name, rng):
    x = rng.standard_normal((3, 70000)).astype(np.float32)[:, ::2]   # a non-contiguous view
    out = cpu_half.cast(x, HALVES[name])
    assert out.shape == x.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out.astype(np.float32), x.astype(HALVES[name]).astype(np.float32))
    same = cpu_half.cast(x, np.float32)
    assert same is x   # nothing to convert
