"""Vocabulary-parallel softmax cross entropy, ``cpu`` backend: the Numba twins of
``kernels/vocab_parallel.cu`` (docs/distributed.md).

The scheme is Megatron-LM's vocabulary-parallel cross entropy (Shoeybi et al.
2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using
Model Parallelism", arXiv 1909.08053, §3): rank r holds the logits of the
contiguous classes ``[start, start + V_r)`` of every row, and only a few
numbers per row cross the network, never the logits.  Per row, with ``x'``
the (soft-capped) logits of the shard:

    stats (one pass over the shard; ``vocab_stats``)
        m_r    = max_c x'_c                                   -> all-reduce MAX -> m
        rest_r = sum_{c != y} exp(x'_c - m_r)                 \\
        xy_r   = x'_y if y is in the shard, else 0             } rescaled to m, then
        gap_r  = sum_c cw_c (m_r - x'_c)   (label smoothing)  /  one all-reduce SUM
    combine (``combine_partials``; between the collectives)
        rest_r *= exp(m_r - m);   gap_r += sum_{c in shard} cw_c * (m - m_r)
    finish (one pass over the shard; ``vocab_finish``), from the reduced m, rest, xy, gap:
        s = rest + exp(xy - m),  lse = m + log s,  -logp_y = (m - xy) + log s  (log1p(rest) if xy == m)
        l = (1-eps) cw_y (-logp_y) + eps/C (gap + sum(cw) log s) + z lse^2 cw_y
        dl/dx_c = [(a + b sum(cw) + zc) p_c - b cw_c - a [c == y]] (1 - (x'_c / s)^2 with softcap),
        a = (1-eps) cw_y, b = eps / C, zc = 2 z cw_y lse, p_c = exp((x'_c - m) - log s),
        and a (p_y - 1) = -a rest / s for the target (no cancellation when p_y is close to 1).

``rest`` excludes the target so that a confident row keeps its tiny loss
(log1p(rest)), as kernels/xent.cu does.  Every rank computes the same loss
rows from the same reduced statistics; the gradient of its own classes only.

The packed statistics are ``[rows, width]`` with columns REST, XY and (when
label smoothing is on, width 3) GAP, in the compute dtype; ``m`` is ``[rows]``.
Ignored rows give ``m = -inf`` and zeros (they are skipped in the finish).
"""
from __future__ import annotations

import math

import numpy as np
from numba import get_thread_id, njit, prange

from .cpu import (_SWEEP, _row_max_vec, _row_sum_exp_except, _row_weighted_gap, index_row_terms,
                  thread_slots)
from .cpu_math import exp_nonpositive

REST, XY, GAP = 0, 1, 2

__all__ = ["REST", "XY", "GAP", "stats_width", "vocab_stats", "combine_partials", "vocab_finish"]


def stats_width(label_smoothing: float) -> int:
    """Numbers per row in the SUM all-reduce: rest and the target logit, plus the gap with smoothing."""
    return 3 if label_smoothing else 2


@njit(cache=True)
def _stats_scalar(row, skip, cw, start, want_gap):
    """(m, rest, gap) of one row, float64 sums, NaN-propagating max (float64 rows, and float32 rows
    holding a NaN or an infinity)."""
    m = row[0]
    for c in range(1, row.size):
        v = row[c]
        if v > m or v != v:
            m = v
    rest = 0.0
    gap = 0.0
    if m == -np.inf:  # every class of the shard masked: nothing to add (the other shards decide)
        return m, rest, gap
    for c in range(row.size):
        if c != skip:
            rest += math.exp(row[c] - m)
    if want_gap:
        for c in range(row.size):
            if row[c] != m:  # -inf logits under a -inf max would give inf - inf
                gap += cw[start + c] * (m - row[c])
    return m, rest, gap


@njit(parallel=True, cache=True)
def _vocab_stats_kernel(x, y, cw, start, has_ignore, ignore_index, want_gap, m_out, packed):
    """Scalar statistics, float64 sums (float64 rows)."""
    rows, v_local = x.shape
    for n in prange(rows):
        yn = y[n]
        if has_ignore and yn == ignore_index:
            _ignored_stats(n, m_out, packed)
            continue
        row = x[n]
        skip = yn - start if start <= yn < start + v_local else -1
        m, rest, gap = _stats_scalar(row, skip, cw, start, want_gap)
        _store_stats(n, m, rest, row[skip] if skip >= 0 else 0.0, gap, want_gap, m_out, packed)


