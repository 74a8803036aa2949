"""Bitwise determinism: across runs and across Numba thread counts (docs/api.md §3.3)."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from .cases import LOSSES, make_inputs, make_weight, loss_shape_of
from .conftest import BACKENDS, run_loss


def _run_all(name, args, kwargs, backend):
    out = []
    for reduction in ("none", "mean", "sum"):
        loss, grad = run_loss(name, args, {**kwargs, "reduction": reduction}, backend)
        out.append((np.asarray(loss).tobytes(), None if grad is None else grad.tobytes()))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_bitwise_identical_across_runs(name, backend, rng):
    # several blocks of partials on the device backends, several 16384-element chunks on the cpu; the
    # emulator runs an OS thread per CUDA thread, so its element-wise shape is smaller (4 to 8 blocks)
    elementwise_shape = (60, 257) if backend == "emulated" else (300, 257)
    shape = (37, 1001) if name == "softmax_cross_entropy" else elementwise_shape
    args, kwargs = make_inputs(name, shape, np.float32, rng)
    kwargs["weight"] = make_weight("per_sample", loss_shape_of(name, shape), rng)
    first = _run_all(name, args, kwargs, backend)
    for _ in range(4):
        assert _run_all(name, args, kwargs, backend) == first


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads to compare with 1")
@pytest.mark.parametrize("name", LOSSES)
def test_bitwise_identical_across_thread_counts(name, rng):
    shape = (53, 3001) if name == "softmax_cross_entropy" else (100, 1000)  # several chunks
    args, kwargs = make_inputs(name, shape, np.float32, rng)
    kwargs["weight"] = make_weight("per_sample", loss_shape_of(name, shape), rng)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _run_all(name, args, kwargs, "cpu")
        numba.set_num_threads(2)
        two = _run_all(name, args, kwargs, "cpu")
    finally:
        numba.set_num_threads(before)
    assert one == two
