"""The torch custom ops behind gpuloss.torch: one fused pass returns the loss *and* its gradient.

Each op runs the functional API (``gpuloss.softmax_cross_entropy`` and the
element-wise losses) with ``return_grad=True`` on zero-copy views of the
tensors, returns ``(loss, ..., grad)`` and keeps ``grad`` for backward, which
only multiplies it by ``grad_output`` (per row / element for
``reduction="none"``).  The fake (meta) implementations give torch.compile the
output shapes without running anything, so a compiled model traces through
these ops with no graph break.

Reductions are passed to the functional API under the name whose divisor is
torch's (weighted mean for cross entropy and the weighted mse/l1, mean over
elements elsewhere), so the 1/divisor scaling happens inside the kernel, in
float32, with one rounding of the gradient.  The one place the two disagree,
a mean with nothing to average (all targets ignored, zero total weight, an
empty tensor), is patched to torch's NaN loss here.

No ``from __future__ import annotations``: torch.library reads the real
annotations to build each op's schema.
"""
import inspect
from typing import Optional

import torch
from torch import Tensor
_DelayedError = torch._C._functions.DelayedError

import gpuloss as _gl

from ._convert import on_torch_stream, to_array, to_tensor

# torch's binary_cross_entropy clamps each log at -100 and the gradient's denominator
# p(1-p) at EPSILON = 1e-12 (aten/src/ATen/native/Loss.cpp), a float constant: in float64
# it is 1e-12 rounded to float32 (measured: float64 grads at the clamp differ by 4e-9 otherwise).
BCE_LOG_FLOOR = -100.0
BCE_GRAD_EPSILON = 9.999999960041972e-13  # float(numpy.float32(1e-12))


def widened(t: Optional[Tensor]) -> Optional[Tensor]:
    """A CPU bfloat16 tensor as float32, cast by torch; anything else unchanged.

    For the small operands (weights) and the fused linear path, which cast whole arrays:
    torch's vectorised cast gives the same bits as ml_dtypes' (round to nearest even),
    faster. Logits, inputs and targets of the losses are passed as they are: the cpu
    kernels read 16-bit data as stored and write a 16-bit gradient (no float32 copy).
    """
    if t is not None and t.dtype == torch.bfloat16 and t.device.type == "cpu":
        return t.float()
    return t


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for the 16-bit types (as torch), float64 kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# What gpuloss.softmax_cross_entropy takes (z_loss / softcap arrived after the first release),
# read once at import so that torch.compile never traces inspect.
FUNCTIONAL_CE_PARAMS = frozenset(inspect.signature(_gl.softmax_cross_entropy).parameters)


def functional_has(param: str) -> bool:
    return param in FUNCTIONAL_CE_PARAMS


def _unpack(out, with_z: bool, with_grad: bool):
    out = out if isinstance(out, tuple) else (out,)
    loss = out[0]
    z = out[1] if with_z else None
    grad = out[-1] if with_grad else None
    return loss, z, grad


def _nan_where(empty: Tensor, t: Tensor) -> Tensor:
    return torch.where(empty, torch.full_like(t, float("nan")), t)


def _scale_grad(grad: Tensor, g: Tensor, per_element: bool, class_axis: bool, inplace: bool = False) -> Tensor:
    """grad * grad_output; grad_output broadcast over the class axis 1 for per-row losses.

    The kept gradient is a constant to autograd, so a second derivative through it would
    silently miss its dependence on the input: under create_graph the result carries an
    error node instead (what @once_differentiable does, but also when grad_output needs no grad).
    """
    if (g.ndim == 0 and g.device.type == "cpu" and not inplace and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and bool(g == 1)):
        # The usual loss.backward() on the CPU: the kept gradient is the answer, no pass over it.
        # Safe to hand out: autograd clones it before any in-place accumulation while we hold it.
        return grad
    with torch.no_grad():
        g = g.to(grad.dtype)
        if per_element and class_axis:
            g = g.unsqueeze(1)
        out = grad.mul_(g) if inplace else grad * g
    if torch.is_grad_enabled():  # create_graph=True
        message = ("gpuloss.torch losses are differentiable once: their gradient is computed in the forward "
                   "pass and has no derivative of its own (no double backward)")
        out = _DelayedError(message, 1)(out.detach().requires_grad_())
    return out


# --------------------------------------------------------------------------- cross entropy

def check_class_targets(target: Tensor, classes: int, ignore_index: int) -> None:
    """torch's IndexError for a class index outside [0, C) (CPU only: on CUDA it would synchronise)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def _nothing_to_average(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int) -> Tensor:
    """0-d bool on the device: True where torch's weighted mean divides by 0 (its loss is then NaN)."""
    if target.is_floating_point():  # probability targets: torch divides by the number of rows
        rows = input.numel() // input.shape[1 if input.ndim >= 2 else 0]
        return torch.full((), rows == 0, dtype=torch.bool, device=input.device)  # a fill, not a host copy
    classes = input.shape[1 if input.ndim >= 2 else 0]
    valid = (target != ignore_index) & (target >= 0) & (target < classes)
    if weight is None:
        return ~valid.any()
    cw_y = weight[torch.where(valid, target, 0).long()]
    return (cw_y * valid).sum() == 0


