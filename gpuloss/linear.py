"""Fused linear + softmax cross entropy: ``loss(x @ W.T + b, y)`` without the [N, V] logits.

The idea is the chunked ("fused linear cross entropy") head of LLM training:
Wijmans et al. 2024, *Cut Your Losses in Large-Vocabulary Language Models*
(Cut Cross-Entropy, arXiv:2411.09009) and Liger-Kernel's
``fused_linear_cross_entropy`` (Hsu et al. 2024, arXiv:2410.10989).  This file
is our own rendering with row chunks only:

1. Check the arguments and compute the reduction's denominator from the
   targets and weights alone (``backends/host.py``, as every loss does), so no
   chunk needs a second pass and, on a GPU, nothing waits for the device.
2. For each chunk of rows, in order: ``logits = x_c @ W.T (+ b)`` into one
   reusable buffer (NumPy's BLAS / cuBLAS through CuPy); the library's own
   fused :func:`gpuloss.softmax_cross_entropy` with ``reduction="none"`` gives
   the chunk's per-row losses and the gradient of their sum; then
   ``d_input[c] = g @ W``, ``d_W += g.T @ x_c`` (a BLAS GEMM that accumulates
   in place, ``beta = 1``) and ``d_b += g.sum(0)``.
3. Sum the per-row losses (float64, one fixed pairwise order) and scale loss
   and gradients by ``1 / denominator`` (0 when the denominator is 0).

Chunks always run in the same order with the same sizes, so results are
bitwise identical run to run.  Vocabulary blocks (an online log-sum-exp
across V) are not implemented: a ``chunk_bytes`` too small for one whole row
of V logits is an error that names the minimum.
"""
from __future__ import annotations

import math
import numbers
from collections import namedtuple

import numpy as np

from . import _validate as v
from ._plan import DtypePlan, ReducePlan
from ._validate import Reduction
from .backends import host
from .losses import _aux_array, _check_flag, softmax_cross_entropy

__all__ = ["linear_cross_entropy", "LinearGrads", "DEFAULT_CHUNK_BYTES", "min_chunk_bytes"]

# The default budget of the per-chunk working set: the chunk's logits and their gradient
# (2 x rows x V x 4 bytes in float32) and its d_input product, plus for 16-bit inputs the
# chunk's upcast rows.  128 MiB is 524 rows of a 32000-word vocabulary, 130 rows of 128256.
# Measured on a 2-core EPYC with NumPy's OpenBLAS, against torch's unfused F.linear_cross_entropy
# (bench/results/2026-11-29-linear-cpu-*): GEMMs over fewer rows run below the machine's peak
# (64 MiB: 1.4-1.5x torch's time in one run; 128 MiB: 1.0x in the interleaved run), while
# the working set stays about 1/10 of the unfused path's at [4096, 1024, 32000].
DEFAULT_CHUNK_BYTES = 128 << 20

LinearGrads = namedtuple("LinearGrads", ["input", "linear_weight", "linear_bias"])
LinearGrads.__doc__ = """Gradients of the returned loss (of its sum for reduction="none"):
d/d input (shape and dtype of input), d/d linear_weight, d/d linear_bias (None without a bias)."""


def min_chunk_bytes(vocab: int, hidden: int, dtype) -> int:
    """Bytes of the working set for one row: the smallest ``chunk_bytes`` that works."""
    dt = DtypePlan.for_input(dtype)
    per_row = (2 * vocab + hidden) * dt.compute.itemsize  # the row's logits, their gradient, its d_input
    if dt.is_16bit:
        per_row += hidden * dt.compute.itemsize  # the row upcast to float32
    return per_row


def _rows_per_chunk(chunk_bytes, vocab: int, hidden: int, dtype) -> int:
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, numbers.Integral):
        raise TypeError(f"chunk_bytes must be an int (bytes) or None; got {type(chunk_bytes).__name__}")
    need = min_chunk_bytes(vocab, hidden, dtype)
    if chunk_bytes < need:
        raise ValueError(f"chunk_bytes={int(chunk_bytes)} is too small for one row of V={vocab} logits: a row "
                         f"needs {need} bytes (its logits, their gradient and its d_input in "
                         f"{DtypePlan.for_input(dtype).compute}); pass chunk_bytes >= {need} "
                         f"(vocabulary blocks are not implemented)")
    return int(chunk_bytes) // need


