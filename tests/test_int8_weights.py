"""int8 weights: layers at N=1 under u8 scales, stored as symmetric per-channel int8 (8 bits a weight).

For each layer kind (Conv 3x3, 1x1, strided, depthwise, grouped, a 3-channel stem, 5 channels; Gemm with
transB 0 and 1; MatMul) converted at N=1: the qdq model's weight is the
standard per-channel DequantizeLinear of int8 codes equal to a numpy absmax
quantization; the custom model's node takes those codes as int8 `scales`
under one shared row of +1 `codes`; and the library, the function body, the qdq model and a
float model fed the numpy-dequantized weight and activation agree. Then
the bytes the report and --n auto count, the old N=1 ternary form giving
the same outputs, onnx-graphsurgeon's round trip, and malformed int8 nodes
failing with an error.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import fgq_onnx
from fgq_onnx import mixed, pipeline
from fgq_onnx.packing import pack_rows

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_runtime_helpers import build_model, library_or_skip  # noqa: E402

# name: (op, weight shape, attributes, input shape, the weight's output-channel axis)
LAYERS = {
    "conv3x3": ("Conv", (8, 4, 3, 3), dict(pads=[1, 1, 1, 1]), (2, 4, 7, 7), 0),
    "conv1x1": ("Conv", (8, 4, 1, 1), {}, (2, 4, 5, 5), 0),
    "strided": ("Conv", (6, 4, 3, 3), dict(strides=[2, 2], pads=[1, 0, 1, 0]), (2, 4, 9, 8), 0),
    "depthwise": ("Conv", (4, 1, 3, 3), dict(group=4, pads=[1, 1, 1, 1]), (2, 4, 6, 6), 0),
    "grouped": ("Conv", (8, 2, 3, 3), dict(group=2), (2, 4, 6, 6), 0),
    "stem": ("Conv", (20, 3, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1]), (2, 3, 9, 9), 0),  # per-tap rows
    "conv5ch": ("Conv", (20, 5, 3, 3), dict(pads=[1, 0, 1, 1]), (2, 5, 6, 7), 0),  # channels past a chunk
    "gemm_transb": ("Gemm", (6, 20), dict(transB=1), (5, 20), 0),
    "gemm": ("Gemm", (20, 6), {}, (5, 20), 1),
    "matmul": ("MatMul", (20, 6), {}, (3, 5, 20), 1),
}


def _float_model(op: str, weight: np.ndarray, attrs: dict, x_shape, bias: np.ndarray | None = None) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(weight, "w")] + ([numpy_helper.from_array(bias, "b")] if bias is not None else [])
    node = helper.make_node(op, ["x", "w"] + (["b"] if bias is not None else []), ["y"], name="layer", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _absmax_int8(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 in numpy: scale = max|w| / 127 per output channel, codes rounded half to even."""
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    scale = (np.abs(moved).max(axis=1) / np.float32(127)).astype(np.float32)
    codes = np.clip(np.rint(np.abs(moved) / scale[:, None]), 0, 127) * np.sign(moved)
    shape = [weight.shape[axis]] + [d for i, d in enumerate(weight.shape) if i != axis]
    return np.moveaxis(codes.reshape(shape), 0, axis).astype(np.int8), scale


def _initializer(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


def _session(proto: onnx.ModelProto, as_written: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if as_written:  # no onnxruntime int8 kernels nor int32 bias: the qdq graph's own arithmetic
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=sorted(LAYERS))
def converted(request, tmp_path_factory):
    """(layer name, fp32 weight, its models: qdq and custom, the report, a test input)."""
    name = request.param
    op, shape, attrs, x_shape, _ = LAYERS[name]
    rng = np.random.default_rng(sorted(LAYERS).index(name))
    weight = rng.normal(0, 0.5, shape).astype(np.float32)
    folder = tmp_path_factory.mktemp(name)
    onnx.save(_float_model(op, weight, attrs, ("batch", *x_shape[1:])), folder / "fp32.onnx")
    np.savez(folder / "calib.npz", x=rng.normal(0, 1, (16, *x_shape[1:])).astype(np.float32))
    models = {}
    for form in ("qdq", "custom"):
        model, report = fgq_onnx.convert(folder / "fp32.onnx", n=4, layer_n={"layer": 1}, calib=folder / "calib.npz",
                                         bias_correction=False, format=form)
        models[form] = ir.serde.serialize_model(model)
    return name, weight, models, report, rng.normal(0, 1, x_shape).astype(np.float32)


def test_qdq_weight_is_per_channel_int8(converted):
    name, weight, models, report, _ = converted
    proto, axis = models["qdq"], LAYERS[name][4]
    (dq,) = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".int8")]
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": axis}  # no block_size: the standard per-channel form
    codes, scale = _initializer(proto, dq.input[0]), _initializer(proto, dq.input[1])
    want_codes, want_scale = _absmax_int8(weight, axis)
    assert codes.dtype == np.int8 and codes.shape == weight.shape and scale.dtype == np.float32
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scale, want_scale)
    (layer,) = report.layers
    assert (layer.n, layer.grouping, layer.code_bytes, layer.scale_bytes) == (1, "int8 per channel", weight.size, 4 * weight.shape[axis])
    assert not [t for t in proto.graph.initializer if t.data_type in (TensorProto.INT2, TensorProto.UINT8) and t.name.startswith("w.")]


