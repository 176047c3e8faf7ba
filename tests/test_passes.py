"""The graph passes on tiny models: structure, `modified`, and numerics in onnxruntime."""

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from fgq_onnx.passes.fold_batchnorm import FoldBatchNormPass
from fgq_onnx.passes.insert_activation_qdq import ActivationQuant, InsertActivationQdqPass
from fgq_onnx.passes.ternarize_weights import TERNARY_MARK, TernarizeWeightsPass
from fgq_onnx.ternary import GroupLayout, Method, ternarize
from ir_models import make_model, run

RNG = np.random.default_rng(0)




def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph.all_nodes()]


CONV_MATMUL = """
g (float[2,6,5,5] x, float[2,7] a, float[7,5] b) => (float[2,8,5,5] y, float[2,5] z, float[2,5] u) {
    y = Conv <pads = [1,1,1,1]> (x, w, bias)
    z = MatMul (a, m)
    u = MatMul (a, b)
}
"""


def conv_matmul_model(storage_opset=25):
    weights = {"w": RNG.standard_normal((8, 6, 3, 3)).astype(np.float32), "bias": RNG.standard_normal(8).astype(np.float32), "m": RNG.standard_normal((7, 5)).astype(np.float32)}
    return make_model(CONV_MATMUL, weights, storage_opset), weights


def feeds_for_conv_matmul():
    return {"x": RNG.standard_normal((2, 6, 5, 5)).astype(np.float32), "a": RNG.standard_normal((2, 7)).astype(np.float32), "b": RNG.standard_normal((7, 5)).astype(np.float32)}


@pytest.mark.parametrize(("method", "storage"), [(Method.EXACT, "int2"), (Method.TWN, "int2"), (Method.ASYMMETRIC, "int2"), (Method.EXACT, "int8")])
def test_ternarized_model_computes_with_the_dequantized_weights(method, storage):
    model, weights = conv_matmul_model(25 if storage == "int2" else 21)
    feeds = feeds_for_conv_matmul()
    ternary_pass = TernarizeWeightsPass(4, method, storage)
    result = ternary_pass(model)
    assert result.modified
    # Reference: the same graph with the numpy-dequantized weights put back as floats.
    w_hat = ternarize(weights["w"], GroupLayout(weights["w"].shape, axis=1, n=4), method).dequantize()
    m_hat = ternarize(weights["m"], GroupLayout(weights["m"].shape, axis=0, n=4), method).dequantize()
    reference = make_model(CONV_MATMUL, {**weights, "w": w_hat, "m": m_hat})
    for got, want in zip(run(result.model, feeds), run(reference, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    codes = [v for v in result.model.graph.initializers.values() if v.name.endswith("ternary_codes")]
    assert {c.const_value.dtype for c in codes} == {ir.DataType.INT2 if storage == "int2" else ir.DataType.INT8}


def test_records_and_marks():
    model, _ = conv_matmul_model()
    ternary_pass = TernarizeWeightsPass(4)
    ternary_pass(model)
    by_op = {(r.op_type, r.converted) for r in ternary_pass.records}
    assert by_op == {("Conv", True), ("MatMul", True), ("MatMul", False)}
    skipped = next(r for r in ternary_pass.records if not r.converted)
    assert "activation x activation" in skipped.reason
    marked = [n.op_type for n in model.graph if TERNARY_MARK in n.metadata_props]
    assert sorted(marked) == ["Conv", "MatMul"]
    conv = next(r for r in ternary_pass.records if r.op_type == "Conv")
    assert conv.groups == 8 * 2 * 3 * 3 and conv.short_group == 2 and conv.grouping == "input channels"


def test_blocked_dequantize_attributes():
    model, _ = conv_matmul_model()
    TernarizeWeightsPass(4)(model)
    dq = {n.inputs[0].name: n for n in model.graph if n.op_type == "DequantizeLinear"}
    assert dq["w.ternary_codes"].attributes["axis"].as_int() == 1
    assert dq["m.ternary_codes"].attributes["axis"].as_int() == 0
    assert all(n.attributes["block_size"].as_int() == 4 for n in dq.values())


def test_nothing_to_do_is_not_modified():
    model = make_model("g (float[2,3] a, float[3,4] b) => (float[2,4] y) { y = MatMul (a, b) }", {})
    assert not TernarizeWeightsPass(4)(model).modified


def test_shared_weight_is_ternarized_once():
    text = """
    g (float[2,8] a, float[2,8] b) => (float[2,3] y, float[2,3] z) {
        y = MatMul (a, w)
        z = MatMul (b, w)
    }
    """
    model = make_model(text, {"w": RNG.standard_normal((8, 3)).astype(np.float32)})
    TernarizeWeightsPass(4)(model)
    assert ops(model).count("DequantizeLinear") == 1
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    assert matmuls[0].inputs[1] is matmuls[1].inputs[1]


def test_depthwise_conv_can_group_along_the_filter():
    text = "g (float[1,4,6,6] x) => (float[1,4,4,4] y) { y = Conv <group = 4> (x, w) }"
    w = RNG.standard_normal((4, 1, 3, 3)).astype(np.float32)
    model = make_model(text, {"w": w})
    ternary_pass = TernarizeWeightsPass(4, narrow_conv_groups=False)
    ternary_pass(model)
    assert "Reshape" in ops(model) and "whole filter" in ternary_pass.records[0].grouping
    x = RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w_hat = ternarize(w, GroupLayout(w.shape, axis=1, n=4, flatten=True), Method.EXACT).dequantize()
    reference = make_model(text, {"w": w_hat})
    np.testing.assert_allclose(run(model, {"x": x})[0], run(reference, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_conv_inside_if_branch_is_ternarized():
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y_then"])], "then", [], [onnx.helper.make_tensor_value_info("y_then", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(RNG.standard_normal((2, 4, 1, 1)).astype(np.float32), "w")],
    )
    other = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y_else"])], "else", [], [onnx.helper.make_tensor_value_info("y_else", onnx.TensorProto.FLOAT, None)])
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []), onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 3, 3])], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 25)])
    model = ir.serde.deserialize_model(proto)
    ternary_pass = TernarizeWeightsPass(4)
    assert ternary_pass(model).modified
    assert ternary_pass.records[0].converted
    x = RNG.standard_normal((1, 4, 3, 3)).astype(np.float32)
    out = run(model, {"c": np.array(True), "x": x})[0]
    assert out.shape == (1, 2, 3, 3)


