"""The ``cpu`` backend: Numba kernels over NumPy arrays (docs/design.md §2, docs/design.md §6).

Each kernel here is the host twin of a CUDA kernel in ``kernels/``: same math,
same weights, same order of reduction across rows.  Work is split into fixed
rows or fixed-size chunks whatever the thread count, and the final sums run
over those partials in a fixed order, so results are bitwise identical for
any ``numba.set_num_threads``.  Sums over classes and chunks accumulate in
float64 (at least the float32 docs/api.md §3.1 asks for).
"""
from __future__ import annotations

import functools
import math
import types

import numpy as np
from numba import get_num_threads, get_thread_id, njit, prange

from .._plan import ELEMENTWISE_KIND, CosinePlan, CrossEntropyPlan, ElementwisePlan, WeightedReducePlan
from . import host
from .cpu_half import bf16_bits_from_f32, f16_from_f32, f32_from_f16
from .cpu_math import (exp_nonpositive, float32_to_int32_bits, int32_bits_to_float32, log1p_f32, log1p_unit, log_f32,
                       maxnum)

# Elements per chunk of the element-wise kernels: the unit of parallel work and of
# the deterministic partial sums (big enough to amortise scheduling, small enough
# to balance two to sixteen threads).
CHUNK = 16384

# Classes per float32 partial sum in the vectorised cross entropy: 8 lanes x 4
# interleaved accumulators each add ~16 terms before the float64 total, so
# float32 rounding stays near 1e-7 relative whatever C is.
SUM_BLOCK = 512
F32_ZERO = np.float32(0.0)
# Fast-math flags of the vectorised loops: ``reassoc`` lets LLVM split sums into
# vector lanes (a fixed order for a given build), ``contract`` allows FMA.  No
# flag assumes the absence of NaN or inf.
_VEC = {"reassoc", "contract"}
# Options of the separately compiled vector sweeps. error_model="numpy" as for the kernels (see
# _KernelPair): with Python's, each division checks for zero and raises, and that branch kept
# _lanes_log scalar (7 ns per log against about 1).
_SWEEP = {"cache": True, "fastmath": _VEC, "error_model": "numpy"}

# Below this many elements a kernel runs on the calling thread only: waking
# the thread pool costs more than the work (milliseconds on a busy 2-core
# machine, measured in the layer graph's training loop).
SERIAL_BELOW = 1 << 16


class _KernelPair:
    """One kernel source compiled twice: ``prange`` over threads, and a serial twin.

    Called as ``kernel(work, *args)``; ``work`` (elements touched) picks the
    variant.  Results are the same either way: no kernel splits a sum by thread.
    """

    def __init__(self, py_func, options):
        # error_model="numpy": x/0 is inf or NaN as IEEE says, never a ZeroDivisionError check,
        # whose branch also stops LLVM from vectorising the loop (measured: 5.7 -> 0.8 ns per log).
        options = {"error_model": "numpy", **options}
        self.parallel = njit(parallel=True, cache=True, **options)(py_func)
        serial = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + "_serial",
                                    py_func.__defaults__, py_func.__closure__)
        serial.__qualname__ = py_func.__qualname__ + "_serial"  # its own on-disk cache entry
        self.serial = njit(parallel=False, cache=True, **options)(serial)
        self.__doc__ = py_func.__doc__

    def __call__(self, work: int, *args):
        return (self.serial if work < SERIAL_BELOW else self.parallel)(*args)


def parallel_kernel(**options):
    """Decorator: a _KernelPair of the function, compiled with Numba ``options``."""
    return lambda py_func: _KernelPair(py_func, options)


# How the float32 kernels get their data: float32 as stored, or 16-bit bit patterns (uint16 views of
# float16 / bfloat16) decoded chunk by chunk into float32 scratch, and the gradient encoded back, so
# a 16-bit call needs no float32 copy of its input and none of its gradient.
STORE_F32, STORE_F16, STORE_BF16 = 0, 1, 2
# Float32 elements of scratch per thread for 16-bit rows (as many again for their gradient): 128 KiB,
# in L2; at least two rows (see _xent_scratch).
HALF_CHUNK_ELEMENTS = 1 << 15


@njit(inline="always")
def _decode_half(h, store):
    """float32 value of the 16-bit pattern h (exact): float16 by cpu_half, bfloat16 by a shift."""
    if store == STORE_F16:
        return f32_from_f16(h)
    return int32_bits_to_float32(np.int32(np.uint32(h) << np.uint32(16)))


@njit(inline="always")
def _encode_half(v, store):
    """16-bit pattern of float32 v, rounded to nearest even as NumPy / ml_dtypes cast."""
    if store == STORE_F16:
        return f16_from_f32(v)
    return bf16_bits_from_f32(np.uint32(float32_to_int32_bits(v)))


@njit(cache=True)
def _decode_span(src, store, dst):
    for i in range(src.size):
        dst[i] = _decode_half(src[i], store)


@njit(cache=True)
def _encode_span(src, store, dst):
    for i in range(src.size):
        dst[i] = _encode_half(src[i], store)


@njit(cache=True)
def _decode_rows(src, r0, nr, store, dst):
    for r in range(nr):
        _decode_span(src[r0 + r], store, dst[r])


@njit(cache=True)
def _encode_rows(src, nr, store, dst, r0):
    for r in range(nr):
        _encode_span(src[r], store, dst[r0 + r])


@njit(inline="always")
def _sign(d):
    if d != d:  # NaN in, NaN out: a NaN element never gets a silent gradient of 0
        return d
    return (d > 0) - (d < 0)


