"""The com.fgq ops in real onnxruntime sessions, on every kernel path this CPU runs.

- Exact mode (int8 activations, x_scale 1, unit scales or uint8 scale codes
  under a unit row scale): the output is the integer dot product itself, so
  every path must match numpy bit for bit;
  hypothesis draws the shapes (N not dividing C, odd channels, pads, strides,
  dilations, depthwise, batch 1 and many, rank-3/4 MatMul).
- Float mode: fused activation quantization, float16/uint8 scales, asymmetric
  scales, 4-bit levels, non-constant weights, against a numpy reference on
  dequantized weights x dequantized activations.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

sys.path.insert(0, str(pathlib.Path(__file__).parent))
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
    scales_to_weight,
)

pytestmark = pytest.mark.filterwarnings("ignore")


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


# -- exact integer mode -----------------------------------------------------------


@SETTINGS
@given(
    batch_shape=st.sampled_from([(1,), (3,), (2, 3), (1, 2, 2), ()]),
    k=st.integers(1, 200),
    m=st.integers(1, 40),
    n=st.sampled_from([1, 3, 4, 5, 8, 16, 17, 32, 64, 65, 100, 128]),
    seed=st.integers(0, 2**16),
)
def test_matmul_exact_all_paths(kernels, batch_shape, k, m, n, seed):
    rng = np.random.default_rng(seed)
    t = random_ternary(rng, (m, k))
    codes, groups = pack_weight(t, n)
    scales = np.ones((m, groups.shape[1]), np.float32)
    x = rng.integers(-128, 128, size=(*batch_shape, k)).astype(np.int8)
    model = build_model(
        "TernaryMatMul",
        dict(x_scale=np.float32(1), x_zero_point=np.int8(0), codes=codes, scales=scales),
        dict(N=n, K=k),
        list(x.shape),
        x_type=TensorProto.INT8,
    )
    want = (x.astype(np.int64) @ t.T.astype(np.int64)).astype(np.float32)
    for kernel in kernels:
        got = run_op(model, {"X": x}, kernel, threads=2)
        assert got.shape == want.shape
        assert np.array_equal(got, want), kernel


def output_fits(hw, rs, pads, dilations) -> bool:
    """Whether the padded image holds at least one dilated kernel window."""
    (h, w), (r, s) = hw, rs
    return h + pads[0] + pads[2] >= dilations[0] * (r - 1) + 1 and w + pads[1] + pads[3] >= dilations[1] * (s - 1) + 1


def random_conv_weight(rng, mg, cg, group, r, s, n):
    """A random ternary conv weight [m, cg, r, s] and its packed rows: (m, c, t4, rows, segments, codes, groups)."""
    m, c = mg * group, cg * group
    t4 = random_ternary(rng, (m, cg, r, s))
    rows, segments = conv_rows(t4, n)
    codes, groups = pack_weight(rows, n, segments)
    return m, c, t4, rows, segments, codes, groups


@SETTINGS
@given(
    nb=st.sampled_from([1, 2]),
    cg=st.integers(1, 21),
    group=st.sampled_from([1, 1, 2, 3]),
    mg=st.integers(1, 9),
    r=st.integers(1, 3),
    s=st.integers(1, 3),
    hw=st.tuples(st.integers(3, 9), st.integers(3, 9)),
    strides=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pads=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    dilations=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    n=st.sampled_from([1, 3, 4, 8, 9, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_conv_exact_all_paths(kernels, nb, cg, group, mg, r, s, hw, strides, pads, dilations, n, seed):
    h, w = hw
    if not output_fits(hw, (r, s), pads, dilations):
        return
    rng = np.random.default_rng(seed)
    m, c, t4, rows, segments, codes, groups = random_conv_weight(rng, mg, cg, group, r, s, n)
    scales = np.ones((m, groups.shape[1]), np.float32)
    bias = rng.integers(-5, 5, size=m).astype(np.float32)
    x = rng.integers(-128, 128, size=(nb, c, h, w)).astype(np.int8)
    model = build_model(
        "TernaryConv",
        dict(x_scale=np.float32(1), x_zero_point=np.int8(0), codes=codes, scales=scales, bias=bias),
        dict(N=n, weight_shape=[m, cg, r, s], group=group, strides=list(strides), pads=list(pads),
             dilations=list(dilations)),
        list(x.shape),
        x_type=TensorProto.INT8,
    )
    want = conv2d_ref(x.astype(np.float64), t4.astype(np.float64), bias, strides, pads, dilations, group).astype(np.float32)
    for kernel in kernels:
        got = run_op(model, {"X": x}, kernel, threads=2)
        assert got.shape == want.shape
        assert np.array_equal(got, want), kernel


@settings(SETTINGS, max_examples=30)
@given(
    nb=st.sampled_from([1, 3]),
    cg=st.sampled_from([3, 8, 16]),
    mg=st.integers(1, 20),
    rs=st.sampled_from([(1, 1), (3, 3)]),
    bias=st.booleans(),
    relu=st.sampled_from([0, 1]),
    n=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
)
def test_conv_residual_all_paths(kernels, nb, cg, mg, rs, bias, relu, n, seed):
    """The residual input (fused ResNet Add) is added after the bias and before the ReLU."""
    rng = np.random.default_rng(seed)
    r, s = rs
    m, c, t4, _, _, codes, groups = random_conv_weight(rng, mg, cg, 1, r, s, n)
    b = rng.integers(-5, 5, size=m).astype(np.float32) if bias else None
    x = rng.integers(-128, 128, size=(nb, c, 6, 7)).astype(np.int8)
    pads = [r // 2] * 4
    res = rng.integers(-300, 300, size=(nb, m, 6, 7)).astype(np.float32)
    model = build_model(
        "TernaryConv",
        dict(x_scale=np.float32(1), x_zero_point=np.int8(0), codes=codes, scales=np.ones((m, groups.shape[1]), np.float32),
             bias=b, residual=res),
        dict(N=n, weight_shape=[m, cg, r, s], pads=pads, relu=relu), list(x.shape), x_type=TensorProto.INT8,
        fed=("residual",),
    )
    want = conv2d_ref(x.astype(np.float64), t4.astype(np.float64), b, (1, 1), pads, (1, 1), 1) + res
    want = (np.maximum(want, 0) if relu else want).astype(np.float32)
    for kernel in kernels:
        assert np.array_equal(run_op(model, {"X": x, "residual": res}, kernel), want), kernel


@settings(SETTINGS, max_examples=60)
@given(
    nb=st.sampled_from([1, 2]),
    cg=st.sampled_from([1, 5, 8, 16, 24, 32, 33, 48]),
    group=st.sampled_from([1, 1, 1, 2]),
    mg=st.integers(1, 20),
    rs=st.sampled_from([(1, 1), (1, 1), (3, 3), (2, 3)]),
    hw=st.tuples(st.integers(2, 9), st.integers(2, 9)),
    strides=st.sampled_from([(1, 1), (1, 1), (2, 1)]),
    pads=st.sampled_from([(0, 0, 0, 0), (0, 0, 0, 0), (1, 1, 1, 1), (0, 2, 1, 0)]),
    dilations=st.sampled_from([(1, 1), (2, 1)]),
    n=st.sampled_from([3, 4, 5, 8, 16]),
    max_code=st.sampled_from([127, 255]),
    x_type=st.sampled_from(["float", "int8"]),
    seed=st.integers(0, 2**16),
)
def test_conv_exact_uint8_scales(kernels, nb, cg, group, mg, rs, hw, strides, pads, dilations, n, max_code, x_type, seed):
    """uint8 scale codes under a unit row scale, exact: AVX-512 runs the folded form from natural rows
    (1x1 convolutions straight from the quantized NHWC image), the other paths the codes."""
    (r, s), (h, w) = rs, hw
    if not output_fits(hw, rs, pads, dilations):
        return
    rng = np.random.default_rng(seed)
    m, c, t4, rows, segments, codes, groups = random_conv_weight(rng, mg, cg, group, r, s, n)
    scales = rng.integers(0, max_code + 1, size=(m, groups.shape[1])).astype(np.uint8)
    length = rows.shape[1] // segments
    weight = rows_to_conv(scales_to_weight(groups, scales.astype(np.float64), length, segments), (m, cg, r, s), n)
    levels = rng.integers(-128, 128, size=(nb, c, h, w))
    x = levels.astype(np.int8) if x_type == "int8" else (levels * 0.5).astype(np.float32)
    model = build_model(
        "TernaryConv",
        dict(x_scale=np.float32(1 if x_type == "int8" else 0.5), x_zero_point=np.int8(0), codes=codes, scales=scales,
             row_scale=np.ones(m, np.float32)),
        dict(N=n, weight_shape=[m, cg, r, s], group=group, strides=list(strides), pads=list(pads),
             dilations=list(dilations)),
        list(x.shape),
        x_type=TensorProto.INT8 if x_type == "int8" else TensorProto.FLOAT,
    )
    want = conv2d_ref(levels.astype(np.float64), weight, None, strides, pads, dilations, group)
    if x_type == "float":
        want = want * 0.5
    for kernel in kernels:
        got = run_op(model, {"X": x}, kernel, threads=2)
        assert np.array_equal(got, want.astype(np.float32)), kernel


@SETTINGS
@given(
    rows=st.sampled_from([1, 4, 9]),
    k=st.integers(1, 200),
    m=st.integers(1, 40),
    n=st.sampled_from([2, 4, 5, 8, 16, 64]),
    max_code=st.sampled_from([127, 255]),
    seed=st.integers(0, 2**16),
)
def test_matmul_exact_uint8_scales(kernels, rows, k, m, n, max_code, seed):
    """uint8 scale codes under a unit row scale: the output is sum_g s_g * dot_g, an integer below 2^24
    (AVX-512 folds s into the weights for >= 4 rows when N <= 8 or every code is <= 127)."""
    rng = np.random.default_rng(seed)
    t = random_ternary(rng, (m, k))
    codes, groups = pack_weight(t, n)
    scales = rng.integers(0, max_code + 1, size=(m, groups.shape[1])).astype(np.uint8)
    x = rng.integers(-128, 128, size=(rows, k)).astype(np.int8)
    model = build_model(
        "TernaryMatMul",
        dict(x_scale=np.float32(1), x_zero_point=np.int8(0), codes=codes, scales=scales, row_scale=np.ones(m, np.float32)),
        dict(N=n, K=k),
        list(x.shape),
        x_type=TensorProto.INT8,
    )
    weight = scales_to_weight(groups, scales.astype(np.float64), k, 1).astype(np.int64)
    want = (x.astype(np.int64) @ weight.T).astype(np.float32)
    for kernel in kernels:
        assert np.array_equal(run_op(model, {"X": x}, kernel, threads=2), want), kernel


def test_depthwise_exact(kernels):
    rng = np.random.default_rng(5)
    c, r, n = 24, 3, 4
    t4 = random_ternary(rng, (c, 1, r, r))
    rows, segments = conv_rows(t4, n)
    assert segments == 1
    codes, groups = pack_weight(rows, n, segments)
    x = rng.integers(-128, 128, size=(2, c, 10, 10)).astype(np.int8)
    model = build_model(
        "TernaryConv",
        dict(x_scale=np.float32(1), x_zero_point=np.int8(0), codes=codes, scales=np.ones((c, groups.shape[1]), np.float32)),
        dict(N=n, weight_shape=[c, 1, r, r], group=c, strides=[2, 2], pads=[1, 1, 1, 1]),
        list(x.shape),
        x_type=TensorProto.INT8,
    )
    want = conv2d_ref(x.astype(np.float64), t4.astype(np.float64), None, (2, 2), (1, 1, 1, 1), (1, 1), c)
    for kernel in kernels:
        assert np.array_equal(run_op(model, {"X": x}, kernel), want.astype(np.float32)), kernel


def quantize_linear(y: np.ndarray, scale: np.float32, zero_point) -> np.ndarray:
    """ONNX QuantizeLinear: round half to even of y / scale, plus the zero point, saturated to its type."""
    info = np.iinfo(np.asarray(zero_point).dtype)
    levels = np.rint(y.astype(np.float32) / np.float32(scale)) + int(zero_point)
    return np.clip(levels, info.min, info.max).astype(np.asarray(zero_point).dtype)


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


@settings(SETTINGS, max_examples=100)
@given(
    nb=st.sampled_from([1, 2]),
    cg=st.sampled_from([1, 3, 8, 19, 32]),
    depthwise=st.booleans(),
    mg=st.integers(1, 70),
    rs=st.sampled_from([(1, 1), (3, 3)]),
    hw=st.sampled_from([(5, 6), (9, 11)]),
    n=st.sampled_from([3, 4, 16]),
    relu=st.sampled_from([0, 1]),
    y_type=st.sampled_from([None, np.uint8, np.int8]),
    residual_type=st.sampled_from([None, np.float32, np.uint8, np.int8]),
    x_levels=st.booleans(),
    x_nhwc=st.booleans(),
    y_nhwc=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_8bit_and_nhwc_inputs_and_outputs(kernels, nb, cg, depthwise, mg, rs, hw, n, relu, y_type, residual_type,
                                               x_levels, x_nhwc, y_nhwc, seed):
    """With y_scale/y_zero_point TernaryConv returns QuantizeLinear of its float output, and an 8-bit residual with
    residual_scale/residual_zero_point is added as its DequantizeLinear; x_layout/y_layout NHWC take X, and give Y
    and the residual, channels-last. Bit for bit what the float NCHW node gives on the same values (8-bit X: its
    levels), quantized and transposed. Covers the GEMM tiles (both row layouts, the folded store's levels), the
    code path (N = 16) and the direct kernel's tasks."""
    if y_type is None and residual_type in (None, np.float32) and not (x_levels or x_nhwc or y_nhwc):
        return  # the float node itself
    check_conv_io(kernels, nb, cg, depthwise, mg, rs, hw, n, relu, y_type, residual_type, x_levels, x_nhwc, y_nhwc, seed)


@pytest.mark.parametrize(("cg", "rs", "pad", "stride", "x_zero_point", "qmax"), [
    (8, (1, 1), 0, 1, 128, 255),  # read in place
    (32, (3, 3), 0, 2, 0, 255),  # read in place: no padding, a strided 3x3
    (32, (3, 3), 1, 1, 0, 255),  # padded: copied into the image
    (19, (1, 1), 0, 1, 0, 255),  # channels not a multiple of 4: copied
    (8, (1, 1), 0, 1, 0, 15),  # 4-bit levels: clamped while copied
])
def test_conv_nhwc_uint8_x(kernels, cg, rs, pad, stride, x_zero_point, qmax):
    """NHWC uint8 X is read in place as the image where nothing changes its bytes, else copied; the same numbers
    either way as the float NCHW node on its levels."""
    check_conv_io(kernels, 1, cg, False, 40, rs, (9, 11), 4, 1, np.uint8, np.uint8, True, True, True, 7, pad=pad,
                  stride=stride, x_zero_point=x_zero_point, qmax=qmax)


def check_conv_io(kernels, nb, cg, depthwise, mg, rs, hw, n, relu, y_type, residual_type, x_levels, x_nhwc, y_nhwc, seed,
                  pad=None, stride=1, x_zero_point=128, qmax=255):
    """The node with these inputs and layouts against the float NCHW node (test_conv_8bit_and_nhwc_inputs_and_outputs)."""
    rng = np.random.default_rng(seed)
    (r, s), (h, w) = rs, hw
    c = cg
    group, m, cg_ = (c, c * min(mg, 2), 1) if depthwise else (1, mg, c)  # depthwise: 1 or 2 rows a channel
    t4 = random_ternary(rng, (m, cg_, r, s))
    rows, segments = conv_rows(t4, n)
    codes, groups = pack_weight(rows, n, segments)
    sc, rsc, _ = make_scales(rng, m, groups.shape[1], "u8")
    x = rng.normal(0, 1, size=(nb, c, h, w)).astype(np.float32)
    if x_levels:
        x = rng.integers(0, 256, size=(nb, c, h, w)).astype(np.uint8)
    inputs = dict(x_scale=np.float32(0.05), x_zero_point=np.uint8(x_zero_point), codes=codes, scales=sc, row_scale=rsc,
                  bias=rng.normal(0, 0.5, size=m).astype(np.float32))
    attrs = dict(N=n, weight_shape=[m, cg_, r, s], group=group, pads=[r // 2 if pad is None else pad] * 4,
                 strides=[stride] * 2, relu=relu, act_qmin=0, act_qmax=qmax)
    x_type = TensorProto.UINT8 if x_levels else TensorProto.FLOAT
    pads = attrs["pads"][0]
    out_shape = (nb, m, (h + 2 * pads - r) // stride + 1, (w + 2 * pads - s) // stride + 1)
    feeds, float_feeds = {"X": nhwc(x) if x_nhwc else x}, {"X": x}
    if residual_type is not None:
        if residual_type == np.float32:
            float_feeds["residual"] = rng.normal(0, 2, size=out_shape).astype(np.float32)
            feeds["residual"] = float_feeds["residual"]
        else:
            info = np.iinfo(residual_type)
            levels = rng.integers(info.min, info.max + 1, size=out_shape).astype(residual_type)
            r_scale, r_zero = np.float32(0.03), np.asarray(7 if residual_type == np.int8 else 120, residual_type)
            feeds["residual"] = levels
            float_feeds["residual"] = ((levels.astype(np.int32) - int(r_zero)).astype(np.float32) * r_scale)
            inputs.update(residual_scale=r_scale, residual_zero_point=r_zero)
        if y_nhwc:
            feeds["residual"] = nhwc(feeds["residual"])
    float_model = build_model("TernaryConv", {k: v for k, v in inputs.items() if not k.startswith("residual_")} |
                              dict(residual=float_feeds.get("residual")), attrs, list(x.shape), x_type, fed=("residual",))
    if y_type is not None:
        inputs.update(y_scale=np.float32(0.02), y_zero_point=np.asarray(100 if y_type == np.uint8 else -10, y_type))
    layouts = dict(x_layout="NHWC" if x_nhwc else "NCHW", y_layout="NHWC" if y_nhwc else "NCHW")
    model = build_model("TernaryConv", inputs | dict(residual=feeds.get("residual")), attrs | layouts,
                        list(feeds["X"].shape), x_type, fed=("residual",))
    for kernel in kernels:
        want = run_op(float_model, float_feeds, kernel)
        if y_type is not None:
            want = quantize_linear(want, inputs["y_scale"], inputs["y_zero_point"])
        got = run_op(model, feeds, kernel, threads=2)
        got = got.transpose(0, 3, 1, 2) if y_nhwc else got
        assert got.dtype == want.dtype and np.array_equal(got, want), kernel


# -- signed and unsigned activations, exact -----------------------------------------
# Fused quantization of float inputs at x_scale 0.5 with uint8 scale codes under a unit row scale:
# the output is 0.5 * sum((q - zp) * t * s), an integer multiple of 0.5 below 2^24, so every path
# must match numpy exactly. Each row holds inputs far beyond both ends (q saturates at qmin and qmax).
ACTIVATIONS = {  # zero point dtype, zero point, qmin, qmax
    "s8": (np.int8, 0, -128, 127),
    "s8-zp": (np.int8, -5, -128, 127),
    "u8": (np.uint8, 0, 0, 255),
    "u8-zp": (np.uint8, 128, 0, 255),
}


def saturating_input(rng, shape, act):
    """Float inputs whose levels cover [qmin - 3, qmax + 3], each row (last axis) reaching both ends."""
    _, zp, qmin, qmax = ACTIVATIONS[act]
    x = ((rng.integers(qmin - 3, qmax + 4, size=shape) - zp) * 0.5).astype(np.float32)
    x[..., 0], x[..., -1] = 1000.0, -1000.0
    levels = np.clip(np.round(x / np.float32(0.5)) + zp, qmin, qmax)
    return x, levels - zp


def activation_inputs(act):
    dtype, zp, _, _ = ACTIVATIONS[act]
    return dict(x_scale=np.float32(0.5), x_zero_point=np.array(zp, dtype))


@SETTINGS
@given(
    act=st.sampled_from(sorted(ACTIVATIONS)),
    rows=st.sampled_from([1, 3, 4, 5, 8, 9, 17]),
    k=st.sampled_from([2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 129]),
    m=st.sampled_from([1, 15, 16, 17, 33]),
    n=st.sampled_from([4, 8, 16, 64]),
    max_code=st.sampled_from([127, 255]),
    op=st.sampled_from(["TernaryMatMul", "TernaryGemm"]),
    seed=st.integers(0, 2**16),
)
def test_matmul_gemm_signed_and_unsigned_exact(kernels, act, rows, k, m, n, max_code, op, seed):
    """Batch 1 (the code path) and batches of >= 4 rows (the folded path where a CPU has it)."""
    rng = np.random.default_rng(seed)
    t = random_ternary(rng, (m, k))
    codes, groups = pack_weight(t, n)
    scales = rng.integers(0, max_code + 1, size=(m, groups.shape[1])).astype(np.uint8)
    x, centred = saturating_input(rng, (rows, k), act)
    inputs = dict(activation_inputs(act), codes=codes, scales=scales, row_scale=np.ones(m, np.float32))
    model = build_model(op, inputs, dict(N=n, K=k), list(x.shape))
    weight = scales_to_weight(groups, scales.astype(np.float64), k, 1)
    want = (0.5 * (centred @ weight.T)).astype(np.float32)
    for kernel in kernels:
        assert np.array_equal(run_op(model, {"X": x}, kernel, threads=2), want), kernel


@SETTINGS
@given(
    act=st.sampled_from(sorted(ACTIVATIONS)),
    nb=st.sampled_from([1, 2]),
    cg=st.sampled_from([3, 8, 15, 16, 17, 32, 33]),
    mg=st.sampled_from([1, 15, 16, 17, 33]),
    rs=st.sampled_from([(1, 1), (3, 3)]),
    pads=st.sampled_from([(0, 0, 0, 0), (1, 1, 1, 1), (0, 2, 1, 0)]),
    n=st.sampled_from([4, 8, 16]),
    max_code=st.sampled_from([127, 255]),
    seed=st.integers(0, 2**16),
)
def test_conv_signed_and_unsigned_exact(kernels, act, nb, cg, mg, rs, pads, n, max_code, seed):
    """1x1 (read in place on the folded path) and 3x3 with pads: the border is the level of 0.0."""
    rng = np.random.default_rng(seed)
    (r, s), h, w = rs, 5, 6
    m, c, t4, rows, segments, codes, groups = random_conv_weight(rng, mg, cg, 1, r, s, n)
    scales = rng.integers(0, max_code + 1, size=(m, groups.shape[1])).astype(np.uint8)
    weight = rows_to_conv(scales_to_weight(groups, scales.astype(np.float64), rows.shape[1] // segments, segments),
                          (m, cg, r, s), n)
    x, centred = saturating_input(rng, (nb, c, h, w), act)
    inputs = dict(activation_inputs(act), codes=codes, scales=scales, row_scale=np.ones(m, np.float32))
    model = build_model("TernaryConv", inputs, dict(N=n, weight_shape=[m, cg, r, s], pads=list(pads)), list(x.shape))
    want = (0.5 * conv2d_ref(centred, weight, None, (1, 1), pads, (1, 1), 1)).astype(np.float32)
    for kernel in kernels:
        assert np.array_equal(run_op(model, {"X": x}, kernel, threads=2), want), kernel


# -- float mode --------------------------------------------------------------------


@pytest.mark.parametrize("scale_kind", ["f32", "f16", "u8"])
@pytest.mark.parametrize("act", ["u8", "s8", "u4", "s4"])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_matmul_float(kernels, scale_kind, act, asymmetric):
    rng = np.random.default_rng(hash((scale_kind, act, asymmetric)) % 2**32)
    k, m, n, b = 150, 37, 16, 6
    t = random_ternary(rng, (m, k))
    codes, groups = pack_weight(t, n)
    g = groups.shape[1]
    sc, rs, sv = make_scales(rng, m, g, scale_kind)
    inputs = dict(codes=codes, scales=sc, row_scale=rs)
    if asymmetric:
        nsc, nrs, nsv = make_scales(rng, m, g, scale_kind)
        inputs.update(neg_scales=nsc, neg_row_scale=nrs)
        value = np.where(groups > 0, sv[:, :, None], nsv[:, :, None]) * groups
    else:
        value = groups * sv[:, :, None]
    w = value.reshape(m, -1)[:, :k].astype(np.float64)
    levels = {"u8": (np.uint8, 0, 255, 90), "s8": (np.int8, -128, 127, 3), "u4": (np.uint8, 0, 15, 0), "s4": (np.int8, -8, 7, 0)}
    dtype, qmin, qmax, zp = levels[act]
    scale = np.float32(0.05 if act.endswith("8") else 0.3)
    attrs = dict(N=n, K=k)
    if act.endswith("4"):
        attrs.update(act_qmin=qmin, act_qmax=qmax)
    bias = rng.normal(size=m).astype(np.float32)
    inputs.update(x_scale=scale, x_zero_point=np.array(zp, dtype), bias=bias)
    x = (rng.normal(size=(b, k)) * 2).astype(np.float32)
    xd, q = quantize_act(x, scale, zp, qmin, qmax)
    want = xd.astype(np.float64) @ w.T + bias
    model = build_model("TernaryMatMul", inputs, attrs, [b, k])
    model_q = build_model("TernaryMatMul", inputs, attrs, [b, k], x_type=TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8)
    for kernel in kernels:
        got = run_op(model, {"X": x}, kernel)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=kernel)
        got_q = run_op(model_q, {"X": q.astype(dtype)}, kernel)
        np.testing.assert_allclose(got_q, want, rtol=1e-4, atol=1e-4, err_msg=kernel)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (23,), (1, 23), (5, 1), (5, 23)])
def test_gemm_float(kernels, trans_a, c_shape):
    rng = np.random.default_rng(7)
    k, m, n, b = 45, 23, 8, 5
    t = random_ternary(rng, (m, k))
    codes, groups = pack_weight(t, n)
    sc, rs, sv = make_scales(rng, m, groups.shape[1], "f16")
    w = scales_to_weight(groups, sv, k, 1)
    alpha, beta = 0.7, -1.3
    inputs = dict(x_scale=np.float32(0.02), x_zero_point=np.uint8(128), codes=codes, scales=sc)
    c = None if c_shape is None else rng.normal(size=c_shape).astype(np.float32)
    inputs["bias"] = c
    a = rng.normal(size=(b, k)).astype(np.float32)
    xd, _ = quantize_act(a, 0.02, 128, 0, 255)
    want = alpha * (xd.astype(np.float64) @ w.T) + (0 if c is None else beta * c)
    feed = a.T.copy() if trans_a else a
    model = build_model("TernaryGemm", inputs, dict(N=n, K=k, transA=trans_a, transB=1, alpha=alpha, beta=beta), list(feed.shape))
    for kernel in kernels:
        np.testing.assert_allclose(run_op(model, {"X": feed}, kernel), want, rtol=1e-4, atol=1e-4, err_msg=kernel)


@pytest.mark.parametrize("relu", [0, 1])
@pytest.mark.parametrize("scale_kind", ["f32", "u8"])
def test_conv_float(kernels, relu, scale_kind):
    rng = np.random.default_rng(11)
    nb, c, h, wd, m, r, n = 2, 12, 9, 7, 10, 3, 4
    t4 = random_ternary(rng, (m, c, r, r))
    rows, segments = conv_rows(t4, n)
    codes, groups = pack_weight(rows, n, segments)
    sc, rs, sv = make_scales(rng, m, groups.shape[1], scale_kind)
    w = rows_to_conv(scales_to_weight(groups, sv, c, segments), (m, c, r, r), n)
    bias = rng.normal(size=m).astype(np.float32)
    x = rng.uniform(0, 3, size=(nb, c, h, wd)).astype(np.float32)
    xd, _ = quantize_act(x, 0.03, 0, 0, 255)
    want = conv2d_ref(xd.astype(np.float64), w, bias, (1, 2), (1, 0, 2, 1), (1, 1), 1)
    if relu:
        want = np.maximum(want, 0)
    model = build_model(
        "TernaryConv",
        dict(x_scale=np.float32(0.03), x_zero_point=np.uint8(0), codes=codes, scales=sc, row_scale=rs, bias=bias),
        dict(N=n, weight_shape=[m, c, r, r], strides=[1, 2], pads=[1, 0, 2, 1], relu=relu),
        list(x.shape),
    )
    for kernel in kernels:
        np.testing.assert_allclose(run_op(model, {"X": x}, kernel, threads=2), want, rtol=1e-4, atol=1e-4, err_msg=kernel)


def test_non_constant_weights(kernels):
    """Weights fed as graph inputs are repacked per call and give the same result."""
    rng = np.random.default_rng(3)
    k, m, n = 33, 9, 4
    t = random_ternary(rng, (m, k))
    codes, groups = pack_weight(t, n)
    sc, rs, sv = make_scales(rng, m, groups.shape[1], "f32")
    inputs = dict(x_scale=np.float32(0.1), x_zero_point=np.int8(0), codes=codes, scales=sc)
    x = rng.normal(size=(4, k)).astype(np.float32)
    const = build_model("TernaryMatMul", inputs, dict(N=n, K=k), [4, k])
    fed = build_model("TernaryMatMul", inputs, dict(N=n, K=k), [4, k], constant=False)
    for kernel in kernels:
        want = run_op(const, {"X": x}, kernel)
        got = run_op(fed, {"X": x, "codes": codes, "scales": sc}, kernel)
        np.testing.assert_array_equal(got, want)


def test_fed_activation_quantization(kernels):
    """x_scale and x_zero_point fed as graph inputs (read per call, not once at creation) give the same result,
    and a bad one fails the call."""
    rng = np.random.default_rng(5)
    k, m, n = 20, 6, 4
    codes, groups = pack_weight(random_ternary(rng, (m, k)), n)
    inputs = dict(x_scale=np.float32(0.05), x_zero_point=np.uint8(7), codes=codes, scales=np.ones((m, groups.shape[1]), np.float32))
    x = rng.uniform(0, 3, size=(4, k)).astype(np.float32)
    const = build_model("TernaryMatMul", inputs, dict(N=n, K=k), [4, k])
    fed = onnx.ModelProto()
    fed.CopyFrom(const)
    for name in ("x_scale", "x_zero_point"):
        tensor = next(t for t in fed.graph.initializer if t.name == name)
        fed.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, []))
        fed.graph.initializer.remove(tensor)
    feeds = {"X": x, "x_scale": np.array(inputs["x_scale"]), "x_zero_point": np.array(inputs["x_zero_point"])}
    for kernel in kernels:
        np.testing.assert_array_equal(run_op(fed, feeds, kernel), run_op(const, {"X": x}, kernel))
    with pytest.raises(Exception, match="x_scale"):
        run_op(fed, feeds | {"x_scale": np.array(0, np.float32)}, kernels[0])


