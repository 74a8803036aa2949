"""The layer graph's numbers: totals and gradients against finite differences (float64), Caffe's
loss_weight rules, normalization, in-place layers, accuracy, and the errors of a badly wired net."""
from __future__ import annotations

import numpy as np
import pytest

from gpuloss.graph import GraphError, Net, layers as L
from gpuloss.graph.layers import Filler

G = Filler("gaussian", std=0.5)


def _numeric_grad(f, arr, eps=1e-6):
    g = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        old = arr[idx]
        arr[idx] = old + eps
        fp = f()
        arr[idx] = old - eps
        fm = f()
        arr[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g


def check_gradients(net, inputs, wrt_inputs=(), rtol=1e-5, atol=1e-8):
    """Every parameter's diff, and the diff of each input in ``wrt_inputs``, against central differences."""
    total = float(net.forward(**inputs))
    net.backward()
    analytic = {(ln, i): p.diff.copy() for ln, ps in net.params.items() for i, p in enumerate(ps)}
    analytic_in = {n: net.blobs[n].diff.copy() for n in wrt_inputs}
    f = lambda: float(net.forward(**inputs))  # noqa: E731
    for (ln, i), a in analytic.items():
        np.testing.assert_allclose(a, _numeric_grad(f, net.params[ln][i].data), rtol=rtol, atol=atol,
                                   err_msg=f"d total / d {ln}[{i}]")
    for n, a in analytic_in.items():
        np.testing.assert_allclose(a, _numeric_grad(f, inputs[n]), rtol=rtol, atol=atol,
                                   err_msg=f"d total / d input {n}")
    assert float(net.forward(**inputs)) == total   # the checks left the net as they found it
    return total


def _two_loss_net(normalization="VALID", **kw):
    return Net([
        L.Input("in", top=["x", "y", "t"], shape=[(5, 4), (5,), (5, 3)]),
        L.InnerProduct("ip1", "x", "h", num_output=6, weight_filler=G, bias_filler=G),
        L.ReLU("relu", "h", "h"),                                  # in place
        L.InnerProduct("ip2", "h", "z", num_output=3, weight_filler=G, bias_filler=G),
        L.SoftmaxWithLoss("loss", ["z", "y"], "loss", ignore_label=-1, normalization=normalization),
        L.EuclideanLoss("aux", ["z", "t"], "aux", loss_weight=0.3),
        L.Sigmoid("sig", "h", "s", loss_weight=0.05),              # a weighted non-loss top
    ], backend="cpu", dtype=np.float64, force_backward=True, **kw)


def _inputs(seed=0, n=5):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 4)), "y": np.array([0, 2, -1, 1, 2][:n]),
            "t": rng.standard_normal((n, 3))}