@njit(parallel=True, cache=True)
def _vocab_stats_kernel_f32(x, y, cw, start, has_ignore, ignore_index, want_gap, m_out, packed, scratch):
    """Float32 rows: cpu.py's vectorised max / exp sums (float32 blocks into float64); rows holding a NaN
    or an infinity take the scalar path."""
    rows, v_local = x.shape
    for n in prange(rows):
        yn = y[n]
        if has_ignore and yn == ignore_index:
            _ignored_stats(n, m_out, packed)
            continue
        row = x[n]
        skip = yn - start if start <= yn < start + v_local else -1
        m = _row_max_vec(row)
        rest = np.nan
        gap = 0.0
        if -np.inf < m < np.inf:
            rest = _row_sum_exp_except(row, m, scratch[get_thread_id() % scratch.shape[0]], skip)
            if want_gap:
                gap = _row_weighted_gap(row, cw[start:start + v_local], m)
        if rest != rest:  # a NaN or an infinity somewhere: the scalar path, NaN-propagating
            m, rest, gap = _stats_scalar(row, skip, cw, start, want_gap)
        _store_stats(n, m, rest, row[skip] if skip >= 0 else 0.0, gap, want_gap, m_out, packed)


@njit(inline="always")
def _ignored_stats(n, m_out, packed):
    m_out[n] = -np.inf
    for k in range(packed.shape[1]):
        packed[n, k] = 0.0


@njit(inline="always")
def _store_stats(n, m, rest, xy, gap, want_gap, m_out, packed):
    m_out[n] = m
    packed[n, 0] = rest
    packed[n, 1] = xy
    if want_gap:
        packed[n, 2] = gap


def _compute(x):
    """Rows in the compute dtype: float64 stays, everything else (16-bit included) becomes float32."""
    dt = np.float64 if x.dtype == np.float64 else np.float32
    return np.ascontiguousarray(x).astype(dt, copy=False)


def _capped(x, softcap: float):
    """Gemma 2 soft-capping s * tanh(x / s), a new array (the input is untouched); x itself without."""
    if not softcap:
        return x
    return (softcap * np.tanh(x / x.dtype.type(softcap))).astype(x.dtype, copy=False)


def vocab_stats(x, y, class_weight, start: int, *, ignore_index, label_smoothing: float, softcap: float):
    """Per-row statistics of one shard ``x`` ([rows, V_r], classes ``start .. start + V_r - 1``).

    ``y``: int64 [rows] global class indices; ``class_weight``: the whole [C] vector or None.
    Returns ``(m [rows], packed [rows, stats_width])`` in the compute dtype.
    """
    xc = _capped(_compute(x), softcap)
    rows, v_local = xc.shape
    dt = xc.dtype
    cw = np.ones(start + v_local, dt) if class_weight is None else np.asarray(class_weight, dt)
    m = np.empty(rows, dt)
    packed = np.empty((rows, stats_width(label_smoothing)), dt)
    has_ignore = ignore_index is not None
    args = (xc, np.ascontiguousarray(y, np.int64), cw, np.int64(start), has_ignore,
            np.int64(ignore_index if has_ignore else 0), bool(label_smoothing), m, packed)
    if dt == np.float32:
        _vocab_stats_kernel_f32(*args, _scratch(rows, v_local, dt))
    else:
        _vocab_stats_kernel(*args)
    return m, packed


def _scratch(rows: int, v_local: int, dt):
    # e_out of _row_sum_exp_except: a row per thread (it is written), apart from the logits (an
    # e_out that may alias the row makes LLVM's alias check fall back to scalar code).
    return np.empty((thread_slots(rows), max(v_local, 1)), dt)


def combine_partials(xp, m_local, m_global, packed, cw_shard_sum: float):
    """Rescale a shard's packed sums from its own max to the global one, in place (``xp``: numpy or
    cupy; gpuloss.torch.distributed has the torch twin). ``exp(m_r - m)`` is taken as 1 when the two
    are equal (also at infinities), and the gap's shift as 0."""
    same = m_local == m_global
    with np.errstate(invalid="ignore", over="ignore"):
        packed[:, REST] *= xp.where(same, 1.0, xp.exp(m_local - m_global)).astype(packed.dtype)
        if packed.shape[1] > GAP:
            packed[:, GAP] += xp.where(same, 0.0, cw_shard_sum * (m_global - m_local)).astype(packed.dtype)
    return packed


@njit(**_SWEEP)
def _grad_row_f32(row, g_out, m, coef_over_s, b, cw_shard):
    """g_c = coef/s * exp(x_c - m) - b cw_c over a float32 row, cpu_math's vectorised exp."""
    for c in range(row.size):
        g_out[c] = coef_over_s * exp_nonpositive(row[c] - m) - b * cw_shard[c]