def _shape_error(name: str, expected: str, got) -> ValueError:
    return ValueError(f"{name} must have shape {expected}; got {tuple(got.shape)}")


def _check_shapes(x, W, b, target):
    """(lead shape, N, H, V, index_target) after the shape checks of docs/api.md §4 (names and shapes in every message)."""
    if x.ndim == 0:
        raise ValueError("input must have a feature axis: shape [H] or [..., H]; got a 0-d array")
    H = x.shape[-1]
    if W.ndim != 2 or W.shape[1] != H:
        raise _shape_error("linear_weight", f"(V, H) with H = input.shape[-1] = {H} (input has shape "
                           f"{tuple(x.shape)})", W)
    V = W.shape[0]
    if V == 0:
        raise ValueError(f"linear_weight must have at least one row (class); got shape {tuple(W.shape)}")
    if b is not None and tuple(b.shape) != (V,):
        raise _shape_error("linear_bias", f"(V,) = ({V},) with V = linear_weight.shape[0]", b)
    for name, a in (("linear_weight", W), ("linear_bias", b)):
        if a is not None and a.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of input ({x.dtype}); got {a.dtype}")
    lead = tuple(x.shape[:-1])
    kind = np.dtype(target.dtype).kind
    if kind in "iu":
        if tuple(target.shape) != lead:
            raise ValueError(f"target (class indices) must have the shape of input without its last axis, "
                             f"{lead} (input has shape {tuple(x.shape)}); got {tuple(target.shape)}")
        index_target = True
    elif v.is_float_dtype(target.dtype):
        if tuple(target.shape) != lead + (V,):
            raise ValueError(f"target (probabilities) must have shape input.shape[:-1] + (V,) = {lead + (V,)} "
                             f"(input {tuple(x.shape)}, linear_weight {tuple(W.shape)}); got {tuple(target.shape)}")
        index_target = False
    else:
        raise TypeError(f"target must be integer class indices or floating probabilities; got {target.dtype}")
    return lead, math.prod(lead), H, V, index_target


