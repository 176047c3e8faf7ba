"""The source model with only a conversion's activation quantization: the reference for exact weights.

When every converted weight was already ternary (fgq_onnx/already_ternary.py),
a conversion with quantized activations must compute exactly what the
source model computes with the same Q/DQ on the same tensors. This builds
that model: the source, prepared like convert() prepares it (scale Muls and
BatchNorm folded), with the report's activation ranges inserted in front of
the layers the report lists as converted, and the weights left in float.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from fgq_onnx.passes.insert_activation_qdq import ActivationQuant, InsertActivationQdqPass
from fgq_onnx.passes.ternarize_weights import REQUIRED_OPSET, TERNARY_MARK
from fgq_onnx.report import Report
from fgq_onnx.stages import load_model, prepare


def activation_only(model: str | Path | onnx.ModelProto | ir.Model, report: Report) -> ir.Model:
    """`model` with the activation Q/DQ that produced `report`, float weights (the input is not modified)."""
    ir_model, _ = load_model(model, REQUIRED_OPSET[str(report.settings.get("weight_storage", "int2"))])
    ir_model = prepare(ir_model, dequantize=not report.settings.get("keep_quantized_weights", False))
    converted = {layer.node for layer in report.converted}
    for node in ir_model.graph.all_nodes():
        if node.outputs and (node.name or node.outputs[0].name) in converted:
            node.metadata_props[TERNARY_MARK] = "activation quantization only"
    quants = {act.tensor: ActivationQuant(act.scale, act.signed, act.bits) for act in report.activations}
    return InsertActivationQdqPass(quants)(ir_model).model
