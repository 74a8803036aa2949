"""InnerProduct -> SoftmaxWithLoss runs fused as one linear_cross_entropy call, with the unfused numbers."""
from __future__ import annotations

import numpy as np
import pytest

from gpuloss.graph import GraphError, Net, SGDSolver

NET = """
layer {{ name: "data" type: "Input" top: "x" top: "y"
        input_param {{ shape {{ dim: 6 dim: 2 dim: 3 }} shape {{ dim: 6 }} }} }}
layer {{ name: "fc1" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param {{ num_output: 7 weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "h" top: "h" }}
layer {{ name: "fc2" type: "InnerProduct" bottom: "h" top: "logits"
        inner_product_param {{ num_output: 5 bias_term: {bias} weight_filler {{ type: "gaussian" std: 0.7 }}
                               bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "logits" bottom: "y" top: "loss" {loss_weight}
        loss_param {{ {loss_param} }} }}
{extra}
"""


def _pair(backend="cpu", dtype=np.float64, bias="true", loss_param="", loss_weight="", extra=""):
    text = NET.format(bias=bias, loss_param=loss_param + " fuse: true", loss_weight=loss_weight, extra=extra)
    fused = Net.from_prototxt(text, backend=backend, dtype=dtype)
    plain = Net.from_prototxt(NET.format(bias=bias, loss_param=loss_param + " fuse: false",
                                         loss_weight=loss_weight, extra=extra), backend=backend, dtype=dtype)
    return fused, plain


def _inputs(rng):
    return {"x": rng.standard_normal((6, 2, 3)), "y": rng.integers(0, 5, 6)}


@pytest.mark.parametrize("loss_param", ["", "ignore_label: 2", "normalization: FULL", "normalization: BATCH_SIZE",
                                        "normalization: NONE ignore_label: 0", "z_loss: 0.1 softcap: 2.0"])
@pytest.mark.parametrize("bias", ["true", "false"])
def test_fused_pair_gives_the_unfused_loss_and_gradients(loss_param, bias, rng):
    fused, plain = _pair(bias=bias, loss_param=loss_param, loss_weight="loss_weight: 1.5")
    assert fused._fused_away == {3} and not plain._fused_away
    inputs = _inputs(rng)
    total = float(fused.forward(**inputs))
    fused.backward()
    np.testing.assert_allclose(total, float(plain.forward(**inputs)), rtol=1e-12)
    plain.backward()
    assert fused.blobs["logits"].data is None   # the logits were never made
    for name in plain.params:
        for a, b in zip(fused.params[name], plain.params[name]):
            np.testing.assert_allclose(a.diff, b.diff, rtol=1e-10, atol=1e-14, err_msg=name)


def test_training_fused_and_unfused_gives_the_same_parameters(rng):
    fused, plain = _pair(loss_param="ignore_label: 4")
    sf, sp = SGDSolver(fused, base_lr=0.1, momentum=0.9), SGDSolver(plain, base_lr=0.1, momentum=0.9)
    for _ in range(20):
        inputs = _inputs(rng)
        sf.step(inputs)
        sp.step(inputs)
    for name in plain.params:
        for a, b in zip(fused.params[name], plain.params[name]):
            np.testing.assert_allclose(a.data, b.data, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("extra,why", [
    ('layer { name: "acc" type: "Accuracy" bottom: "logits" bottom: "y" top: "acc" }', "another reader"),
    ('layer { name: "aux" type: "EuclideanLoss" bottom: "logits" bottom: "logits" top: "aux" }', "another reader"),
])
def test_logits_needed_elsewhere_keep_the_pair_apart(extra, why, rng):
    fused, plain = _pair(extra=extra)
    assert not fused._fused_away, why
    inputs = _inputs(rng)
    np.testing.assert_allclose(float(fused.forward(**inputs)), float(plain.forward(**inputs)), rtol=1e-12)


def test_emulated_backend_runs_the_fused_pair(rng):
    fused, plain = _pair(backend="emulated", dtype=np.float32, loss_param="ignore_label: 1")
    inputs = _inputs(rng)
    inputs["x"] = inputs["x"].astype(np.float32)
    np.testing.assert_allclose(float(fused.forward(**inputs)), float(plain.forward(**inputs)), rtol=1e-5)
    fused.backward()
    plain.backward()
    np.testing.assert_allclose(fused.params["fc2"][0].diff, plain.params["fc2"][0].diff, rtol=1e-4, atol=1e-6)


def test_fuse_is_a_softmax_with_loss_field_only():
    with pytest.raises(GraphError, match="apply to SoftmaxWithLoss only"):
        Net.from_prototxt("""
layer { name: "data" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
layer { name: "l" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "l" loss_param { fuse: false } }
""", backend="cpu")


def test_an_in_place_layer_after_the_inner_product_keeps_the_pair_apart(rng):
    """fc -> TanH (in place on the same blob) -> loss: the loss reads the TanH's output, not fc's."""
    text = NET.format(bias="true", loss_param="", loss_weight="", extra="").replace(
        'layer { name: "loss"', 'layer { name: "act" type: "TanH" bottom: "logits" top: "logits" }\nlayer { name: "loss"')
    net = Net.from_prototxt(text, backend="cpu", dtype=np.float64)
    assert not net._fused_away
    inputs = _inputs(rng)
    logits = np.tanh(np.maximum(inputs["x"].reshape(6, 6) @ net.params["fc1"][0].data.T + net.params["fc1"][1].data,
                                0) @ net.params["fc2"][0].data.T + net.params["fc2"][1].data)
    lse = np.log(np.exp(logits).sum(axis=1))
    expected = np.mean(lse - logits[np.arange(6), inputs["y"]])
    np.testing.assert_allclose(float(net.forward(**inputs)), expected, rtol=1e-12)


@pytest.mark.parametrize("classes,batch,fused", [(10, 64, False), (5000, 64, True)])
def test_automatic_fusion_is_for_large_logits(classes, batch, fused):
    """Without a fuse field the pair fuses when its declared logits take at least 1 MiB."""
    net = Net.from_prototxt(f"""
layer {{ name: "data" type: "Input" top: "x" top: "y" input_param {{ shape {{ dim: {batch} dim: 8 }}
                                                                   shape {{ dim: {batch} }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "x" top: "logits" inner_product_param {{ num_output: {classes} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "logits" bottom: "y" top: "loss" }}
""", backend="cpu")
    assert bool(net._fused_away) is fused