@pytest.mark.parametrize("normalization", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_two_losses_weighted_top_and_in_place_relu_match_finite_differences(normalization):
    net = _two_loss_net(normalization)
    inputs = _inputs()
    check_gradients(net, inputs, wrt_inputs=("x", "t"))


def test_total_is_the_weighted_sum_written_out_by_hand():
    net = _two_loss_net("VALID")
    inputs = _inputs(1)
    total = net.forward(**inputs)
    assert isinstance(total, np.ndarray) and total.shape == () and total.dtype == np.float64
    (w1, b1), (w2, b2) = [[p.data for p in net.params[n]] for n in ("ip1", "ip2")]
    pre = inputs["x"] @ w1.T + b1
    h = np.maximum(pre, 0)
    z = h @ w2.T + b2
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    keep = inputs["y"] != -1
    ce = -logp[keep, inputs["y"][keep]].sum() / keep.sum()          # Caffe VALID
    euclid = ((z - inputs["t"]) ** 2).sum() / (2 * len(z))           # Caffe EuclideanLoss
    sig = (1 / (1 + np.exp(-h))).sum()
    np.testing.assert_allclose(float(total), ce + 0.3 * euclid + 0.05 * sig, rtol=1e-12)
    terms = {(t.layer, t.top): (t.weight, float(t.value)) for t in net.loss_terms}
    assert terms.keys() == {("loss", "loss"), ("aux", "aux"), ("sig", "s")}
    np.testing.assert_allclose(terms["loss", "loss"], (1.0, ce), rtol=1e-12)
    np.testing.assert_allclose(terms["aux", "aux"], (0.3, euclid), rtol=1e-12)
    np.testing.assert_allclose(terms["sig", "s"], (0.05, sig), rtol=1e-12)
    for t in net.loss_terms:
        assert isinstance(t.value, np.ndarray) and t.value.shape == ()


def test_activation_and_other_losses_match_finite_differences():
    rng = np.random.default_rng(2)
    net = Net([
        L.Input("in", top=["x", "p", "r"], shape=[(3, 4), (3, 2), (3, 2)]),
        L.InnerProduct("ip", "x", "a", num_output=2, weight_filler=G, bias_filler=G),
        L.TanH("tanh", "a", "b"),
        L.Softmax("softmax", "b", "q"),
        L.SigmoidCrossEntropyLoss("sce", ["a", "p"], "sce"),
        L.SmoothL1Loss("sl1", ["b", "r"], "sl1", sigma=2.0, loss_weight=0.7),
        L.EuclideanLoss("e", ["q", "r"], "e", loss_weight=0.5),
        L.ReLU("leaky", "b", "lb", negative_slope=0.1, loss_weight=0.25),
    ], backend="cpu", dtype=np.float64, force_backward=True)
    inputs = {"x": rng.standard_normal((3, 4)), "p": rng.uniform(size=(3, 2)), "r": rng.standard_normal((3, 2))}
    check_gradients(net, inputs, wrt_inputs=("x", "r"))


def test_in_place_layer_whose_input_is_also_read_elsewhere_keeps_both_values():
    """h is read before the in-place ReLU (side1) and after it (side2): side1 must see pre-ReLU values
    in forward and backward, and h's gradient is the sum of both paths."""
    rng = np.random.default_rng(3)
    net = Net([
        L.Input("in", top=["x", "t"], shape=[(4, 3), (4, 2)]),
        L.InnerProduct("ip1", "x", "h", num_output=5, weight_filler=G),
        L.InnerProduct("side1", "h", "s1", num_output=2, weight_filler=G),
        L.ReLU("relu", "h", "h"),
        L.InnerProduct("side2", "h", "s2", num_output=2, weight_filler=G, loss_weight=0.2),
        L.EuclideanLoss("e", ["s1", "t"], "e"),
    ], backend="cpu", dtype=np.float64, force_backward=True)
    inputs = {"x": rng.standard_normal((4, 3)), "t": rng.standard_normal((4, 2))}
    net.forward(**inputs)
    w1 = net.params["ip1"][0].data
    pre = inputs["x"] @ w1.T + net.params["ip1"][1].data
    np.testing.assert_allclose(net.blobs["s1"].data,
                               pre @ net.params["side1"][0].data.T + net.params["side1"][1].data)
    assert (pre < 0).any() and (net.blobs["h"].data >= 0).all()
    check_gradients(net, inputs, wrt_inputs=("x",))


def test_in_place_relu_shares_its_blob_and_leaves_the_callers_array_alone():
    net = Net([L.Input("in", top="x", shape=(4, 3)), L.ReLU("relu", "x", "x", loss_weight=1.0)],
              backend="cpu", dtype=np.float64, force_backward=True)
    x = np.array([[-1.0, 2.0, -3.0]] * 4)
    keep = x.copy()
    total = net.forward(x=x)
    assert float(total) == 8.0
    np.testing.assert_array_equal(x, keep)
    net.backward()
    np.testing.assert_array_equal(net.blobs["x"].diff, (keep > 0) * 1.0)


def test_weights_on_both_sides_of_an_in_place_layer():
    """ip's top is weighted before the in-place ReLU overwrites it, and the ReLU's top after:
    Caffe adds each weighted top right after its layer, so the total holds both values."""
    rng = np.random.default_rng(13)
    net = Net([L.Input("in", top="x", shape=(3, 4)),
               L.InnerProduct("ip", "x", "h", num_output=5, weight_filler=G, loss_weight=0.2),
               L.ReLU("relu", "h", "h", loss_weight=0.5),
               L.TanH("tanh", "h", "h", loss_weight=-0.3)],
              backend="cpu", dtype=np.float64, force_backward=True)
    x = rng.standard_normal((3, 4))
    total = net.forward(x=x)
    pre = x @ net.params["ip"][0].data.T + net.params["ip"][1].data
    assert (pre < 0).any()
    expected = 0.2 * pre.sum() + 0.5 * np.maximum(pre, 0).sum() - 0.3 * np.tanh(np.maximum(pre, 0)).sum()
    np.testing.assert_allclose(float(total), expected, rtol=1e-12)
    check_gradients(net, {"x": x}, wrt_inputs=("x",))


def test_all_ignored_batch_gives_zero_loss_and_zero_gradients():
    for normalization in ("VALID", "FULL", "BATCH_SIZE"):
        net = Net([
            L.Input("in", top=["x", "y"], shape=[(4, 3), (4,)]),
            L.InnerProduct("ip", "x", "z", num_output=3, weight_filler=G, bias_filler=G),
            L.SoftmaxWithLoss("loss", ["z", "y"], "loss", ignore_label=7, normalization=normalization),
        ], backend="cpu", dtype=np.float64, force_backward=True)
        x = np.random.default_rng(4).standard_normal((4, 3))
        total = net.forward(x=x, y=np.full(4, 7))
        assert float(total) == 0.0 and not np.isnan(total)
        net.backward()
        for p in net.params["ip"]:
            np.testing.assert_array_equal(p.diff, 0.0)
        np.testing.assert_array_equal(net.blobs["x"].diff, 0.0)
        check_gradients(net, {"x": x, "y": np.full(4, 7)}, wrt_inputs=("x",))


# -- Caffe's normalization, written out from Caffe's SoftmaxWithLossLayer -------------------------

def _caffe_softmax_loss(x, label, axis, ignore, mode):
    x = np.moveaxis(x, axis, -1)
    logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    lab = label.reshape(x.shape[:-1]).astype(int)
    keep = lab != ignore
    loss = -np.where(keep, np.take_along_axis(logp, np.where(keep, lab, 0)[..., None], -1)[..., 0], 0).sum()
    outer = int(np.prod(x.shape[:axis]))
    norm = {"FULL": lab.size, "VALID": keep.sum(), "BATCH_SIZE": outer, "NONE": 1}[mode]
    return loss / max(1, norm)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_softmax_with_loss_normalization_is_caffes(mode):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 5))         # N=3, C=4 on axis 1, 5 spatial positions
    label = rng.integers(0, 4, (3, 5)).astype(np.float64)   # Caffe's labels are floats
    label[0, :3] = 255
    net = Net([L.Input("in", top=["x", "y"], shape=[(3, 4, 5), (3, 5)]),
               L.SoftmaxWithLoss("loss", ["x", "y"], "loss", ignore_label=255, normalization=mode)],
              backend="cpu", dtype=np.float64, force_backward=True)
    np.testing.assert_allclose(float(net.forward(x=x, y=label)), _caffe_softmax_loss(x, label, 1, 255, mode),
                               rtol=1e-12)
    check_gradients(net, {"x": x, "y": label}, wrt_inputs=("x",))


