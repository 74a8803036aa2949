"""The small immutable plans a backend receives (docs/design.md §1).

A plan holds everything a backend needs that is not array data: sizes,
dtypes, flags and scalar parameters, all checked already.  Backends never
look at user arguments directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._validate import Reduction, is_bfloat16


@dataclass(frozen=True)
class DtypePlan:
    """docs/api.md §3.1: 16-bit inputs compute and return the loss in float32; grad keeps the input dtype."""

    input: np.dtype
    compute: np.dtype
    loss: np.dtype

    @staticmethod
    def for_input(dtype) -> "DtypePlan":
        dtype = np.dtype(dtype)
        compute = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
        return DtypePlan(input=dtype, compute=compute, loss=compute)

    @property
    def is_16bit(self) -> bool:
        return self.input.itemsize == 2 or is_bfloat16(self.input)


@dataclass(frozen=True)
class ReducePlan:
    """How the weighted per-measurement losses L become the result."""

    reduction: Reduction
    loss_shape: tuple
    # Element i of the flattened loss has weight values[i // weight_block].
    weight_block: int

    @property
    def size(self) -> int:
        return math.prod(self.loss_shape)

    @property
    def batch(self) -> int:
        # Caffe's BATCH_SIZE divides by the outer dimension; a 0-d loss is one sample.
        return self.loss_shape[0] if self.loss_shape else 1


@dataclass(frozen=True)
class CrossEntropyPlan:
    """Softmax cross entropy over ``classes`` on one axis (docs/api.md §2.1).

    Logits are seen as ``[outer, classes, inner]`` (C-order); measurement
    ``n = o * inner + i`` owns the classes at ``o*classes*inner + c*inner + i``.
    """

    dtypes: DtypePlan
    reduce: ReducePlan
    outer: int
    classes: int
    inner: int
    index_target: bool
    has_class_weight: bool
    # None ignores no target value (a flag of its own: no int64 can stand for "nothing").
    ignore_index: int | None
    label_smoothing: float
    return_grad: bool
    validate: bool
    # docs/api.md: z_loss c adds c * lse^2 per measurement (PaLM); softcap s maps
    # x -> s * tanh(x / s) first (Gemma 2); 0.0 turns either off.
    z_loss: float = 0.0
    softcap: float = 0.0
    return_z_loss: bool = False

    @property
    def rows(self) -> int:
        return self.outer * self.inner


# The element-wise loss ids, the one table: gpuloss/backends/cpu.py and launch.py
# read it, kernels/losses.cuh's enum (kIdentity ... kHinge) is checked against it
# by tests/test_kernels.py. "identity" is weighted_reduce.
ELEMENTWISE_KIND = {"identity": 0, "sigmoid_cross_entropy": 1, "log_loss": 2, "mean_squared_error": 3,
                    "absolute_difference": 4, "huber": 5, "smooth_l1": 6, "hinge": 7}
ELEMENTWISE_LOSSES = tuple(name for name in ELEMENTWISE_KIND if name != "identity")


@dataclass(frozen=True)
class ElementwisePlan:
    """A loss of one element of pred and target (docs/api.md §2.2).

    ``param`` is the loss's one scalar: label_smoothing (sigmoid_cross_entropy),
    epsilon (log_loss), delta (huber), beta (smooth_l1); unused otherwise.
    ``pos_weight_period``: element i uses pos_weight[i % period] (0 = no pos_weight).
    """

    loss: str
    dtypes: DtypePlan
    reduce: ReducePlan
    param: float
    pos_weight_period: int
    return_grad: bool


@dataclass(frozen=True)
class CosinePlan:
    """``1 - sum(pred * target, axis)`` over rows of length ``length`` (docs/api.md §2.2), axis kept."""

    dtypes: DtypePlan
    reduce: ReducePlan
    outer: int
    length: int
    inner: int
    return_grad: bool

    @property
    def rows(self) -> int:
        return self.outer * self.inner


@dataclass(frozen=True)
class WeightedReducePlan:
    dtypes: DtypePlan
    reduce: ReducePlan


def split_axis(shape: tuple, axis: int) -> tuple[int, int, int]:
    """(outer, length, inner) of ``shape`` around ``axis`` in C order."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
