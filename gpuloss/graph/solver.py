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
import hashlib
import math
import numbers
import os
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from numba import njit

from . import proto
from .._atomic import write_atomically
from .layer import GraphError, finite_number

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
        # Every numeric field is checked generically by its declared type, then the ranges one by one.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float":
                setattr(self, f.name, finite_number(value, f.name, field=f.name))
            elif f.type == "int":
                setattr(self, f.name, _integer(value, f.name))
            elif f.type == "tuple":
                setattr(self, f.name, tuple(_integer(v, f.name, k) for k, v in enumerate(value)))
        if self.lr_policy not in LR_POLICIES:
            raise GraphError(f"lr_policy must be one of {LR_POLICIES}, got {self.lr_policy!r}", field="lr_policy")
        if self.type not in _SOLVERS:
            raise GraphError(f"solver type must be one of {tuple(_SOLVERS)}, got {self.type!r}", field="type")
        if self.regularization_type not in ("L1", "L2"):
            raise GraphError(f"regularization_type must be 'L1' or 'L2', got {self.regularization_type!r}",
                             field="regularization_type")
        _at_least(self, "base_lr", 0.0)             # a negative rate climbs the loss
        _at_least(self, "weight_decay", 0.0)        # a negative decay grows the weights without bound
        for name in ("momentum", "momentum2"):      # 1 never forgets (Adam divides by 1 - momentum**t)
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise GraphError(f"{name} must be in [0, 1), got {v}", field=name)
        if not self.delta > 0:
            raise GraphError(f"delta must be > 0 (Adam divides by sqrt(v) + delta), got {self.delta}",
                             field="delta")
        for name in ("stepsize", "max_iter", "test_interval", "display", "snapshot"):
            _at_least(self, name, 0)
        _at_least(self, "average_loss", 1)
        for name in ("stepvalue", "test_iter"):
            for k, v in enumerate(getattr(self, name)):
                if v < 0:
                    raise GraphError(f"{name} must be >= 0, got {v}", field=(name, k))
        need = {"step": ("gamma", "stepsize"), "exp": ("gamma",), "inv": ("gamma", "power"),
                "multistep": ("gamma", "stepvalue"), "poly": ("power", "max_iter"),
                "sigmoid": ("gamma", "stepsize")}.get(self.lr_policy, ())
        for name in need:
            if not getattr(self, name) and name not in ("power",):
                raise GraphError(f"lr_policy {self.lr_policy!r} needs {name} (got {getattr(self, name)!r})",
                                 field=name)
        if self.lr_policy in ("step", "exp", "multistep", "inv") and self.gamma < 0:
            # step/exp/multistep: gamma**k changes sign; inv: 1 + gamma*it goes negative (a complex rate)
            raise GraphError(f"lr_policy {self.lr_policy!r} needs gamma >= 0, got {self.gamma}", field="gamma")
        if self.lr_policy == "poly" and self.power < 0:
            raise GraphError(f"lr_policy 'poly' needs power >= 0 (0 ** power at max_iter), got {self.power}",
                             field="power")
        # Every policy is monotonic in the iteration, so the ends of the run bound the rate.
        ends = (0, self.max_iter) if self.max_iter else (0,)
        if self.lr_policy == "sigmoid":
            for it in ends:
                if -self.gamma * (it - self.stepsize) > _EXP_MAX:
                    raise GraphError(f"lr_policy 'sigmoid' with gamma {self.gamma} and stepsize {self.stepsize} "
                                     f"overflows exp(-gamma * (iter - stepsize)) at iteration {it}: the rate "
                                     f"would be 0", field="gamma")
        for it in ends:
            rate = learning_rate(self, it)
            if not math.isfinite(rate):
                field = {"poly": "power", "fixed": "base_lr"}.get(self.lr_policy, "gamma")
                raise GraphError(f"lr_policy {self.lr_policy!r} gives learning rate {rate} at iteration {it} "
                                 f"(base_lr {self.base_lr}, gamma {self.gamma}, power {self.power})", field=field)

    @classmethod
    def from_prototxt(cls, text_or_path) -> "SolverConfig":
        """Read a Caffe solver prototxt; a relative ``net`` path is resolved against the current
        directory (Caffe's rule) and, failing that, the solver file's directory."""
        msg, source, text = proto.parse_solver(text_or_path, with_text=True)
        try:
            return cls.from_proto(msg, base_dir=os.path.dirname(source) if source != "<string>" else None)
        except GraphError as exc:
            where = proto.locate(text, source, exc.field) if exc.field else source
            raise proto.FieldError(f"{where}: field {proto.field_path(exc.field)[0][0]!r}: {exc}"
                                   if exc.field else f"{where}: {exc}", field=exc.field) from None

    @classmethod
    def from_proto(cls, msg, base_dir: str | None = None) -> "SolverConfig":
        for name, ok in (("iter_size", msg.iter_size == 1), ("clip_gradients", msg.clip_gradients < 0),
                         ("train_net", not msg.train_net), ("test_net", not msg.test_net),
                         ("net_param", not msg.HasField("net_param"))):
            if not ok:
                raise GraphError(f"solver field {name!r} is not supported", field=name)
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
        if msg.HasField("solver_mode") or msg.HasField("device_id"):
            pass   # Caffe's CPU/GPU switch: gpuloss picks the device by --backend instead
        if msg.HasField("type"):
            kw["type"] = {"sgd": "SGD", "adam": "Adam"}.get(msg.type.lower(), msg.type)
        elif msg.HasField("solver_type"):
            legacy = {0: "SGD", 5: "Adam"}
            if msg.solver_type not in legacy:
                raise GraphError(f"solver_type {msg.solver_type} is not supported (SGD, ADAM)", field="solver_type")
            kw["type"] = legacy[msg.solver_type]
        if msg.HasField("net"):
            path = msg.net
            if not os.path.isabs(path) and not os.path.exists(path) and base_dir:
                candidate = os.path.join(base_dir, path)
                if os.path.exists(candidate):
                    path = candidate
            kw["net"] = path
        return cls(**kw)


