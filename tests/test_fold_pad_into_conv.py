"""FoldPadIntoConvPass: a zero constant Pad in front of Convs goes into their pads."""

from __future__ import annotations

import numpy as np
import pytest

from fgq_onnx.passes.fold_pad_into_conv import FoldPadIntoConvPass
from ir_models import make_model, run

RNG = np.random.default_rng(7)
X = RNG.normal(size=(2, 3, 9, 8)).astype(np.float32)


def _weights(**extra):
    weights = {"w": RNG.normal(size=(4, 3, 3, 3)), "w1": RNG.normal(size=(3, 1, 5, 5))}
    return {**{k: v.astype(np.float32) for k, v in weights.items()}, **extra}


def _pads(*values):
    return np.array(values, np.int64)


def _folds(text: str, weights: dict, opset: int = 25):
    model = make_model(text, weights, opset)
    want = run(model, {"x": X})
    assert FoldPadIntoConvPass()(model).modified
    assert "Pad" not in [n.op_type for n in model.graph]
    for got, expected in zip(run(model, {"x": X}), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    return model


@pytest.mark.parametrize("conv_attrs", ["", "<strides = [2, 2]>", "<pads = [1, 0, 0, 2], dilations = [2, 1]>",
                                        '<auto_pad = "NOTSET", strides = [2, 1]>'])
def test_folds_an_asymmetric_pad(conv_attrs):
    text = f"g (float[2, 3, 9, 8] x) => (float y) {{ p = Pad(x, pads)\n y = Conv {conv_attrs} (p, w) }}"
    model = _folds(text, _weights(pads=_pads(0, 0, 1, 2, 0, 0, 2, 1)))
    [conv] = list(model.graph)
    extra = [1, 0, 0, 2] if "pads" in conv_attrs else [0, 0, 0, 0]
    assert list(conv.attributes["pads"].value) == [e + a for e, a in zip(extra, [1, 2, 2, 1])]


def test_folds_a_pad_with_an_explicit_zero_value_into_every_conv_reading_it():
    text = """g (float[2, 3, 9, 8] x) => (float y, float z) {
        p = Pad(x, pads, zero)
        y = Conv <strides = [2, 2]> (p, w)
        z = Conv <group = 3> (p, w1)
    }"""
    _folds(text, _weights(pads=_pads(0, 0, 2, 2, 0, 0, 2, 2), zero=np.float32(0)))


def test_folds_the_attribute_form_of_opset_10():
    text = "g (float[2, 3, 9, 8] x) => (float y) { p = Pad <pads = [0, 0, 1, 1, 0, 0, 1, 1]> (x)\n y = Conv (p, w) }"
    _folds(text, _weights(), opset=10)


@pytest.mark.parametrize("pad_call, extra", [
    ("Pad(x, pads, value)", {"value": np.float32(0.5)}),  # non-zero value
    ('Pad <mode = "reflect"> (x, pads)', {}),
    ('Pad <mode = "edge"> (x, pads)', {}),
])
def test_leaves_pads_that_are_not_zero_constants(pad_call, extra):
    text = f"g (float[2, 3, 9, 8] x) => (float y) {{ p = {pad_call}\n y = Conv (p, w) }}"
    model = make_model(text, _weights(pads=_pads(0, 0, 1, 1, 0, 0, 1, 1), **extra))
    assert not FoldPadIntoConvPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Pad", "Conv"]


@pytest.mark.parametrize("pads", [(0, 1, 1, 1, 0, 0, 1, 1), (1, 0, 1, 1, 0, 0, 1, 1), (0, 0, 1, 1, 0, 1, 1, 1),
                                  (0, 0, -1, 0, 0, 0, 1, 1)])
def test_leaves_batch_channel_and_negative_pads(pads):
    text = "g (float[2, 3, 9, 8] x) => (float y) { p = Pad(x, pads)\n y = Conv <group = 1> (p, w) }"
    weights = _weights(pads=_pads(*pads))
    if pads[1] or pads[5]:  # the channel-padded input needs a wider weight to be a valid model
        weights["w"] = RNG.normal(size=(4, 3 + pads[1] + pads[5], 3, 3)).astype(np.float32)
    model = make_model(text, weights)
    assert not FoldPadIntoConvPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Pad", "Conv"]


@pytest.mark.parametrize("text", [
    # pads fed at run time
    "g (float[2, 3, 9, 8] x, int64[8] pads) => (float y) { p = Pad(x, pads)\n y = Conv (p, w) }",
    # one consumer is not a Conv
    "g (float[2, 3, 9, 8] x) => (float y, float z) { p = Pad(x, pads)\n y = Conv (p, w)\n z = Relu(p) }",
    # the Pad's output is also a graph output
    "g (float[2, 3, 9, 8] x) => (float y, float p) { p = Pad(x, pads)\n y = Conv (p, w) }",
    # auto_pad decides the Conv's padding itself
    'g (float[2, 3, 9, 8] x) => (float y) { p = Pad(x, pads)\n y = Conv <auto_pad = "SAME_UPPER"> (p, w) }',
])
def test_leaves_pads_the_conv_cannot_take(text):
    weights = _weights() if "int64[8] pads" in text else _weights(pads=_pads(0, 0, 1, 1, 0, 0, 1, 1))
    model = make_model(text, weights)
    ops = [n.op_type for n in model.graph]
    assert not FoldPadIntoConvPass()(model).modified
    assert [n.op_type for n in model.graph] == ops


def test_leaves_a_pad_with_axes():
    text = "g (float[2, 3, 9, 8] x) => (float y) { p = Pad(x, pads, zero, axes)\n y = Conv (p, w) }"
    model = make_model(text, _weights(pads=_pads(1, 1, 1, 1), zero=np.float32(0), axes=_pads(2, 3)))
    assert not FoldPadIntoConvPass()(model).modified
