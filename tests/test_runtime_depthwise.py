"""TernaryConv with few output channels a group (depthwise, channel multiplier 2, small groups) runs on
the direct kernel (runtime/include/fgq/depthwise.h). In onnxruntime sessions, on every kernel path this
CPU runs: the paths give bit-identical outputs, which match a numpy convolution of the dequantized
weights and the quantized activations; malformed nodes fail with an error, never a crash."""

from __future__ import annotations

import pathlib
import sys
import zlib

import numpy as np
import pytest
from onnx import TensorProto

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_runtime_malformed import _expect_error  # noqa: E402

from test_runtime_helpers import (  # noqa: E402
    build_model,
    conv2d_ref,
    conv_rows,
    make_scales,
    pack_weight,
    quantize_act,
    random_ternary,
    rows_to_conv,
    run_op,
)

pytestmark = pytest.mark.filterwarnings("ignore")


def dequantized_weight(groups, values, shape, n):
    """Group ternary [M, G, N] x per-group values [M, G] (or (positive, negative)) -> conv weight [M, cg, R, S]."""
    m, cg, r, s = shape
    segments, length = (r * s, cg) if cg >= n else (1, cg * r * s)
    if isinstance(values, tuple):
        scaled = np.where(groups > 0, values[0][:, :, None], values[1][:, :, None]) * groups
    else:
        scaled = groups * values[:, :, None]
    rows = scaled.reshape(m, segments, -1)[:, :, :length].reshape(m, -1).astype(np.float64)
    return rows_to_conv(rows, shape, n)


