"""FoldBiasAddPass and FuseActivationPass: what exporters write after a layer goes into the com.fgq op.

Each float model is converted (qdq), then rewritten by to_custom_ops. Patterns
that must match leave no float op behind and give the right attributes;
patterns that must not match keep their nodes. Either way the fused model
computes what the unfused float graph (the qdq model) does: with the library,
and with the FunctionProtos alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from test_custom_format import _basic_session, _kernel_session

from fgq_onnx.custom_op_functions import DOMAIN
from fgq_onnx.pipeline import convert
from ir_models import make_model

RNG = np.random.default_rng(7)
CONV_WEIGHTS = {"w": RNG.normal(size=(8, 4, 3, 3)).astype(np.float32), "bias": RNG.normal(size=(1, 8, 1, 1)).astype(np.float32),
                "three": np.float32(3), "zero": np.float32(0), "six": np.float32(6), "five": np.float32(5),
                "sixth": np.float32(1 / 6), "two": np.float32(2.5), "vec": RNG.normal(size=8).astype(np.float32)}


def _conv_graph(body: str, outputs: str = "float[2, 8, 6, 8] y", inputs: str = "") -> str:
    """x [2, 4, 6, 8] -> c = Conv(x) [2, 8, 6, 8] -> b = c + bias -> `body`."""
    extra = f", {inputs}" if inputs else ""
    return f"""g (float[2, 4, 6, 8] x{extra}) => ({outputs}) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        b = Add (c, bias)
        {body}
    }}"""


def _fuse(tmp_path, text: str, weights: dict, feeds: dict) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(the fused custom model, feeds); checks library == function bodies == the qdq model on the feeds."""
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(ir.serde.serialize_model(make_model(text, weights, opset=21)), path)
    np.savez(calib, **{k: RNG.uniform(-1, 1, (8, *v.shape[1:])).astype(np.float32) for k, v in feeds.items()})
    qdq = ir.serde.serialize_model(convert(path, calib=calib, n=4, act_bits=8, bias_correction=False, format="qdq").model)
    fused = convert(path, calib=calib, n=4, act_bits=8, bias_correction=False).model
    fused = ir.serde.serialize_model(fused)
    onnx.checker.check_model(fused)
    want = _basic_session(qdq).run(None, feeds)
    for got in (_kernel_session(fused).run(None, feeds), _basic_session(fused).run(None, feeds)):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))
    return fused, feeds


def _x(shape=(2, 4, 6, 8)):
    return {"x": RNG.uniform(-1, 1, shape).astype(np.float32)}


def _op(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == op_type]
    return node


def _attr(node: onnx.NodeProto, name: str):
    found = [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name]
    return found[0] if found else None


def _float_ops(model: onnx.ModelProto) -> list[str]:
    return sorted(n.op_type for n in model.graph.node if n.domain != DOMAIN)


HARD_SWISH_FORMS = {
    "paddle": "a = Add (b, three)\n k = Clip (a, zero, six)\n m = Mul (b, k)\n y = Div (m, six)",
    "times-sixth": "a = Add (three, b)\n k = Clip (a, zero, six)\n m = Mul (k, b)\n y = Mul (sixth, m)",
    "scaled-gate": "a = Add (b, three)\n k = Clip (a, zero, six)\n s = Div (k, six)\n y = Mul (s, b)",
    "scaled-gate-mul": "a = Add (b, three)\n k = Clip (a, zero, six)\n s = Mul (k, sixth)\n y = Mul (b, s)",
    "hardsigmoid": "h = HardSigmoid <alpha: float = 0.16666667, beta: float = 0.5> (b)\n y = Mul (b, h)",
    "op": "y = HardSwish (b)",
}


@pytest.mark.parametrize("form", HARD_SWISH_FORMS, ids=list(HARD_SWISH_FORMS))
def test_hard_swish_forms_fuse_with_the_bias(tmp_path, form):
    fused, _ = _fuse(tmp_path, _conv_graph(HARD_SWISH_FORMS[form]), CONV_WEIGHTS, _x())
    assert _float_ops(fused) == []
    conv = _op(fused, "TernaryConv")
    assert _attr(conv, "activation") == b"hardswish" and _attr(conv, "activation_params") is None
    assert conv.overload == "hardswish" and conv.output[0] == "y"
    assert ("TernaryConv", "hardswish") in {(f.name, f.overload) for f in fused.functions}


