"""Solvers: Caffe's SGD (momentum, weight decay) and Adam, updating parameters on the device.

Each update is one fused element-wise pass per parameter blob: a Numba kernel
over NumPy arrays (``cpu`` / ``emulated`` backends) and the same arithmetic as
in-place ``xp`` operations for other array modules (CuPy). The learning rate is
a host number computed from the iteration count, as in Caffe, so nothing is
read back from the device.

Update rules, as Caffe's ``SGDSolver`` / ``AdamSolver`` (``sgd_solver.cpp``,
``adam_solver.cpp``) with ``local_rate = rate * lr_mult`` and
``local_decay = weight_decay * decay_mult``:

- regularise: ``g = diff + local_decay * data`` (L2) or ``+ local_decay * sign(data)`` (L1)
- SGD: ``h = momentum * h + local_rate * g``; ``data -= h``
- Adam (Kingma & Ba 2014, Caffe's form): ``m = b1 m + (1-b1) g``,
  ``v = b2 v + (1-b2) g**2``, ``data -= local_rate * sqrt(1-b2**t)/(1-b1**t) * m / (sqrt(v) + delta)``
  with ``t = iter + 1``, ``b1 = momentum``, ``b2 = momentum2``.

Learning-rate policies follow caffe.proto's comment on ``lr_policy``: fixed,
step, exp, inv, multistep, poly, sigmoid.
"""
from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass, fields

import numpy as np
from numba import njit

from . import proto
from .layer import GraphError

__all__ = ["SolverConfig", "Solver", "SGDSolver", "AdamSolver", "solver_from_prototxt", "make_solver",
           "LR_POLICIES"]

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


@dataclass
class SolverConfig:
    """The fields of Caffe's ``SolverParameter`` that gpuloss reads, with Caffe's defaults."""
    base_lr: float = 0.01
    lr_policy: str = "fixed"
    gamma: float = 0.0
    power: float = 0.0
    stepsize: int = 0
    stepvalue: tuple = ()
    momentum: float = 0.0
    momentum2: float = 0.999
    delta: float = 1e-8
    weight_decay: float = 0.0
    regularization_type: str = "L2"
    max_iter: int = 0
    test_iter: tuple = ()
    test_interval: int = 0
    test_initialization: bool = True
    display: int = 0
    average_loss: int = 1
    snapshot: int = 0
    snapshot_prefix: str = ""
    snapshot_after_train: bool = True
    type: str = "SGD"
    random_seed: int = -1
    net: str | None = None

    def __post_init__(self):
        if self.lr_policy not in LR_POLICIES:
            raise GraphError(f"lr_policy must be one of {LR_POLICIES}, got {self.lr_policy!r}")
        if self.type not in _SOLVERS:
            raise GraphError(f"solver type must be one of {tuple(_SOLVERS)}, got {self.type!r}")
        if self.regularization_type not in ("L1", "L2"):
            raise GraphError(f"regularization_type must be 'L1' or 'L2', got {self.regularization_type!r}")
        need = {"step": ("gamma", "stepsize"), "exp": ("gamma",), "inv": ("gamma", "power"),
                "multistep": ("gamma", "stepvalue"), "poly": ("power", "max_iter"),
                "sigmoid": ("gamma", "stepsize")}.get(self.lr_policy, ())
        for name in need:
            if not getattr(self, name) and name not in ("power",):
                raise GraphError(f"lr_policy {self.lr_policy!r} needs {name} (got {getattr(self, name)!r})")
        self.stepvalue = tuple(int(s) for s in self.stepvalue)
        self.test_iter = tuple(int(s) for s in self.test_iter)

    @classmethod
    def from_prototxt(cls, text_or_path) -> "SolverConfig":
        """Read a Caffe solver prototxt; a relative ``net`` path is resolved against the current
        directory (Caffe's rule) and, failing that, the solver file's directory."""
        msg, source = proto.parse_solver(text_or_path)
        try:
            return cls.from_proto(msg, base_dir=os.path.dirname(source) if source != "<string>" else None)
        except GraphError as exc:
            raise GraphError(f"{source}: {exc}") from None

    @classmethod
    def from_proto(cls, msg, base_dir: str | None = None) -> "SolverConfig":
        for name, ok in (("iter_size", msg.iter_size == 1), ("clip_gradients", msg.clip_gradients < 0),
                         ("train_net", not msg.train_net), ("test_net", not msg.test_net),
                         ("net_param", not msg.HasField("net_param"))):
            if not ok:
                raise GraphError(f"solver field {name!r} is not supported")
        kw = {}
        for f in fields(cls):
            if f.name in ("net", "type"):
                continue
            if f.name in ("stepvalue", "test_iter"):
                kw[f.name] = tuple(getattr(msg, f.name))
            elif msg.HasField(f.name):
                kw[f.name] = getattr(msg, f.name)
        if not msg.HasField("base_lr"):
            raise GraphError("solver needs base_lr")
        if msg.HasField("type"):
            kw["type"] = {"sgd": "SGD", "adam": "Adam"}.get(msg.type.lower(), msg.type)
        elif msg.HasField("solver_type"):
            legacy = {0: "SGD", 5: "Adam"}
            if msg.solver_type not in legacy:
                raise GraphError(f"solver_type {msg.solver_type} is not supported (SGD, ADAM)")
            kw["type"] = legacy[msg.solver_type]
        if msg.HasField("net"):
            path = msg.net
            if not os.path.isabs(path) and not os.path.exists(path) and base_dir:
                candidate = os.path.join(base_dir, path)
                if os.path.exists(candidate):
                    path = candidate
            kw["net"] = path
        return cls(**kw)