def test_softmax_axis_and_second_top_prob():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 4))
    label = rng.integers(0, 4, (2, 3))
    net = Net([L.Input("in", top=["x", "y"], shape=[(2, 3, 4), (2, 3)]),
               L.SoftmaxWithLoss("loss", ["x", "y"], ["loss", "prob"], axis=-1)],
              backend="cpu", dtype=np.float64)
    total = net.forward(x=x, y=label)
    np.testing.assert_allclose(float(total), _caffe_softmax_loss(x, label, 2, None, "VALID"), rtol=1e-12)
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(net.blobs["prob"].data, e / e.sum(-1, keepdims=True), rtol=1e-12)
    assert net.weighted_tops == [("loss", "loss", 1.0)]   # the prob top weighs 0 (Caffe's rule)


def test_sigmoid_cross_entropy_defaults_to_batch_size_and_honours_ignore_label():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3))
    t = rng.integers(0, 2, (4, 3)).astype(np.float64)
    t[0] = -1
    l = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    for kw, expected in [({}, l.sum() / 4),
                         ({"ignore_label": -1}, l[1:].sum() / 4),
                         ({"ignore_label": -1, "normalization": "VALID"}, l[1:].sum() / 9),
                         ({"normalization": "FULL"}, l.sum() / 12),
                         ({"normalize": True}, l.sum() / 12),     # legacy: true -> VALID (all valid)
                         ({"normalize": False}, l.sum() / 4)]:
        net = Net([L.Input("in", top=["x", "t"], shape=[(4, 3), (4, 3)]),
                   L.SigmoidCrossEntropyLoss("loss", ["x", "t"], "loss", **kw)], backend="cpu", dtype=np.float64)
        np.testing.assert_allclose(float(net.forward(x=x, t=t)), expected, rtol=1e-12, err_msg=str(kw))