@pytest.mark.parametrize("body,kind,params", [
    ("y = Clip (b, zero, six)", b"clip", [0.0, 6.0]),
    ("y = Clip (b, two, six)", b"clip", [2.5, 6.0]),
    ("y = HardSigmoid <alpha: float = 0.2, beta: float = 0.5> (b)", b"hardsigmoid", [0.2, 0.5]),
])
def test_single_activations_fuse(tmp_path, body, kind, params):
    fused, _ = _fuse(tmp_path, _conv_graph(body), CONV_WEIGHTS, _x())
    conv = _op(fused, "TernaryConv")
    assert _float_ops(fused) == [] and _attr(conv, "activation") == kind
    np.testing.assert_allclose(_attr(conv, "activation_params"), params, rtol=1e-7)


def test_relu_after_a_bias_add_sets_the_conv_relu(tmp_path):
    fused, _ = _fuse(tmp_path, _conv_graph("y = Relu (b)"), CONV_WEIGHTS, _x())
    conv = _op(fused, "TernaryConv")
    assert _float_ops(fused) == [] and _attr(conv, "relu") == 1 and _attr(conv, "activation") is None


def test_se_gate_fuses_only_the_hardsigmoid(tmp_path):
    body = "h = HardSigmoid <alpha: float = 0.2, beta: float = 0.5> (b)\n y = Mul (h, g)"
    fused, _ = _fuse(tmp_path, _conv_graph(body, inputs="float[2, 8, 6, 8] g"), CONV_WEIGHTS,
                     {**_x(), "g": RNG.normal(size=(2, 8, 6, 8)).astype(np.float32)})
    assert _float_ops(fused) == ["Mul"] and _attr(_op(fused, "TernaryConv"), "activation") == b"hardsigmoid"


@pytest.mark.parametrize("body,outputs,left", [
    # wrong constants
    ("a = Add (b, two)\n k = Clip (a, zero, six)\n m = Mul (b, k)\n y = Div (m, six)", None, ["Add", "Clip", "Div", "Mul"]),
    ("a = Add (b, three)\n k = Clip (a, zero, five)\n m = Mul (b, k)\n y = Div (m, six)", None, ["Add", "Clip", "Div", "Mul"]),
    ("a = Add (b, three)\n k = Clip (a, zero, six)\n m = Mul (b, k)\n y = Div (m, five)", None, ["Add", "Clip", "Div", "Mul"]),
    ("h = HardSigmoid <alpha: float = 0.2, beta: float = 0.5> (b)\n y = Mul (b, h)", None, ["HardSigmoid", "Mul"]),
    ("y = Clip (b, six, zero)", None, ["Clip"]),  # min > max
    # the product is not of y itself
    ("a = Add (b, three)\n k = Clip (a, zero, six)\n m = Mul (k, k)\n y = Div (m, six)", None, ["Add", "Clip", "Div", "Mul"]),
    # an intermediate is a graph output
    ("a = Add (b, three)\n k = Clip (a, zero, six)\n m = Mul (b, k)\n y = Div (m, six)", "float[2, 8, 6, 8] y, float[2, 8, 6, 8] m",
     ["Add", "Clip", "Div", "Mul"]),
    ("y = Relu (b)", "float[2, 8, 6, 8] y, float[2, 8, 6, 8] b", ["Relu"]),
    # y read by a third node
    ("a = Add (b, three)\n k = Clip (a, zero, six)\n m = Mul (b, k)\n y = Div (m, six)\n z = Relu (b)",
     "float[2, 8, 6, 8] y, float[2, 8, 6, 8] z", ["Add", "Clip", "Div", "Mul", "Relu"]),
])
def test_activations_that_must_not_fuse(tmp_path, body, outputs, left):
    fused, _ = _fuse(tmp_path, _conv_graph(body, outputs or "float[2, 8, 6, 8] y"), CONV_WEIGHTS, _x())
    conv = _op(fused, "TernaryConv")
    assert _float_ops(fused) == left
    assert _attr(conv, "activation") is None and _attr(conv, "relu") == 0
    assert len(conv.input) == 9 and conv.input[8] != ""  # the bias Add itself was folded


@pytest.mark.parametrize("text,left", [
    # a per-channel addend that is not a constant
    ("g (float[2, 1, 6, 8] x) => (float[2, 8, 6, 8] y) { c = Conv <pads = [1, 1, 1, 1]> (x, w)\n"
     " v = GlobalAveragePool (x)\n y = Add (c, v) }", ["Add", "GlobalAveragePool"]),
    # [8] broadcasts along the width, not the channels
    ("g (float[2, 1, 6, 8] x) => (float[2, 8, 6, 8] y) { c = Conv <pads = [1, 1, 1, 1]> (x, w)\n y = Add (c, vec) }", ["Add"]),
    # the conv output has another reader
    ("g (float[2, 1, 6, 8] x) => (float[2, 8, 6, 8] y, float[2, 8, 6, 8] z) "
     "{ c = Conv <pads = [1, 1, 1, 1]> (x, w)\n y = Add (c, bias)\n z = Relu (c) }", ["Add", "Relu"]),
    # a constant after the ReLU is not a bias
    ("g (float[2, 1, 6, 8] x) => (float[2, 8, 6, 8] y) "
     "{ c = Conv <pads = [1, 1, 1, 1]> (x, w)\n r = Relu (c)\n y = Add (r, bias) }", ["Add"]),
])
def test_adds_that_must_not_fold(tmp_path, text, left):
    fused, _ = _fuse(tmp_path, text, {**CONV_WEIGHTS, "w": CONV_WEIGHTS["w"][:, :1]}, _x((2, 1, 6, 8)))
    assert _float_ops(fused) == left
    assert len(_op(fused, "TernaryConv").input) < 9  # no bias input


