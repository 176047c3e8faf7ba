"""QuantizeBetweenConvsPass: a TernaryConv read only by TernaryConvs returns NHWC, as 8-bit levels where they agree.

Structure on small ResNet-like models, one for each case of the rule; then
the numbers: the function bodies (onnxruntime without the library) against
the same qdq model converted with float_between_layers, whose residuals read
as levels are quantized and dequantized the same way (bit for bit), and
against the plain float chain (within half a level); the overloads after an
onnx-graphsurgeon round trip; the CLI. Last, the tests that need the
library: its kernels against the function bodies, node by node, and the
levels chain against the float chain, bit for bit.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_custom_format import EMBEDDED, EMBEDDED_CALIB, EMBEDDED_TEST, _basic_session, _kernel_session

from fgq_onnx.compare import compare
from fgq_onnx.custom_op_functions import (
    CONV_INPUTS,
    DOMAIN,
    INPUTS,
    QUANTIZED_INPUT,
    QUANTIZED_OUTPUT,
    QUANTIZED_RESIDUAL,
    X_NHWC,
    Y_NHWC,
    function_protos,
    node_overload,
    restore_overloads,
    with_features,
)
from fgq_onnx.passes.quantize_between_convs import QuantizeBetweenConvsPass
from fgq_onnx.passes.use_custom_ops import to_custom_ops
from fgq_onnx.pipeline import convert
from ir_models import make_model

_RESIDUAL, _Y_SCALE = CONV_INPUTS.index("residual"), CONV_INPUTS.index("y_scale")
_RESIDUAL_SCALE = CONV_INPUTS.index("residual_scale")
PADS = "<pads = [1, 1, 1, 1]>"
X_TO_Y = "(float[N, 4, 8, 8] x) => (float[N, 8, 8, 8] y)"
# The start of each model: c1 (then a ReLU) and c2 (with a bias); the rest is each case of the rule.
BLOCK = f"""
        c1 = Conv {PADS} (x, w1)
        a = Relu (c1)
        c2 = Conv {PADS} (a, w2, b2)"""
MODELS = {  # name: (graph signature, nodes)
    # a ResNet block whose shortcut is a itself
    "resnet": (X_TO_Y, f"""{BLOCK}
        s = Add (c2, a)
        r = Relu (s)
        y = Conv {PADS} (r, w3)"""),
    # no residual; c2 has no ReLU after it: signed levels
    "chain": (X_TO_Y, f"""{BLOCK}
        y = Conv {PADS} (c2, w3)"""),
    # a projection shortcut: read only as a residual
    "projection": (X_TO_Y, f"""{BLOCK}
        sc = Conv (a, ws)
        s = Add (c2, sc)
        r = Relu (s)
        y = Conv {PADS} (r, w3)"""),
    # a also read by a GlobalAveragePool
    "pooled": ("(float[N, 4, 8, 8] x) => (float[N, 8, 8, 8] y, float[N, 8, 1, 1] z)", f"""{BLOCK}
        b = Relu (c2)
        y = Conv {PADS} (b, w3)
        z = GlobalAveragePool (a)"""),
    # a also a graph output
    "exposed": ("(float[N, 4, 8, 8] x) => (float[N, 8, 8, 8] y, float[N, 8, 8, 8] a)", f"""{BLOCK}
        b = Relu (c2)
        y = Conv {PADS} (b, w3)"""),
    # c2's output b read by a depthwise conv
    "depthwise": (X_TO_Y, f"""{BLOCK}
        b = Relu (c2)
        d = Conv <group = 8, pads = [1, 1, 1, 1]> (b, wd)
        e = Relu (d)
        y = Conv {PADS} (e, w3)"""),
    # b is the residual of c3, whose output r a GlobalAveragePool reads: then c2 cannot be NHWC either
    "fixpoint": ("(float[N, 4, 8, 8] x) => (float[N, 8, 1, 1] y)", f"""{BLOCK}
        b = Relu (c2)
        c3 = Conv {PADS} (b, w3)
        s = Add (c3, b)
        r = Relu (s)
        y = GlobalAveragePool (r)"""),
    # c2's residual is a graph input
    "foreign_residual": ("(float[N, 4, 8, 8] x, float[N, 8, 8, 8] skip) => (float[N, 8, 8, 8] y)", f"""{BLOCK}
        s = Add (c2, skip)
        r = Relu (s)
        y = Conv {PADS} (r, w3)"""),
}
# Each TernaryConv output: element type and layout.
EXPECTED = {
    "resnet": {"a": "u8 NHWC", "r": "u8 NHWC", "y": "f32 NCHW"},
    "chain": {"a": "u8 NHWC", "c2": "i8 NHWC", "y": "f32 NCHW"},
    "projection": {"a": "u8 NHWC", "sc": "f32 NHWC", "r": "u8 NHWC", "y": "f32 NCHW"},
    "pooled": {"a": "f32 NCHW", "b": "u8 NHWC", "y": "f32 NCHW"},
    "exposed": {"a": "f32 NCHW", "b": "u8 NHWC", "y": "f32 NCHW"},
    "depthwise": {"a": "u8 NHWC", "b": "f32 NCHW", "e": "f32 NCHW", "y": "f32 NCHW"},
    "fixpoint": {"a": "u8 NHWC", "b": "f32 NCHW", "r": "f32 NCHW"},
    "foreign_residual": {"a": "u8 NHWC", "r": "f32 NCHW", "y": "f32 NCHW"},
}
_TYPES = {"u8": TensorProto.UINT8, "i8": TensorProto.INT8, "f32": TensorProto.FLOAT}


def _inputs(name: str, count: int, spread: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(count)
    feeds = {"x": rng.uniform(-spread, spread, (count, 4, 8, 8)).astype(np.float32)}
    if name == "foreign_residual":
        feeds["skip"] = rng.uniform(-spread, spread, (count, 8, 8, 8)).astype(np.float32)
    return feeds


def _feeds(name: str) -> dict[str, np.ndarray]:
    return _inputs(name, 2, 0.5)  # inside the calibrated range


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> pathlib.Path:
    """A folder with MODELS[name] as name.onnx and its calibration data name.npz (inputs in [-1, 1])."""
    rng, folder = np.random.default_rng(0), tmp_path_factory.mktemp("between")
    weights = {"w1": rng.normal(0, 0.3, (8, 4, 3, 3)), "w2": rng.normal(0, 0.2, (8, 8, 3, 3)),
               "b2": rng.normal(0, 0.1, 8), "w3": rng.normal(0, 0.2, (8, 8, 3, 3)),
               "ws": rng.normal(0, 0.3, (8, 8, 1, 1)), "wd": rng.normal(0, 0.3, (8, 1, 3, 3))}
    for name, (signature, body) in MODELS.items():
        used = {k: v.astype(np.float32) for k, v in weights.items() if k in re.findall(r"\w+", body)}
        model = make_model(f"g {signature} {{{body}\n}}", used, opset=21)
        onnx.save(ir.serde.serialize_model(model), folder / f"{name}.onnx")
        np.savez(folder / f"{name}.npz", **_inputs(name, 8, 1.0))
    return folder


@pytest.fixture(scope="module")
def qdq(sources) -> dict[str, ir.Model]:
    """name -> the qdq conversion of MODELS[name]."""
    return {name: convert(sources / f"{name}.onnx", calib=sources / f"{name}.npz", n=4, act_bits=8,
                          bias_correction=False, format="qdq").model for name in MODELS}


def _custom(qdq: ir.Model, float_between_layers: bool) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(ir.serde.serialize_model(qdq))
    return ir.serde.serialize_model(to_custom_ops(model, float_between_layers)[0])


def _convs(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The TernaryConvs by output name."""
    return {n.output[0]: n for n in proto.graph.node if n.op_type == "TernaryConv" and n.domain == DOMAIN}


