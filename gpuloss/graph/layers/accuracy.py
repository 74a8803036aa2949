"""``Accuracy``: the fraction of labels among the top-k scores (no gradient)."""
from __future__ import annotations

import math

from ..layer import Layer, class_labels, normalize_axis, register_layer

__all__ = ["Accuracy"]


@register_layer
class Accuracy(Layer):
    """Caffe's ``Accuracy``: bottoms ``(scores, label)``, top a 0-d accuracy in [0, 1].

    A label counts as right when fewer than ``top_k`` other classes score at
    least as high as it (Caffe's rule: ties count against it). Labels equal to
    ``ignore_label`` are left out of numerator and denominator; with none left
    the accuracy is 0, as in Caffe. Computed with ``xp`` on the device.

    A non-finite score is never right: a row counts as wrong when its true
    class scores NaN or +-inf, or when any of its scores is NaN (a diverged net
    must not report accuracy 1 because NaN compares false). Float labels must
    be exact class indices (see :func:`~gpuloss.graph.layer.class_labels`).
    """

    type = "Accuracy"
    num_bottoms = (2, 2)
    num_tops = (1, 1)
    proto_params = ("accuracy_param",)

    def __init__(self, name, bottom=None, top=None, *, top_k: int = 1, axis: int = 1,
                 ignore_label: int | None = None, **common):
        super().__init__(name, bottom, top, **common)
        if int(top_k) < 1:
            raise self.error(f"top_k must be >= 1, got {top_k}")
        self.top_k, self.axis = int(top_k), int(axis)
        self.ignore_label = None if ignore_label is None else int(ignore_label)

    @classmethod
    def kwargs_from_proto(cls, lp) -> dict:
        p = lp.accuracy_param
        kw = {"top_k": p.top_k, "axis": p.axis}
        if p.HasField("ignore_label"):
            kw["ignore_label"] = p.ignore_label
        return kw

    def differentiable(self, bottom_index):
        return False

    def setup(self, bottom_shapes, ctx):
        self.ctx = ctx
        shape, lshape = bottom_shapes
        self._axis = normalize_axis(self, self.axis, len(shape))
        self._classes = shape[self._axis]
        self._split(shape, lshape)
        if self.top_k > self._classes:
            raise self.error(f"top_k {self.top_k} is more than the {self._classes} classes")
        return [()]

    def _split(self, shape, lshape):
        outer, inner = math.prod(shape[:self._axis]), math.prod(shape[self._axis + 1:])
        if math.prod(lshape) != outer * inner:
            raise self.error(f"label {self.bottom[1]!r} of shape {tuple(lshape)} must hold {outer * inner} "
                             f"labels for scores of shape {tuple(shape)} (classes on axis {self._axis})")
        return outer, inner

    def example_input(self, bottom_index, shape, rng):
        return rng.integers(0, self._classes, size=shape) if bottom_index == 1 else None

    def forward(self, bottom, top):
        xp = self.ctx.xp
        x, label = bottom[0].data, bottom[1].data
        outer, inner = self._split(x.shape, label.shape)
        c = x.shape[self._axis]
        scores = x.reshape(outer, c, inner)
        label = class_labels(self, label.reshape(outer, inner), xp, c, self.ignore_label, self.ctx.validate)
        keep = xp.ones(label.shape, dtype=bool) if self.ignore_label is None else label != self.ignore_label
        if self.ctx.validate:  # a host read: the cpu backend only (the net turns it off on a GPU)
            bad = keep & ((label < 0) | (label >= c))
            if bool(bad.any()):
                n = int(xp.argmax(bad.reshape(-1)))
                raise self.error(f"label {self.bottom[1]!r} holds {int(label.reshape(-1)[n])} at flat "
                                 f"position {n}, outside [0, {c})")
        safe = xp.where(keep, label, 0)
        true_score = xp.take_along_axis(scores, safe[:, None, :], axis=1)
        better = xp.sum(scores >= true_score, axis=1) - 1  # the true class ties with itself
        # NaN compares false, so without this a NaN row would have no "better" class and count as right.
        finite = xp.isfinite(true_score[:, 0, :]) & ~xp.any(xp.isnan(scores), axis=1)
        right = xp.sum((better < self.top_k) & finite & keep)
        count = xp.sum(keep)
        top[0].data = xp.asarray(right / xp.maximum(count, 1), dtype=self.ctx.dtype)
