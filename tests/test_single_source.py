"""Tables written once: the copies that must exist (device code) are checked against the one source.

The element-wise loss ids live in gpuloss/_plan.py (ELEMENTWISE_KIND) and the
denominator modes in gpuloss/backends/host.py; kernels/losses.cuh repeats them
as C enums, which this file parses and compares.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from gpuloss import _plan
from gpuloss._plan import ELEMENTWISE_KIND, ReducePlan
from gpuloss._validate import Reduction
from gpuloss.backends import host

LOSSES_CUH = Path(__file__).resolve().parent.parent / "kernels" / "losses.cuh"


def _enum_values(names) -> dict:
    text = LOSSES_CUH.read_text()
    found = {}
    for name in names:
        m = re.search(rf"\b{name}\s*=\s*(\d+)", text)
        assert m, f"{name} not found in {LOSSES_CUH}"
        found[name] = int(m.group(1))
    return found


def test_elementwise_loss_ids_match_the_device_enum():
    cuh_names = {"identity": "kIdentity", "sigmoid_cross_entropy": "kSigmoidXent", "log_loss": "kLogLoss",
                 "mean_squared_error": "kSquared", "absolute_difference": "kAbsolute", "huber": "kHuber",
                 "smooth_l1": "kSmoothL1", "hinge": "kHinge"}
    assert set(cuh_names) == set(ELEMENTWISE_KIND)
    device = _enum_values(cuh_names.values())
    assert {name: device[c] for name, c in cuh_names.items()} == ELEMENTWISE_KIND
    assert _plan.ELEMENTWISE_LOSSES == tuple(n for n in ELEMENTWISE_KIND if n != "identity")


def test_denominator_modes_match_the_device_enum():
    device = _enum_values(["kDenomConstant", "kDenomWeightSum", "kDenomNonzero"])
    assert (device["kDenomConstant"], device["kDenomWeightSum"], device["kDenomNonzero"]) == \
        (host.DENOM_CONSTANT, host.DENOM_WEIGHT_SUM, host.DENOM_NONZERO)


def test_no_module_keeps_its_own_copy_of_the_tables():
    root = Path(__file__).resolve().parent.parent / "gpuloss"
    for path in root.rglob("*.py"):
        text = path.read_text()
        if path.name != "_plan.py":
            assert '"sigmoid_cross_entropy": 1' not in text, f"{path} repeats the loss-id table"
        if path.name != "host.py":
            assert not re.search(r"_DENOM_\w+\s*,.*=\s*0,\s*1,\s*2", text), f"{path} repeats the denominator modes"


@pytest.mark.parametrize("reduction", list(Reduction))
@pytest.mark.parametrize("shape,wshape", [((6, 4), None), ((6, 4), (6,)), ((6, 4), (6, 4)), ((0, 3), (0,))])
def test_denominator_rule_matches_the_reductions_definition(reduction, shape, wshape, rng):
    """host.denominator (both weight layouts) equals docs/api.md §2.3's formula on the expanded weights."""
    w_full = np.ones(shape) if wshape is None else rng.uniform(0, 2, size=wshape)
    if wshape is not None and w_full.size:
        w_full.reshape(-1)[0] = 0.0
    expanded = np.broadcast_to(w_full.reshape(w_full.shape + (1,) * (len(shape) - w_full.ndim)), shape)
    size = int(np.prod(shape))
    expected = {Reduction.NONE: 1.0, Reduction.SUM: 1.0, Reduction.MEAN: expanded.sum(),
                Reduction.SUM_OVER_BATCH_SIZE: size, Reduction.SUM_BY_NONZERO_WEIGHTS: np.count_nonzero(expanded),
                Reduction.BATCH_SIZE: shape[0]}[reduction]
    if size == 0 and reduction not in (Reduction.NONE, Reduction.SUM):
        expected = 0.0
    values = w_full.reshape(-1)
    block = size // max(values.size, 1) if values.size else 1
    plan = ReducePlan(reduction, shape, max(block, 1))
    np.testing.assert_allclose(float(host.denominator(plan, w_values=values)), expected)
    np.testing.assert_allclose(float(host.denominator(plan, w_meas=expanded.reshape(-1))), expected)
