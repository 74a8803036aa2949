"""Float64 NumPy rendering of every formula in docs/api.md §2: the oracle of the tests.

Each function takes the arguments of its namesake in ``gpuloss`` (NumPy arrays,
valid input assumed) and returns ``(loss, grad)`` in float64, where ``grad`` is
the derivative of the returned loss (of its sum for reduction "none") with
respect to the first argument, written from the closed form.  Clarity over
speed: nothing here is fused or clever, so a reader can check it against the
spec line by line.  Usable by anyone: ``from gpuloss import reference``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["softmax_cross_entropy", "sigmoid_cross_entropy", "log_loss", "mean_squared_error",
           "absolute_difference", "huber", "smooth_l1", "hinge", "cosine_distance", "weighted_reduce",
           "broadcast_weight"]


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def broadcast_weight(weight, loss_shape) -> np.ndarray:
    """docs/api.md §2.3.1: scalar, leading-prefix shape, or same-rank broadcast -> full loss shape."""
    if weight is None:
        return np.ones(loss_shape)
    w = _f64(weight)
    if w.ndim <= len(loss_shape) and w.shape == tuple(loss_shape[:w.ndim]):
        w = w.reshape(w.shape + (1,) * (len(loss_shape) - w.ndim))
    return np.broadcast_to(w, loss_shape)


def _reduce(L, w, reduction, grad_of_L=None):
    """Reduce weighted losses L with per-measurement weights w; scale dL/dx (if given) to match."""
    L = _f64(L)
    if reduction == "none":
        return L, grad_of_L
    if reduction == "sum":
        denom = 1.0
    elif reduction == "mean":
        denom = float(np.sum(w))
    elif reduction == "sum_over_batch_size":
        denom = float(L.size)
    elif reduction == "sum_by_nonzero_weights":
        denom = float(np.count_nonzero(w))
    elif reduction == "batch_size":
        denom = float(L.shape[0]) if L.ndim else 1.0
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    if denom == 0.0:  # docs/api.md §2.3.2: nothing to average -> 0 loss, 0 grad
        return np.float64(0.0), None if grad_of_L is None else np.zeros_like(grad_of_L)
    return np.float64(np.sum(L) / denom), None if grad_of_L is None else grad_of_L / denom


def _logsumexp(x, axis):
    """log(sum(exp(x))) along axis, kept as a size-1 axis; -inf for an all -inf row."""
    m = np.max(x, axis=axis, keepdims=True)
    # An all -inf row has max -inf: shift by 0 so it gives NaN like the kernels, not -inf - -inf early.
    m = np.where(m == -np.inf, 0.0, m)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _log_softmax(x, axis):
    with np.errstate(invalid="ignore"):
        return x - _logsumexp(x, axis)


def softmax_cross_entropy(logits, target, *, axis=-1, weight=None, class_weight=None, ignore_index=-100,
                          label_smoothing=0.0, reduction="mean", z_loss=0.0, softcap=None, return_z_loss=False):
    """``(loss, grad)``, or ``(loss, z_term, grad)`` with ``return_z_loss``; ``ignore_index=None`` ignores nothing."""
    x = np.moveaxis(_f64(logits), axis, -1)
    C = x.shape[-1]
    eps = float(label_smoothing)
    cw = np.ones(C) if class_weight is None else _f64(class_weight)
    w_sample = broadcast_weight(weight, x.shape[:-1])
    with np.errstate(invalid="ignore", over="ignore"):
        # Gemma 2 soft-capping: the softmax sees s tanh(x / s); d/dx = 1 - tanh^2(x / s).
        cap_slope = 1.0
        if softcap is not None:
            x = softcap * np.tanh(x / softcap)
            cap_slope = 1.0 - np.square(x / softcap)
        logp = _log_softmax(x, -1)
        lse = _logsumexp(x, -1)[..., 0]
        p = np.exp(logp)
        if np.issubdtype(np.asarray(target).dtype, np.integer):
            y = np.asarray(target)
            valid = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
            ys = np.where(valid, y, 0)
            onehot = np.zeros(x.shape)
            np.put_along_axis(onehot, ys[..., None], 1.0, axis=-1)
            # PyTorch CrossEntropyLoss docs: l = (1-eps) * cw[y] * -logp[y] + eps/C * sum_c cw[c] * -logp[c]
            nll = -np.take_along_axis(logp, ys[..., None], -1)[..., 0]
            # Where y holds the row max, -logp_y = log1p(sum_{c != y} e^(x_c - x_y)): exact for tiny losses,
            # where lse - x_y cancels (a loss of 1e-10 would keep only ~5 digits).
            x_y = np.take_along_axis(x, ys[..., None], -1)
            rest = np.sum(np.where(onehot == 1, 0.0, np.exp(np.minimum(x - x_y, 0.0))), axis=-1)
            holds_max = (x_y[..., 0] == np.max(x, axis=-1)) & np.isfinite(x_y[..., 0])
            nll = np.where(holds_max, np.log1p(rest), nll)
            smooth = -np.sum(cw * logp, axis=-1) if eps else 0.0
            l = (1 - eps) * cw[ys] * nll + (eps / C) * smooth
            l = np.where(valid, l, 0.0)
            w_meas = np.where(valid, w_sample * cw[ys], 0.0)
            # PaLM z-loss, weighted like the CE term (cw[y] inside, as l above): z_loss * cw[y] * lse^2
            z = np.where(valid, z_loss * cw[ys] * np.square(lse), 0.0)
            # d l / d x_j = (1-eps) cw[y] (p_j - [j=y]) + eps/C (sum(cw) p_j - cw_j) + 2 z_loss cw[y] lse p_j
            # p - onehot, with p_y - 1 written as -sum_{c != y} p_c: no cancellation for a confident row.
            p_minus_onehot = np.where(onehot == 1, -np.sum(np.where(onehot == 1, 0.0, p), axis=-1, keepdims=True), p)
            dl = ((1 - eps) * cw[ys][..., None] * p_minus_onehot + (eps / C) * (np.sum(cw) * p - cw)
                  + 2 * z_loss * (cw[ys] * lse)[..., None] * p)
            dl = np.where(valid[..., None], dl, 0.0)
        else:
            t = np.moveaxis(_f64(target), axis, -1)
            ts = (1 - eps) * t + eps / C
            l = -np.sum(cw * ts * logp, axis=-1)
            w_meas = w_sample
            z = z_loss * np.square(lse)
            # d l / d x_j = p_j sum_c cw_c t'_c - cw_j t'_j + 2 z_loss lse p_j
            dl = p * np.sum(cw * ts, axis=-1, keepdims=True) - cw * ts + 2 * z_loss * lse[..., None] * p
        if z_loss:
            l = l + z
        L = w_sample * l
        grad = w_sample[..., None] * dl * cap_slope
    loss, grad = _reduce(L, w_meas, reduction, grad)
    grad = np.moveaxis(grad, -1, axis)
    if not return_z_loss:
        return loss, grad
    z_term, _ = _reduce(w_sample * (z if z_loss else np.zeros_like(l)), w_meas, reduction)
    return loss, z_term, grad


def _elementwise(l, dl, weight, reduction):
    w = broadcast_weight(weight, l.shape)
    with np.errstate(invalid="ignore"):
        return _reduce(w * l, w, reduction, w * dl)


def sigmoid_cross_entropy(logits, target, *, weight=None, pos_weight=None, label_smoothing=0.0,
                          reduction="mean"):
    x, t = _f64(logits), _f64(target)
    eps = float(label_smoothing)
    t = t * (1 - eps) + 0.5 * eps  # TF sigmoid_cross_entropy label smoothing
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-np.abs(x))
        softplus_neg = np.log1p(e) + np.maximum(-x, 0)  # -log(sigmoid(x))
        # sigmoid = 1 - e r (x >= 0) or e r (x < 0), r = 1 / (1 + e): sigmoid - t and sigmoid - 1
        # written without cancellation, so a confident element's tiny gradient keeps its digits.
        r = 1 / (1 + e)
        nonneg = x >= 0
        if pos_weight is None:
            l = np.maximum(x, 0) - x * t + np.log1p(e)
            dl = np.where(nonneg, (1 - t) - e * r, e * r - t)
        else:
            # torch BCEWithLogitsLoss: (1-t) x + (1 + (p-1) t) softplus(-x); d softplus(-x)/dx = sig - 1
            pw = np.broadcast_to(_f64(pos_weight), x.shape)
            coef = 1 + (pw - 1) * t
            l = (1 - t) * x + coef * softplus_neg
            dl = (1 - t) - coef * np.where(nonneg, e * r, r)
    return _elementwise(l, dl, weight, reduction)


def log_loss(probs, target, *, epsilon=1e-7, weight=None, reduction="mean"):
    p, t = _f64(probs), _f64(target)
    with np.errstate(divide="ignore", invalid="ignore"):
        # log(1 - p + eps) as log1p(eps - p): exact for p ~ 0, where 1 - p would round
        l = -t * np.log(p + epsilon) - (1 - t) * np.log1p(epsilon - p)
        dl = -t / (p + epsilon) + (1 - t) / (1 - p + epsilon)
    return _elementwise(l, dl, weight, reduction)


def mean_squared_error(pred, target, *, weight=None, reduction="mean"):
    d = _f64(pred) - _f64(target)
    return _elementwise(d * d, 2 * d, weight, reduction)


def absolute_difference(pred, target, *, weight=None, reduction="mean"):
    d = _f64(pred) - _f64(target)
    return _elementwise(np.abs(d), np.sign(d), weight, reduction)


def huber(pred, target, *, delta=1.0, weight=None, reduction="mean"):
    d = _f64(pred) - _f64(target)
    a = np.abs(d)
    quadratic = a <= delta
    l = np.where(quadratic, 0.5 * d * d, delta * (a - 0.5 * delta))
    dl = np.where(quadratic, d, delta * np.sign(d))
    return _elementwise(l, dl, weight, reduction)


def smooth_l1(pred, target, *, beta=1.0, weight=None, reduction="mean"):
    d = _f64(pred) - _f64(target)
    a = np.abs(d)
    quadratic = a < beta  # never true for beta = 0: pure L1, as PyTorch
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.where(quadratic, 0.5 * d * d / beta, a - 0.5 * beta)
        dl = np.where(quadratic, d / beta, np.sign(d))
    return _elementwise(l, dl, weight, reduction)


def hinge(logits, target, *, weight=None, reduction="mean"):
    x, t = _f64(logits), _f64(target)
    y = 2 * t - 1  # TF hinge_loss: labels {0, 1} -> {-1, 1}
    margin = 1 - y * x
    dl = np.where(margin > 0, -y, np.where(np.isnan(margin), np.nan, 0.0))
    return _elementwise(np.maximum(0, margin), dl, weight, reduction)


def cosine_distance(pred, target, *, axis=-1, weight=None, reduction="mean"):
    p, t = _f64(pred), _f64(target)
    l = 1 - np.sum(p * t, axis=axis, keepdims=True)  # TF cosine_distance: inputs assumed unit-normalised
    w = broadcast_weight(weight, l.shape)
    loss, gscale = _reduce(w * l, w, reduction, -w * np.ones_like(l))
    return loss, gscale * t


def weighted_reduce(values, weight=None, reduction="mean"):
    v = _f64(values)
    w = broadcast_weight(weight, v.shape)
    loss, _ = _reduce(w * v, w, reduction)
    return loss, None
