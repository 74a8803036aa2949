"""The layer graph (docs/graph.md §1): Caffe-style nets, loss weights summed on the device, solvers.

Public names: :class:`Net`, :class:`LossTerm`, :class:`Blob`, :class:`Layer`,
the layer types in :mod:`gpuloss.graph.layers`, the solvers (:class:`SGDSolver`,
:class:`AdamSolver`, :func:`solver_from_prototxt`) and the errors
:class:`GraphError` / :class:`PrototxtError`.
"""
from __future__ import annotations

from . import layers
from .blob import Blob
from .layer import GraphError, Layer, ParamSpec, StateRule
from .layers import Filler
from .net import LossTerm, Net
from .proto import PrototxtError
from .solver import AdamSolver, SGDSolver, Solver, SolverConfig, solver_from_prototxt

__all__ = ["Net", "LossTerm", "Blob", "Layer", "ParamSpec", "StateRule", "Filler", "layers",
           "Solver", "SGDSolver", "AdamSolver", "SolverConfig", "solver_from_prototxt",
           "GraphError", "PrototxtError"]
