"""``gpuloss train`` and ``gpuloss time`` end to end, through the real command line entry."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from gpuloss.cli import main

DATA = Path(__file__).parent / "data"


def test_train_default_net_on_digits_reaches_high_accuracy(capsys):
    # 300 of the default 1500 iterations: every seed we tried reaches 0.955 or more here.
    assert main(["train", "--max-iter", "300"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("training DigitsMLP (17866 parameters) on scikit-learn digits: 1437 train / 360 test")
    # the progress bar shows each loss term: the weighted auxiliary one with its weight
    assert re.search(r"loss=\d\.\d{4}, recon_loss\(x0\.3\)=\d\.\d{4}, total=\d\.\d{4}", err)
    assert "300/300" in err
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"trained 300 iterations in [\d.]+ s; test accuracy: (\d\.\d{4}) \(360 samples\)", last)
    assert m, last
    assert float(m.group(1)) >= 0.9


_NET = """name: "tiny"
layer { name: "in" type: "Input" top: "x" top: "y" top: "t"
        input_param { shape { dim: 8 dim: 5 } shape { dim: 8 } shape { dim: 8 dim: 2 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "head" type: "InnerProduct" bottom: "x" top: "head"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "y" top: "loss" }
layer { name: "reg" type: "SmoothL1Loss" bottom: "head" bottom: "t" top: "reg" loss_weight: 0.5 }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "y" top: "acc" include { phase: TEST } }
"""


def _user_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)
    t = x[:, :2] * 0.5
    np.savez(tmp_path / "train.npz", x=x, y=y, t=t)
    np.savez(tmp_path / "test.npz", x=x[:16], y=y[:16], t=t[:16])
    (tmp_path / "net.prototxt").write_text(_NET)
    (tmp_path / "solver.prototxt").write_text(
        'type: "Adam" base_lr: 0.01 momentum: 0.9 max_iter: 20 display: 5 snapshot: 10 '
        f'snapshot_prefix: "{tmp_path / "snap" / "tiny"}" random_seed: 3')
    return tmp_path


def test_train_user_net_on_npz_with_snapshots_and_bitwise_resume(tmp_path, capsys):
    d = _user_files(tmp_path)
    args = ["train", str(d / "net.prototxt"), "--solver", str(d / "solver.prototxt"), "--data", str(d / "train.npz"),
            "--test-data", str(d / "test.npz"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tiny (30 parameters)" in out and "Adam solver, 20 iterations" in out
    assert re.search(r"test accuracy: \d\.\d{4} \(16 samples\)", out)
    snaps = d / "snap"
    assert sorted(p.name for p in snaps.iterdir()) == ["tiny_iter_10.npz", "tiny_iter_20.npz"]
    straight = dict(np.load(snaps / "tiny_iter_20.npz"))
    (snaps / "tiny_iter_20.npz").unlink()
    assert main(args + ["--resume", str(snaps / "tiny_iter_10.npz")]) == 0
    resumed = dict(np.load(snaps / "tiny_iter_20.npz"))
    assert straight.keys() == resumed.keys() and int(resumed["iter"]) == 20
    for k in straight:
        np.testing.assert_array_equal(straight[k], resumed[k], err_msg=k)


def test_train_and_time_report_user_errors_in_one_line(tmp_path, capsys):
    d = _user_files(tmp_path)
    np.savez(d / "partial.npz", x=np.zeros((4, 5), np.float32))
    assert main(["train", str(d / "net.prototxt"), "--data", str(d / "partial.npz"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gpuloss train: the training data" in err and "lacks ['y', 't']" in err
    (d / "bad.prototxt").write_text(_NET.replace("num_output: 3", "num_outputs: 3"))
    assert main(["time", str(d / "bad.prototxt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpuloss time: {d / 'bad.prototxt'}:5:31: layer 'fc'") and "field 'num_outputs'" in err


def test_time_prints_every_layer(capsys):
    assert main(["time", str(DATA / "lenet_ip.prototxt"), "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.split()}
    for layer, typ in [("mnist", "Input"), ("ip0", "InnerProduct"), ("ip1", "InnerProduct"),
                       ("relu1", "ReLU"), ("ip2", "InnerProduct"), ("loss", "SoftmaxWithLoss")]:
        assert rows[layer][1] == typ
        assert float(rows[layer][2]) >= 0 and float(rows[layer][3]) >= 0
    assert "accuracy" not in rows           # TRAIN phase by default, as caffe time
    assert re.search(r"Forward-Backward: [\d.]+ ms", out)


@pytest.mark.parametrize("name", ["default_net.prototxt", "default_solver.prototxt"])
def test_default_prototxts_ship_in_the_package(name):
    import gpuloss.graph
    assert (Path(gpuloss.graph.__file__).parent / name).is_file()
