"""Replace ternarized Conv/Gemm/MatMul and their activation Q/DQ by com.fgq custom ops.

Input: the portable "qdq" model of TernarizeWeightsPass + InsertActivationQdqPass
(weight = blocked DequantizeLinear of INT2/int8 codes, activation =
[Clip] -> QuantizeLinear -> DequantizeLinear). Output: TernaryConv /
TernaryGemm / TernaryMatMul nodes (docs/custom-ops.md) with packed 2-bit codes
(docs/packed-format.md) that quantize their float input themselves, plus a
model-local FunctionProto per op whose body computes the same with standard
ops: the model still runs without the library (onnxruntime inlines the body)
and shape inference and Netron understand it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from fgq_onnx.graph_utils import DEFAULT_DOMAINS, add_initializer, constant_array, int_attr
from fgq_onnx.packing import pack_rows
from fgq_onnx.ternary import GroupLayout

DOMAIN = "com.fgq"
OPS = {"MatMul": "TernaryMatMul", "Gemm": "TernaryGemm", "Conv": "TernaryConv"}
INPUTS = ["X", "x_scale", "x_zero_point", "codes", "scales", "row_scale", "neg_scales", "neg_row_scale", "bias"]


@dataclass
class CustomOpRecord:
    """What happened to one ternarized node."""

    node: str
    op_type: str
    converted: bool
    reason: str = ""


# -- the function bodies ----------------------------------------------------------


def _const(name: str, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(array), name))


def _attr_const(name: str, attr: str, kind: int) -> onnx.NodeProto:
    """Constant whose value is the calling node's attribute (value_int / value_ints / value_float)."""
    field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.INTS: "value_ints"}[kind]
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(helper.make_attribute_ref(field, kind, attr))
    node.attribute[-1].ref_attr_name = attr
    return node