@njit(inline="always")
def _elementwise_loss(kind, fast, x, t, param, pos_weight, one, zero):
    """(loss, d loss / d x) of one element; ``one`` is 1 in the compute dtype. Mirrors kernels/elementwise.cu.

    ``fast`` (float32 only): cpu_math's vectorisable exp and log in place of libm's scalar calls.
    """
    if kind == 0:  # identity: weighted_reduce
        return x, one
    if kind == 1:  # sigmoid cross entropy; t' = t (1 - eps) + eps/2 (TF label smoothing)
        ts = t * (one - param) + param / (one + one)
        e = exp_nonpositive(-abs(x)) if fast else math.exp(-abs(x))
        softplus_abs = log1p_unit(e) if fast else math.log1p(e)  # log(1 + e^-|x|), never overflows
        # sigmoid(x) - t and sigmoid(x) - 1 from e^-|x| without overflow, and without cancellation for
        # t in {0, 1} (x >= 0: sigmoid = 1 - e r; x < 0: sigmoid = e r, r = 1 / (1 + e)).
        r = one / (one + e)
        sig_minus_t = (one - ts) - e * r if x >= 0 else e * r - ts
        sig_minus_one = -e * r if x >= 0 else -r
        # Both forms are computed and one selected (no branch: the loop stays vectorised).
        # Without pos_weight: max(x, 0) - x t + softplus(-|x|), no cancellation for a tiny loss.
        plain_loss, plain_grad = (x if x > 0 else zero) - x * ts + softplus_abs, sig_minus_t
        # PyTorch BCEWithLogitsLoss with pos_weight p: (1-t) x + (1 + (p-1) t) softplus(-x)
        coef = one + (pos_weight - one) * ts
        pw_loss = (one - ts) * x + coef * (softplus_abs + (zero if x > 0 else -x))
        pw_grad = (one - ts) + coef * sig_minus_one
        plain = pos_weight == one
        return plain_loss if plain else pw_loss, plain_grad if plain else pw_grad
    if kind == 2:  # log loss (TF losses.log_loss), param = epsilon; log(1 - x + eps) as log1p(eps - x):
        # no rounding of 1 - x, so a confident p ~ 0 keeps its tiny loss
        if fast:
            return (-t * log_f32(x + param) - (one - t) * log1p_f32(param - x),
                    -t / (x + param) + (one - t) / (one - x + param))
        return (-t * math.log(x + param) - (one - t) * math.log1p(param - x),
                -t / (x + param) + (one - t) / (one - x + param))
    # Constants in the compute dtype: a Python 2 or 0.5 here would make the float32 loops float64.
    two = one + one
    half = one / two
    d = x - t
    if kind == 3:
        return d * d, two * d
    if kind == 4:
        return abs(d), one * _sign(d)
    if kind == 5:  # huber, param = delta (TF huber_loss)
        a = abs(d)
        if a <= param:
            return half * d * d, d
        return param * (a - half * param), param * _sign(d)
    if kind == 6:  # smooth L1, param = beta (PyTorch SmoothL1Loss; beta = 0 is L1)
        a = abs(d)
        if a < param:
            return half * d * d / param, d / param
        return a - half * param, one * _sign(d)
    # hinge (TF hinge_loss): y = 2t - 1, max(0, 1 - y x)
    y = two * t - one
    margin = one - y * x
    if margin > 0 or margin != margin:
        return margin, -y if margin > 0 else margin
    return zero, zero


# Losses whose float32 kernel uses cpu_math's exp and log (the others need no transcendental).
SIGMOID = ELEMENTWISE_KIND["sigmoid_cross_entropy"]
_FAST_KINDS = {SIGMOID, ELEMENTWISE_KIND["log_loss"]}


@njit(inline="always")
def _elementwise_block(kind, fast, x, t, j0, j1, base, w, g, pos_weight, pw_period, param, one, zero,
                       has_pos_weight, want_loss, want_grad, loss_out, grad_out):
    """Elements [j0, j1) of one weight segment of a chunk starting at element ``base``; returns their
    float32 sum of w l.  Module-level, not a closure of the kernel: a jitted function among a
    kernel's closure variables keys Numba's disk cache by a per-process id (recompiled every run)."""
    # Views of the block indexed from 0: with j0 + j as the index, LLVM could not prove it
    # non-negative and kept Numba's negative-index wraparound per element, which turned every
    # load into a scalar insert (mse 2.6 ns per element, against 0.5 for the plain loop).
    xb, tb = x[j0:j1], t[j0:j1]
    lb = loss_out[j0:j1] if want_loss else loss_out
    gb = grad_out[j0:j1] if want_grad else grad_out
    block_sum = zero
    for j in range(j1 - j0):
        p = pos_weight[(base + j0 + j) % pw_period] if has_pos_weight else one
        l, dl = _elementwise_loss(kind, fast, xb[j], tb[j], param, p, one, zero)
        wl = w * l
        block_sum += wl
        if want_loss:
            lb[j] = wl
        if want_grad:
            gb[j] = g * dl
    return block_sum


def _make_elementwise_kernel(name: str, kind: int, fast: bool, x_store: int, t_store: int):
    """The element-wise kernel specialised for one loss (and, with ``fast``, for float32), reading x and
    t stored as ``x_store`` / ``t_store`` (STORE_*: the compute dtype itself, or 16-bit bits decoded
    per chunk; a 16-bit x also gets its gradient encoded back).

    All five are closure constants, so the branches of _elementwise_loss fold
    away and each case gets its own vectorised loop from this one source; the
    distinct ``__qualname__`` keeps Numba's on-disk cache entries apart.
    """

    def kernel(x, t, w_values, w_block, pos_weight, pw_period, param, grad_scale, want_loss, want_grad,
               loss_out, grad_out, partials):
        # Per element i: L = w[i // w_block] * l(x, t); grad = grad_scale * w * dl/dx.  Writes L (if
        # want_loss), grad (if want_grad) and one float64 partial sum of L per CHUNK (fixed order).
        n = x.size
        zero = param - param  # 0 and 1 in the compute dtype (param is finite)
        one = zero + np.float32(1)
        for c in prange(partials.size):
            lo = c * CHUNK
            hi = min(n, lo + CHUNK)
            # xc, tc, gc, lc: this chunk's elements, indexed from 0 (views, or float32 scratch for 16 bits)
            if x_store == STORE_F32:
                xc = x[lo:hi]
                gc = grad_out[lo:hi] if want_grad else grad_out
            else:
                xc = np.empty(hi - lo, np.float32)
                _decode_span(x[lo:hi], x_store, xc)
                gc = np.empty(hi - lo if want_grad else 0, np.float32)
            if t_store == STORE_F32:
                tc = t[lo:hi]
            else:
                tc = np.empty(hi - lo, np.float32)
                _decode_span(t[lo:hi], t_store, tc)
            lc = loss_out[lo:hi] if want_loss else loss_out
            acc = 0.0
            i = lo
            while i < hi:  # one weight segment at a time: no division per element
                b = i // w_block
                w = w_values[b]
                g = grad_scale * w
                seg_hi = min(hi, (b + 1) * w_block)
                for j0 in range(i - lo, seg_hi - lo, SUM_BLOCK):  # vector-lane partial sums, added into float64
                    j1 = min(seg_hi - lo, j0 + SUM_BLOCK)
                    # want_loss and the pos_weight switch as literals in each copy: with a second
                    # conditional store, or a conditional load, in the loop LLVM gave up on
                    # vectorising the sigmoid and log losses (measured 4-7x slower).
                    if kind == SIGMOID and pw_period > 0:
                        acc += _elementwise_block(kind, fast, xc, tc, j0, j1, lo, w, g, pos_weight, pw_period,
                                                  param, one, zero, True, want_loss, want_grad, lc, gc)
                    elif want_loss:
                        acc += _elementwise_block(kind, fast, xc, tc, j0, j1, lo, w, g, pos_weight, pw_period,
                                                  param, one, zero, False, True, want_grad, lc, gc)
                    else:
                        acc += _elementwise_block(kind, fast, xc, tc, j0, j1, lo, w, g, pos_weight, pw_period,
                                                  param, one, zero, False, False, want_grad, lc, gc)
                i = seg_hi
            if x_store != STORE_F32 and want_grad:
                _encode_span(gc, x_store, grad_out[lo:hi])
            partials[c] = acc

    kernel.__name__ = kernel.__qualname__ = \
        f"_elementwise_kernel_{name}{'_f32' if fast else ''}_x{x_store}_t{t_store}"
    return parallel_kernel(fastmath=_VEC)(kernel)


