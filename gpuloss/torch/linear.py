"""``gpuloss.torch.linear_cross_entropy``: torch 2.13's ``F.linear_cross_entropy`` on gpuloss's fused path.

``loss = cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` computed by
:func:`gpuloss.linear_cross_entropy` in row chunks, so the ``[N, C]`` logits never exist
(docs/api.md §2.5). The forward returns the loss and keeps the gradients of ``input``,
``linear_weight`` and ``linear_bias`` from the same pass; backward scales them by
``grad_output``. For ``reduction="none"`` with a ``grad_output`` other than all ones, the
weight gradient cannot be rescaled per row after the fact: backward then runs the fused
pass once more with ``grad_output`` as per-row weights (exact, one more pass).

torch's semantics: ``weight`` is per class, ``ignore_index=None`` means -100 for class
indices, a mean with nothing to average is NaN. ``options`` (LinearCrossEntropyOptions) is
accepted; its ``batch_chunk_size`` sets the rows per chunk. Calls the fused path does not take
(probability targets with ``ignore_index`` semantics aside: K-dimensional bias, a target or
weight that requires grad, mixed dtypes or devices) go to ``torch.nn.functional`` itself.

No ``from __future__ import annotations``: torch.library reads the real annotations.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import gpuloss as _gl
from gpuloss.linear import min_chunk_bytes

from . import _ops
from ._convert import on_torch_stream, to_array, to_tensor
from .functional import _reduction, _run, _unsupported, _wants_grad

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]


def _chunk_bytes(options, input: Tensor, linear_weight: Tensor) -> Optional[int]:
    """torch's batch_chunk_size (rows per chunk) as gpuloss's byte budget; None: gpuloss's default."""
    rows = getattr(options, "batch_chunk_size", None) if options is not None else None
    if rows is None:
        return None
    # the dtype gpuloss computes in: float64 stays, the rest is float32
    dtype = "float64" if input.dtype == torch.float64 else "float32"
    return max(1, int(rows)) * min_chunk_bytes(linear_weight.shape[0], input.shape[-1], dtype)