def cross_entropy_impl(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       label_smoothing: float, reduction: str, want_grad: bool, z_loss: float,
                       softcap: Optional[float]):
    index_target = not target.is_floating_point()
    axis = 1 if input.ndim >= 2 else 0
    if index_target and input.device.type == "cpu":
        check_class_targets(target, input.shape[axis], ignore_index)
    kwargs = dict(axis=axis, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
                  return_grad=want_grad, validate=False)  # checked above on the CPU; on CUDA it would synchronise
    with_z = z_loss != 0.0
    if with_z:
        kwargs.update(z_loss=z_loss, return_z_loss=True)
    if softcap is not None:
        kwargs["softcap"] = softcap
    with on_torch_stream(input):
        # Views made inside: CuPy hands DLPack its current stream, which is now torch's.
        out = _gl.softmax_cross_entropy(to_array(input), to_array(target),
                                        class_weight=to_array(widened(weight)), **kwargs)
    loss, z, grad = _unpack(out, with_z, want_grad)
    loss = to_tensor(loss, input.device)
    z = to_tensor(z, input.device) if with_z else torch.zeros_like(loss)
    grad = to_tensor(grad, input.device).to(input.dtype) if want_grad else input.new_empty(0)
    if reduction == "mean":
        empty = _nothing_to_average(input, target, weight, ignore_index)
        loss, z = _nan_where(empty, loss), _nan_where(empty, z)
    return loss.to(input.dtype), z.to(input.dtype), grad


def _ce_loss_shape(input: Tensor, target: Tensor, reduction: str):
    if reduction != "none":
        return ()
    if input.ndim < 2:
        return ()
    return (input.shape[0],) + tuple(input.shape[2:])


