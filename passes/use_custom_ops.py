"""Replace ternarized Conv/Gemm/MatMul and their activation Q/DQ by com.fgq custom ops.

Input: the portable "qdq" model of TernarizeWeightsPass + InsertActivationQdqPass
(weight = blocked DequantizeLinear of INT2/int8 codes, activation =
[Clip] -> QuantizeLinear -> DequantizeLinear). Output: TernaryConv /
TernaryGemm / TernaryMatMul nodes (docs/custom-ops.md) with packed 2-bit codes
(docs/packed-format.md) that quantize their float input themselves, plus a
model-local FunctionProto per op (fgq_onnx/custom_op_functions.py) whose body
computes the same with standard ops: the model still runs without the library
(onnxruntime inlines the body) and shape inference and Netron understand it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from fgq_onnx.channel_fold import sole_consumer_op
from fgq_onnx.custom_op_functions import DOMAIN, OPS, function_protos, overload_name
from fgq_onnx.graph_utils import DEFAULT_DOMAINS, add_initializer, constant_array, int_attr
from fgq_onnx.packing import pack_rows
from fgq_onnx.passes.dequantize_at_load import DequantizeAtLoadPass
from fgq_onnx.passes.fold_bias_add import FoldBiasAddPass
from fgq_onnx.passes.fuse_activation import FuseActivationPass
from fgq_onnx.passes.fuse_residual_add import FuseResidualAddPass
from fgq_onnx.passes.quantize_between_convs import QuantizeBetweenConvsPass
from fgq_onnx.ternary import GroupLayout


@dataclass
class CustomOpRecord:
    """What happened to one ternarized node."""

    node: str
    op_type: str
    converted: bool
    reason: str = ""


# -- the function bodies ----------------------------------------------------------


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
    int8: bool = False  # int8 weights: `codes` holds the int8 values, `row_scales` their per-channel scale, n = 1


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


def _match_int8(value: ir.Value) -> _Weight | str | None:
    """Per-channel DequantizeLinear(constant int8 weight, float32 [M] scale, axis = the output-row axis) -> int8
    weights; None when `value` is not that form (then it may still be ternary)."""
    dq = _producer(value, "DequantizeLinear")
    if dq is None or len(dq.inputs) < 2 or int_attr(dq, "block_size", 0) != 0:
        return None
    values, scale = constant_array(dq.inputs[0]), constant_array(dq.inputs[1])
    if values is None or values.dtype != np.int8 or scale is None or scale.ndim != 1 or values.ndim < 2:
        return None
    row_axis = int_attr(dq, "axis", 1) % values.ndim
    if scale.dtype != np.float32 or scale.shape != (values.shape[row_axis],):
        return "int8 weight scale is not float32, one per output row"
    if values.ndim > 2 and row_axis != 0:
        return "int8 Conv weight is not scaled per output channel"
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zero = constant_array(dq.inputs[2])
        if zero is None or np.any(zero != 0):
            return "int8 weight has a non-zero zero point"
    if np.any(values == -128):
        return "int8 weight holds -128 (the custom ops take [-127, 127])"
    reduction = 1 if values.ndim > 2 else 1 - row_axis
    return _Weight(values, [], [scale], reduction, 1, False, tuple(values.shape), int8=True)


def _match_weight(value: ir.Value) -> _Weight | str:
    cast = _producer(value, "Cast")
    int8 = _match_int8(cast.inputs[0] if cast is not None else value)  # float16 models: a Cast after it
    if int8 is not None:
        return int8
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
    inputs as the FunctionProto). int8 weights (a per-channel DequantizeLinear
    of int8 values, N = 1) become int8 `scales` rows under their row_scale and
    one row of +1 codes shared by every row (the bodies' Mul broadcasts it), so
    they need no overload of their own. Asymmetric weights (max(w+, 0) + min(w-, 0)
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
            attrs["relu"] = 0  # every node has it: the function bodies read it
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
        if weight.int8:  # `scales` holds the int8 rows, one row of +1 codes serves them all (docs/custom-ops.md, "int8 weights")
            codes = add_initializer(graph, f"{label}.shared_codes", pack_rows(np.ones((1, groups.shape[1]), np.int8)))
            scale_inputs = [add_initializer(graph, f"{label}.int8_weights", groups.reshape(m, -1)),
                            add_initializer(graph, f"{label}.row_scale", weight.row_scales[0]), None, None]
        else:
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
        relu = sole_consumer_op(node, "Relu") if node.op_type == "Conv" else None
        if relu is not None:  # TernaryConv applies the ReLU itself
            attrs["relu"] = 1
            old_nodes, old_output = [node, relu], relu.outputs[0]
        overload = overload_name(asymmetric=len(scales) > 1, residual=False)
        new = ir.node(OPS[node.op_type], inputs, attrs, domain=DOMAIN, overload=overload, name=label)
        ir.convenience.replace_nodes_and_values(graph, node, old_nodes, [new], [old_output], new.outputs)
        return None


def to_custom_ops(model: ir.Model, float_between_layers: bool = False) -> tuple[ir.Model, list[CustomOpRecord]]:
    """Rewrite a qdq model (in place) into the custom-op format; returns it and one record per linear node.

    For the converter's `--format custom`: run after the qdq passes and the
    clean-up (RemoveUnusedNodes/TopologicalSort), then save as usual. Then,
    in the order the ops apply them, constant bias Adds, residual Adds (and
    their Relu) and activations after a com.fgq op are fused into it; unless
    `float_between_layers`, TernaryConvs read only by TernaryConvs return
    NHWC, as 8-bit levels where their readers agree (QuantizeBetweenConvsPass);
    the int8 weights of float-activation layers are decoded at load.
    """
    rewrite = UseCustomOpsPass()
    model = rewrite(model).model
    between = [] if float_between_layers else [QuantizeBetweenConvsPass()]
    for fusion in (FoldBiasAddPass(), FuseResidualAddPass(), FuseActivationPass(), *between, DequantizeAtLoadPass()):
        model = fusion(model).model
    return model, rewrite.records
