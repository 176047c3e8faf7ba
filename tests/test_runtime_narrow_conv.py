"""Narrow TernaryConv layers (fewer input channels a group than N: a network's stem) in onnxruntime
sessions, on every kernel path this CPU runs, bit-exact against a numpy convolution of the
dequantized weights and the quantized activations.

A narrow layer comes in the two layouts the converter chooses between (passes/ternarize_weights.py):
groups of its C/group channels per kernel tap (the op's N = C/group: one group a tap, which the
SIMD paths read in place from the NHWC image, the group's padding positions reading the next
channels) and groups of N along the whole filter (a planar image, rows gathered as runs of kernel
columns). Shapes: C/group 1, 2, 3, 5 against N 4 and 8; strides, dilations, pads, groups, batches,
odd sizes, outputs too small for the folded form, both routes (GEMM, and the direct kernel for few
rows a group), uint8 scale codes (one and two folded planes) and float scales, int8, uint8 and
float inputs, constant and fed weights.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
from onnx import TensorProto

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_runtime_helpers import (  # noqa: E402
    build_model,
    conv2d_ref,
    conv_rows,
    pack_weight,
    random_ternary,
    rows_to_conv,
    run_op,
    scales_to_weight,
)

pytestmark = pytest.mark.filterwarnings("ignore")

# (C/group, the op's N): per-tap groups (N = C/group), whole-filter groups (C/group < N), and
# segmented layouts beside them: several groups a tap with N not a multiple of 4 (gathered, the
# group padding between channels) or of 4 (in place).
LAYOUTS = [(1, 1), (2, 2), (3, 3), (5, 5), (1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (3, 8), (5, 8),
           (5, 4), (2, 1), (5, 3), (6, 3), (9, 4)]

# kernel (R, S), strides, dilations, pads, group, batch, (H, W), rows a group
GEOMETRIES = {
    "7x7 s2 stem": ((7, 7), (2, 2), (1, 1), (3, 3, 3, 3), 1, 1, (19, 23), 24),
    "3x3 s2 batch 2": ((3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 1, 2, (17, 15), 16),
    "3x3 dilated": ((3, 3), (1, 1), (2, 2), (2, 1, 0, 2), 1, 1, (11, 13), 20),
    "3x3 rows dilated": ((3, 3), (2, 1), (2, 1), (1, 2, 1, 0), 1, 1, (12, 9), 17),
    "1x1": ((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1, 1, (9, 7), 33),
    "3x2 s(1,2) 2 groups batch 3": ((3, 2), (1, 2), (1, 1), (1, 0, 2, 1), 2, 3, (10, 9), 17),
    "3x3 3 groups (direct)": ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 3, 2, (8, 11), 4),
    "5x5 s3 few rows": ((5, 5), (3, 3), (1, 1), (2, 2, 2, 2), 1, 1, (13, 16), 9),
    "3 output pixels": ((3, 3), (1, 1), (1, 1), (0, 0, 0, 0), 1, 1, (3, 5), 20),
    "2x2: rows without padding groups": ((2, 2), (1, 1), (1, 1), (0, 1, 1, 0), 1, 2, (6, 7), 18),
}


def narrow_case(rng, cg, n, geometry, max_code, fed_weights=False, x_kind="float"):
    """A TernaryConv model of `geometry` with random ternary weights and scales, its input, and the
    exact expected output. max_code: uint8 scale codes 0..max_code (unit row scale); None: float
    scales, small integers."""
    (r, s), strides, dilations, pads, group, nb, (h, w), mg = geometry
    m, c = mg * group, cg * group
    t4 = random_ternary(rng, (m, cg, r, s))
    rows, segments = conv_rows(t4, n)
    codes, groups = pack_weight(rows, n, segments)
    if max_code is None:
        scales = rng.integers(1, 9, size=(m, groups.shape[1])).astype(np.float32)
        extra = {}
    else:
        scales = rng.integers(0, max_code + 1, size=(m, groups.shape[1])).astype(np.uint8)
        extra = {"row_scale": np.ones(m, np.float32)}
    weight = rows_to_conv(scales_to_weight(groups, scales.astype(np.float64), rows.shape[1] // segments, segments),
                          (m, cg, r, s), n)
    bias = rng.integers(-9, 9, size=m).astype(np.float32)
    if x_kind == "uint8":
        levels = rng.integers(0, 256, size=(nb, c, h, w))
        x, x_scale, zero_point, x_type = levels.astype(np.uint8), 1.0, np.uint8(128), TensorProto.UINT8
        levels = levels - 128
    else:
        levels = rng.integers(-128, 128, size=(nb, c, h, w))
        x_scale, zero_point = (0.5, np.int8(0)) if x_kind == "float" else (1.0, np.int8(0))
        x = (levels * 0.5).astype(np.float32) if x_kind == "float" else levels.astype(np.int8)
        x_type = TensorProto.FLOAT if x_kind == "float" else TensorProto.INT8
    model = build_model(
        "TernaryConv",
        dict(x_scale=np.float32(x_scale), x_zero_point=zero_point, codes=codes, scales=scales, bias=bias, **extra),
        dict(N=n, weight_shape=[m, cg, r, s], group=group, strides=list(strides), pads=list(pads),
             dilations=list(dilations)),
        list(x.shape), x_type=x_type, constant=not fed_weights,
    )
    feeds = {"X": x}
    if fed_weights:
        feeds.update(codes=codes, scales=scales, bias=bias, **extra)
    want = conv2d_ref(levels.astype(np.float64), weight, None, strides, pads, dilations, group) * x_scale
    return model, feeds, (want + bias[None, :, None, None]).astype(np.float32)


def assert_exact_on_every_path(kernels, model, feeds, want):
    for kernel in kernels:
        got = run_op(model, feeds, kernel, threads=2)
        assert got.shape == want.shape, kernel
        assert np.array_equal(got, want), f"{kernel}: max |diff| {np.max(np.abs(got - want))}"


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize(("cg", "n"), LAYOUTS, ids=[f"cg{cg}-N{n}" for cg, n in LAYOUTS])
def test_narrow_conv_exact(kernels, cg, n, geometry):
    """uint8 scale codes <= 127 (the converter's): the folded form on the SIMD paths, float input."""
    rng = np.random.default_rng(cg * 100 + n)
    assert_exact_on_every_path(kernels, *narrow_case(rng, cg, n, geometry, max_code=127))


@pytest.mark.parametrize("x_kind", ["int8", "uint8"])
@pytest.mark.parametrize("max_code", [255, None], ids=["u8-255", "f32"])
@pytest.mark.parametrize(("cg", "n"), LAYOUTS, ids=[f"cg{cg}-N{n}" for cg, n in LAYOUTS])
def test_narrow_conv_scales_and_inputs(kernels, cg, n, max_code, x_kind):
    """Two folded planes (codes up to 255) or the code path (float scales); 8-bit inputs."""
    rng = np.random.default_rng(cg * 10 + n)
    geometry = GEOMETRIES["7x7 s2 stem"] if cg < 5 else GEOMETRIES["3x3 s2 batch 2"]
    assert_exact_on_every_path(kernels, *narrow_case(rng, cg, n, geometry, max_code, x_kind=x_kind))


@pytest.mark.parametrize("geometry", ["7x7 s2 stem", "3x3 3 groups (direct)"])
@pytest.mark.parametrize(("cg", "n"), [(3, 3), (3, 4), (1, 4)])
def test_narrow_conv_fed_weights(kernels, cg, n, geometry):
    """Weights fed at run time (repacked per call; the direct route regroups them per call too)."""
    rng = np.random.default_rng(cg + n)
    assert_exact_on_every_path(kernels, *narrow_case(rng, cg, n, GEOMETRIES[geometry], 127, fed_weights=True))
