"""The command line under bad arguments and bad files: one line on stderr, exit status 2, nothing
changed; and the newcomer's conveniences (--version, python -m gpuloss, help texts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpuloss import benchmark
from gpuloss.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]

_NET = """name: "tiny"
layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 8 dim: 5 } shape { dim: 8 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "y" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "y" top: "acc" include { phase: TEST } }
"""


def _files(tmp_path, rng, solver_extra=""):
    x = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:16], y=y[:16])
    (tmp_path / "net.prototxt").write_text(_NET)
    (tmp_path / "solver.prototxt").write_text(
        f'type: "SGD" base_lr: 0.05 momentum: 0.9 max_iter: 6 display: 2 test_interval: 3 '
        f'snapshot: 3 snapshot_prefix: "{tmp_path / "snap" / "t"}" random_seed: 3 {solver_extra}')
    return tmp_path


def _train_args(d):
    return ["train", str(d / "net.prototxt"), "--solver", str(d / "solver.prototxt"), "--data",
            str(d / "train.npz"), "--test-data", str(d / "test.npz"), "--no-progress", "--backend", "cpu"]


def _one_line_exit_2(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# -- 16. bad arguments: argparse errors in one line --------------------------------------------------

@pytest.mark.parametrize("argv, fragments", [
    (["train", "--backend", "bogus"], ["--backend", "bogus"]),
    (["time", "--backend", "bogus"], ["--backend", "bogus"]),
    (["time", "--batch", "-1"], ["--batch", ">= 1"]),
    (["time", "--batch", "0"], ["--batch", ">= 1"]),
    (["time", "--iterations", "0"], ["--iterations"]),
    (["time", "--threads", "0"], ["--threads"]),
    (["train", "--threads", "0"], ["--threads", ">= 1"]),
    (["train", "--threads", "two"], ["--threads", "integer"]),
    (["train", "--max-iter", "-5"], ["--max-iter", ">= 0"]),
    (["train", "--seed", "-2"], ["--seed"]),
    (["bench", "--repeats", "-1"], ["--repeats", ">= 1"]),
    (["bench", "--repeats", "0"], ["--repeats"]),
    (["bench", "--backend", "cuda"], ["--backend"]),
    (["kernels", "--arch", "bogus"], ["--arch", "bogus"]),
    (["kernels", "--source", "no/such.cu"], ["--source", "no such file"]),
    (["info", "--nope"], ["unrecognized"]),
    (["bogus"], ["invalid choice"]),
])
def test_bad_arguments_give_one_line_and_status_2(capsys, argv, fragments):
    _one_line_exit_2(capsys, argv, *fragments)


def test_backend_cuda_without_cupy_or_device_is_one_line(capsys):
    from gpuloss.backends import cuda_unavailable_reason
    reason = cuda_unavailable_reason()
    if reason is None:
        pytest.skip("a CUDA device answers here")
    for cmd in ("train", "time"):
        _one_line_exit_2(capsys, [cmd, "--backend", "cuda"], "cuda", "unavailable", reason.split(" (")[0])


def test_paths_that_are_missing_or_not_npz(tmp_path, rng, capsys):
    d = _files(tmp_path, rng)
    (d / "data.txt").write_text("x: 1 {")
    np.save(d / "array.npy", np.zeros(3))
    for argv, frag in [(["train", "--data", str(d / "data.txt")], "not an .npz archive"),
                       (["train", "--data", str(d / "array.npy")], "not an .npz archive"),
                       (["train", "--test-data", str(d / "nope.npz")], "no such file"),
                       (["train", "--data", str(d)], "not a file"),
                       (["train", "--resume", str(d / "nope.npz")], "no such file"),
                       (["train", "--solver", str(d / "nope.prototxt")], "no such file")]:
        _one_line_exit_2(capsys, argv, frag)
    # A net argument is always a path, even when it looks like prototxt text.
    for cmd in ("train", "time"):
        _one_line_exit_2(capsys, [cmd, 'name: "x" layer {'], "no such file", 'name: "x" layer {')


# -- user errors found after parsing: one line, status 2 ------------------------------------------------

def _run_main(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_resume_from_damaged_or_foreign_snapshots_changes_nothing(tmp_path, rng, capsys):
    d = _files(tmp_path, rng)
    assert main(_train_args(d)) == 0
    snap = d / "snap" / "t_iter_6.npz"
    capsys.readouterr()
    raw = snap.read_bytes()
    magic = raw.index(b"\x93NUMPY", raw.index(b"param/fc/0.npy"))
    at = magic + 10 + int.from_bytes(raw[magic + 8:magic + 10], "little") + int(rng.integers(0, 15 * 4))
    bad = {"truncated.npz": raw[: int(rng.integers(1, len(raw)))], "text.npz": b"hello",
           "flipped.npz": raw[:at] + bytes([raw[at] ^ (1 << int(rng.integers(0, 8)))]) + raw[at + 1:]}
    for name, data in bad.items():
        (d / name).write_bytes(data)
    arrays = dict(np.load(snap))
    arrays.pop("param/fc/1")
    np.savez(d / "missing.npz", **arrays)
    np.savez(d / "objects.npz", **{**dict(np.load(snap)), "param/fc/0": np.array([None, 1], dtype=object)})
    other = _NET.replace("num_output: 3", "num_output: 4").replace(
        'layer { name: "loss"', 'layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2" '
        'inner_product_param { num_output: 3 } }\nlayer { name: "loss"').replace(
        'bottom: "fc" bottom: "y" top: "loss"', 'bottom: "fc2" bottom: "y" top: "loss"')
    (d / "other.prototxt").write_text(other)
    before = {p: p.read_bytes() for p in (d / "snap").iterdir()}
    for name in [*bad, "missing.npz", "objects.npz"]:
        rc, out, err = _run_main(capsys, _train_args(d) + ["--resume", str(d / name)])
        assert rc == 2 and out == "", (name, out)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(d / name) in lines[0] and lines[0].startswith("gpuloss train: snapshot"), err
    args = _train_args(d)
    args[1] = str(d / "other.prototxt")
    rc, out, err = _run_main(capsys, args + ["--resume", str(snap)])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(snap) in err
    assert {p: p.read_bytes() for p in (d / "snap").iterdir()} == before     # nothing written or replaced


def test_bad_snapshot_prefix_fails_before_the_first_iteration(tmp_path, rng, capsys):
    d = _files(tmp_path, rng)
    blocker = d / "file"
    blocker.write_text("a file, not a folder")
    rc, out, err = _run_main(capsys, _train_args(d) + ["--snapshot-prefix", str(blocker / "sub" / "t")])
    assert rc == 2 and "iteration" not in out and "training" not in out
    assert err.count("\n") == 1 and "snapshot_prefix" in err and "cannot write snapshots" in err
    (d / "ro").mkdir()
    os.chmod(d / "ro", 0o500)
    try:
        if os.access(d / "ro", os.W_OK):
            return   # root writes anyway: the first case has shown the check
        rc, out, err = _run_main(capsys, _train_args(d) + ["--snapshot-prefix", str(d / "ro" / "t")])
        assert rc == 2 and "cannot write snapshots" in err
    finally:
        os.chmod(d / "ro", 0o700)


def test_bad_solver_field_and_label_errors_are_one_line_for_the_command_line(tmp_path, rng, capsys):
    d = _files(tmp_path, rng, solver_extra="weight_decay: -1")
    rc, out, err = _run_main(capsys, _train_args(d))
    assert rc == 2 and err.startswith(f"gpuloss train: {d / 'solver.prototxt'}:1: field 'weight_decay'")
    d = _files(tmp_path, rng)
    y = rng.integers(0, 3, 40).astype(np.float64)
    y[int(rng.integers(0, 40))] = np.nan
    np.savez(d / "train.npz", x=rng.standard_normal((40, 5)).astype(np.float32), y=y)
    rc, out, err = _run_main(capsys, _train_args(d))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "layer 'loss'" in err and "label 'y'" in err
    y = rng.integers(0, 3, 40)
    y[3] = 7
    np.savez(d / "train.npz", x=rng.standard_normal((40, 5)).astype(np.float32), y=y)
    rc, out, err = _run_main(capsys, _train_args(d))
    assert rc == 2 and "validate=False" not in err and len(err.strip().splitlines()) == 1, err
    np.savez(d / "train.npz", x=rng.standard_normal((40, 6)).astype(np.float32), y=y)
    rc, out, err = _run_main(capsys, _train_args(d))
    assert rc == 2 and "array 'x' has shape (40, 6)" in err and "training" not in out


# -- newcomer: output without a bar, version, python -m, help ----------------------------------------------

def test_no_progress_still_prints_display_and_test_lines(tmp_path, rng, capsys):
    d = _files(tmp_path, rng)
    rc, out, err = _run_main(capsys, _train_args(d))
    assert rc == 0
    lines = out.splitlines()
    shown = [ln for ln in lines if ln.startswith("iteration ")]
    assert [ln.split(":")[0] for ln in shown] == ["iteration 2", "iteration 3", "iteration 4", "iteration 6"]
    assert "loss = " in shown[0] and "total = " in shown[0]
    assert "test_acc = " in shown[1] and "test_loss = " in shown[1]
    assert sorted(p.name for p in (d / "snap").iterdir()) == ["t_iter_3.npz", "t_iter_6.npz"]


def test_time_without_a_net_times_the_default_net(capsys):
    rc, out, err = _run_main(capsys, ["time", "--iterations", "1", "--backend", "cpu"])
    assert rc == 0 and out.startswith("DigitsMLP: ") and "recon_loss" in out


def test_version_and_python_dash_m():
    import gpuloss
    for cmd in ([sys.executable, "-m", "gpuloss", "--version"], [sys.executable, "-m", "gpuloss.cli", "--version"]):
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == f"gpuloss {gpuloss.__version__}"
    done = subprocess.run([sys.executable, "-m", "gpuloss"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "train" in done.stderr


def test_every_command_has_a_complete_description():
    parser = build_parser()
    top = parser.format_help()
    assert "``" not in top and "front door" not in top.lower()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"train", "time", "bench", "kernels", "info"}
    for name, p in sub.choices.items():
        assert p.description and p.description.rstrip().endswith("."), (name, p.description)


# -- bench: results only where asked, named by mode and time, the command as run ---------------------------

def _fake_suite(calls):
    def run_suite(quick=False, backend="cpu", repeats=None, progress=True, command=None, linear=False):
        calls.append(command)
        report = benchmark.Report(machine="m", date="2026-01-01", command=command, backend=backend, threads=1,
                                  copy_gbps=1.0, versions={}, mode="quick" if quick else "full",
                                  timestamp=f"20260101-00000{len(calls)}")
        report.rows.append(benchmark.bench_elementwise("huber", 4096, 1, None, "cpu"))
        return report
    return run_suite


def test_bench_writes_only_where_asked_and_records_the_command(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(benchmark, "run_suite", _fake_suite(calls))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 0
    assert calls == ["gpuloss bench --quick"]
    written = sorted((tmp_path / "cache" / "gpuloss" / "bench").iterdir())
    assert [p.suffix for p in written if p.suffix != ".png"] == [".json", ".md"]
    assert all("-quick-cpu-" in p.name and p.name.startswith("20260101-000001") for p in written)
    assert json.loads(written[0].read_text())["command"] == "gpuloss bench --quick"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]           # nothing in the current folder
    out = capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out and "no plot was written" in out
    assert main(["bench", "--repeats", "2", "--save", str(tmp_path / "mine")]) == 0
    assert calls[-1] == f"gpuloss bench --repeats 2 --save {tmp_path / 'mine'}"
    mine = sorted((tmp_path / "mine").iterdir())
    assert mine and all("-full-cpu-" in p.name for p in mine)
    assert main(["bench", "--no-save"]) == 0
    assert len(list((tmp_path / "mine").iterdir())) == len(mine)
