"""Streaming histograms and the range methods, against direct computations."""

import numpy as np
import pytest

from fgq_onnx.calibration import AbsHistogram, CalibMethod, threshold


def stream(chunks, bins=2048):
    hist = AbsHistogram(bins)
    for chunk in chunks:
        hist.update(chunk)
    return hist


def test_growing_range_keeps_every_sample_and_the_extremes():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal(1000) * scale for scale in (0.01, 1.0, 50.0, 3.0)]
    hist = stream(chunks)
    data = np.concatenate(chunks)
    assert hist.count == data.size
    assert hist.min == pytest.approx(data.min()) and hist.max == pytest.approx(data.max())
    assert hist.width * hist.counts.size > np.abs(data).max()
    # The merged histogram equals a direct one over the final bins.
    direct = np.bincount(np.minimum((np.abs(data) / hist.width).astype(int), hist.counts.size - 1), minlength=hist.counts.size)
    assert np.abs(direct - hist.counts).sum() <= 0.01 * data.size  # float rounding at bin edges only


def test_memory_does_not_grow_with_samples():
    hist = AbsHistogram(256)
    for seed in range(50):
        hist.update(np.random.default_rng(seed).standard_normal(10_000))
    assert hist.counts.shape == (256,)


def test_minmax_is_the_largest_magnitude():
    hist = stream([np.array([-7.5, 0.1, 3.0])])
    assert threshold(hist, CalibMethod.MINMAX, 127) == 7.5


def test_percentile_matches_numpy():
    data = np.random.default_rng(1).standard_normal(200_000).astype(np.float32)
    hist = stream([data])
    got = threshold(hist, CalibMethod.PERCENTILE, 127, percentile=99.0)
    assert got == pytest.approx(np.percentile(np.abs(data), 99.0), rel=0.01)


def quantization_mse(data, high, levels):
    step = high / levels
    return np.mean((np.clip(np.round(np.abs(data) / step), 0, levels) * step - np.abs(data)) ** 2)


@pytest.mark.parametrize("levels", [15, 127])
def test_mse_threshold_is_near_the_brute_force_optimum(levels):
    data = np.random.default_rng(2).laplace(size=100_000).astype(np.float32)
    hist = stream([data])
    got = threshold(hist, CalibMethod.MSE, levels)
    candidates = np.linspace(0.05, np.abs(data).max(), 400)
    best = min(quantization_mse(data, c, levels) for c in candidates)
    assert quantization_mse(data, got, levels) <= 1.05 * best
    assert got < np.abs(data).max()  # heavy tails: clipping beats minmax


def test_entropy_clips_outliers_but_keeps_the_bulk():
    rng = np.random.default_rng(3)
    data = np.concatenate([rng.standard_normal(100_000), [80.0]]).astype(np.float32)
    got = threshold(stream([data]), CalibMethod.ENTROPY, 127)
    assert 2.0 < got < 40.0


def test_all_zero_tensor_has_zero_range():
    assert threshold(stream([np.zeros(10)]), CalibMethod.MSE, 127) == 0.0


def test_non_finite_activations_are_refused():
    from fgq_onnx.errors import FgqError

    with pytest.raises(FgqError, match="non-finite"):
        AbsHistogram().update(np.array([1.0, np.nan]))
