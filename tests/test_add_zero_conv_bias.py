"""AddZeroConvBiasPass: bias-less ternary Convs in the qdq format get a zero bias.

Without it onnxruntime's QDQ fusion makes DequantizeLinear -> Conv ->
QuantizeLinear a QLinearConv, which refuses INT2 codes at load and blocked
int8 scales at run time: `--format qdq --no-bias-correction` failed on every
model with a bias-less Conv.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from fgq_onnx.pipeline import convert
from ir_models import make_model


def _bias_less_model(tmp_path):
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(24, 8, 1, 1)).astype(np.float32), "w2": rng.normal(size=(8, 24, 3, 3)).astype(np.float32),
               "w3": rng.normal(size=(8, 8, 1, 1)).astype(np.float32),
               "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    model = make_model("""
        g (float[2, 8, 9, 9] x) => (float[2, 8, 9, 9] y) {
            c1 = Conv (x, w1)
            a1 = Clip (c1, lo, hi)
            c2 = Conv <pads = [1, 1, 1, 1]> (a1, w2)
            y = Conv (c2, w3)
        }""", weights, opset=21)
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(ir.serde.serialize_model(model), path)
    np.savez(calib, x=rng.uniform(-1, 1, (16, 8, 9, 9)).astype(np.float32))
    return path, calib


def _run(proto: onnx.ModelProto, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("storage", ["int2", "int8"])
def test_bias_less_convs_convert_and_run(tmp_path, storage):
    path, calib = _bias_less_model(tmp_path)
    proto = ir.serde.serialize_model(convert(path, calib=calib, n=4, format="qdq", bias_correction=False, weight_storage=storage).model)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    zero = {t.name for t in proto.graph.initializer if t.name.endswith(".zero_bias")}
    assert len(convs) == 3 and all(len(n.input) == 3 and n.input[2] in zero for n in convs)
    assert all(not onnx.numpy_helper.to_array(t).any() for t in proto.graph.initializer if t.name in zero)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 9, 9)).astype(np.float32)
    fused = _run(proto, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)  # loaded and ran: no QLinearConv
    np.testing.assert_allclose(fused, _run(proto, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), rtol=1e-5, atol=1e-5)


def test_custom_format_gets_no_zero_bias(tmp_path):
    path, calib = _bias_less_model(tmp_path)
    proto = ir.serde.serialize_model(convert(path, calib=calib, n=4, bias_correction=False).model)
    assert not [t.name for t in proto.graph.initializer if t.name.endswith(".zero_bias")]