@njit(inline="always")
def _row_max(x, n, classes):
    """Row max; a NaN anywhere makes it NaN."""
    m = x[n, 0]
    for c in range(1, classes):
        v = x[n, c]
        if v > m or v != v:
            m = v
    return m


@njit(inline="always")
def _row_max_and_log_sum_exp(x, n, classes):
    """Row max m and log(sum_c exp(x_c - m)); a NaN anywhere gives NaN, so do a +inf and an all -inf row
    (x_c - m is then inf - inf or -inf - -inf)."""
    m = _row_max(x, n, classes)
    s = 0.0
    for c in range(classes):
        s += math.exp(x[n, c] - m)
    return m, math.log(s)


@njit(inline="always")
def index_row_terms(nll, smooth_sum, lse, cw_y, eps, smooth_coef, w, z_loss, grad_scale):
    """The per-row numbers of cross entropy with a class-index target, written once for every cpu
    kernel (the float64 and float32 row kernels here, the vocabulary-parallel finish in cpu_vocab).

    ``nll`` = -logp_y, ``smooth_sum`` = sum_c cw_c (-logp_c), ``lse`` = logsumexp of the row.
    Returns ``(L, z, a, b, zc)``: the weighted loss w l + z with
    l = (1-eps) cw_y nll + eps/C smooth_sum (PyTorch CrossEntropyLoss docs) and
    z = w cw_y z_loss lse^2 (PaLM §5), and the gradient coefficients
    dL/dx_c (times grad_scale) = (a + b sum(cw) + zc) p_c - b cw_c - a [c = y].
    """
    loss = (1.0 - eps) * cw_y * nll
    if eps != 0.0:
        loss += smooth_coef * smooth_sum
    z = w * cw_y * z_loss * lse * lse if z_loss != 0.0 else 0.0
    g = grad_scale * w
    return w * loss + z, z, g * (1.0 - eps) * cw_y, g * smooth_coef, g * cw_y * 2.0 * z_loss * lse


@njit(inline="always")
def _invalid_row(n, out_n, want_grad, want_z, loss_out, z_out, grad_out):
    """A target outside [0, C) (only reached with validate=False): NaN, and no read out of bounds.
    ``n`` is the row of grad_out, ``out_n`` its entry in loss_out / z_out (they differ for 16-bit
    inputs, whose rows are decoded into scratch)."""
    loss_out[out_n] = np.nan
    if want_z:
        z_out[out_n] = np.nan
    if want_grad:
        for c in range(grad_out.shape[1]):
            grad_out[n, c] = np.nan


@njit(inline="always")
def _xent_index_row(x, n, yn, w, class_weight, cw_sum, eps, z_loss, grad_scale, want_grad, want_z, loss_out,
                    z_out, out_n, grad_out):
    """One row of cross entropy with a class-index target, scalar math (twin of kernels/xent.cu).

    l = (1-eps) cw[y] (-logp_y) + eps/C sum_c cw[c] (-logp_c)   (PyTorch CrossEntropyLoss docs)
        + z_loss lse^2                                          (PaLM §5; weighted by cw[y] like the rest)
    dl/dx_j = (1-eps) cw[y] (p_j - [j=y]) + eps/C (sum(cw) p_j - cw_j) + 2 z_loss lse cw[y] p_j
    -logp_c is formed as (m - x_c) + log(s) so that |logits| ~ 1e4 lose no digits, and
    -logp_y as log1p(rest), rest = sum_{c != y} e^(x_c - m), when y holds the max: a confident
    row's tiny loss keeps its digits (1 + 1e-18 is 1 even in float64).
    """
    classes = x.shape[1]
    if yn < 0 or yn >= classes:
        _invalid_row(n, out_n, want_grad, want_z, loss_out, z_out, grad_out)
        return
    m = _row_max(x, n, classes)
    s = 0.0
    rest = 0.0
    for c in range(classes):
        e = math.exp(x[n, c] - m)
        s += e
        if c != yn:
            rest += e
    log_s = math.log(s)
    lse = m + log_s
    x_y = x[n, yn]
    # s is NaN for an all -inf row (-inf - -inf): that row must not take the log1p branch (log(1) = 0).
    nll = math.log1p(rest) if x_y == m and s == s else (m - x_y) + log_s
    cw_y = class_weight[yn]
    smooth = 0.0
    if eps != 0.0:
        for c in range(classes):
            smooth += class_weight[c] * ((m - x[n, c]) + log_s)
    loss_out[out_n], z, a, b, zc = index_row_terms(nll, smooth, lse, cw_y, eps, eps / classes, w, z_loss,
                                                   grad_scale)
    if want_z:
        z_out[out_n] = z
    if want_grad:
        for c in range(classes):
            p = math.exp((x[n, c] - m) - log_s)
            grad_out[n, c] = (a + b * cw_sum + zc) * p - b * class_weight[c]
        # a (p_y - 1) = -a rest / s: no cancellation when p_y is close to 1.
        p_y = math.exp((x_y - m) - log_s)
        grad_out[n, yn] = -a * rest / s + (b * cw_sum + zc) * p_y - b * cw_y


@njit(inline="always")
def _ignored_row(n, out_n, want_grad, want_z, loss_out, z_out, grad_out):
    loss_out[out_n] = 0.0
    if want_z:
        z_out[out_n] = 0.0
    if want_grad:
        for c in range(grad_out.shape[1]):
            grad_out[n, c] = 0.0