def _fused(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
           weight: Optional[Tensor], sample_weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
           reduction: str, z_loss: float, softcap: Optional[float], want_grad: bool, chunk_bytes: int):
    kwargs = dict(linear_bias=to_array(_ops.widened(linear_bias)), class_weight=to_array(_ops.widened(weight)),
                  weight=to_array(_ops.widened(sample_weight)), ignore_index=ignore_index,
                  label_smoothing=label_smoothing, reduction=reduction, return_grad=want_grad, validate=False,
                  chunk_bytes=chunk_bytes or None)
    if z_loss != 0.0:
        kwargs.update(z_loss=z_loss, return_z_loss=True)
    if softcap is not None:
        kwargs["softcap"] = softcap
    with on_torch_stream(input):
        out = _gl.linear_cross_entropy(to_array(_ops.widened(input)), to_array(_ops.widened(linear_weight)),
                                       to_array(target), **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    loss = to_tensor(out[0], input.device)
    z = to_tensor(out[1], input.device) if z_loss != 0.0 else torch.zeros_like(loss)
    grads = out[-1] if want_grad else None
    return loss, z, grads


@torch.library.custom_op("gpuloss::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
                            weight: Optional[Tensor], ignore_index: int, label_smoothing: float, reduction: str,
                            z_loss: float, softcap: Optional[float], want_grad: bool,
                            chunk_bytes: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, z term, d input, d linear_weight, d linear_bias); the gradients are empty without want_grad."""
    if input.device.type == "cpu" and not target.is_floating_point():
        _ops.check_class_targets(target, linear_weight.shape[0], ignore_index)
    loss, z, grads = _fused(input, linear_weight, target, linear_bias, weight, None, ignore_index, label_smoothing,
                            reduction, z_loss, softcap, want_grad, chunk_bytes)
    if reduction == "mean":
        empty = _nothing_to_average(target, weight, linear_weight.shape[0], ignore_index, input)
        loss, z = _ops._nan_where(empty, loss), _ops._nan_where(empty, z)
    if grads is None:
        e = input.new_empty(0)
        return loss.to(input.dtype), z.to(input.dtype), e, e.clone(), e.clone()
    d_bias = to_tensor(grads.linear_bias, input.device).to(input.dtype) if linear_bias is not None \
        else input.new_empty(0)
    return (loss.to(input.dtype), z.to(input.dtype), to_tensor(grads.input, input.device).to(input.dtype),
            to_tensor(grads.linear_weight, input.device).to(linear_weight.dtype), d_bias)


def _nothing_to_average(target, weight, classes, ignore_index, input) -> Tensor:
    if target.is_floating_point():
        return torch.full((), target.numel() == 0, dtype=torch.bool, device=input.device)
    valid = (target != ignore_index) & (target >= 0) & (target < classes)
    if weight is None:
        return ~valid.any()
    return (weight[torch.where(valid, target, 0).long()] * valid).sum() == 0


@linear_cross_entropy_op.register_fake
def _linear_fake(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, reduction,
                 z_loss, softcap, want_grad, chunk_bytes):
    shape = tuple(input.shape[:-1]) if reduction == "none" else ()
    if not want_grad:
        e = input.new_empty(0)
        return input.new_empty(shape), input.new_empty(shape), e, e.clone(), e.clone()
    d_bias = input.new_empty(linear_bias.shape) if linear_bias is not None else input.new_empty(0)
    return (input.new_empty(shape), input.new_empty(shape), input.new_empty(input.shape),
            linear_weight.new_empty(linear_weight.shape), d_bias)


def _setup_context(ctx, inputs, output):
    (input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, reduction, z_loss, softcap,
     _, chunk_bytes) = inputs
    ctx.save_for_backward(output[2], output[3], output[4], input, linear_weight, target, linear_bias, weight)
    ctx.options = (ignore_index, label_smoothing, reduction, z_loss, softcap, chunk_bytes)
    ctx.has_bias = linear_bias is not None
    ctx.mark_non_differentiable(output[1], output[2], output[3], output[4])
    ctx.set_materialize_grads(False)  # no input- and weight-sized zeros for the unused gradient outputs


def _backward(ctx, g_loss, g_z, g_din, g_dw, g_db):
    if g_loss is None:
        return (None,) * 12
    d_in, d_w, d_b, input, linear_weight, target, linear_bias, weight = ctx.saved_tensors
    ignore_index, label_smoothing, reduction, z_loss, softcap, chunk_bytes = ctx.options
    if reduction == "none" and not bool((g_loss == 1).all()):
        # d loss_n / d W differs per row: one more fused pass with grad_output as per-row weights.
        _, _, grads = _fused(input.detach(), linear_weight.detach(), target, linear_bias, weight, g_loss.detach(),
                             ignore_index, label_smoothing, "sum", z_loss, softcap, True, chunk_bytes)
        dev = input.device
        d_in = to_tensor(grads.input, dev).to(input.dtype)
        d_w = to_tensor(grads.linear_weight, dev).to(linear_weight.dtype)
        d_b = to_tensor(grads.linear_bias, dev).to(input.dtype) if ctx.has_bias else None
        return (d_in, d_w, None, d_b) + (None,) * 8
    g = g_loss if g_loss.ndim == 0 else torch.ones((), dtype=g_loss.dtype, device=g_loss.device)
    return (_ops._scale_grad(d_in, g, False, False), _ops._scale_grad(d_w, g, False, False), None,
            _ops._scale_grad(d_b, g, False, False) if ctx.has_bias else None) + (None,) * 8


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _linear_form(input, linear_weight, target, linear_bias, weight) -> Optional[str]:
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.layout != torch.strided
                              or t.device != input.device):
            return f"{name} is not a strided tensor on input's device"
    if input.ndim < 1 or linear_weight.ndim != 2 or input.shape[-1] != linear_weight.shape[1]:
        return "input [..., H] and linear_weight [C, H] do not fit"
    if linear_bias is not None and tuple(linear_bias.shape) != (linear_weight.shape[0],):
        return "linear_bias is not of shape (C,)"
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias), ("weight", weight)):
        if t is not None and t.dtype != input.dtype:
            return f"{name} has dtype {t.dtype}, input {input.dtype}"
    if target.is_floating_point():
        if tuple(target.shape) != tuple(input.shape[:-1]) + (linear_weight.shape[0],) or target.dtype != input.dtype:
            return "probability targets must be [..., C] of input's dtype"
    elif target.dtype != torch.int64 or tuple(target.shape) != tuple(input.shape[:-1]):
        return "class-index targets must be int64 of input's leading shape"
    return None


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction: str = "mean",
                         ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                         z_loss: float = 0.0, softcap: Optional[float] = None, return_z_loss: bool = False):
    """``torch.nn.functional.linear_cross_entropy`` (torch 2.13), fused and chunked by gpuloss.

    Same signature, defaults and results as torch's; extras (keyword-only): ``z_loss``, ``softcap``,
    ``return_z_loss`` as in :func:`gpuloss.torch.cross_entropy`. The logits ``[N, C]`` are never
    made whole: rows run in chunks of ``options.batch_chunk_size`` or gpuloss's default budget.
    """
    _reduction(None, None, reduction)
    extras = z_loss != 0.0 or softcap is not None or return_z_loss
    reason = _unsupported(input, target, weight=weight)   # linear_weight / bias may require grad: checked below
    if reason is None:
        reason = _linear_form(input, linear_weight, target, linear_bias, weight)
    out = _run(reason, extras, lambda: F.linear_cross_entropy(
        input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, options=options))
    if out is not None:
        return out
    index = -100 if ignore_index is None else int(ignore_index)   # torch maps None to -100
    want_grad = any(_wants_grad(t) for t in (input, linear_weight, linear_bias))
    loss, z, *_ = linear_cross_entropy_op(input, linear_weight, target, linear_bias, weight, index,
                                          float(label_smoothing), reduction, float(z_loss),
                                          None if softcap is None else float(softcap), want_grad,
                                          _chunk_bytes(options, input, linear_weight) or 0)
    return (loss, z) if return_z_loss else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """A module around :func:`linear_cross_entropy`: ``loss_fn(input, linear_weight, target[, linear_bias])``
    with ``weight``, ``reduction``, ``ignore_index``, ``label_smoothing``, ``options`` and the extras fixed
    at construction."""

    def __init__(self, weight=None, reduction: str = "mean", ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, options=None, *, z_loss: float = 0.0, softcap: Optional[float] = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction, self.ignore_index, self.label_smoothing = reduction, ignore_index, label_smoothing
        self.options, self.z_loss, self.softcap = options, z_loss, softcap

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, options=self.options,
                                    z_loss=self.z_loss, softcap=self.softcap)