def _infos(proto: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    return {v.name: v for v in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]}


def _layout(node: onnx.NodeProto | None, attr: str) -> str:
    values = [a.s.decode() for a in node.attribute if a.name == attr] if node is not None else []
    return values[0] if values else "NCHW"


def _given(node: onnx.NodeProto, index: int) -> bool:
    return len(node.input) > index and node.input[index] != ""


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The model with the named intermediate tensors as extra graph outputs."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    info = _infos(proto)
    proto.graph.output.extend(info[name] for name in names if name not in {o.name for o in proto.graph.output})
    return proto


def _initializer(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


def _dequantized(levels: np.ndarray, proto: onnx.ModelProto, name: str) -> tuple[np.ndarray, float]:
    """(the NHWC levels of tensor `name` as NCHW floats under its producer's y_scale / y_zero_point, that scale)."""
    node = _convs(proto)[name]
    scale, zero = (_initializer(proto, node.input[i]) for i in (_Y_SCALE, _Y_SCALE + 1))
    return ((levels.astype(np.float32) - zero.astype(np.float32)) * scale).transpose(0, 3, 1, 2), float(scale)


def _residuals_through_levels(levels: onnx.ModelProto, floats: onnx.ModelProto) -> onnx.ModelProto:
    """`floats` (the float chain) with each residual that `levels` reads as 8-bit levels quantized and dequantized
    under that node's residual_scale and residual_zero_point: the levels chain's numbers, in float and NCHW."""
    quantized = {n.output[0]: n.input[_RESIDUAL_SCALE:] for n in levels.graph.node if _given(n, _RESIDUAL_SCALE + 1)}
    proto = onnx.ModelProto.FromString(floats.SerializeToString())
    nodes = []
    for node in proto.graph.node:
        if node.output[0] in quantized:
            scale, zero = quantized[node.output[0]]
            q, dq = f"{node.output[0]}.residual_q", f"{node.output[0]}.residual_dq"
            nodes += [helper.make_node("QuantizeLinear", [node.input[_RESIDUAL], scale, zero], [q]),
                      helper.make_node("DequantizeLinear", [q, scale, zero], [dq])]
            node.input[_RESIDUAL] = dq
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def _check_chain(proto: onnx.ModelProto) -> None:
    """What every reader of a TernaryConv output must agree with: X and the residual in the layout and form
    (levels under the reader's own x_scale and x_zero_point, or float) its producer writes them; the residual
    in the reader's own output layout; overloads those the node calls for."""
    producers = {n.output[0]: n for n in proto.graph.node}
    model = ir.serde.deserialize_model(proto)
    custom = [n for n in model.graph if n.domain == DOMAIN]
    assert [node_overload(n) for n in custom] == [n.overload for n in custom]
    for node in _convs(proto).values():
        x = producers.get(node.input[0])
        x_levels = x is not None and x.op_type == "TernaryConv" and _given(x, _Y_SCALE + 1)
        assert _layout(node, "x_layout") == _layout(x, "y_layout")
        assert (QUANTIZED_INPUT in node.overload.split("-")) == x_levels
        if x_levels:
            assert list(x.input[_Y_SCALE:_Y_SCALE + 2]) == list(node.input[1:3])  # the reader's own values
        if _given(node, _RESIDUAL):
            residual = producers.get(node.input[_RESIDUAL])
            assert _layout(residual, "y_layout") == _layout(node, "y_layout")
            residual_levels = residual is not None and _given(residual, _Y_SCALE + 1)
            assert _given(node, _RESIDUAL_SCALE + 1) == residual_levels
            if residual_levels:
                assert list(node.input[_RESIDUAL_SCALE:]) == list(residual.input[_Y_SCALE:_Y_SCALE + 2])


# -- structure --------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_each_output_gets_the_type_and_layout_its_readers_allow(qdq, name):
    proto = _custom(qdq[name], float_between_layers=False)
    onnx.checker.check_model(proto)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)  # the bodies type-check as written
    nchw = _infos(_custom(qdq[name], float_between_layers=True))
    convs, infos = _convs(proto), _infos(inferred)
    got = {}
    for out, node in convs.items():
        tensor = infos[out].type.tensor_type
        kind = next(k for k, v in _TYPES.items() if v == tensor.elem_type)
        got[out] = f"{kind} {_layout(node, 'y_layout')}"
        dims = [d.dim_value or d.dim_param for d in nchw[out].type.tensor_type.shape.dim]
        if got[out].endswith("NHWC"):
            dims = [dims[i] for i in (0, 2, 3, 1)]
        assert [d.dim_value or d.dim_param for d in tensor.shape.dim] == dims, out
    assert got == EXPECTED[name]
    _check_chain(proto)
    assert {f.overload for f in proto.functions if f.name == "TernaryConv"} == {n.overload for n in convs.values()}
    assert not QuantizeBetweenConvsPass()(ir.serde.deserialize_model(proto)).modified


