"""Loss layers: each calls gpuloss's functional API once, with ``return_grad=True``.

The loss and its gradient come from one call (no formula is written twice);
backward scales the kept gradient by the top's diff, which is the top's
``loss_weight`` when the net seeds it (Caffe's convention: "the loss weight is
stored in the top's diff", http://caffe.berkeleyvision.org/tutorial/loss.html).

Caffe's ``LossParameter.normalization`` maps onto gpuloss reductions (docs/api.md §2.3.2)
with the logits viewed as ``(outer, C, inner)`` and the loss as ``(outer, inner)``,
so that the loss's first axis is Caffe's ``outer_num_``:

==========  =========================  ================================================
Caffe       gpuloss reduction          why it is the same number
==========  =========================  ================================================
FULL        ``sum_over_batch_size``    ``sum / (outer*inner)``, ignored positions included
VALID       ``sum_by_nonzero_weights`` ``sum / count(w != 0)``; w is 0 exactly at ignored
                                       labels (Caffe has no class weights), so this is
                                       Caffe's count of non-ignored labels; FULL without
                                       an ignore_label, as Caffe says
BATCH_SIZE  ``batch_size``             ``sum / outer``
NONE        ``sum``                    no division
==========  =========================  ================================================

Caffe divides by ``max(1, normalizer)``; the normalizer is a count, so that only
matters when it is 0 (every label ignored, or an empty batch), where Caffe's
result is 0 and gpuloss's rule (denominator 0 -> loss 0, grad 0) is 0 too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..layer import GraphError, Layer, class_labels, finite_number, normalize_axis, register_layer
from .activation import softmax

__all__ = ["SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "EuclideanLoss", "SmoothL1Loss",
           "NORMALIZATION_TO_REDUCTION"]

@dataclass(frozen=True)
class FusedInput:
    """What a SoftmaxWithLoss needs to run the InnerProduct before it itself (Net sets it)."""
    inner_product: Layer
    input_blob: object       # the InnerProduct's bottom blob
    propagate_down: bool     # whether that blob wants a gradient


NORMALIZATION_TO_REDUCTION = {"FULL": "sum_over_batch_size", "VALID": "sum_by_nonzero_weights",
                              "BATCH_SIZE": "batch_size", "NONE": "sum"}
_MODES = ("FULL", "VALID", "BATCH_SIZE", "NONE")


def _losses():
    # Imported at call time: gpuloss/__init__ imports the graph, and the graph needs the losses.
    from gpuloss import losses
    return losses


def _losses_linear():
    from gpuloss.linear import linear_cross_entropy
    return linear_cross_entropy


def _normalization_from_proto(lp, default: str) -> str:
    """Caffe's LossLayer rule: ``normalization`` if set, else legacy ``normalize`` (true -> VALID,
    false -> BATCH_SIZE), else the layer's default."""
    p = lp.loss_param
    if p.HasField("normalization"):
        return _MODES[p.normalization]
    if p.HasField("normalize"):
        return "VALID" if p.normalize else "BATCH_SIZE"
    return default


class _Loss(Layer):
    """Shared parts: loss_param (ignore_label, normalization), one scalar top, the kept gradient."""

    num_tops = (1, 1)
    default_normalization = "VALID"   # caffe.proto's LossParameter default

    def __init__(self, name, bottom=None, top=None, *, normalization: str | None = None,
                 normalize: bool | None = None, ignore_label: int | None = None, **common):
        super().__init__(name, bottom, top, **common)
        if normalization is None:
            normalization = self.default_normalization if normalize is None else \
                ("VALID" if normalize else "BATCH_SIZE")
        normalization = str(normalization).upper()
        if normalization not in _MODES:
            raise self.error(f"normalization must be one of {_MODES}, got {normalization!r}")
        self.normalization = normalization
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self._grads = None

    @classmethod
    def kwargs_from_proto(cls, lp) -> dict:
        extras = [f for f in ("z_loss", "softcap", "fuse") if lp.loss_param.HasField(f)]
        if extras and not issubclass(cls, SoftmaxWithLoss):
            raise GraphError(f"layer {lp.name!r} ({cls.type}): loss_param {' and '.join(extras)} apply to "
                             f"SoftmaxWithLoss only")
        kw = {"normalization": _normalization_from_proto(lp, cls.default_normalization)}
        if lp.loss_param.HasField("ignore_label"):
            kw["ignore_label"] = lp.loss_param.ignore_label
        return kw

    @property
    def reduction(self) -> str:
        return NORMALIZATION_TO_REDUCTION[self.normalization]

    def backward(self, top, propagate_down, bottom):
        # d(total)/d(bottom) = d(loss)/d(bottom) * d(total)/d(loss); the latter is top[0].diff.
        scale = top[0].diff
        return [g * scale if (pd and g is not None) else None
                for g, pd in zip(self._grads, propagate_down)]


