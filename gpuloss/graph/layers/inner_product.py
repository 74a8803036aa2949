"""``InnerProduct``: the fully connected layer, ``y = x W^T + b``."""
from __future__ import annotations

import math
import os

from ..blob import Blob
from ..layer import GraphError, Layer, normalize_axis, register_layer
from .fillers import Filler

__all__ = ["InnerProduct", "memory_limit_bytes"]


def memory_limit_bytes() -> int | None:
    """The machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


@register_layer
class InnerProduct(Layer):
    """Caffe's ``InnerProduct``: bottom ``(d_0 .. d_{a-1}, d_a .. d_{r-1})`` -> top ``(d_0 .. d_{a-1}, N)``.

    The axes from ``axis`` on are flattened into K inputs; ``W`` has shape
    ``(N, K)`` and ``b`` shape ``(N,)`` (Caffe's layout), so
    ``top = x.reshape(M, K) @ W.T + b``. Parameters: ``num_output`` (N),
    ``bias_term``, ``weight_filler`` / ``bias_filler`` (:class:`Filler`,
    default constant 0 as in Caffe), ``axis`` (default 1).
    """

    type = "InnerProduct"
    num_bottoms = (1, 1)
    num_tops = (1, 1)
    proto_params = ("inner_product_param",)

    def __init__(self, name, bottom=None, top=None, *, num_output: int, bias_term: bool = True,
                 weight_filler: Filler | None = None, bias_filler: Filler | None = None, axis: int = 1,
                 **common):
        super().__init__(name, bottom, top, **common)
        if int(num_output) <= 0:
            raise self.error(f"num_output must be > 0, got {num_output}")
        self.num_output = int(num_output)
        self.bias_term = bool(bias_term)
        self.weight_filler = weight_filler or Filler()
        self.bias_filler = bias_filler or Filler()
        self.axis = int(axis)

    @classmethod
    def kwargs_from_proto(cls, lp) -> dict:
        p = lp.inner_product_param
        where = f"layer {lp.name!r} (InnerProduct)"
        if not p.HasField("num_output"):
            raise GraphError(f"{where}: inner_product_param needs num_output")
        if p.transpose:
            raise GraphError(f"{where}: field 'transpose' is not supported")
        return {"num_output": p.num_output, "bias_term": p.bias_term, "axis": p.axis,
                "weight_filler": Filler.from_proto(p.weight_filler, where + " weight_filler",
                                                   ("inner_product_param", "weight_filler")),
                "bias_filler": Filler.from_proto(p.bias_filler, where + " bias_filler",
                                                 ("inner_product_param", "bias_filler"))}

    def setup(self, bottom_shapes, ctx):
        self.ctx = ctx
        shape = bottom_shapes[0]
        self._axis = normalize_axis(self, self.axis, len(shape))
        self._k = math.prod(shape[self._axis:])
        if self._k == 0:
            raise self.error(f"bottom {self.bottom[0]!r} has shape {tuple(shape)}: the axes from {self._axis} "
                             f"on hold no values (a dimension 0), so there is nothing to connect")
        xp = ctx.xp
        specs = [(self.weight_filler, (self.num_output, self._k))]
        if self.bias_term:
            specs.append((self.bias_filler, (self.num_output,)))
        self.check_param_specs(len(specs))
        # Refuse before allocating: a num_output that cannot fit would raise MemoryError mid-setup (or
        # swap the machine to a halt). The fillers draw in float64 on the host, then cast to the dtype.
        count = sum(math.prod(s) for _, s in specs)
        need = count * (8 + ctx.dtype.itemsize)
        limit = memory_limit_bytes()
        if limit is not None and ctx.param_bytes + need > limit:
            raise self.error(f"num_output {self.num_output} x {self._k} inputs makes {count} parameters, "
                             f"{need / 2**30:.1f} GiB to set up (with the net's other parameters "
                             f"{(ctx.param_bytes + need) / 2**30:.1f} GiB), more than this machine's "
                             f"{limit / 2**30:.1f} GiB of memory", field=("inner_product_param", "num_output"))
        ctx.param_bytes += count * ctx.dtype.itemsize
        self.params = []
        for i, (filler, pshape) in enumerate(specs):
            spec = self.param_spec(i)
            data = xp.asarray(filler.sample(pshape, ctx.rng), dtype=ctx.dtype)
            self.params.append(Blob(f"{self.name}.{'wb'[i]}", xp, data,
                                    lr_mult=spec.lr_mult, decay_mult=spec.decay_mult))
        return [tuple(shape[:self._axis]) + (self.num_output,)]

    def _flat(self, x):
        lead = x.shape[:self._axis]
        if math.prod(x.shape[self._axis:]) != self._k:
            raise self.error(f"bottom {self.bottom[0]!r} has shape {tuple(x.shape)}: the axes from "
                             f"{self._axis} on must hold {self._k} values, as at set-up")
        return x.reshape(math.prod(lead), self._k), lead

    def forward(self, bottom, top):
        x2, lead = self._flat(bottom[0].data)
        y = x2 @ self.params[0].data.T
        if self.bias_term:
            y += self.params[1].data
        top[0].data = y.reshape(lead + (self.num_output,))

    def backward(self, top, propagate_down, bottom):
        x = bottom[0].data
        x2, _ = self._flat(x)
        dy = top[0].diff.reshape(x2.shape[0], self.num_output)
        self.params[0].diff = dy.T @ x2
        if self.bias_term:
            self.params[1].diff = dy.sum(axis=0)
        if not propagate_down[0]:
            return [None]
        return [(dy @ self.params[0].data).reshape(x.shape)]