def test_threads_agree(kernels):
    rng = np.random.default_rng(4)
    k, m, n = 300, 130, 64
    codes, groups = pack_weight(random_ternary(rng, (m, k)), n)
    sc, _, _ = make_scales(rng, m, groups.shape[1], "f32")
    model = build_model("TernaryMatMul", dict(x_scale=np.float32(0.1), x_zero_point=np.int8(0), codes=codes, scales=sc),
                        dict(N=n, K=k), [40, k])
    x = rng.normal(size=(40, k)).astype(np.float32)
    np.testing.assert_array_equal(run_op(model, {"X": x}, kernels[-1], threads=1), run_op(model, {"X": x}, kernels[-1], threads=2))


def test_rounding_half_even_like_quantizelinear(kernels):
    """Ties x / scale = k + 0.5 round to even, like QuantizeLinear; NaN counts as 0; clamping at the levels."""
    k = 40
    scale = np.float32(0.25)
    ties = (np.arange(-20, 20) + 0.5).astype(np.float32) * scale
    x = np.concatenate([ties, np.array([np.nan, 1e9, -1e9, np.inf, -np.inf, 0.0, 3.1, -3.1], np.float32)])[None]
    x = np.pad(x, ((0, 0), (0, 48 - x.shape[1])))[:, :48]
    x = x[:, :k]
    t = np.eye(k, dtype=np.int8)  # identity weights: the output is the dequantized input
    codes, groups = pack_weight(t, 4)
    model = build_model("TernaryMatMul",
                        dict(x_scale=scale, x_zero_point=np.int8(0), codes=codes, scales=np.ones((k, groups.shape[1]), np.float32)),
                        dict(N=4, K=k), [1, k])
    with np.errstate(invalid="ignore"):
        levels = np.clip(np.round(np.nan_to_num(x / scale, nan=0.0, posinf=1e9, neginf=-1e9)), -128, 127)
    want = (levels * scale).astype(np.float32)
    for kernel in kernels:
        np.testing.assert_array_equal(run_op(model, {"X": x}, kernel), want, err_msg=kernel)


