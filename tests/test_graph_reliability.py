"""Hostile input to the layer graph: NaN scores, labels that are not class indices, solver and net
fields that cannot work, and snapshots that are damaged, of another net, or written while killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gpuloss.graph import AdamSolver, GraphError, Net, PrototxtError, SGDSolver, SolverConfig, layers as L
from gpuloss.graph.layers import Filler
from gpuloss.graph.solver import learning_rate

REPO = Path(__file__).resolve().parents[1]


# -- 1. Accuracy: a non-finite score is never right ------------------------------------------------

def _accuracy_net(n, c, **kw):
    return Net([L.Input("in", top=["s", "y"], shape=[(n, c), (n,)]), L.Accuracy("acc", ["s", "y"], "acc", **kw)],
               backend="cpu", dtype=np.float64)


@pytest.mark.parametrize("top_k", [1, 2])
def test_accuracy_counts_rows_with_nan_or_nonfinite_true_score_as_wrong(rng, top_k):
    n, c = 40, 5
    y = rng.integers(0, c, n)
    scores = rng.standard_normal((n, c))
    scores[np.arange(n), y] += 10.0                 # every row right to begin with
    net = _accuracy_net(n, c, top_k=top_k)
    net.forward(s=scores, y=y)
    assert float(net.blobs["acc"].data) == 1.0
    poisoned = scores.copy()
    rows = rng.choice(n, 8, replace=False)
    other = (y[rows] + 1 + rng.integers(0, c - 1, 8)) % c
    poisoned[rows[0], y[rows[0]]] = np.nan          # the true class NaN
    poisoned[rows[1], other[1]] = np.nan            # another class NaN: the row is still wrong
    poisoned[rows[2], y[rows[2]]] = np.inf          # non-finite true scores are never right
    poisoned[rows[3], y[rows[3]]] = -np.inf
    poisoned[rows[4]] = np.nan                      # the whole row
    poisoned[rows[5], other[5]] = np.inf            # +inf elsewhere beats a finite true score
    poisoned[rows[6], other[6]] = -np.inf           # -inf elsewhere is simply lower: still right
    keep = scores.copy()
    net.forward(s=poisoned, y=y)
    wrong = 6 if top_k == 1 else 5                   # top-2: a single +inf rival leaves the label 2nd
    assert float(net.blobs["acc"].data) == pytest.approx((n - wrong) / n)
    net.forward(s=np.full((n, c), np.nan), y=y)     # a diverged net: accuracy 0, not 1
    assert float(net.blobs["acc"].data) == 0.0
    np.testing.assert_array_equal(scores, keep)


# -- 2. float labels must be exact class indices ---------------------------------------------------

def _label_layers():
    return {
        "softmax": lambda: Net([L.Input("in", top=["x", "y"], shape=[(6, 4), (6,)]),
                                L.SoftmaxWithLoss("loss", ["x", "y"], "loss")], backend="cpu"),
        "softmax_ignore": lambda: Net([L.Input("in", top=["x", "y"], shape=[(6, 4), (6,)]),
                                       L.SoftmaxWithLoss("loss", ["x", "y"], "loss", ignore_label=-1)],
                                      backend="cpu"),
        "accuracy": lambda: Net([L.Input("in", top=["x", "y"], shape=[(6, 4), (6,)]),
                                 L.Accuracy("acc", ["x", "y"], "acc")], backend="cpu"),
    }


@pytest.mark.parametrize("layer", ["softmax", "softmax_ignore", "accuracy"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30, -1e30, 2.5, 4.0, -0.5, 2 ** 63])
def test_float_labels_that_are_not_class_indices_are_refused(rng, layer, bad):
    net = _label_layers()[layer]()
    y = rng.integers(0, 4, 6).astype(np.float64)
    pos = int(rng.integers(0, 6))
    y[pos] = bad
    keep = y.copy()
    name = {"softmax": "loss", "softmax_ignore": "loss", "accuracy": "acc"}[layer]
    with pytest.raises(GraphError, match=rf"layer '{name}' .*label 'y'.*flat position {pos}"):
        net.forward(x=rng.standard_normal((6, 4)), y=y)
    np.testing.assert_array_equal(y, keep)          # the caller's labels are not touched


@pytest.mark.parametrize("layer", ["softmax", "softmax_ignore", "accuracy"])
def test_integral_float_labels_still_work(rng, layer):
    y = rng.integers(0, 4, 6)
    x = rng.standard_normal((6, 4))
    a, b = _label_layers()[layer](), _label_layers()[layer]()
    np.testing.assert_array_equal(float(a.forward(x=x, y=y)), float(b.forward(x=x, y=y.astype(np.float32))))
    if layer == "softmax_ignore":
        y2 = y.astype(np.float64)
        y2[0] = -1.0                                  # the ignore label, as a float, is fine
        a.forward(x=x, y=y2)


def test_non_numeric_inputs_are_refused():
    net = _label_layers()["softmax"]()
    with pytest.raises(GraphError, match=r"input 'y' must hold real numbers"):
        net.forward(x=np.zeros((6, 4)), y=np.array(["a"] * 6))


# -- 10. solver fields ------------------------------------------------------------------------------

@pytest.mark.parametrize("line, field", [
    ("base_lr: nan", "base_lr"), ("base_lr: inf", "base_lr"), ("base_lr: -0.05", "base_lr"),
    ("momentum: 1", "momentum"), ("momentum: -0.1", "momentum"), ("momentum: nan", "momentum"),
    ("weight_decay: -1e-4", "weight_decay"), ("weight_decay: inf", "weight_decay"),
    ("stepsize: -5", "stepsize"), ("max_iter: -1", "max_iter"),
    ('lr_policy: "inv" gamma: 1e-4 power: nan', "power"),
    ('lr_policy: "inv" gamma: -0.01 power: 0.75', "gamma"),
    ('lr_policy: "exp" gamma: 10', "gamma"),
    ('lr_policy: "sigmoid" gamma: -1 stepsize: 10', "gamma"),
    ('lr_policy: "poly" power: -1', "power"),
    ('type: "Adam" momentum: 1', "momentum"), ('type: "Adam" delta: 0', "delta"),
    ('type: "Adam" momentum2: 1', "momentum2"),
    ("display: -3", "display"), ("snapshot: -1", "snapshot"), ("gamma: 1e39", "gamma"),
])
def test_bad_solver_fields_are_refused_with_file_field_and_line(tmp_path, line, field):
    path = tmp_path / "solver.prototxt"
    defaults = "".join(f"{k}: {v}\n" for k, v in (("base_lr", 0.01), ("max_iter", 5000)) if k not in line)
    path.write_text(f"# a solver\n{defaults}{line}\n")
    expected = len(path.read_text().splitlines())     # the line that sets the field
    for error in (GraphError, PrototxtError):
        with pytest.raises(error) as e:
            SolverConfig.from_prototxt(path)
        msg = str(e.value)
        assert f"'{field}'" in msg or f"{field} " in msg, msg
        assert msg.startswith(f"{path}:{expected}:"), msg
        assert "\n" not in msg


def test_solver_config_checks_every_numeric_field_generically():
    from dataclasses import fields
    numeric = [f.name for f in fields(SolverConfig) if f.type == "float"]
    assert {"base_lr", "gamma", "power", "momentum", "momentum2", "delta", "weight_decay"} <= set(numeric)
    for name in numeric:
        for bad in (float("nan"), float("inf"), -float("inf"), "0.1", None):
            with pytest.raises(GraphError, match=name):
                SolverConfig(**{name: bad})
    for name in ("max_iter", "stepsize", "display", "snapshot", "test_interval"):
        for bad in (-1, 1.5, True):
            with pytest.raises(GraphError, match=name):
                SolverConfig(**{name: bad})


def test_learning_rate_never_raises_or_goes_complex():
    cases = [dict(lr_policy="exp", gamma=1e3), dict(lr_policy="step", gamma=1e10, stepsize=1),
             dict(lr_policy="sigmoid", gamma=-5.0, stepsize=1), dict(lr_policy="sigmoid", gamma=5e-4, stepsize=10 ** 6),
             dict(lr_policy="poly", power=0.5, max_iter=10)]
    for kw in cases:
        cfg = SolverConfig(base_lr=0.1, **kw)    # max_iter 0 (or 10): only the start is checked
        for it in (0, 1, 10, 11, 10 ** 6, 10 ** 9):
            rate = learning_rate(cfg, it)
            assert isinstance(rate, float), (kw, it, rate)
            assert rate >= 0 or np.isnan(rate)
    sigmoid = SolverConfig(base_lr=0.1, lr_policy="sigmoid", gamma=-5.0, stepsize=1)
    assert learning_rate(sigmoid, 10 ** 6) == 0.0                 # exp would overflow: the limit
    assert learning_rate(SolverConfig(base_lr=0.1, lr_policy="poly", power=0.5, max_iter=10), 11) == 0.0


def test_a_rate_that_overflows_mid_run_stops_the_update_without_touching_the_net():
    net = Net([L.Input("in", top=["x", "y"], shape=[(4, 3), (4,)]),
               L.InnerProduct("ip", "x", "z", num_output=3, weight_filler=Filler("xavier")),
               L.SoftmaxWithLoss("loss", ["z", "y"], "loss")], backend="cpu")
    sol = SGDSolver(net, base_lr=0.1, lr_policy="exp", gamma=10.0)
    sol.iter = 400                                   # 10 ** 400 overflows
    before = net.params["ip"][0].data.copy()
    with pytest.raises(GraphError, match=r"learning rate at iteration 400 is inf"):
        sol.step({"x": np.ones((4, 3)), "y": np.zeros(4, int)})
    np.testing.assert_array_equal(net.params["ip"][0].data, before)


# -- 11. net fields -----------------------------------------------------------------------------------

_NET = """name: "n"
layer { name: "in" type: "Input" top: "x" top: "y"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "z"
        param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 }
                              bias_filler { type: "constant" value: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "z" bottom: "y" top: "loss" loss_weight: 1 }