@parallel_kernel()
def _xent_index_kernel(x, y, w_row, class_weight, has_ignore, ignore_index, eps, z_loss, grad_scale, want_grad,
                       want_z, loss_out, z_out, grad_out):
    """Cross entropy with class-index targets, one row per iteration, scalar math (float64 inputs)."""
    cw_sum = 0.0
    for c in range(x.shape[1]):
        cw_sum += class_weight[c]
    for n in prange(x.shape[0]):
        yn = y[n]
        if has_ignore and yn == ignore_index:
            _ignored_row(n, n, want_grad, want_z, loss_out, z_out, grad_out)
        else:
            _xent_index_row(x, n, yn, w_row[n], class_weight, cw_sum, eps, z_loss, grad_scale, want_grad, want_z,
                            loss_out, z_out, n, grad_out)


# The float32 sweeps of the fast cross entropy, one small function each: LLVM
# vectorises a loop reliably only when the function around it is simple (a
# smoothing loop beside the exp loop in one body cost 3x, measured).
# about NaN or inf.


@njit(**_SWEEP)
def _row_max_vec(row):
    m = row[0]
    for c in range(row.size):
        m = maxnum(m, row[c])
    return m


@njit(**_SWEEP)
def _row_sum_exp_except(row, m, e_out, skip):
    """sum_{c != skip} exp(row_c - m), each e_c also written to e_out: float32 blocks of SUM_BLOCK
    added into float64.

    The target's own term is left out of its block's sum by a select, so that a
    confident row (e_y = 1, every other term tiny) keeps its tiny sum: with it,
    1 + 1e-9 is 1 in float32, and the loss log1p(rest) would be lost. The blocks
    are an inner loop here, not a call each (a call per block cost 0.5-1 ns per
    element at C = 1000, measured), and e_c is always stored: callers without a
    gradient pass a spare row, as the loop without the store ran 1.3x slower.
    """
    s = 0.0
    for b0 in range(0, row.size, SUM_BLOCK):
        block_sum = F32_ZERO
        for c in range(b0, min(row.size, b0 + SUM_BLOCK)):
            e = exp_nonpositive(row[c] - m)
            e_out[c] = e
            block_sum += e if c != skip else F32_ZERO
        s += block_sum
    return s


@njit(**_SWEEP)
def _row_weighted_gap(row, class_weight, m):
    """sum_c cw_c (m - row_c): every term >= 0, float32 blocks into float64."""
    s = 0.0
    for b0 in range(0, row.size, SUM_BLOCK):
        b1 = min(row.size, b0 + SUM_BLOCK)
        block_sum = F32_ZERO
        for c in range(b0, b1):
            block_sum += class_weight[c] * (m - row[c])
        s += block_sum
    return s


@njit(**_SWEEP)
def _row_finish_grad(g, coef, b, class_weight, has_class_weight):
    """g_c <- coef * g_c - b * cw_c (b = 0 without label smoothing)."""
    if b == 0:
        for c in range(g.size):
            g[c] = coef * g[c]
    elif has_class_weight:
        for c in range(g.size):
            g[c] = coef * g[c] - b * class_weight[c]
    else:
        for c in range(g.size):
            g[c] = coef * g[c] - b


@njit(inline="always")
def _xent_f32_row(x, n, out_n, yn, w, class_weight, has_class_weight, cw_sum, eps, smooth_coef, has_ignore,
                  ignore_index, z_loss, grad_scale, want_grad, want_z, loss_out, z_out, grad_out, e_spare):
    """Row n of x (float32) -> loss_out[out_n], z_out[out_n], grad_out[n]; see _make_xent_index_kernel_f32.
    Without want_grad, the e_c go to e_spare, a row of this thread's own."""
    if has_ignore and yn == ignore_index:
        _ignored_row(n, out_n, want_grad, want_z, loss_out, z_out, grad_out)
        return
    classes = x.shape[1]
    row = x[n]
    m = _row_max_vec(row)
    if not (-np.inf < m < np.inf) or yn < 0 or yn >= classes:
        _xent_index_row(x, n, yn, w, class_weight, cw_sum, eps, z_loss, grad_scale, want_grad, want_z, loss_out,
                        z_out, out_n, grad_out)
        return
    rest = _row_sum_exp_except(row, m, grad_out[n] if want_grad else e_spare, yn)
    e_y = exp_nonpositive(row[yn] - m)
    s = rest + e_y
    if s != s:  # a NaN in the row (exp_nonpositive passes it on): the scalar path makes it NaN
        _xent_index_row(x, n, yn, w, class_weight, cw_sum, eps, z_loss, grad_scale, want_grad, want_z, loss_out,
                        z_out, out_n, grad_out)
        return
    log_s = math.log(s)
    lse = m + log_s
    # -logp_y = (m - x_y) + log s; when y holds the max, e_y = 1 and it is log1p(rest), exact for tiny losses.
    nll = math.log1p(rest) if row[yn] == m else (m - row[yn]) + log_s
    cw_y = class_weight[yn]
    # sum_c cw_c (-logp_c) = sum_c cw_c (m - x_c) + sum(cw) log s
    smooth = _row_weighted_gap(row, class_weight, m) + cw_sum * log_s if eps != 0.0 else 0.0
    loss_out[out_n], z, a, b, zc = index_row_terms(nll, smooth, lse, cw_y, eps, smooth_coef, w, z_loss, grad_scale)
    if want_z:
        z_out[out_n] = z
    if want_grad:
        _row_finish_grad(grad_out[n], np.float32((a + b * cw_sum + zc) / s), np.float32(b), class_weight,
                         has_class_weight)
        # a (p_y - 1) = -a rest / s: no cancellation when p_y is close to 1.
        grad_out[n, yn] = -a * rest / s + (b * cw_sum + zc) * (e_y / s) - b * cw_y


