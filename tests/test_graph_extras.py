"""SoftmaxWithLoss with gpuloss's loss_param extension: z_loss (PaLM §5) and softcap (Gemma 2)."""
from __future__ import annotations

import numpy as np
import pytest

import gpuloss as gl
from gpuloss.graph import GraphError, Net

from .test_graph_net import check_gradients

NET = """
name: "extras"
layer {{ name: "data" type: "Input" top: "x" top: "y"
        input_param {{ shape {{ dim: 5 dim: 7 }} shape {{ dim: 5 }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "x" top: "logits"
        inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.8 }} }} }}
layer {{ name: "loss" type: "{loss_type}" bottom: "logits" bottom: "y" top: "loss"
        loss_param {{ {loss_param} }} }}
"""


def _net(loss_param: str, loss_type: str = "SoftmaxWithLoss"):
    return Net.from_prototxt(NET.format(loss_param=loss_param, loss_type=loss_type), backend="cpu",
                             dtype=np.float64)


@pytest.mark.parametrize("loss_param", ["z_loss: 0.05", "softcap: 1.5", "z_loss: 0.2 softcap: 2.0 ignore_label: 3",
                                        "z_loss: 0.1 normalization: BATCH_SIZE"])
def test_extras_equal_the_functional_call_and_their_gradients_are_right(loss_param, rng):
    net = _net(loss_param + " fuse: false")   # keep the logits blob to compare with (fused: test_graph_fused)
    x = rng.standard_normal((5, 7))
    y = rng.integers(0, 4, 5).astype(np.float64)
    total = float(net.forward(x=x, y=y))
    layer = net.layer("loss") if hasattr(net, "layer") else [l for l in net.layers if l.name == "loss"][0]
    logits = net.blobs["logits"].data
    expected = gl.softmax_cross_entropy(logits, y.astype(np.int64), axis=1, reduction=layer.reduction,
                                        z_loss=layer.z_loss, softcap=layer.softcap,
                                        ignore_index=layer.ignore_label)
    np.testing.assert_allclose(total, float(expected), rtol=1e-12)
    plain = _net("")
    plain.share_params_from(net)
    if "z_loss" in loss_param or "softcap" in loss_param:
        assert float(plain.forward(x=x, y=y)) != total  # the extension changed the number
    check_gradients(net, {"x": x, "y": y})


@pytest.mark.parametrize("loss_param,message", [("z_loss: -0.1", "z_loss must be >= 0"),
                                                ("softcap: 0", "softcap must be > 0"),
                                                ("softcap: -2", "softcap must be > 0")])
def test_bad_extras_are_refused_at_load(loss_param, message):
    with pytest.raises(GraphError, match=message):
        _net(loss_param)


def test_extras_on_other_loss_layers_are_refused():
    with pytest.raises(GraphError, match="apply to SoftmaxWithLoss only"):
        _net("z_loss: 0.1", loss_type="SigmoidCrossEntropyLoss")
