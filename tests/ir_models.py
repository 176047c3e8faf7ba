"""Tiny onnx-ir models from ONNX text, and running them in onnxruntime (shared by the pass tests)."""

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort


def make_model(text: str, weights: dict[str, np.ndarray], opset: int = 25) -> ir.Model:
    graph = onnx.parser.parse_graph(text)
    graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in weights.items())
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    proto.ir_version = 13
    return ir.serde.deserialize_model(proto)


def run(model: ir.Model, feeds: dict[str, np.ndarray], as_written: bool = False) -> list[np.ndarray]:
    """`as_written`: with no graph optimization, the graph's own arithmetic (for a layer with per-channel
    int8 weights onnxruntime rounds the bias to int32 even at its basic level, and at the full level runs
    its int8 kernels, whose u8 x s8 pair sums saturate int16 on x86 without VNNI)."""
    proto = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    if as_written:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