def _make_xent_index_kernel_f32(store: int):
    """Float32 cross entropy with class-index targets at the memory and exp limit, for rows stored
    as ``store`` (a closure constant: each storage gets its own compiled kernel).

    Per row, sweeps over data in L2 after the first: (1) the max (llvm.maxnum,
    NaN ignored), (2) e_c = exp(x_c - m) with cpu_math's vectorised exp, stored
    into the gradient row while rest = sum_{c != y} e_c accumulates (a NaN logit
    makes it NaN), (3) the gradient finished in place: grad_c = (a + b sum(cw) +
    zc) e_c / s - b cw_c, and grad_y from rest directly.  The sums have a fixed
    order, so results do not depend on the thread count.  Rows holding NaN or
    +inf, an all -inf row, or an invalid target take the scalar path of
    _xent_index_row.  16-bit rows go through the same code in chunks of
    HALF_CHUNK_ELEMENTS decoded into scratch, so their float32 values, and so
    the results, are those of a float32 call on the cast input.
    """

    def kernel(x, y, w_row, class_weight, has_class_weight, has_ignore, ignore_index, eps, z_loss, grad_scale,
               want_grad, want_z, loss_out, z_out, grad_out, scratch):
        rows, classes = x.shape
        cw_sum = 0.0
        for c in range(classes):
            cw_sum += class_weight[c]
        smooth_coef = eps / classes
        if store == STORE_F32:
            for n in prange(rows):
                e_spare = scratch[get_thread_id() % scratch.shape[0], 0, 0]  # written only without want_grad
                _xent_f32_row(x, n, n, y[n], w_row[n], class_weight, has_class_weight, cw_sum, eps, smooth_coef,
                              has_ignore, ignore_index, z_loss, grad_scale, want_grad, want_z, loss_out, z_out,
                              grad_out, e_spare)
        else:
            # scratch[k] = float32 rows (and their gradient) of slot k, one contiguous share of the rows
            # each; a row's result never depends on which slot or chunk holds it.
            slots, _, chunk, _ = scratch.shape
            share = (rows + slots - 1) // slots
            for k in prange(slots):
                xs = scratch[k, 0]
                gs = scratch[k, 1]
                for r0 in range(k * share, min(rows, (k + 1) * share), chunk):
                    nr = min(chunk, rows - r0, (k + 1) * share - r0)
                    _decode_rows(x, r0, nr, store, xs)
                    for r in range(nr):
                        _xent_f32_row(xs, r, r0 + r, y[r0 + r], w_row[r0 + r], class_weight, has_class_weight,
                                      cw_sum, eps, smooth_coef, has_ignore, ignore_index, z_loss, grad_scale,
                                      want_grad, want_z, loss_out, z_out, gs, gs[r])
                    if want_grad:
                        _encode_rows(gs, nr, store, grad_out, r0)

    kernel.__name__ = kernel.__qualname__ = f"_xent_index_kernel_f32_store{store}"
    return parallel_kernel()(kernel)


# Rows per lane block of the small-C cross entropy: 256 rows x 32 classes of float32 scratch is 32 KiB,
# in L1/L2 between the sweeps; a fixed number, so the work split never depends on the thread count.
LANE_ROWS = 256
# Class counts up to this go to the rows-as-lanes kernel (measured faster than the row loop below it).
LANES_MAX_CLASSES = 32


@njit(inline="always")
def _lanes_transpose_in(x, nr, xt):
    """xt[c, r] = x[r, c] for the first nr rows."""
    for r in range(nr):
        for c in range(x.shape[1]):
            xt[c, r] = x[r, c]


# The sweeps of the rows-as-lanes kernel, each a loop over rows touching at most three arrays:
# with more, LLVM's runtime alias checks give up and the loop stays scalar.


@njit(**_SWEEP)
def _lanes_max(xt, nr, m):
    for r in range(nr):
        m[r] = xt[0, r]
    for c in range(1, xt.shape[0]):
        for r in range(nr):
            m[r] = maxnum(m[r], xt[c, r])


@njit(**_SWEEP)
def _lanes_gap(xt, nr, cw, m, gap):
    """gap = sum_c cw_c (m - x_c), for label smoothing (before xt is overwritten by e)."""
    for r in range(nr):
        gap[r] = F32_ZERO
    for c in range(xt.shape[0]):
        cw_c = cw[c]
        for r in range(nr):
            gap[r] += cw_c * (m[r] - xt[c, r])


@njit(**_SWEEP)
def _lanes_exp(xt, nr, m, s):
    """e_c = exp(x_c - m) over xt, s = sum_c e_c."""
    for r in range(nr):
        s[r] = F32_ZERO
    for c in range(xt.shape[0]):
        for r in range(nr):
            e = exp_nonpositive(xt[c, r] - m[r])
            xt[c, r] = e
            s[r] += e


@njit(**_SWEEP)
def _lanes_rest(et, nr, yb, rest):
    """rest = sum_{c != y} e_c, summed apart from s: when y holds the max, 1 + rest would lose rest."""
    for r in range(nr):
        rest[r] = F32_ZERO
    for c in range(et.shape[0]):
        for r in range(nr):
            rest[r] += F32_ZERO if yb[r] == c else et[c, r]


# The per-row terms of index_row_terms over lanes, in float32, one output array per loop for the
# same reason. lse = m + log s; a = g (1-eps) cw_y, b = g eps / C, zc = 2 g cw_y z_loss lse, g = scale w.


@njit(**_SWEEP)
def _lanes_log(s, nr, log_s):
    for r in range(nr):
        log_s[r] = log_f32(s[r])


@njit(**_SWEEP)
def _lanes_nll(x_y, m, rest, log_s, nr, nll):
    """-logp_y: log1p(rest) when y holds the max (a confident row's tiny loss), else (m - x_y) + log s."""
    for r in range(nr):
        nll[r] = log1p_f32(rest[r]) if x_y[r] == m[r] else (m[r] - x_y[r]) + log_s[r]


@njit(**_SWEEP)
def _lanes_loss(nll, log_s, gap, m, cw_y, w, nr, eps, smooth_coef, cw_sum, z_loss, loss, z):
    one = np.float32(1.0)
    for r in range(nr):
        smooth = smooth_coef * (gap[r] + cw_sum * log_s[r]) if eps != F32_ZERO else F32_ZERO
        lse = m[r] + log_s[r]
        zr = w[r] * cw_y[r] * z_loss * lse * lse
        z[r] = zr
        loss[r] = w[r] * ((one - eps) * cw_y[r] * nll[r] + smooth) + zr


@njit(**_SWEEP)
def _lanes_grad_coef(s, m, log_s, cw_y, w, nr, eps, smooth_coef, cw_sum, z_loss, grad_scale, coef):
    """(a + b sum(cw) + zc) / s: the factor of e_c in every gradient entry."""
    one = np.float32(1.0)
    for r in range(nr):
        g = grad_scale * w[r]
        zc = g * cw_y[r] * np.float32(2.0) * z_loss * (m[r] + log_s[r])
        coef[r] = (g * (one - eps) * cw_y[r] + g * smooth_coef * cw_sum + zc) / s[r]


@njit(**_SWEEP)
def _lanes_grad_y(rest, s, x_y, m, log_s, cw_y, w, nr, eps, smooth_coef, cw_sum, z_loss, grad_scale, grad_y):
    """The target's entry: a (p_y - 1) = -a rest / s, no cancellation when p_y is close to 1."""
    one = np.float32(1.0)
    for r in range(nr):
        g = grad_scale * w[r]
        b = g * smooth_coef
        zc = g * cw_y[r] * np.float32(2.0) * z_loss * (m[r] + log_s[r])
        p_y = exp_nonpositive(x_y[r] - m[r]) / s[r]
        # b (sum(cw) p_y - cw_y) as one factor: exactly 0 for C = 1 (p_y = 1), whatever FMA contraction does.
        grad_y[r] = -(g * (one - eps) * cw_y[r]) * rest[r] / s[r] + zc * p_y + b * (cw_sum * p_y - cw_y[r])


