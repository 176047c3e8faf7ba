"""Bias (and variance) correction numerics: per-channel output statistics of a layer.

Ternarizing a layer moves the mean of each output channel and, because the
least-squares ternary weight is a shrunken projection of the fp32 one, also
lowers its spread; through ReLUs and a few layers the shrinkage compounds
(measured on the embedded ResNet: output std at N=64 falls to ~0.5x by the
last stage, to ~0.005x at the logits once only the mean is corrected).
So each corrected layer gets an affine fix per output channel,

    y' = gain * (y_q - b) + b + shift,   gain = std_fp / std_q,
    shift = mean_fp - gain * (mean_q - b) - b

with b the layer's bias, so that the converted layer's output has the fp32
layer's mean and standard deviation on the calibration data. `gain` is
folded into the group scales (every group lies inside one output channel, so
this is exact) and `shift` into the bias. With gain fixed at 1 this is plain
bias correction: shift = mean_fp - mean_q.

Statistics are streamed per channel (count, mean, squared deviations), so memory
does not grow with the number of samples. Plain numpy, no graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ChannelMoments:
    """Running per-channel count, mean and variance of a tensor, over every other axis.

    Batches are merged with Chan et al.'s pairwise update (mean and sum of
    squared deviations), so a large mean does not cancel a small variance.
    """

    def __init__(self, axis: int):
        self.axis = axis
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.dtype not in (np.float32, np.float64):
            array = array.astype(np.float32)
        axis = self.axis % array.ndim
        view = array.reshape(int(np.prod(array.shape[:axis])), array.shape[axis], -1)  # [lead, C, rest], no copy
        n = view.shape[0] * view.shape[2]
        if n == 0:
            return
        # sums over `rest` stay in the data's float type (pairwise, accurate), across `lead` in float64
        mean = view.sum(axis=2).sum(axis=0, dtype=np.float64) / n
        deviation = view - mean.astype(view.dtype)[None, :, None]
        m2 = np.square(deviation).sum(axis=2).sum(axis=0, dtype=np.float64)
        m2 -= np.square(deviation.sum(axis=2).sum(axis=0, dtype=np.float64)) / n  # the rounding of `mean` to the data type
        m2 = np.maximum(m2, 0.0)
        if self._mean is None:
            self._mean, self._m2, self.count = mean, m2, n
            return
        if mean.shape != self._mean.shape:
            raise ValueError(f"channel count changed from {self._mean.shape[0]} to {mean.shape[0]}")
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + np.square(delta) * (self.count * n / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        if not self.count:
            raise ValueError("no data was seen")
        return self._mean

    @property
    def std(self) -> np.ndarray:
        if not self.count:
            raise ValueError("no data was seen")
        return np.sqrt(self._m2 / self.count)


@dataclass(frozen=True)
class AffineCorrection:
    """Per output channel: multiply the (bias-free) output by `gain`, add `shift` to the bias."""

    gain: np.ndarray
    shift: np.ndarray


def affine_correction(fp: ChannelMoments, q: ChannelMoments, bias: np.ndarray | float = 0.0, *, scale: bool = True, max_gain: float = 4.0) -> AffineCorrection:
    """The gain and bias shift that give the converted layer the fp32 layer's per-channel mean (and std).

    `fp` and `q` hold statistics of the layer's output (bias included) in the
    fp32 and in the converted model; `bias` is the layer's own bias per channel.
    The gain is clipped to [1/max_gain, max_gain] and left at 1 for channels
    the converted model leaves (nearly) constant, where a ratio means nothing.
    """
    bias = np.broadcast_to(np.asarray(bias, np.float64), fp.mean.shape)
    gain = np.ones_like(fp.mean)
    if scale:
        std_q, std_fp = q.std, fp.std
        alive = std_q > 1e-6 * max(float(std_q.max(initial=0.0)), 1e-30)
        gain[alive] = np.clip(std_fp[alive] / std_q[alive], 1.0 / max_gain, max_gain)
    shift = fp.mean - gain * (q.mean - bias) - bias
    return AffineCorrection(gain.astype(np.float32), shift.astype(np.float32))
