"""Fold BatchNormalization into the Conv or Gemm that feeds it.

Exporters usually fold BatchNorm already; when they did not (training-mode
exports, some converters), ternarizing the Conv and leaving a per-channel
scale behind it would waste the group scales' ability to absorb that factor.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fgq_onnx.channel_fold import fold_channel_affine, weight_channel_axis
from fgq_onnx.graph_utils import DEFAULT_DOMAINS, constant_array, float_attr

_FOLDABLE = {"Conv", "Gemm"}


def _bn_factors(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) with bn(y) = scale * y + shift per channel, if BN is inference-only."""
    if len(bn.outputs) > 1 and any(out.uses() for out in bn.outputs[1:]):
        return None
    params = [constant_array(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + float_attr(bn, "epsilon", 1e-5))
    return scale, beta - mean * scale


def _fold(producer: ir.Node, bn: ir.Node) -> bool:
    factors = _bn_factors(bn)
    axis = weight_channel_axis(producer)
    weight = constant_array(producer.inputs[1])
    bias_input = producer.inputs[2] if len(producer.inputs) > 2 else None
    if factors is None or axis is None or weight is None or (bias_input is not None and constant_array(bias_input) is None):
        return False
    if producer.op_type == "Gemm" and (float_attr(producer, "alpha", 1.0) != 1.0 or (bias_input is not None and float_attr(producer, "beta", 1.0) != 1.0)):
        return False
    scale, shift = factors
    if weight.shape[axis] != scale.shape[0]:
        return False
    fold_channel_affine(producer, bn, scale, shift)
    return True


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold inference-mode BatchNormalization into a preceding Conv or Gemm.

    Rewrites Conv/Gemm -> BatchNormalization, where the Conv/Gemm output feeds
    only the BN and weight, bias and BN statistics are constants, into one
    Conv/Gemm with scaled weights and a shifted bias. Works in subgraphs too.
    Requires nothing; leaves other BatchNormalization nodes as they are.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = 0
        for bn in list(model.graph.all_nodes()):
            if bn.op_type != "BatchNormalization" or bn.domain not in DEFAULT_DOMAINS:
                continue
            producer = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            if producer is None or producer.op_type not in _FOLDABLE or producer.domain not in DEFAULT_DOMAINS:
                continue
            if len(producer.outputs[0].uses()) != 1 or producer.outputs[0].is_graph_output():
                continue
            folded += _fold(producer, bn)
        return ir.passes.PassResult(model, modified=folded > 0)