def _make_xent_index_kernel_lanes(store: int):
    """Float32 cross entropy with class-index targets for C <= LANES_MAX_CLASSES: rows as SIMD lanes.

    A row of a few classes is too short for a vector loop, so blocks of LANE_ROWS rows are transposed
    into scratch and every sweep (max, exp and sums, the per-row loss terms, the gradient) runs over
    rows. The sums are float32 over at most 32 terms each <= 1 (about 2e-7 relative), the row terms
    those of index_row_terms in float32 with cpu_math's log; -logp_y is log1p(rest) when y holds the
    max, as everywhere. Rows that are ignored, have a target outside [0, C), a NaN or +inf logit,
    or no finite logit are redone by the scalar row code afterwards (the vector pass writes
    something for them first, which that overwrites). 16-bit rows (``store``, as in
    _make_xent_index_kernel_f32) are decoded block by block into float32 scratch, and their
    gradient encoded back.
    """

    def kernel(x, y, w_row, class_weight, has_ignore, ignore_index, eps, z_loss, grad_scale, want_grad, want_z,
               loss_out, z_out, grad_out, slots):
        rows, classes = x.shape
        cw_sum = F32_ZERO
        for c in range(classes):
            cw_sum += class_weight[c]
        smooth_coef = eps / np.float32(classes)
        # Blocks of LANE_ROWS rows in a fixed place whatever the thread count; each of `slots` workers
        # takes a contiguous share of them with its own scratch, allocated once: allocating it per
        # block inside prange made the parallel kernel 4x slower than the serial one (allocator
        # contention between the threads).
        blocks = (rows + LANE_ROWS - 1) // LANE_ROWS
        share = (blocks + slots - 1) // slots
        for k in prange(slots):
            xt = np.empty((classes, LANE_ROWS), np.float32)
            m = np.empty(LANE_ROWS, np.float32)
            s = np.empty(LANE_ROWS, np.float32)
            rest = np.empty(LANE_ROWS, np.float32)
            x_y = np.empty(LANE_ROWS, np.float32)
            gap = np.empty(LANE_ROWS, np.float32)
            coef = np.empty(LANE_ROWS, np.float32)
            grad_y = np.empty(LANE_ROWS, np.float32)
            cw_y = np.empty(LANE_ROWS, np.float32)
            w_b = np.empty(LANE_ROWS, np.float32)
            log_s = np.empty(LANE_ROWS, np.float32)
            nll = np.empty(LANE_ROWS, np.float32)
            loss_b = np.empty(LANE_ROWS, np.float32)
            z_b = np.empty(LANE_ROWS, np.float32)
            yb = np.empty(LANE_ROWS, np.int64)
            x_half = np.empty((LANE_ROWS if store != STORE_F32 else 0, classes), np.float32)
            g_half = np.empty((LANE_ROWS if store != STORE_F32 else 0, classes), np.float32)
            for blk in range(k * share, min(blocks, (k + 1) * share)):
                r0 = blk * LANE_ROWS
                nr = min(LANE_ROWS, rows - r0)
                # xf, gf: this block's rows of logits and gradient as float32 (the arrays themselves, or
                # scratch for 16-bit storage)
                if store == STORE_F32:
                    xf = x[r0:r0 + nr]
                    gf = grad_out[r0:r0 + nr] if want_grad else grad_out
                else:
                    xf = x_half[:nr]
                    gf = g_half[:nr if want_grad else 1]
                    _decode_rows(x, r0, nr, store, xf)
                for r in range(nr):
                    yr = y[r0 + r]
                    yb[r] = yr
                    yc = min(max(yr, 0), classes - 1)  # clamped: an invalid row is redone below
                    x_y[r] = xf[r, yc]
                    cw_y[r] = class_weight[yc]
                    w_b[r] = w_row[r0 + r]
                _lanes_transpose_in(xf, nr, xt)
                _lanes_max(xt, nr, m)
                if eps != F32_ZERO:
                    _lanes_gap(xt, nr, class_weight, m, gap)
                _lanes_exp(xt, nr, m, s)
                _lanes_rest(xt, nr, yb, rest)
                _lanes_log(s, nr, log_s)
                _lanes_nll(x_y, m, rest, log_s, nr, nll)
                _lanes_loss(nll, log_s, gap, m, cw_y, w_b, nr, eps, smooth_coef, cw_sum, z_loss, loss_b, z_b)
                for r in range(nr):
                    loss_out[r0 + r] = loss_b[r]
                if want_z:
                    for r in range(nr):
                        z_out[r0 + r] = z_b[r]
                if want_grad:
                    _lanes_grad_coef(s, m, log_s, cw_y, w_b, nr, eps, smooth_coef, cw_sum, z_loss, grad_scale, coef)
                    _lanes_grad_y(rest, s, x_y, m, log_s, cw_y, w_b, nr, eps, smooth_coef, cw_sum, z_loss, grad_scale,
                                  grad_y)
                    # b = grad_scale * w_r * eps / C depends on the row only through w_r: a row-wise weight is
                    # folded into coef for the p-term, and the -b cw_c term below takes w from each row.
                    for r in range(nr):
                        b = grad_scale * w_b[r] * smooth_coef
                        cr = coef[r]
                        for c in range(classes):
                            gf[r, c] = cr * xt[c, r] - b * class_weight[c]
                    for r in range(nr):
                        yr = yb[r]
                        if 0 <= yr < classes:
                            gf[r, yr] = grad_y[r]
                for r in range(nr):  # the rows the lanes cannot take, by the scalar code
                    yr = yb[r]
                    if has_ignore and yr == ignore_index:
                        _ignored_row(r, r0 + r, want_grad, want_z, loss_out, z_out, gf)
                    elif not (-np.inf < m[r] < np.inf) or s[r] != s[r] or yr < 0 or yr >= classes:
                        _xent_index_row(xf, r, yr, w_b[r], class_weight, np.float64(cw_sum), eps, z_loss, grad_scale,
                                        want_grad, want_z, loss_out, z_out, r0 + r, gf)
                if store != STORE_F32 and want_grad:
                    _encode_rows(gf, nr, store, grad_out, r0)

    kernel.__name__ = kernel.__qualname__ = f"_xent_index_kernel_lanes_store{store}"
    return parallel_kernel(fastmath=_VEC)(kernel)