_EXP_MAX = math.log(np.finfo(np.float64).max)   # math.exp overflows above this


def _integer(value, name: str, index: int | None = None) -> int:
    field = name if index is None else (name, index)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise GraphError(f"{name} must be an integer, got {value!r}", field=field)
    return int(value)


def _at_least(cfg, name: str, low) -> None:
    v = getattr(cfg, name)
    if v < low:
        raise GraphError(f"{name} must be >= {low}, got {v}", field=name)


def learning_rate(cfg: SolverConfig, it: int) -> float:
    """Caffe's ``SGDSolver::GetLearningRate`` at iteration ``it``: always a float, never an exception
    (inf where the policy overflows, NaN where it has no real value)."""
    try:
        rate = _rate(cfg, it)
    except (OverflowError, ZeroDivisionError):
        return math.inf
    if isinstance(rate, complex):
        return math.nan
    return float(rate)


def _rate(cfg: SolverConfig, it: int):
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
    if p == "poly":       # past max_iter (a resumed longer run) the rate stays 0, not complex
        return base * max(0.0, 1.0 - it / cfg.max_iter) ** cfg.power
    # sigmoid: base / (1 + exp(z)), z = -gamma (it - stepsize), in a form where exp never overflows
    z = -cfg.gamma * (it - cfg.stepsize)
    if z > 0:
        e = math.exp(-z)
        return base * e / (1.0 + e)
    return base / (1.0 + math.exp(z))


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

    # Called between backward and the update when set (data-parallel training averages the
    # gradients over the ranks here: gpuloss/graph/distributed.py).
    grad_hook = None

    def step(self, inputs: dict):
        """One iteration: forward (returns the 0-d total loss), backward, update; ``iter += 1``."""
        loss = self.net.forward(**inputs)
        self.net.backward()
        if self.grad_hook is not None:
            self.grad_hook()
        self.apply_update()
        self.iter += 1
        return loss

    def apply_update(self) -> None:
        rate = self.learning_rate()
        if not math.isfinite(rate):   # the config check covers [0, max_iter]; past it, refuse here
            raise GraphError(f"learning rate at iteration {self.iter} is {rate} (lr_policy "
                             f"{self.config.lr_policy!r}): refusing to update the parameters")
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
        """Save parameters, solver state and iteration to ``path`` (default ``<prefix>_iter_<n>.npz``).

        The file is written whole or not at all: into a temporary file in the same
        folder, flushed and fsynced, then renamed over ``path`` (``os.replace`` is
        atomic) and the folder fsynced. A kill at any moment leaves the old file or
        the new one, never a truncated one; an exception removes the temporary file.
        A SHA-256 of every array (``checksum``) lets :meth:`restore` detect damage.
        """
        if path is None:
            path = f"{self.config.snapshot_prefix or 'gpuloss'}_iter_{self.iter}.npz"
        path = os.fspath(path)
        arrays = {"iter": np.asarray(self.iter, dtype=np.int64), "solver_type": np.asarray(self.type)}
        for layer, ps in self.net.params.items():
            for i, p in enumerate(ps):
                arrays[f"param/{layer}/{i}"] = _host(p.data)
        names = self._param_names()
        for sname, arrs in self.state.items():
            for n, a in zip(names, arrs):
                arrays[f"state/{sname}/{n}"] = _host(a)
        arrays["checksum"] = np.asarray(_checksum(arrays))
        write_atomically(path, lambda fh: np.savez(fh, **arrays))
        return path

    def restore(self, path: str | os.PathLike) -> None:
        """Load a snapshot written by :meth:`snapshot` into this solver and its net, in place.

        Everything is checked before anything is copied (readable archive, checksum,
        solver type, iteration, the exact set of arrays, their shapes, a floating
        dtype and finite values after the cast to the net's dtype): a failed
        restore raises :class:`GraphError` naming the file and leaves the solver
        and its net as they were.
        """
        path = os.fspath(path)

        def bad(why: str) -> GraphError:
            return GraphError(f"snapshot {path!r}: {why}")

        z = read_snapshot(path)
        stype = z["solver_type"]
        if stype.shape != () or stype.dtype.kind != "U":
            raise bad(f"solver_type is not a string (dtype {stype.dtype}, shape {stype.shape})")
        if str(stype) != self.type:
            raise bad(f"is of a {stype} solver, not {self.type}")
        it = z["iter"]
        if it.shape != () or it.dtype.kind not in "iu" or int(it) < 0:
            raise bad(f"iter must be a non-negative integer, got {it!r}")
        targets = [(f"param/{layer}/{i}", p.data) for layer, ps in self.net.params.items()
                   for i, p in enumerate(ps)]
        names = self._param_names()
        targets += [(f"state/{s}/{n}", a) for s, arrs in self.state.items() for n, a in zip(names, arrs)]
        missing = [k for k, _ in targets if k not in z]
        if missing:
            raise bad(f"lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}: not made from this net")
        staged = []
        for key, dst in targets:
            src = z[key]
            if tuple(src.shape) != tuple(dst.shape):
                raise bad(f"{key} has shape {src.shape}, the net has {tuple(dst.shape)}")
            if src.dtype.kind != "f":
                raise bad(f"{key} has dtype {src.dtype}, not a floating dtype")
            with np.errstate(over="ignore"):
                value = src.astype(_host_dtype(dst))
            if not np.isfinite(value).all():
                raise bad(f"{key} holds NaN or inf (in {value.dtype}): the run had diverged")
            staged.append((dst, value))
        extra = sorted(set(z) - {k for k, _ in targets} - {"iter", "solver_type", "checksum"})
        if extra:
            raise bad(f"holds {extra[:3]}{' ...' if len(extra) > 3 else ''}, which this net lacks: "
                      f"made from another net")
        xp = self.net.xp
        for dst, value in staged:   # nothing is written until every array has passed
            dst[...] = xp.asarray(value)   # in place: shared nets see it too
        self.iter = int(it)

    def _param_names(self) -> list[str]:
        return [f"{layer}/{i}" for layer, ps in self.net.params.items() for i in range(len(ps))]


