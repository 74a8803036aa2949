"""examples/ stays runnable: its prototxt files load, and its training loop trains."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import gpuloss as gl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"gpuloss_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_folder_has_its_files():
    for name in ("README.md", "two_heads_net.prototxt", "two_heads_solver.prototxt", "train_two_heads.py"):
        assert (EXAMPLES / name).is_file(), f"examples/{name} is missing"


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_net_prototxt_loads_with_two_weighted_heads(phase):
    net = gl.Net.from_prototxt(EXAMPLES / "two_heads_net.prototxt", phase=phase, backend="cpu")
    assert net.weighted_tops == [("digit_loss", "digit_loss", 1.0), ("parity_loss", "parity_loss", 0.5)]
    assert ("accuracy" in net.blobs) == (phase == "TEST")
    rng = np.random.default_rng(0)
    total = net.forward(data=rng.random((5, 64)), label=rng.integers(0, 10, 5),
                        parity=rng.integers(0, 2, (5, 1)).astype(np.float32))
    terms = {t.top: float(t.value) for t in net.loss_terms}
    assert np.isclose(float(total), terms["digit_loss"] + 0.5 * terms["parity_loss"], rtol=1e-5)


def test_solver_prototxt_loads_and_finds_its_net(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the net path is found next to the solver file, not only from the cwd
    solver = gl.solver_from_prototxt(EXAMPLES / "two_heads_solver.prototxt", backend="cpu")
    cfg = solver.config
    assert isinstance(solver, gl.SGDSolver)
    assert (cfg.lr_policy, cfg.stepsize, cfg.max_iter) == ("step", 300, 900)
    assert (cfg.base_lr, cfg.gamma) == pytest.approx((0.05, 0.5))   # float fields of caffe.proto: float32
    assert solver.test_net is not None and solver.test_net.params["fc1"][0] is solver.net.params["fc1"][0]


def test_training_loop_runs_and_lowers_the_loss():
    script = _load_script("train_two_heads")
    lines = []
    result = script.main(iterations=60, backend="cpu", out=lines.append)
    assert result["iterations"] == 60
    assert np.isfinite(result["final_total"])
    assert set(result) >= {"digit_loss", "parity_loss", "accuracy"}
    assert result["accuracy"] > 0.5          # 60 steps of 32 digits: well above chance (0.1)
    assert result["digit_loss"] < np.log(10)  # below the loss of a uniform guess
    assert any(line.startswith("test:") for line in lines)
