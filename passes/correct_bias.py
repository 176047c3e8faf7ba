"""Correct the output channels of ternarized layers: a gain in the group scales, a shift in the bias.

Bias correction (fgq_onnx/correction.py) measures how far a ternarized layer's
per-channel output mean and spread have moved from the fp32 layer's; this pass
writes the fix into the graph. The gain multiplies the group scales of the
channel (exact: every group lies inside one output channel), the shift goes
into the bias. Both always land in fresh initializers, so a tensor shared with
other nodes is never changed behind their back.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fgq_onnx.graph_utils import DEFAULT_DOMAINS, add_initializer, constant_array, float_attr, set_input

_OPS = ("Conv", "Gemm", "MatMul")


_WEIGHT_CHAIN_OPS = ("Reshape", "Add", "Max", "Min", "Cast")  # what TernarizeWeightsPass puts after DequantizeLinear


def ternary_scale_nodes(node: ir.Node) -> list[ir.Node]:
    """The DequantizeLinear nodes that decode `node`'s ternary weight (through Reshape/Max/Min/Add/Cast)."""
    found, stack, seen = [], [node.inputs[1]], set()
    while stack:
        value = stack.pop()
        producer = value.producer() if value is not None else None
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        if producer.op_type == "DequantizeLinear":
            found.append(producer)
        elif producer.op_type in _WEIGHT_CHAIN_OPS:
            stack.extend(producer.inputs[:1] if producer.op_type == "Reshape" else producer.inputs)
    return found


def _gain_target(dq: ir.Node) -> tuple[ir.Node, int] | None:
    """Where a gain per output row goes: (node, axis of its scale input 1 that runs along the rows).

    Float group scales (f32/f16) are a constant [.., rows, ..] input of the
    weight DequantizeLinear, as is int8 weights' per-channel row scale [M]; uint8 group scales are decoded by a second
    DequantizeLinear whose per-row float32 scale takes the gain instead.
    """
    scales = dq.inputs[1]
    if scales is None or len(scales.uses()) != 1:
        return None
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    if constant_array(scales) is not None:
        rank = len(constant_array(scales).shape)
        if rank == 1:  # int8 weights: the per-channel scale is the row scale
            return dq, 0
        return dq, (0 if axis % rank != 0 else 1)  # the weight axis that is not the reduction
    decode = scales.producer()
    if decode is not None and decode.op_type == "DequantizeLinear" and constant_array(decode.inputs[1]) is not None and constant_array(decode.inputs[1]).ndim == 1 and len(decode.inputs[1].uses()) == 1:
        return decode, 0
    return None


def scalable(node: ir.Node) -> bool:
    """True when `node`'s ternary weight is decoded for it alone, so its group scales can take a gain."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or len(weight.uses()) != 1 or weight.is_graph_output():
        return False
    dequantizers = ternary_scale_nodes(node)
    return bool(dequantizers) and all(len(dq.outputs[0].uses()) == 1 and _gain_target(dq) is not None for dq in dequantizers)


def _apply_gain(node: ir.Node, gain: np.ndarray) -> None:
    for dq in ternary_scale_nodes(node):
        target, out_axis = _gain_target(dq)
        scale_value = target.inputs[1]
        scales = constant_array(scale_value)
        if scales.shape[out_axis] != gain.size:
            raise ValueError(f"{_label(node)}: {gain.size} gains for scales of shape {scales.shape}")
        shape = [1] * scales.ndim
        shape[out_axis] = -1
        new = add_initializer(target.graph, f"{scale_value.name}.corrected", (scales * gain.reshape(shape)).astype(scales.dtype))
        target.replace_input_with(1, new)


def _label(node: ir.Node) -> str:
    return node.name or node.outputs[0].name or "node"


def _fold_into_following_add(node: ir.Node, shift: np.ndarray) -> bool:
    """MatMul -> Add(constant bias of [.., out]): add the shift to that constant."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return False
    consumer, index = uses[0].node, uses[0].idx
    if consumer.op_type != "Add" or consumer.domain not in DEFAULT_DOMAINS or len(consumer.inputs) != 2:
        return False
    other = consumer.inputs[1 - index]
    bias = constant_array(other)
    if bias is None or not np.issubdtype(bias.dtype, np.floating) or bias.size != shift.size or bias.shape[-1] != shift.size:
        return False
    new = add_initializer(consumer.graph, f"{other.name}.bias_corrected", (bias + shift.reshape(bias.shape)).astype(bias.dtype))
    consumer.replace_input_with(1 - index, new)
    return True