def _checksum(arrays: dict) -> str:
    """SHA-256 over each array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        if key == "checksum":
            continue
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_snapshot(path: str) -> dict:
    """Every array of a snapshot, after checking it is a whole ``.npz`` whose checksum matches
    (:class:`GraphError` naming the file and the fault otherwise)."""
    def bad(why: str) -> GraphError:
        return GraphError(f"snapshot {path!r}: {why}")

    try:
        if not zipfile.is_zipfile(path):
            raise bad("not an .npz archive (truncated, or another kind of file)")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except GraphError:
        raise
    except OSError as exc:
        raise bad(f"cannot read it: {exc.strerror or exc}") from None
    except Exception as exc:  # a damaged archive fails in zipfile, zlib or numpy's format reader
        raise bad(f"cannot be read as an .npz archive ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("iter", "solver_type", "checksum") if k not in arrays]
    if missing:
        raise bad(f"lacks {missing}: not a gpuloss snapshot")
    stored = arrays["checksum"]
    if stored.shape != () or stored.dtype.kind != "U":
        raise bad("checksum is not a string")
    if str(stored) != _checksum(arrays):
        raise bad("checksum mismatch: the file is damaged (changed bytes or a partial write)")
    return arrays


def _host_dtype(a):
    return np.dtype(a.dtype.name) if hasattr(a, "get") else a.dtype


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
        net_path = Path(cfg.net)   # the solver's net field is a path, never prototxt text
        net = Net.from_prototxt(net_path, phase="TRAIN", backend=backend, dtype=dtype, seed=seed)
        test_net = Net.from_prototxt(net_path, phase="TEST", backend=backend, dtype=dtype, seed=seed)
        test_net.share_params_from(net)
    return make_solver(net, cfg, test_net=test_net)
