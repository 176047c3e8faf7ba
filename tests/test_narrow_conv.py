"""Convs with fewer input channels per group than N (stems, depthwise): the grouping chosen, against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fgq_onnx.passes.ternarize_weights import TERNARY_MARK, TernarizeWeightsPass
from fgq_onnx.ternary import GroupLayout, Method, ternarize
from ir_models import make_model, run

RNG = np.random.default_rng(3)
N = 4


def brute_force_error(groups: np.ndarray) -> float:
    """Least squared error of a * t over every t in {-1, 0, 1}^n and the best a >= 0, summed over groups [..., n]."""
    codes = np.array([t for t in itertools.product((-1.0, 0.0, 1.0), repeat=groups.shape[-1]) if any(t)])  # t = 0 adds no gain
    flat = groups.reshape(-1, groups.shape[-1]).astype(np.float64)
    dots = flat @ codes.T  # best a for t: max(w.t, 0) / |t|^2, leaving |w|^2 - max(w.t, 0)^2 / |t|^2
    gain = np.max(np.maximum(dots, 0.0) ** 2 / np.sum(codes**2, axis=1), axis=1)
    return float(np.sum(np.sum(flat**2, axis=1) - gain))


def grouped(weight: np.ndarray, n: int, whole_filter: bool) -> np.ndarray:
    layout = GroupLayout(weight.shape, axis=1, n=n, flatten=whole_filter)
    return layout.group(weight)


@pytest.mark.parametrize("channels, group, kernel", [(1, 1, 3), (3, 1, 3), (2, 1, 1), (8, 8, 3), (6, 2, 3), (3, 1, 5)],
                         ids=["stem1", "stem3", "narrow_1x1", "depthwise", "grouped2", "stem3_5x5"])
def test_narrow_conv_takes_the_grouping_brute_force_ranks_best(channels, group, kernel):
    per_group = channels // group
    outputs = channels if group > 1 else 4
    weight = RNG.standard_normal((outputs, per_group, kernel, kernel)).astype(np.float32)
    weight[:, :, 0, 0] *= 4.0  # an uneven filter, as trained stems have
    text = f"g (float[1,{channels},7,7] x) => (float[1,{outputs},{8 - kernel},{8 - kernel}] y) {{ y = Conv <group = {group}> (x, w) }}"
    model = make_model(text, {"w": weight})
    ternary_pass = TernarizeWeightsPass(N, Method.EXACT)
    ternary_pass(model)
    record = ternary_pass.records[0]

    whole = brute_force_error(grouped(weight, N, whole_filter=True))
    per_tap = brute_force_error(grouped(weight, per_group, whole_filter=False))
    expected_n = per_group if per_tap < whole else N
    assert record.n == expected_n
    assert f"n={expected_n} " in model.graph.node(-1).metadata_props[TERNARY_MARK]
    layout = GroupLayout(weight.shape, axis=1, n=expected_n, flatten=expected_n == N)
    decoded = ternarize(weight, layout, Method.EXACT).dequantize()
    np.testing.assert_allclose(np.sum((weight - decoded).astype(np.float64) ** 2), min(whole, per_tap), rtol=1e-4, atol=1e-9)
    x = RNG.standard_normal((1, channels, 7, 7)).astype(np.float32)
    reference = make_model(text, {"w": decoded})  # the converted graph computes with exactly those weights
    np.testing.assert_allclose(run(model, {"x": x})[0], run(reference, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_wide_conv_keeps_channel_groups_of_n():
    weight = RNG.standard_normal((4, 8, 3, 3)).astype(np.float32)
    model = make_model("g (float[1,8,5,5] x) => (float[1,4,3,3] y) { y = Conv (x, w) }", {"w": weight})
    ternary_pass = TernarizeWeightsPass(N)
    ternary_pass(model)
    assert ternary_pass.records[0].n == N and ternary_pass.records[0].grouping == "input channels"
