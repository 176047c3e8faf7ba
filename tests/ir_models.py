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


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
