"""Swap the ternary codes and group scales of already-ternarized nodes for new ones.

Data-aware fitting (fgq_onnx/fitting.py) refines a layer's codes and scales
after TernarizeWeightsPass has written the exact ones; this pass rebuilds the
layer's decoding nodes from the new values, in the same storage and scale
format, so the graph looks exactly as if the pass had chosen them itself.
"""

from __future__ import annotations

import onnx_ir as ir

from fgq_onnx.passes.correct_bias import ternary_scale_nodes
from fgq_onnx.passes.ternarize_weights import dequantize_nodes
from fgq_onnx.scales import store_scales
from fgq_onnx.ternary import TernaryWeight


def decoding_nodes(node: ir.Node) -> list[ir.Node]:
    """Every node between `node`'s weight input and the initializers (the DequantizeLinear chain)."""
    found, stack = {}, [node.inputs[1]]
    while stack:
        value = stack.pop()
        producer = value.producer() if value is not None else None
        if producer is None or id(producer) in found:
            continue
        found[id(producer)] = producer
        stack.extend(producer.inputs)
    return list(found.values())


class ReplaceTernaryWeightsPass(ir.passes.InPlacePass):
    """Rebuild the weight decoding of chosen ternarized Conv/Gemm/MatMul nodes from new codes and scales.

    `weights` maps a node's first output name to (original fp32 weight value,
    TernaryWeight in that weight's GroupLayout). The node's old decoding chain
    (DequantizeLinear, and Reshape/Max/Min/Add/Cast after it) is removed and a
    new one, stored as `storage` codes and `scale_format` scales, feeds the
    node's weight input. Main graph only.

    Requires: each named node is ternarized (its weight comes from a
    DequantizeLinear chain used by it alone); otherwise ValueError.
    """

    def __init__(self, weights: dict[str, tuple[ir.Value, TernaryWeight]], storage: str, scale_format: str):
        super().__init__()
        self.weights, self.storage, self.scale_format = weights, storage, scale_format

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = {node.outputs[0].name: node for node in model.graph}
        for name, (original, ternary) in self.weights.items():
            node = nodes.get(name)
            if node is None or not ternary_scale_nodes(node) or len(node.inputs[1].uses()) != 1:
                raise ValueError(f"'{name}' is not a ternarized node with a weight of its own")
            old = decoding_nodes(node)
            node.replace_input_with(1, None)
            model.graph.remove([n for n in model.graph if any(n is o for o in old)], safe=True)
            stored = [store_scales(s, ternary.layout, self.scale_format) for s in (ternary.scale, ternary.neg_scale) if s is not None]
            new_nodes, output = dequantize_nodes(node, original, ternary, self.storage, stored)
            model.graph.insert_before(node, new_nodes)
            node.replace_input_with(1, output)
        return ir.passes.PassResult(model, modified=bool(self.weights))
