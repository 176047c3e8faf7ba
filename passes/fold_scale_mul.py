"""Fold a constant scale Mul after a Conv, Gemm or MatMul into its weight.

Ternary-trained models (TWN, BitNet-style) often export the weight as
{-1, 0, +1} (or one scale times it) and apply the scale, per tensor or per
output channel, by a Mul after the linear node. Folded into the weight, the
scale becomes part of the group scales, and fgq_onnx/already_ternary.py then
sees a per-tensor or per-row ternary weight it can pack exactly.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fgq_onnx.channel_fold import channel_vector, fold_channel_affine, sole_consumer, weight_channel_axis
from fgq_onnx.graph_utils import DEFAULT_DOMAINS, constant_array

_LINEAR = ("Conv", "Gemm", "MatMul")


def _output_rank(node: ir.Node, weight: np.ndarray) -> int | None:
    """Rank of the linear node's output, from the op and its input's rank; None when unknown."""
    if node.op_type == "Conv":
        return weight.ndim
    if node.op_type == "Gemm":
        return 2
    shape = node.inputs[0].shape
    return None if shape is None else max(len(shape), 1)


def _channel_scale(node: ir.Node, mul: ir.Node) -> np.ndarray | None:
    """The Mul's constant as one factor per output channel [M], if it is per tensor or per channel."""
    other = mul.inputs[1] if mul.inputs[0] is node.outputs[0] else mul.inputs[0]
    factor, weight = constant_array(other), constant_array(node.inputs[1])
    axis = weight_channel_axis(node)
    if factor is None or weight is None or axis is None or factor.dtype != weight.dtype or not np.all(np.isfinite(factor)):
        return None
    rank = _output_rank(node, weight) or 1  # unknown (MatMul): the output has at least one axis
    return channel_vector(factor, weight.shape[axis], rank, 1 if node.op_type == "Conv" else rank - 1)


class FoldScaleMulPass(ir.passes.InPlacePass):
    """Fold Conv/Gemm/MatMul -> Mul(constant per-tensor or per-channel scale) into the linear node.

    Rewrites the pair into the linear node alone, with its weight rows (and
    bias, if any) multiplied by the scale, when: the weight and the Mul's
    other input are constant initializers of one float type; the linear
    node's output feeds only that Mul and is not a graph output; the scale
    has one value, or one per output channel along the output's channel axis
    (Conv: axis 1; Gemm/MatMul: the last) with every other axis 1, so the
    Mul does not change the output's shape (MatMul needs its input's rank
    for a shaped scale). Gemm: any alpha/beta (both terms are scaled).
    The Mul's output name is kept. Works in subgraphs too; requires nothing.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = 0
        for node in list(model.graph.all_nodes()):
            if node.op_type not in _LINEAR or node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2:
                continue
            mul = sole_consumer(node)
            if mul is None or mul.op_type != "Mul" or mul.domain not in DEFAULT_DOMAINS or mul.inputs[0] is mul.inputs[1]:
                continue
            scale = _channel_scale(node, mul)
            if scale is None:
                continue
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is not None and constant_array(bias) is None:
                continue
            fold_channel_affine(node, mul, scale, None)
            folded += 1
        return ir.passes.PassResult(model, modified=folded > 0)
