"""Solvers: one SGD / Adam step against NumPy written from Caffe's update rules, the lr policies,
solver prototxt, and a snapshot that resumes bitwise."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gpuloss.graph import (AdamSolver, GraphError, Net, ParamSpec, PrototxtError, SGDSolver, SolverConfig,
                           layers as L, solver_from_prototxt)
from gpuloss.graph.data import BatchFeeder
from gpuloss.graph.layers import Filler
from gpuloss.graph.solver import learning_rate

DATA = Path(__file__).parent / "data"


def _net(dtype=np.float32, seed=0):
    return Net([
        L.Input("in", top=["x", "y"], shape=[(6, 4), (6,)]),
        L.InnerProduct("ip1", "x", "h", num_output=5, weight_filler=Filler("xavier"),
                       bias_filler=Filler("gaussian", std=0.1),
                       param=[ParamSpec(lr_mult=1, decay_mult=1), ParamSpec(lr_mult=2, decay_mult=0)]),
        L.ReLU("relu", "h", "h"),
        L.InnerProduct("ip2", "h", "z", num_output=3, weight_filler=Filler("xavier"),
                       param=[ParamSpec(lr_mult=0.5)]),
        L.SoftmaxWithLoss("loss", ["z", "y"], "loss"),
    ], backend="cpu", dtype=dtype, seed=seed)


def _batch(it):
    rng = np.random.default_rng(100 + it)
    return {"x": rng.standard_normal((6, 4)), "y": rng.integers(0, 3, 6)}


def _snapshot_of(net):
    return [p.data.astype(np.float64) for p in net.learnable_params]


@pytest.mark.parametrize("use_numba", [True, False])
def test_sgd_momentum_weight_decay_matches_caffes_rule(use_numba):
    net = _net(np.float64)
    sol = SGDSolver(net, base_lr=0.1, momentum=0.9, weight_decay=0.01, lr_policy="step", gamma=0.5, stepsize=1)
    sol.use_numba = use_numba
    hist = [np.zeros_like(p) for p in _snapshot_of(net)]
    for it in range(3):
        before = _snapshot_of(net)
        sol.step(_batch(it))
        rate = 0.1 * 0.5 ** it
        for k, p in enumerate(net.learnable_params):
            g = p.diff + 0.01 * p.decay_mult * before[k]             # Caffe's Regularize (L2)
            hist[k] = 0.9 * hist[k] + rate * p.lr_mult * g           # ComputeUpdateValue
            np.testing.assert_allclose(p.data, before[k] - hist[k], rtol=1e-13, atol=1e-15)
    assert sol.iter == 3
    assert net.learnable_params[2].lr_mult == 0.5 and net.learnable_params[1].decay_mult == 0


@pytest.mark.parametrize("use_numba", [True, False])
def test_adam_matches_caffes_rule(use_numba):
    net = _net(np.float64)
    sol = AdamSolver(net, base_lr=0.01, momentum=0.9, momentum2=0.99, delta=1e-6, weight_decay=0.001)
    sol.use_numba = use_numba
    m = [np.zeros_like(p) for p in _snapshot_of(net)]
    v = [np.zeros_like(p) for p in _snapshot_of(net)]
    for it in range(3):
        before = _snapshot_of(net)
        sol.step(_batch(it))
        t = it + 1
        for k, p in enumerate(net.learnable_params):
            g = p.diff + 0.001 * p.decay_mult * before[k]
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.99 * v[k] + 0.01 * g * g
            rate = 0.01 * p.lr_mult * math.sqrt(1 - 0.99 ** t) / (1 - 0.9 ** t)
            np.testing.assert_allclose(p.data, before[k] - rate * m[k] / (np.sqrt(v[k]) + 1e-6),
                                       rtol=1e-12, atol=1e-15)


def test_l1_regularization_and_frozen_params():
    net = _net(np.float64)
    net.learnable_params[0].lr_mult = 0.0     # frozen: Caffe's lr_mult 0
    sol = SGDSolver(net, base_lr=0.1, weight_decay=0.05, regularization_type="L1")
    frozen = net.learnable_params[0].data.copy()
    before = _snapshot_of(net)
    sol.step(_batch(0))
    np.testing.assert_array_equal(net.learnable_params[0].data, frozen)
    p = net.learnable_params[2]
    assert p.lr_mult == 0.5
    np.testing.assert_allclose(p.data, before[2] - 0.05 * (p.diff + 0.05 * np.sign(before[2])), rtol=1e-13)


def test_float32_numba_and_xp_updates_agree():
    nets = [_net(np.float32), _net(np.float32)]
    sols = [AdamSolver(n, base_lr=0.01, momentum=0.9, weight_decay=0.001) for n in nets]
    sols[1].use_numba = False
    for it in range(5):
        for s in sols:
            s.step(_batch(it))
    for a, b in zip(*[n.learnable_params for n in nets]):
        assert a.data.dtype == np.float32
        np.testing.assert_allclose(a.data, b.data, rtol=2e-6, atol=1e-7)


def test_lr_policies_follow_caffe():
    def rate(**kw):
        base = {"base_lr": 0.1, "gamma": 0.5, "power": 0.75, "stepsize": 10, "max_iter": 100}
        return lambda it: learning_rate(SolverConfig(**{**base, **kw}), it)
    assert rate(lr_policy="fixed")(57) == 0.1
    assert rate(lr_policy="step")(25) == pytest.approx(0.1 * 0.5 ** 2)
    assert rate(lr_policy="exp")(3) == pytest.approx(0.1 * 0.5 ** 3)
    assert rate(lr_policy="inv", gamma=1e-4)(1000) == pytest.approx(0.1 * (1 + 1e-4 * 1000) ** -0.75)
    ms = rate(lr_policy="multistep", stepvalue=(5, 20, 40))
    assert [ms(i) for i in (4, 5, 19, 20, 41)] == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.0125])
    assert rate(lr_policy="poly", power=2.0)(25) == pytest.approx(0.1 * 0.75 ** 2)
    assert rate(lr_policy="sigmoid", gamma=-0.1)(10) == pytest.approx(0.05)
    with pytest.raises(GraphError, match="lr_policy 'step' needs stepsize"):
        SolverConfig(lr_policy="step", gamma=0.1)
    with pytest.raises(GraphError, match="lr_policy must be one of"):
        SolverConfig(lr_policy="cosine")


@pytest.mark.parametrize("solver_cls", [SGDSolver, AdamSolver])
def test_snapshot_resume_is_bitwise_identical(tmp_path, solver_cls):
    kw = {"base_lr": 0.05, "momentum": 0.9, "weight_decay": 0.001, "lr_policy": "inv", "gamma": 0.01,
          "power": 0.75}
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((50, 4)).astype(np.float32), "y": rng.integers(0, 3, 50)}
    feed = BatchFeeder(data, 6, seed=5)

    straight = solver_cls(_net(), **kw)
    for _ in range(12):
        straight.step(feed.batch(straight.iter))

    first = solver_cls(_net(), **kw)
    for _ in range(5):
        first.step(feed.batch(first.iter))
    path = first.snapshot(tmp_path / "snap.npz")
    resumed = solver_cls(_net(seed=99), **kw)          # other initial weights: all must come from the file
    resumed.restore(path)
    assert resumed.iter == 5
    while resumed.iter < 12:
        resumed.step(BatchFeeder(data, 6, seed=5).batch(resumed.iter))
    for a, b in zip(straight.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)
    for name in straight.state:
        for a, b in zip(straight.state[name], resumed.state[name]):
            np.testing.assert_array_equal(a, b)


def test_restore_rejects_a_snapshot_of_another_solver_or_net(tmp_path):
    sgd = SGDSolver(_net(), base_lr=0.1)
    path = sgd.snapshot(tmp_path / "s.npz")
    with pytest.raises(GraphError, match="is of a SGD solver, not Adam"):
        AdamSolver(_net(), base_lr=0.1).restore(path)
    other = Net([L.Input("in", top="x", shape=(2, 4)), L.InnerProduct("ip1", "x", "h", num_output=7)],
                backend="cpu")
    with pytest.raises(GraphError, match=r"param/ip1/0 has shape \(5, 4\), the net has \(7, 4\)"):
        SGDSolver(other, base_lr=0.1).restore(path)


def test_caffe_lenet_solver_prototxt_loads():
    cfg = SolverConfig.from_prototxt(DATA / "lenet_ip_solver.prototxt")
    assert (cfg.base_lr, cfg.momentum, cfg.weight_decay) == pytest.approx((0.01, 0.9, 0.0005))
    assert (cfg.lr_policy, cfg.gamma, cfg.power) == ("inv", pytest.approx(1e-4), 0.75)
    assert (cfg.max_iter, cfg.test_iter, cfg.test_interval, cfg.display) == (10000, (100,), 500, 100)
    assert (cfg.snapshot, cfg.snapshot_prefix, cfg.type) == (5000, "examples/mnist/lenet", "SGD")
    assert cfg.net == str(DATA / "lenet_ip.prototxt")   # found next to the solver file
    sol = solver_from_prototxt(DATA / "lenet_ip_solver.prototxt", backend="cpu")
    assert isinstance(sol, SGDSolver)
    assert [l.name for l in sol.test_net.layers][-2] == "accuracy"
    assert sol.test_net.params["ip1"][0] is sol.net.params["ip1"][0]     # shared, as Caffe's test nets


def test_adam_solver_prototxt_and_unsupported_fields(tmp_path):
    net_path = str(DATA / "lenet_ip.prototxt")
    cfg = SolverConfig.from_prototxt(f'net: "{net_path}" type: "Adam" base_lr: 0.001 momentum: 0.9 '
                                     f'momentum2: 0.995 delta: 1e-7 random_seed: 7 max_iter: 3')
    assert (cfg.type, cfg.momentum2, cfg.random_seed) == ("Adam", pytest.approx(0.995), 7)
    assert cfg.delta == pytest.approx(1e-7)
    assert SolverConfig.from_prototxt('base_lr: 0.1 solver_type: ADAM').type == "Adam"   # deprecated enum
    for text, message in [('base_lr: 0.1 iter_size: 2', "solver field 'iter_size' is not supported"),
                          ('base_lr: 0.1 clip_gradients: 10', "solver field 'clip_gradients' is not supported"),
                          ('base_lr: 0.1 type: "Nesterov"', "solver type must be one of"),
                          ('momentum: 0.9', "solver needs base_lr")]:
        with pytest.raises(GraphError, match=message):
            SolverConfig.from_prototxt(text)
    with pytest.raises(PrototxtError, match=r"field 'base_rl' is not supported"):
        SolverConfig.from_prototxt('base_rl: 0.1')
