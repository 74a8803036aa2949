"""Element-wise activations (ReLU, Sigmoid, TanH) and Softmax; each may run in place."""
from __future__ import annotations

from ..layer import Layer, finite_number, normalize_axis, register_layer

__all__ = ["ReLU", "Sigmoid", "TanH", "Softmax", "softmax"]


class _Neuron(Layer):
    """One bottom, one top of the same shape; in place (top named as the bottom) is allowed."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    supports_in_place = True

    def setup(self, bottom_shapes, ctx):
        self.ctx = ctx
        return [tuple(bottom_shapes[0])]


@register_layer
class ReLU(_Neuron):
    """Caffe's ``ReLU``: ``y = x if x > 0 else negative_slope * x``.

    Backward uses ``y > 0`` for ``x > 0`` (the same test for ``negative_slope
    >= 0``), so it is right in place, where ``x`` has been overwritten.
    """

    type = "ReLU"
    proto_params = ("relu_param",)

    def __init__(self, name, bottom=None, top=None, *, negative_slope: float = 0.0, **common):
        super().__init__(name, bottom, top, **common)
        self.negative_slope = finite_number(negative_slope, "negative_slope", error=self.error,
                                            field=("relu_param", "negative_slope"))

    @classmethod
    def kwargs_from_proto(cls, lp) -> dict:
        return {"negative_slope": lp.relu_param.negative_slope}

    def setup(self, bottom_shapes, ctx):
        if self.negative_slope < 0 and self.bottom[0] in self.top:
            raise self.error("in place needs negative_slope >= 0 (the sign of x is read back from y)")
        return super().setup(bottom_shapes, ctx)

    def forward(self, bottom, top):
        xp, x = self.ctx.xp, bottom[0].data
        out = x if bottom[0] is top[0] else None
        if self.negative_slope == 0.0:
            top[0].data = xp.maximum(x, 0, out=out)
        else:
            top[0].data = xp.multiply(x, xp.where(x > 0, 1, self.negative_slope).astype(x.dtype), out=out)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return [None]
        xp, y, dy = self.ctx.xp, top[0].data, top[0].diff
        if self.negative_slope == 0.0:
            return [dy * (y > 0)]
        return [dy * xp.where(y > 0, 1, self.negative_slope).astype(dy.dtype)]


@register_layer
class Sigmoid(_Neuron):
    """Caffe's ``Sigmoid``: ``y = 1 / (1 + exp(-x))``, backward ``dy * y * (1 - y)`` (from y: in-place safe)."""

    type = "Sigmoid"
    proto_params = ("sigmoid_param",)

    def forward(self, bottom, top):
        xp, x = self.ctx.xp, bottom[0].data
        e = xp.exp(-xp.abs(x))  # exp of a non-positive number never overflows
        top[0].data = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return [None]
        y = top[0].data
        return [top[0].diff * y * (1 - y)]


@register_layer
class TanH(_Neuron):
    """Caffe's ``TanH``: ``y = tanh(x)``, backward ``dy * (1 - y**2)``."""

    type = "TanH"
    proto_params = ("tanh_param",)

    def forward(self, bottom, top):
        x = bottom[0].data
        top[0].data = self.ctx.xp.tanh(x, out=x if bottom[0] is top[0] else None)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return [None]
        y = top[0].data
        return [top[0].diff * (1 - y * y)]


def softmax(xp, x, axis: int):
    """Softmax along ``axis``, shifted by the max so no exp overflows."""
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


@register_layer
class Softmax(_Neuron):
    """Caffe's ``Softmax`` over ``axis`` (default 1); backward ``y * (dy - sum(dy * y, axis))``."""

    type = "Softmax"
    proto_params = ("softmax_param",)

    def __init__(self, name, bottom=None, top=None, *, axis: int = 1, **common):
        super().__init__(name, bottom, top, **common)
        self.axis = int(axis)

    @classmethod
    def kwargs_from_proto(cls, lp) -> dict:
        return {"axis": lp.softmax_param.axis}

    def setup(self, bottom_shapes, ctx):
        self._axis = normalize_axis(self, self.axis, len(bottom_shapes[0]))
        return super().setup(bottom_shapes, ctx)

    def forward(self, bottom, top):
        top[0].data = softmax(self.ctx.xp, bottom[0].data, self._axis)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return [None]
        y, dy = top[0].data, top[0].diff
        return [y * (dy - self.ctx.xp.sum(dy * y, axis=self._axis, keepdims=True))]
