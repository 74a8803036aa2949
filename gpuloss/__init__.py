"""gpuloss: training losses as hand-written CUDA kernels, with Numba twins for the CPU.

The public names are the loss functions of docs/api.md §2, ``Reduction``, the float64
oracle ``reference`` and the layer graph (``Net``, solvers).
"""
from __future__ import annotations

from . import reference
from ._validate import Reduction
from .linear import linear_cross_entropy
from .losses import (absolute_difference, cosine_distance, huber, hinge, log_loss, mean_squared_error,
                     sigmoid_cross_entropy, smooth_l1, softmax_cross_entropy, weighted_reduce)
from .graph import (AdamSolver, GraphError, LossTerm, Net, PrototxtError, SGDSolver, Solver, SolverConfig,
                    solver_from_prototxt)

__version__ = "0.1.0"

__all__ = ["Reduction", "reference", "softmax_cross_entropy", "linear_cross_entropy", "sigmoid_cross_entropy", "log_loss",
           "mean_squared_error", "absolute_difference", "huber", "smooth_l1", "hinge", "cosine_distance",
           "weighted_reduce", "Net", "LossTerm", "Solver", "SGDSolver", "AdamSolver", "SolverConfig",
           "solver_from_prototxt", "GraphError", "PrototxtError", "__version__"]
