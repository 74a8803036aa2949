"""The one helper that checks any backend against gpuloss.reference, and the backend list."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import gpuloss as gl
from gpuloss import reference
from gpuloss.backends import cuda_unavailable_reason

from .cases import tolerance


def _available_backends() -> list:
    params = [pytest.param("cpu", id="cpu")]
    try:
        import gpuloss.backends.emulated_backend  # noqa: F401  (lands with the CUDA kernels)
        emulated_ok = shutil.which("g++") is not None
    except ModuleNotFoundError:
        emulated_ok = False
    if emulated_ok:
        params.append(pytest.param("emulated", id="emulated", marks=pytest.mark.emulated))
    reason = cuda_unavailable_reason()
    params.append(pytest.param("cuda", id="cuda",
                               marks=[pytest.mark.gpu, pytest.mark.skipif(reason is not None,
                                                                          reason=f"cuda backend: {reason}")]))
    return params


BACKENDS = _available_backends()


# One seed per run, printed in the header: GPULOSS_TEST_SEED=<seed> replays every test's data.
SESSION_SEED = int(os.environ.get("GPULOSS_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
# pytest-xdist workers start after the controller has loaded this module: they inherit the seed.
os.environ["GPULOSS_TEST_SEED"] = str(SESSION_SEED)


def pytest_report_header(config):
    return f"GPULOSS_TEST_SEED={SESSION_SEED} (set it to replay this run's random data)"


@pytest.fixture
def rng(request):
    """Fresh random data on every run, derived from the session seed and the test's id, so a failing
    test gets the same data back under the same GPULOSS_TEST_SEED whatever else runs."""
    key = [ord(ch) for ch in request.node.nodeid]
    print(f"GPULOSS_TEST_SEED={SESSION_SEED}")
    return np.random.default_rng([SESSION_SEED, *key])


# Split rows at test sizes. The emulator runs one OS thread per CUDA thread, so a launch costs about
# its number of blocks (~10 ms per 128-thread block), whatever the classes: at the real constants a
# split row needs C > 4096 (slices of >= SPLIT_MIN_SLICE) and C = 131072 makes 32 blocks a row.
# With slices of >= 1024 classes (still two 16-byte-vector sweeps of a 128-thread block, and a
# multiple of SPLIT_ALIGN) and SPLIT_MAX_ROWS = 16 (7 rows of C = 5003 get 3 slices, not the 5 that C
# asks for: the row cap), C of a few thousand takes every branch of xent_split and of the split
# kernels in kernels/xent.cu, in a tenth of the blocks.
SMALL_SPLIT_MIN_SLICE, SMALL_SPLIT_MAX_ROWS = 1024, 16


def small_split_slices(monkeypatch):
    """Lower launch.py's split thresholds for this test (xent_split reads them at every call)."""
    from gpuloss.backends import launch

    monkeypatch.setattr(launch, "SPLIT_MIN_SLICE", SMALL_SPLIT_MIN_SLICE)
    monkeypatch.setattr(launch, "SPLIT_MAX_ROWS", SMALL_SPLIT_MAX_ROWS)
    return launch


def to_backend(backend: str, a):
    if backend == "cuda" and isinstance(a, np.ndarray):
        import cupy

        return cupy.asarray(a)
    return a


def to_host(a):
    if a is None or isinstance(a, (np.ndarray, np.generic, float)):
        return a
    return a.get()


def run_loss(name: str, args, kwargs, backend: str, *, return_grad: bool = True):
    fn = getattr(gl, name)
    dev_args = [to_backend(backend, a) for a in args]
    dev_kwargs = {k: to_backend(backend, a) for k, a in kwargs.items()}
    if name == "weighted_reduce":
        return to_host(fn(*dev_args, backend=backend, **dev_kwargs)), None
    out = fn(*dev_args, backend=backend, return_grad=return_grad, **dev_kwargs)
    if return_grad:
        return to_host(out[0]), to_host(out[1])
    return to_host(out), None


def expected_loss_dtype(dtype):
    dtype = np.dtype(dtype)
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _close(actual, expected, rtol, what, scale=None):
    """Equal within rtol of ``scale`` (default: the largest finite |expected|), NaN and inf exactly."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = np.isfinite(expected)
    # NaN and inf must come out exactly where the reference has them.
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(actual[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)],
                                  err_msg=f"{what}: inf positions")
    if finite.any():
        scale = np.max(np.abs(expected[finite])) if scale is None else scale
        np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=rtol * scale + 1e-30,
                                   err_msg=what)


def assert_matches_reference(name: str, args, kwargs, backend: str = "cpu", *, grad: bool = True):
    """gpuloss.<name> on ``backend`` == gpuloss.reference.<name> in float64 (loss, grad, dtypes, shapes)."""
    kwargs = dict(kwargs)
    loss, g = run_loss(name, args, kwargs, backend, return_grad=grad)
    kwargs.pop("validate", None)
    ref_loss, ref_grad = getattr(reference, name)(*args, **kwargs)
    in_dtype = args[0].dtype
    loss_rtol, grad_rtol = tolerance(in_dtype)
    assert np.asarray(loss).dtype == expected_loss_dtype(in_dtype), f"loss dtype {np.asarray(loss).dtype}"
    scale = None
    if name == "weighted_reduce":
        # Signed values cancel in the sum: float32 accumulation is accurate relative to sum |L|, not |sum L|.
        scale = float(np.max(np.abs(reference.weighted_reduce(np.abs(args[0]), **kwargs)[0]), initial=0.0))
    _close(loss, ref_loss, loss_rtol, f"{name} loss", scale)
    if grad and name != "weighted_reduce":
        assert g.dtype == in_dtype and g.shape == args[0].shape, f"grad {g.dtype}{g.shape}"
        _close(g, ref_grad.astype(in_dtype), grad_rtol, f"{name} grad")
    return loss, g
