"""One cross-entropy call captured in a CUDA graph and replayed on new data (docs/design.md §4).

What makes a call capturable: no host synchronisation with validate=False, no
allocation that outlives the capture except what the results keep alive (the
reductions' scratch is a view's base), and "last block done" counters that every
launch leaves at 0, so a replay needs no memset. Needs a CUDA device; the same
launch structure is checked without one by tests/test_launch_structure.py
(launch counts, no helpers) and tests/test_kernels.py (results), so nothing is
proved by this file alone.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpuloss as gl
from gpuloss.backends import cuda_unavailable_reason

_REASON = cuda_unavailable_reason()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_REASON is not None, reason=f"needs a CUDA device for graph capture: {_REASON}")]


@pytest.mark.parametrize("rows,classes", [(64, 40), (8, 5000), (3, 32003)], ids=["warp", "block", "few-rows"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_captured_cross_entropy_replays_on_new_data(rows, classes, reduction):
    import cupy as cp

    rng = np.random.default_rng(11)
    x = cp.asarray(rng.standard_normal((rows, classes)).astype(np.float32))
    y = cp.asarray(rng.integers(0, classes, rows))
    cw = cp.asarray(rng.uniform(0.5, 2.0, classes).astype(np.float32))
    kw = dict(reduction=reduction, class_weight=cw, label_smoothing=0.1, z_loss=1e-4, return_grad=True,
              validate=False)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        # Outside the capture first: compiles the kernels, makes the stream's ticket counters and the
        # backend's dummies, and leaves freed blocks of the right sizes in CuPy's pool for the capture.
        warm = gl.softmax_cross_entropy(x, y, **kw)
        del warm
        stream.synchronize()
        stream.begin_capture()
        loss, grad = gl.softmax_cross_entropy(x, y, **kw)
        graph = stream.end_capture()
        for trial in range(3):
            x[...] = cp.asarray(rng.standard_normal((rows, classes)).astype(np.float32) * (1 + trial))
            y[...] = cp.asarray(rng.integers(0, classes, rows))
            y[0] = -100  # ignored rows change the mean's denominator: read on the device at each replay
            graph.launch(stream)
            want_loss, want_grad = gl.softmax_cross_entropy(x.copy(), y.copy(), **kw)
            stream.synchronize()
            assert loss.get().tobytes() == want_loss.get().tobytes(), trial
            assert grad.get().tobytes() == want_grad.get().tobytes(), trial
            ref = gl.softmax_cross_entropy(cp.asnumpy(x), cp.asnumpy(y), **{**kw, "class_weight": cp.asnumpy(cw)},
                                           backend="cpu")
            np.testing.assert_allclose(loss.get(), ref[0], rtol=1e-5, atol=1e-6)