def test_custom_node_takes_int8_rows_under_one_row_of_codes(converted):
    name, weight, models, _, _ = converted
    proto, axis = models["custom"], LAYERS[name][4]
    (node,) = [n for n in proto.graph.node if n.domain == "com.fgq"]
    rows, row_scale = _initializer(proto, node.input[4]), _initializer(proto, node.input[5])
    assert rows.dtype == np.int8 and rows.shape == (weight.shape[axis], weight.size // weight.shape[axis])
    assert row_scale.shape == (weight.shape[axis],) and node.overload == ""  # the ternary ops' own body
    np.testing.assert_array_equal(_initializer(proto, node.input[3]), pack_rows(np.ones((1, rows.shape[1]))))  # one shared row of +1


def _dequantized_input(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """x through the qdq model's activation QuantizeLinear/DequantizeLinear, in numpy (division, half to even)."""
    (q,) = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    scale, zero = _initializer(proto, q.input[1]), _initializer(proto, q.input[2])
    limits = np.iinfo(zero.dtype)  # uint8 or int8
    levels = np.clip(np.rint(x / scale) + zero.astype(np.float32), limits.min, limits.max)
    return ((levels - zero.astype(np.float32)) * scale).astype(np.float32)


def test_library_body_qdq_and_numpy_agree(converted):
    library_or_skip()
    from fgq_onnx import runtime

    name, weight, models, _, x = converted
    op, _, attrs, x_shape, axis = LAYERS[name]
    codes, scale = _absmax_int8(weight, axis)
    shape = [1] * weight.ndim
    shape[axis] = -1
    dequantized = (codes.astype(np.float32) * scale.reshape(shape)).astype(np.float32)
    (reference,) = _session(_float_model(op, dequantized, attrs, x_shape)).run(None, {"x": _dequantized_input(models["qdq"], x)})
    (qdq,) = _session(models["qdq"], as_written=True).run(None, {"x": x})
    (body,) = _session(models["custom"]).run(None, {"x": x})  # no library: onnxruntime inlines the int8 body
    tolerance = 1e-5 * float(np.abs(reference).max())
    np.testing.assert_allclose(qdq, reference, rtol=0, atol=tolerance)
    np.testing.assert_allclose(body, reference, rtol=0, atol=tolerance)
    for kernel in (None, "ref"):  # the best path here, and the reference (dense rows on both, for any batch)
        for rows in (x[:1], x):
            (library,) = runtime.inference_session(models["custom"].SerializeToString(), kernel=kernel).run(None, {"x": rows})
            np.testing.assert_allclose(library, reference[: len(rows)], rtol=0, atol=tolerance)


def test_bias_correction_scales_the_int8_row_scale(tmp_path):
    """The per-channel gain lands in the int8 weight's row scale; the library still matches the qdq model."""
    library_or_skip()
    from fgq_onnx import runtime

    rng = np.random.default_rng(5)
    weight = rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)
    onnx.save(_float_model("Conv", weight, dict(pads=[1, 1, 1, 1]), ("batch", 4, 6, 6)), tmp_path / "fp32.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(0, 1, (16, 4, 6, 6)).astype(np.float32))
    outputs = {}
    x = rng.normal(0, 1, (2, 4, 6, 6)).astype(np.float32)
    for form in ("qdq", "custom"):
        model, _ = fgq_onnx.convert(tmp_path / "fp32.onnx", n=4, layer_n={"layer": 1}, calib=tmp_path / "calib.npz", format=form)
        proto = ir.serde.serialize_model(model)
        if form == "qdq":
            assert any(t.name.endswith("row_scale.corrected") for t in proto.graph.initializer)
            (outputs[form],) = _session(proto, as_written=True).run(None, {"x": x})
        else:
            (outputs[form],) = runtime.inference_session(proto.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(outputs["custom"], outputs["qdq"], rtol=0, atol=1e-5 * float(np.abs(outputs["qdq"]).max()))


def test_qdq_model_round_trips_through_graphsurgeon(converted):
    gs = pytest.importorskip("onnx_graphsurgeon")
    _, _, models, _, x = converted
    again = gs.export_onnx(gs.import_onnx(models["qdq"]))
    again.ir_version, again.opset_import[0].version = models["qdq"].ir_version, models["qdq"].opset_import[0].version
    np.testing.assert_array_equal(_session(again).run(None, {"x": x})[0], _session(models["qdq"]).run(None, {"x": x})[0])


def test_auto_counts_the_int8_bytes_written():
    """--n auto's 8-bit choice costs what TernarizeWeightsPass writes: a byte a weight and a float32 scale a row."""
    rng = np.random.default_rng(6)
    weights = {"w0": rng.normal(0, 0.2, (32, 24)).astype(np.float32)}
    from ir_models import make_model

    model = make_model("g (float[N, 32] x) => (float[N, 24] y) { y = MatMul(x, w0) }", weights)
    config = pipeline.ConvertConfig(n="auto", min_sqnr=20.0, act_bits=0, bias_correction=False, auto_ns=(4,))
    (layer,) = mixed.sensitivity(model, [{"x": rng.normal(0, 1, (8, 32)).astype(np.float32)}], config, ns=(mixed.EIGHT_BIT, 4))
    assert layer.nbytes[mixed.EIGHT_BIT] == 32 * 24 + 4 * 24
    assert layer.kl[mixed.EIGHT_BIT] < layer.kl[4]


# -- the custom ops' int8 form against the old N=1 ternary form, and malformed int8 nodes -------------------

K, M = 20, 6


def _int8_inputs(rng, m=M, k=K):
    weights = rng.integers(-127, 128, (m, k)).astype(np.int8)
    weights[0, 0], weights[-1, -1] = 127, -127
    return dict(x_scale=np.float32(0.05), x_zero_point=np.uint8(128), codes=pack_rows(np.ones((1, k))), scales=weights,
                row_scale=rng.uniform(0.01, 0.1, m).astype(np.float32))


def _as_ternary(inputs: dict) -> dict:
    """The same weights in the N=1 ternary form older files hold: 2-bit signs, uint8 magnitudes."""
    weights = inputs["scales"].astype(np.int16)
    return {**inputs, "codes": pack_rows(np.sign(weights)), "scales": np.abs(weights).astype(np.uint8)}


def _codes(*values: int, k: int = K) -> np.ndarray:
    """One shared row of +1 codes with `values` at its start."""
    row = np.ones((1, k))
    row[0, : len(values)] = values
    return pack_rows(row)


@pytest.mark.parametrize("kernel", [None, "ref"])
def test_int8_form_equals_the_old_ternary_form(kernel):
    library_or_skip()
    from fgq_onnx import runtime

    rng = np.random.default_rng(7)
    x = rng.normal(0, 2, (9, K)).astype(np.float32)  # >= 4 rows: the folded form where the path has it
    int8 = _int8_inputs(rng)
    outputs = [runtime.inference_session(build_model("TernaryMatMul", inputs, dict(N=1, K=K), [9, K]).SerializeToString(),
                                         kernel=kernel).run(None, {"X": x})[0] for inputs in (int8, _as_ternary(int8))]
    # The int8 form runs dense from natural rows on every path; so does the old form on the SIMD paths (the
    # folded store: the same bits), while the reference runs it from the codes (its own float rounding).
    if kernel is None:
        np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-6 * np.abs(outputs[1]).max())
    conv = _int8_inputs(rng, 4, 9)
    attrs = dict(N=1, weight_shape=[4, 1, 3, 3], group=4, pads=[1, 1, 1, 1])
    xc = rng.normal(0, 2, (1, 4, 6, 6)).astype(np.float32)
    depthwise = [runtime.inference_session(build_model("TernaryConv", inputs, attrs, [1, 4, 6, 6]).SerializeToString(),
                                           kernel=kernel).run(None, {"X": xc})[0] for inputs in (conv, _as_ternary(conv))]
    np.testing.assert_array_equal(depthwise[0], depthwise[1])


@pytest.mark.parametrize("kernel", [None, "ref"])
def test_int8_weights_fed_per_run_equal_constant_ones(kernel):
    """The GEMM's dense form is chosen from the scales' declared type: weights fed per run take it too."""
    library_or_skip()
    from fgq_onnx import runtime

    rng = np.random.default_rng(12)
    conv = _int8_inputs(rng, 8, 45) | dict(codes=_codes(k=45))  # weight_shape [8, 5, 3, 3]: 45 weights a row
    for op, inputs, attrs, x in (
        ("TernaryMatMul", _int8_inputs(rng), dict(N=1, K=K), rng.normal(0, 2, (3, K)).astype(np.float32)),
        ("TernaryConv", conv, dict(N=1, weight_shape=[8, 5, 3, 3], pads=[1, 1, 1, 1]), rng.normal(0, 2, (1, 5, 6, 7)).astype(np.float32)),
    ):
        weights = {name: inputs[name] for name in ("codes", "scales", "row_scale")}
        constant, fed = (runtime.inference_session(build_model(op, inputs, attrs, list(x.shape), constant=c).SerializeToString(),
                                                   kernel=kernel).run(None, {"X": x} | ({} if c else weights))[0] for c in (True, False))
        np.testing.assert_array_equal(constant, fed)


def _expect_error(model, feeds, match):
    library_or_skip()
    from fgq_onnx import runtime

    with pytest.raises(Exception) as info:
        runtime.inference_session(model.SerializeToString()).run(None, feeds)
    assert not isinstance(info.value, (SystemExit, KeyboardInterrupt))
    assert match in str(info.value), str(info.value)


BAD = np.full((M, K), 3, np.int8)
BAD[2, 7] = -128


@pytest.mark.parametrize(
    ("change", "attrs", "match"),
    [
        (dict(scales=np.ones((M, K + 1), np.int8)), {}, "int8 weights (scales) shape"),
        (dict(scales=np.ones((M * K,), np.int8)), {}, "int8 weights (scales) shape"),
        (dict(scales=BAD), {}, "-128"),
        (dict(row_scale=np.ones(M + 1, np.float32)), {}, "row_scale shape"),
        (dict(row_scale=None), {}, "need the row_scale"),
        (dict(codes=pack_rows(np.ones((M, K)))), {}, "codes of one row"),
        (dict(codes=pack_rows(np.ones((1, K + 4)))), {}, "codes of one row"),
        (dict(codes=None), {}, "input 3"),  # onnxruntime refuses it: codes is a required input
        (dict(codes=_codes(1, 0)), {}, "all +1"),
        (dict(codes=_codes(-1)), {}, "all +1"),
        (dict(codes=np.full((1, 5), 0xFF, np.uint8)), {}, "all +1"),
        (dict(codes=_codes(k=K - 1)), {}, "all +1"),  # 19 codes, then a zero where the 20th +1 is due
        (dict(neg_scales=np.ones((M, K), np.int8)), {}, "no neg_scales"),
        ({}, dict(N=2), "need N = 1"),
    ],
)
def test_malformed_int8_nodes_fail_with_an_error(change, attrs, match):
    inputs = {**_int8_inputs(np.random.default_rng(8)), **change}
    _expect_error(build_model("TernaryMatMul", inputs, dict(N=1, K=K) | attrs, [2, K]), {"X": np.ones((2, K), np.float32)}, match)


def test_malformed_int8_weights_at_run_time_and_in_a_conv():
    inputs = _int8_inputs(np.random.default_rng(9)) | dict(scales=BAD)
    model = build_model("TernaryMatMul", inputs, dict(N=1, K=K), [2, K], constant=False)
    _expect_error(model, {"X": np.ones((2, K), np.float32), **{name: inputs[name] for name in ("codes", "scales", "row_scale")}}, "-128")
    conv = _int8_inputs(np.random.default_rng(10), 4, 10) | dict(codes=_codes(k=9))  # weight_shape [4, 1, 3, 3]: 9 taps a row
    _expect_error(build_model("TernaryConv", conv, dict(N=1, weight_shape=[4, 1, 3, 3], group=4), [1, 4, 6, 6]),
                  {"X": np.ones((1, 4, 6, 6), np.float32)}, "int8 weights (scales) shape")
