"""Fuse the activation after a com.fgq op into the op (its `activation` attribute).

Exporters write ReLU6 as Clip(0, 6), hard-swish as HardSwish or decomposed
into x * Clip(x + 3, 0, 6) / 6, SE gates as HardSigmoid. Left in the graph
each is one to four more passes over the layer's output; the ops apply the
activation while each output tile is still in cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from fgq_onnx.custom_op_functions import ASYMMETRIC, DOMAIN, RESIDUAL, attach_function_bodies, overload_name
from fgq_onnx.graph_utils import DEFAULT_DOMAINS, constant_array, float_attr, int_attr

_OPS = ("TernaryConv", "TernaryGemm", "TernaryMatMul")


def _consumers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def _private(value: ir.Value, uses: int = 1) -> bool:
    """Read by exactly `uses` node inputs and not a graph output: its producer may be fused away."""
    return not value.is_graph_output() and len(value.uses()) == uses


def _is(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in DEFAULT_DOMAINS


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    return float(array.reshape(())) if array is not None and array.size == 1 and array.dtype == np.float32 else None


def _near(value: float | None, target: float) -> bool:
    """Equal up to float32 rounding (exporters write 1/6 as float32)."""
    return value is not None and abs(value - target) <= 1e-6 * abs(target)


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """Clip's constant (min, max); an omitted bound is infinite."""
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        value = node.inputs[index] if len(node.inputs) > index else None
        bound = default if value is None else _scalar(value)
        if bound is None:
            return None
        bounds.append(bound)
    return bounds[0], bounds[1]


# One step of a decomposed activation: does `node` compute it from `prev` (y: the op's output)?
_Step = Callable[[ir.Node, ir.Value, ir.Value], bool]


def _times_constant(op_type: str, target: float) -> _Step:
    """op_type(prev, c) with the scalar constant c = target (either operand order, except for Div)."""

    def step(node: ir.Node, prev: ir.Value, y: ir.Value) -> bool:
        if not _is(node, op_type) or len(node.inputs) != 2 or prev not in node.inputs:
            return False
        other = node.inputs[1] if node.inputs[0] is prev else node.inputs[0]
        return (op_type != "Div" or node.inputs[0] is prev) and _near(_scalar(other), target)

    return step


def _clip_0_6(node: ir.Node, prev: ir.Value, y: ir.Value) -> bool:
    return _is(node, "Clip") and node.inputs[0] is prev and _clip_bounds(node) == (0.0, 6.0)


def _times_y(node: ir.Node, prev: ir.Value, y: ir.Value) -> bool:
    return _is(node, "Mul") and len(node.inputs) == 2 and {id(v) for v in node.inputs} == {id(prev), id(y)}


def _hard_sigmoid_sixth(node: ir.Node, prev: ir.Value, y: ir.Value) -> bool:
    return (_is(node, "HardSigmoid") and node.inputs[0] is prev and _near(float_attr(node, "alpha", 0.2), 1 / 6)
            and _near(float_attr(node, "beta", 0.5), 0.5))


_ADD_3, _DIV_6, _MUL_SIXTH = _times_constant("Add", 3.0), _times_constant("Div", 6.0), _times_constant("Mul", 1 / 6)
# x * hardsigmoid(x) as exporters decompose it; y has two readers: the first step and _times_y.
_HARD_SWISH_FORMS: tuple[Sequence[_Step], ...] = (
    (_ADD_3, _clip_0_6, _times_y, _DIV_6),
    (_ADD_3, _clip_0_6, _times_y, _MUL_SIXTH),
    (_ADD_3, _clip_0_6, _DIV_6, _times_y),
    (_ADD_3, _clip_0_6, _MUL_SIXTH, _times_y),
    (_hard_sigmoid_sixth, _times_y),
)


def _decomposed_hard_swish(y: ir.Value) -> list[ir.Node] | None:
    """The nodes of a decomposed x * hardsigmoid(x) on y, every intermediate read only inside it."""
    if not _private(y, uses=2):
        return None
    for form in _HARD_SWISH_FORMS:
        for first in _consumers(y):
            nodes, prev = [], y
            for step in form:
                node = first if not nodes else (_consumers(prev)[0] if _private(prev) else None)
                if node is None or not step(node, prev, y):
                    break
                nodes.append(node)
                prev = node.outputs[0]
            if len(nodes) == len(form):  # y's two readers: the first step and the product
                return nodes
    return None


def _single(y: ir.Value) -> tuple[str, list[float], ir.Node] | None:
    """(activation, activation_params, node) when y's only reader is one activation node."""
    if not _private(y):
        return None
    node = _consumers(y)[0]
    if node.inputs[0] is not y or node.domain not in DEFAULT_DOMAINS:
        return None
    if node.op_type in ("Relu", "HardSwish"):
        return node.op_type.lower(), [], node
    if node.op_type == "HardSigmoid":
        params = [float_attr(node, "alpha", 0.2), float_attr(node, "beta", 0.5)]
        return ("hardsigmoid", params, node) if np.all(np.isfinite(params)) else None
    bounds = _clip_bounds(node) if node.op_type == "Clip" else None
    if bounds is None or not bounds[0] <= bounds[1]:
        return None
    return "clip", list(bounds), node