@register_layer
class SoftmaxWithLoss(_Loss):
    """Caffe's ``SoftmaxWithLoss``: bottoms ``(logits, label)``, top ``loss`` (and optionally ``prob``).

    ``logits`` has C classes on ``axis`` (``softmax_param { axis }``, default
    1); ``label`` holds ``outer * inner`` class indices (any shape with that
    count; a float label must be an exact class index: NaN, inf, 2.5 or 1e30 are
    errors when the net validates, where Caffe's ``static_cast<int>`` would
    silently make them some integer).
    ``loss = sum over non-ignored n of -log softmax(logits)[n, label[n]]`` divided
    by the normalizer of ``normalization`` (table in this module's docstring),
    computed by :func:`gpuloss.softmax_cross_entropy`. A second top receives the
    softmax probabilities; as in Caffe, its diff is not backpropagated.
    Without ``ignore_label`` no label is ignored (``ignore_index=None``): a label
    outside ``[0, C)`` is an error, as in Caffe.
    """

    type = "SoftmaxWithLoss"
    num_bottoms = (2, 2)
    num_tops = (1, 2)
    proto_params = ("loss_param", "softmax_param")

    def __init__(self, name, bottom=None, top=None, *, axis: int = 1, z_loss: float = 0.0,
                 softcap: float | None = None, fuse: bool | None = None, **kw):
        super().__init__(name, bottom, top, **kw)
        self.axis = int(axis)
        # fuse: the net may run an InnerProduct feeding only this layer as one linear_cross_entropy
        # call (the [N, C] logits never exist). None: when the logits would be large (Net decides);
        # True: whenever the pair allows it; False: never.
        self.fuse = None if fuse is None else bool(fuse)
        self._fused = None   # set by Net: FusedInput when the pair runs fused
        # gpuloss's loss_param extension (docs/graph.md): PaLM's z-loss and Gemma 2's soft-capping,
        # exactly as gpuloss.softmax_cross_entropy's z_loss= and softcap=.
        self.z_loss = finite_number(z_loss, f"layer {name!r}: z_loss")
        if self.z_loss < 0:
            raise self.error(f"z_loss must be >= 0, got {self.z_loss}")
        self.softcap = None if softcap is None else finite_number(softcap, f"layer {name!r}: softcap")
        if self.softcap is not None and self.softcap <= 0:
            raise self.error(f"softcap must be > 0, got {self.softcap}")

    @classmethod
    def kwargs_from_proto(cls, lp) -> dict:
        kw = {**super().kwargs_from_proto(lp), "axis": lp.softmax_param.axis, "z_loss": lp.loss_param.z_loss}
        if lp.loss_param.HasField("fuse"):
            kw["fuse"] = lp.loss_param.fuse
        if lp.loss_param.HasField("softcap"):
            kw["softcap"] = lp.loss_param.softcap
        return kw

    def differentiable(self, bottom_index):
        return bottom_index == 0

    def setup(self, bottom_shapes, ctx):
        self.ctx = ctx
        shape, lshape = bottom_shapes
        self._axis = normalize_axis(self, self.axis, len(shape), "softmax axis")
        self._check_labels(shape, lshape)
        self._classes = shape[self._axis]
        return [()] + ([tuple(shape)] if len(self.top) > 1 else [])

    def _check_labels(self, shape, lshape):
        outer, inner = math.prod(shape[:self._axis]), math.prod(shape[self._axis + 1:])
        if math.prod(lshape) != outer * inner:
            raise self.error(f"label {self.bottom[1]!r} has shape {tuple(lshape)} ({math.prod(lshape)} "
                             f"labels) but logits {self.bottom[0]!r} of shape {tuple(shape)} with classes "
                             f"on axis {self._axis} make {outer * inner} predictions")
        return outer, inner

    def example_input(self, bottom_index, shape, rng):
        if bottom_index != 1:
            return None
        return rng.integers(0, self._classes, size=shape)

    def forward(self, bottom, top):
        if self._fused is not None:
            self._forward_fused(bottom, top)
            return
        xp = self.ctx.xp
        x, label = bottom[0].data, bottom[1].data
        shape = tuple(x.shape)
        outer, inner = self._check_labels(shape, label.shape)
        self._classes = shape[self._axis]
        logits = x.reshape(outer, shape[self._axis], inner)
        target = class_labels(self, label.reshape(outer, inner), xp, shape[self._axis], self.ignore_label,
                              self.ctx.validate)
        kw = {"ignore_index": self.ignore_label}  # None: nothing ignored, as Caffe without ignore_label
        loss, grad = _losses().softmax_cross_entropy(
            logits, target, axis=1, reduction=self.reduction, return_grad=True, z_loss=self.z_loss,
            softcap=self.softcap, validate=self.ctx.validate, backend=self.ctx.backend, **kw)
        self._grads = [grad.reshape(shape), None]
        top[0].data = loss
        if len(top) > 1:
            top[1].data = softmax(xp, x, self._axis)

    def _forward_fused(self, bottom, top):
        """The InnerProduct before this layer and this loss as one gpuloss.linear_cross_entropy call:
        the same loss and gradients, without the [N, C] logits (docs/graph.md)."""
        fused = self._fused
        ip, x_blob = fused.inner_product, fused.input_blob
        x2, _ = ip._flat(x_blob.data)
        label = bottom[1].data
        classes = ip.num_output
        self._check_labels((x2.shape[0], classes), label.shape)
        target = class_labels(self, label.reshape(x2.shape[0], 1), self.ctx.xp, classes, self.ignore_label,
                              self.ctx.validate).reshape(-1)
        bias = ip.params[1].data if ip.bias_term else None
        loss, grads = _losses_linear()(
            x2, ip.params[0].data, target, linear_bias=bias, reduction=self.reduction, z_loss=self.z_loss,
            softcap=self.softcap, ignore_index=self.ignore_label, return_grad=True, validate=self.ctx.validate,
            backend=self.ctx.backend)
        self._fused_grads = grads
        top[0].data = loss

    def backward(self, top, propagate_down, bottom):
        if self._fused is None:
            return super().backward(top, propagate_down, bottom)
        # Fused: this layer writes the InnerProduct's parameter diffs and its input's diff itself (the
        # logits, and so their diff, do not exist); scaled by d(total)/d(loss) as every loss layer is.
        fused, scale = self._fused, top[0].diff
        grads = self._fused_grads
        w, b = fused.inner_product.params[0], fused.inner_product.params[1:] or [None]
        w.diff = grads.linear_weight * scale
        if b[0] is not None:
            b[0].diff = grads.linear_bias * scale
        if fused.propagate_down:
            x_blob = fused.input_blob
            g = (grads.input * scale).reshape(x_blob.data.shape)
            x_blob.diff = g if not x_blob.has_diff else x_blob.diff + g
        return [None, None]


