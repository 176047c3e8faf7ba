"""Give bias-less Convs with blocked ternary weights a zero bias (the qdq format).

onnxruntime's QDQ fusion (its extended optimization level, on by default) turns
DequantizeLinear(x) + DequantizeLinear(codes) -> Conv -> QuantizeLinear into a
QLinearConv when the Conv has no bias. QLinearConv has no INT2 kernel and no
per-group (blocked) weight scales: the session fails to load (INT2 codes) or
to run (int8 codes). A float bias, which that fusion does not take, keeps the
Conv a float Conv on the dequantized weight; adding zeros changes no output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fgq_onnx.graph_utils import add_initializer
from fgq_onnx.passes.replace_ternary_weights import decoding_nodes
from fgq_onnx.passes.ternarize_weights import TERNARY_MARK


def _blocked_weight(conv: ir.Node) -> bool:
    """Whether the Conv's weight is decoded by a DequantizeLinear with group scales (block_size)."""
    return any(node.op_type == "DequantizeLinear" and node.attributes.get("block_size") is not None
               for node in decoding_nodes(conv))


class AddZeroConvBiasPass(ir.passes.InPlacePass):
    """Add a zero float bias input to every ternarized Conv without one whose weight has group scales.

    The bias length is the output's channel count, from the value's shape
    (shape inference at load); a Conv whose channel count is unknown is left
    alone. Per-channel int8 weights (8-bit layers) keep no bias: there the
    fusion gives onnxruntime's own int8 kernel. Main graph only.

    Requires: the qdq format (TernarizeWeightsPass's DequantizeLinear chains).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for conv in list(model.graph):
            has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
            if conv.op_type != "Conv" or TERNARY_MARK not in conv.metadata_props or has_bias:
                continue
            shape = conv.outputs[0].shape
            channels = shape[1] if shape is not None and len(shape) > 1 else None
            if not isinstance(channels, int) or not _blocked_weight(conv):
                continue
            x = conv.inputs[0]
            dtype = x.dtype.numpy() if x is not None and x.dtype is not None else np.dtype(np.float32)
            label = conv.name or conv.outputs[0].name
            bias = add_initializer(model.graph, f"{label}.zero_bias", np.zeros(channels, dtype))
            attrs = {name: attr.value for name, attr in conv.attributes.items()}
            with_bias = ir.node("Conv", [*conv.inputs[:2], bias], attrs, name=conv.name, metadata_props=dict(conv.metadata_props))
            ir.convenience.replace_nodes_and_values(model.graph, conv, [conv], [with_bias], conv.outputs, with_bias.outputs)
            count += 1
        return ir.passes.PassResult(model, modified=count > 0)