# -- loss_weight exactly as Caffe ----------------------------------------------------------------

def _weights_net(loss_weight=None, aux_weight=None, extra=()):
    aux_kw = {} if aux_weight is None else {"loss_weight": aux_weight}
    loss_kw = {} if loss_weight is None else {"loss_weight": loss_weight}
    return Net([
        L.Input("in", top=["x", "y"], shape=[(4, 3), (4,)]),
        L.InnerProduct("ip", "x", "z", num_output=3, weight_filler=G),
        L.InnerProduct("side", "x", "w", num_output=3, weight_filler=G),
        L.SoftmaxWithLoss("loss", ["z", "y"], "loss", **loss_kw),
        L.SoftmaxWithLoss("aux", ["w", "y"], "aux", **aux_kw),
        L.Accuracy("acc", ["z", "y"], "acc"),
        *extra,
    ], backend="cpu", dtype=np.float64)


def test_implicit_loss_weights():
    net = _weights_net()
    assert net.weighted_tops == [("loss", "loss", 1.0), ("aux", "aux", 1.0)]  # Loss layers: 1; others 0
    x, y = np.random.default_rng(8).standard_normal((4, 3)), np.array([0, 1, 2, 1])
    total = net.forward(x=x, y=y)
    np.testing.assert_allclose(float(total), float(net.blobs["loss"].data) + float(net.blobs["aux"].data))
    assert [(t.layer, t.top, t.weight) for t in net.loss_terms] == [("loss", "loss", 1.0), ("aux", "aux", 1.0)]


def test_explicit_weights_override_and_zero_weight_tops_are_left_out():
    x, y = np.random.default_rng(9).standard_normal((4, 3)), np.array([0, 1, 2, 1])
    net = _weights_net(loss_weight=2.5, aux_weight=0.0,
                       extra=[L.InnerProduct("probe", "x", "pr", num_output=2, weight_filler=G, loss_weight=0.5)])
    total = net.forward(x=x, y=y)
    loss, probe = float(net.blobs["loss"].data), float(net.blobs["pr"].data.sum())
    np.testing.assert_allclose(float(total), 2.5 * loss + 0.5 * probe, rtol=1e-12)
    assert float(net.blobs["aux"].data) > 0    # computed, but not in the total
    assert [(t.layer, t.top, t.weight) for t in net.loss_terms] == [("loss", "loss", 2.5), ("probe", "pr", 0.5)]
    net.backward()
    for p in net.params["side"]:               # feeds only the weight-0 loss: no gradient
        np.testing.assert_array_equal(p.diff, 0.0)
    assert np.abs(net.params["ip"][0].diff).sum() > 0
    np.testing.assert_array_equal(net.blobs["pr"].diff, 0.5)       # seeded with its weight
    assert float(net.blobs["loss"].diff) == 2.5
    check_gradients(net, {"x": x, "y": y})


def test_loss_weight_must_be_given_once_per_top():
    with pytest.raises(GraphError, match=r"layer 'loss'.*loss_weight must be given once per top"):
        L.SoftmaxWithLoss("loss", ["z", "y"], ["loss", "prob"], loss_weight=[1.0])


def test_float32_default_and_the_total_stays_an_array():
    # fuse=False: the logits blob "z" is inspected below (fused, it is never made)
    net = Net([L.Input("in", top=["x", "y"], shape=[(4, 3), (4,)]),
               L.InnerProduct("ip", "x", "z", num_output=3, weight_filler=G),
               L.SoftmaxWithLoss("loss", ["z", "y"], "loss", fuse=False)], backend="cpu")
    total = net.forward(x=np.ones((4, 3)), y=np.array([0, 1, 2, 0]))
    assert isinstance(total, np.ndarray) and total.shape == () and total.dtype == np.float32
    assert net.params["ip"][0].data.dtype == np.float32 and net.blobs["x"].data.dtype == np.float32
    net.forward(x=np.ones((9, 3)), y=np.zeros(9, int))       # another batch size works
    assert net.blobs["z"].data.shape == (9, 3)


