"""Fold a per-output-channel affine map y -> scale * y + shift into the Conv/Gemm/MatMul that makes y.

Shared by the BatchNorm and the scale-Mul folding passes. Every output
channel of a linear node is one row of its weight (and one bias entry), so
scaling the row and the bias is exact algebra; only float rounding changes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fgq_onnx.graph_utils import DEFAULT_DOMAINS, add_initializer, constant_array, int_attr, set_input


def weight_channel_axis(node: ir.Node) -> int | None:
    """The axis of the constant weight (input 1) that runs along output channels; None if unsupported."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return None if int_attr(node, "transA", 0) else (0 if int_attr(node, "transB", 0) else 1)
    if node.op_type == "MatMul":
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        return 1 if weight is not None and weight.ndim == 2 else None
    return None


def sole_consumer(producer: ir.Node) -> ir.Node | None:
    """The one node reading `producer`'s output, if it has exactly one and is not a graph output."""
    output = producer.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None
    return uses[0][0] if isinstance(uses[0], tuple) else uses[0].node


def channel_vector(values: np.ndarray, channels: int, rank: int, channel_axis: int) -> np.ndarray | None:
    """`values` as one value per output channel [channels], if it broadcasts only along the channel axis.

    `values` must have one value, or `channels` along `channel_axis` of an
    output of `rank` axes and 1 on every other axis, and no more axes than
    the output (more would broadcast the output to a new shape).
    """
    if values.ndim > rank:
        return None
    if values.size == 1:
        return np.full(channels, values.reshape(()))
    padded = (1,) * (rank - values.ndim) + values.shape
    expected = tuple(channels if i == channel_axis else 1 for i in range(rank))
    return values.reshape(-1) if padded == expected else None


def sole_consumer_op(producer: ir.Node, op_type: str) -> ir.Node | None:
    """sole_consumer, when it is a default-domain `op_type` node of the producer's own graph."""
    consumer = sole_consumer(producer)
    if consumer is None or consumer.op_type != op_type or consumer.domain not in DEFAULT_DOMAINS:
        return None
    return consumer if consumer.graph is producer.graph else None


def fold_channel_affine(producer: ir.Node, follower: ir.Node, scale: np.ndarray, shift: np.ndarray | None) -> None:
    """Make `producer` compute follower(producer(x)) = scale * y + shift per channel, and remove `follower`.

    `scale` is [M] (or one value), `shift` is [M] or None. The weight (and
    the bias, added when there is a shift) go into fresh initializers, so a
    tensor shared with other nodes is never changed. The caller checks that
    the weight is constant, `follower` is the only consumer and the shapes fit.
    """
    weight = constant_array(producer.inputs[1])
    bias_input = producer.inputs[2] if len(producer.inputs) > 2 else None
    bias = constant_array(bias_input)
    axis = weight_channel_axis(producer)
    shape = [1] * weight.ndim
    shape[axis] = -1
    scale = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (weight.shape[axis],))
    graph, label = producer.graph, producer.name or follower.name
    producer.replace_input_with(1, add_initializer(graph, f"{label}.folded_weight", (weight * scale.reshape(shape)).astype(weight.dtype)))
    if bias is not None or shift is not None:
        new_bias = (bias if bias is not None else 0.0) * scale + (shift if shift is not None else 0.0)
        set_input(producer, 2, add_initializer(graph, f"{label}.folded_bias", np.asarray(new_bias).astype(weight.dtype)))
    output_name = follower.outputs[0].name
    ir.convenience.replace_all_uses_with(follower.outputs[0], producer.outputs[0], replace_graph_outputs=True)
    follower.outputs[0].name = None
    producer.outputs[0].name = output_name  # graph outputs keep their names
    graph.remove(follower, safe=True)
