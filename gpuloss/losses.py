"""The public loss functions (docs/api.md §2): check the arguments, build a plan, call the backend.

Every function takes NumPy arrays (``cpu`` backend, or ``emulated``) or CuPy
arrays (``cuda``) and returns results on the same device.  With
``return_grad=True`` it returns ``(loss, grad)``, ``grad`` being the derivative
of the returned loss (of the sum of its elements for ``reduction="none"``) with
respect to the first argument, computed in the same pass.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import _validate as v
from ._plan import (CosinePlan, CrossEntropyPlan, DtypePlan, ElementwisePlan, ReducePlan, WeightedReducePlan,
                    split_axis)

__all__ = ["softmax_cross_entropy", "sigmoid_cross_entropy", "log_loss", "mean_squared_error",
           "absolute_difference", "huber", "smooth_l1", "hinge", "cosine_distance", "weighted_reduce"]


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return bool(value)


def _aux_array(name: str, value, xp, dtype, shape: tuple | None = None):
    """An optional per-class / per-column array argument, moved to ``dtype`` (never modified)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
        value = xp.asarray(value)
    if not v.is_array(value):
        raise TypeError(f"{name} must be an array (or None); got {type(value).__name__}")
    v.check_real_dtype(name, value, allow_bool=False)
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(value.shape)}")
    return value.astype(dtype, copy=False)


def _arrays(**named):
    """The named arguments that are arrays, for the device check."""
    return {k: a for k, a in named.items() if v.is_array(a)}


def _plain(**named) -> list:
    """Each argument as the kernels read it (_validate.as_input): subclasses refused, byte order native."""
    return [v.as_input(k, a) for k, a in named.items()]


def _result(loss, grad, return_grad: bool):
    return (loss, grad) if return_grad else loss