def test_requires_the_opset_the_storage_needs():
    model, _ = conv_matmul_model(storage_opset=21)
    with pytest.raises(ir.passes.PreconditionError):
        TernarizeWeightsPass(4, storage="int2")(model)


def test_fold_batchnorm_preserves_outputs():
    text = """
    g (float[2,3,5,5] x) => (float[2,4,5,5] y) {
        c = Conv <pads = [1,1,1,1]> (x, w, b)
        y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
    }
    """
    weights = {
        "w": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "b": RNG.standard_normal(4).astype(np.float32),
        "gamma": RNG.uniform(0.5, 2, 4).astype(np.float32), "beta": RNG.standard_normal(4).astype(np.float32),
        "mean": RNG.standard_normal(4).astype(np.float32), "var": RNG.uniform(0.1, 2, 4).astype(np.float32),
    }
    model = make_model(text, weights)
    x = RNG.standard_normal((2, 3, 5, 5)).astype(np.float32)
    before = run(model, {"x": x})[0]
    assert FoldBatchNormPass()(model).modified
    assert "BatchNormalization" not in ops(model)
    assert model.graph.outputs[0].name == "y"
    np.testing.assert_allclose(run(model, {"x": x})[0], before, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_leaves_a_shared_conv_output_alone():
    text = """
    g (float[1,2,3,3] x) => (float[1,2,3,3] y, float[1,2,3,3] c) {
        c = Conv (x, w)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    ones = np.ones(2, np.float32)
    model = make_model(text, {"w": np.ones((2, 2, 1, 1), np.float32), "gamma": ones, "beta": ones, "mean": ones, "var": ones})
    assert not FoldBatchNormPass()(model).modified


@pytest.mark.parametrize(("bits", "signed"), [(8, False), (8, True), (4, False), (4, True)])
def test_activation_qdq_quantizes_to_the_levels(bits, signed):
    text = "g (float[1,16] a) => (float[1,1] y) { y = MatMul (a, w) }"
    model = make_model(text, {"w": np.eye(16, 1, dtype=np.float32)})
    TernarizeWeightsPass(4)(model)
    quant = ActivationQuant(scale=0.1, signed=signed, bits=bits)
    assert InsertActivationQdqPass({"a": quant})(model).modified
    assert ("Clip" in ops(model)) == (bits == 4)
    # With the weight selecting a[0], y is the fake-quantized a[0].
    for value in [-3.0, -0.26, 0.04, 0.06, 0.73, 100.0]:
        a = np.zeros((1, 16), np.float32)
        a[0, 0] = value
        y = run(model, {"a": a})[0][0, 0]
        expected = np.clip(np.round(value / 0.1), quant.qmin, quant.qmax) * 0.1
        assert y == pytest.approx(expected, abs=1e-6), value