def test_a_block_reads_levels_as_x_and_residual(qdq):
    convs = _convs(_custom(qdq["resnet"], float_between_layers=False))
    first, block, last = convs["a"], convs["r"], convs["y"]
    assert first.overload == "qoutput-ynhwc" and list(first.input[len(INPUTS):_Y_SCALE]) == [""]
    assert block.overload == "qinput-xnhwc-residual-qresidual-qoutput-ynhwc"
    assert block.input[0] == block.input[_RESIDUAL] == "a"
    assert last.overload == "qinput-xnhwc" and len(last.input) <= len(INPUTS)


def test_float_between_layers_keeps_every_output_float_nchw(qdq):
    convs = _convs(_custom(qdq["projection"], float_between_layers=True)).values()
    assert {n.overload for n in convs} == {"", "residual"}
    assert all(len(n.input) <= len(INPUTS) + 1 and not any("layout" in a.name for a in n.attribute) for n in convs)


def test_readers_under_different_scales_get_nhwc_float(qdq):
    """a's two readers (c2 and the shortcut) quantize it alike; with the shortcut's x_scale doubled they disagree:
    a becomes NHWC float, each reader quantizing it itself; the same numbers as the float chain."""
    model = ir.serde.deserialize_model(_custom(qdq["projection"], float_between_layers=True))
    shortcut = next(n for n in model.graph if n.outputs[0].name == "sc")
    doubled = ir.tensor(shortcut.inputs[1].const_value.numpy() * 2, name="doubled_scale")
    model.graph.register_initializer(ir.val("doubled_scale", const_value=doubled))
    shortcut.replace_input_with(1, model.graph.initializers["doubled_scale"])
    floats = ir.serde.serialize_model(model)
    assert QuantizeBetweenConvsPass()(model).modified
    proto = ir.serde.serialize_model(model)
    convs = _convs(proto)
    overloads = [convs[name].overload for name in ("a", "sc", "r")]
    assert overloads == ["ynhwc", "xnhwc-ynhwc", "xnhwc-residual-qoutput-ynhwc"]
    assert _infos(proto)["a"].type.tensor_type.elem_type == TensorProto.FLOAT
    _check_chain(proto)
    want = _basic_session(floats).run(None, _feeds("projection"))
    np.testing.assert_array_equal(_basic_session(proto).run(None, _feeds("projection"))[0], want[0])