@v.torch_spelling_hints
def softmax_cross_entropy(logits, target, *, axis: int = -1, weight=None, class_weight=None,
                          ignore_index: int | None = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                          z_loss: float = 0.0, softcap: float | None = None, return_z_loss: bool = False,
                          return_grad: bool = False, validate: bool = True, backend: str | None = None):
    """Numerically stable softmax cross entropy (docs/api.md §2.1).

    ``logp = logits - logsumexp(logits, axis)``.  ``ignore_index=None`` ignores no
    label (every target must then be a class index).  With class-index ``target``
    (integer, shape of ``logits`` without ``axis``)::

        l[n] = (1-eps) * cw[y] * -logp[n, y] + eps/C * sum_c cw[c] * -logp[n, c]
        w[n] = weight[n] * cw[y]            (0 where y == ignore_index)

    With probability ``target`` (floating, shape of ``logits``):
    ``l[n] = -sum_c cw[c] * ((1-eps) t[n, c] + eps/C) * logp[n, c]``, ``w[n] = weight[n]``.
    Equal to ``torch.nn.functional.cross_entropy`` for every combination of
    class weights, ignore_index, label smoothing and reduction none/sum/mean.

    Extras (docs/api.md §2.4): ``softcap=s`` replaces the logits by
    ``s * tanh(logits / s)`` before everything (Gemma 2); ``z_loss=c`` adds
    ``c * lse[n]**2`` to each measurement's loss (PaLM, Chowdhery et al. 2022,
    §5), weighted by ``w[n]`` and reduced like the rest.  ``return_z_loss=True``
    returns ``(loss, z_term)`` (``(loss, z_term, grad)`` with ``return_grad``),
    ``z_term`` being the z part alone, reduced the same way (already in ``loss``).

    Example
    -------
    >>> import numpy as np, gpuloss as gl
    >>> logits = np.array([[2.0, 0.5, -1.0]], np.float32)
    >>> loss, grad = gl.softmax_cross_entropy(logits, np.array([0]), return_grad=True)
    >>> round(float(loss), 4)
    0.2413
    """
    logits, target, weight, class_weight = _plain(logits=logits, target=target, weight=weight,
                                                  class_weight=class_weight)
    v.check_floating("logits", logits)
    v.check_array("target", target)
    be = v.array_module(_arrays(logits=logits, target=target, weight=weight, class_weight=class_weight), backend)
    if logits.ndim == 0:
        raise ValueError("logits must have a class axis (rank >= 1); got a 0-d array")
    ax = v.normalize_axis("axis", axis, logits.ndim, "logits")
    outer, classes, inner = split_axis(tuple(logits.shape), ax)
    if classes == 0:
        raise ValueError(f"logits must have at least one class on axis {axis}; got shape {tuple(logits.shape)}")
    loss_shape = tuple(logits.shape[:ax] + logits.shape[ax + 1:])
    dtypes = DtypePlan.for_input(logits.dtype)
    target_kind = np.dtype(target.dtype).kind
    index_target = target_kind in "iu"
    if index_target:
        if tuple(target.shape) != loss_shape:
            hint = ""
            if logits.ndim >= 3 and ax != 1 and tuple(target.shape) == tuple(logits.shape[:1] + logits.shape[2:]):
                hint = " (PyTorch puts the classes on dim 1: pass axis=1)"
            raise ValueError(f"target (class indices) must have the shape of logits without axis {axis}, "
                             f"{loss_shape}; got {tuple(target.shape)}{hint}")
    elif v.is_float_dtype(target.dtype):
        v.check_same_shape("target (probabilities)", target, "logits", logits)
    else:
        raise TypeError(f"target must be integer class indices or floating probabilities; got {target.dtype}")
    ignore_index = v.check_ignore_index(ignore_index)
    eps = v.check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_coef = v.check_real("z_loss", z_loss, low=0.0)
    cap = 0.0 if softcap is None else v.check_real("softcap", softcap, low=0.0, low_open=True)
    red = v.check_reduction(reduction)
    validate = _check_flag("validate", validate)
    per_class = getattr(weight, "shape", None) == (classes,) and class_weight is None
    w_values, w_block = v.weight_layout(
        "weight", weight, loss_shape, be.xp, dtypes.compute,
        hint=" (weight= is per sample here; for PyTorch's per-class weight pass class_weight=)" if per_class else "")
    cw = _aux_array("class_weight", class_weight, be.xp, dtypes.compute, (classes,))
    if index_target and validate:
        v.check_class_targets(target, classes, ignore_index)
    plan = CrossEntropyPlan(
        dtypes=dtypes, reduce=ReducePlan(red, loss_shape, w_block), outer=outer, classes=classes, inner=inner,
        index_target=index_target, has_class_weight=cw is not None, ignore_index=ignore_index,
        label_smoothing=eps, return_grad=_check_flag("return_grad", return_grad), validate=validate,
        z_loss=z_coef, softcap=cap, return_z_loss=_check_flag("return_z_loss", return_z_loss))
    loss, z_term, grad = be.cross_entropy(plan, logits, target, w_values, cw)
    head = (loss, z_term) if plan.return_z_loss else (loss,)
    tail = (grad,) if plan.return_grad else ()
    out = head + tail
    return out if len(out) > 1 else loss


def _elementwise(loss_name: str, first_name: str, pred, target, *, weight, reduction, return_grad, backend,
                 param: float = 0.0, pos_weight=None, binary_labels: bool = False):
    """Shared front half of the element-wise losses: checks, plan, backend call.

    ``binary_labels``: the targets must be 0 or 1 (hinge with validate=True).
    """
    pred, target, weight, pos_weight = _plain(**{first_name: pred, "target": target, "weight": weight,
                                                 "pos_weight": pos_weight})
    v.check_floating(first_name, pred)
    v.check_array("target", target)
    be = v.array_module(_arrays(**{first_name: pred, "target": target, "weight": weight,
                                   "pos_weight": pos_weight}), backend)
    v.check_real_dtype("target", target)
    v.check_same_shape("target", target, first_name, pred)
    if binary_labels:
        v.check_binary_labels("target", target)
    shape = tuple(pred.shape)
    dtypes = DtypePlan.for_input(pred.dtype)
    red = v.check_reduction(reduction)
    w_values, w_block = v.weight_layout("weight", weight, shape, be.xp, dtypes.compute)
    pw, period = None, 0
    if pos_weight is not None:
        pw, period = _pos_weight_layout(pos_weight, shape, be.xp, dtypes.compute)
    plan = ElementwisePlan(loss=loss_name, dtypes=dtypes, reduce=ReducePlan(red, shape, w_block), param=param,
                           pos_weight_period=period, return_grad=_check_flag("return_grad", return_grad))
    loss, grad = be.elementwise(plan, pred, target, w_values, pw)
    return _result(loss, grad, plan.return_grad)