@register_layer
class SigmoidCrossEntropyLoss(_Loss):
    """Caffe's ``SigmoidCrossEntropyLoss``: bottoms ``(logits, targets)`` of equal count, targets in [0, 1].

    ``loss = sum(max(x, 0) - x*t + log(1 + exp(-|x|))) / normalizer`` through
    :func:`gpuloss.sigmoid_cross_entropy`. Caffe's default normalization here is
    BATCH_SIZE, not VALID ("for historical reasons", caffe.proto); an
    ``ignore_label`` gives the targets equal to it weight 0 (and VALID counts the
    others).
    """

    type = "SigmoidCrossEntropyLoss"
    num_bottoms = (2, 2)
    proto_params = ("loss_param",)
    default_normalization = "BATCH_SIZE"

    def differentiable(self, bottom_index):
        return bottom_index == 0

    def setup(self, bottom_shapes, ctx):
        self.ctx = ctx
        shape, tshape = bottom_shapes
        if len(shape) < 1:
            raise self.error(f"logits {self.bottom[0]!r} need a batch axis, got shape {tuple(shape)}")
        if math.prod(shape) != math.prod(tshape):
            raise self.error(f"logits {self.bottom[0]!r} {tuple(shape)} and targets {self.bottom[1]!r} "
                             f"{tuple(tshape)} must have the same count")
        return [()]

    def example_input(self, bottom_index, shape, rng):
        return rng.integers(0, 2, size=shape).astype("float64") if bottom_index == 1 else None

    def forward(self, bottom, top):
        xp = self.ctx.xp
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        weight = None
        if self.ignore_label is not None:
            keep = t != self.ignore_label
            weight = keep.astype(x.dtype)
            t = xp.where(keep, t, 0)
        t = t.astype(x.dtype, copy=False)
        loss, grad = _losses().sigmoid_cross_entropy(
            x, t, weight=weight, reduction=self.reduction, return_grad=True, backend=self.ctx.backend)
        self._grads = [grad, None]
        top[0].data = loss


