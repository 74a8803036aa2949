"""``Layer``: the contract every layer of the graph keeps (Caffe's ``Layer``, docs/graph.md §9).

A layer reads ``bottom`` blobs and writes ``top`` blobs, by name:

- ``setup(bottom_shapes, ctx) -> top_shapes`` checks the shapes it will see and
  creates its parameters (``self.params``, a list of :class:`Blob`);
- ``forward(bottom, top)`` writes each ``top[i].data``;
- ``backward(top, propagate_down, bottom)`` reads each ``top[i].diff``, writes
  the parameters' ``diff`` and returns one gradient per bottom (``None`` where
  ``propagate_down[i]`` is false). The net, not the layer, adds the gradients
  of a blob that feeds several layers, and handles in-place tops.

Loss weights follow Caffe (http://caffe.berkeleyvision.org/tutorial/loss.html):
a layer whose type ends in ``Loss`` weighs its first top 1 and any others 0;
every other layer weighs its tops 0; an explicit ``loss_weight`` (one per top)
overrides both.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Layer", "ParamSpec", "StateRule", "LayerContext", "LAYER_TYPES", "register_layer",
           "GraphError", "finite_number", "class_labels"]

# Caffe type name -> Layer subclass; filled by @register_layer in gpuloss.graph.layers.
LAYER_TYPES: dict[str, type] = {}


class GraphError(ValueError):
    """A net that cannot be built or run as written (names the layer and the blob).

    ``field`` (optional) names the prototxt field at fault, as a name or a path of
    ``(name, index)`` pairs, so that a reader of a prototxt can add the line number.
    """

    def __init__(self, message: str, *, field=None, layer: str | None = None):
        super().__init__(message)
        self.field = field
        self.layer = layer   # the layer whose field ``field`` is (None: a net or solver field)


def finite_number(value, what: str, *, error=GraphError, field=None) -> float:
    """``float(value)`` for a real, finite number (not a bool); else ``error`` naming ``what``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise error(f"{what} must be a real number, got {value!r}", field=field)
    v = float(value)
    if not math.isfinite(v):
        raise error(f"{what} must be a finite number, got {v}", field=field)
    return v


def register_layer(cls):
    LAYER_TYPES[cls.type] = cls
    return cls


@dataclass(frozen=True)
class ParamSpec:
    """Caffe's ``ParamSpec``: multipliers on the solver's learning rate and weight decay (finite numbers)."""
    lr_mult: float = 1.0
    decay_mult: float = 1.0

    def __post_init__(self):
        # A NaN or inf multiplier turns every update into NaN: refuse it where it is written.
        for name in ("lr_mult", "decay_mult"):
            object.__setattr__(self, name, finite_number(getattr(self, name), f"param {name}", field=name))


@dataclass(frozen=True)
class StateRule:
    """Caffe's ``NetStateRule``: a layer is kept when the net's state meets the rule."""
    phase: str | None = None
    min_level: int | None = None
    max_level: int | None = None
    stage: tuple = ()
    not_stage: tuple = ()

    def met_by(self, phase: str, level: int, stages: Iterable[str]) -> bool:
        stages = set(stages)
        return ((self.phase is None or self.phase == phase)
                and (self.min_level is None or level >= self.min_level)
                and (self.max_level is None or level <= self.max_level)
                and all(s in stages for s in self.stage)
                and not any(s in stages for s in self.not_stage))


@dataclass
class LayerContext:
    """What a layer needs from its net: the array module, dtypes, backend name and RNG."""
    xp: object
    dtype: object
    backend: str
    rng: object
    validate: bool = True
    param_bytes: int = 0    # bytes of parameters set up so far (checked against the memory limit)