def _add_after(node: ir.Node, shift: np.ndarray) -> None:
    """Insert y' = Add(y, shift) after `node` and move every use of y (graph outputs too) to y'."""
    graph = node.graph
    output = node.outputs[0]
    uses = list(output.uses())
    constant = add_initializer(graph, f"{_label(node)}.bias_correction", shift)
    add = ir.node("Add", [output, constant], name=f"{_label(node)}/bias_correction")
    graph.insert_after(node, add)
    for use in uses:
        use.node.replace_input_with(use.idx, add.outputs[0])
    if output.is_graph_output():
        name = output.name
        graph.outputs[:] = [add.outputs[0] if v is output else v for v in graph.outputs]
        output.name = None
        add.outputs[0].name = name
        add.outputs[0].type, add.outputs[0].shape = output.type, output.shape  # a graph output must keep its type
        output.name = f"{name}.uncorrected"
    else:
        add.outputs[0].name = f"{output.name}.bias_corrected"


def _correct(node: ir.Node, shift: np.ndarray) -> bool:
    """Write the shift; True if it went into the node's own bias (so its output includes it)."""
    op = node.op_type
    weight = node.inputs[1]
    dtype = weight.dtype.numpy() if weight is not None and weight.dtype is not None else np.float32
    shift = np.asarray(shift, dtype).reshape(-1)
    if op in ("Conv", "Gemm"):
        beta = float_attr(node, "beta", 1.0) if op == "Gemm" else 1.0
        bias_input = node.inputs[2] if len(node.inputs) > 2 else None
        if bias_input is None and beta != 0.0:
            set_input(node, 2, add_initializer(node.graph, f"{_label(node)}.bias", (shift / beta).astype(dtype)))
            return True
        bias = constant_array(bias_input)
        if bias is not None and beta != 0.0:
            new = (bias + shift / beta).astype(bias.dtype)  # Gemm's C broadcasts against [M, N]: N is last
            node.replace_input_with(2, add_initializer(node.graph, f"{bias_input.name}.bias_corrected", new))
            return True
        if op == "Conv":  # a bias computed at run time: add after, broadcast over positions
            rank = len(weight.shape) if weight is not None and weight.shape is not None else 4
            _add_after(node, shift.reshape(-1, *([1] * (rank - 2))))
            return False
    if not (op == "MatMul" and _fold_into_following_add(node, shift)):
        _add_after(node, shift)
    return False


class CorrectBiasPass(ir.passes.InPlacePass):
    """Give chosen Conv/Gemm/MatMul nodes a per-output gain (in their group scales) and a bias shift.

    `shifts` maps a node's first output name to a vector: [K] for Conv (one per
    output channel), [N] for Gemm/MatMul (one per output column). Rewrites:
    Conv/Gemm with a constant bias -> the same node with bias + shift (Gemm:
    + shift / beta) in a new initializer; without a bias -> a new bias input;
    MatMul followed only by Add(constant [.., N]) -> that Add with the constant
    shifted; any other MatMul (or a run-time bias) -> an Add node after it,
    which takes over every use, graph outputs keeping their names. Shifts of
    all zeros are skipped. Main graph only.
    `gains` (same keys, optional) multiply the output channels of a ternarized
    node: the float group scales of the DequantizeLinear node(s) decoding its
    weight (or, for uint8 scales, the per-row float32 scale that decodes them)
    are replaced by scales * gain along the output axis; gains of all ones
    are skipped.

    Requires: every named node exists in the main graph and is one of those
    ops; a node given a gain must have a ternary weight of its own
    (`scalable(node)`). Violations raise ValueError, never a silent no-op.
    """

    def __init__(self, shifts: dict[str, np.ndarray], gains: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.shifts = shifts
        self.gains = gains or {}
        self.in_bias: set[str] = set()  # names whose shift went into the node's own bias input

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = {node.outputs[0].name: node for node in model.graph if node.op_type in _OPS and node.domain in DEFAULT_DOMAINS}
        missing = sorted((set(self.shifts) | set(self.gains)) - set(nodes))
        if missing:
            raise ValueError(f"no Conv/Gemm/MatMul in the main graph produces {missing}")
        changed = 0
        for name, gain in self.gains.items():
            gain = np.asarray(gain, np.float64).reshape(-1)
            if np.all(gain == 1.0):
                continue
            if not scalable(nodes[name]):
                raise ValueError(f"{_label(nodes[name])} has no ternary weight of its own to take a gain")
            _apply_gain(nodes[name], gain)
            changed += 1
        for name, shift in self.shifts.items():
            shift = np.asarray(shift)
            if not np.any(shift):
                continue
            if _correct(nodes[name], shift):
                self.in_bias.add(name)
            changed += 1
        return ir.passes.PassResult(model, modified=changed > 0)