"""


@pytest.mark.parametrize("old, new, field", [
    ("loss_weight: 1", "loss_weight: nan", "loss_weight"),
    ("loss_weight: 1", "loss_weight: -inf", "loss_weight"),
    ("param { lr_mult: 2", "param { lr_mult: inf", "lr_mult"),
    ("decay_mult: 0", "decay_mult: nan", "decay_mult"),
    ("value: 0.5", "value: nan", "value"),
    ("std: 0.1", "std: inf", "std"),
    ("std: 0.1", "std: 1e39", "std"),
])
def test_non_finite_net_fields_name_layer_field_and_line(tmp_path, old, new, field):
    path = tmp_path / "net.prototxt"
    text = _NET.replace(old, new, 1)
    path.write_text(text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if new in ln)
    with pytest.raises(GraphError) as e:
        Net.from_prototxt(path, backend="cpu")
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: layer ") and field in msg and "finite" in msg, msg


def test_non_finite_fields_through_the_python_api():
    with pytest.raises(GraphError, match="loss_weight must be a finite number"):
        L.SoftmaxWithLoss("loss", ["z", "y"], "loss", loss_weight=float("nan"))
    with pytest.raises(GraphError, match="lr_mult must be a finite number"):
        L.InnerProduct("ip", "x", "z", num_output=2, param=[{"lr_mult": float("inf")}])
    for kw in ({"value": float("nan")}, {"std": float("inf")}, {"mean": float("-inf")}, {"std": -1.0}):
        with pytest.raises(GraphError, match="filler"):
            Filler("gaussian", **kw)
    with pytest.raises(GraphError, match="negative_slope"):
        L.ReLU("r", "x", "y", negative_slope=float("nan"))


@pytest.mark.parametrize("filler", ["xavier", "msra"])
def test_zero_input_dimension_is_refused_not_a_zero_division(filler):
    text = _NET.replace("shape { dim: 4 dim: 3 }", "shape { dim: 4 dim: 0 }").replace(
        'weight_filler { type: "gaussian" std: 0.1 }', f'weight_filler {{ type: "{filler}" }}')
    with pytest.raises(GraphError, match=r"layer 'ip' \(InnerProduct\): bottom 'x' has shape \(4, 0\)"):
        Net.from_prototxt(text, backend="cpu")
    with pytest.raises(GraphError, match="zero dimensions"):
        Filler(filler).sample((3, 0), np.random.default_rng(0))


def test_a_num_output_that_cannot_fit_in_memory_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.prototxt"
    path.write_text(_NET.replace("num_output: 5", "num_output: 4000000000").replace(
        "shape { dim: 4 dim: 3 }", "shape { dim: 4 dim: 100000 }"))
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "num_output" in ln)
    with pytest.raises(GraphError, match=rf"^{path}:{line}: layer 'ip' \(InnerProduct\): num_output 4000000000 "
                                         r".*GiB of memory"):
        Net.from_prototxt(path, backend="cpu")


# -- 7 / 8. snapshots: atomic writes, checked restores ------------------------------------------------

def _tiny(seed=0, out=3):
    return Net([L.Input("in", top=["x", "y"], shape=[(6, 4), (6,)]),
                L.InnerProduct("ip", "x", "z", num_output=out, weight_filler=Filler("gaussian", std=0.5),
                               bias_filler=Filler("gaussian", std=0.5)),
                L.SoftmaxWithLoss("loss", ["z", "y"], "loss")], backend="cpu", seed=seed)


def _trained(rng, cls=AdamSolver, steps=3):
    sol = cls(_tiny(), base_lr=0.1, momentum=0.9)
    for _ in range(steps):
        sol.step({"x": rng.standard_normal((6, 4)), "y": rng.integers(0, 3, 6)})
    return sol


def _state_of(sol):
    return ([p.data.copy() for p in sol.net.learnable_params],
            {k: [a.copy() for a in v] for k, v in sol.state.items()}, sol.iter)


def _assert_unchanged(sol, state):
    params, st, it = state
    for p, q in zip(sol.net.learnable_params, params):
        np.testing.assert_array_equal(p.data, q)
    for k in st:
        for a, b in zip(sol.state[k], st[k]):
            np.testing.assert_array_equal(a, b)
    assert sol.iter == it


def _rewrite(path, **changes):
    """The snapshot at ``path`` with arrays replaced (None: removed), its checksum left as it was."""
    arrays = dict(np.load(path))
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _corruptions(rng, tmp_path, good):
    """(name, path, expected message) of damaged or foreign snapshots, each made from ``good``."""
    raw = good.read_bytes()
    out = []

    def new(name, data=None):
        p = tmp_path / f"{name}.npz"
        p.write_bytes(raw if data is None else data)
        return p

    cut = int(rng.integers(1, len(raw)))
    out.append(("truncated", new("truncated", raw[:cut]), r"not an \.npz archive|cannot be read|checksum"))
    # A bit flip inside an array's bytes (the zip stores them uncompressed): only the checksum sees it.
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("param/ip/0.npy")
    magic = raw.index(b"\x93NUMPY", info.header_offset)
    start = magic + 10 + int.from_bytes(raw[magic + 8:magic + 10], "little")   # .npy v1: data after header
    pos = start + int(rng.integers(0, 4 * 3 * 4))      # in the (3, 4) float32 weights
    flipped = bytearray(raw)
    flipped[pos] ^= 1 << int(rng.integers(0, 8))
    out.append(("bit-flipped", new("flipped", bytes(flipped)), r"checksum mismatch|CRC|cannot be read"))
    p = new("missing_key")
    _rewrite(p, **{"state/m/ip/0": None})
    out.append(("missing key", p, r"checksum mismatch"))
    p = new("no_checksum")
    _rewrite(p, checksum=None)
    out.append(("no checksum", p, r"lacks \['checksum'\]"))
    p = tmp_path / "objects.npz"
    np.savez(p, **{**dict(np.load(good)), "iter": np.array([object()], dtype=object)})
    out.append(("object array", p, r"cannot be read.*(pickle|Object)"))
    p = tmp_path / "text.npz"
    p.write_text("not a snapshot")
    out.append(("text", p, r"not an \.npz archive"))
    return out


def test_restore_checks_everything_before_copying_anything(rng, tmp_path):
    good = Path(_trained(rng).snapshot(tmp_path / "good.npz"))
    target = _trained(np.random.default_rng(int(rng.integers(1 << 30))), steps=2)
    before = _state_of(target)
    for name, path, message in _corruptions(rng, tmp_path, good):
        with pytest.raises(GraphError, match=message) as e:
            target.restore(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), name
        _assert_unchanged(target, before)
    # Another net's snapshot, whole and with a valid checksum: refused, nothing copied.
    other = AdamSolver(_tiny(out=5), base_lr=0.1)
    with pytest.raises(GraphError, match=r"param/ip/0 has shape \(5, 4\), the net has \(3, 4\)"):
        target.restore(other.snapshot(tmp_path / "other.npz"))
    _assert_unchanged(target, before)
    with pytest.raises(GraphError, match="is of a Adam solver, not SGD"):
        SGDSolver(_tiny(), base_lr=0.1).restore(good)
    target.restore(good)                                  # the good one still loads
    assert target.iter == 3


def test_restore_refuses_diverged_values_and_bad_iter(rng, tmp_path):
    from gpuloss.graph.solver import _checksum
    sol = _trained(rng)
    good = tmp_path / "good.npz"
    sol.snapshot(good)
    for key, value, message in [("param/ip/1", np.full(3, np.nan, np.float32), "NaN or inf"),
                                ("param/ip/1", np.full(3, 1e300), "NaN or inf"),     # inf once cast to float32
                                ("param/ip/1", np.zeros(3, np.int32), "not a floating dtype"),
                                ("iter", np.asarray(2.5), "iter must be a non-negative integer"),
                                ("iter", np.asarray(-1), "iter must be a non-negative integer"),
                                ("state/v/ip/1", None, r"lacks \['state/v/ip/1'\]: not made from this net"),
                                ("param/extra/0", np.zeros(2, np.float32), r"holds \['param/extra/0'\]")]:
        arrays = dict(np.load(good))
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
        arrays["checksum"] = np.asarray(_checksum(arrays))     # a consistent file with bad content
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays)
        target = AdamSolver(_tiny(seed=7), base_lr=0.1)
        before = _state_of(target)
        with pytest.raises(GraphError, match=message):
            target.restore(path)
        _assert_unchanged(target, before)


def test_snapshot_replaces_atomically_and_cleans_up_on_any_exception(rng, tmp_path, monkeypatch):
    sol = _trained(rng)
    path = tmp_path / "snap.npz"
    sol.snapshot(path)
    old = path.read_bytes()
    sol.step({"x": rng.standard_normal((6, 4)), "y": rng.integers(0, 3, 6)})

    calls = {"n": 0}
    real_savez = np.savez

    def interrupted(fh, **arrays):           # a Ctrl-C half way through writing the archive
        calls["n"] += 1
        real_savez(fh, **dict(list(arrays.items())[:2]))
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sol.snapshot(path)
    assert calls["n"] == 1
    assert path.read_bytes() == old                     # the old snapshot, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.npz"]   # no temporary file left
    monkeypatch.setattr(np, "savez", real_savez)
    sol.snapshot(path)
    assert path.read_bytes() != old
    again = AdamSolver(_tiny(seed=3), base_lr=0.1, momentum=0.9)
    again.restore(path)
    assert again.iter == sol.iter
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.npz"]


# -- 7. kill `gpuloss train` at random moments: every snapshot on disk stays whole -------------------

_KILL_NET = """name: "k"
layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 8 dim: 1024 } shape { dim: 8 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "z"
        inner_product_param { num_output: 64 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "z" bottom: "y" top: "loss" }
"""


def _newest(snaps: Path):
    found = sorted(snaps.glob("k_iter_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return found[-1] if found else None


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_damaged_snapshot(rng, tmp_path):
    from gpuloss.graph.solver import read_snapshot
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=rng.integers(0, 64, 64))
    (tmp_path / "net.prototxt").write_text(_KILL_NET)
    snaps = tmp_path / "snaps"
    (tmp_path / "solver.prototxt").write_text(
        f'type: "SGD" base_lr: 0.05 momentum: 0.9 max_iter: 100000000 snapshot: 1 '
        f'snapshot_prefix: "{snaps / "k"}" random_seed: 1')
    base = [sys.executable, "-m", "gpuloss.cli", "train", str(tmp_path / "net.prototxt"),
            "--solver", str(tmp_path / "solver.prototxt"), "--data", str(tmp_path / "data.npz"),
            "--backend", "cpu", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    resumed_from = []
    for attempt in range(20):
        newest = _newest(snaps)
        cmd = base + (["--resume", str(newest)] if newest else [])
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Wait until the run writes snapshots (the interpreter's start is no test of them), then kill it
        # at a random moment within the next fraction of a second: usually in the middle of a write.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and _newest(snaps) == newest:
            time.sleep(0.005)
        assert proc.poll() is None, proc.communicate()
        time.sleep(float(rng.uniform(0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        if newest is not None:
            resumed_from.append(int(newest.stem.rsplit("_", 1)[1]))
            assert f"resuming from {newest}".encode() in out, err
        for snap in snaps.glob("*.npz"):             # every snapshot on disk is whole and checks out
            arrays = read_snapshot(str(snap))
            assert int(arrays["iter"]) == int(snap.stem.rsplit("_", 1)[1])
    assert len(resumed_from) == 19 and resumed_from == sorted(resumed_from)
    # The last one resumes and finishes a few more iterations.
    newest = _newest(snaps)
    start = int(newest.stem.rsplit("_", 1)[1])
    done = subprocess.run(base + ["--resume", str(newest), "--max-iter", str(start + 3)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"trained {start + 3} iterations" in done.stdout


def test_sigterm_removes_the_snapshot_being_written_and_reports_one_line(rng, tmp_path):
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=rng.integers(0, 64, 64))
    (tmp_path / "net.prototxt").write_text(_KILL_NET)
    snaps = tmp_path / "snaps"
    (tmp_path / "solver.prototxt").write_text(
        f'base_lr: 0.01 max_iter: 100000000 snapshot: 1 snapshot_prefix: "{snaps / "k"}"')
    proc = subprocess.Popen([sys.executable, "-m", "gpuloss.cli", "train", str(tmp_path / "net.prototxt"),
                             "--solver", str(tmp_path / "solver.prototxt"), "--data", str(tmp_path / "data.npz"),
                             "--backend", "cpu", "--no-progress"], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _newest(snaps) is None:
        time.sleep(0.005)
    time.sleep(float(rng.uniform(0, 0.2)))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("gpuloss train: terminated at iteration "), err
    assert not [p.name for p in snaps.iterdir() if not p.name.endswith(".npz")]   # no temporary file left
    from gpuloss.graph.solver import read_snapshot
    for snap in snaps.glob("*.npz"):
        read_snapshot(str(snap))