@parallel_kernel()
def _xent_prob_kernel(x, t, w_row, class_weight, eps, z_loss, grad_scale, want_grad, want_z, loss_out, z_out,
                      grad_out):
    """Cross entropy with probability targets t' = (1-eps) t + eps/C:
    l = -sum_c cw_c t'_c logp_c + z_loss lse^2,   dl/dx_j = p_j (sum_c cw_c t'_c + 2 z_loss lse) - cw_j t'_j."""
    rows, classes = x.shape
    uniform = eps / classes
    for n in prange(rows):
        m, log_s = _row_max_and_log_sum_exp(x, n, classes)
        lse = m + log_s
        loss = 0.0
        mass = 0.0
        for c in range(classes):
            wt = class_weight[c] * ((1.0 - eps) * t[n, c] + uniform)
            loss += wt * ((m - x[n, c]) + log_s)
            mass += wt
        z = w_row[n] * z_loss * lse * lse if z_loss != 0.0 else 0.0
        loss_out[n] = w_row[n] * loss + z
        if want_z:
            z_out[n] = z
        if want_grad:
            g = grad_scale * w_row[n]
            coef = mass + 2.0 * z_loss * lse
            for c in range(classes):
                wt = class_weight[c] * ((1.0 - eps) * t[n, c] + uniform)
                p = math.exp((x[n, c] - m) - log_s)
                grad_out[n, c] = g * (p * coef - wt)


@parallel_kernel()
def _cosine_kernel(p, t, w_row, grad_scale, want_grad, loss_out, grad_out):
    """l = 1 - sum_k p_k t_k per row (TF cosine_distance); dl/dp_k = -t_k."""
    rows, length = p.shape
    for n in prange(rows):
        dot = 0.0
        for k in range(length):
            dot += p[n, k] * t[n, k]
        loss_out[n] = w_row[n] * (1.0 - dot)
        if want_grad:
            g = -grad_scale * w_row[n]
            for k in range(length):
                grad_out[n, k] = g * t[n, k]


# (loss name, fast) -> kernel; fast variants only where they differ.
_XENT_F32 = {store: _make_xent_index_kernel_f32(store) for store in (STORE_F32, STORE_F16, STORE_BF16)}
_XENT_LANES = {store: _make_xent_index_kernel_lanes(store) for store in (STORE_F32, STORE_F16, STORE_BF16)}
_HALF_STORE = {"float16": STORE_F16, "bfloat16": STORE_BF16}
@functools.cache
def _elementwise_kernel(name: str, fast: bool, x_store: int, t_store: int):
    """The kernel of one (loss, fast, storages) case, made on first use."""
    return _make_elementwise_kernel(name, ELEMENTWISE_KIND[name], fast, x_store, t_store)


@njit(cache=True, error_model="numpy")
def _index_weight_total(y, w_row, class_weight, has_ignore, ignore_index, count_nonzero):
    """Sum (or count of the non-zeros) of w[n] = weight[n] * cw[y[n]], weight[n] alone for a target
    outside [0, C), 0 where ignored: host.index_target_weights reduced in one pass."""
    classes = class_weight.shape[0]
    total = 0.0
    for n in range(y.size):
        yn = y[n]
        if has_ignore and yn == ignore_index:
            continue
        w = w_row[n] * class_weight[yn] if 0 <= yn < classes else w_row[n]
        total += (1.0 if w != 0 else 0.0) if count_nonzero else np.float64(w)
    return total


def _index_target_denominator(reduce, y, w_row, class_weight, has_ignore: bool, ignore_index: int):
    """host.denominator with per-measurement weights of class-index targets, without building them
    (NumPy's seven passes cost 0.5 ms at 65536 rows, half the kernel's time at C = 10)."""
    mode, number = host.denominator_rule(reduce)
    if mode == host.DENOM_CONSTANT:
        return np.float64(number)
    total = _index_weight_total(y, w_row, class_weight, has_ignore, ignore_index, mode == host.DENOM_NONZERO)
    return np.float64(total) * number


def _kernel_array(a):
    """A small auxiliary array (weights) as a writable C-contiguous one, copied only when it is not:
    Numba compiles a kernel again for every layout and read-only flag of an argument, and a
    broadcast or read-only weight vector would cost one more compile of each kernel it reaches."""
    return np.require(a, requirements=("C", "W"))


def _scalar(value, dtype):
    return np.dtype(dtype).type(value)


def _flat_operand(a, dt):
    """(flat C-contiguous data, STORE_*) of an element-wise operand: 16-bit data as its bits when the
    kernels compute in float32 (decoded per chunk, no float32 copy), anything else in the compute dtype."""
    store = _HALF_STORE.get(a.dtype.name, STORE_F32) if dt.compute == np.float32 else STORE_F32
    if store != STORE_F32:
        return np.ascontiguousarray(a).reshape(-1).view(np.uint16), store
    return host.astype(a.reshape(-1), dt.compute), STORE_F32


def thread_slots(items: int) -> int:
    """How many workers (each with its own scratch) share ``items`` units of work: one per Numba
    thread, no more than there are units, at least one."""
    return max(1, min(get_num_threads(), items))


