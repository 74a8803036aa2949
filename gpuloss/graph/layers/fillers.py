"""Caffe's weight fillers (``FillerParameter``): constant, uniform, gaussian, xavier, msra.

Values are drawn on the host with NumPy's ``Generator`` in float64 and then
cast and moved to the device once, at set-up: the same seed gives the same
initial net on every backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..layer import GraphError, finite_number

__all__ = ["Filler"]

_TYPES = ("constant", "uniform", "gaussian", "xavier", "msra")
_NORMS = ("FAN_IN", "FAN_OUT", "AVERAGE")


@dataclass(frozen=True)
class Filler:
    """One of Caffe's fillers, with the fields of its ``FillerParameter`` and their defaults."""
    type: str = "constant"
    value: float = 0.0
    min: float = 0.0
    max: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    variance_norm: str = "FAN_IN"

    def __post_init__(self):
        # NaN/inf values would fill the net with NaN before the first step: refuse them here.
        for name in ("value", "min", "max", "mean", "std"):
            object.__setattr__(self, name, finite_number(getattr(self, name), f"filler {name}", field=name))
        if self.std < 0:
            raise GraphError(f"filler std must be >= 0, got {self.std}", field="std")
        if self.type == "uniform" and self.min > self.max:
            raise GraphError(f"uniform filler needs min <= max, got min {self.min} > max {self.max}", field="min")
        if self.type not in _TYPES:
            raise GraphError(f"filler type must be one of {_TYPES}, got {self.type!r}")
        if self.variance_norm not in _NORMS:
            raise GraphError(f"filler variance_norm must be one of {_NORMS}, got {self.variance_norm!r}")

    @classmethod
    def from_proto(cls, fp, where: str, field=()) -> "Filler":
        """``field``: the path of this filler in its layer, so that errors can name the line."""
        if fp.sparse != -1:
            raise GraphError(f"{where}: filler field 'sparse' is not supported", field=(*field, "sparse"))
        if fp.type not in _TYPES:
            raise GraphError(f"{where}: filler type {fp.type!r} is not supported (gpuloss has {_TYPES})",
                             field=(*field, "type"))
        try:
            return cls(type=fp.type, value=fp.value, min=fp.min, max=fp.max, mean=fp.mean, std=fp.std,
                       variance_norm=_NORMS[fp.variance_norm])
        except GraphError as exc:
            raise GraphError(f"{where}: {exc}", field=(*field, exc.field or "type")) from None

    def sample(self, shape: tuple, rng: np.random.Generator) -> np.ndarray:
        """Float64 values of ``shape``; fan-in/out as Caffe: count/shape[0] and count/shape[1]."""
        if self.type == "constant":
            return np.full(shape, self.value, dtype=np.float64)
        if self.type == "uniform":
            return rng.uniform(self.min, self.max, size=shape)
        if self.type == "gaussian":
            return rng.normal(self.mean, self.std, size=shape)
        count = int(np.prod(shape))
        fan_in = count / shape[0] if len(shape) > 0 and shape[0] else 1.0
        fan_out = count / shape[1] if len(shape) > 1 and shape[1] else 1.0
        n = {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2}[self.variance_norm]
        if not n > 0:   # an empty blob (a dimension 0) has no fan: 3/n would divide by zero
            raise GraphError(f"{self.type} filler needs a parameter shape without zero dimensions, got {shape}")
        if self.type == "xavier":  # Glorot & Bengio 2010 as Caffe's XavierFiller: U(-a, a), a = sqrt(3/n)
            a = np.sqrt(3.0 / n)
            return rng.uniform(-a, a, size=shape)
        # msra: He et al. 2015 as Caffe's MSRAFiller: N(0, 2/n)
        return rng.normal(0.0, np.sqrt(2.0 / n), size=shape)
