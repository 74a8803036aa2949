"""Host-side glue every backend shares: layouts, denominators, target checks.

Written against the array's own module (NumPy or CuPy), so the cpu backend and
the launch code of cuda/emulated use one copy.  Denominators depend only on
targets and weights (DESIGN §2), so they are computed before the loss kernels
and stay 0-d arrays on the inputs' device.
"""
from __future__ import annotations

import numpy as np

from .._plan import DtypePlan, ReducePlan
from .._validate import Reduction, first_bad_position


def xp_of(a):
    if isinstance(a, (np.ndarray, np.generic)):
        return np
    import cupy

    return cupy


def rows_last(a, outer: int, length: int, inner: int, dtype):
    """View ``a`` (C-order ``[outer, length, inner]``) as contiguous rows ``[outer*inner, length]``.

    A copy only where the axis is not last, the input not contiguous, or the dtype differs.
    """
    xp = xp_of(a)
    if inner == 1:
        rows = a.reshape(outer, length)
    else:
        rows = a.reshape(outer, length, inner).transpose(0, 2, 1).reshape(outer * inner, length)
    return xp.ascontiguousarray(rows).astype(dtype, copy=False)


def rows_back(rows, shape: tuple, outer: int, length: int, inner: int, dtype):
    """Inverse of rows_last: ``[outer*inner, length]`` back to ``shape``, C-contiguous, in ``dtype``."""
    xp = xp_of(rows)
    if inner != 1:
        rows = rows.reshape(outer, inner, length).transpose(0, 2, 1)
    return xp.ascontiguousarray(rows.reshape(shape)).astype(dtype, copy=False)


def per_row(w_values, block: int, rows: int):
    """Weight of each row, from the (values, block) layout of _validate.weight_layout."""
    xp = xp_of(w_values)
    if w_values.size == 1:
        return xp.broadcast_to(w_values, (rows,))
    return w_values[xp.arange(rows) // block]


def check_class_targets(target, classes: int, ignore_index: int) -> None:
    """SPEC §7: the first target that is neither ignore_index nor in [0, classes) is named."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):  # the one synchronisation validate=True costs on a GPU
        flat = int(bad.reshape(-1).argmax())
        pos = first_bad_position(tuple(target.shape), flat)
        value = int(target.reshape(-1)[flat])
        where = f"target[{', '.join(map(str, pos))}]" if pos else "target"
        ignored = "" if ignore_index == np.iinfo(np.int64).min else f" nor ignore_index={ignore_index}"
        raise ValueError(f"{where} = {value} is not a class index in [0, {classes}){ignored}; "
                         f"pass validate=False to get NaN for such rows instead")


def index_target_weights(y, w_row, class_weight, ignore_index: int):
    """Per-measurement weight w[n] = weight[n] * cw[y[n]], 0 where ignored (SPEC §2.1).

    An out-of-range target (validate=False) keeps weight[n]: its loss is NaN anyway.
    """
    xp = xp_of(y)
    classes = class_weight.shape[0]
    in_range = (y >= 0) & (y < classes)
    cw_y = class_weight[xp.where(in_range, y, 0)]
    cw_y = xp.where(in_range, cw_y, 1)
    return xp.where(y != ignore_index, w_row * cw_y, 0).astype(np.float64)


def denominator(reduce: ReducePlan, w_meas=None, w_values=None):
    """The divisor of SPEC §2.3's table as a float64 0-d array (1 for none/sum).

    Give either the per-measurement weights ``w_meas`` or the (values, block)
    layout's ``w_values`` (with ``reduce.weight_block``), which is exact for
    every loss whose measurement weight is the user's weight alone.
    """
    xp = xp_of(w_meas if w_meas is not None else w_values)
    r = reduce.reduction
    if r in (Reduction.NONE, Reduction.SUM):
        return xp.asarray(1.0)
    if reduce.size == 0:
        return xp.asarray(0.0)
    if r == Reduction.SUM_OVER_BATCH_SIZE:
        return xp.asarray(float(reduce.size))
    if r == Reduction.BATCH_SIZE:
        return xp.asarray(float(reduce.batch))
    if w_meas is not None:
        if r == Reduction.MEAN:
            return xp.sum(w_meas, dtype=np.float64)
        return xp.count_nonzero(w_meas).astype(np.float64)
    # Each value covers weight_block measurements (a scalar covers them all).
    block = reduce.size if w_values.size == 1 else reduce.weight_block
    if r == Reduction.MEAN:
        return xp.sum(w_values, dtype=np.float64) * block
    return xp.count_nonzero(w_values).astype(np.float64) * block


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
