"""Quantize the activation inputs of ternarized layers with calibrated ranges.

8-bit activations are a QuantizeLinear/DequantizeLinear pair (uint8 after
ReLU-like producers, int8 otherwise, zero point 0), which onnxruntime fuses
into its int8 kernels. 4-bit activations use the same 8-bit containers with a
Clip to the 16 levels in front: real uint4/int4 Q/DQ in front of a Conv breaks
onnxruntime's QDQ fusion at session creation (see the runtime notes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from fgq_onnx.graph_utils import add_initializer

from .ternarize_weights import TERNARY_MARK


@dataclass(frozen=True)
class ActivationQuant:
    """How one activation tensor is quantized: q = clamp(round(x / scale), qmin, qmax)."""

    scale: float
    signed: bool
    bits: int

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def needs_clip(self) -> bool:
        """Levels narrower than the 8-bit container need a Clip before QuantizeLinear."""
        return self.bits < 8


def _qdq_nodes(graph: ir.Graph, value: ir.Value, quant: ActivationQuant) -> tuple[list[ir.Node], ir.Value]:
    base = value.name
    scale = add_initializer(graph, f"{base}.act_scale", np.array(quant.scale, np.float32))
    zero_point = add_initializer(graph, f"{base}.act_zero_point", np.array(0, np.int8 if quant.signed else np.uint8))
    nodes = []
    source = value
    if quant.needs_clip:
        low = add_initializer(graph, f"{base}.act_min", np.array(quant.qmin * quant.scale, np.float32))
        high = add_initializer(graph, f"{base}.act_max", np.array(quant.qmax * quant.scale, np.float32))
        nodes.append(ir.node("Clip", [value, low, high], name=f"{base}/clip_{quant.bits}bit"))
        source = nodes[-1].outputs[0]
    quantize = ir.node("QuantizeLinear", [source, scale, zero_point], name=f"{base}/quantize")
    dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale, zero_point], name=f"{base}/dequantize")
    quantize.outputs[0].name = f"{base}.quantized"
    dequantize.outputs[0].name = f"{base}.dequantized"
    return [*nodes, quantize, dequantize], dequantize.outputs[0]


FLOAT_ACTIVATIONS_MARK = "fgq.float_activations"  # node metadata key: a converted layer whose activation stays float


def quantizes_activation(node: ir.Node) -> bool:
    """Whether `node`'s activation input gets Q/DQ: its weight is converted and it is not marked to keep float activations."""
    return TERNARY_MARK in node.metadata_props and FLOAT_ACTIVATIONS_MARK not in node.metadata_props


class InsertActivationQdqPass(ir.passes.InPlacePass):
    """Insert Q/DQ (and a Clip for 4-bit) on the activation input of ternarized nodes.

    For every node marked "fgq.ternary" (and not "fgq.float_activations") whose first input is named in `quants`,
    the input is routed through one shared Q/DQ pair per tensor. Other
    consumers of the tensor keep the float value.

    Requires: TernarizeWeightsPass has run (it marks the nodes).
    """

    def __init__(self, quants: dict[str, ActivationQuant]):
        super().__init__()
        self.quants = quants

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        inserted: dict[tuple[int, int], ir.Value] = {}
        for node in list(model.graph.all_nodes()):
            value = node.inputs[0] if node.inputs else None
            if not quantizes_activation(node) or value is None or value.name not in self.quants:
                continue
            key = (id(node.graph), id(value))
            if key not in inserted:
                nodes, inserted[key] = _qdq_nodes(node.graph, value, self.quants[value.name])
                _insert_after_producer(node.graph, value, nodes)
            node.replace_input_with(0, inserted[key])
        return ir.passes.PassResult(model, modified=bool(inserted))


def _insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, nodes)
    else:  # a graph input, an initializer or an outer-scope value
        graph.insert_before(graph.node(0), nodes)