def _activation_and_weights() -> list[onnx.NodeProto]:
    """Body prefix: xa (dequantized, clamped activation), ternary_groups [M, G, N] and scales3 [M, G, 1]."""
    return [
        helper.make_node("QuantizeLinear", ["X", "x_scale", "x_zero_point"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "x_scale", "x_zero_point"], ["xd"]),
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


def function_protos(opset: int, overload: str = "") -> list[onnx.FunctionProto]:
    """The FunctionProtos of the three ops, for the nodes this pass writes.

    Covers float activations, scales of any type with a row_scale input
    (always written by the pass); TernaryMatMul's body has no bias. A body
    cannot test whether an optional input was given, so the asymmetric
    nodes (neg_scales and neg_row_scale given) carry the overload
    ASYMMETRIC and get the bodies of that overload (IR >= 10): onnxruntime
    picks the body by (domain, name, overload) and the kernel by name alone.
    """
    imports = [helper.make_opsetid("", opset)]
    common_attrs = ["N", "act_qmin", "act_qmax"]
    weights = [*_activation_and_weights(), *_scaled_groups(overload == ASYMMETRIC)]

    matmul = helper.make_function(
        DOMAIN, "TernaryMatMul", INPUTS, ["Y"],
        [*weights, *_rows_k(), helper.make_node("Transpose", ["w"], ["wt"]),
         helper.make_node("MatMul", ["xa", "wt"], ["Y"])],
        imports, [*common_attrs, "K"],
    )
    gemm_node = helper.make_node("Gemm", ["xa", "w", "bias"], ["Y"], transB=1)
    for name, kind in (("transA", onnx.AttributeProto.INT), ("alpha", onnx.AttributeProto.FLOAT),
                       ("beta", onnx.AttributeProto.FLOAT)):
        gemm_node.attribute.append(_attr_passthrough(name, kind))
    gemm = helper.make_function(
        DOMAIN, "TernaryGemm", INPUTS, ["Y"], [*weights, *_rows_k(), gemm_node],
        imports, [*common_attrs, "K", "transA", "transB", "alpha", "beta"],
    )
    conv_node = helper.make_node("Conv", ["xa", "w", "bias"], ["conv_out"])
    for name in ("group", "strides", "pads", "dilations"):
        kind = onnx.AttributeProto.INT if name == "group" else onnx.AttributeProto.INTS
        conv_node.attribute.append(_attr_passthrough(name, kind))
    relu = [
        _attr_const("relu_flag", "relu", onnx.AttributeProto.INT),
        helper.make_node("Cast", ["relu_flag"], ["relu_bool"], to=TensorProto.BOOL),
        _const("zero_f", np.array(0.0, np.float32)),
        _const("neg_inf", np.array(-np.inf, np.float32)),
        helper.make_node("Where", ["relu_bool", "zero_f", "neg_inf"], ["floor"]),
        helper.make_node("Max", ["conv_out", "floor"], ["Y"]),
    ]
    conv = helper.make_function(
        DOMAIN, "TernaryConv", INPUTS, ["Y"], [*weights, *_conv_weight(), conv_node, *relu],
        imports, [*common_attrs, "weight_shape", "group", "strides", "pads", "dilations", "kernel_shape", "relu"],
    )
    functions = [matmul, gemm, conv]
    for function in functions:
        function.overload = overload
    return functions


# -- graph matching ---------------------------------------------------------------


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in DEFAULT_DOMAINS:
        return None
    return node


@dataclass
class _Activation:
    source: ir.Value
    scale: ir.Value
    zero_point: ir.Value
    qmin: int
    qmax: int


def _match_activation(value: ir.Value) -> _Activation | str:
    dq = _producer(value, "DequantizeLinear")
    q = _producer(dq.inputs[0], "QuantizeLinear") if dq is not None else None
    if dq is None or q is None:
        return "activation is not quantized (no QuantizeLinear -> DequantizeLinear in front)"
    if len(dq.inputs) < 3 or len(q.inputs) < 3:
        return "activation Q/DQ without an explicit zero point"
    arrays = [constant_array(v) for v in (q.inputs[1], q.inputs[2], dq.inputs[1], dq.inputs[2])]
    if any(a is None or a.size != 1 for a in arrays):
        return "activation Q/DQ scale or zero point is not a constant scalar"
    if not (np.array_equal(arrays[0], arrays[2]) and np.array_equal(arrays[1], arrays[3])):
        return "activation Q and DQ disagree on scale or zero point"
    if arrays[1].dtype not in (np.uint8, np.int8) or arrays[0].dtype != np.float32:
        return f"activation quantized as {arrays[1].dtype} with {arrays[0].dtype} scale (needs uint8/int8, float32)"
    scale, zero = float(arrays[0].reshape(())), int(arrays[1].reshape(()))
    info = np.iinfo(arrays[1].dtype)
    qmin, qmax = int(info.min), int(info.max)
    source = q.inputs[0]
    clip = _producer(source, "Clip")
    if clip is not None and len(clip.inputs) == 3:
        lo, hi = constant_array(clip.inputs[1]), constant_array(clip.inputs[2])
        if lo is not None and hi is not None and lo.size == 1 and hi.size == 1:
            qmin = max(qmin, int(np.round(float(lo.reshape(())) / scale)) + zero)
            qmax = min(qmax, int(np.round(float(hi.reshape(())) / scale)) + zero)
            source = clip.inputs[0]
    if source.type is not None and source.dtype != ir.DataType.FLOAT:
        return "activation is not float32"
    return _Activation(source, q.inputs[1], q.inputs[2], qmin, qmax)


@dataclass
class _Weight:
    codes: np.ndarray  # int8 {-1, 0, 1} in the DequantizeLinear input's shape
    scales: list[np.ndarray]  # blocked scales as stored (float32, float16 or uint8 codes): [+] or [+, -]
    row_scales: list[np.ndarray | None]  # float32 [M] for uint8 scales, one per entry of `scales`
    axis: int
    n: int
    flattened: bool
    shape: tuple[int, ...]  # the weight's shape as the linear node sees it


def _match_scales(value: ir.Value) -> tuple[np.ndarray, np.ndarray | None] | str:
    """f32/f16: a constant; u8: DequantizeLinear(uint8 codes, float32 row_scale, axis=row axis)."""
    array = constant_array(value)
    if array is not None:
        if array.dtype not in (np.float32, np.float16):
            return f"weight scales are {array.dtype}"
        return array, None
    dq = _producer(value, "DequantizeLinear")
    if dq is None or len(dq.inputs) < 2:
        return "weight scales are neither constant nor uint8 codes under a row scale"
    q, row_scale = constant_array(dq.inputs[0]), constant_array(dq.inputs[1])
    if q is None or row_scale is None or q.dtype != np.uint8 or row_scale.dtype != np.float32 or row_scale.ndim != 1:
        return "weight scale codes are not constant uint8 under a float32 [M] row scale"
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zero = constant_array(dq.inputs[2])
        if zero is None or np.any(zero != 0):
            return "weight scale codes have a non-zero zero point"
    return q, row_scale


def _is_zero(value: ir.Value | None) -> bool:
    array = constant_array(value)
    return array is not None and array.size == 1 and float(array.reshape(())) == 0.0


def _asymmetric_parts(add: ir.Node) -> list[ir.Value] | str:
    """Add(Max(w_pos, 0), Min(w_neg, 0)) (TernarizeWeightsPass's asymmetric form) -> [w_pos, w_neg]."""
    parts = {}
    for value in add.inputs:
        node = _producer(value, "Max") or _producer(value, "Min")
        if node is None or len(node.inputs) != 2 or not _is_zero(node.inputs[1]):
            return "weight Add is not max(w+, 0) + min(w-, 0)"
        parts[node.op_type] = node.inputs[0]
    if set(parts) != {"Max", "Min"}:
        return "weight Add is not max(w+, 0) + min(w-, 0)"
    return [parts["Max"], parts["Min"]]


def _match_dequantize(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray | None, int, int] | str:
    """Blocked DequantizeLinear(constant INT2/int8 codes, scales) -> (codes value, scales, row scale, block size, axis)."""
    dq = _producer(value, "DequantizeLinear")
    if dq is None or len(dq.inputs) < 2:
        return "weight is not a blocked DequantizeLinear"
    if constant_array(dq.inputs[0]) is None:
        return "weight codes are not a constant initializer"
    if dq.inputs[0].dtype not in (ir.DataType.INT2, ir.DataType.INT8):
        return f"weight codes are {dq.inputs[0].dtype}, not INT2/int8"
    scales = _match_scales(dq.inputs[1])
    if isinstance(scales, str):
        return scales
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zero = constant_array(dq.inputs[2])
        if zero is None or np.any(zero != 0):
            return "weight DequantizeLinear has a non-zero zero point"
    block = int_attr(dq, "block_size", 0)
    if block < 1:
        return "weight DequantizeLinear is not blocked"
    return dq.inputs[0], scales[0], scales[1], block, int_attr(dq, "axis", 1)


def _match_weight(value: ir.Value) -> _Weight | str:
    flattened, target = False, None
    reshape = _producer(value, "Reshape")
    if reshape is not None:
        target = constant_array(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
        if target is None or np.any(target <= 0):
            return "weight Reshape without a constant, explicit shape"
        flattened, value = True, reshape.inputs[0]
    cast = _producer(value, "Cast")
    if cast is not None:  # float16 scales: DequantizeLinear yields float16
        value = cast.inputs[0]
    add = _producer(value, "Add")
    parts = _asymmetric_parts(add) if add is not None else [value]
    if isinstance(parts, str):
        return parts
    matches = [_match_dequantize(part) for part in parts]
    for match in matches:
        if isinstance(match, str):
            return match
    if any(m[0] is not matches[0][0] or m[3:] != matches[0][3:] or m[1].dtype != matches[0][1].dtype for m in matches):
        return "the two DequantizeLinear of asymmetric weights differ in codes, scale type, axis or block size"
    codes_value, _, _, block, axis = matches[0]
    codes = constant_array(codes_value).astype(np.int8)
    if np.any(np.abs(codes) > 1):
        return "weight codes are not ternary"
    axis %= codes.ndim
    shape = tuple(int(d) for d in target) if flattened else tuple(codes.shape)
    if int(np.prod(shape)) != codes.size:
        return "weight Reshape does not keep the element count"
    return _Weight(codes, [m[1] for m in matches], [m[2] for m in matches], axis, block, flattened, shape)


def _rows(weight: _Weight, to_rows: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """(ternary groups [M, G, N], each of the weight's scales [M, G]) in the custom-op row order."""
    codes, scales, axis = weight.codes, weight.scales, weight.axis
    if to_rows:  # a [K, M] weight with groups along K: make it [M, K]
        codes, scales, axis = codes.T, [s.T for s in scales], 1
    layout = GroupLayout(tuple(codes.shape), axis=axis, n=weight.n)
    groups = layout.rows_view(layout.group(codes))
    return groups, [layout.rows_view(np.moveaxis(s, axis, -1).reshape(-1, layout.groups_per_segment)) for s in scales]


class UseCustomOpsPass(ir.passes.InPlacePass):
    """Rewrite ternarized Conv/Gemm/MatMul with quantized activations into com.fgq custom ops.

    Matches a linear node (default domain) whose weight is a blocked
    DequantizeLinear of constant INT2/int8 codes (optionally reshaped: Conv
    with C/group < N) and whose activation comes through QuantizeLinear ->
    DequantizeLinear (optionally after a Clip to 4-bit levels), and replaces it
    by TernaryMatMul / TernaryGemm / TernaryConv taking the float activation
    (quantized inside the op), packed codes, and the group scales as the qdq
    model stores them (float32, float16, or uint8 under a row scale; a row
    scale of ones is written for float scales so every node has the same
    inputs as the FunctionProto). Asymmetric weights (max(w+, 0) + min(w-, 0)
    of two DequantizeLinear sharing the codes) also get neg_scales and
    neg_row_scale, and the overload "asymmetric" whose bodies read them. Q/DQ, Clip and
    weight nodes left without consumers are removed with their initializers;
    a tensor still used elsewhere keeps its Q/DQ. A Relu that is a Conv's only
    consumer is fused (TernaryConv relu=1). Adds the ops' FunctionProtos
    and the com.fgq opset import when anything was rewritten. Nodes that do
    not match (float activations, 3-D Conv, auto_pad, ...)
    are left as they are; `records` says why.

    Requires: default-domain opset >= 21 (the qdq format has it).
    """

    def __init__(self):
        super().__init__()
        self.records: list[CustomOpRecord] = []

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 1) < 21:
            raise ir.passes.PreconditionError("the custom-op rewrite needs default opset >= 21")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.records = []
        count = 0
        for node in list(model.graph):  # main graph only: subgraph rewrites are not supported yet
            if node.op_type not in OPS or node.domain not in DEFAULT_DOMAINS:
                continue
            name = node.name or node.outputs[0].name
            reason = self._rewrite(model.graph, node)
            self.records.append(CustomOpRecord(name, node.op_type, reason is None, reason or ""))
            count += reason is None
        if count:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            model.opset_imports[DOMAIN] = 1
            opset = model.opset_imports[""]
            overloads = {node.overload for node in model.graph if node.domain == DOMAIN}
            for proto in (p for overload in sorted(overloads) for p in function_protos(opset, overload)):
                function = ir.serde.deserialize_function(proto)
                model.functions[function.identifier()] = function
        return ir.passes.PassResult(model, modified=count > 0)

    def _rewrite(self, graph: ir.Graph, node: ir.Node) -> str | None:
        if len(node.inputs) < 2:
            return "no weight input"
        weight = _match_weight(node.inputs[1])
        if isinstance(weight, str):
            return weight
        act = _match_activation(node.inputs[0])
        if isinstance(act, str):
            return act
        attrs: dict[str, object] = {"N": weight.n, "act_qmin": act.qmin, "act_qmax": act.qmax}
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if node.op_type == "Conv":
            if len(weight.shape) != 4:
                return "only 2-D Conv (4-D weight) is supported"
            weight_shape = list(weight.shape)
            if node.attributes.get("auto_pad") is not None and node.attributes["auto_pad"].as_string() != "NOTSET":
                return "auto_pad is not supported"
            cg = weight_shape[1]
            expected_flat = cg < weight.n
            if weight.flattened != expected_flat or weight.axis != 1:
                return "Conv weight groups do not follow the packed format's layout"
            groups, scales = _rows(weight, to_rows=False)
            attrs.update(weight_shape=weight_shape, relu=0)
            for key in ("group", "strides", "pads", "dilations"):
                if key in node.attributes:
                    attrs[key] = node.attributes[key].value
        else:
            if weight.flattened or weight.codes.ndim != 2:
                return "weight is not 2-D"
            trans_b = node.op_type == "Gemm" and int_attr(node, "transB", 0) == 1
            expected_axis = 1 if trans_b else 0
            if weight.axis != expected_axis:
                return "weight groups do not run along the reduction"
            groups, scales = _rows(weight, to_rows=not trans_b)
            attrs["K"] = int(weight.codes.shape[1] if trans_b else weight.codes.shape[0])
            if node.op_type == "Gemm":
                attrs["transB"] = 1
                for key in ("transA", "alpha", "beta"):
                    if key in node.attributes:
                        attrs[key] = node.attributes[key].value
            elif bias is not None:
                return "MatMul with a third input"
        m = groups.shape[0]
        if any(r is not None and r.shape != (m,) for r in weight.row_scales):
            return "row scale does not have one value per output row"
        label = node.name or node.outputs[0].name
        codes = add_initializer(graph, f"{label}.packed_codes", pack_rows(groups.reshape(m, -1)))
        scale_inputs = []
        for suffix, array, row_scale in zip(("", "_neg"), scales, weight.row_scales):
            scale_inputs.append(add_initializer(graph, f"{label}.packed_scales{suffix}", array))
            scale_inputs.append(add_initializer(graph, f"{label}.row_scale{suffix}", row_scale if row_scale is not None else np.ones(m, np.float32)))
        scale_inputs += [None] * (4 - len(scale_inputs))
        inputs = [act.source, act.scale, act.zero_point, codes, *scale_inputs, bias]
        while inputs[-1] is None:
            inputs.pop()
        old_nodes, old_output = [node], node.outputs[0]
        relu = _single_relu_consumer(graph, node) if node.op_type == "Conv" else None
        if relu is not None:  # TernaryConv applies the ReLU itself
            attrs["relu"] = 1
            old_nodes, old_output = [node, relu], relu.outputs[0]
        overload = ASYMMETRIC if len(scales) > 1 else ""
        new = ir.node(OPS[node.op_type], inputs, attrs, domain=DOMAIN, overload=overload, name=label)
        ir.convenience.replace_nodes_and_values(graph, node, old_nodes, [new], [old_output], new.outputs)
        return None


def _single_relu_consumer(graph: ir.Graph, node: ir.Node) -> ir.Node | None:
    """The Relu that is the only consumer of `node`'s output (not itself a graph output), if any."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output in graph.outputs:
        return None
    consumer = uses[0][0] if isinstance(uses[0], tuple) else uses[0].node
    if consumer.op_type != "Relu" or consumer.domain not in DEFAULT_DOMAINS or consumer.graph is not graph:
        return None
    return consumer


def to_custom_ops(model: ir.Model) -> tuple[ir.Model, list[CustomOpRecord]]:
    """Rewrite a qdq model (in place) into the custom-op format; returns it and one record per linear node.

    For the converter's `--format custom`: run after the qdq passes and the
    clean-up (RemoveUnusedNodes/TopologicalSort), then save as usual.
    """
    rewrite = UseCustomOpsPass()
    result = rewrite(model)
    return result.model, rewrite.records
