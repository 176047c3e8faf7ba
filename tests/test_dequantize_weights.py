"""passes/dequantize_weights.py: integer-coded weights decoded exactly, as onnxruntime decodes them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fgq_onnx.passes.dequantize_weights import DEQUANTIZED_MARK, DequantizeWeightsPass


def _decoder_model(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, style: str, **attrs) -> onnx.ModelProto:
    """x @ decode(codes) with the decoded weight also a graph output, so onnxruntime shows what it computes."""
    inits = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scale, "scale")]
    if style == "dq":
        inputs = ["codes", "scale"]
        if zero is not None:
            inits.append(numpy_helper.from_array(zero, "zero"))
            inputs.append("zero")
        decode = [helper.make_node("DequantizeLinear", inputs, ["w"], name="decode", **attrs)]
    else:
        decode = [helper.make_node("Cast", ["codes"], ["w.float"], name="cast", to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["scale", "w.float"], ["w"], name="scale")]  # scale first: either order is found
    nodes = [*decode, helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, codes.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("w", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _decoded(model: onnx.ModelProto) -> tuple[np.ndarray, str]:
    ir_model = ir.serde.deserialize_model(model)
    DequantizeWeightsPass()(ir_model)
    (mm,) = [n for n in ir_model.graph if n.op_type == "MatMul"]
    weight = mm.inputs[1]
    assert weight.const_value is not None, "the MatMul must read a float initializer"
    return weight.const_value.numpy(), weight.metadata_props[DEQUANTIZED_MARK]


def _onnxruntime_weight(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["w"], {"x": np.zeros((2, model.graph.initializer[0].dims[0]), np.float32)})[0]


RNG = np.random.default_rng(0)
CODES8 = RNG.integers(-128, 128, (12, 10)).astype(np.int8)
CODESU8 = RNG.integers(0, 256, (12, 10)).astype(np.uint8)


@pytest.mark.parametrize("codes, scale, zero, attrs", [
    (CODES8, np.float32(0.0123), None, {}),  # per tensor, no zero point
    (CODESU8, np.float32(0.031), np.uint8(121), {}),  # per tensor, uint8 with a zero point
    (CODES8, RNG.uniform(1e-3, 0.1, 10).astype(np.float32), RNG.integers(-5, 5, 10).astype(np.int8), {"axis": 1}),  # per output column
    (CODESU8, RNG.uniform(1e-3, 0.1, 12).astype(np.float32), RNG.integers(100, 150, 12).astype(np.uint8), {"axis": 0}),  # per input row
    (CODES8, RNG.uniform(1e-3, 0.1, (3, 10)).astype(np.float32), None, {"axis": 0, "block_size": 4}),  # blocked
], ids=["per_tensor", "per_tensor_zero_point", "axis1", "axis0", "blocked"])
def test_dequantize_linear_is_exact(codes, scale, zero, attrs):
    model = _decoder_model(codes, np.asarray(scale), None if zero is None else np.asarray(zero), "dq", **attrs)
    decoded, how = _decoded(model)
    zp = np.zeros((), np.int32) if zero is None else np.asarray(zero).astype(np.int32)
    scale = np.asarray(scale)
    if attrs.get("block_size"):
        scale = np.repeat(scale, attrs["block_size"], axis=0)[: codes.shape[0]]
    elif scale.ndim == 1:
        shape = [-1, 1] if attrs["axis"] == 0 else [1, -1]
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    expected = (codes.astype(np.int32) - zp).astype(np.float32) * scale
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(decoded, _onnxruntime_weight(model))  # bit for bit what onnxruntime computes
    assert how == f"{codes.dtype.name} weights (DequantizeLinear)"


@pytest.mark.parametrize("scale", [np.float32(0.02), RNG.uniform(1e-3, 0.1, 10).astype(np.float32)], ids=["per_tensor", "per_column"])
def test_cast_mul_is_exact(scale):
    model = _decoder_model(CODES8, np.asarray(scale), None, "cast_mul")
    decoded, how = _decoded(model)
    np.testing.assert_array_equal(decoded, CODES8.astype(np.float32) * scale)
    np.testing.assert_array_equal(decoded, _onnxruntime_weight(model))
    assert how == "int8 weights (Cast and Mul)"


def test_scale_of_the_wrong_shape_is_left_alone():
    model = _decoder_model(CODES8, RNG.uniform(1e-3, 0.1, 7).astype(np.float32), None, "dq", axis=1)  # 7 scales for 10 columns
    ir_model = ir.serde.deserialize_model(model)
    assert not DequantizeWeightsPass()(ir_model).modified
    (mm,) = [n for n in ir_model.graph if n.op_type == "MatMul"]
    assert mm.inputs[1].producer().op_type == "DequantizeLinear"
