"""The folded int8 form at its extremes, in onnxruntime sessions, on every kernel path this CPU runs.

uint8 scale codes at 127 (one folded plane) or 255 (two planes), every weight of one sign (or rows
alternating), activations at 0 and 255 (uint8 inputs) or -128 and 127 (int8): the worst case for
16-bit pair sums (vpmaddubsw saturates at 2 * 255 * 127). Unit row scale and x_scale: the output is
the integer sum itself (below 2^24 here), so every path must match numpy exactly.
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
    rows_to_conv,
    run_op,
    scales_to_weight,
)

pytestmark = pytest.mark.filterwarnings("ignore")


def extreme_ternary(shape, pattern: str, rng) -> np.ndarray:
    """All +1, rows alternating +1 / -1, or random signs without zeros."""
    if pattern == "plus":
        return np.ones(shape, np.int8)
    if pattern == "alternating":
        signs = np.where(np.arange(shape[0]) % 2 == 0, 1, -1).astype(np.int8)
        return signs.reshape(-1, *[1] * (len(shape) - 1)) * np.ones(shape, np.int8)
    return rng.choice(np.array([-1, 1], np.int8), size=shape)


def extreme_levels(shape, signed: bool, rng) -> np.ndarray:
    """Levels at the ends of the range: half all-high, the rest random high/low."""
    lo, hi = (-128, 127) if signed else (0, 255)
    levels = np.where(rng.random(shape) < 0.5, lo, hi)
    levels.reshape(-1)[: levels.size // 2] = hi
    return levels.astype(np.int8 if signed else np.uint8)


@pytest.mark.parametrize("max_code, n", [(127, 4), (127, 16), (255, 4), (255, 8)])
@pytest.mark.parametrize("cg, rs", [(7, (1, 1)), (17, (1, 1)), (33, (1, 1)), (9, (3, 3)), (28, (3, 3))])
@pytest.mark.parametrize("signed", [False, True])
def test_conv_extremes_exact(kernels, max_code, n, cg, rs, signed):
    rng = np.random.default_rng(cg * 1000 + max_code + n)
    m, (r, s) = 17, rs
    t4 = extreme_ternary((m, cg, r, s), ["plus", "alternating", "random"][cg % 3], rng)
    rows, segments = conv_rows(t4, n)
    codes, groups = pack_weight(rows, n, segments)
    scales = np.full((m, groups.shape[1]), max_code, np.uint8)
    weight = rows_to_conv(scales_to_weight(groups, scales.astype(np.float64), rows.shape[1] // segments, segments),
                          (m, cg, r, s), n)
    x = extreme_levels((2, cg, 6, 5), signed, rng)
    zero_point = np.int8(0) if signed else np.uint8(0)
    model = build_model(
        "TernaryConv",
        dict(x_scale=np.float32(1), x_zero_point=zero_point, codes=codes, scales=scales,
             row_scale=np.ones(m, np.float32)),
        dict(N=n, weight_shape=[m, cg, r, s], pads=[r // 2, s // 2, r // 2, s // 2]),
        list(x.shape),
        x_type=TensorProto.INT8 if signed else TensorProto.UINT8,
    )
    want = conv2d_ref(x.astype(np.float64), weight, None, (1, 1), (r // 2, s // 2, r // 2, s // 2), (1, 1), 1)
    assert np.abs(want).max() < 2**24
    for kernel in kernels:
        assert np.array_equal(run_op(model, {"X": x}, kernel), want.astype(np.float32)), kernel


@pytest.mark.parametrize("max_code, n", [(127, 4), (127, 32), (255, 2), (255, 8)])
@pytest.mark.parametrize("k", [1, 3, 5, 17, 33, 250])
@pytest.mark.parametrize("m", [15, 33])
def test_matmul_extremes_exact(kernels, max_code, n, k, m):
    rng = np.random.default_rng(k * 100 + m + n)
    t = extreme_ternary((m, k), ["plus", "alternating", "random"][k % 3], rng)
    codes, groups = pack_weight(t, n)
    scales = np.full((m, groups.shape[1]), max_code, np.uint8)
    x = extreme_levels((5, k), False, rng)
    model = build_model(
        "TernaryMatMul",
        dict(x_scale=np.float32(1), x_zero_point=np.uint8(0), codes=codes, scales=scales,
             row_scale=np.ones(m, np.float32)),
        dict(N=n, K=k),
        list(x.shape),
        x_type=TensorProto.UINT8,
    )
    weight = scales_to_weight(groups, scales.astype(np.float64), k, 1).astype(np.int64)
    want = (x.astype(np.int64) @ weight.T).astype(np.float32)
    for kernel in kernels:
        assert np.array_equal(run_op(model, {"X": x}, kernel), want), kernel
