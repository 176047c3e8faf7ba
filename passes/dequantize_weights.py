"""Turn already-quantized Conv/Gemm/MatMul weights back into float initializers.

Exporters and quantizers store weights as integer codes decoded in the graph,
by DequantizeLinear(codes, scale, zero_point) or by Cast(codes) -> Mul(scale).
Decoded here once, exactly as onnxruntime decodes them (float32 (q - zp) *
scale, in the scale's float type), they become ordinary float weights that
the ternarizer converts like any other; each keeps a note of where it came
from (value metadata DEQUANTIZED_MARK) for the report.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fgq_onnx.graph_utils import DEFAULT_DOMAINS, add_initializer, constant_array, int_attr

DEQUANTIZED_MARK = "fgq.dequantized"  # value metadata key: how the float weight was decoded from integer codes
_LINEAR = ("Conv", "Gemm", "MatMul")


def _integer_codes(value: ir.Value | None) -> np.ndarray | None:
    array = constant_array(value)
    return array if array is not None and value.const_value.dtype.is_integer() else None


def _per_axis(scale: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray | None:
    """A DequantizeLinear scale or zero point broadcast to the codes' shape, or None if it does not fit them."""
    if scale.size == 1 and block_size == 0:
        return scale.reshape(())
    axis = axis % len(shape) if shape else 0
    if block_size > 0:  # blocked: one entry per block of block_size along axis, same rank as the codes
        if scale.ndim != len(shape) or scale.shape[axis] != -(-shape[axis] // block_size):
            return None
        return np.repeat(scale, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)
    if scale.ndim != 1 or scale.shape[0] != shape[axis]:
        return None
    return scale.reshape([-1 if i == axis else 1 for i in range(len(shape))])


def dequantize_linear(node: ir.Node) -> tuple[np.ndarray, str] | None:
    """The float weight a DequantizeLinear of constants yields, and its source dtype name; None otherwise."""
    codes = _integer_codes(node.inputs[0])
    scale = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    zero_point = constant_array(zero) if zero is not None else None
    if codes is None or scale is None or (zero is not None and zero_point is None) or not np.issubdtype(scale.dtype, np.floating):
        return None
    axis, block_size = int_attr(node, "axis", 1), int_attr(node, "block_size", 0)
    scale_b = _per_axis(scale, codes.shape, axis, block_size)
    zero_b = np.zeros((), np.int32) if zero_point is None else _per_axis(zero_point, codes.shape, axis, block_size)
    if scale_b is None or zero_b is None:
        return None
    levels = codes.astype(np.int32) - zero_b.astype(np.int32)
    return levels.astype(np.float32).astype(scale.dtype) * scale_b, node.inputs[0].const_value.dtype.name


def cast_mul(node: ir.Node) -> tuple[np.ndarray, str] | None:
    """The float weight of Mul(Cast(integer codes), constant scale) (either order); None otherwise."""
    for cast_input, scale_input in (node.inputs, node.inputs[::-1]):
        cast = cast_input.producer() if cast_input is not None else None
        if cast is None or cast.op_type != "Cast" or cast.domain not in DEFAULT_DOMAINS:
            continue
        codes, scale = _integer_codes(cast.inputs[0]), constant_array(scale_input)
        to = ir.DataType(int_attr(cast, "to", 0))
        if codes is None or scale is None or not to.is_floating_point() or scale.dtype != to.numpy():
            continue
        return codes.astype(scale.dtype) * scale, cast.inputs[0].const_value.dtype.name  # Mul broadcasts as numpy does
    return None


def decode(value: ir.Value) -> tuple[np.ndarray, str] | None:
    """(float weight, e.g. "int8 weights (DequantizeLinear)") when `value` is decoded from constant integer codes; else None."""
    producer = value.producer()
    if producer is None or producer.domain not in DEFAULT_DOMAINS or len(producer.inputs) < 2:
        return None
    if producer.op_type == "DequantizeLinear":
        found, how = dequantize_linear(producer), "DequantizeLinear"
    elif producer.op_type == "Mul":
        found, how = cast_mul(producer), "Cast and Mul"
    else:
        return None
    return None if found is None else (found[0], f"{found[1].lower()} weights ({how})")


class DequantizeWeightsPass(ir.passes.InPlacePass):
    """Replace an integer-coded weight of Conv/Gemm/MatMul (input 1) by its exact float values.

    Rewrites each linear node whose weight is DequantizeLinear(constant
    integer codes, constant scale[, constant zero point]) (per tensor, per
    axis or blocked) or Mul(Cast(constant integer codes), constant scale)
    into the same node reading a new float initializer with those values;
    the decoder nodes stay until nothing else reads them (RemoveUnusedNodes).
    The initializer's metadata DEQUANTIZED_MARK says what it was decoded from.
    Requires the codes and scales as initializers (lift Constant nodes first).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        decoded: dict[int, ir.Value] = {}
        for node in list(model.graph.all_nodes()):
            if node.op_type not in _LINEAR or node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            weight = node.inputs[1]
            if id(weight) not in decoded:
                found = decode(weight) if weight.const_value is None else None
                if found is None:
                    continue
                array, how = found
                value = add_initializer(node.graph, f"{weight.name}.dequantized", np.ascontiguousarray(array))
                value.metadata_props[DEQUANTIZED_MARK] = how
                decoded[id(weight)] = value
            node.replace_input_with(1, decoded[id(weight)])
        return ir.passes.PassResult(model, modified=bool(decoded))