def _pos_weight_layout(pos_weight, shape: tuple, xp, dtype):
    """``(values, period)``: element i uses values[i % period].  PyTorch broadcasts pos_weight
    against the target; the usual form is one value per class of the last axis."""
    if isinstance(pos_weight, numbers.Real) and not isinstance(pos_weight, bool):
        return v.constant(xp, float(pos_weight), dtype), 1
    pw = _aux_array("pos_weight", pos_weight, xp, dtype)
    try:
        fits = np.broadcast_shapes(tuple(pw.shape), shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"pos_weight of shape {tuple(pw.shape)} does not broadcast to the loss of shape {shape}")
    core = tuple(pw.shape)
    while core and core[0] == 1:
        core = core[1:]
    if core == shape[len(shape) - len(core):]:  # a trailing block of the shape repeats: no copy
        flat = xp.ascontiguousarray(pw.reshape(-1))
    else:
        flat = xp.ascontiguousarray(xp.broadcast_to(pw, shape)).reshape(-1)
    return flat, max(flat.size, 1)


@v.torch_spelling_hints
def sigmoid_cross_entropy(logits, target, *, weight=None, pos_weight=None, label_smoothing: float = 0.0,
                          reduction: str = "mean", return_grad: bool = False, backend: str | None = None):
    """Binary cross entropy on logits (docs/api.md §2.2), stable for any |x|.

    ``t' = t*(1-eps) + eps/2``; ``l = max(x,0) - x*t' + log1p(exp(-|x|))``; with
    ``pos_weight`` p (broadcast like PyTorch, usually one per class of the last
    axis) ``l = (1-t')*x + (1+(p-1)*t') * (log1p(exp(-|x|)) + max(-x,0))``.
    """
    eps = v.check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    return _elementwise("sigmoid_cross_entropy", "logits", logits, target, weight=weight, reduction=reduction,
                        return_grad=return_grad, backend=backend, param=eps, pos_weight=pos_weight)


@v.torch_spelling_hints
def log_loss(probs, target, *, epsilon: float = 1e-7, weight=None, reduction: str = "mean",
             return_grad: bool = False, backend: str | None = None):
    """``-t*log(p+epsilon) - (1-t)*log(1-p+epsilon)`` (TensorFlow's log_loss)."""
    eps = v.check_real("epsilon", epsilon, low=0.0)
    return _elementwise("log_loss", "probs", probs, target, weight=weight, reduction=reduction,
                        return_grad=return_grad, backend=backend, param=eps)


@v.torch_spelling_hints
def mean_squared_error(pred, target, *, weight=None, reduction: str = "mean", return_grad: bool = False,
                       backend: str | None = None):
    """``(pred - target)**2`` per element."""
    return _elementwise("mean_squared_error", "pred", pred, target, weight=weight, reduction=reduction,
                        return_grad=return_grad, backend=backend)


@v.torch_spelling_hints
def absolute_difference(pred, target, *, weight=None, reduction: str = "mean", return_grad: bool = False,
                        backend: str | None = None):
    """``abs(pred - target)`` per element; its gradient at 0 is 0 (as PyTorch's l1_loss)."""
    return _elementwise("absolute_difference", "pred", pred, target, weight=weight, reduction=reduction,
                        return_grad=return_grad, backend=backend)