def learning_rate(cfg: SolverConfig, it: int) -> float:
    """Caffe's ``SGDSolver::GetLearningRate`` at iteration ``it``."""
    p, base = cfg.lr_policy, cfg.base_lr
    if p == "fixed":
        return base
    if p == "step":
        return base * cfg.gamma ** (it // cfg.stepsize)
    if p == "exp":
        return base * cfg.gamma ** it
    if p == "inv":
        return base * (1.0 + cfg.gamma * it) ** (-cfg.power)
    if p == "multistep":  # the number of step values passed, as Caffe's current_step_
        return base * cfg.gamma ** bisect.bisect_right(sorted(cfg.stepvalue), it)
    if p == "poly":
        return base * (1.0 - it / cfg.max_iter) ** cfg.power
    return base / (1.0 + math.exp(-cfg.gamma * (it - cfg.stepsize)))   # sigmoid


# -- fused update kernels (cpu backend): one pass over data, diff and state per parameter ----------

@njit(cache=True)
def _sgd_kernel(data, diff, hist, rate, momentum, decay, l1):
    for i in range(data.size):
        w = data[i]
        reg = (np.sign(w) if l1 else w) * decay
        h = momentum * hist[i] + rate * (diff[i] + reg)
        hist[i] = h
        data[i] = w - h


@njit(cache=True)
def _adam_kernel(data, diff, m, v, rate, beta1, beta2, delta, decay, l1):
    one = data.dtype.type(1)
    for i in range(data.size):
        w = data[i]
        g = diff[i] + (np.sign(w) if l1 else w) * decay
        mi = beta1 * m[i] + (one - beta1) * g
        vi = beta2 * v[i] + (one - beta2) * g * g
        m[i] = mi
        v[i] = vi
        data[i] = w - rate * mi / (np.sqrt(vi) + delta)


def _flat(a):
    return a.reshape(-1)


class Solver:
    """Base: holds the net, the iteration count and per-parameter state; ``step`` trains one batch."""

    type = ""
    state_names: tuple[str, ...] = ()

    def __init__(self, net, config: SolverConfig | None = None, test_net=None, **overrides):
        cfg = config or SolverConfig(type=self.type)
        if overrides:
            cfg = SolverConfig(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, **overrides})
        self.config, self.net, self.test_net = cfg, net, test_net
        self.iter = 0
        self.params = net.learnable_params
        xp = net.xp
        self.state = {name: [xp.zeros_like(p.data) for p in self.params] for name in self.state_names}
        # Numba for NumPy arrays; the same arithmetic in xp operations elsewhere (CuPy).
        self.use_numba = xp is np

    def learning_rate(self, it: int | None = None) -> float:
        return learning_rate(self.config, self.iter if it is None else it)

    def step(self, inputs: dict):
        """One iteration: forward (returns the 0-d total loss), backward, update; ``iter += 1``."""
        loss = self.net.forward(**inputs)
        self.net.backward()
        self.apply_update()
        self.iter += 1
        return loss

    def apply_update(self) -> None:
        rate = self.learning_rate()
        cfg = self.config
        for k, p in enumerate(self.params):
            if p.lr_mult == 0:
                continue
            self._update(k, p, rate * p.lr_mult, cfg.weight_decay * p.decay_mult,
                         cfg.regularization_type == "L1")

    def _update(self, k, p, rate, decay, l1):
        raise NotImplementedError

    # -- snapshots: parameters and solver state in one .npz ----------------------------------------

    def snapshot(self, path: str | os.PathLike | None = None) -> str:
        """Save parameters, solver state and iteration to ``path`` (default ``<prefix>_iter_<n>.npz``)."""
        if path is None:
            path = f"{self.config.snapshot_prefix or 'gpuloss'}_iter_{self.iter}.npz"
        path = os.fspath(path)
        arrays = {"iter": np.asarray(self.iter), "solver_type": np.asarray(self.type)}
        for layer, ps in self.net.params.items():
            for i, p in enumerate(ps):
                arrays[f"param/{layer}/{i}"] = _host(p.data)
        names = self._param_names()
        for sname, arrs in self.state.items():
            for n, a in zip(names, arrs):
                arrays[f"state/{sname}/{n}"] = _host(a)
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    def restore(self, path: str | os.PathLike) -> None:
        """Load a snapshot written by :meth:`snapshot` into this solver and its net, in place."""
        xp = self.net.xp
        with np.load(os.fspath(path), allow_pickle=False) as z:
            if str(z["solver_type"]) != self.type:
                raise GraphError(f"snapshot {os.fspath(path)!r} is of a {z['solver_type']} solver, not {self.type}")
            targets = [(f"param/{layer}/{i}", p.data) for layer, ps in self.net.params.items()
                       for i, p in enumerate(ps)]
            names = self._param_names()
            targets += [(f"state/{s}/{n}", a) for s, arrs in self.state.items() for n, a in zip(names, arrs)]
            missing = [k for k, _ in targets if k not in z.files]
            if missing:
                raise GraphError(f"snapshot {os.fspath(path)!r} lacks {missing[:3]}: not made from this net")
            for key, dst in targets:
                src = z[key]
                if src.shape != dst.shape:
                    raise GraphError(f"snapshot {os.fspath(path)!r}: {key} has shape {src.shape}, the net "
                                     f"has {tuple(dst.shape)}")
                dst[...] = xp.asarray(src, dtype=dst.dtype)   # in place: shared nets see it too
            self.iter = int(z["iter"])

    def _param_names(self) -> list[str]:
        return [f"{layer}/{i}" for layer, ps in self.net.params.items() for i in range(len(ps))]


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


