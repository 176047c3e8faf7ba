"""Sign tracing (fgq_onnx.calibration.non_negative_by_construction) and what it makes the converter write.

A tensor that is >= 0 by construction, through whatever exporters put between a Relu/Clip and the next
layer, is quantized as uint8 over all 256 levels; anything that may be negative stays int8. Each
pattern is checked on the traced tensor, then end to end: the activation zero point (and TernaryConv's
act_qmin/act_qmax) in the QDQ and the custom format the converter writes, and the custom model's
output against the QDQ model's.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from fgq_onnx.calibration import non_negative_by_construction
from fgq_onnx.pipeline import convert
from ir_models import make_model

RNG = np.random.default_rng(12)
C = 8  # channels of the traced tensor `t`, which feeds `y = Conv(t, w)` (3x3, pads 1)


INT64_INPUTS = ("pads", "shape", "axes", "index")


def _weights(**extra) -> dict[str, np.ndarray]:
    arrays = {"w": RNG.standard_normal((6, C, 3, 3)).astype(np.float32), "zero": np.float32(0), "six": np.float32(6)}
    arrays.update({k: np.asarray(v, np.int64 if k in INT64_INPUTS else np.float32) for k, v in extra.items()})
    return arrays


PADS = [0, 0, 1, 1, 0, 0, 1, 1]
# (name, body computing t from x [1, C, 6, 6] (or NHWC where stated), extra initializers, non-negative?)
PATTERNS = [
    ("relu-cast-transpose", "r = Relu (x)\n c = Cast <to = 1> (r)\n t = Transpose <perm = [0, 3, 1, 2]> (c)", {}, True),
    ("clip06-pad", "r = Clip (x, zero, six)\n t = Pad <mode = \"constant\"> (r, pads)", {"pads": PADS}, True),
    ("clip06-pad-zero-constant", "r = Clip (x, zero, six)\n t = Pad (r, pads, zero)", {"pads": PADS}, True),
    ("relu-pad-reflect", "r = Relu (x)\n t = Pad <mode = \"reflect\"> (r, pads)", {"pads": PADS}, True),
    ("relu-maxpool-concat", "r = Relu (x)\n a = MaxPool <kernel_shape = [2, 2], pads = [0, 0, 1, 1]> (r)\n"
     " s = Sigmoid (x)\n t = Concat <axis = 2> (a, s)", {}, True),
    ("relu-avgpool-resize", "r = Relu (x)\n a = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r)\n"
     " t = Resize <mode = \"linear\"> (a, , scales)", {"scales": [1, 1, 1, 1]}, True),
    ("relu-reshape-flatten", "r = Relu (x)\n f = Flatten (r)\n t = Reshape (f, shape)", {"shape": [1, C, 6, 6]}, True),
    ("relu-squeeze-unsqueeze-identity", "r = Relu (x)\n u = Unsqueeze (r, axes)\n s = Squeeze (u, axes)\n"
     " t = Identity (s)", {"axes": [0]}, True),
    ("relu-split-concat", "r = Relu (x)\n a, b = Split <axis = 1, num_outputs = 2> (r)\n"
     " t = Concat <axis = 1> (b, a)", {}, True),
    ("relu-gather", "r = Relu (x)\n t = Gather <axis = 1> (r, index)", {"index": np.arange(C)[::-1].copy()}, True),
    ("relu-mul-div-positive", "r = Relu (x)\n m = Mul (r, half)\n t = Div (m, two)", {"half": 0.5, "two": 2.0}, True),
    ("relu6-times-sigmoid", "r = Clip (x, zero, six)\n s = Sigmoid (x)\n t = Mul (r, s)", {}, True),
    ("add-of-relus", "a = Relu (x)\n s = Softmax <axis = 1> (x)\n t = Add (a, s)", {}, True),
    ("max-with-zero", "t = Max (x, zero)", {}, True),
    ("sign-preserving-clip-after-relu", "r = Relu (x)\n t = Clip (r, , six)", {}, True),
    # must stay signed
    ("concat-one-signed", "r = Relu (x)\n t = Concat <axis = 2> (r, x)", {}, False),
    ("pad-negative-constant", "r = Relu (x)\n t = Pad (r, pads, minus)", {"pads": PADS, "minus": -1.0}, False),
    ("sub", "r = Relu (x)\n t = Sub (r, half)", {"half": 0.5}, False),
    ("mul-negative-constant", "r = Relu (x)\n t = Mul (r, minus)", {"minus": -1.0}, False),
    ("mul-non-constant", "r = Relu (x)\n n = Neg (x)\n t = Mul (r, n)", {}, False),
    ("layernorm", "r = Relu (x)\n t = LayerNormalization <axis = 1> (r, gamma, beta)",
     {"gamma": np.ones((C, 6, 6)), "beta": np.zeros((C, 6, 6))}, False),
    ("resize-cubic", "r = Relu (x)\n t = Resize <mode = \"cubic\"> (r, , scales)", {"scales": [1, 1, 1, 1]}, False),
    ("clip-negative-min", "t = Clip (x, minus, six)", {"minus": -1.0}, False),
    ("cast-to-int", "r = Relu (x)\n i = Cast <to = 6> (r)\n t = Cast <to = 1> (i)", {}, False),
    ("leaky-relu", "t = LeakyRelu (x)", {}, False),
]


CONV = "y = Conv <pads = [1, 1, 1, 1]> (t, w)"


def pattern_model(body: str, extra: dict | None = None, nhwc: bool = False, layer: str = CONV,
                  opset: int = 25) -> ir.Model:
    """x -> body -> t -> layer -> y."""
    x_shape = f"1, 6, 6, {C}" if nhwc else f"1, {C}, 6, 6"
    text = f"g (float[{x_shape}] x) => (float y) {{\n {body}\n {layer}\n}}"
    return make_model(text, _weights(**(extra or {})), opset)


def traced(model: ir.Model) -> ir.Value:
    """The activation input of the model's layer."""
    return next(node for node in model.graph if node.op_type in ("Conv", "Gemm", "MatMul")).inputs[0]


