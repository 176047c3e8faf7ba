"""ONNX function bodies of the com.fgq ops (docs/custom-ops.md).

Each custom node written by passes/use_custom_ops.py comes with a model-local
FunctionProto of the same domain and name whose body computes the op with
standard ONNX ops (unpack the 2-bit codes, scale the groups, quantize the
activation, then MatMul/Gemm/Conv): the model still runs, slower, in an
onnxruntime without the library, and shape inference and Netron understand it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
from onnx import TensorProto, helper

DOMAIN = "com.fgq"
OPS = {"MatMul": "TernaryMatMul", "Gemm": "TernaryGemm", "Conv": "TernaryConv"}
INPUTS = ["X", "x_scale", "x_zero_point", "codes", "scales", "row_scale", "neg_scales", "neg_row_scale", "bias"]


def _const(name: str, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(array), name))


def _attr_const(name: str, attr: str, kind: int) -> onnx.NodeProto:
    """Constant whose value is the calling node's attribute (value_int / value_ints / value_floats)."""
    field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.INTS: "value_ints",
             onnx.AttributeProto.FLOATS: "value_floats"}[kind]
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(helper.make_attribute_ref(field, kind, attr))
    node.attribute[-1].ref_attr_name = attr
    return node


def _input_levels(features: set[str]) -> list[onnx.NodeProto]:
    """xd: X's levels dequantized, NCHW. NHWC X (X_NHWC) is transposed first; float X is quantized, 8-bit X
    (QUANTIZED_INPUT) is the levels."""
    nodes, src = [], "X"
    if X_NHWC in features:
        nodes.append(helper.make_node("Transpose", [src], ["x_nchw"], perm=[0, 3, 1, 2]))
        src = "x_nchw"
    if QUANTIZED_INPUT not in features:
        nodes.append(helper.make_node("QuantizeLinear", [src, "x_scale", "x_zero_point"], ["q"]))
        src = "q"
    return [*nodes, helper.make_node("DequantizeLinear", [src, "x_scale", "x_zero_point"], ["xd"])]


