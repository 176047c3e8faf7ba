"""Group scales stored as f32, f16 or u8 (--scale-format): numpy rounding, graph forms, sizes, the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

from fgq_onnx import pipeline
from fgq_onnx.errors import FgqError
from fgq_onnx.passes.ternarize_weights import TernarizeWeightsPass, weight_layout
from fgq_onnx.scales import SCALE_FORMATS, U8_LEVELS, row_axis, store_scales
from fgq_onnx.ternary import GroupLayout, Method, TernaryWeight, ternarize
from ir_models import make_model

RNG = np.random.default_rng(7)
FORMATS = list(SCALE_FORMATS)

# One graph with every weight layout: Conv with C/g >= N (a short last group: C = 6, N = 4),
# depthwise Conv (whole filter, flattened), Gemm with transB, plain Gemm, MatMul.
LAYERS = """
g (float[2,6,6,6] x, float[2,10] a) => (float[2,5,6,6] y, float[2,6,4,4] d, float[2,5] g1, float[2,5] g2, float[2,5] z) {
    y = Conv <pads = [1,1,1,1]> (x, conv_w, conv_b)
    d = Conv <group = 6> (x, dw_w)
    g1 = Gemm <transB = 1> (a, gemm_t_w, gemm_b)
    g2 = Gemm (a, gemm_w)
    z = MatMul (a, mm_w)
}
"""
NODES = {"conv_w": ("Conv", {}), "dw_w": ("Conv", {}), "gemm_t_w": ("Gemm", {"transB": 1}), "gemm_w": ("Gemm", {}), "mm_w": ("MatMul", {})}


def layer_weights() -> dict[str, np.ndarray]:
    return {
        "conv_w": RNG.standard_normal((5, 6, 3, 3)).astype(np.float32),
        "conv_b": RNG.standard_normal(5).astype(np.float32),
        "dw_w": (RNG.standard_normal((6, 1, 3, 3)) * np.linspace(0.01, 2.0, 6).reshape(6, 1, 1, 1)).astype(np.float32),
        "gemm_t_w": RNG.standard_normal((5, 10)).astype(np.float32),
        "gemm_b": RNG.standard_normal(5).astype(np.float32),
        "gemm_w": RNG.standard_normal((10, 5)).astype(np.float32),
        "mm_w": (RNG.standard_normal((10, 5)) * np.array([1e-3, 0.1, 1.0, 10.0, 0.5])).astype(np.float32),  # rows of very different size
    }



def session(model: ir.Model, level: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def numpy_weight(weight: np.ndarray, layout: GroupLayout, method: Method, scale_format: str) -> np.ndarray:
    """The weight the converter means: solver codes times the decoded stored scales."""
    ternary = ternarize(weight, layout, method)
    decoded = [store_scales(s, layout, scale_format).decoded for s in (ternary.scale, ternary.neg_scale) if s is not None]
    return TernaryWeight(layout, ternary.codes, *decoded).dequantize()


def layout_of(name: str, shape: tuple[int, ...], n: int) -> GroupLayout:
    op, attrs = NODES[name]
    node = ir.node(op, [], {k: v for k, v in attrs.items()})
    return weight_layout(node, shape, n)[0]


# -- the numpy rounding ------------------------------------------------------------


def test_store_scales_f32_and_f16():
    layout = GroupLayout((8, 12), axis=1, n=4)
    scales = RNG.uniform(0, 3, (8, 3)).astype(np.float32)
    f32 = store_scales(scales, layout, "f32")
    assert f32.values.dtype == np.float32 and f32.row_scale is None and np.array_equal(f32.decoded, scales)
    f16 = store_scales(scales, layout, "f16")
    assert f16.values.dtype == np.float16 and f16.nbytes == scales.size * 2
    np.testing.assert_array_equal(f16.decoded, scales.astype(np.float16).astype(np.float32))
    with pytest.raises(FgqError, match="overflows float16"):
        store_scales(np.full((8, 3), 1e5, np.float32), layout, "f16")


@pytest.mark.parametrize("shape,axis,flatten", [((8, 12), 1, False), ((12, 8), 0, False), ((6, 8, 3, 3), 1, False), ((6, 2, 3, 3), 1, True)])
def test_store_scales_u8_rounds_to_the_nearest_code_under_the_row_scale(shape, axis, flatten):
    layout = GroupLayout(shape, axis=axis, n=4, flatten=flatten)
    groups = layout.group(RNG.standard_normal(shape).astype(np.float32))
    scales = ternarize(layout.ungroup(groups), layout, Method.EXACT).scale
    scales[0] = 0.0  # a segment of zero scales
    stored = store_scales(scales, layout, "u8")
    rows = layout.rows_view(scales)
    assert stored.values.dtype == np.uint8 and stored.values.shape == scales.shape
    assert stored.row_scale.dtype == np.float32 and stored.row_scale.shape == (layout.rows,)
    np.testing.assert_array_equal(stored.row_scale, (rows.max(axis=1) / np.float32(U8_LEVELS)).astype(np.float32))
    q = layout.rows_view(stored.values)
    live = rows.max(axis=1) > 0
    assert np.all(q.max(axis=1)[live] == U8_LEVELS) and np.all(q[~live] == 0)
    np.testing.assert_array_equal(layout.rows_view(stored.decoded), q.astype(np.float32) * stored.row_scale[:, None])
    error = np.abs(layout.rows_view(stored.decoded) - rows)
    assert np.all(error <= stored.row_scale[:, None] * (0.5 + 1e-4))
    assert stored.nbytes == scales.size + 4 * layout.rows
    assert row_axis(layout) == (1 if axis == 0 else 0)


def test_store_scales_u8_all_zero_row_and_bad_format():
    layout = GroupLayout((2, 8), axis=1, n=4)
    stored = store_scales(np.array([[0.0, 0.0], [1.0, 0.5]], np.float32), layout, "u8")
    assert stored.row_scale[0] == 0 and np.all(stored.values[0] == 0) and np.all(stored.decoded[0] == 0)
    with pytest.raises(ValueError, match="scale format"):
        store_scales(np.ones((2, 2), np.float32), layout, "u4")


def test_u8_costs_little_weight_sqnr():
    """Nearest u8 codes under the row scale lose well under 0.01 dB of weight SQNR against f32."""
    from fgq_onnx.ternary import sqnr_db

    weight = RNG.standard_normal((64, 64, 3, 3)).astype(np.float32) * RNG.uniform(0.1, 1.0, (64, 1, 1, 1)).astype(np.float32)
    layout = GroupLayout(weight.shape, axis=1, n=4)
    for method in (Method.EXACT, Method.ASYMMETRIC):
        base = sqnr_db(weight, numpy_weight(weight, layout, method, "f32"))
        for fmt in ("f16", "u8"):
            assert base - sqnr_db(weight, numpy_weight(weight, layout, method, fmt)) < 0.01


# -- the graph forms -----------------------------------------------------------------


@pytest.mark.parametrize("level", ["basic", "all"])
@pytest.mark.parametrize("method", [Method.EXACT, Method.ASYMMETRIC])
@pytest.mark.parametrize("scale_format", FORMATS)
def test_graph_decodes_exactly_the_numpy_weights(scale_format, method, level):
    weights = layer_weights()
    model = make_model(LAYERS, weights)
    ternary_pass = TernarizeWeightsPass(4, method, scale_format=scale_format, narrow_conv_groups=False)  # the depthwise layer: the flattened layout
    assert ternary_pass(model).modified
    # Expose each decoded weight as a graph output, then compare bit for bit.
    linear = {node.inputs[1].name: node for node in model.graph if node.op_type in ("Conv", "Gemm", "MatMul")}
    names = []
    for node in linear.values():
        value = node.inputs[1]
        value.dtype, value.shape = ir.DataType.FLOAT, None
        model.graph.outputs.append(value)
        names.append(value.name)
    expected = {name.removesuffix(".ternary"): numpy_weight(weights[name.removesuffix(".ternary")], layout_of(name.removesuffix(".ternary"), weights[name.removesuffix(".ternary")].shape, 4), method, scale_format) for name in names}
    feeds = {"x": RNG.standard_normal((2, 6, 6, 6)).astype(np.float32), "a": RNG.standard_normal((2, 10)).astype(np.float32)}
    outputs = session(model, level).run(None, feeds)
    got = dict(zip([o.name for o in model.graph.outputs], outputs))
    for name in names:
        np.testing.assert_array_equal(got[name], expected[name.removesuffix(".ternary")], err_msg=f"{name} ({scale_format}, {method.value}, {level})")
    # The layer outputs equal the fp32 graph run with those weights.
    reference = make_model(LAYERS, {**weights, **expected})
    for want, output in zip(session(reference, "basic").run(None, feeds), model.graph.outputs):
        np.testing.assert_allclose(got[output.name], want, rtol=1e-5, atol=1e-5)
    # The records say what is stored.
    for record in ternary_pass.records:
        scale_sets = 2 if method is Method.ASYMMETRIC else 1
        per_scale = {"f32": 4, "f16": 2, "u8": 1}[scale_format]
        rows = record.shape[0] if record.op_type == "Conv" or "transB" in NODES[record.weight][1] else record.shape[1]
        assert record.code_bytes == -(-record.params // 4)
        assert record.scale_bytes == scale_sets * (record.groups * per_scale + (4 * rows if scale_format == "u8" else 0))


@pytest.mark.parametrize("scale_format", FORMATS)
def test_graph_form_of_each_format(scale_format):
    model = make_model(LAYERS, layer_weights())
    TernarizeWeightsPass(4, scale_format=scale_format)(model)
    by_name = {node.name: node for node in model.graph}
    label = "z"  # the MatMul's output: the parsed graph leaves node names empty
    weight_dq = by_name[f"{label}/dequantize_weight"]
    scale_input = weight_dq.inputs[1]
    if scale_format == "f32":
        assert scale_input.const_value.dtype == ir.DataType.FLOAT
        assert f"{label}/cast_weight" not in by_name
    elif scale_format == "f16":
        assert scale_input.const_value.dtype == ir.DataType.FLOAT16
        cast = by_name[f"{label}/cast_weight"]
        assert cast.inputs[0] is weight_dq.outputs[0] and cast.attributes["to"].as_int() == ir.DataType.FLOAT
    else:
        decode = scale_input.producer()
        assert decode is by_name[f"{label}/dequantize_scales"] and decode.op_type == "DequantizeLinear"
        assert decode.inputs[0].const_value.dtype == ir.DataType.UINT8 and decode.inputs[1].const_value.dtype == ir.DataType.FLOAT
        assert decode.attributes["axis"].as_int() == 1  # MatMul weight [K, M]: the rows run along axis 1
        assert decode.inputs[1].const_value.shape == (5,)
        assert f"{label}/cast_weight" not in by_name
    # every node and value the pass made has a readable name
    assert all(node.name for node in model.graph if node.op_type not in ("Conv", "Gemm", "MatMul"))
    assert all(not value.name.startswith("val_") for node in model.graph for value in node.outputs)


@pytest.mark.parametrize("scale_format", FORMATS)
def test_float16_weights_keep_their_dtype(scale_format):
    text = "g (float16[2,10] a) => (float16[2,5] z) { z = MatMul (a, w) }"
    w = RNG.standard_normal((10, 5)).astype(np.float16)
    model = make_model(text, {"w": w})
    ternary_pass = TernarizeWeightsPass(4, scale_format=scale_format)
    ternary_pass(model)
    value = next(node for node in model.graph if node.op_type == "MatMul").inputs[1]
    value.dtype = ir.DataType.FLOAT16
    model.graph.outputs.append(value)
    a = RNG.standard_normal((2, 10)).astype(np.float16)
    _, got = session(model, "all").run(None, {"a": a})
    layout = GroupLayout(w.shape, axis=0, n=4)
    expected = numpy_weight(w.astype(np.float32), layout, Method.EXACT, scale_format).astype(np.float16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, expected)


# -- conversion end to end -----------------------------------------------------------


def test_config_rejects_unknown_formats():
    with pytest.raises(FgqError, match="--scale-format must be one of f32, f16, u8"):
        pipeline.ConvertConfig(scale_format="fp16")
    assert pipeline.ConvertConfig(scale_format="f16").settings()["scale_format"] == "f16"


def test_cli_rejects_a_bad_scale_format_in_one_line(cli, cnn_path, tmp_path):
    result = cli("convert", cnn_path, "--act-bits", "0", "--scale-format", "u4", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "--scale-format must be one of f32, f16, u8, got 'u4'" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.fixture
def converted_cnn(cli, kit, cnn_path, calib_npz, tmp_path):
    """The >100k-weight CNN converted with each scale format (N=4, 8-bit activations, bias correction)."""
    assert kit.linear_weight_count(onnx.load(str(cnn_path))) > 100_000
    out = {}
    for fmt in FORMATS:
        output, report = tmp_path / f"cnn_{fmt}.onnx", tmp_path / f"cnn_{fmt}.json"
        result = cli("convert", cnn_path, "--calib", calib_npz, "--scale-format", fmt, "-o", output, "--json", report, "--format", "qdq")
        assert result.exit_code == 0, result.stderr
        assert result.stderr.strip() == ""
        out[fmt] = (output, json.loads(report.read_text()), result.stdout)
    return out


def test_size_and_bits_per_weight_fall_with_the_format(converted_cnn):
    sizes = {fmt: output.stat().st_size for fmt, (output, _, _) in converted_cnn.items()}
    assert sizes["f32"] > sizes["f16"] > sizes["u8"], sizes
    bits = {}
    for fmt, (output, report, stdout) in converted_cnn.items():
        summary, layers = report["summary"], [layer for layer in report["layers"] if layer["converted"]]
        assert report["settings"]["scale_format"] == fmt
        want = 8 * sum(layer["code_bytes"] + layer["scale_bytes"] for layer in layers) / summary["params_converted"]
        assert summary["bits_per_weight"] == pytest.approx(want)
        bits[fmt] = summary["bits_per_weight"]
        assert f"{bits[fmt]:.2f}" in stdout and "bits per ternarized weight" in stdout
        metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
        assert metadata["fgq_onnx.scale_format"] == fmt
    # N = 4: 2 code bits + 32, 16 or 8 scale bits per group of 4 (+ short groups, + u8 row scales)
    assert 10.0 <= bits["f32"] < 10.5 and 6.0 <= bits["f16"] < 6.3 and 4.0 <= bits["u8"] < 4.3, bits


def test_formats_agree_after_bias_correction(kit, converted_cnn, cnn_samples):
    """Bias correction's gain must reach f16 and u8 scales too (through the Cast, into the row scale)."""
    outputs = {fmt: kit.run_ort(output, {"x": cnn_samples})[0] for fmt, (output, _, _) in converted_cnn.items()}
    for fmt in ("f16", "u8"):
        diff = np.linalg.norm(outputs[fmt] - outputs["f32"]) / np.linalg.norm(outputs["f32"])
        assert diff < 0.05, (fmt, diff)
        assert np.mean(outputs[fmt].argmax(-1) == outputs["f32"].argmax(-1)) >= 0.9
    for level in ("basic", "all"):
        for fmt, (output, _, _) in converted_cnn.items():
            (y,) = kit.run_ort(output, {"x": cnn_samples}, optimization=level)
            assert np.all(np.isfinite(y))


@pytest.mark.parametrize("scale_format", ["f16", "u8"])
def test_graphsurgeon_round_trip(cli, kit, cnn_path, calib_npz, cnn_samples, tmp_path, scale_format):
    gs = pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon is not installed")
    output = tmp_path / "cnn.fgq.onnx"
    result = cli("convert", cnn_path, "--calib", calib_npz, "--scale-format", scale_format, "--method", "asymmetric", "-q", "-o", output, "--format", "qdq")
    assert result.exit_code == 0, result.stderr
    graph = gs.import_onnx(onnx.load(str(output)))
    assert {"DequantizeLinear", "QuantizeLinear", "Conv", "Gemm"} <= {node.op for node in graph.nodes}
    assert ("Cast" in {node.op for node in graph.nodes}) == (scale_format == "f16")
    round_trip = tmp_path / "round_trip.onnx"
    onnx.save(gs.export_onnx(graph), str(round_trip))
    (a,) = kit.run_ort(output, {"x": cnn_samples})
    (b,) = kit.run_ort(round_trip, {"x": cnn_samples})
    np.testing.assert_array_equal(a, b)