@pytest.mark.parametrize(("name", "body", "extra", "want"), PATTERNS, ids=[p[0] for p in PATTERNS])
def test_sign_rule(name, body, extra, want):
    assert non_negative_by_construction(traced(pattern_model(body, extra, "transpose" in name))) is want


def test_graph_input_counts_only_when_the_caller_says_so():
    model = pattern_model("t = Transpose <perm = [0, 3, 1, 2]> (x)", nhwc=True)
    assert not non_negative_by_construction(traced(model))
    assert non_negative_by_construction(traced(model), graph_inputs=True)


def test_old_opset_clip_and_pad_attributes():
    assert non_negative_by_construction(traced(pattern_model("t = Clip <min = 0.0, max = 6.0> (x)", opset=6)))
    assert not non_negative_by_construction(traced(pattern_model("t = Clip <min = -1.0, max = 6.0> (x)", opset=6)))
    for value, want in ((0.0, True), (-1.0, False)):
        body = f"r = Relu (x)\n t = Pad <pads = [0, 0, 1, 1, 0, 0, 1, 1], value = {value}> (r)"
        assert non_negative_by_construction(traced(pattern_model(body, opset=10))) is want


def test_constant_node_operand():
    for value, want in ((3.0, True), (-3.0, False)):
        body = f"r = Relu (x)\n k = Constant <value_float = {value}> ()\n t = Mul (r, k)"
        assert non_negative_by_construction(traced(pattern_model(body))) is want


def test_a_long_chain_is_traced_and_bounded():
    # Every Add reads its predecessor twice: without memoizing this would take 2^60 steps.
    adds = "".join(f" a{i} = Add (a{i - 1}, a{i - 1})\n" for i in range(1, 60))
    body = f"a0 = Relu (x)\n{adds} t = Identity (a59)"
    assert non_negative_by_construction(traced(pattern_model(body)))
    copies = "".join(f" a{i} = Identity (a{i - 1})\n" for i in range(1, 400))
    body = f"a0 = Relu (x)\n{copies} t = Identity (a399)"
    assert not non_negative_by_construction(traced(pattern_model(body)))  # past the depth bound: signed


# -- end to end: the zero point and levels the converter writes ------------------------------------