@pytest.mark.parametrize("n", [3, 4, 8, 16])  # N % 4 == 0: rows are quantized in place, without the position map
@pytest.mark.parametrize("rows", [1, 5])  # the code path and (>= 4 rows) the folded one
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("op", ["TernaryMatMul", "TernaryGemm"])
def test_8bit_levels_match_float(kernels, n, rows, dtype, op):
    """X as 8-bit levels (some beyond the 4-bit act_qmin/act_qmax: clamped) gives the bits of the float X they
    quantize from, for K not a multiple of N."""
    rng = np.random.default_rng(n * 10 + rows)
    k, m, scale = 37, 19, np.float32(0.25)
    qmin, qmax, zp = (0, 15, 3) if dtype == np.uint8 else (-8, 7, -1)
    t = random_ternary(rng, (m, k))
    codes, groups = pack_weight(t, n)
    sc, rs, _ = make_scales(rng, m, groups.shape[1], "u8")
    inputs = dict(x_scale=scale, x_zero_point=np.array(zp, dtype), codes=codes, scales=sc, row_scale=rs)
    attrs = dict(N=n, K=k, act_qmin=qmin, act_qmax=qmax)
    info = np.iinfo(dtype)
    levels = rng.integers(info.min, info.max + 1, size=(rows, k)).astype(dtype)
    x = ((levels.astype(np.float32) - zp) * scale).astype(np.float32)
    model = build_model(op, inputs, attrs, [rows, k])
    model_q = build_model(op, inputs, attrs, [rows, k], x_type=TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8)
    for kernel in kernels:
        np.testing.assert_array_equal(run_op(model_q, {"X": levels}, kernel), run_op(model, {"X": x}, kernel), err_msg=kernel)