# -- the function bodies ----------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_function_bodies_compute_the_float_chain_with_its_residuals_read_as_levels(qdq, name):
    """The readers quantize the same floats under the same scales: the same levels, the same numbers. Only a
    residual read as levels differs from the float chain, by its quantization; with that applied to the float
    chain, the outputs are bit for bit the same (no model but resnet has one: they equal the float chain)."""
    levels, floats = (_custom(qdq[name], between) for between in (False, True))
    assert any(_given(node, _RESIDUAL_SCALE + 1) for node in levels.graph.node) == (name == "resnet")
    through = _residuals_through_levels(levels, floats)
    got, want = (_basic_session(p).run(None, _feeds(name)) for p in (levels, through))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_function_bodies_with_quantized_residual_within_half_a_level_each(qdq):
    """r = relu(conv(a) + a): the residual read as levels is off by at most half a level of a's scale, and r,
    returned as levels, by half a level of its own: |dequantized r - float r| <= (s_a + s_r) / 2 (a not saturated)."""
    levels, floats = (_custom(qdq["resnet"], between) for between in (False, True))
    _, a_levels, r_levels = _basic_session(_with_outputs(levels, ["a", "r"])).run(None, _feeds("resnet"))
    _, a_float, r_float = _basic_session(_with_outputs(floats, ["a", "r"])).run(None, _feeds("resnet"))
    assert a_levels.max() < 255 and r_levels.max() < 255  # inside the calibrated range: no saturation
    a, s_a = _dequantized(a_levels, levels, "a")
    r, s_r = _dequantized(r_levels, levels, "r")
    assert np.abs(a - a_float).max() <= s_a / 2 * (1 + 1e-5)
    assert np.abs(r - r_float).max() <= (s_a + s_r) / 2 * (1 + 1e-5)


