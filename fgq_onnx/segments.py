"""Run a model piece by piece over a fixed set of batches, keeping what later pieces need.

Layer-by-layer calibration (bias correction, fitting) must see each layer's
input with every layer before it already converted *and* corrected. Running
the whole model once per layer costs L passes; this runner costs about one:
`run(values)` executes only the nodes that the requested values still depend
on, starting from the tensors it kept from earlier calls, and keeps every
tensor a not-yet-executed node will consume (its "frontier"), batch by batch.
Between calls the caller may rewrite nodes that have not run yet (and
`transform` kept tensors, e.g. to apply a correction to an output that was
measured before it was corrected).

Memory: the frontier for all batches (for a ResNet-50 stage-1 block at
224x224, about 4 MB per sample). Each call builds one small onnxruntime
session from the nodes it runs and only the initializers they use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from fgq_onnx.errors import FgqError


class SegmentRunner:
    """Executes `model`'s main graph in pieces over `batches` (a list of feeds)."""

    def __init__(self, model: ir.Model, batches: Iterable[dict[str, np.ndarray]]):
        self.model = model
        self.batches = 0
        self._store: dict[int, list[np.ndarray]] = {}  # id(value) -> one array per batch
        self._values: dict[int, ir.Value] = {}  # keeps the keys' objects alive
        self._done: set[int] = set()  # ids of executed nodes
        inputs = {v.name: v for v in model.graph.inputs}
        for feed in batches:
            for name, array in feed.items():
                if name in inputs:
                    self._keep(inputs[name]).append(np.asarray(array))
            self.batches += 1
        if self.batches == 0:
            raise FgqError("the calibration data produced no samples")
        if any(n.op_type in ("If", "Loop", "Scan") for n in model.graph):
            raise FgqError("layer-by-layer calibration does not support If/Loop/Scan in the main graph")

    def _keep(self, value: ir.Value) -> list[np.ndarray]:
        self._values[id(value)] = value
        return self._store.setdefault(id(value), [])

    def kept(self, value: ir.Value) -> bool:
        return id(value) in self._store

    def get(self, value: ir.Value) -> list[np.ndarray]:
        return self._store[id(value)]

    def transform(self, value: ir.Value, function: Callable[[np.ndarray], np.ndarray]) -> None:
        """Replace a kept tensor, batch by batch, by function(tensor)."""
        self._store[id(value)] = [function(array) for array in self._store[id(value)]]

    def _is_available(self, value: ir.Value) -> bool:
        return id(value) in self._store or value.const_value is not None

    def run(self, targets: list[ir.Value]) -> dict[int, list[np.ndarray]]:
        """Compute `targets` (kept afterwards); returns {id(value): arrays per batch}."""
        order = {id(node): index for index, node in enumerate(self.model.graph)}
        needed: dict[int, ir.Node] = {}
        stack = [v for v in targets if not self._is_available(v)]
        while stack:
            value = stack.pop()
            producer = value.producer()
            if producer is None:
                raise FgqError(f"tensor '{value.name}' has no producer and no data")
            if id(producer) in needed or id(producer) in self._done:
                continue
            needed[id(producer)] = producer
            stack.extend(v for v in producer.inputs if v is not None and not self._is_available(v))
        nodes = sorted(needed.values(), key=lambda n: order[id(n)])
        if nodes:
            self._execute(nodes, targets)
        results = {id(v): self._store[id(v)] for v in targets}
        self._forget()
        return results

    def _execute(self, nodes: list[ir.Node], targets: list[ir.Value]) -> None:
        inside = {id(n) for n in nodes}
        produced = {id(v): v for n in nodes for v in n.outputs}
        inputs: dict[int, ir.Value] = {}
        initializers: dict[int, ir.Value] = {}
        for node in nodes:
            for value in node.inputs:
                if value is None or id(value) in produced:
                    continue
                if id(value) in self._store:
                    inputs[id(value)] = value
                elif value.const_value is not None:
                    initializers[id(value)] = value
        later = {id(n) for n in self.model.graph} - self._done - inside
        outputs = [v for v in produced.values() if any(id(use.node) in later for use in v.uses()) or id(v) in {id(t) for t in targets}]
        names = _unique_names([*inputs.values(), *initializers.values(), *outputs, *produced.values()])
        graph = onnx.GraphProto(name="segment")
        for node in nodes:
            proto = ir.serde.serialize_node(node)
            proto.input[:] = [names[id(v)] if v is not None else "" for v in node.inputs]
            proto.output[:] = [names[id(v)] for v in node.outputs]
            graph.node.append(proto)
        for value in initializers.values():
            const = value.const_value
            if isinstance(const, ir.ExternalTensor):  # the piece is loaded from bytes: no folder to resolve a file in
                const = ir.Tensor(const.numpy(), dtype=const.dtype)
            tensor = ir.serde.serialize_tensor(const)
            tensor.name = names[id(value)]
            graph.initializer.append(tensor)
        for value in inputs.values():
            sample = self._store[id(value)][0]
            graph.input.append(onnx.helper.make_tensor_value_info(names[id(value)], onnx.helper.np_dtype_to_tensor_dtype(sample.dtype), None))
        for value in outputs:
            graph.output.append(onnx.helper.make_tensor_value_info(names[id(value)], _elem_type(value), None))
        opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in self.model.opset_imports.items()]
        proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=max(self.model.ir_version, 10))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise FgqError(f"onnxruntime cannot run a piece of the model for calibration: {str(error).splitlines()[0]}") from None
        fetch = [names[id(v)] for v in outputs]
        results = [self._keep(v) for v in outputs]
        for batch in range(self.batches):
            feed = {names[key]: self._store[key][batch] for key in inputs}
            try:
                arrays = session.run(fetch, feed)
            except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise FgqError(f"the model failed on calibration data: {str(error).splitlines()[0]}") from None
            for store, array in zip(results, arrays):
                store.append(array)
        self._done |= inside

    def _forget(self) -> None:
        """Drop kept tensors that no node left to run consumes."""
        later = {id(n) for n in self.model.graph} - self._done
        for key in list(self._store):
            value = self._values[key]
            if not any(id(use.node) in later for use in value.uses()):
                del self._store[key], self._values[key]


def _elem_type(value: ir.Value) -> int:
    return int(value.dtype) if value.dtype is not None else onnx.TensorProto.FLOAT


def _unique_names(values: list[ir.Value]) -> dict[int, str]:
    names, taken = {}, set()
    for value in values:
        if id(value) in names:
            continue
        name = value.name or f"value_{len(names)}"
        while name in taken:
            name += "_"
        names[id(value)] = name
        taken.add(name)
    return names