def _xent_scratch(store: int, rows: int, classes: int, want_grad: bool):
    """Float32 scratch of _make_xent_index_kernel_f32, one slot per thread: for 16-bit rows, room
    for a chunk of rows and of their gradient; for float32 rows, one spare row for the e_c when no
    gradient is wanted (a placeholder otherwise)."""
    slots = thread_slots(rows)
    if store == STORE_F32:
        return np.empty((1, 1, 1, 1) if want_grad else (slots, 1, 1, max(classes, 1)), np.float32)
    # At least 2 rows, even for one row of input: with room for a single row the same loops ran 2.2x
    # slower (measured at C = 5000, 32000 and 128256; the cause is in the generated code, not found).
    chunk = max(2, HALF_CHUNK_ELEMENTS // max(classes, 1))
    return np.empty((slots, 2, chunk, classes), np.float32)


class CpuBackend:
    """NumPy arrays in and out; the work runs in the Numba kernels above."""

    name = "cpu"
    xp = np

    def cross_entropy(self, plan: CrossEntropyPlan, logits, target, w_values, class_weight):
        dt = plan.dtypes
        # 16-bit logits with class-index targets are read as stored (their bits) and the gradient
        # written in their dtype: no float32 copy of either (docs/design.md §9.4).
        store = _HALF_STORE.get(dt.input.name, STORE_F32) if plan.index_target and not plan.softcap else STORE_F32
        if store != STORE_F32:
            x = host.rows_last(logits, plan.outer, plan.classes, plan.inner, dt.input).view(np.uint16)
        else:
            x = host.rows_last(logits, plan.outer, plan.classes, plan.inner, dt.compute)
        if plan.softcap:  # Gemma 2: the kernels see s * tanh(x / s); a new array, the input is untouched
            x = (plan.softcap * np.tanh(x / dt.compute.type(plan.softcap))).astype(dt.compute, copy=False)
        rows = plan.rows
        w_row = _kernel_array(host.per_row(w_values, plan.reduce.weight_block, rows))
        cw = _kernel_array(class_weight) if class_weight is not None else np.ones(plan.classes, dt.compute)
        loss_rows = np.empty(rows, dt.compute)
        z_rows = np.empty(rows if plan.return_z_loss else 1, dt.compute)
        # Without a gradient, one row stands in for it (the kernels never write it then).
        grad = np.empty((rows, plan.classes) if plan.return_grad else (1, plan.classes),
                        dt.compute if store == STORE_F32 else np.uint16)
        eps, z_loss = _scalar(plan.label_smoothing, dt.compute), _scalar(plan.z_loss, dt.compute)
        has_ignore = plan.ignore_index is not None
        ignore_index = plan.ignore_index if has_ignore else 0
        if plan.index_target:
            y = host.class_indices(target)
            denom = _index_target_denominator(plan.reduce, y, w_row, cw, has_ignore, ignore_index)
            grad_scale = _scalar(float(host.inverse(denom)), dt.compute)
            if dt.compute == np.float32 and plan.classes <= LANES_MAX_CLASSES:
                _XENT_LANES[store](x.size, x, y, w_row, cw, has_ignore, ignore_index, eps, z_loss, grad_scale,
                                   plan.return_grad, plan.return_z_loss, loss_rows, z_rows, grad,
                                   thread_slots(-(-rows // LANE_ROWS)))
            elif dt.compute == np.float32:
                _XENT_F32[store](x.size, x, y, w_row, cw, plan.has_class_weight, has_ignore, ignore_index, eps,
                                 z_loss, grad_scale, plan.return_grad, plan.return_z_loss, loss_rows, z_rows, grad,
                                 _xent_scratch(store, rows, plan.classes, plan.return_grad))
            else:
                _xent_index_kernel(x.size, x, y, w_row, cw, has_ignore, ignore_index, eps, z_loss, grad_scale,
                                   plan.return_grad, plan.return_z_loss, loss_rows, z_rows, grad)
        else:
            t = host.rows_last(target, plan.outer, plan.classes, plan.inner, dt.compute)
            denom = host.denominator(plan.reduce, w_values=w_values)
            grad_scale = _scalar(float(host.inverse(denom)), dt.compute)
            _xent_prob_kernel(x.size, x, t, w_row, cw, eps, z_loss, grad_scale, plan.return_grad, plan.return_z_loss,
                              loss_rows, z_rows, grad)
        loss = host.finish_rows(plan.reduce, loss_rows, denom, dt)
        z_term = host.finish_rows(plan.reduce, z_rows, denom, dt) if plan.return_z_loss else None
        if not plan.return_grad:
            return loss, z_term, None
        if plan.softcap:  # chain rule through s * tanh(x / s): times 1 - tanh^2 = 1 - (x' / s)^2
            grad *= 1 - np.square(x / dt.compute.type(plan.softcap))
        if store != STORE_F32:
            grad = grad.view(dt.input)
        return loss, z_term, host.rows_back(grad, logits.shape, plan.outer, plan.classes, plan.inner, dt.input)

    def elementwise(self, plan: ElementwisePlan, pred, target, w_values, pos_weight):
        dt = plan.dtypes
        x, x_store = _flat_operand(pred, dt)
        t, t_store = _flat_operand(target, dt)
        pw = np.ones(1, dt.compute) if pos_weight is None else _kernel_array(pos_weight)
        return self._run_elementwise(plan.loss, plan.reduce, dt, x, x_store, t, t_store, w_values, pw,
                                     plan.pos_weight_period, plan.param, plan.return_grad, pred.shape)

    def weighted_reduce(self, plan: WeightedReducePlan, values, w_values):
        dt = plan.dtypes
        x, x_store = _flat_operand(values, dt)
        loss, _ = self._run_elementwise("identity", plan.reduce, dt, x, x_store, x, x_store, w_values,
                                        np.ones(1, dt.compute), 0, 0.0, False, values.shape)
        return loss

    def _run_elementwise(self, kind, reduce, dt, x, x_store, t, t_store, w_values, pw, pw_period, param,
                         return_grad, shape):
        size = x.size
        want_loss = reduce.reduction == "none"
        denom = host.denominator(reduce, w_values=w_values)
        scale = float(host.inverse(denom))
        loss_out = np.empty(size if want_loss else 0, dt.compute)
        grad = np.empty(size if return_grad else 0, dt.compute if x_store == STORE_F32 else np.uint16)
        partials = np.empty(math.ceil(size / CHUNK), np.float64)
        fast = dt.compute == np.float32 and ELEMENTWISE_KIND[kind] in _FAST_KINDS
        _elementwise_kernel(kind, fast, x_store, t_store)(
            size, x, t, _kernel_array(w_values), reduce.weight_block, pw, pw_period, _scalar(param, dt.compute),
            _scalar(scale, dt.compute), want_loss, return_grad, loss_out, grad, partials)
        if want_loss:
            loss = loss_out.reshape(reduce.loss_shape).astype(dt.loss, copy=False)
        else:
            loss = host.reduced(np.sum(partials), denom, dt)
        if not return_grad:
            return loss, None
        if x_store != STORE_F32:
            return loss, grad.view(dt.input).reshape(shape)
        return loss, host.astype(grad.reshape(shape), dt.input)

    def cosine_distance(self, plan: CosinePlan, pred, target, w_values):
        dt = plan.dtypes
        p = host.rows_last(pred, plan.outer, plan.length, plan.inner, dt.compute)
        t = host.rows_last(target, plan.outer, plan.length, plan.inner, dt.compute)
        w_row = _kernel_array(host.per_row(w_values, plan.reduce.weight_block, plan.rows))
        denom = host.denominator(plan.reduce, w_values=w_values)
        scale = float(host.inverse(denom))
        loss_rows = np.empty(plan.rows, dt.compute)
        grad = np.empty(p.shape if plan.return_grad else (0, 0), dt.compute)
        _cosine_kernel(p.size, p, t, w_row, _scalar(scale, dt.compute), plan.return_grad, loss_rows, grad)
        loss = host.finish_rows(plan.reduce, loss_rows, denom, dt)
        if not plan.return_grad:
            return loss, None
        return loss, host.rows_back(grad, pred.shape, plan.outer, plan.length, plan.inner, dt.input)


BACKEND = CpuBackend()
