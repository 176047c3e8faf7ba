"""The ternary solvers and the group layout, checked without graphs."""

import itertools

import numpy as np
import pytest

from fgq_onnx.ternary import (
    GroupLayout,
    Method,
    dequantize,
    solve_asymmetric,
    solve_exact,
    solve_twn,
    solve_weighted,
    sqnr_db,
    ternarize,
)


def brute_force_error(groups: np.ndarray, asymmetric: bool = False) -> np.ndarray:
    """Least error over all 3^N codes, each with its best scale(s)."""
    n = groups.shape[-1]
    codes = np.array(list(itertools.product([-1, 0, 1], repeat=n)), np.float64)
    w = groups.astype(np.float64)
    energy = (w**2).sum(-1, keepdims=True)
    if not asymmetric:
        dots = w @ codes.T
        support = (codes**2).sum(-1)
        gain = np.where(support > 0, np.maximum(dots, 0) ** 2 / np.maximum(support, 1), 0.0)
    else:  # independent best scale for the +1 and the -1 positions
        pos, neg = (codes > 0).astype(float), (codes < 0).astype(float)
        dp, dn = w @ pos.T, -(w @ neg.T)
        kp, kn = pos.sum(-1), neg.sum(-1)
        gain = np.where(kp > 0, np.maximum(dp, 0) ** 2 / np.maximum(kp, 1), 0) + np.where(kn > 0, np.maximum(dn, 0) ** 2 / np.maximum(kn, 1), 0)
    return (energy - gain.max(-1, keepdims=True))[..., 0]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_exact_matches_brute_force(n):
    rng = np.random.default_rng(n)
    groups = np.concatenate([
        rng.standard_normal((300, n)),
        rng.laplace(size=(100, n)),
        np.round(rng.standard_normal((50, n))),  # ties
        np.zeros((1, n)),
    ]).astype(np.float32)
    codes, scale = solve_exact(groups)
    error = ((groups - dequantize(codes, scale)) ** 2).sum(-1)
    np.testing.assert_allclose(error, brute_force_error(groups), rtol=1e-5, atol=1e-6)
    assert set(np.unique(codes)) <= {-1, 0, 1} and np.all(scale >= 0)


def brute_force_weighted_error(groups: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Least sum h (w - a t)^2 over all 3^N codes, each with its best scale a = max(0, sum h w t / sum h t^2)."""
    n = groups.shape[-1]
    codes = np.array(list(itertools.product([-1, 0, 1], repeat=n)), np.float64)
    w, h = groups.astype(np.float64), importance.astype(np.float64)
    dots = (h * w) @ codes.T
    support = h @ (codes**2).T
    gain = np.where(support > 0, np.maximum(dots, 0) ** 2 / np.where(support > 0, support, 1), 0.0)
    return (h * w**2).sum(-1) - gain.max(-1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_weighted_matches_brute_force(n):
    rng = np.random.default_rng(20 + n)
    groups = np.concatenate([rng.standard_normal((300, n)), np.round(rng.standard_normal((50, n))), np.zeros((1, n))]).astype(np.float32)
    importance = np.exp(rng.uniform(-6, 6, groups.shape)).astype(np.float32)  # mean squares spanning five decades
    importance[:20, 0] = 0.0  # a channel calibration never excited
    codes, scale = solve_weighted(groups, importance)
    error = (importance * (groups - dequantize(codes, scale)) ** 2).sum(-1, dtype=np.float64)
    np.testing.assert_allclose(error, brute_force_weighted_error(groups, importance), rtol=1e-4, atol=1e-6)
    assert set(np.unique(codes)) <= {-1, 0, 1} and np.all(scale >= 0)
    assert not np.any(codes[importance == 0]), "a weight whose error counts for nothing is not kept"


def test_weighted_with_equal_importance_is_exact_and_beats_it_on_its_own_objective():
    rng = np.random.default_rng(3)
    groups = rng.standard_normal((500, 4)).astype(np.float32)
    codes, scale = solve_weighted(groups, np.full(groups.shape, 2.5, np.float32))
    exact_codes, exact_scale = solve_exact(groups)
    np.testing.assert_allclose(dequantize(codes, scale), dequantize(exact_codes, exact_scale), rtol=1e-6, atol=1e-7)
    importance = np.exp(rng.uniform(-4, 4, groups.shape))
    weighted = (importance * (groups - dequantize(*solve_weighted(groups, importance))) ** 2).sum()
    plain = (importance * (groups - dequantize(exact_codes, exact_scale)) ** 2).sum()
    assert weighted < plain


def test_ternarize_weighs_each_input_channel_of_a_conv():
    """Importance broadcast over a Conv weight [O, C, k, k] reaches the groups of its input channels."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    energy = np.exp(rng.uniform(-5, 5, 8)).astype(np.float32)
    layout = GroupLayout(weight.shape, axis=1, n=4)
    got = ternarize(weight, layout, Method.EXACT, energy.reshape(1, 8, 1, 1)).dequantize()
    groups = layout.group(weight)
    want = layout.ungroup(dequantize(*solve_weighted(groups, layout.group(np.broadcast_to(energy.reshape(1, 8, 1, 1), weight.shape)))))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, ternarize(weight, layout, Method.EXACT).dequantize())