class _Regression(_Loss):
    """Two bottoms of equal count, both differentiable (the target's gradient is minus the prediction's)."""

    num_bottoms = (2, 2)
    proto_params = ("loss_param",)   # accepted and, as in Caffe, not read

    def setup(self, bottom_shapes, ctx):
        self.ctx = ctx
        shape, tshape = bottom_shapes
        if len(shape) < 1:
            raise self.error(f"bottom {self.bottom[0]!r} needs a batch axis, got shape {tuple(shape)}")
        if math.prod(shape[1:]) != math.prod(tshape[1:]) or (len(tshape) and tshape[0] != shape[0]):
            raise self.error(f"bottoms {self.bottom[0]!r} {tuple(shape)} and {self.bottom[1]!r} "
                             f"{tuple(tshape)} must have the same batch size and per-sample count")
        return [()]

    @classmethod
    def kwargs_from_proto(cls, lp) -> dict:
        return {}   # Caffe's regression losses divide by the batch size whatever loss_param says

    def _finish(self, top, pred_shape, target_shape, loss, grad):
        self._grads = [grad, (-grad).reshape(target_shape)]
        top[0].data = loss


@register_layer
class EuclideanLoss(_Regression):
    """Caffe's ``EuclideanLoss``: ``sum((a - b)**2) / (2 N)``, N = ``a.shape[0]``; gradients to both bottoms.

    Through :func:`gpuloss.mean_squared_error` with the scalar ``weight=0.5`` and
    reduction ``batch_size`` (sum / N).
    """

    type = "EuclideanLoss"

    def __init__(self, name, bottom=None, top=None, **common):
        super().__init__(name, bottom, top, normalization="BATCH_SIZE", **common)

    def forward(self, bottom, top):
        a, b = bottom[0].data, bottom[1].data
        loss, grad = _losses().mean_squared_error(
            a, b.reshape(a.shape), weight=0.5, reduction="batch_size", return_grad=True,
            backend=self.ctx.backend)
        self._finish(top, a.shape, b.shape, loss, grad)


@register_layer
class SmoothL1Loss(_Regression):
    """Fast R-CNN's ``SmoothL1Loss`` (Girshick 2015): ``sum(smooth_l1(a - b)) / N``, N = ``a.shape[0]``.

    ``smooth_l1(d) = 0.5 (sigma d)**2`` if ``|d| < 1/sigma**2`` else ``|d| - 0.5/sigma**2``
    (``smooth_l1_loss_param { sigma }``, default 1), which is
    :func:`gpuloss.smooth_l1` with ``beta = 1/sigma**2``. The inside/outside
    weight bottoms of the Fast R-CNN layer are not supported.
    """

    type = "SmoothL1Loss"
    proto_params = ("loss_param", "smooth_l1_loss_param")

    def __init__(self, name, bottom=None, top=None, *, sigma: float = 1.0, **common):
        super().__init__(name, bottom, top, normalization="BATCH_SIZE", **common)
        sigma = finite_number(sigma, "sigma", error=self.error, field=("smooth_l1_loss_param", "sigma"))
        if not sigma > 0:
            raise self.error(f"sigma must be > 0, got {sigma}", field=("smooth_l1_loss_param", "sigma"))
        self.sigma = sigma

    @classmethod
    def kwargs_from_proto(cls, lp) -> dict:
        return {"sigma": lp.smooth_l1_loss_param.sigma}

    def forward(self, bottom, top):
        a, b = bottom[0].data, bottom[1].data
        loss, grad = _losses().smooth_l1(
            a, b.reshape(a.shape), beta=1.0 / self.sigma ** 2, reduction="batch_size",
            return_grad=True, backend=self.ctx.backend)
        self._finish(top, a.shape, b.shape, loss, grad)
