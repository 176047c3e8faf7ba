"""Fuse a residual Add, and the Relu after it, into the TernaryConv before it.

ResNet-style blocks end in Conv -> Add(shortcut) -> Relu. Left to onnxruntime,
the Add and the Relu are two more passes over the block's output; TernaryConv
adds the residual and applies the ReLU in the pass that already adds its bias.
"""

from __future__ import annotations

import onnx_ir as ir

from fgq_onnx.channel_fold import sole_consumer_op
from fgq_onnx.custom_op_functions import ASYMMETRIC, DOMAIN, INPUTS, attach_function_bodies, overload_name


def _known_shape(value: ir.Value) -> bool:
    """Every dim an integer or a named symbol: equal shapes are then equal at run time."""
    return value.shape is not None and all(isinstance(d, int) or d.value is not None for d in value.shape)


class FuseResidualAddPass(ir.passes.InPlacePass):
    """Rewrite TernaryConv (relu=0, no activation) -> Add(y, r) [-> Relu] into TernaryConv(..., residual=r[, relu=1]).

    The Add must be the conv's only consumer, and r a float tensor whose shape
    is known and exactly the conv output's (no broadcasting), so that the
    kernel's shape check holds at run time. The fused node takes the overload
    "residual" (with "asymmetric": "asymmetric-residual") and its
    FunctionProto, whose body adds r after the bias; FunctionProtos no node
    uses any more are removed. Main graph only.

    Requires: com.fgq TernaryConv nodes (UseCustomOpsPass) and value shapes.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = sum(self._fuse(graph, node) for node in list(graph) if node.op_type == "TernaryConv" and node.domain == DOMAIN)
        if count:
            attach_function_bodies(model)
        return ir.passes.PassResult(model, modified=count > 0)

    def _fuse(self, graph: ir.Graph, conv: ir.Node) -> bool:
        relu_attr = conv.attributes.get("relu")
        if (relu_attr is not None and relu_attr.as_int() != 0) or "activation" in conv.attributes or len(conv.inputs) > len(INPUTS):
            return False
        add = sole_consumer_op(conv, "Add")
        if add is None:
            return False
        out = conv.outputs[0]
        residual = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        if residual is out or residual.dtype != ir.DataType.FLOAT or not (_known_shape(out) and _known_shape(residual)):
            return False
        if out.shape != residual.shape or len(out.shape) != 4:
            return False
        relu = sole_consumer_op(add, "Relu")
        last = relu or add
        attrs = {name: attr.value for name, attr in conv.attributes.items()}
        attrs["relu"] = int(relu is not None)
        inputs = [*conv.inputs, *[None] * (len(INPUTS) - len(conv.inputs)), residual]
        overload = overload_name(ASYMMETRIC in conv.overload.split("-"), residual=True)
        fused = ir.node("TernaryConv", inputs, attrs, domain=DOMAIN, overload=overload, name=conv.name)
        old = [conv, add] + ([relu] if relu else [])
        ir.convenience.replace_nodes_and_values(graph, last, old, [fused], [last.outputs[0]], fused.outputs)
        return True
