"""``Input``: the blobs the caller feeds to ``net.forward(**inputs)``."""
from __future__ import annotations

from ..layer import Layer, register_layer

__all__ = ["Input"]


@register_layer
class Input(Layer):
    """Caffe's ``Input`` layer: declares N >= 1 top blobs and their shapes; feeds nothing itself.

    ``shape`` is one shape for every top, or one per top (Caffe's
    ``input_param { shape { dim: ... } }``). The first dimension is the batch
    size the net was written for; ``net.forward`` accepts any batch size whose
    other dimensions match.

    >>> Input("data", top=["data", "label"], shape=[(64, 64), (64,)])  # doctest: +SKIP
    """

    type = "Input"
    num_bottoms = (0, 0)
    num_tops = (1, 1 << 30)
    proto_params = ("input_param",)

    def __init__(self, name, bottom=None, top=None, *, shape=None, **common):
        super().__init__(name, bottom, top, **common)
        shapes = [] if shape is None else list(shape)
        if shapes and all(isinstance(d, int) for d in shapes):  # one bare shape for every top
            shapes = [tuple(shapes)]
        shapes = [tuple(int(d) for d in s) for s in shapes]
        if len(shapes) not in (1, len(self.top)):
            raise self.error(f"give one shape, or one per top ({len(self.top)}), got {len(shapes)}: {shapes}")
        for s in shapes:
            if any(d < 0 for d in s):
                raise self.error(f"shape dimensions must be >= 0, got {s}")
        self.shapes = [shapes[0]] * len(self.top) if len(shapes) == 1 else shapes

    @classmethod
    def kwargs_from_proto(cls, lp) -> dict:
        return {"shape": [tuple(s.dim) for s in lp.input_param.shape]}

    def setup(self, bottom_shapes, ctx):
        self.ctx = ctx
        if not self.shapes:
            raise self.error("needs input_param { shape { dim: ... } } for its tops: gpuloss sizes "
                             "parameters at set-up")
        return list(self.shapes)

    def forward(self, bottom, top):
        pass  # the net writes the tops from forward(**inputs)