def _make_finish_kernel(vec: bool):
    """The finish kernel; ``vec`` (a closure constant, so the branch folds away) picks the float32
    vectorised gradient row for finite rows."""

    def kernel(x, y, w_row, cw, start, classes, cw_total, has_ignore, ignore_index, eps, z_loss,
                             m_in, packed, grad_scale, want_grad, want_z, loss_out, z_out, grad_out):
        rows, v_local = x.shape
        uniform = eps / classes
        for n in prange(rows):
            yn = y[n]
            if has_ignore and yn == ignore_index:
                loss_out[n] = 0.0
                if want_z:
                    z_out[n] = 0.0
                if want_grad:
                    for c in range(v_local):
                        grad_out[n, c] = 0.0
                continue
            m = np.float64(m_in[n])
            rest = np.float64(packed[n, 0])
            xy = np.float64(packed[n, 1])
            if yn < 0 or yn >= classes or m == np.inf or m == -np.inf:
                # an invalid target (validate=False), a +inf logit or a row of -inf: NaN, as the unsharded kernels
                m = np.nan
            s = rest + math.exp(xy - m)
            log_s = math.log(s)
            lse = m + log_s
            nll = math.log1p(rest) if xy == m else (m - xy) + log_s
            cw_y = cw[yn] if 0 <= yn < classes else np.nan
            smooth = np.float64(packed[n, 2]) + cw_total * log_s if eps != 0.0 else 0.0
            loss_out[n], z, a, b, zc = index_row_terms(nll, smooth, lse, cw_y, eps, uniform, w_row[n], z_loss,
                                                       grad_scale)
            if want_z:
                z_out[n] = z
            if want_grad:
                coef = a + b * cw_total + zc
                if vec and -np.inf < m < np.inf and s == s:
                    _grad_row_f32(x[n], grad_out[n], np.float32(m), np.float32(coef / s), np.float32(b),
                                  cw[start:start + v_local])
                else:
                    for c in range(v_local):
                        p = math.exp((x[n, c] - m) - log_s)
                        grad_out[n, c] = coef * p - b * cw[start + c]
                local_y = yn - start
                if 0 <= local_y < v_local:
                    p_y = math.exp((xy - m) - log_s)
                    grad_out[n, local_y] = -a * rest / s + (b * cw_total + zc) * p_y - b * cw_y

    kernel.__name__ = kernel.__qualname__ = f"_vocab_finish_kernel{'_f32' if vec else ''}"
    return njit(parallel=True, cache=True)(kernel)


_FINISH = {True: _make_finish_kernel(True), False: _make_finish_kernel(False)}


def vocab_finish(x, y, w_row, class_weight, start: int, classes: int, m, packed, *, ignore_index,
                 label_smoothing: float, z_loss: float, softcap: float, grad_scale: float, want_grad: bool,
                 want_z: bool, cw_total=None):
    """Loss rows (the same on every rank) and this shard's gradient, from the reduced statistics.

    ``w_row``: per-row weights (compute dtype, [rows]); ``classes``: the whole vocabulary C;
    ``grad_scale``: 1/denominator of the reduction (1 for "none"/"sum"), a float or the
    ``{denominator, 1/denominator}`` pair; ``cw_total``: sum of the class weights (computed
    when None).  Returns
    ``(loss_rows, z_rows or None, grad or None)``; grad in x's dtype, loss rows in the compute dtype.
    """
    xc = _capped(_compute(x), softcap)
    rows, v_local = xc.shape
    dt = xc.dtype
    cw = np.ones(classes, dt) if class_weight is None else np.asarray(class_weight, dt)
    if class_weight is None:
        cw_total = float(classes)
    elif cw_total is None:
        cw_total = float(np.sum(cw, dtype=np.float64))
    else:
        cw_total = float(np.asarray(cw_total).reshape(-1)[0])
    if not isinstance(grad_scale, (int, float, np.floating)):
        grad_scale = float(np.asarray(grad_scale).reshape(-1)[-1])
    loss = np.empty(rows, dt)
    z_rows = np.empty(rows if want_z else 1, dt)
    grad = np.empty((rows, v_local) if want_grad else (1, 1), dt)
    has_ignore = ignore_index is not None
    _FINISH[dt == np.float32](xc, np.ascontiguousarray(y, np.int64), np.ascontiguousarray(w_row, dt), cw,
                         np.int64(start), np.int64(classes), cw_total, has_ignore,
                         np.int64(ignore_index if has_ignore else 0), float(label_smoothing), float(z_loss),
                         np.ascontiguousarray(m, dt), np.ascontiguousarray(packed, dt), float(grad_scale),
                         bool(want_grad), bool(want_z), loss, z_rows, grad)
    if not want_grad:
        return loss, (z_rows if want_z else None), None
    if softcap:  # chain rule through s * tanh(x / s): times 1 - tanh^2 = 1 - (x' / s)^2
        grad *= 1 - np.square(xc / dt.type(softcap))
    return loss, (z_rows if want_z else None), grad.astype(x.dtype, copy=False)