def _as_names(value, what: str, layer: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    names = list(value)
    for n in names:
        if not isinstance(n, str) or not n:
            raise GraphError(f"layer {layer!r}: each {what} must be a non-empty blob name, got {n!r}")
    return names


def _as_rules(value, layer: str, what: str) -> list[StateRule]:
    rules = []
    for r in ([] if value is None else [value] if isinstance(value, (str, dict, StateRule)) else value):
        if isinstance(r, StateRule):
            rules.append(r)
        elif isinstance(r, str):
            rules.append(StateRule(phase=_phase(r, layer, what)))
        elif isinstance(r, dict):
            r = dict(r)
            if "phase" in r and r["phase"] is not None:
                r["phase"] = _phase(r["phase"], layer, what)
            r["stage"] = tuple(r.get("stage", ()))
            r["not_stage"] = tuple(r.get("not_stage", ()))
            rules.append(StateRule(**r))
        else:
            raise GraphError(f"layer {layer!r}: {what} must be phase names, dicts or StateRule, got {r!r}")
    return rules


def _phase(value, layer: str, what: str) -> str:
    p = str(value).upper()
    if p not in ("TRAIN", "TEST"):
        raise GraphError(f"layer {layer!r}: {what} phase must be 'TRAIN' or 'TEST', got {value!r}")
    return p


class Layer:
    """Base class; subclasses set ``type`` and the bottom/top counts and implement the passes.

    Parameters common to every layer (Caffe's ``LayerParameter``): ``name``,
    ``bottom``, ``top`` (a name or a list of names), ``loss_weight`` (a number,
    or one per top), ``param`` (a list of :class:`ParamSpec` or dicts with
    ``lr_mult`` / ``decay_mult``, one per parameter blob), ``propagate_down``
    (one bool per bottom), ``include`` / ``exclude`` (phase names, dicts or
    :class:`StateRule`).
    """

    type: str = ""
    num_bottoms: tuple[int, int] = (0, 0)   # (min, max)
    num_tops: tuple[int, int] = (1, 1)
    # The *_param fields of Caffe's LayerParameter this type reads; any other one present is an error.
    proto_params: tuple[str, ...] = ()

    def __init__(self, name: str, bottom=None, top=None, *, loss_weight=None, param=None,
                 propagate_down=None, include=None, exclude=None):
        if not isinstance(name, str) or not name:
            raise GraphError(f"a {self.type or type(self).__name__} layer needs a non-empty name, got {name!r}")
        self.name = name
        self.bottom = _as_names(bottom, "bottom", name)
        self.top = _as_names(top, "top", name)
        lo, hi = self.num_bottoms
        if not lo <= len(self.bottom) <= hi:
            raise GraphError(f"layer {name!r} ({self.type}) takes {_count(lo, hi)} bottom blob(s), "
                             f"got {len(self.bottom)}: {self.bottom}")
        lo, hi = self.num_tops
        if not lo <= len(self.top) <= hi:
            raise GraphError(f"layer {name!r} ({self.type}) makes {_count(lo, hi)} top blob(s), "
                             f"got {len(self.top)}: {self.top}")
        if len(set(self.top)) != len(self.top):
            raise GraphError(f"layer {name!r}: top blob names repeat: {self.top}")
        if loss_weight is not None:
            lw = [loss_weight] if isinstance(loss_weight, numbers.Real) else list(loss_weight)
            lw = [finite_number(w, f"layer {name!r}: loss_weight", field=("loss_weight", k))
                  for k, w in enumerate(lw)]
            if len(lw) != len(self.top):  # Caffe: "loss_weight must be unspecified or specified once per top"
                raise GraphError(f"layer {name!r}: loss_weight must be given once per top blob "
                                 f"({len(self.top)}: {self.top}), got {len(lw)}: {lw}")
            self._loss_weight = lw
        else:
            self._loss_weight = None
        self.param_specs = []
        for i, p in enumerate(param or []):
            try:
                self.param_specs.append(p if isinstance(p, ParamSpec) else ParamSpec(**p))
            except GraphError as exc:
                raise GraphError(f"layer {name!r}: param {i}: {exc}", field=("param", i, exc.field)) from None
        if propagate_down is not None:
            propagate_down = [bool(p) for p in propagate_down]
            if len(propagate_down) != len(self.bottom):
                raise GraphError(f"layer {name!r}: propagate_down must be given once per bottom blob "
                                 f"({len(self.bottom)}), got {len(propagate_down)}")
        self.explicit_propagate_down = propagate_down
        self.include = _as_rules(include, name, "include")
        self.exclude = _as_rules(exclude, name, "exclude")
        if self.include and self.exclude:
            raise GraphError(f"layer {name!r}: give include rules or exclude rules, not both (Caffe's rule)")
        self.params: list = []
        self.ctx: LayerContext | None = None

    # -- what the net asks -------------------------------------------------------------------

    @property
    def is_loss(self) -> bool:
        return self.type.endswith("Loss")

    @property
    def loss_weights(self) -> list[float]:
        """Caffe's rule: explicit ``loss_weight`` per top, else 1 on a Loss layer's first top, else 0."""
        if self._loss_weight is not None:
            return list(self._loss_weight)
        return [1.0 if (self.is_loss and i == 0) else 0.0 for i in range(len(self.top))]

    def included_in(self, phase: str, level: int = 0, stages: Sequence[str] = ()) -> bool:
        """Caffe's include/exclude: kept if any include rule is met (or none given) and no exclude rule is."""
        if self.include:
            return any(r.met_by(phase, level, stages) for r in self.include)
        return not any(r.met_by(phase, level, stages) for r in self.exclude)

    def differentiable(self, bottom_index: int) -> bool:
        """Whether a gradient can flow to this bottom (False for labels: Caffe's AllowForceBackward)."""
        return True

    def example_input(self, bottom_index: int, shape: tuple, rng):
        """A NumPy array valid as this bottom (labels in range), for ``gpuloss time``; None: any floats."""
        return None

    # -- the contract ------------------------------------------------------------------------

    def setup(self, bottom_shapes: list[tuple], ctx: LayerContext) -> list[tuple]:
        raise NotImplementedError

    def forward(self, bottom: list, top: list) -> None:
        raise NotImplementedError

    def backward(self, top: list, propagate_down: list[bool], bottom: list) -> list:
        return [None] * len(bottom)

    # -- helpers -------------------------------------------------------------------------------

    def error(self, message: str, field=None) -> GraphError:
        return GraphError(f"layer {self.name!r} ({self.type}): {message}", field=field, layer=self.name)

    def param_spec(self, i: int) -> ParamSpec:
        return self.param_specs[i] if i < len(self.param_specs) else ParamSpec()

    def check_param_specs(self, num_params: int) -> None:
        if len(self.param_specs) > num_params:
            raise self.error(f"has {len(self.param_specs)} param {{ }} entries but only {num_params} "
                             f"parameter blob(s)")

    @classmethod
    def kwargs_from_proto(cls, lp) -> dict:
        """The layer-specific constructor arguments read from a Caffe ``LayerParameter``."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, bottom={self.bottom}, top={self.top})"


def _count(lo: int, hi: int) -> str:
    if lo == hi:
        return str(lo)
    return f"{lo} to {hi}" if hi < 1 << 30 else f"at least {lo}"


def normalize_axis(layer: Layer, axis: int, ndim: int, what: str = "axis") -> int:
    """Caffe's ``CanonicalAxisIndex``: negative counts from the end; out of range names the layer."""
    if not -ndim <= axis < ndim:
        raise layer.error(f"{what} {axis} is out of range for a bottom of rank {ndim}")
    return axis % ndim


def class_labels(layer: Layer, label, xp, classes: int, ignore_label, validate: bool):
    """``label`` as int64 class indices, for a layer that reads bottom 1 as labels.

    Integer labels are cast as they are (their range is checked by the caller or
    the functional API). A float label is a class index only when it is finite,
    integral and in ``[0, classes)`` (or equal to ``ignore_label``); when the net
    validates, anything else is an error naming the layer, the bottom and the
    first bad value, because a cast would turn NaN, inf or 1e30 into an
    arbitrary integer that may even look valid. On a GPU, where validation is
    off (it would read the labels back), the cast is done as it is.
    """
    kind = label.dtype.kind
    if kind in "iu":
        return label.astype(xp.int64, copy=False)
    if kind == "b":
        return label.astype(xp.int64)
    if kind != "f":
        raise layer.error(f"label {layer.bottom[1]!r} must hold class indices (integers, or integral "
                          f"floats), got dtype {label.dtype}")
    if validate:
        ok = xp.isfinite(label) & (xp.floor(label) == label) & (label >= 0) & (label < classes)
        if ignore_label is not None:
            ok |= label == ignore_label
        if not bool(ok.all()):
            flat = label.reshape(-1)
            n = int(xp.argmin(ok.reshape(-1)))
            value = float(flat[n])
            why = ("not a finite number" if not math.isfinite(value) else
                   "not an integer" if value != math.floor(value) else f"outside [0, {classes})")
            raise layer.error(f"label {layer.bottom[1]!r} holds {value!r} at flat position {n}: {why}; "
                              f"float labels must be exact class indices")
    return label.astype(xp.int64)
