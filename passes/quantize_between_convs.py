"""Keep activations channels-last, as 8-bit levels where the readers agree, between TernaryConv layers.

A TernaryConv read only by other TernaryConvs writes a float32 NCHW tensor
that each reader quantizes with its own x_scale and x_zero_point into the
NHWC image its GEMM reads. Written NHWC, it needs no transpose on either
side (the producer's register tile holds the output channels of one pixel);
and when the readers all use the same pair, the producer can return those
levels itself, which they read as they are (docs/kernels.md). The X readers
compute the same numbers (the levels are the ones they would have made); a
residual reader adds the dequantized levels: within half a level of the
float it read before, inside the range the levels cover (beyond it they
saturate where the float did not). Grouped and depthwise convs, whose
direct kernel reads a planar image, stay NCHW.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fgq_onnx.custom_op_functions import (
    CONV_INPUTS,
    DOMAIN,
    NHWC,
    QUANTIZED_OUTPUT,
    X_LAYOUT,
    Y_LAYOUT,
    Y_NHWC,
    attach_function_bodies,
    has_input,
    node_overload,
)
from fgq_onnx.graph_utils import constant_array, int_attr, set_input

_X, _RESIDUAL = 0, CONV_INPUTS.index("residual")
_Y_SCALE, _Y_ZERO_POINT = CONV_INPUTS.index("y_scale"), CONV_INPUTS.index("y_zero_point")
_RESIDUAL_SCALE, _RESIDUAL_ZERO_POINT = CONV_INPUTS.index("residual_scale"), CONV_INPUTS.index("residual_zero_point")


def _plain_conv(node: ir.Node, graph: ir.Graph) -> bool:
    """A TernaryConv of `graph` with group 1 (grouped and depthwise convs stay NCHW)."""
    conv = node.op_type == "TernaryConv" and node.domain == DOMAIN
    return conv and node.graph is graph and int_attr(node, "group", 1) == 1


def _features(node: ir.Node) -> set[str]:
    return set(node_overload(node).split("-"))


def _readers(node: ir.Node, index: int) -> list[ir.Node]:
    """The nodes that read node's output as their input `index`."""
    return [use.node for use in node.outputs[0].uses() if use.idx == index]


def _candidate(graph: ir.Graph, node: ir.Node) -> bool:
    """A plain TernaryConv returning float32 NCHW, its output no graph output, read at least once and only as X or
    residual by plain TernaryConvs."""
    out = node.outputs[0]
    if not _plain_conv(node, graph) or out.is_graph_output() or {QUANTIZED_OUTPUT, Y_NHWC} & _features(node):
        return False
    uses = out.uses()
    return bool(uses) and all(_plain_conv(use.node, graph) and use.idx in (_X, _RESIDUAL) for use in uses)


def _chain(graph: ir.Graph) -> list[ir.Node]:
    """The candidates whose output can be NHWC, in graph order: a residual has its reader's output layout, so
    a candidate stays only if each residual reader stays, and each that reads a residual only if its producer stays."""
    chain = {node for node in graph if _candidate(graph, node)}
    while True:
        kept = {node for node in chain if set(_readers(node, _RESIDUAL)) <= chain
                and (not has_input(node, "residual") or node.inputs[_RESIDUAL].producer() in chain)}
        if kept == chain:
            return [node for node in graph if node in chain]
        chain = kept


def _quantization(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """A reader's x_scale and x_zero_point when they are constant scalars: float32, and uint8 or int8."""
    scale, zero = constant_array(node.inputs[1]), constant_array(node.inputs[2])
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return None
    return (scale, zero) if scale.dtype == np.float32 and zero.dtype in (np.uint8, np.int8) else None


def _agree(readers: list[ir.Node]) -> bool:
    """Whether there are readers and all have such an x_scale and x_zero_point, equal in value and type."""
    pairs = [_quantization(reader) for reader in readers]
    first = pairs[0] if pairs else None
    same = (pair is not None and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(pair, first))
            for pair in pairs)
    return first is not None and all(same)


class QuantizeBetweenConvsPass(ir.passes.InPlacePass):
    """Make a TernaryConv read only by TernaryConvs return NHWC, as 8-bit levels when its X readers agree.

    A candidate is a com.fgq TernaryConv of the main graph with group 1 whose
    float32 NCHW output is not a graph output and is read at least once, and
    only by group-1 TernaryConvs of the main graph, each as X (input 0) or as
    residual (input 9). The residual has its reader's output layout, so the
    candidates are narrowed to a fixpoint: one stays only if each of its
    residual readers stays and, when it reads a residual, that residual's
    producer stays. Each one left gets y_layout "NHWC" (its output value's
    shape, if set, becomes [N, OH, OW, M]) and its X readers x_layout "NHWC".
    When it has X readers and all of them have constant scalar x_scale
    (float32) and x_zero_point (uint8/int8) equal in value and type, it also
    gets those values as y_scale and y_zero_point (inputs 10, 11; its output
    value takes the zero point's type), and its residual readers the same as
    residual_scale and residual_zero_point (inputs 12, 13); else its output
    stays float32. Omitted inputs in between are empty. Every node touched
    gets its overload again (node_overload), the FunctionProtos of the new
    overloads are attached, those no node uses any more removed.

    Requires: com.fgq TernaryConv nodes (UseCustomOpsPass); run after the
    residual and activation fusions (FuseActivationPass rebuilds a node's
    overload from the features it knows).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chain = _chain(model.graph)
        touched = {node for producer in chain for node in self._rewrite(producer)}
        for node in touched:
            node.overload = node_overload(node)
        if chain:
            attach_function_bodies(model)
        return ir.passes.PassResult(model, modified=bool(chain))

    @staticmethod
    def _rewrite(producer: ir.Node) -> list[ir.Node]:
        """Write the producer's output NHWC (levels when its X readers agree); returns the nodes changed."""
        out, readers, residual_readers = producer.outputs[0], _readers(producer, _X), _readers(producer, _RESIDUAL)
        producer.attributes[Y_LAYOUT] = ir.AttrString(Y_LAYOUT, NHWC)
        for reader in readers:
            reader.attributes[X_LAYOUT] = ir.AttrString(X_LAYOUT, NHWC)
        if out.shape is not None:
            out.shape = ir.Shape([out.shape[i] for i in (0, 2, 3, 1)])
        if _agree(readers):
            scale, zero = readers[0].inputs[1], readers[0].inputs[2]
            set_input(producer, _Y_SCALE, scale)
            set_input(producer, _Y_ZERO_POINT, zero)
            out.dtype = zero.dtype
            for reader in residual_readers:
                set_input(reader, _RESIDUAL_SCALE, scale)
                set_input(reader, _RESIDUAL_ZERO_POINT, zero)
        return [producer, *readers, *residual_readers]