def _activation_and_weights(features: set[str]) -> list[onnx.NodeProto]:
    """Body prefix: xa (dequantized, clamped activation), ternary_groups [M, G, N] and scales3 [M, G, 1]."""
    return [
        *_input_levels(features),
        _attr_const("qmin", "act_qmin", onnx.AttributeProto.INT),
        _attr_const("qmax", "act_qmax", onnx.AttributeProto.INT),
        helper.make_node("Cast", ["qmin"], ["qminf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["qmax"], ["qmaxf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["x_zero_point"], ["zpf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["qminf", "zpf"], ["lo_levels"]),
        helper.make_node("Sub", ["qmaxf", "zpf"], ["hi_levels"]),
        helper.make_node("Mul", ["lo_levels", "x_scale"], ["lo"]),
        helper.make_node("Mul", ["hi_levels", "x_scale"], ["hi"]),
        helper.make_node("Clip", ["xd", "lo", "hi"], ["xa"]),
        # 2-bit codes -> {-1, 0, +1}: four codes a byte, the first in the low bits.
        _const("shifts", np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4)),
        _const("three", np.array(3, np.uint8)),
        _const("one_u8", np.array(1, np.uint8)),
        _const("four", np.array(4.0, np.float32)),
        _const("minus_one", np.array([-1], np.int64)),
        _const("zero_i", np.array([0], np.int64)),
        _const("one_i", np.array([1], np.int64)),
        _const("flat", np.array([0, -1], np.int64)),
        helper.make_node("Unsqueeze", ["codes", "minus_one"], ["codes3"]),
        helper.make_node("BitShift", ["codes3", "shifts"], ["shifted"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", ["shifted", "three"], ["code"]),
        helper.make_node("Cast", ["code"], ["code_f"], to=TensorProto.FLOAT),
        helper.make_node("Greater", ["code", "one_u8"], ["is_neg"]),
        helper.make_node("Cast", ["is_neg"], ["is_neg_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["is_neg_f", "four"], ["neg_offset"]),
        helper.make_node("Sub", ["code_f", "neg_offset"], ["ternary3"]),
        helper.make_node("Reshape", ["ternary3", "flat"], ["ternary"]),
        helper.make_node("Shape", ["scales"], ["groups"], start=1, end=2),
        _attr_const("n_scalar", "N", onnx.AttributeProto.INT),
        helper.make_node("Reshape", ["n_scalar", "minus_one"], ["n"]),
        helper.make_node("Mul", ["groups", "n"], ["groups_n"]),
        helper.make_node("Slice", ["ternary", "zero_i", "groups_n", "one_i"], ["ternary_used"]),
        helper.make_node("Concat", ["zero_i", "groups", "n"], ["group_shape"], axis=0),
        helper.make_node("Reshape", ["ternary_used", "group_shape"], ["ternary_groups"]),
        *_group_scales("scales", "row_scale", "scales3"),
    ]


def _group_scales(scales: str, row_scale: str, out: str) -> list[onnx.NodeProto]:
    """float32 [M, G, 1] = scales * row_scale (one name prefix per scales input)."""
    return [
        helper.make_node("Cast", [scales], [f"{scales}_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [row_scale, "minus_one"], [f"{row_scale}2"]),
        helper.make_node("Mul", [f"{scales}_f", f"{row_scale}2"], [f"{scales}_rows"]),
        helper.make_node("Unsqueeze", [f"{scales}_rows", "minus_one"], [out]),
    ]


def _scaled_groups(asymmetric: bool) -> list[onnx.NodeProto]:
    """wg [M, G, N] = ternary groups times their scale (+1 codes: scales; -1 codes: neg_scales when asymmetric)."""
    if not asymmetric:
        return [helper.make_node("Mul", ["ternary_groups", "scales3"], ["wg"])]
    return [
        *_group_scales("neg_scales", "neg_row_scale", "neg_scales3"),
        _const("zero_t", np.array(0.0, np.float32)),
        helper.make_node("Greater", ["ternary_groups", "zero_t"], ["is_pos"]),
        helper.make_node("Where", ["is_pos", "scales3", "neg_scales3"], ["signed_scales"]),
        helper.make_node("Mul", ["ternary_groups", "signed_scales"], ["wg"]),
    ]


def _matmul(out: str) -> list[onnx.NodeProto]:
    """out [..., M] = xa [..., K] @ w.T + bias, as a Gemm on [-1, K] rows (Gemm takes the optional bias)."""
    return [
        helper.make_node("Concat", ["minus_one", "k"], ["rows_2d"], axis=0),
        helper.make_node("Reshape", ["xa", "rows_2d"], ["xa_2d"]),
        helper.make_node("Gemm", ["xa_2d", "w", "bias"], ["y_2d"], transB=1),
        helper.make_node("Shape", ["X"], ["x_lead"], end=-1),
        helper.make_node("Shape", ["w"], ["w_rows"], end=1),
        helper.make_node("Concat", ["x_lead", "w_rows"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["y_2d", "y_shape"], [out], allowzero=1),
    ]


def _activation(kind: str, src: str, out: str) -> list[onnx.NodeProto]:
    """out = the `activation` of src (docs/custom-ops.md); its parameters from `activation_params`."""
    if kind == "relu":
        return [helper.make_node("Relu", [src], [out])]
    if kind == "hardswish":  # the kernel's order of operations: x * clip(x + 3, 0, 6) * (1/6)
        return [
            _const("act_three", np.array(3.0, np.float32)),
            _const("act_zero", np.array(0.0, np.float32)),
            _const("act_six", np.array(6.0, np.float32)),
            _const("act_sixth", np.array(1 / 6, np.float32)),
            helper.make_node("Add", [src, "act_three"], ["act_shifted"]),
            helper.make_node("Clip", ["act_shifted", "act_zero", "act_six"], ["act_gate"]),
            helper.make_node("Mul", [src, "act_gate"], ["act_gated"]),
            helper.make_node("Mul", ["act_gated", "act_sixth"], [out]),
        ]
    params = _two_floats("activation_params", "act")
    if kind == "clip":
        return [*params, helper.make_node("Clip", [src, "act_p0", "act_p1"], [out])]
    return [  # hardsigmoid: clip(alpha * x + beta, 0, 1)
        *params,
        _const("act_zero", np.array(0.0, np.float32)),
        _const("act_one", np.array(1.0, np.float32)),
        helper.make_node("Mul", [src, "act_p0"], ["act_scaled"]),
        helper.make_node("Add", ["act_scaled", "act_p1"], ["act_shifted"]),
        helper.make_node("Clip", ["act_shifted", "act_zero", "act_one"], [out]),
    ]


def _relu(src: str, out: str) -> list[onnx.NodeProto]:
    """out = max(src, 0) when the calling node's `relu` attribute is 1, else src (the pass writes `relu` on every node)."""
    return [
        _attr_const("relu_flag", "relu", onnx.AttributeProto.INT),
        helper.make_node("Cast", ["relu_flag"], ["relu_bool"], to=TensorProto.BOOL),
        _const("zero_f", np.array(0.0, np.float32)),
        _const("neg_inf", np.array(-np.inf, np.float32)),
        helper.make_node("Where", ["relu_bool", "zero_f", "neg_inf"], ["floor"]),
        helper.make_node("Max", [src, "floor"], [out]),
    ]


def _two_floats(attr: str, prefix: str) -> list[onnx.NodeProto]:
    """{prefix}_p0, {prefix}_p1: the two values of the calling node's floats attribute `attr`, as scalars."""
    return [
        _attr_const(f"{prefix}_params", attr, onnx.AttributeProto.FLOATS),
        _const(f"{prefix}_first", np.array(0, np.int64)),
        _const(f"{prefix}_second", np.array(1, np.int64)),
        helper.make_node("Gather", [f"{prefix}_params", f"{prefix}_first"], [f"{prefix}_p0"]),
        helper.make_node("Gather", [f"{prefix}_params", f"{prefix}_second"], [f"{prefix}_p1"]),
    ]


def _affine(src: str, out: str) -> list[onnx.NodeProto]:
    """out = src * scale + shift, [scale, shift] = `activation_affine`."""
    return [
        *_two_floats("activation_affine", "affine"),
        helper.make_node("Mul", [src, "affine_p0"], ["affine_scaled"]),
        helper.make_node("Add", ["affine_scaled", "affine_p1"], [out]),
    ]


def _quantize_output(src: str, out: str) -> list[onnx.NodeProto]:
    """out = src as 8-bit levels under y_scale and y_zero_point (of y_zero_point's type)."""
    return [helper.make_node("QuantizeLinear", [src, "y_scale", "y_zero_point"], [out])]


def _nhwc_output(src: str, out: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Transpose", [src], [out], perm=[0, 2, 3, 1])]


def _residual(features: set[str]) -> list[onnx.NodeProto]:
    """summed = conv_out + the residual: dequantized first when it is 8-bit levels (QUANTIZED_RESIDUAL),
    transposed to NCHW when it is NHWC (it has Y's layout: Y_NHWC)."""
    if RESIDUAL not in features:
        return []
    nodes, src = [], "residual"
    if QUANTIZED_RESIDUAL in features:
        nodes.append(helper.make_node("DequantizeLinear", [src, "residual_scale", "residual_zero_point"], ["residual_f"]))
        src = "residual_f"
    if Y_NHWC in features:
        nodes.append(helper.make_node("Transpose", [src], ["residual_nchw"], perm=[0, 3, 1, 2]))
        src = "residual_nchw"
    return [*nodes, helper.make_node("Add", ["conv_out", src], ["summed"])]


def _conv_inputs(features: set[str]) -> list[str]:
    """The TernaryConv body's formal inputs: CONV_INPUTS up to the last one its features read (the node's positions)."""
    last = ("residual_zero_point" if QUANTIZED_RESIDUAL in features else "y_zero_point" if QUANTIZED_OUTPUT in features
            else "residual" if RESIDUAL in features else INPUTS[-1])
    return CONV_INPUTS[:CONV_INPUTS.index(last) + 1]


def _finish(features: set[str]) -> tuple[str, list[onnx.NodeProto]]:
    """(the name the op's body writes, the nodes from it to Y): the activation, the affine map, the output's
    quantization, then its transpose to NHWC."""
    stages = [lambda src, out, kind=kind: _activation(kind, src, out) for kind in ACTIVATIONS if kind in features]
    stages += [_affine] if AFFINE in features else []
    stages += [_quantize_output] if QUANTIZED_OUTPUT in features else []
    stages += [_nhwc_output] if Y_NHWC in features else []
    nodes, src = [], "pre" if stages else "Y"
    for index, stage in enumerate(stages):
        out = "Y" if index == len(stages) - 1 else f"stage{index}"
        nodes += stage(src, out)
        src = out
    return ("pre" if stages else "Y"), nodes


def _rows_k() -> list[onnx.NodeProto]:
    """wg -> w [M, K] (MatMul and Gemm: one segment a row)."""
    return [
        helper.make_node("Reshape", ["wg", "flat"], ["w_padded"]),
        _attr_const("k_scalar", "K", onnx.AttributeProto.INT),
        helper.make_node("Reshape", ["k_scalar", "minus_one"], ["k"]),
        helper.make_node("Slice", ["w_padded", "zero_i", "k", "one_i"], ["w"]),
    ]


def _conv_weight() -> list[onnx.NodeProto]:
    """wg -> the ONNX Conv weight [M, C/g, R, S] (segments per (r, s) when C/g >= N, else one)."""
    segmented = helper.make_graph(
        [
            helper.make_node("Mul", ["r", "s"], ["rs"]),
            helper.make_node("Concat", ["zero_i", "rs", "minus_one"], ["seg_shape"], axis=0),
            helper.make_node("Reshape", ["wg", "seg_shape"], ["w_seg"]),
            _const("two_i", np.array([2], np.int64)),
            helper.make_node("Slice", ["w_seg", "zero_i", "cg", "two_i"], ["w_seg_used"]),
            helper.make_node("Concat", ["zero_i", "r", "s", "cg"], ["rsc_shape"], axis=0),
            helper.make_node("Reshape", ["w_seg_used", "rsc_shape"], ["w_rsc"]),
            helper.make_node("Transpose", ["w_rsc"], ["w_then"], perm=[0, 3, 1, 2]),
        ],
        "segmented",
        [],
        [helper.make_tensor_value_info("w_then", TensorProto.FLOAT, None)],
    )
    whole = helper.make_graph(
        [
            helper.make_node("Reshape", ["wg", "flat"], ["w_flat"]),
            helper.make_node("Mul", ["r", "s"], ["rs2"]),
            helper.make_node("Mul", ["cg", "rs2"], ["filter_len"]),
            helper.make_node("Slice", ["w_flat", "zero_i", "filter_len", "one_i"], ["w_flat_used"]),
            helper.make_node("Reshape", ["w_flat_used", "weight_shape"], ["w_else"]),
        ],
        "whole_filter",
        [],
        [helper.make_tensor_value_info("w_else", TensorProto.FLOAT, None)],
    )
    return [
        _attr_const("weight_shape", "weight_shape", onnx.AttributeProto.INTS),
        _const("idx1", np.array([1], np.int64)),
        _const("idx2", np.array([2], np.int64)),
        _const("idx3", np.array([3], np.int64)),
        _const("idx4", np.array([4], np.int64)),
        helper.make_node("Slice", ["weight_shape", "idx1", "idx2"], ["cg"]),
        helper.make_node("Slice", ["weight_shape", "idx2", "idx3"], ["r"]),
        helper.make_node("Slice", ["weight_shape", "idx3", "idx4"], ["s"]),
        helper.make_node("GreaterOrEqual", ["cg", "n"], ["segmented_1"]),
        helper.make_node("Squeeze", ["segmented_1"], ["segmented"]),
        helper.make_node("If", ["segmented"], ["w"], then_branch=segmented, else_branch=whole),
    ]


def _attr_passthrough(name: str, kind: int) -> onnx.AttributeProto:
    attr = onnx.AttributeProto()
    attr.name, attr.ref_attr_name, attr.type = name, name, kind
    return attr


ASYMMETRIC = "asymmetric"  # node and function overload of the bodies that read neg_scales
RESIDUAL = "residual"  # TernaryConv nodes with a residual input (joined as "asymmetric-residual")
ACTIVATIONS = ("relu", "clip", "hardsigmoid", "hardswish")  # values of the `activation` attribute, and overloads
AFFINE = "affine"  # nodes with `activation_affine`
# TernaryConv only (passes/quantize_between_convs.py): X given as 8-bit levels of x_zero_point's type, the
# residual as 8-bit levels under residual_scale / residual_zero_point (with RESIDUAL), Y returned as 8-bit levels
# under y_scale / y_zero_point; X in NHWC layout (x_layout), Y and the residual in NHWC layout (y_layout).
QUANTIZED_INPUT, QUANTIZED_RESIDUAL, QUANTIZED_OUTPUT = "qinput", "qresidual", "qoutput"
X_NHWC, Y_NHWC = "xnhwc", "ynhwc"
X_LAYOUT, Y_LAYOUT, NHWC = "x_layout", "y_layout", "NHWC"  # string attributes; absent: "NCHW"
CONV_INPUTS = [*INPUTS, "residual", "y_scale", "y_zero_point", "residual_scale", "residual_zero_point"]
_CONV_ONLY = {RESIDUAL, QUANTIZED_INPUT, X_NHWC, QUANTIZED_RESIDUAL, QUANTIZED_OUTPUT, Y_NHWC}
_ORDER = (ASYMMETRIC, QUANTIZED_INPUT, X_NHWC, RESIDUAL, QUANTIZED_RESIDUAL, *ACTIVATIONS, AFFINE, QUANTIZED_OUTPUT,
          Y_NHWC)


def with_features(overload: str, *features: str) -> str:
    """`overload` with `features` added (empty strings ignored), all joined by "-" in one fixed order."""
    present = (set(overload.split("-")) | set(features)) - {""}
    unknown = present - set(_ORDER)
    if unknown:
        raise ValueError(f"unknown overload feature(s) {sorted(unknown)}")
    return "-".join(name for name in _ORDER if name in present)


def overload_name(asymmetric: bool, residual: bool, activation: str = "", affine: bool = False) -> str:
    """The overload of a node: its features joined by "-", e.g. "asymmetric-residual-hardswish-affine"."""
    features = ((ASYMMETRIC, asymmetric), (RESIDUAL, residual), (activation, True), (AFFINE, affine))
    return with_features("", *(name for name, on in features if on))


def function_protos(opset: int, overload: str = "") -> list[onnx.FunctionProto]:
    """The FunctionProtos of the three ops, for the nodes this pass writes.

    Covers float activations, scales of any type with a row_scale input
    (always written by the pass). A body cannot test whether an optional
    input was given, nor compare a string attribute, so the asymmetric nodes
    (neg_scales and neg_row_scale given) carry the overload ASYMMETRIC and
    get the bodies of that overload (IR >= 10): onnxruntime picks the body by
    (domain, name, overload) and the kernel by name alone. TernaryConv nodes
    with a residual input (added before the ReLU) carry RESIDUAL too
    (overload_name); those overloads have only the conv body. Nodes with an
    `activation` carry its name (ACTIVATIONS), nodes with `activation_affine`
    AFFINE; their bodies apply them last, in that order. TernaryConv nodes
    with 8-bit X, residual or Y carry QUANTIZED_INPUT, QUANTIZED_RESIDUAL
    (with RESIDUAL), QUANTIZED_OUTPUT; with x_layout or y_layout "NHWC",
    X_NHWC or Y_NHWC. Their bodies transpose NHWC X to NCHW, take X's levels
    as they are, dequantize the residual (and transpose it from NHWC) before
    the Add, quantize Y after the affine map, then transpose it to NHWC; their
    formal inputs are CONV_INPUTS up to the last one they read.
    """
    features = set(overload.split("-")) - {""}
    imports = [helper.make_opsetid("", opset)]
    common_attrs = ["N", "act_qmin", "act_qmax"]
    activation_attrs = ["activation", "activation_params", "activation_affine"]
    weights = [*_activation_and_weights(features), *_scaled_groups(ASYMMETRIC in features)]
    out, finish = _finish(features)

    matmul = helper.make_function(
        DOMAIN, "TernaryMatMul", INPUTS, ["Y"], [*weights, *_rows_k(), *_matmul("linear_out"), *_relu("linear_out", out), *finish],
        imports, [*common_attrs, "K", "relu", *activation_attrs],
    )
    gemm_node = helper.make_node("Gemm", ["xa", "w", "bias"], ["linear_out"], transB=1)
    for name, kind in (("transA", onnx.AttributeProto.INT), ("alpha", onnx.AttributeProto.FLOAT),
                       ("beta", onnx.AttributeProto.FLOAT)):
        gemm_node.attribute.append(_attr_passthrough(name, kind))
    gemm = helper.make_function(
        DOMAIN, "TernaryGemm", INPUTS, ["Y"], [*weights, *_rows_k(), gemm_node, *_relu("linear_out", out), *finish],
        imports, [*common_attrs, "K", "transA", "transB", "alpha", "beta", "relu", *activation_attrs],
    )
    conv_node = helper.make_node("Conv", ["xa", "w", "bias"], ["conv_out"])
    for name in ("group", "strides", "pads", "dilations"):
        kind = onnx.AttributeProto.INT if name == "group" else onnx.AttributeProto.INTS
        conv_node.attribute.append(_attr_passthrough(name, kind))
    relu = _relu("summed" if RESIDUAL in features else "conv_out", out)
    conv = helper.make_function(
        DOMAIN, "TernaryConv", _conv_inputs(features), ["Y"],
        [*weights, *_conv_weight(), conv_node, *_residual(features), *relu, *finish],
        imports, [*common_attrs, "weight_shape", "group", "strides", "pads", "dilations", "kernel_shape", "relu",
                  *activation_attrs, X_LAYOUT, Y_LAYOUT],
    )
    functions = [conv] if features & _CONV_ONLY else [matmul, gemm, conv]
    for function in functions:
        function.overload = overload
    return functions


def attach_function_bodies(model: ir.Model) -> None:
    """Give `model` this version's FunctionProtos of every com.fgq overload its main graph uses; drop unused functions."""
    opset = model.opset_imports[""]
    for overload in sorted({node.overload for node in model.graph if node.domain == DOMAIN}):
        for proto in function_protos(opset, overload):
            function = ir.serde.deserialize_function(proto)
            model.functions[function.identifier()] = function
    ir.passes.common.RemoveUnusedFunctionsPass()(model)


def has_input(node: ir.Node, name: str) -> bool:
    """Whether the com.fgq node has its input `name` (one of CONV_INPUTS): omitted ones are empty or absent."""
    index = CONV_INPUTS.index(name)
    return len(node.inputs) > index and node.inputs[index] is not None


def _nhwc(node: ir.Node, attr: str) -> bool:
    layout = node.attributes.get(attr)
    return layout is not None and layout.as_string() == NHWC


def _levels(value: ir.Value | None) -> bool:
    """Whether an input is 8-bit levels: made by a QuantizeLinear or by a TernaryConv with y_zero_point, or typed
    uint8/int8."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "QuantizeLinear" and producer.domain in ("", "ai.onnx"):
        return True
    if producer is not None and producer.op_type == "TernaryConv" and producer.domain == DOMAIN:
        return has_input(producer, "y_zero_point")
    return value is not None and value.dtype in (ir.DataType.UINT8, ir.DataType.INT8)


def node_overload(node: ir.Node) -> str:
    """The overload a com.fgq node's inputs and attributes call for: neg_scales given (asymmetric), the
    `activation` attribute, `activation_affine`; for a TernaryConv also a residual, 8-bit X (from X's producer or
    type), residual_zero_point and y_zero_point given, x_layout and y_layout "NHWC"."""
    conv = node.op_type == "TernaryConv"
    features = {
        ASYMMETRIC: has_input(node, "neg_scales"),
        RESIDUAL: conv and has_input(node, "residual"),
        QUANTIZED_INPUT: conv and _levels(node.inputs[0] if node.inputs else None),
        QUANTIZED_RESIDUAL: conv and has_input(node, "residual_zero_point"),
        QUANTIZED_OUTPUT: conv and has_input(node, "y_zero_point"),
        X_NHWC: conv and _nhwc(node, X_LAYOUT),
        Y_NHWC: conv and _nhwc(node, Y_LAYOUT),
        AFFINE: "activation_affine" in node.attributes,
    }
    activation = node.attributes.get("activation")
    return with_features("", *(name for name, on in features.items() if on),
                         activation.as_string() if activation is not None else "")


def restore_overloads(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each com.fgq node's overload and this version's function bodies made again.

    onnx-graphsurgeon (0.6) keeps neither a node's overload nor a function's, so a model edited with it
    holds several com.fgq functions of one name, which onnxruntime refuses to load ("Duplicate
    model-local function identifier"). The overloads follow from each node's inputs and attributes, and
    from X's producer or type (node_overload: 8-bit X); the com.fgq functions are replaced by the bodies of
    the overloads in use.
    """
    ir_model = ir.serde.deserialize_model(model)
    for node in ir_model.graph:
        if node.domain == DOMAIN:
            node.overload = node_overload(node)
    for key in [key for key, function in ir_model.functions.items() if function.domain == DOMAIN]:
        del ir_model.functions[key]
    attach_function_bodies(ir_model)
    return ir.serde.serialize_model(ir_model)
