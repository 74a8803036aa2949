"""Launch code of ``kernels/vocab_parallel.cu`` for the ``cuda`` and ``emulated`` backends: the
launch twins of :mod:`gpuloss.backends.cpu_vocab` (same arguments, same results).

Both kernels run one row per block, grid-strided over rows, with a power-of-two
block of ~64 classes per thread (128..512 threads; at least one warp for small
shards), so a row's sums depend on the shard width only.  Device scalars the
host must not wait for (``sum(cw)`` and ``1/denominator``) are passed as
float64 device arrays: ``sums`` = {sum(cw)} and ``scal`` = {denominator,
1/denominator}, as kernels/reduce.cu writes them for the other losses.
"""
from __future__ import annotations

import numpy as np

from .cpu_vocab import stats_width
from .launch import MAX_ROW_BLOCKS, ROW_BLOCK_MAX, ROW_BLOCK_MAX_F64, LaunchBackend, _next_pow2, dtype_suffix

__all__ = ["vocab_launch", "vocab_stats", "vocab_finish"]


def vocab_launch(rows: int, v_local: int, acc_itemsize: int) -> tuple[int, int]:
    """(blocks, threads) of both vocabulary-parallel kernels for a shard of ``v_local`` classes."""
    cap = ROW_BLOCK_MAX_F64 if acc_itemsize == 8 else ROW_BLOCK_MAX
    threads = min(cap, max(32, _next_pow2(-(-v_local // 64))))
    return min(MAX_ROW_BLOCKS, max(1, rows)), threads


def _compute_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def vocab_stats(be: LaunchBackend, x, y, class_weight, start: int, *, ignore_index, label_smoothing: float,
                softcap: float):
    """``(m [rows], packed [rows, width])`` of one shard ``x`` [rows, V_r] (see cpu_vocab.vocab_stats)."""
    xp = be.xp
    x = be._contiguous(x)
    rows, v_local = x.shape
    acc = _compute_dtype(x.dtype)
    width = stats_width(label_smoothing)
    m = xp.empty(rows, acc)
    packed = xp.empty((rows, width), acc)
    if rows == 0:
        return m, packed
    cw = be._dummy(acc) if class_weight is None else be._contiguous(class_weight, acc)
    has_ignore = ignore_index is not None
    blocks, threads = vocab_launch(rows, v_local, acc.itemsize)
    be._launch(f"vp_stats_{dtype_suffix(x.dtype)}", blocks, threads, (
        x, np.int64(rows), np.int64(v_local), np.int64(start), be._contiguous(y, np.int64), cw,
        np.int32(class_weight is not None), np.int32(has_ignore), np.int64(ignore_index if has_ignore else 0),
        np.int32(bool(label_smoothing)), acc.type(softcap or 0.0), m, packed, np.int32(width)))
    return m, packed


def vocab_finish(be: LaunchBackend, x, y, w_row, class_weight, start: int, classes: int, m, packed, *,
                 ignore_index, label_smoothing: float, z_loss: float, softcap: float, grad_scale, want_grad: bool,
                 want_z: bool, cw_total=None):
    """Loss rows and this shard's gradient (see cpu_vocab.vocab_finish).

    ``grad_scale``: a float, or a float64 device array ``{denominator, 1/denominator}``;
    ``cw_total``: sum of the class weights as a float64 device array of one element
    (computed here, on the device, when None).
    """
    xp = be.xp
    x = be._contiguous(x)
    rows, v_local = x.shape
    acc = _compute_dtype(x.dtype)
    loss = xp.empty(rows, acc)
    z_rows = xp.empty(rows, acc) if want_z else be._dummy(acc)
    grad = xp.empty((rows, v_local), x.dtype) if want_grad else be._dummy(x.dtype)
    if rows == 0:
        return loss, (z_rows if want_z else None), (grad if want_grad else None)
    if isinstance(grad_scale, (int, float, np.floating)):
        scal = xp.asarray([1.0, float(grad_scale)], np.float64)
    else:
        scal = be._contiguous(grad_scale, np.float64)
    if class_weight is None:
        cw, sums = be._dummy(acc), be._dummy(np.float64)
    else:
        cw = be._contiguous(class_weight, acc)
        sums = (xp.sum(cw, dtype=np.float64).reshape(1) if cw_total is None
                else be._contiguous(cw_total, np.float64).reshape(1))
    w = be._contiguous(w_row, acc).reshape(-1)
    has_ignore = ignore_index is not None
    blocks, threads = vocab_launch(rows, v_local, acc.itemsize)
    be._launch(f"vp_finish_{dtype_suffix(x.dtype)}", blocks, threads, (
        x, np.int64(rows), np.int64(v_local), np.int64(start), np.int64(classes), be._contiguous(y, np.int64),
        w, np.int64(w.size), np.int64(1), cw, np.int32(class_weight is not None), sums, np.int32(has_ignore),
        np.int64(ignore_index if has_ignore else 0), acc.type(label_smoothing), acc.type(z_loss),
        acc.type(softcap or 0.0), be._contiguous(m, acc), be._contiguous(packed, acc),
        np.int32(packed.shape[1]), scal, loss, z_rows, np.int32(bool(want_z)), grad, np.int32(bool(want_grad))))
    return loss, (z_rows if want_z else None), (grad if want_grad else None)
