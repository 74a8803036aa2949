"""Host-side glue every backend shares: layouts, denominators, target conversion.

Written against the array's own module (NumPy or CuPy), so the cpu backend and
the launch code of cuda/emulated use one copy.  Denominators depend only on
targets and weights (docs/design.md §3.4), so they are computed before the loss kernels
and stay 0-d arrays on the inputs' device.
"""
from __future__ import annotations

import numpy as np

from .._plan import DtypePlan, ReducePlan
from .._validate import Reduction


def xp_of(a):
    if isinstance(a, (np.ndarray, np.generic)):
        return np
    import cupy

    return cupy


def astype(a, dtype):
    """C-contiguous ``a`` in ``dtype`` (no copy when it already is): NumPy's float32 <-> float16 /
    bfloat16 casts go through cpu_half's parallel bit conversions, many times faster than NumPy's."""
    xp = xp_of(a)
    a = xp.ascontiguousarray(a)
    if xp is np:
        from .cpu_half import cast
        return cast(a, dtype)
    return a.astype(dtype, copy=False)


def rows_last(a, outer: int, length: int, inner: int, dtype):
    """View ``a`` (C-order ``[outer, length, inner]``) as contiguous rows ``[outer*inner, length]``.

    A copy only where the axis is not last, the input not contiguous, or the dtype differs.
    """
    if inner == 1:
        rows = a.reshape(outer, length)
    else:
        rows = a.reshape(outer, length, inner).transpose(0, 2, 1).reshape(outer * inner, length)
    return astype(rows, dtype)


def rows_back(rows, shape: tuple, outer: int, length: int, inner: int, dtype):
    """Inverse of rows_last: ``[outer*inner, length]`` back to ``shape``, C-contiguous, in ``dtype``."""
    if inner != 1:
        rows = rows.reshape(outer, inner, length).transpose(0, 2, 1)
    return astype(rows.reshape(shape), dtype)


def per_row(w_values, block: int, rows: int):
    """Weight of each row, from the (values, block) layout of _validate.weight_layout."""
    xp = xp_of(w_values)
    if w_values.size == 1:
        return xp.broadcast_to(w_values, (rows,))
    return w_values[xp.arange(rows) // block]


def class_indices(target):
    """Class-index targets as contiguous int64 (the kernels' type).

    uint64 values above the int64 range are clamped to its top (an invalid class,
    NaN with validate=False) instead of wrapping round to a negative number that
    could equal ignore_index.
    """
    xp = xp_of(target)
    y = target.reshape(-1)
    if y.dtype == np.uint64:
        y = xp.minimum(y, np.uint64(np.iinfo(np.int64).max))
    return xp.ascontiguousarray(y).astype(np.int64, copy=False)


def index_target_weights(y, w_row, class_weight, ignore_index: int | None):
    """Per-measurement weight w[n] = weight[n] * cw[y[n]], 0 where ignored (docs/api.md §2.1).

    An out-of-range target (validate=False) keeps weight[n]: its loss is NaN anyway.
    """
    xp = xp_of(y)
    classes = class_weight.shape[0]
    in_range = (y >= 0) & (y < classes)
    cw_y = class_weight[xp.where(in_range, y, 0)]
    cw_y = xp.where(in_range, cw_y, 1)
    w = w_row * cw_y
    if ignore_index is not None:
        w = xp.where(y != ignore_index, w, 0)
    return w.astype(np.float64)


# How the divisor of docs/api.md §2.3 is found; the numbers are kernels/losses.cuh's
# kDenomConstant / kDenomWeightSum / kDenomNonzero (checked by tests/test_kernels.py).
DENOM_CONSTANT, DENOM_WEIGHT_SUM, DENOM_NONZERO = 0, 1, 2


def denominator_rule(reduce: ReducePlan, value_count: int | None = None) -> tuple[int, float]:
    """The one source of the reductions' divisors: ``(mode, number)``.

    ``DENOM_CONSTANT``: the divisor is ``number``. ``DENOM_WEIGHT_SUM`` /
    ``DENOM_NONZERO``: it is ``number`` times the sum / the non-zero count of the
    weights. ``value_count=None`` means per-measurement weights (one per loss
    element); else the (values, block) layout of ``value_count`` values, each
    covering ``weight_block`` measurements (one value covers them all).
    """
    r = reduce.reduction
    if r in (Reduction.NONE, Reduction.SUM):
        return DENOM_CONSTANT, 1.0
    if reduce.size == 0:
        return DENOM_CONSTANT, 0.0
    if r == Reduction.SUM_OVER_BATCH_SIZE:
        return DENOM_CONSTANT, float(reduce.size)
    if r == Reduction.BATCH_SIZE:
        return DENOM_CONSTANT, float(reduce.batch)
    mode = DENOM_WEIGHT_SUM if r == Reduction.MEAN else DENOM_NONZERO
    if value_count is None:
        return mode, 1.0
    return mode, float(reduce.size if value_count == 1 else reduce.weight_block)


def denominator(reduce: ReducePlan, w_meas=None, w_values=None):
    """The divisor of docs/api.md §2.3 as a float64 0-d array (1 for none/sum), by denominator_rule.

    Give either the per-measurement weights ``w_meas`` or the (values, block)
    layout's ``w_values``, which is exact for every loss whose measurement
    weight is the user's weight alone.
    """
    w = w_meas if w_meas is not None else w_values
    xp = xp_of(w)
    mode, number = denominator_rule(reduce, None if w_meas is not None else w_values.size)
    if mode == DENOM_CONSTANT:
        return xp.asarray(number)
    if mode == DENOM_WEIGHT_SUM:
        return xp.sum(w, dtype=np.float64) * number
    return xp.count_nonzero(w).astype(np.float64) * number


def inverse(denom):
    """1/denom, and 0 where denom is 0: an empty mean has loss 0 and grad 0, never NaN."""
    xp = xp_of(denom)
    safe = xp.where(denom == 0, 1.0, denom)
    return xp.where(denom == 0, 0.0, 1.0 / safe)


def reduced(total, denom, dt: DtypePlan):
    """total / denom as a 0-d array of the loss dtype; 0 when denom is 0 (whatever total is)."""
    xp = xp_of(denom)
    return xp.where(denom == 0, 0.0, total * inverse(denom)).astype(dt.loss)


def finish_rows(reduce: ReducePlan, loss_rows, denom, dt: DtypePlan):
    """Per-row weighted losses -> the reduced loss (pairwise float64 sum: fixed order)."""
    if reduce.reduction == Reduction.NONE:
        return loss_rows.reshape(reduce.loss_shape).astype(dt.loss, copy=False)
    xp = xp_of(loss_rows)
    return reduced(xp.sum(loss_rows, dtype=np.float64), denom, dt)