@pytest.mark.parametrize("n", [2, 4, 6])
def test_asymmetric_matches_brute_force(n):
    groups = np.random.default_rng(10 + n).standard_normal((300, n)).astype(np.float32)
    codes, pos, neg = solve_asymmetric(groups)
    error = ((groups - dequantize(codes, pos, neg)) ** 2).sum(-1)
    np.testing.assert_allclose(error, brute_force_error(groups, asymmetric=True), rtol=1e-5, atol=1e-6)


def test_twn_follows_its_definition():
    w = np.array([[0.9, -0.1, -1.1, 0.05]], np.float32)
    codes, scale = solve_twn(w, valid=np.array([4]))
    delta = 0.7 * np.abs(w).mean()
    kept = np.abs(w[0]) > delta
    np.testing.assert_array_equal(codes[0], np.sign(w[0]) * kept)
    assert scale[0] == pytest.approx(np.abs(w[0][kept]).mean())


def test_twn_ignores_padding_of_a_short_group():
    w = np.array([[1.0, 0.5, 0.3, 0.0]], np.float32)  # last entry is padding, group length 3
    codes, _ = solve_twn(w, valid=np.array([3]))
    assert codes[0].tolist() == [1, 1, 0, 0]  # delta = 0.7 * 0.6 = 0.42: 0.3 falls below


@pytest.mark.parametrize(("n", "expected"), [(4, {"exact": 0.101, "twn": 0.114, "asymmetric": 0.062}), (64, {"exact": 0.184, "twn": 0.187, "asymmetric": 0.178})])
def test_relative_error_on_gaussian_weights(n, expected):
    """The published orientation figures (ternary-methods notes) within simulation noise."""
    w = np.random.default_rng(0).standard_normal((256, 64 * 16)).astype(np.float32)
    layout = GroupLayout(w.shape, axis=1, n=n)
    for name, figure in expected.items():
        approx = ternarize(w, layout, Method(name)).dequantize()
        relative = ((w - approx) ** 2).sum() / (w**2).sum()
        assert relative == pytest.approx(figure, abs=0.004), name


def test_exact_never_worse_than_twn():
    w = np.random.default_rng(1).standard_normal((64, 4, 3, 3)).astype(np.float32)
    layout = GroupLayout(w.shape, axis=1, n=4)
    exact, twn = (ternarize(w, layout, m).dequantize() for m in (Method.EXACT, Method.TWN))
    assert sqnr_db(w, exact) >= sqnr_db(w, twn)


def test_conv_groups_run_along_input_channels():
    """A group is N consecutive input channels at one (output, r, s)."""
    m, c, r, s = 3, 10, 2, 2
    w = np.arange(m * c * r * s, dtype=np.float32).reshape(m, c, r, s)
    layout = GroupLayout(w.shape, axis=1, n=4)
    groups = layout.group(w)
    assert groups.shape == (m * r * s, 3, 4)
    np.testing.assert_array_equal(groups[0, 0], w[0, 0:4, 0, 0])
    np.testing.assert_array_equal(groups[1, 1], w[0, 4:8, 0, 1])
    np.testing.assert_array_equal(groups[0, 2], [w[0, 8, 0, 0], w[0, 9, 0, 0], 0, 0])  # short, padded
    np.testing.assert_array_equal(layout.ungroup(groups), w)
    assert layout.scale_shape == (m, 3, r, s)
    assert layout.valid_counts().tolist() == [4, 4, 2]


def test_matmul_groups_run_along_inputs_and_rows_are_outputs():
    w = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)  # MatMul B: [K, M]
    layout = GroupLayout(w.shape, axis=0, n=4)
    groups = layout.group(w)
    np.testing.assert_array_equal(groups[2, 1], w[4:8, 2])
    assert layout.rows == 3 and layout.rows_view(groups).shape == (3, 3, 4)
    np.testing.assert_array_equal(layout.ungroup(groups), w)


def test_flattened_depthwise_groups_stay_inside_one_filter():
    w = np.random.default_rng(2).standard_normal((5, 1, 3, 3)).astype(np.float32)
    layout = GroupLayout(w.shape, axis=1, n=4, flatten=True)
    groups = layout.group(w)
    assert groups.shape == (5, 3, 4)
    np.testing.assert_array_equal(groups[1].ravel()[:9], w[1].ravel())
    np.testing.assert_array_equal(layout.ungroup(groups), w)


def test_scales_tensor_matches_blocked_dequantize_semantics():
    """scales_to_tensor puts scale (m, g, r, s) where a blocked DequantizeLinear looks for it."""
    w = np.random.default_rng(3).standard_normal((4, 6, 3, 2)).astype(np.float32)
    layout = GroupLayout(w.shape, axis=1, n=4)
    t = ternarize(w, layout, Method.EXACT)
    codes = layout.ungroup(t.codes)
    scales = layout.scales_to_tensor(t.scale)
    blocked = np.repeat(scales, 4, axis=1)[:, :6]  # DequantizeLinear with block_size=4 on axis 1
    np.testing.assert_allclose(codes * blocked, t.dequantize(), rtol=0, atol=0)


def test_sqnr_of_exact_copy_is_infinite():
    w = np.ones((2, 2), np.float32)
    assert sqnr_db(w, w) == float("inf")
