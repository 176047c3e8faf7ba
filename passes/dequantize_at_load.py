"""Let onnxruntime decode the int8 weights of float-activation layers once, at load.

A layer kept at float activations (ConvertConfig.float_activation_layers:
int8 weights, float op) reads its weight through a per-channel
DequantizeLinear. onnxruntime keeps weight DequantizeLinear nodes out of its
constant folding (to fuse them with activation Q/DQ into int8 kernels, which
a float activation never allows), so it would decode the weight on every
run: such a plan ran at 0.77x fp32's speed on PP-OCRv4 det, against 1.04x
as Cast and Mul, which it folds into a float32 weight when the session is
created. The file keeps the int8 values; the weight is the same numbers.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from fgq_onnx.graph_utils import DEFAULT_DOMAINS, add_initializer, constant_array, int_attr, unique_name
from fgq_onnx.passes.insert_activation_qdq import FLOAT_ACTIVATIONS_MARK


def _per_channel_int8(dq: ir.Node | None) -> tuple[ir.Value, np.ndarray, int] | None:
    """(int8 values, float scale [M], axis) of a non-blocked DequantizeLinear with zero points 0, else None."""
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in DEFAULT_DOMAINS or int_attr(dq, "block_size", 0):
        return None
    values, scale = constant_array(dq.inputs[0]), constant_array(dq.inputs[1])
    zero = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros(1, np.int8)
    if values is None or scale is None or zero is None or values.dtype != np.int8 or scale.dtype != np.float32 or np.any(zero != 0):
        return None
    axis = int_attr(dq, "axis", 1) % values.ndim
    if scale.ndim != 1 or scale.size != values.shape[axis]:
        return None
    return dq.inputs[0], scale, axis


class DequantizeAtLoadPass(ir.passes.InPlacePass):
    """Rewrite the weight DequantizeLinear of layers marked "fgq.float_activations" into Cast(to float) * scale.

    Matches a per-channel DequantizeLinear(int8 constant, float32 scale [M],
    zero point 0) feeding a node with the mark; the scale becomes an
    initializer shaped to broadcast along the DequantizeLinear's axis. The
    DequantizeLinear is left to RemoveUnusedNodes when nothing else reads it.

    Requires: TernarizeWeightsPass's int8 weights (N=1) and the float-activation mark.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for node in list(model.graph.all_nodes()):
            if FLOAT_ACTIVATIONS_MARK not in node.metadata_props or len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            dq = node.inputs[1].producer()
            found = _per_channel_int8(dq)
            if found is None:
                continue
            values, scale, axis = found
            shape = [1] * len(values.shape)
            shape[axis] = scale.size
            label = node.name or node.outputs[0].name
            scale_value = add_initializer(node.graph, f"{values.name}.channel_scale", scale.reshape(shape))
            cast = ir.node("Cast", [values], {"to": ir.DataType.FLOAT}, name=f"{label}/cast_weight")
            mul = ir.node("Mul", [cast.outputs[0], scale_value], name=f"{label}/scale_weight")
            cast.outputs[0].name = unique_name(node.graph, f"{values.name}.as_float")
            mul.outputs[0].name = unique_name(node.graph, f"{values.name}.weight")
            node.graph.insert_before(dq, [cast, mul])
            dq.outputs[0].replace_all_uses_with(mul.outputs[0])
            count += 1
        if count:
            common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=count > 0)
