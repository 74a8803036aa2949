"""Caffe prototxt: real syntax loads unchanged; what gpuloss lacks is named with layer, field and line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpuloss.graph import GraphError, Net, PrototxtError, layers as L
from gpuloss.graph.layers import Filler
from gpuloss.graph.proto import parse_net

DATA = Path(__file__).parent / "data"
LENET = DATA / "lenet_ip.prototxt"


def test_lenet_style_prototxt_loads_per_phase():
    train = Net.from_prototxt(LENET, phase="TRAIN", backend="cpu")
    test = Net.from_prototxt(str(LENET), phase="TEST", backend="cpu")
    assert train.name == "LeNet"
    assert [l.name for l in train.layers] == ["mnist", "ip0", "ip1", "relu1", "ip2", "loss"]
    assert [l.name for l in test.layers] == ["mnist", "ip0", "ip1", "relu1", "ip2", "accuracy", "loss"]
    assert train.input_shape("data") == (64, 1, 28, 28) and test.input_shape("data") == (100, 1, 28, 28)
    w, b = train.params["ip1"]
    assert w.data.shape == (500, 50) and b.data.shape == (500,)
    assert (w.lr_mult, b.lr_mult) == (1.0, 2.0) and (w.decay_mult, b.decay_mult) == (1.0, 1.0)
    a = np.sqrt(3.0 / 50)                         # xavier: U(-sqrt(3/fan_in), +), fan_in = 50
    assert np.abs(w.data).max() <= a and np.abs(w.data).max() > 0.9 * a
    np.testing.assert_array_equal(b.data, 0.0)   # constant filler, value 0
    assert train.weighted_tops == [("loss", "loss", 1.0)]
    rng = np.random.default_rng(0)
    total = train.forward(data=rng.uniform(size=(64, 1, 28, 28)), label=rng.integers(0, 10, 64))
    assert 1.0 < float(total) < 5.0                # about log(10) at initialisation
    test.forward(data=rng.uniform(size=(100, 1, 28, 28)), label=rng.integers(0, 10, 100))
    assert 0.0 <= float(test.blobs["accuracy"].data) <= 1.0


def test_text_and_path_give_the_same_net():
    text = LENET.read_text()
    a = Net.from_prototxt(text, backend="cpu", seed=3)
    b = Net.from_prototxt(LENET, backend="cpu", seed=3)
    for name in a.params:
        for pa, pb in zip(a.params[name], b.params[name]):
            np.testing.assert_array_equal(pa.data, pb.data)


def test_python_and_prototxt_build_the_same_net():
    text = """
    name: "small"
    input: "x"  input_shape { dim: 4 dim: 3 }
    input: "y"  input_shape { dim: 4 }
    layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
            inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.25 }
                                  bias_filler { type: "uniform" min: -1 max: 1 } } }
    layer { name: "act" type: "TanH" bottom: "fc" top: "fc" }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "y" top: "loss"
            loss_param { ignore_label: 4 normalization: BATCH_SIZE } loss_weight: 2 }
    """
    a = Net.from_prototxt(text, backend="cpu", dtype=np.float64, seed=11)
    b = Net([L.InnerProduct("fc", "x", "fc", num_output=5, weight_filler=Filler("gaussian", std=0.25),
                            bias_filler=Filler("uniform", min=-1, max=1)),
             L.TanH("act", "fc", "fc"),
             L.SoftmaxWithLoss("loss", ["fc", "y"], "loss", ignore_label=4, normalization="BATCH_SIZE",
                               loss_weight=2.0)],
            inputs={"x": (4, 3), "y": (4,)}, backend="cpu", dtype=np.float64, seed=11)
    x, y = np.random.default_rng(1).standard_normal((4, 3)), np.array([0, 4, 2, 1])
    assert a.input_names == ["x", "y"]
    assert float(a.forward(x=x, y=y)) == float(b.forward(x=x, y=y))
    assert a.weighted_tops == b.weighted_tops == [("loss", "loss", 2.0)]


def test_input_dim_and_legacy_normalize():
    net = Net.from_prototxt("""
        input: "x" input_dim: 2 input_dim: 3 input_dim: 1 input_dim: 1
        input: "y" input_dim: 2 input_dim: 1 input_dim: 1 input_dim: 1
        layer { name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "l"
                loss_param { normalize: false } }""", backend="cpu")
    assert net.input_shape("x") == (2, 3, 1, 1)
    assert net.layers[0].normalization == "BATCH_SIZE"     # Caffe: normalize false -> BATCH_SIZE
    net = Net.from_prototxt("""input: "x" input_shape { dim: 2 dim: 3 } input: "y" input_shape { dim: 2 }
        layer { name: "l" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "x" top: "l" }""", backend="cpu")
    assert net.layers[0].normalization == "BATCH_SIZE"     # Caffe's default for this layer


def test_exclude_rules_and_stages():
    text = """input: "x" input_shape { dim: 2 dim: 3 }
        layer { name: "a" type: "ReLU" bottom: "x" top: "a" exclude { phase: TEST } }
        layer { name: "b" type: "ReLU" bottom: "x" top: "b" include { stage: "deep" } }
        layer { name: "c" type: "ReLU" bottom: "x" top: "c" include { phase: TEST not_stage: "deep" } }"""
    assert [l.name for l in Net.from_prototxt(text, phase="TRAIN", backend="cpu").layers] == ["a"]
    assert [l.name for l in Net.from_prototxt(text, phase="TEST", backend="cpu").layers] == ["c"]
    assert [l.name for l in Net.from_prototxt(text, phase="TEST", backend="cpu", stages=("deep",)).layers] == ["b"]


def test_convolution_is_an_unsupported_layer_type_naming_the_layer():
    with_param = LENET.read_text().replace(
        'layer {\n  name: "ip0"',
        'layer {\n  name: "conv1"\n  type: "Convolution"\n  bottom: "data"\n  top: "conv1"\n'
        '  convolution_param {\n    num_output: 20\n    kernel_size: 5\n  }\n}\nlayer {\n  name: "ip0"')
    with pytest.raises(PrototxtError) as e:
        Net.from_prototxt(with_param, backend="cpu")
    msg = str(e.value)
    assert "layer 'conv1'" in msg and "unsupported layer type 'Convolution'" in msg
    assert "convolution_param" in msg and "<string>:30:" in msg
    with pytest.raises(GraphError, match=r"layer 'conv1': unsupported layer type 'Convolution'; gpuloss "
                                         r"implements Accuracy, .*InnerProduct"):
        Net.from_prototxt('input: "x" input_shape { dim: 1 }\n'
                          'layer { name: "conv1" type: "Convolution" bottom: "x" top: "c" }', backend="cpu")


def test_unknown_field_names_line_layer_and_field(tmp_path):
    path = tmp_path / "bad.prototxt"
    text = LENET.read_text().replace("    num_output: 500\n", "    num_output: 500\n    num_ouput: 3\n")
    path.write_text(text)
    line = text.splitlines().index("    num_ouput: 3") + 1
    with pytest.raises(PrototxtError) as e:
        Net.from_prototxt(path, backend="cpu")
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}:5: ")
    assert "layer 'ip1' (type 'InnerProduct')" in msg and "field 'num_ouput' is not supported" in msg
    assert "InnerProductParameter" in msg


def test_bad_wiring_in_prototxt_names_the_layer_and_file(tmp_path):
    path = tmp_path / "wiring.prototxt"
    path.write_text(LENET.read_text().replace('bottom: "ip1"\n  top: "ip2"', 'bottom: "ipX"\n  top: "ip2"'))
    with pytest.raises(GraphError, match=rf"{path}: layer 'ip2' \(InnerProduct\): bottom blob 'ipX' is not made"):
        Net.from_prototxt(path, backend="cpu")
    path.write_text(LENET.read_text().replace('top: "ip2"', 'top: "ip0"'))
    with pytest.raises(GraphError, match=r"layer 'ip2' \(InnerProduct\): top blob 'ip0' is already made by "
                                         r"layer 'ip0'"):
        Net.from_prototxt(path, backend="cpu")


@pytest.mark.parametrize("snippet, message", [
    ('layer { name: "f" type: "InnerProduct" bottom: "x" top: "f" relu_param { negative_slope: 1 } '
     'inner_product_param { num_output: 2 } }', r"layer 'f' \(InnerProduct\): field 'relu_param' is not read"),
    ('layer { name: "f" type: "InnerProduct" bottom: "x" top: "f" inner_product_param { num_output: 2 '
     'transpose: true } }', r"layer 'f' \(InnerProduct\): field 'transpose' is not supported"),
    ('layer { name: "f" type: "InnerProduct" bottom: "x" top: "f" inner_product_param { num_output: 2 '
     'weight_filler { type: "gaussian" sparse: 3 } } }', r"layer 'f' \(InnerProduct\) weight_filler: filler field "
                                                           r"'sparse'"),
    ('layer { name: "f" type: "InnerProduct" bottom: "x" top: "f" inner_product_param { num_output: 2 '
     'weight_filler { type: "bilinear" } } }', r"filler type 'bilinear' is not supported"),
    ('layer { name: "f" type: "InnerProduct" bottom: "x" top: "f" }', r"layer 'f'.*needs num_output"),
    ('layer { name: "f" type: "InnerProduct" bottom: "x" top: "f" param { name: "shared" } '
     'inner_product_param { num_output: 2 } }', r"layer 'f': param 0 .*weight sharing"),
    ('layer { name: "r" type: "ReLU" bottom: "x" top: "r" loss_weight: 1 loss_weight: 2 }',
     r"layer 'r': loss_weight must be given once per top"),
    ('layer { name: "r" type: "ReLU" bottom: "x" top: "a" top: "b" }', r"layer 'r' \(ReLU\) makes 1 top"),
    ('layer { type: "ReLU" bottom: "x" top: "r" }', r"a layer of type 'ReLU' has no name"),
    ('layer { name: "r" type: "ReLU" bottom: "x" top: "r" include { phase: TRAIN } exclude { phase: TEST } }',
     r"layer 'r': give include rules or exclude rules, not both"),
])
def test_unsupported_or_inconsistent_fields_are_named(snippet, message):
    with pytest.raises(GraphError, match=message):
        Net.from_prototxt('input: "x" input_shape { dim: 2 dim: 3 }\n' + snippet, backend="cpu")


def test_syntax_errors_and_missing_files():
    with pytest.raises(PrototxtError, match=r"<string>:2:"):
        parse_net('name: "x"\nlayer { name: "a" ')
    with pytest.raises(PrototxtError, match=r"cannot read prototxt file 'no/such.prototxt'"):
        Net.from_prototxt("no/such.prototxt", backend="cpu")
    with pytest.raises(PrototxtError, match=r"field 'layers' is not supported"):   # Caffe's V1 format
        Net.from_prototxt('layers { name: "a" }', backend="cpu")