class _WeightGradAccumulator:
    """``acc += g.T @ x_c`` for each chunk in order, ``acc`` the [V, H] weight gradient.

    On NumPy arrays a BLAS GEMM with beta = 1 adds into ``acc`` in place (SciPy's
    wrapper, present through scikit-learn); without SciPy, ``scratch`` (the chunk's
    logits buffer, free by then) holds blocks of the product.  On CuPy, cuBLAS GEMM
    with beta = 1.  Same chunks in the same order: the same bits every run.
    """

    def __init__(self, acc, xp):
        self.acc, self.xp, self.first = acc, xp, True
        self._gemm = None
        if xp is np:
            try:
                from scipy.linalg.blas import get_blas_funcs

                self._gemm = get_blas_funcs("gemm", dtype=acc.dtype)
            except ImportError:
                pass
        else:
            try:
                from cupy import cublas

                self._gemm = cublas.gemm
            except ImportError:
                pass

    def add(self, g, xc, scratch):
        acc, first = self.acc, self.first
        self.first = False
        if self.xp is not np:
            if self._gemm is not None:
                # out = op(a) @ op(b) + beta * out with op(a) = g.T [V, r], op(b) = x_c [r, H].
                self._gemm("T", "N", g, xc, out=acc, alpha=1.0, beta=0.0 if first else 1.0)
            elif first:
                self.xp.matmul(g.T, xc, out=acc)
            else:
                acc += g.T @ xc
            return
        if first:
            np.matmul(g.T, xc, out=acc)
            return
        if self._gemm is not None:
            # Fortran view: acc.T [H, V] += x_c.T [H, r] @ g [r, V]; g is passed as g.T (F-order [V, r]).
            out = self._gemm(1.0, xc.T, g.T, beta=1.0, c=acc.T, trans_b=True, overwrite_c=True)
            if np.shares_memory(out, acc):
                return
            acc.T[...] = out  # the wrapper copied (should not happen with contiguous arrays): still correct
            return
        # No SciPy: blocks of rows of acc through the free logits buffer.
        V, H = acc.shape
        block = max(1, min(V, scratch.size // max(H, 1)))
        flat = scratch.reshape(-1)
        for j in range(0, V, block):
            k = min(j + block, V)
            tmp = flat[:(k - j) * H].reshape(k - j, H)
            np.matmul(g[:, j:k].T, xc, out=tmp)
            acc[j:k] += tmp


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, class_weight=None,
                         ignore_index: int | None = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                         z_loss: float = 0.0, softcap: float | None = None, return_z_loss: bool = False,
                         return_grad: bool = False, validate: bool = True, chunk_bytes: int | None = None,
                         backend: str | None = None):
    """``softmax_cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` in row chunks.

    ``input`` is ``[H]`` or ``[..., H]``, ``linear_weight`` ``[V, H]``, ``linear_bias``
    ``[V]`` (all one floating dtype), ``target`` class indices of shape ``input.shape[:-1]``
    or probabilities of shape ``input.shape[:-1] + (V,)``.  Every other option means what
    it means for :func:`gpuloss.softmax_cross_entropy` with the class axis last (per-sample
    ``weight``, ``class_weight``, ``ignore_index``, ``label_smoothing``, the six reductions,
    ``z_loss``, ``softcap``, ``return_z_loss``, ``validate``, ``backend``).

    ``chunk_bytes`` (default :data:`DEFAULT_CHUNK_BYTES`, 128 MiB) bounds the per-chunk
    working set: a chunk's logits and their gradient in the compute dtype (float32 for
    16-bit inputs, whose chunk rows are upcast too).  Outside it: the outputs, and for
    16-bit inputs float32 copies of ``linear_weight`` and of its gradient.  A budget below
    one row (:func:`min_chunk_bytes`) is a ValueError.

    Returns ``loss``; ``(loss, z_term)`` with ``return_z_loss``; and with ``return_grad``
    the :class:`LinearGrads` ``(input, linear_weight, linear_bias)`` appended:
    ``(loss, grads)`` or ``(loss, z_term, grads)``.  The loss is float32 (float64 for
    float64 inputs); gradients have the dtypes of their arguments.

    Example
    -------
    >>> import numpy as np, gpuloss as gl
    >>> x, W = np.ones((2, 3), np.float32), np.eye(4, 3, dtype=np.float32)
    >>> loss, g = gl.linear_cross_entropy(x, W, np.array([0, 3]), return_grad=True)
    >>> g.linear_weight.shape, round(float(loss), 4)
    ((4, 3), 1.7143)
    """
    x, W, b, target, weight, class_weight = (
        v.as_input(k, a) for k, a in (("input", input), ("linear_weight", linear_weight), ("linear_bias", linear_bias),
                                      ("target", target), ("weight", weight), ("class_weight", class_weight)))
    v.check_floating("input", x)
    v.check_floating("linear_weight", W)
    if b is not None:
        v.check_floating("linear_bias", b)
    v.check_array("target", target)
    be = v.array_module({k: a for k, a in dict(input=x, linear_weight=W, linear_bias=b, target=target,
                                               weight=weight, class_weight=class_weight).items() if v.is_array(a)},
                        backend)
    xp = be.xp
    lead, N, H, V, index_target = _check_shapes(x, W, b, target)
    dt = DtypePlan.for_input(x.dtype)
    cdt = dt.compute
    # The cross entropy's own checks, up front, so bad input is refused before any matmul.
    ignore = v.check_ignore_index(ignore_index)
    v.check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    red = v.check_reduction(reduction)
    return_grad = _check_flag("return_grad", return_grad)
    validate = _check_flag("validate", validate)
    return_z_loss = _check_flag("return_z_loss", return_z_loss)
    rows_per_chunk = _rows_per_chunk(chunk_bytes, V, H, x.dtype)
    w_values, w_block = v.weight_layout("weight", weight, lead, xp, cdt)
    cw = _aux_array("class_weight", class_weight, xp, cdt, (V,))
    # z_loss / softcap / return_z_loss go to the cross entropy only when set: a build of
    # softmax_cross_entropy without them still runs every other option.
    extra = {}
    if not (isinstance(z_loss, numbers.Real) and not isinstance(z_loss, bool) and z_loss == 0.0):
        extra["z_loss"] = z_loss
    if softcap is not None:
        extra["softcap"] = softcap
    if return_z_loss:
        extra["return_z_loss"] = True

    # The denominator from targets and weights alone, as the unfused path computes it.
    reduce = ReducePlan(red, lead, w_block)
    w_row = host.per_row(w_values, w_block, N)
    if index_target:
        if validate:
            v.check_class_targets(target, V, ignore)
        y = host.class_indices(target)
        cw_full = cw if cw is not None else xp.ones(V, cdt)
        denom = host.denominator(reduce, w_meas=host.index_target_weights(y, w_row, cw_full, ignore))
        t_rows = y
    else:
        denom = host.denominator(reduce, w_values=w_values)
        t_rows = target.reshape(N, V)
    # Gradients are scaled by 1/denominator (0 for an empty mean) once, after the chunks; none/sum divide by 1.
    scale = None if red in (Reduction.NONE, Reduction.SUM) else host.inverse(denom).astype(cdt)

    x2 = xp.ascontiguousarray(x.reshape(N, H))
    Wc = xp.ascontiguousarray(W).astype(cdt, copy=False)  # 16-bit: one float32 copy, not one per chunk
    bc = None if b is None else b.astype(cdt, copy=False)
    rows = max(1, min(rows_per_chunk, N))
    logits_buf = xp.empty((rows, V), cdt)
    loss_rows = xp.empty(N, cdt)
    z_rows = xp.empty(N, cdt) if return_z_loss else None
    if return_grad:
        d_x = xp.empty((N, H), x.dtype)
        d_W = xp.empty((V, H), cdt)
        d_b = xp.zeros(V, cdt) if b is not None else None
        acc = _WeightGradAccumulator(d_W, xp)
    for s in range(0, max(N, 1), rows):  # N = 0 still makes one (empty) call: its checks and dtypes
        e = min(s + rows, N)
        xc = x2[s:e].astype(cdt, copy=False)
        lg = logits_buf[:e - s]
        xp.matmul(xc, Wc.T, out=lg)
        if bc is not None:
            lg += bc
        out = softmax_cross_entropy(lg, t_rows[s:e], weight=w_row[s:e], class_weight=cw, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, reduction="none", return_grad=return_grad,
                                    validate=False, backend=be.name, **extra)
        if not isinstance(out, tuple):
            out = (out,)
        loss_rows[s:e] = out[0]
        if return_z_loss:
            z_rows[s:e] = out[1]
        if not return_grad:
            continue
        g = out[-1]  # d(sum of the chunk's per-row losses)/d logits, [rows, V] in the compute dtype
        if xp is np:
            # (W.T @ g.T).T: OpenBLAS runs this orientation about twice as fast as g @ W when the
            # chunk has few rows (measured at 256 x 32000 x 1024); the [H, rows] product is small.
            dxc = np.matmul(Wc.T, g.T).T
        else:
            dxc = g @ Wc
        if x.dtype == cdt:
            d_x[s:e] = dxc
        else:
            if scale is not None:
                dxc *= scale  # before rounding to 16 bits
            d_x[s:e] = dxc.astype(x.dtype)
        acc.add(g, xc, logits_buf)
        if d_b is not None:
            d_b += g.sum(axis=0)
        del g, out

    # One float64 pairwise sum of the per-row values, as the unfused path does.
    result = [host.finish_rows(reduce, loss_rows, denom, dt)]
    if return_z_loss:
        result.append(host.finish_rows(reduce, z_rows, denom, dt))
    if return_grad:
        if scale is not None:
            if x.dtype == cdt:
                d_x *= scale
            d_W *= scale
            if d_b is not None:
                d_b *= scale
        result.append(LinearGrads(d_x.reshape(x.shape), d_W.astype(W.dtype, copy=False),
                                  None if d_b is None else d_b.astype(b.dtype, copy=False)))
    return result[0] if len(result) == 1 else tuple(result)

