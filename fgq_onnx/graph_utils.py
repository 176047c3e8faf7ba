"""Small onnx-ir helpers shared by the passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DEFAULT_DOMAINS = ("", "ai.onnx")


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data if it is a constant initializer (not an overridable graph input)."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def unique_name(graph: ir.Graph, name: str) -> str:
    """`name`, or `name.1`, `name.2`, ... if the graph already uses it."""
    taken = set(graph.initializers) | {v.name for node in graph for v in node.outputs} | {v.name for v in graph.inputs}
    candidate, index = name, 0
    while candidate in taken:
        index += 1
        candidate = f"{name}.{index}"
    return candidate


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a new initializer under a name unique in `graph`."""
    name = unique_name(graph, name)
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array, name=name)
    tensor.name = name
    value = ir.val(name, const_value=tensor)
    graph.register_initializer(value)
    return value


def set_input(node: ir.Node, index: int, value: ir.Value | None) -> None:
    """Make `value` the node's input `index`, growing its inputs (omitted ones empty) when it has fewer."""
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default
