"""Already-ternary weights (fgq_onnx/already_ternary.py): detected, packed exactly, left alone afterwards.

Models whose weights take three values per tensor, row or group (with and
without a trailing scale Mul) must convert, in the weights-only mode, into
models whose outputs equal the source's to float rounding; near-ternary
weights must not be mistaken for ternary.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from fgq_onnx.already_ternary import detect, store_exact
from fgq_onnx.pipeline import convert
from fgq_onnx.ternary import GroupLayout

RNG = np.random.default_rng(7)


def _codes(shape, rng=RNG, zeros=0.3) -> np.ndarray:
    return rng.choice(np.array([-1, 0, 1], np.float32), size=shape, p=[(1 - zeros) / 2, zeros, (1 - zeros) / 2])


def _asymmetric(codes: np.ndarray, positive, negative) -> np.ndarray:
    return np.where(codes > 0, codes * positive, codes * negative).astype(np.float32)


# -- detection, in numpy ---------------------------------------------------------

LAYOUT = GroupLayout((32, 48), axis=1, n=4)  # a Gemm weight [M, K] with transB


@pytest.mark.parametrize("case, granularity, asymmetric", [
    ("tensor", "per tensor", False),
    ("tensor_asym", "per tensor", True),
    ("row", "per row", False),
    ("row_asym", "per row", True),
    ("group", "per group", False),
])
def test_detects_and_reproduces_bit_for_bit(case, granularity, asymmetric):
    codes = _codes(LAYOUT.shape)
    rows = RNG.uniform(0.1, 2.0, (32, 1)).astype(np.float32)
    groups = np.repeat(RNG.uniform(0.1, 2.0, (32, 12)).astype(np.float32), 4, axis=1)
    weight = {
        "tensor": codes * np.float32(0.37),
        "tensor_asym": _asymmetric(codes, np.float32(0.37), np.float32(0.21)),
        "row": codes * rows,
        "row_asym": _asymmetric(codes, rows, rows * np.float32(0.6)),
        "group": codes * groups,
    }[case]
    found = detect(weight, LAYOUT)
    assert found is not None
    assert (found.granularity, found.asymmetric) == (granularity, asymmetric)
    assert (found.weight.neg_scale is not None) == asymmetric
    np.testing.assert_array_equal(found.weight.dequantize(), weight)


def test_float_rounding_is_tolerated():
    codes = _codes(LAYOUT.shape)
    weight = codes * np.float32(0.37) * (1 + RNG.uniform(-3e-7, 3e-7, LAYOUT.shape)).astype(np.float32)
    found = detect(weight, LAYOUT)
    assert found is not None  # each group keeps the mean of its values: "per group"
    np.testing.assert_allclose(found.weight.dequantize(), weight, rtol=1e-6)


@pytest.mark.parametrize("factor", [1.001, 0.5, 1.00001])
def test_one_stray_value_is_not_ternary(factor):
    codes = _codes(LAYOUT.shape)
    codes[5, :4] = 1  # the stray value's group holds other +a values, so no per-group scale can absorb it
    weight = codes * np.float32(0.37)
    weight[5, 2] *= factor
    assert detect(weight, LAYOUT) is None


def test_float_weights_and_zero_weights_are_not_ternary():
    assert detect(RNG.normal(size=LAYOUT.shape).astype(np.float32), LAYOUT) is None
    assert detect(np.zeros(LAYOUT.shape, np.float32), LAYOUT) is None


def test_u8_storage_is_exact_or_falls_back_to_f32():
    codes = _codes(LAYOUT.shape)
    per_row = detect(codes * RNG.uniform(0.1, 2.0, (32, 1)).astype(np.float32), LAYOUT).weight
    stored, note = store_exact(per_row, "u8")
    assert stored[0].format == "u8" and not note
    np.testing.assert_array_equal(stored[0].decoded, per_row.scale)
    per_group = detect(codes * np.repeat(RNG.uniform(0.1, 2.0, (32, 12)).astype(np.float32), 4, axis=1), LAYOUT).weight
    stored, note = store_exact(per_group, "u8")
    assert stored[0].format == "f32" and "stored as f32" in note  # max/127 rounding would change these
    np.testing.assert_array_equal(stored[0].decoded, per_group.scale)


# -- whole models ------------------------------------------------------------------


def _model(nodes, weights: dict[str, np.ndarray], x_shape, out="y") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "ternary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *x_shape[1:]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv_model(trailing: str) -> onnx.ModelProto:
    """Conv(ternary) [-> Mul per channel or per tensor] -> Relu -> Conv(ternary, asymmetric per row) -> Flatten -> Gemm(ternary, transB) [-> Mul]."""
    rng = np.random.default_rng(11)
    c1, c2 = _codes((16, 8, 3, 3), rng), _codes((16, 16, 3, 3), rng)
    fc = _codes((10, 16 * 25), rng)  # conv1 3x3: 12x12, conv2 3x3 stride 2: 5x5
    scale = {"channel": rng.uniform(0.5, 2, (1, 16, 1, 1)), "tensor": np.array(0.8), "none": None}[trailing]
    weights = {
        "c1.w": c1 if scale is not None else c1 * np.float32(0.3),
        "c1.b": rng.normal(0, 0.1, 16),
        "c2.w": _asymmetric(c2, rng.uniform(0.1, 0.3, (16, 1, 1, 1)).astype(np.float32), np.float32(0.2)),
        "fc.w": fc if scale is not None else fc * rng.uniform(0.1, 0.3, (10, 1)).astype(np.float32),
        "fc.b": rng.normal(0, 0.1, 10),
    }
    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1")]
    if scale is not None:
        weights["s1"], weights["s2"] = scale, (np.array(0.05) if trailing == "tensor" else rng.uniform(0.01, 0.1, 10))
        nodes.append(helper.make_node("Mul", ["c1", "s1"], ["c1s"], name="scale1"))
    nodes += [
        helper.make_node("Relu", ["c1s" if scale is not None else "c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w"], ["c2"], name="conv2", strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], name="fc", transB=1),
    ]
    if scale is not None:
        nodes.append(helper.make_node("Mul", ["s2", "g"], ["y"], name="scale2"))  # the constant first
    else:
        nodes.append(helper.make_node("Identity", ["g"], ["y"], name="out"))
    return _model(nodes, weights, (1, 8, 14, 14))


def mlp_model(n: int) -> onnx.ModelProto:
    """MatMul(per-group ternary) -> Relu -> MatMul(per-tensor asymmetric), a [K, M] weight each."""
    rng = np.random.default_rng(12)
    w1 = _codes((64, 32), rng) * np.repeat(rng.uniform(0.1, 0.5, (64 // n, 32)).astype(np.float32), n, axis=0)
    w2 = _asymmetric(_codes((32, 10), rng), np.float32(0.4), np.float32(0.7))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return _model(nodes, {"w1": w1, "w2": w2}, (1, 64))


def _run(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


CASES = {
    "per-tensor, per-row asymmetric and per-row": (lambda: conv_model("none"), (4, 8, 14, 14)),
    "trailing Mul per channel": (lambda: conv_model("channel"), (4, 8, 14, 14)),
    "trailing Mul per tensor": (lambda: conv_model("tensor"), (4, 8, 14, 14)),
    "per group and per-tensor asymmetric": (lambda: mlp_model(4), (4, 64)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scale_format", ["u8", "f32"])
def test_weights_only_conversion_is_exact(case, scale_format):
    build, shape = CASES[case]
    source = build()
    x = np.random.default_rng(3).uniform(-1, 1, shape).astype(np.float32)
    model, report = convert(source, n=4, act_bits=0, scale_format=scale_format)
    assert report.converted and all(layer.method == "already_ternary" for layer in report.converted), [(layer.node, layer.reason) for layer in report.layers]
    assert all("already ternary: exact" in layer.reason for layer in report.converted)
    assert all(layer.sqnr_db == float("inf") for layer in report.converted)
    for layer in report.converted:  # scales constant over a row: one group a row, whatever --n says
        per_group = "per group" in layer.reason
        assert (layer.n == 4) if per_group else (layer.n == int(np.prod(layer.shape)) // layer.shape[0 if layer.op_type != "MatMul" else 1]), layer
    assert "Mul" not in {node.op_type for node in model.graph}  # trailing scales folded into the weights
    layers = json.loads(report.to_json())["layers"]
    assert all(layer["already_ternary"].startswith("exact (") for layer in layers)
    want = _run(source, x)
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_near_ternary_model_is_fitted_not_packed():
    source = mlp_model(4)
    w2 = next(t for t in source.graph.initializer if t.name == "w2")
    array = numpy_helper.to_array(w2).copy()
    # One stray value in a group (4 consecutive rows of a column) holding another +0.4: a stray value
    # alone in its group would be exactly representable with its own group scale, and rightly packed so.
    groups = (array > 0).reshape(8, 4, 10).sum(axis=1)
    group, column = np.argwhere(groups >= 2)[0]
    row = 4 * group + np.flatnonzero(array[4 * group:4 * group + 4, column] > 0)[0]
    array[row, column] *= 1.01
    w2.CopyFrom(numpy_helper.from_array(array, "w2"))
    _, report = convert(source, n=4, act_bits=0)
    assert [layer.method for layer in report.layers] == ["already_ternary", ""]
    assert "trained-ternary" in report.layers[1].reason  # not mistaken: the float layer of a ternary model
    _, report = convert(source, n=4, act_bits=0, ternarize_float_layers=True)
    assert [layer.method for layer in report.layers] == ["already_ternary", "exact"]
    assert report.layers[1].already_ternary == "" and report.layers[1].sqnr_db < 60


def _with_float(source: onnx.ModelProto, name: str) -> onnx.ModelProto:
    tensor = next(t for t in source.graph.initializer if t.name == name)
    shape = tuple(tensor.dims)
    tensor.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.2, shape).astype(np.float32), name))
    return source


def test_float_layers_of_a_trained_ternary_model_stay_float():
    _, report = convert(_with_float(mlp_model(4), "w2"), n=4, act_bits=0)  # 2048 of 2368 weights ternary
    first, second = report.layers
    assert first.converted and first.method == "already_ternary"
    assert not second.converted and "trained-ternary" in second.reason


def test_one_ternary_layer_does_not_make_a_float_model_trained_ternary():
    _, report = convert(_with_float(mlp_model(4), "w1"), n=4, act_bits=0)  # 320 of 2368 weights ternary
    assert [(layer.converted, layer.method) for layer in report.layers] == [(True, "exact"), (True, "already_ternary")]


@pytest.mark.parametrize("method", ["exact", "fit"])
def test_bias_correction_and_fitting_leave_exact_layers_alone(tmp_path, method):
    source = conv_model("channel")
    x = np.random.default_rng(4).uniform(-1, 1, (16, 8, 14, 14)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    model, report = convert(source, n=4, act_bits=0, method=method, calib=tmp_path / "calib.npz", bias_correction=True)
    assert all(layer.method == "already_ternary" for layer in report.converted)
    want = _run(source, x)
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("flag, float_layer_converted", [((), False), (("--ternarize-float-layers",), True)])
def test_cli_reports_exact_layers(tmp_path, cli, flag, float_layer_converted):
    path = tmp_path / "mixed.onnx"
    onnx.save(_with_float(mlp_model(4), "w2"), str(path))
    result = cli("convert", path, "--act-bits", "0", "-o", tmp_path / "out.onnx", "--json", tmp_path / "report.json", *flag)
    assert result.exit_code == 0, result.stderr
    first, second = json.loads((tmp_path / "report.json").read_text())["layers"]
    assert first["method"] == "already_ternary" and first["already_ternary"] == "exact (per group, symmetric)"
    assert second["converted"] is float_layer_converted and second["already_ternary"] == ""
