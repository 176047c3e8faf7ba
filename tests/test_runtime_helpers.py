"""Shared helpers for the runtime tests: build com.fgq models, numpy references.

Not a test module (no tests here); the runtime tests import it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from fgq_onnx.packing import pack_rows

DOMAIN = "com.fgq"
INPUT_NAMES = ["X", "x_scale", "x_zero_point", "codes", "scales", "row_scale", "neg_scales", "neg_row_scale", "bias",
               "residual", "y_scale", "y_zero_point", "residual_scale", "residual_zero_point"]  # from residual: TernaryConv only


def library_or_skip():
    import pytest

    from fgq_onnx import runtime

    try:
        return runtime.library_path()
    except runtime.RuntimeLibraryError as error:
        pytest.skip(f"custom-op library not built: {error}")


def run_op(model, feeds, kernel: str, threads: int = 1) -> np.ndarray:
    """The first output of `model` in an onnxruntime session on kernel path `kernel`."""
    from fgq_onnx import runtime

    return runtime.inference_session(model.SerializeToString(), kernel=kernel, threads=threads).run(None, feeds)[0]


def available_kernels() -> list[str]:
    from fgq_onnx import runtime

    return runtime.supported_kernels()


def random_ternary(rng, shape, p_zero=0.3):
    t = rng.choice([-1, 0, 1], size=shape, p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]).astype(np.int8)
    return t


def pack_weight(t_rows: np.ndarray, n: int, segments: int = 1):
    """t_rows [M, segments * L] in row order -> codes, padded group ternary [M, G, N]."""
    m, total = t_rows.shape
    length = total // segments
    gps = -(-length // n)
    padded = np.zeros((m, segments, gps * n), np.int8)
    padded[:, :, :length] = t_rows.reshape(m, segments, length)
    groups = padded.reshape(m, segments * gps, n)
    return pack_rows(groups.reshape(m, -1)), groups


def make_scales(rng, m, g, kind: str):
    """Scales [M, G] of kind f32 / f16 / u8; returns (tensor, row_scale or None, float values)."""
    a = rng.uniform(0.01, 1.0, size=(m, g)).astype(np.float32)
    if kind == "f32":
        return a, None, a
    if kind == "f16":
        h = a.astype(np.float16)
        return h, None, h.astype(np.float32)
    row = (a.max(axis=1) / 255).astype(np.float32)
    q = np.clip(np.round(a / row[:, None]), 0, 255).astype(np.uint8)
    return q, row, (q.astype(np.float32) * row[:, None]).astype(np.float32)


def quantize_act(x, scale, zp, qmin, qmax):
    q = np.clip(np.round(np.asarray(x, np.float32) / np.float32(scale)) + zp, qmin, qmax)
    return ((q - zp) * np.float32(scale)).astype(np.float32), q


def build_model(op: str, inputs: dict, attrs: dict, x_shape, x_type=TensorProto.FLOAT, out_rank=None, constant=True,
                opset_fgq=1, fed=()):
    """One com.fgq node; inputs maps names to arrays (X excluded) or None (omitted).

    Inputs are initializers when `constant`, graph inputs otherwise; names in `fed` are graph inputs either way."""
    node_inputs, inits, graph_inputs = [], [], [helper.make_tensor_value_info("X", x_type, x_shape)]
    node_inputs.append("X")
    for name in INPUT_NAMES[1:]:
        value = inputs.get(name)
        if value is None:
            node_inputs.append("")
            continue
        node_inputs.append(name)
        tensor = onnx.numpy_helper.from_array(np.asarray(value), name)
        if (constant and name not in fed) or name in ("x_scale", "x_zero_point"):
            inits.append(tensor)
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, tensor.data_type, list(np.asarray(value).shape)))
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    node = helper.make_node(op, node_inputs, ["Y"], domain=DOMAIN, **attrs)
    y_zero_point = inputs.get("y_zero_point")
    y_type = TensorProto.FLOAT if y_zero_point is None else helper.np_dtype_to_tensor_dtype(np.asarray(y_zero_point).dtype)
    out = helper.make_tensor_value_info("Y", y_type, None)
    graph = helper.make_graph([node], "g", graph_inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, opset_fgq)])
    model.ir_version = 10
    return model


def conv_rows(t4: np.ndarray, n: int):
    """Ternary weight [M, C/g, R, S] -> (rows in custom-op order, segments) per docs/packed-format.md."""
    m, cg, r, s = t4.shape
    if cg >= n:
        return t4.transpose(0, 2, 3, 1).reshape(m, -1), r * s
    return t4.reshape(m, -1), 1


def scales_to_weight(groups: np.ndarray, scale_values: np.ndarray, length: int, segments: int) -> np.ndarray:
    """Group codes [M, G, N] x scales [M, G] -> dequantized rows [M, segments * length]."""
    m, g, n = groups.shape
    deq = (groups * scale_values[:, :, None]).reshape(m, segments, -1)[:, :, :length]
    return deq.reshape(m, -1).astype(np.float64)


def rows_to_conv(rows: np.ndarray, shape, n: int) -> np.ndarray:
    m, cg, r, s = shape
    if cg >= n:
        return rows.reshape(m, r, s, cg).transpose(0, 3, 1, 2)
    return rows.reshape(shape)


def conv2d_ref(x, w, bias, strides, pads, dilations, group):
    """Plain numpy NCHW conv (float64)."""
    nb, c, h, wd = x.shape
    m, cg, r, s = w.shape
    xp = np.zeros((nb, c, h + pads[0] + pads[2], wd + pads[1] + pads[3]))
    xp[:, :, pads[0] : pads[0] + h, pads[1] : pads[1] + wd] = x
    oh = (h + pads[0] + pads[2] - dilations[0] * (r - 1) - 1) // strides[0] + 1
    ow = (wd + pads[1] + pads[3] - dilations[1] * (s - 1) - 1) // strides[1] + 1
    out = np.zeros((nb, m, oh, ow))
    mg = m // group
    for g in range(group):
        xs = xp[:, g * cg : (g + 1) * cg]
        for i in range(r):
            for j in range(s):
                patch = xs[
                    :,
                    :,
                    i * dilations[0] : i * dilations[0] + strides[0] * (oh - 1) + 1 : strides[0],
                    j * dilations[1] : j * dilations[1] + strides[1] * (ow - 1) + 1 : strides[1],
                ]
                out[:, g * mg : (g + 1) * mg] += np.einsum("nchw,mc->nmhw", patch, w[g * mg : (g + 1) * mg, :, i, j])
    if bias is not None:
        out += bias[None, :, None, None]
    return out