@v.torch_spelling_hints
def huber(pred, target, *, delta: float = 1.0, weight=None, reduction: str = "mean", return_grad: bool = False,
          backend: str | None = None):
    """``0.5*d**2`` if ``|d| <= delta`` else ``delta*(|d| - 0.5*delta)`` (TF huber_loss, torch huber_loss)."""
    d = v.check_real("delta", delta, low=0.0, low_open=True)
    return _elementwise("huber", "pred", pred, target, weight=weight, reduction=reduction,
                        return_grad=return_grad, backend=backend, param=d)


@v.torch_spelling_hints
def smooth_l1(pred, target, *, beta: float = 1.0, weight=None, reduction: str = "mean", return_grad: bool = False,
              backend: str | None = None):
    """``0.5*d**2/beta`` if ``|d| < beta`` else ``|d| - 0.5*beta``; ``beta=0`` is L1 (torch smooth_l1_loss)."""
    b = v.check_real("beta", beta, low=0.0)
    return _elementwise("smooth_l1", "pred", pred, target, weight=weight, reduction=reduction,
                        return_grad=return_grad, backend=backend, param=b)


@v.torch_spelling_hints
def hinge(logits, target, *, weight=None, reduction: str = "mean", return_grad: bool = False,
          validate: bool = True, backend: str | None = None):
    """``max(0, 1 - y*x)`` with ``y = 2*t - 1``: labels in {0, 1} (TensorFlow's hinge_loss).

    A label other than 0 or 1 is a ValueError naming its position (a -1/+1 label
    would silently become y = -3 / +1); ``validate=False`` skips that check (one
    synchronisation on a GPU) and applies the formula to any label as it is.
    """
    return _elementwise("hinge", "logits", logits, target, weight=weight, reduction=reduction,
                        return_grad=return_grad, backend=backend,
                        binary_labels=_check_flag("validate", validate))


@v.torch_spelling_hints
def cosine_distance(pred, target, *, axis: int = -1, weight=None, reduction: str = "mean",
                    return_grad: bool = False, backend: str | None = None):
    """``1 - sum(pred*target, axis)`` with ``axis`` kept as size 1 (TensorFlow's cosine_distance;
    like TF, the inputs are taken as already unit-normalised)."""
    pred, target, weight = _plain(pred=pred, target=target, weight=weight)
    v.check_floating("pred", pred)
    v.check_array("target", target)
    be = v.array_module(_arrays(pred=pred, target=target, weight=weight), backend)
    v.check_real_dtype("target", target)
    v.check_same_shape("target", target, "pred", pred)
    if pred.ndim == 0:
        raise ValueError("pred must have rank >= 1 (the axis to sum over); got a 0-d array")
    ax = v.normalize_axis("axis", axis, pred.ndim, "pred")
    outer, length, inner = split_axis(tuple(pred.shape), ax)
    loss_shape = tuple(pred.shape[:ax]) + (1,) + tuple(pred.shape[ax + 1:])
    dtypes = DtypePlan.for_input(pred.dtype)
    red = v.check_reduction(reduction)
    w_values, w_block = v.weight_layout("weight", weight, loss_shape, be.xp, dtypes.compute)
    plan = CosinePlan(dtypes=dtypes, reduce=ReducePlan(red, loss_shape, w_block), outer=outer, length=length,
                      inner=inner, return_grad=_check_flag("return_grad", return_grad))
    loss, grad = be.cosine_distance(plan, pred, target, w_values)
    return _result(loss, grad, plan.return_grad)


@v.torch_spelling_hints
def weighted_reduce(values, weight=None, reduction: str = "mean", *, backend: str | None = None):
    """Reduce per-element losses ``values`` with ``weight`` by one of the six reductions (docs/api.md §2.3)."""
    values, weight = _plain(values=values, weight=weight)
    v.check_floating("values", values)
    be = v.array_module(_arrays(values=values, weight=weight), backend)
    shape = tuple(values.shape)
    dtypes = DtypePlan.for_input(values.dtype)
    red = v.check_reduction(reduction)
    w_values, w_block = v.weight_layout("weight", weight, shape, be.xp, dtypes.compute)
    return be.weighted_reduce(WeightedReducePlan(dtypes=dtypes, reduce=ReducePlan(red, shape, w_block)),
                              values, w_values)
