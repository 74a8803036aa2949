"""``torch.nn.functional``'s losses, same names, signatures, defaults and results, on gpuloss kernels.

Each function checks that its arguments are a form the fused kernels compute
exactly as torch does (strided float16/bfloat16/float32/float64 tensors on
the CPU or a CUDA device, targets of the input's dtype and shape, no argument
but the input asking for a gradient, ...).  Any other call, including every
call torch itself rejects, is handed to ``torch.nn.functional`` unchanged, so
it gets torch's result or torch's error: never a different number.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn import _reduction as _Reduction

from . import _ops

__all__ = ["cross_entropy", "binary_cross_entropy_with_logits", "binary_cross_entropy", "mse_loss", "l1_loss",
           "huber_loss", "smooth_l1_loss"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _reduction(size_average, reduce, reduction: str) -> str:
    """torch's reduction string: the legacy pair (with torch's deprecation warning) wins; bad names raise."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    _Reduction.get_enum(reduction)  # torch's ValueError for an unknown name
    return reduction


def _wants_grad(t) -> bool:
    return t is not None and torch.is_grad_enabled() and t.requires_grad


@lru_cache(maxsize=1)
def _cuda_reason() -> str | None:
    from gpuloss.backends import cuda_unavailable_reason

    return cuda_unavailable_reason()


def _device_ok(input: torch.Tensor) -> str | None:
    if input.device.type == "cpu":
        return None
    if input.device.type != "cuda":
        return f"input is on {input.device.type}; gpuloss runs on the CPU and CUDA devices"
    if torch.compiler.is_compiling():  # checked in eager runs; the op itself needs CuPy either way
        return None
    reason = _cuda_reason()
    if reason is not None:  # CUDA tensors but no CuPy: a clear error, not a silent switch to torch's kernel
        raise RuntimeError(f"gpuloss.torch: input is on {input.device} but gpuloss's cuda backend is unavailable "
                           f"({reason}); install gpuloss[cuda] or use torch.nn.functional")
    return None