CASES = [  # channels, multiplier, channels per group, kernel, stride, pads, dilation, width, N
    (1, 1, 1, 3, 1, (1, 1, 1, 1), 1, 17, 4),
    (3, 1, 1, 5, 2, (2, 2, 2, 2), 1, 33, 4),
    (15, 1, 1, 3, 2, (0, 1, 1, 0), 1, 16, 8),
    (17, 1, 1, 3, 1, (1, 2, 0, 1), 2, 31, 4),
    (33, 1, 1, 5, 1, (2, 2, 2, 2), 1, 65, 16),
    (16, 1, 1, 3, 1, (1, 1, 1, 1), 1, 15, 1),
    (8, 2, 1, 3, 1, (1, 1, 1, 1), 1, 20, 4),  # channel multiplier 2
    (12, 1, 2, 3, 1, (1, 1, 1, 1), 1, 19, 4),  # grouped, 2 channels a group
    (12, 3, 3, 3, 2, (1, 0, 1, 0), 1, 23, 2),  # grouped, segmented layout (cg >= N)
    (32, 16, 16, 3, 1, (1, 1, 1, 1), 1, 9, 4),  # 16 rows and channels a group
    (16, 8, 4, 1, 1, (0, 0, 0, 0), 1, 18, 4),  # 1x1 grouped
    (4, 1, 1, 3, 1, (1, 9, 2, 9), 1, 12, 4),  # wide side padding
    (24, 1, 1, 3, 1, (1, 0, 2, 0), 1, 100, 4),  # rows as one span a channel, tasks' row blocks straddle planes
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scale_kind", ["u8", "f32", "f16"])
@pytest.mark.parametrize("x_kind", ["float", "uint8", "int8"])
def test_direct_conv_matches_numpy_and_paths_agree(kernels, case, scale_kind, x_kind):
    c, multiplier, cg, k, stride, pads, dilation, width, n = case
    rng = np.random.default_rng(zlib.crc32(repr((case, scale_kind, x_kind)).encode()))
    group = c // cg
    m = group * multiplier
    t4 = random_ternary(rng, (m, cg, k, k))
    rows, segments = conv_rows(t4, n)
    codes, groups = pack_weight(rows, n, segments)
    g = groups.shape[1]
    asymmetric = scale_kind == "u8" and c % 2 == 1
    sc, rs, sv = make_scales(rng, m, g, scale_kind)
    inputs = dict(codes=codes, scales=sc, row_scale=rs)
    values = sv
    if asymmetric:
        nsc, nrs, nsv = make_scales(rng, m, g, scale_kind)
        inputs.update(neg_scales=nsc, neg_row_scale=nrs)
        values = (sv, nsv)
    weight = dequantized_weight(groups, values, (m, cg, k, k), n)
    bias = rng.normal(size=m).astype(np.float32)
    levels_of = {"float": (0.05, 7, 0, 255), "uint8": (0.05, 7, 0, 255), "int8": (0.05, -3, -128, 127)}
    x_scale, zp, qmin, qmax = levels_of[x_kind]
    levels = rng.integers(qmin, qmax + 1, size=(2, c, 11, width))
    x = {"float": ((levels - zp) * x_scale + rng.uniform(-0.02, 0.02, levels.shape)).astype(np.float32),
         "uint8": levels.astype(np.uint8), "int8": levels.astype(np.int8)}[x_kind]
    zp_value = np.int8(zp) if x_kind == "int8" else np.uint8(zp)
    dq = quantize_act(x, x_scale, zp, qmin, qmax)[0] if x_kind == "float" else (levels - zp) * np.float32(x_scale)
    strides, dilations = (stride, stride), (dilation, dilation)
    want = conv2d_ref(dq.astype(np.float64), weight, bias, strides, pads, dilations, group)
    residual = rng.normal(size=want.shape).astype(np.float32)
    want = np.maximum(want + residual, 0)
    model = build_model(
        "TernaryConv",
        dict(x_scale=np.float32(x_scale), x_zero_point=zp_value, bias=bias, residual=residual, **inputs),
        dict(N=n, weight_shape=[m, cg, k, k], group=group, strides=list(strides), pads=list(pads),
             dilations=list(dilations), relu=1),
        list(x.shape),
        x_type={"float": TensorProto.FLOAT, "uint8": TensorProto.UINT8, "int8": TensorProto.INT8}[x_kind],
        fed=("residual",),
    )
    outputs = {kernel: run_op(model, {"X": x, "residual": residual}, kernel, threads=2) for kernel in kernels}
    reference = outputs["ref"]
    np.testing.assert_allclose(reference, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    for kernel, got in outputs.items():
        assert np.array_equal(got, reference), kernel


def test_non_constant_weights_take_the_same_path(kernels):
    """Weights fed at run time are regrouped per call and give the constant-weight result."""
    rng = np.random.default_rng(3)
    c, n = 20, 4
    rows, segments = conv_rows(random_ternary(rng, (c, 1, 3, 3)), n)
    codes, groups = pack_weight(rows, n, segments)
    sc, rs, _ = make_scales(rng, c, groups.shape[1], "u8")
    x = rng.normal(size=(1, c, 9, 9)).astype(np.float32)
    inputs = dict(x_scale=np.float32(0.02), x_zero_point=np.int8(0), codes=codes, scales=sc, row_scale=rs)
    attrs = dict(N=n, weight_shape=[c, 1, 3, 3], group=c, pads=[1, 1, 1, 1])
    for kernel in kernels:
        constant = run_op(build_model("TernaryConv", inputs, attrs, list(x.shape)), {"X": x}, kernel, threads=2)
        fed = run_op(build_model("TernaryConv", inputs, attrs, list(x.shape), constant=False),
                     {"X": x, "codes": codes, "scales": sc, "row_scale": rs}, kernel, threads=2)
        assert np.array_equal(constant, fed), kernel


def _depthwise_inputs(c=6, n=4, k=3):
    rng = np.random.default_rng(2)
    codes, groups = pack_weight(random_ternary(rng, (c, k * k)), n)
    scales = np.ones((c, groups.shape[1]), np.float32)
    return dict(x_scale=np.float32(0.1), x_zero_point=np.uint8(0), codes=codes, scales=scales)


XD = {"X": np.ones((1, 6, 7, 7), np.float32)}
DEPTHWISE = dict(N=4, weight_shape=[6, 1, 3, 3], group=6)


@pytest.mark.parametrize("x_shape, match",
                         [([1, 5, 7, 7], "channels"), ([1, 6, 2, 2], "does not fit"), ([6, 7, 7], "4-D")])
def test_bad_depthwise_inputs(x_shape, match):
    model = build_model("TernaryConv", _depthwise_inputs(), DEPTHWISE, x_shape)
    _expect_error(model, {"X": np.ones(x_shape, np.float32)}, match)


@pytest.mark.parametrize("residual", [np.ones((1, 6, 5, 4), np.float32), np.ones((6, 5, 5), np.float32)])
def test_bad_depthwise_residual(residual):
    model = build_model("TernaryConv", _depthwise_inputs() | dict(residual=residual), DEPTHWISE, [1, 6, 7, 7],
                        fed=("residual",))
    _expect_error(model, XD | {"residual": residual}, "residual shape")


@pytest.mark.parametrize("codes_shape", [(6, 2), (5, 3), (6, 4)])
def test_bad_depthwise_codes_fed_at_run_time(codes_shape):
    inputs = _depthwise_inputs()
    codes = np.zeros(codes_shape, np.uint8)
    model = build_model("TernaryConv", inputs | dict(codes=codes), DEPTHWISE, [1, 6, 7, 7], fed=("codes",))
    _expect_error(model, XD | {"codes": codes}, "codes shape")