@pytest.fixture(scope="module")
def embedded() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The embedded ResNet in the custom format: (levels chain, float chain)."""
    if not EMBEDDED.exists():
        pytest.skip("embedded model not present")
    qdq = convert(EMBEDDED, calib=EMBEDDED_CALIB, n=4, bias_correction=False, format="qdq").model
    return _custom(qdq, float_between_layers=False), _custom(qdq, float_between_layers=True)


def test_embedded_resnet_computes_the_float_chain_with_its_residuals_read_as_levels(embedded):
    """Stage 1's block reads its shortcut, the stem's output, as levels; stage 2's projection shortcut is NHWC
    float; stage 3's block and shortcut stay NCHW (the block's output goes to the GlobalAveragePool)."""
    levels, floats = embedded
    convs = _convs(levels)
    overloads = [n.overload for n in convs.values()]
    assert overloads.count("qinput-xnhwc-residual-qresidual-qoutput-ynhwc") == 1
    assert overloads.count("qinput-xnhwc-ynhwc") == 1
    assert overloads[-2:] == ["qinput-xnhwc", "qinput-xnhwc-residual"]
    _check_chain(levels)
    x = np.load(EMBEDDED_TEST)["input"][:64]
    got = _basic_session(levels).run(None, {"input": x})[0]
    through = _residuals_through_levels(levels, floats)
    np.testing.assert_array_equal(got, _basic_session(through).run(None, {"input": x})[0])
    want = _basic_session(floats).run(None, {"input": x})[0]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


def test_overloads_follow_from_the_nodes_after_a_graphsurgeon_round_trip(embedded):
    """onnx-graphsurgeon drops every overload; restore_overloads makes them again from each node's inputs and
    attributes and X's producer, and the model runs in plain onnxruntime with the same outputs."""
    gs = pytest.importorskip("onnx_graphsurgeon")
    levels, _ = embedded
    edited = gs.export_onnx(gs.import_onnx(levels))
    assert {n.overload for n in edited.graph.node} == {""}
    restored = restore_overloads(edited)
    assert [n.overload for n in restored.graph.node] == [n.overload for n in levels.graph.node]
    x = np.load(EMBEDDED_TEST)["input"][:16]
    np.testing.assert_array_equal(_basic_session(restored).run(None, {"input": x})[0],
                                  _basic_session(levels).run(None, {"input": x})[0])


def test_node_overload_finds_levels_from_a_quantizelinear_or_the_type(qdq):
    """X made by a QuantizeLinear of the reader's own scale and zero point: the same numbers as float X."""
    floats = _custom(qdq["chain"], float_between_layers=True)
    model = ir.serde.deserialize_model(floats)
    first = next(n for n in model.graph if n.op_type == "TernaryConv")
    assert QUANTIZED_INPUT not in node_overload(first).split("-")
    quantize = ir.node("QuantizeLinear", list(first.inputs[:3]))
    model.graph.insert_before(first, quantize)
    first.replace_input_with(0, quantize.outputs[0])
    assert node_overload(first) == with_features(first.overload, QUANTIZED_INPUT)
    proto = restore_overloads(ir.serde.serialize_model(model))
    np.testing.assert_array_equal(_basic_session(proto).run(None, _feeds("chain"))[0],
                                  _basic_session(floats).run(None, _feeds("chain"))[0])
    typed = ir.serde.deserialize_model(floats)
    typed.graph.inputs[0].dtype = ir.DataType.UINT8
    first = next(n for n in typed.graph if n.op_type == "TernaryConv")
    assert QUANTIZED_INPUT in node_overload(first).split("-")


def test_overload_features_keep_one_order_and_line_up_with_the_inputs():
    assert with_features("residual-relu", Y_NHWC, QUANTIZED_OUTPUT, QUANTIZED_RESIDUAL, X_NHWC, QUANTIZED_INPUT) == \
        "qinput-xnhwc-residual-qresidual-relu-qoutput-ynhwc"
    assert with_features("asymmetric", QUANTIZED_OUTPUT) == "asymmetric-qoutput"
    with pytest.raises(ValueError, match="unknown"):
        with_features("", "nhwc")
    every = "asymmetric-qinput-xnhwc-residual-qresidual-hardswish-affine-qoutput-ynhwc"
    inputs = {overload: [list(f.input) for f in function_protos(21, overload)]
              for overload in ("qinput", "xnhwc-ynhwc", "qoutput", "residual-qresidual", every)}
    assert inputs == {"qinput": [INPUTS], "xnhwc-ynhwc": [INPUTS], "qoutput": [CONV_INPUTS[:12]],
                      "residual-qresidual": [CONV_INPUTS], every: [CONV_INPUTS]}


# -- tools ------------------------------------------------------------------------


def test_compare_reads_levels_and_nhwc_as_the_values_they_stand_for(sources, qdq, tmp_path, monkeypatch):
    """`fgq-onnx compare`'s per-layer rows on the function bodies: an NHWC 8-bit output against the fp32 NCHW
    tensor, dequantized and transposed, scores what the float chain's does (the levels are the readers')."""
    monkeypatch.setenv("FGQ_OPS_LIBRARY", str(tmp_path / "missing.so"))
    np.savez(tmp_path / "x.npz", **_feeds("chain"))
    rows = {}
    for between in (False, True):
        path = tmp_path / f"chain{int(between)}.onnx"
        onnx.save(_custom(qdq["chain"], float_between_layers=between), path)
        layers = compare(sources / "chain.onnx", path, tmp_path / "x.npz").layers
        rows[between] = {layer.name: layer.sqnr_db for layer in layers}
    assert rows[False].keys() == rows[True].keys() == {"a", "c2", "y"}
    assert all(abs(rows[False][name] - rows[True][name]) < 0.5 for name in rows[True]), rows