def test_conv_with_a_bias_gets_the_add_folded_into_it(tmp_path):
    text = """g (float[2, 4, 6, 8] x) => (float[2, 8, 6, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, vec)
        b = Add (bias, c)
        y = Clip (b, zero, six)
    }"""
    fused, _ = _fuse(tmp_path, text, CONV_WEIGHTS, _x())
    assert _float_ops(fused) == []
    conv = _op(fused, "TernaryConv")
    bias = next(onnx.numpy_helper.to_array(t) for t in fused.graph.initializer if t.name == conv.input[8])
    assert bias.shape == (8,)


MATMUL_WEIGHTS = {"w": RNG.normal(size=(16, 8)).astype(np.float32), "bias": RNG.normal(size=8).astype(np.float32),
                  "row": RNG.normal(size=(1, 1, 8)).astype(np.float32), "zero": np.float32(0), "six": np.float32(6),
                  "wt": RNG.normal(size=(8, 16)).astype(np.float32)}


@pytest.mark.parametrize("body,op,bias_first", [
    ("m = MatMul (x, w)\n b = Add (bias, m)\n y = Relu (b)", "TernaryMatMul", True),
    ("m = MatMul (x, w)\n b = Add (m, row)\n y = Clip (b, zero, six)", "TernaryMatMul", False),
    ("m = MatMul (x, w)\n y = Add (m, bias)", "TernaryMatMul", False),
])
def test_matmul_bias_and_activation(tmp_path, body, op, bias_first):
    text = f"g (float[2, 3, 16] x) => (float[2, 3, 8] y) {{ {body} }}"
    fused, _ = _fuse(tmp_path, text, MATMUL_WEIGHTS, _x((2, 3, 16)))
    node = _op(fused, op)
    assert _float_ops(fused) == [] and len(node.input) == 9 and node.output[0] == "y"


def test_gemm_bias_and_activation(tmp_path):
    text = """g (float[4, 16] x) => (float[4, 8] y) {
        m = Gemm <transB: int = 1> (x, wt, bias)
        b = Add (m, bias)
        y = Relu (b)
    }"""
    fused, _ = _fuse(tmp_path, text, MATMUL_WEIGHTS, _x((4, 16)))
    gemm = _op(fused, "TernaryGemm")
    assert _float_ops(fused) == [] and _attr(gemm, "relu") == 1 and gemm.overload == ""


AFFINE_WEIGHTS = {**CONV_WEIGHTS, "scale": np.float32(1.7), "shift": np.float32(-0.3)}


@pytest.mark.parametrize("body,overload,params", [
    (HARD_SWISH_FORMS["paddle"].replace("y = Div", "h = Div") + "\n s = Mul (scale, h)\n y = Add (s, shift)",
     "hardswish-affine", [1.7, -0.3]),
    ("r = Relu (b)\n s = Mul (r, scale)\n y = Add (shift, s)", "affine", [1.7, -0.3]),
    ("r = Clip (b, zero, six)\n y = Add (r, shift)", "clip-affine", [1.0, -0.3]),
])
def test_scalar_affine_after_an_activation_fuses(tmp_path, body, overload, params):
    fused, _ = _fuse(tmp_path, _conv_graph(body), AFFINE_WEIGHTS, _x())
    conv = _op(fused, "TernaryConv")
    assert _float_ops(fused) == [] and conv.overload == overload
    np.testing.assert_allclose(_attr(conv, "activation_affine"), params, rtol=1e-7)


@pytest.mark.parametrize("body,left", [
    ("y = Mul (b, scale)", ["Mul"]),  # no activation before it: not an activation's affine
    ("r = Relu (b)\n y = Mul (r, bias)", ["Mul"]),  # per channel, not one value
])
def test_affine_that_must_not_fuse(tmp_path, body, left):
    fused, _ = _fuse(tmp_path, _conv_graph(body), AFFINE_WEIGHTS, _x())
    conv = _op(fused, "TernaryConv")
    assert _float_ops(fused) == left and _attr(conv, "activation_affine") is None