@pytest.mark.parametrize("cg", [3, 16, 17, 40])  # planar images (few channels), 16-channel tiles and their tails
@pytest.mark.parametrize("hw", [(5, 6), (7, 9), (3, 20)])  # pixels a row block straddling the 16-pixel tiles
@pytest.mark.parametrize("rs, pads", [((1, 1), (0, 0, 0, 0)), ((3, 3), (1, 1, 1, 1)), ((3, 1), (0, 2, 1, 0))])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_conv_8bit_levels_match_float(kernels, cg, hw, rs, pads, dtype):
    """TernaryConv with X as 8-bit levels (some beyond the act_qmin/act_qmax range: clamped) gives the bits of the
    float X they quantize from."""
    rng = np.random.default_rng(cg * 100 + hw[0] * 10 + rs[0])
    (r, s), (h, w), n = rs, hw, 4
    m, c, _, _, _, codes, groups = random_conv_weight(rng, 7, cg, 1, r, s, n)
    scale = np.float32(0.25)
    qmin, qmax, zp = (2, 200, 90) if dtype == np.uint8 else (-100, 120, -3)
    sc, rsc, _ = make_scales(rng, m, groups.shape[1], "u8")
    inputs = dict(x_scale=scale, x_zero_point=np.array(zp, dtype), codes=codes, scales=sc, row_scale=rsc)
    attrs = dict(N=n, weight_shape=[m, cg, r, s], pads=list(pads), act_qmin=qmin, act_qmax=qmax)
    info = np.iinfo(dtype)
    levels = rng.integers(info.min, info.max + 1, size=(2, c, h, w)).astype(dtype)
    x = ((levels.astype(np.float32) - zp) * scale).astype(np.float32)
    model = build_model("TernaryConv", inputs, attrs, list(x.shape))
    model_q = build_model("TernaryConv", inputs, attrs, list(x.shape),
                          x_type=TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8)
    for kernel in kernels:
        np.testing.assert_array_equal(run_op(model_q, {"X": levels}, kernel, threads=2), run_op(model, {"X": x}, kernel),
                                      err_msg=kernel)