class SGDSolver(Solver):
    """Caffe's SGD with momentum and weight decay (``type: "SGD"``)."""

    type = "SGD"
    state_names = ("history",)

    def _update(self, k, p, rate, decay, l1):
        h = self.state["history"][k]
        dt = p.data.dtype.type
        if self.use_numba:
            _sgd_kernel(_flat(p.data), _flat(p.diff), _flat(h), dt(rate), dt(self.config.momentum),
                        dt(decay), l1)
            return
        xp = self.net.xp
        g = p.diff + (xp.sign(p.data) if l1 else p.data) * dt(decay)
        h *= dt(self.config.momentum)
        h += dt(rate) * g
        p.data -= h


class AdamSolver(Solver):
    """Caffe's Adam (``type: "Adam"``): ``momentum`` is beta1, ``momentum2`` beta2, ``delta`` epsilon."""

    type = "Adam"
    state_names = ("m", "v")

    def _update(self, k, p, rate, decay, l1):
        cfg = self.config
        t = self.iter + 1
        rate_t = rate * math.sqrt(1.0 - cfg.momentum2 ** t) / (1.0 - cfg.momentum ** t)
        m, v = self.state["m"][k], self.state["v"][k]
        dt = p.data.dtype.type
        if self.use_numba:
            _adam_kernel(_flat(p.data), _flat(p.diff), _flat(m), _flat(v), dt(rate_t), dt(cfg.momentum),
                         dt(cfg.momentum2), dt(cfg.delta), dt(decay), l1)
            return
        xp = self.net.xp
        g = p.diff + (xp.sign(p.data) if l1 else p.data) * dt(decay)
        m *= dt(cfg.momentum)
        m += (dt(1) - dt(cfg.momentum)) * g
        v *= dt(cfg.momentum2)
        v += (dt(1) - dt(cfg.momentum2)) * g * g
        p.data -= dt(rate_t) * m / (xp.sqrt(v) + dt(cfg.delta))


_SOLVERS = {"SGD": SGDSolver, "Adam": AdamSolver}


def make_solver(net, config: SolverConfig, test_net=None) -> Solver:
    """The solver ``config.type`` names, over ``net``."""
    return _SOLVERS[config.type](net, config, test_net=test_net)


def solver_from_prototxt(text_or_path, net=None, *, backend: str = "auto", dtype=np.float32) -> Solver:
    """A solver from a Caffe solver prototxt; builds the TRAIN net (and a TEST net sharing its
    parameters) from its ``net`` field unless ``net`` is given. ``random_seed`` seeds the fillers."""
    from .net import Net
    cfg = SolverConfig.from_prototxt(text_or_path)
    test_net = None
    if net is None:
        if not cfg.net:
            raise GraphError("the solver names no net (field 'net') and none was given")
        seed = cfg.random_seed if cfg.random_seed >= 0 else 0
        net = Net.from_prototxt(cfg.net, phase="TRAIN", backend=backend, dtype=dtype, seed=seed)
        test_net = Net.from_prototxt(cfg.net, phase="TEST", backend=backend, dtype=dtype, seed=seed)
        test_net.share_params_from(net)
    return make_solver(net, cfg, test_net=test_net)
