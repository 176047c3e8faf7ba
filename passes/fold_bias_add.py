"""Fold a constant Add after a com.fgq op into the op's bias input.

Some exporters (Paddle's, and PyTorch's for MatMul layers) write a layer's
bias as a separate Add of a constant after the Conv or MatMul. Left in the
graph it is one more pass over the layer's output; the com.fgq ops add their
bias (input 8) while each output tile is still in cache.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from fgq_onnx.channel_fold import channel_vector, sole_consumer_op
from fgq_onnx.custom_op_functions import DOMAIN, INPUTS
from fgq_onnx.graph_utils import DEFAULT_DOMAINS, add_initializer, constant_array, float_attr, int_attr, set_input

_BIAS = INPUTS.index("bias")
_ROW_SCALE = INPUTS.index("row_scale")  # [M]: every node has it (int8 weights have no codes)


def _output_rank(node: ir.Node) -> int:
    """Rank of the op's output; for TernaryMatMul at least 1 when its input's shape is unknown."""
    if node.op_type == "TernaryConv":
        return 4
    if node.op_type == "TernaryGemm":
        return 2
    shape = node.inputs[0].shape
    return 1 if shape is None else max(len(shape), 1)


def _foldable(node: ir.Node) -> bool:
    """Whether a constant added to the output is a bias: nothing applied after the bias but the residual."""
    if "activation" in node.attributes or int_attr(node, "relu", 0) != 0:
        return False
    if node.op_type == "TernaryGemm" and float_attr(node, "beta", 1.0) != 1.0:
        return False
    row_scale = node.inputs[_ROW_SCALE] if len(node.inputs) > _ROW_SCALE else None
    return row_scale is not None and row_scale.const_value is not None and len(row_scale.const_value.shape) == 1


def _constant(value: ir.Value) -> np.ndarray | None:
    """A constant initializer's value, or a Reshape of one to a constant shape (Paddle writes biases so)."""
    array = constant_array(value)
    reshape = value.producer() if array is None else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain not in DEFAULT_DOMAINS or len(reshape.inputs) != 2:
        return array
    data, shape = constant_array(reshape.inputs[0]), constant_array(reshape.inputs[1])
    if data is None or shape is None or shape.ndim != 1 or np.any(shape == 0) or np.count_nonzero(shape == -1) > 1:
        return None  # 0 copies an input dim (or, with allowzero, makes an empty tensor): not worth following
    try:
        return data.reshape(tuple(int(d) for d in shape))
    except ValueError:
        return None


def _shift(node: ir.Node, add: ir.Node) -> np.ndarray | None:
    """The Add's constant as float32 [M], if it is one value or one per output channel."""
    out = node.outputs[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    values = _constant(other) if other is not out else None
    if values is None or values.dtype != np.float32:
        return None
    rank = _output_rank(node)
    return channel_vector(values, node.inputs[_ROW_SCALE].const_value.shape[0], rank, 1 if node.op_type == "TernaryConv" else rank - 1)


class FoldBiasAddPass(ir.passes.InPlacePass):
    """Rewrite com.fgq op -> Add(constant) into the op with the constant added to its bias.

    Matches TernaryConv, TernaryGemm and TernaryMatMul nodes (main graph)
    whose output feeds only an Add and is not a graph output, when the Add's
    other operand is a float32 constant initializer (or a Reshape of one to a
    constant shape without 0s) with one value or one per output channel
    (Conv: axis 1; Gemm/MatMul: the last axis; every other axis 1, and no more
    axes than the output, so the Add keeps the output's shape; MatMul needs
    its input's rank for a shaped constant), and the op applies nothing after
    its bias but a residual (relu 0, no `activation`; Gemm: beta 1). The bias
    (input 8) becomes a new initializer, bias + constant (the constant alone
    when there was none; Gemm's C keeps its broadcast shape); a shared bias is
    never changed. The Add's output name is kept; replaced biases no node
    uses are removed. Only float rounding changes (one addition is folded
    into constants).

    Requires: com.fgq nodes with a constant row_scale (UseCustomOpsPass writes one).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = sum(self._fold(graph, node) for node in list(graph) if node.domain == DOMAIN and _foldable(node))
        if count:
            ir.passes.common.RemoveUnusedNodesPass()(model)  # the replaced biases
        return ir.passes.PassResult(model, modified=count > 0)

    def _fold(self, graph: ir.Graph, node: ir.Node) -> bool:
        add = sole_consumer_op(node, "Add")
        shift = _shift(node, add) if add is not None else None
        if add is None or shift is None:
            return False
        bias = node.inputs[_BIAS] if len(node.inputs) > _BIAS else None
        old = constant_array(bias) if bias is not None else np.float32(0)
        if old is None or old.dtype != np.float32:
            return False
        label = node.name or add.name or "fgq"
        set_input(node, _BIAS, add_initializer(graph, f"{label}.bias", (old + shift).astype(np.float32)))
        output_name = add.outputs[0].name
        ir.convenience.replace_all_uses_with(add.outputs[0], node.outputs[0], replace_graph_outputs=True)
        add.outputs[0].name = None
        node.outputs[0].name = output_name  # graph outputs keep their names
        graph.remove(add, safe=True)
        return True