# -- Accuracy --------------------------------------------------------------------------------------

def test_accuracy_top_k_ties_and_ignore_label():
    scores = np.array([[0.1, 0.9, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    label = np.array([1, 1, 0, 2])
    cases = [({}, 1 / 4),                                # row 1 ties: counted wrong, as Caffe
             ({"top_k": 2}, 2 / 4),                       # row 3: class 1 ties with the label
             ({"ignore_label": 0}, 1 / 3),
             ({"top_k": 3}, 1.0)]
    for kw, expected in cases:
        net = Net([L.Input("in", top=["s", "y"], shape=[(4, 3), (4,)]), L.Accuracy("acc", ["s", "y"], "acc", **kw)],
                  backend="cpu", dtype=np.float64)
        net.forward(s=scores, y=label)
        assert float(net.blobs["acc"].data) == pytest.approx(expected), kw
    net.forward(s=scores, y=np.zeros(4, int))
    net2 = Net([L.Input("in", top=["s", "y"], shape=[(4, 3), (4,)]),
                L.Accuracy("acc", ["s", "y"], "acc", ignore_label=0)], backend="cpu")
    net2.forward(s=scores, y=np.zeros(4, int))
    assert float(net2.blobs["acc"].data) == 0.0          # nothing left to count: 0, as Caffe


def test_accuracy_rejects_labels_out_of_range():
    net = Net([L.Input("in", top=["s", "y"], shape=[(2, 3), (2,)]), L.Accuracy("acc", ["s", "y"], "acc")],
              backend="cpu")
    with pytest.raises(GraphError, match=r"layer 'acc'.*holds 3 at flat position 1"):
        net.forward(s=np.zeros((2, 3)), y=np.array([0, 3]))


# -- wiring errors name the layer and the blob ------------------------------------------------------

def test_missing_bottom_duplicate_top_and_bad_in_place_are_named():
    inp = L.Input("in", top="x", shape=(2, 3))
    with pytest.raises(GraphError, match=r"layer 'ip' \(InnerProduct\): bottom blob 'nope' is not made"):
        Net([inp, L.InnerProduct("ip", "nope", "z", num_output=2)], backend="cpu")
    with pytest.raises(GraphError, match=r"layer 'ip2' \(InnerProduct\): top blob 'z' is already made by "
                                         r"layer 'ip1'"):
        Net([inp, L.InnerProduct("ip1", "x", "z", num_output=2), L.InnerProduct("ip2", "x", "z", num_output=2)],
            backend="cpu")
    with pytest.raises(GraphError, match=r"layer 'ip' \(InnerProduct\) cannot run in place"):
        Net([inp, L.InnerProduct("ip", "x", "x", num_output=3)], backend="cpu")
    with pytest.raises(GraphError, match=r"layer name 'ip' is used by 2 layers"):
        Net([inp, L.InnerProduct("ip", "x", "a", num_output=2), L.InnerProduct("ip", "x", "b", num_output=2)],
            backend="cpu")
    with pytest.raises(GraphError, match=r"layer 'loss' \(SoftmaxWithLoss\): label 'y'"):
        Net([L.Input("in", top=["x", "y"], shape=[(2, 3), (5,)]),
             L.SoftmaxWithLoss("loss", ["x", "y"], "loss")], backend="cpu")


def test_forward_input_errors():
    net = _weights_net()
    with pytest.raises(GraphError, match=r"input 'q'.*inputs are \['x', 'y'\]"):
        net.forward(q=np.zeros(3))
    with pytest.raises(GraphError, match=r"input 'x' has shape \(4, 5\); the net declares \(4, 3\)"):
        net.forward(x=np.zeros((4, 5)), y=np.zeros(4, int))
    with pytest.raises(GraphError, match=r"missing \['y'\]"):
        _weights_net().forward(x=np.zeros((4, 3)))
    with pytest.raises(GraphError, match="backward\\(\\) needs a forward"):
        _weights_net().backward()


def test_errors_from_the_functional_api_name_the_layer():
    net = _weights_net()
    with pytest.raises(GraphError, match=r"^layer 'loss' \(SoftmaxWithLoss\): .*target"):
        net.forward(x=np.zeros((4, 3)), y=np.array([0, 1, 5, 1]))


def test_propagate_down_false_stops_the_gradient():
    net = Net([L.Input("in", top=["x", "t"], shape=[(3, 2), (3, 2)]),
               L.InnerProduct("ip", "x", "z", num_output=2, weight_filler=G),
               L.EuclideanLoss("e", ["z", "t"], "e", propagate_down=[True, False])],
              backend="cpu", dtype=np.float64, force_backward=True)
    rng = np.random.default_rng(10)
    net.forward(x=rng.standard_normal((3, 2)), t=rng.standard_normal((3, 2)))
    net.backward()
    np.testing.assert_array_equal(net.blobs["t"].diff, 0.0)
    assert np.abs(net.blobs["x"].diff).sum() > 0
    with pytest.raises(GraphError, match=r"layer 'loss'.*propagate_down is true for bottom 'y'"):
        Net([L.Input("in", top=["x", "y"], shape=[(3, 2), (3,)]),
             L.SoftmaxWithLoss("loss", ["x", "y"], "loss", propagate_down=[True, True])], backend="cpu")


def test_time_reports_every_layer():
    net = _weights_net()
    rows = net.time(iterations=2)
    assert [r["layer"] for r in rows] == ["in", "ip", "side", "loss", "aux", "acc"]
    assert all(r["forward_ms"] >= 0 and r["backward_ms"] >= 0 for r in rows)


def test_emulated_backend_trains_the_same_as_cpu():
    """The graph does not care which backend runs the losses: the CUDA kernels compiled for the host
    (docs/design.md §2.3 "emulated") give the cpu backend's numbers."""
    from gpuloss.graph import SGDSolver
    rng = np.random.default_rng(12)
    x, y, t = rng.standard_normal((6, 4)), rng.integers(0, 3, 6), rng.standard_normal((6, 3))
    results = []
    for backend in ("cpu", "emulated"):
        net = Net([L.Input("in", top=["x", "y", "t"], shape=[(6, 4), (6,), (6, 3)]),
                   L.InnerProduct("ip", "x", "z", num_output=3, weight_filler=G),
                   L.SoftmaxWithLoss("loss", ["z", "y"], "loss"),
                   L.SmoothL1Loss("sl1", ["z", "t"], "sl1", loss_weight=0.5),
                   L.SigmoidCrossEntropyLoss("sce", ["z", "t"], "sce", loss_weight=0.1)], backend=backend)
        sol = SGDSolver(net, base_lr=0.1, momentum=0.9)
        losses = [float(sol.step({"x": x, "y": y, "t": (t > 0).astype(float)})) for _ in range(3)]
        results.append((losses, net.params["ip"][0].data.copy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


def test_in_place_layer_on_an_input_that_another_layer_also_reads():
    """ip reads x before an in-place ReLU on x: the ReLU gets its own buffer (net.blobs['x'] is the
    ReLU's value) and every forward still feeds the caller's x to ip."""
    net = Net([L.Input("in", top="x", shape=(3, 4)),
               L.InnerProduct("ip", "x", "z", num_output=2, weight_filler=G, loss_weight=1.0),
               L.ReLU("relu", "x", "x", loss_weight=0.5)],
              backend="cpu", dtype=np.float64, force_backward=True)
    for seed in (0, 1):
        x = np.random.default_rng(seed).standard_normal((3, 4))
        total = net.forward(x=x)
        np.testing.assert_array_equal(net.blobs["x"].data, np.maximum(x, 0))
        w, b = (p.data for p in net.params["ip"])
        np.testing.assert_allclose(float(total), (x @ w.T + b).sum() + 0.5 * np.maximum(x, 0).sum(), rtol=1e-12)
    x = np.random.default_rng(2).standard_normal((3, 4))
    net.forward(x=x)
    net.backward()
    input_blob = net.input_blobs["x"]
    assert input_blob is not net.blobs["x"]
    np.testing.assert_allclose(input_blob.diff, np.ones((3, 2)) @ w + 0.5 * (x > 0), rtol=1e-12)
    check_gradients(net, {"x": x})