@pytest.mark.skipif(not EMBEDDED.exists(), reason="embedded model not present")
def test_cli_writes_the_chain_unless_float_between_layers(tmp_path, cli):
    chain, found = {QUANTIZED_INPUT, X_NHWC, QUANTIZED_RESIDUAL, QUANTIZED_OUTPUT, Y_NHWC}, {}
    for flag in ([], ["--float-between-layers"]):
        output = tmp_path / f"resnet{len(flag)}.onnx"
        result = cli("convert", EMBEDDED, "--calib", EMBEDDED_CALIB, "--n", "4", *flag, "-o", output, "-q")
        assert result.exit_code == 0, result.stderr
        proto = onnx.load(str(output))
        features = {f for n in _convs(proto).values() for f in n.overload.split("-")}
        found[tuple(flag)] = features & chain
        assert {p.key: p.value for p in proto.metadata_props}["fgq_onnx.float_between_layers"] == str(bool(flag))
    assert found == {(): chain, ("--float-between-layers",): set()}


# -- with the library (the kernels of x_layout / y_layout) ---------------------------


def _single_node(proto: onnx.ModelProto, node: onnx.NodeProto) -> onnx.ModelProto:
    """A model of `node` alone: its non-constant inputs are graph inputs, with the model's functions."""
    infos, constants = _infos(proto), {t.name: t for t in proto.graph.initializer}
    names = [name for name in dict.fromkeys(node.input) if name]
    graph = helper.make_graph([node], "one", [infos[name] for name in names if name not in constants],
                              [infos[node.output[0]]], [constants[name] for name in names if name in constants])
    model = helper.make_model(graph, opset_imports=proto.opset_import, functions=proto.functions)
    model.ir_version = proto.ir_version
    return model


def _case(name: str, qdq, embedded) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """(levels chain, float chain, feeds) of MODELS[name] or of the embedded ResNet."""
    if name == "embedded":
        return *embedded, {"input": np.load(EMBEDDED_TEST)["input"][:32]}
    return _custom(qdq[name], float_between_layers=False), _custom(qdq[name], float_between_layers=True), _feeds(name)


@pytest.mark.parametrize("name", ["resnet", "chain", "projection", "depthwise", "embedded"])
def test_kernels_match_function_bodies_node_by_node(qdq, embedded, name):
    """Each TernaryConv on the inputs the function bodies give it: float outputs within 1e-5 of the largest, levels
    equal but where the float lies at a rounding tie (the kernels sum in another order: one level, a few in a
    million on the embedded ResNet)."""
    proto, _, inputs = _case(name, qdq, embedded)
    _kernel_session(proto)  # skips without the library
    exposed = _with_outputs(proto, list(_convs(proto)))
    values = dict(zip([o.name for o in exposed.graph.output], _basic_session(exposed).run(None, inputs))) | inputs
    for out, node in _convs(proto).items():
        single = _single_node(proto, node)
        feeds = {i.name: values[i.name] for i in single.graph.input}
        (got,), (want,) = _kernel_session(single).run(None, feeds), _basic_session(single).run(None, feeds)
        assert got.dtype == want.dtype and got.shape == want.shape, out
        if want.dtype == np.float32:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=out)
        else:
            steps = np.abs(got.astype(np.int32) - want.astype(np.int32))
            assert steps.max() <= 1 and steps.mean() <= 1e-4, out


@pytest.mark.parametrize("name", ["resnet", "projection", "embedded"])
def test_kernels_compute_the_float_chain_with_its_residuals_read_as_levels(qdq, embedded, name):
    """The kernels' levels are QuantizeLinear of their float output and their X readers quantize the same floats:
    bit for bit the float chain's kernels with the residuals quantized the same way."""
    levels, floats, feeds = _case(name, qdq, embedded)
    got = _kernel_session(levels).run(None, feeds)
    want = _kernel_session(_residuals_through_levels(levels, floats)).run(None, feeds)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
