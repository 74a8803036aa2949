"""The rows-as-lanes cross entropy of the cpu backend (float32, C <= LANES_MAX_CLASSES) against the
float64 reference: block edges, every option, and the rows it hands to the scalar code."""
from __future__ import annotations

import numpy as np
import pytest

import gpuloss as gl
from gpuloss.backends import cpu

from .conftest import assert_matches_reference

LANES = cpu.LANE_ROWS


@pytest.mark.parametrize("classes", [1, 2, 3, 10, cpu.LANES_MAX_CLASSES])
@pytest.mark.parametrize("rows", [1, LANES - 1, LANES, LANES + 1, 3 * LANES + 17])
def test_lanes_match_the_reference_with_every_option(classes, rows, rng):
    logits = (rng.standard_normal((rows, classes)) * 4).astype(np.float32)
    y = rng.integers(0, classes, rows)
    y[rng.random(rows) < 0.2] = -100
    options = {"weight": rng.random(rows).astype(np.float32),
               "class_weight": rng.uniform(0.1, 2, classes).astype(np.float32),
               "label_smoothing": float(rng.choice([0.0, 0.1])), "z_loss": float(rng.choice([0.0, 1e-3])),
               "softcap": rng.choice([None, 5.0])}
    for reduction in ("none", "mean", "sum"):
        assert_matches_reference("softmax_cross_entropy", (logits, y), {**options, "reduction": reduction}, "cpu")


@pytest.mark.parametrize("classes", [1, 3, 17])
def test_lanes_hand_special_rows_to_the_scalar_code(classes, rng):
    rows = 2 * LANES + 5
    logits = (rng.standard_normal((rows, classes)) * 3).astype(np.float32)
    y = rng.integers(0, classes, rows)
    logits[3, 0] = np.nan                    # NaN row
    logits[LANES, :] = -np.inf               # every class masked
    logits[LANES + 1, classes - 1] = np.inf  # +inf logit
    logits[7, :] = 1e4                       # huge but finite
    logits[8, :] = -1e4
    if classes > 1:
        logits[9, 1:] = -np.inf              # masked classes next to the target
        y[9] = 0
    y[11] = -100                             # ignored, with a NaN logit: loss and grad 0
    logits[11, 0] = np.nan
    for options in ({}, {"label_smoothing": 0.2}, {"z_loss": 1e-4}):
        loss, grad = assert_matches_reference("softmax_cross_entropy", (logits, y),
                                              {**options, "reduction": "none"}, "cpu")
        assert loss[11] == 0 and np.all(grad[11] == 0)


def test_lanes_invalid_targets_without_validation_give_nan_rows(rng):
    logits = rng.standard_normal((LANES + 3, 5)).astype(np.float32)
    y = rng.integers(0, 5, LANES + 3)
    y[[0, LANES + 1]] = [5, -3]
    loss, grad = gl.softmax_cross_entropy(logits, y, reduction="none", return_grad=True, validate=False)
    assert np.isnan(loss[[0, LANES + 1]]).all() and np.isnan(grad[[0, LANES + 1]]).all()
    assert np.isfinite(np.delete(loss, [0, LANES + 1])).all()


def test_lanes_keep_tiny_losses(rng):
    # Confident rows: -logp_y ~ 1e-9 .. 1e-20 from log1p(rest), not from log(s) with s = 1 + rest.
    logits = rng.standard_normal((LANES + 9, 8)).astype(np.float32)
    y = rng.integers(0, 8, LANES + 9)
    logits[np.arange(y.size), y] = rng.uniform(25, 45, y.size).astype(np.float32)
    loss, _ = assert_matches_reference("softmax_cross_entropy", (logits, y), {"reduction": "none"}, "cpu")
    from gpuloss import reference
    ref, _ = reference.softmax_cross_entropy(logits, y, reduction="none")
    # float32 x_c - m rounds (|x_c - m| ~ 40: ~2e-6 relative in exp), within the float32 1e-5;
    # log(s) with s = 1 + rest would be wrong by 100%.
    assert np.max(np.abs(loss - ref) / ref) < 1e-5
