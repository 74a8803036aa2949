"""The layer types of the graph, registered by their Caffe type names (docs/graph.md §3).

``layer_from_proto`` turns one Caffe ``LayerParameter`` message into a layer
object, reading the fields every layer shares here and the layer's own
``*_param`` through its ``kwargs_from_proto``.
"""
from __future__ import annotations

from ..layer import LAYER_TYPES, GraphError, Layer, ParamSpec, StateRule
from .accuracy import Accuracy
from .activation import ReLU, Sigmoid, Softmax, TanH
from .data import Input
from .fillers import Filler
from .inner_product import InnerProduct
from .loss import (NORMALIZATION_TO_REDUCTION, EuclideanLoss, SigmoidCrossEntropyLoss, SmoothL1Loss,
                   SoftmaxWithLoss)

__all__ = ["Input", "InnerProduct", "ReLU", "Sigmoid", "TanH", "Softmax", "SoftmaxWithLoss",
           "SigmoidCrossEntropyLoss", "EuclideanLoss", "SmoothL1Loss", "Accuracy", "Filler",
           "LAYER_TYPES", "NORMALIZATION_TO_REDUCTION", "layer_from_proto"]

_PHASES = ("TRAIN", "TEST")


def _rule(r) -> StateRule:
    return StateRule(phase=_PHASES[r.phase] if r.HasField("phase") else None,
                     min_level=r.min_level if r.HasField("min_level") else None,
                     max_level=r.max_level if r.HasField("max_level") else None,
                     stage=tuple(r.stage), not_stage=tuple(r.not_stage))


def layer_from_proto(lp) -> Layer:
    """The layer a Caffe ``LayerParameter`` describes; unsupported types and fields name the layer."""
    name = lp.name or "<unnamed>"
    if not lp.name:
        raise GraphError(f"a layer of type {lp.type!r} has no name (Caffe's 'name' field)")
    if not lp.type:
        raise GraphError(f"layer {name!r} has no type")
    cls = LAYER_TYPES.get(lp.type)
    if cls is None:
        raise GraphError(f"layer {name!r}: unsupported layer type {lp.type!r}; gpuloss implements "
                         f"{', '.join(sorted(LAYER_TYPES))}")
    for field, _ in lp.ListFields():
        if field.name.endswith("_param") and field.name not in cls.proto_params:
            raise GraphError(f"layer {name!r} ({lp.type}): field {field.name!r} is not read by {lp.type} "
                             f"layers (they read {', '.join(cls.proto_params) or 'no *_param'})")
    for i, p in enumerate(lp.param):
        if p.name or p.HasField("share_mode"):
            raise GraphError(f"layer {name!r}: param {i} field 'name'/'share_mode' (weight sharing) "
                             f"is not supported")
    common = {
        "loss_weight": list(lp.loss_weight) if len(lp.loss_weight) else None,
        "param": [ParamSpec(lr_mult=p.lr_mult, decay_mult=p.decay_mult) for p in lp.param],
        "propagate_down": list(lp.propagate_down) if len(lp.propagate_down) else None,
        "include": [_rule(r) for r in lp.include],
        "exclude": [_rule(r) for r in lp.exclude],
    }
    return cls(lp.name, list(lp.bottom), list(lp.top), **cls.kwargs_from_proto(lp), **common)