def _scalar_operand(node: ir.Node | None, op_type: str, value: ir.Value) -> float | None:
    """c when node is op_type(value, c) (either order) with c a finite float32 scalar constant."""
    if node is None or not _is(node, op_type) or len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    c = _scalar(other) if other is not value else None
    return c if c is not None and np.isfinite(c) else None


def _affine(value: ir.Value) -> tuple[list[float], list[ir.Node]] | None:
    """([scale, shift], nodes) when value is read only by Mul(scalar) [-> Add(scalar)] or Add(scalar)
    (PP-LCNetV3's learnable affine block after each activation)."""
    params, nodes = [1.0, 0.0], []
    for index, op_type in enumerate(("Mul", "Add")):
        node = _consumers(value)[0] if _private(value) else None
        c = _scalar_operand(node, op_type, value)
        if node is None or c is None:
            continue
        params[index] = c
        nodes.append(node)
        value = node.outputs[0]
    return (params, nodes) if nodes else None


def _match(y: ir.Value) -> tuple[str, list[float], list[ir.Node]] | None:
    """(activation, activation_params, the nodes computing it from y, last one last)."""
    nodes = _decomposed_hard_swish(y)
    if nodes is not None:
        return "hardswish", [], nodes
    single = _single(y)
    return None if single is None else (single[0], single[1], [single[2]])


class FuseActivationPass(ir.passes.InPlacePass):
    """Fuse an activation after a TernaryConv / TernaryGemm / TernaryMatMul into the op.

    Matches, on the op's output y (main graph): Relu, Clip with constant
    scalar bounds (an omitted one infinite; ReLU6 is Clip(0, 6)), HardSigmoid,
    HardSwish, and hard-swish decomposed as y * Clip(y + 3, 0, 6) / 6 (or
    * (1/6), the scaling before or after the product, Add and Mul operands in
    either order) or y * HardSigmoid(y) with alpha 1/6, beta 0.5. y and every
    intermediate must be read only inside the pattern and not be graph
    outputs; a HardSigmoid whose output gates another tensor (Mul(other), SE
    blocks) is fused alone. A ReLU sets the op's `relu` attribute (no
    overload); everything else sets `activation` (and `activation_params`
    for clip [min, max] and hardsigmoid [alpha, beta]). After an activation
    (fused now, or relu=1 already), Mul(scalar) [-> Add(scalar)] or
    Add(scalar) of float32 constants becomes `activation_affine` [scale,
    shift]. Both go into the node's overload, whose FunctionProto applies
    them. The last node's output name is kept.

    Requires: com.fgq nodes (UseCustomOpsPass); run after the bias and
    residual fusions, which apply before the activation.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = sum(self._fuse(graph, node) for node in list(graph) if node.domain == DOMAIN and node.op_type in _OPS)
        if count:
            attach_function_bodies(model)
        return ir.passes.PassResult(model, modified=count > 0)

    def _fuse(self, graph: ir.Graph, node: ir.Node) -> bool:
        if "activation_affine" in node.attributes:
            return False
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        nodes = self._activation(node, attrs)
        if nodes is None:
            return False
        affine = _affine(nodes[-1].outputs[0] if nodes else node.outputs[0])
        if affine is not None:
            attrs["activation_affine"] = affine[0]
            nodes = [*nodes, *affine[1]]
        if not nodes:
            return False
        features = node.overload.split("-")
        overload = overload_name(ASYMMETRIC in features, RESIDUAL in features, str(attrs.get("activation", "")),
                                 affine is not None)
        fused = ir.node(node.op_type, node.inputs, attrs, domain=DOMAIN, overload=overload, name=node.name)
        last = nodes[-1]
        ir.convenience.replace_nodes_and_values(graph, last, [node, *nodes], [fused], [last.outputs[0]], fused.outputs)
        return True

    @staticmethod
    def _activation(node: ir.Node, attrs: dict) -> list[ir.Node] | None:
        """The activation nodes after `node` (their attributes set in `attrs`); [] when it has one
        already (an affine map may still follow), None when there is none to fuse."""
        if "activation" in attrs or int_attr(node, "relu", 0) != 0:
            return []
        match = _match(node.outputs[0])
        if match is None:
            return None
        kind, params, nodes = match
        if kind == "relu":  # no overload: the bodies of every op read `relu`
            attrs["relu"] = 1
        else:
            attrs["activation"] = kind
            if params:
                attrs["activation_params"] = params
        return nodes