def _unsupported(input, target, **others) -> str | None:
    """Why this call is not for the fused kernels (None when it is)."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        return "input and target must be tensors"
    if input.layout != torch.strided or input.dtype not in FLOAT_DTYPES:
        return f"input is a {input.layout} {input.dtype} tensor; the kernels take strided float16, bfloat16, " \
               f"float32 or float64"
    reason = _device_ok(input)
    if reason:
        return reason
    for name, t in (("target", target), *others.items()):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return f"{name} is not a strided tensor"
        if t.device != input.device:
            return f"{name} is on {t.device}, input on {input.device}"
        if _wants_grad(t):
            return f"{name} requires grad; the kernels give the gradient of the input only"
    return None


def _run(reason: str | None, extras: bool, fallback):
    if reason is None:
        return None
    if extras:
        raise TypeError(f"gpuloss.torch: z_loss, softcap, return_z_loss and inplace_backward need the fused "
                        f"kernels, which do not take this call: {reason}")
    return fallback()


def cross_entropy(input, target, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: float | None = None, return_z_loss: bool = False, inplace_backward: bool = False):
    """``torch.nn.functional.cross_entropy``, fused: the gradient comes out of the forward pass.

    Extras beyond torch (keyword-only):

    - ``z_loss=c``: adds ``c * logsumexp(logits)**2`` per sample (PaLM, Chowdhery et al. 2022, §5),
      weighted, ignored and reduced like the cross entropy.
    - ``softcap=s``: logits become ``s * tanh(logits / s)`` first (Gemma 2, Team Gemma 2024).
    - ``return_z_loss=True``: returns ``(loss, z_term)``; ``z_term`` is included in ``loss`` and is
      for logging (no gradient flows through it).
    - ``inplace_backward=True``: the gradient is written into ``input``'s own buffer, which is
      destroyed (as Liger-Kernel does); backward may then run only once.
    """
    reduction = _reduction(size_average, reduce, reduction)
    extras = z_loss != 0.0 or softcap is not None or return_z_loss or inplace_backward
    reason = _unsupported(input, target, weight=weight)
    if reason is None:
        reason = _ce_form(input, target, weight, ignore_index, label_smoothing)
    out = _run(reason, extras, lambda: F.cross_entropy(input, target, weight, None, ignore_index, None, reduction,
                                                       label_smoothing))
    if out is not None:
        return out
    for name, ok in (("z_loss", z_loss == 0.0), ("softcap", softcap is None)):
        if not ok and not _ops.functional_has(name):
            raise TypeError(f"gpuloss.torch.cross_entropy: {name}= needs gpuloss.softmax_cross_entropy with {name} "
                            f"support, which this gpuloss does not have")
    z_loss = float(z_loss)
    softcap = None if softcap is None else float(softcap)
    if inplace_backward and _wants_grad(input):
        loss, z = _ops.CrossEntropyInplace.apply(input, target, weight, int(ignore_index), float(label_smoothing),
                                                 reduction, z_loss, softcap)
    else:
        loss, z, _ = _ops.cross_entropy_op(input, target, weight, int(ignore_index), float(label_smoothing),
                                           reduction, _wants_grad(input), z_loss, softcap)
    return (loss, z) if return_z_loss else loss


def _ce_form(input, target, weight, ignore_index, label_smoothing) -> str | None:
    if input.ndim == 0 or input.shape[1 if input.ndim >= 2 else 0] == 0:
        return "input needs a non-empty class dimension"
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        return "ignore_index is not an int"
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        return "label_smoothing is not a number in [0, 1]"
    classes = input.shape[1 if input.ndim >= 2 else 0]
    if weight is not None and (weight.dtype != input.dtype or tuple(weight.shape) != (classes,)):
        return f"weight must be a ({classes},) tensor of input's dtype"
    if target.is_floating_point():
        if target.dtype != input.dtype or target.shape != input.shape:
            return "probability targets must have input's shape and dtype"
    elif target.dtype in (torch.int64, torch.uint8):
        expected = tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.ndim >= 2 else ()
        if tuple(target.shape) != expected:
            return f"class-index target must have shape {expected}"
    else:
        return f"target dtype {target.dtype} is neither Long, Byte nor input's floating dtype"
    return None


def _elementwise(name: str, input, target, reduction: str, fallback, *, weight=None, pos_weight=None,
                 param: float = 0.0, mean: str = "sum_over_batch_size"):
    """Shared body of the element-wise losses.  ``mean``: the functional API's reduction with torch's
    divisor for "mean" ("mean" = sum(w), for mse_loss/l1_loss with weight; else the element count)."""
    reason = _unsupported(input, target, weight=weight, pos_weight=pos_weight)
    if reason is None and (target.dtype != input.dtype or target.shape != input.shape):
        reason = "target must have input's shape and dtype"
    for aux_name, aux in (("weight", weight), ("pos_weight", pos_weight)):
        if reason is None and aux is not None:
            if aux.dtype != input.dtype or aux.ndim > input.ndim:
                reason = f"{aux_name} must be a tensor of input's dtype and at most its rank"
            else:
                try:
                    fits = torch.broadcast_shapes(aux.shape, input.shape) == input.shape
                except RuntimeError:
                    fits = False
                if not fits:
                    reason = f"{aux_name} does not broadcast to input's shape"
    if reason is not None:
        return fallback()
    if weight is not None and weight.ndim < input.ndim:
        # torch broadcasts from the trailing dims; gpuloss reads a short weight as a leading prefix.
        weight = weight.reshape((1,) * (input.ndim - weight.ndim) + tuple(weight.shape))
    red = {"none": "none", "sum": "sum", "mean": mean}[reduction]
    loss, _ = _ops.ELEMENTWISE_OPS[name](input, target, weight, pos_weight, float(param), red, _wants_grad(input))
    return loss


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction: str = "mean", pos_weight=None):
    """``torch.nn.functional.binary_cross_entropy_with_logits`` through gpuloss.sigmoid_cross_entropy."""
    reduction = _reduction(size_average, reduce, reduction)
    return _elementwise("binary_cross_entropy_with_logits", input, target, reduction,
                        lambda: F.binary_cross_entropy_with_logits(input, target, weight, None, None, reduction,
                                                                   pos_weight),
                        weight=weight, pos_weight=pos_weight)


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None, reduction: str = "mean"):
    """``torch.nn.functional.binary_cross_entropy`` through gpuloss.log_loss (epsilon 0).

    Inputs within 1e-12 of 0 or 1 reach torch's clamps (log >= -100, p(1-p) >= 1e-12) and are
    computed with torch's formula; the [0, 1] range check costs one synchronisation on CUDA.
    """
    reduction = _reduction(size_average, reduce, reduction)
    return _elementwise("binary_cross_entropy", input, target, reduction,
                        lambda: F.binary_cross_entropy(input, target, weight, None, None, reduction), weight=weight)


def mse_loss(input, target, size_average=None, reduce=None, reduction: str = "mean", weight=None):
    """``torch.nn.functional.mse_loss`` through gpuloss.mean_squared_error (weighted mean: / sum(weight))."""
    reduction = _reduction(size_average, reduce, reduction)
    if weight is not None and (not isinstance(weight, torch.Tensor) or weight.shape != getattr(input, "shape", None)):
        return F.mse_loss(input, target, None, None, reduction, weight)
    return _elementwise("mse_loss", input, target, reduction,
                        lambda: F.mse_loss(input, target, None, None, reduction, weight), weight=weight,
                        mean="mean")


def l1_loss(input, target, size_average=None, reduce=None, reduction: str = "mean", weight=None):
    """``torch.nn.functional.l1_loss`` through gpuloss.absolute_difference (weighted mean: / sum(weight))."""
    reduction = _reduction(size_average, reduce, reduction)
    if weight is not None and (not isinstance(weight, torch.Tensor) or weight.shape != getattr(input, "shape", None)):
        return F.l1_loss(input, target, None, None, reduction, weight)
    return _elementwise("l1_loss", input, target, reduction,
                        lambda: F.l1_loss(input, target, None, None, reduction, weight), weight=weight, mean="mean")


def huber_loss(input, target, reduction: str = "mean", delta: float = 1.0, weight=None):
    """``torch.nn.functional.huber_loss`` through gpuloss.huber (weighted: mean over elements, as torch)."""
    _Reduction.get_enum(reduction)
    if weight is not None and (not isinstance(weight, torch.Tensor) or weight.shape != getattr(input, "shape", None)):
        return F.huber_loss(input, target, reduction, delta, weight)
    fallback = lambda: F.huber_loss(input, target, reduction, delta, weight)  # noqa: E731
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0:
        return fallback()  # torch's error for delta <= 0
    return _elementwise("huber_loss", input, target, reduction, fallback, weight=weight, param=delta)


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction: str = "mean", beta: float = 1.0):
    """``torch.nn.functional.smooth_l1_loss`` through gpuloss.smooth_l1 (``beta=0`` is L1, as torch)."""
    reduction = _reduction(size_average, reduce, reduction)
    fallback = lambda: F.smooth_l1_loss(input, target, None, None, reduction, beta)  # noqa: E731
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        return fallback()  # torch's error for beta < 0
    return _elementwise("smooth_l1_loss", input, target, reduction, fallback, param=beta)