def _activation_zero_point(model: onnx.ModelProto) -> tuple[int, tuple[int, int] | None]:
    """(zero point dtype, (act_qmin, act_qmax) of a com.fgq node or None) of the ternary layer's activation."""
    inits = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    layer = next(n for n in model.graph.node if n.op_type.removeprefix("Ternary") in ("Conv", "Gemm", "MatMul"))
    if layer.op_type.startswith("Ternary"):
        attrs = {a.name: a.i for a in layer.attribute}
        return inits[layer.input[2]].data_type, (attrs["act_qmin"], attrs["act_qmax"])
    dequantize = producers[layer.input[0]]
    assert dequantize.op_type == "DequantizeLinear"
    return inits[dequantize.input[2]].data_type, None


def _basic_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_written_sign(model: ir.Model, x: np.ndarray, folder, want: bool) -> None:
    """Convert with calibration data x [samples, ...] to qdq and custom; check the activation's levels."""
    calib = folder / "calib.npz"
    np.savez(calib, x=x)
    qdq = ir.serde.serialize_model(convert(model, calib=calib, n=4, bias_correction=False, format="qdq").model)
    custom = ir.serde.serialize_model(convert(model, calib=calib, n=4, bias_correction=False, format="custom").model)
    unsigned, signed = onnx.TensorProto.UINT8, onnx.TensorProto.INT8
    assert _activation_zero_point(qdq) == (unsigned if want else signed, None)
    zero_point, (qmin, qmax) = _activation_zero_point(custom)
    if want:
        assert (zero_point, qmin, qmax) == (unsigned, 0, 255)
    else:  # the levels may be narrowed to a Clip's range, but they stay int8 and reach below 0
        assert zero_point == signed and -128 <= qmin < 0 < qmax <= 127
    # Without the library the custom model runs its function bodies: the same levels as the QDQ model.
    feed = {"x": x[:1]}
    np.testing.assert_allclose(_basic_session(custom).run(None, feed)[0], _basic_session(qdq).run(None, feed)[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "body", "extra", "want"), PATTERNS, ids=[p[0] for p in PATTERNS])
def test_converter_writes_the_traced_sign(tmp_path, name, body, extra, want):
    nhwc = "transpose" in name
    x = RNG.standard_normal((8, *([6, 6, C] if nhwc else [C, 6, 6]))).astype(np.float32) * 3
    check_written_sign(pattern_model(body, extra, nhwc), x, tmp_path, want)


LINEAR_PATTERNS = [  # (name, body, layer, want): TernaryMatMul and TernaryGemm in the custom format
    ("relu-transpose-matmul", "r = Relu (x)\n t = Transpose <perm = [0, 1, 3, 2]> (r)", "y = MatMul (t, m)", True),
    ("relu-flatten-gemm", "r = Relu (x)\n t = Flatten (r)", "y = Gemm <transB = 1> (t, g)", True),
    ("layernorm-matmul", "t = LayerNormalization <axis = -1> (x, gamma6, beta6)", "y = MatMul (t, m)", False),
]


@pytest.mark.parametrize(("name", "body", "layer", "want"), LINEAR_PATTERNS, ids=[p[0] for p in LINEAR_PATTERNS])
def test_converter_writes_the_traced_sign_for_matmul_and_gemm(tmp_path, name, body, layer, want):
    extra = {"m": RNG.standard_normal((6, 16)), "g": RNG.standard_normal((16, C * 36)), "gamma6": np.ones(6),
             "beta6": np.zeros(6)}
    x = RNG.standard_normal((8, C, 6, 6)).astype(np.float32) * 3
    check_written_sign(pattern_model(body, extra, layer=layer), x, tmp_path, want)


def test_nhwc_image_input_through_transpose_is_unsigned(tmp_path):
    """A graph input that the calibration data never makes negative, reaching the Conv through a Transpose."""
    model = pattern_model("t = Transpose <perm = [0, 3, 1, 2]> (x)", nhwc=True)
    check_written_sign(model, RNG.uniform(0, 1, (8, 6, 6, C)).astype(np.float32), tmp_path, True)
    check_written_sign(model, RNG.standard_normal((8, 6, 6, C)).astype(np.float32), tmp_path, False)