@torch.library.custom_op("gpuloss::cross_entropy", mutates_args=())
def cross_entropy_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                     label_smoothing: float, reduction: str, want_grad: bool, z_loss: float,
                     softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, z-loss term, d loss/d input) of softmax cross entropy over axis 1 (axis 0 for 1-D input).

    ``reduction`` is the functional API's name ("none", "sum" or "mean"); the
    gradient is empty when ``want_grad`` is False.
    """
    return cross_entropy_impl(input, target, weight, ignore_index, label_smoothing, reduction, want_grad, z_loss,
                              softcap)


@cross_entropy_op.register_fake
def _cross_entropy_fake(input, target, weight, ignore_index, label_smoothing, reduction, want_grad, z_loss, softcap):
    shape = _ce_loss_shape(input, target, reduction)
    return input.new_empty(shape), input.new_empty(shape), input.new_empty(input.shape if want_grad else (0,))


def _ce_setup_context(ctx, inputs, output):
    input, reduction = inputs[0], inputs[5]
    ctx.save_for_backward(output[2])
    ctx.per_element = reduction == "none"
    ctx.class_axis = input.ndim >= 2
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no [N, C] zeros for the unused gradient output (140 ms at 4096 x 32000)


def _ce_backward(ctx, g_loss, g_z, g_grad):
    if g_loss is None:
        return (None,) * 9
    (grad,) = ctx.saved_tensors
    return (_scale_grad(grad, g_loss, ctx.per_element, ctx.class_axis),) + (None,) * 8


cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


@torch.library.custom_op("gpuloss::cross_entropy_inplace", mutates_args=("input",))
def cross_entropy_inplace_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                             label_smoothing: float, reduction: str, z_loss: float,
                             softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """Like gpuloss::cross_entropy, but the gradient overwrites ``input`` (its logits are destroyed)."""
    loss, z, grad = cross_entropy_impl(input, target, weight, ignore_index, label_smoothing, reduction, True,
                                       z_loss, softcap)
    input.copy_(grad)
    return loss, z


@cross_entropy_inplace_op.register_fake
def _cross_entropy_inplace_fake(input, target, weight, ignore_index, label_smoothing, reduction, z_loss, softcap):
    shape = _ce_loss_shape(input, target, reduction)
    return input.new_empty(shape), input.new_empty(shape)


class CrossEntropyInplace(torch.autograd.Function):
    """Autograd for the in-place variant (a mutating op cannot register autograd itself).

    Backward scales the gradient stored in the logits' buffer in place and
    returns that buffer: it can run once (no ``retain_graph``), as in Liger-Kernel.
    """

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, label_smoothing, reduction, z_loss, softcap):
        loss, z = cross_entropy_inplace_op(input, target, weight, ignore_index, label_smoothing, reduction, z_loss,
                                           softcap)
        ctx.save_for_backward(input)
        ctx.per_element = reduction == "none"
        ctx.class_axis = input.ndim >= 2
        ctx.mark_non_differentiable(z)
        return loss, z

    @staticmethod
    def backward(ctx, g_loss, g_z):
        (grad,) = ctx.saved_tensors
        return (_scale_grad(grad, g_loss, ctx.per_element, ctx.class_axis, inplace=True),) + (None,) * 7


# --------------------------------------------------------------------------- element-wise losses

# torch name -> (gpuloss function, name of its scalar parameter or None)
ELEMENTWISE = {
    "mse_loss": ("mean_squared_error", None),
    "l1_loss": ("absolute_difference", None),
    "huber_loss": ("huber", "delta"),
    "smooth_l1_loss": ("smooth_l1", "beta"),
    "binary_cross_entropy_with_logits": ("sigmoid_cross_entropy", None),
    "binary_cross_entropy": ("log_loss", "epsilon"),
}


def _bce_torch_formula(p: Tensor, t: Tensor, weight: Optional[Tensor], reduction: str, want_grad: bool):
    """torch's binary_cross_entropy at the clamps (p within 1e-12 of 0 or 1), in the compute dtype.

    l = (t-1) max(log(1-p), -100) - t max(log p, -100);  dl/dp = (p-t) / max(p(1-p), 1e-12)
    (aten/src/ATen/native/Loss.cpp).  Only inputs that reach a clamp take this path.
    """
    cdt = compute_dtype(p.dtype)
    p, t = p.to(cdt), t.to(cdt)
    w = None if weight is None else weight.to(cdt)
    loss = (t - 1) * torch.log1p(-p).clamp_min(BCE_LOG_FLOOR) - t * torch.log(p).clamp_min(BCE_LOG_FLOOR)
    grad = (p - t) / ((1 - p) * p).clamp_min(BCE_GRAD_EPSILON) if want_grad else None
    if w is not None:
        loss = loss * w
        grad = None if grad is None else grad * w
    if reduction != "none":
        denom = p.numel() if reduction == "sum_over_batch_size" else 1
        loss = loss.sum() / denom
        grad = None if grad is None else grad / denom
    return loss, grad


def elementwise_impl(name: str, input: Tensor, target: Tensor, weight: Optional[Tensor],
                     pos_weight: Optional[Tensor], param: float, reduction: str, want_grad: bool):
    fn_name, param_name = ELEMENTWISE[name]
    kwargs = {} if param_name is None else {param_name: param}
    loss = grad = None
    if name == "binary_cross_entropy" and input.numel():
        lo, hi = torch.aminmax(input.detach())  # one synchronisation: torch's range check, and its clamps
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):
            raise RuntimeError("all elements of input should be between 0 and 1")
        if lo < BCE_GRAD_EPSILON or hi > 1.0 - BCE_GRAD_EPSILON:
            loss, grad = _bce_torch_formula(input, target, weight, reduction, want_grad)
    if loss is None:
        with on_torch_stream(input):
            if pos_weight is not None:
                kwargs["pos_weight"] = to_array(widened(pos_weight))
            out = getattr(_gl, fn_name)(to_array(input), to_array(target),
                                        weight=to_array(widened(weight)),
                                        reduction=reduction, return_grad=want_grad, **kwargs)
        loss, _, grad = _unpack(out, False, want_grad)
        loss = to_tensor(loss, input.device)
        grad = to_tensor(grad, input.device) if want_grad else None
    if grad is None:
        grad = input.new_empty(0)
    grad = grad.to(input.dtype)
    if reduction == "sum_over_batch_size" or (reduction == "mean" and weight is None):
        if input.numel() == 0:  # torch's mean of nothing
            loss = torch.full_like(loss, float("nan"))
    elif reduction == "mean":  # weighted mean (mse_loss / l1_loss with weight): torch divides by sum(weight)
        loss = _nan_where(weight.sum() == 0, loss)
    return loss.to(input.dtype), grad


def _elementwise_fake(input, target, weight, pos_weight, param, reduction, want_grad):
    shape = input.shape if reduction == "none" else ()
    return input.new_empty(shape), input.new_empty(input.shape if want_grad else (0,))


def _elementwise_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.per_element = inputs[5] == "none"
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no input-sized zeros for the unused gradient output


def _elementwise_backward(ctx, g_loss, g_grad):
    if g_loss is None:
        return (None,) * 7
    (grad,) = ctx.saved_tensors
    return (_scale_grad(grad, g_loss, ctx.per_element, False),) + (None,) * 6


def _make_elementwise_op(name: str):
    def op(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], param: float,
           reduction: str, want_grad: bool) -> tuple[Tensor, Tensor]:
        return elementwise_impl(name, input, target, weight, pos_weight, param, reduction, want_grad)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"(loss, d loss/d input) of torch's {name} through gpuloss.{ELEMENTWISE[name][0]}."
    custom = torch.library.custom_op(f"gpuloss::{name}", mutates_args=())(op)
    custom.register_fake(_elementwise_fake)
    custom.register_autograd(_elementwise_backward, setup_context=_elementwise_setup_context)
    return custom


ELEMENTWISE_OPS = {name: _make_elementwise_op(name) for name in ELEMENTWISE}
