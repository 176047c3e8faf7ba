"""Ternary weight math: group layout and the per-group solvers, in plain numpy.

A weight is cut into groups of N consecutive values along its reduction axis
(docs/packed-format.md). Each solver maps groups [..., N] to codes in
{-1, 0, +1} and one scale per group (two for the asymmetric solver) so that
a * t approximates w.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import numpy as np


class Method(str, enum.Enum):
    """How group codes and scales are chosen."""

    EXACT = "exact"  # the least-squares optimum per group, one scale
    TWN = "twn"  # threshold 0.7 * mean|w| (Li & Liu 2016), the classic baseline
    ASYMMETRIC = "asymmetric"  # exact optimum per sign, a scale for + and one for -
    FIT = "fit"  # exact, then codes and scales refitted to calibration outputs (fgq_onnx/fitting.py)
    BLOCK = "block"  # fit, and layers closing a residual branch refitted to the block output (fgq_onnx/blockwise.py)

    @property
    def fits(self) -> bool:
        """Whether codes and scales are fitted to calibration data (after the exact solution)."""
        return self in (Method.FIT, Method.BLOCK)


@dataclass(frozen=True)
class GroupLayout:
    """Where the groups of a weight tensor lie.

    The weight (reshaped to [shape[0], -1] first when `flatten`) has its
    reduction along `axis`. Moving that axis last gives segments of length L;
    each is padded with zeros to G_seg * N and cut into G_seg groups.
    """

    shape: tuple[int, ...]
    axis: int
    n: int
    flatten: bool = False

    @property
    def work_shape(self) -> tuple[int, ...]:
        return (self.shape[0], int(np.prod(self.shape[1:]))) if self.flatten else self.shape

    @property
    def length(self) -> int:
        """L: the reduction length of one segment."""
        return self.work_shape[self.axis]

    @property
    def groups_per_segment(self) -> int:
        return -(-self.length // self.n)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the scales in the (possibly flattened) weight's own axis order."""
        shape = list(self.work_shape)
        shape[self.axis] = self.groups_per_segment
        return tuple(shape)

    @property
    def rows(self) -> int:
        """M: output rows, the first axis that is not the reduction."""
        return next(d for i, d in enumerate(self.work_shape) if i != self.axis)

    def valid_counts(self) -> np.ndarray:
        """How many real (unpadded) weights each group of a segment holds."""
        counts = np.full(self.groups_per_segment, self.n)
        counts[-1] = self.length - self.n * (self.groups_per_segment - 1)
        return counts

    def group(self, weight: np.ndarray) -> np.ndarray:
        """Weight of `shape` -> groups [S, G_seg, N], zero padded."""
        moved = np.moveaxis(weight.reshape(self.work_shape), self.axis, -1)
        segments = moved.reshape(-1, self.length)
        padded = np.zeros((segments.shape[0], self.groups_per_segment * self.n), segments.dtype)
        padded[:, : self.length] = segments
        return padded.reshape(segments.shape[0], self.groups_per_segment, self.n)

    def ungroup(self, groups: np.ndarray) -> np.ndarray:
        """Inverse of group: [S, G_seg, N] -> weight of `shape`."""
        moved_shape = list(self.work_shape)
        moved_shape.append(moved_shape.pop(self.axis))
        segments = groups.reshape(groups.shape[0], -1)[:, : self.length]
        return np.moveaxis(segments.reshape(moved_shape), -1, self.axis).reshape(self.shape)

    def scales_to_tensor(self, scales: np.ndarray) -> np.ndarray:
        """Group scales [S, G_seg] -> `scale_shape`, as a blocked DequantizeLinear wants."""
        moved_shape = list(self.scale_shape)
        moved_shape.append(moved_shape.pop(self.axis))
        return np.moveaxis(scales.reshape(moved_shape), -1, self.axis)

    def rows_view(self, groups: np.ndarray) -> np.ndarray:
        """[S, G_seg, ...] -> [M, G, ...]: the custom-op row order (segments of a row are adjacent)."""
        return groups.reshape(self.rows, -1, *groups.shape[2:])


def solve_exact(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares optimum per group: min ||w - a t||^2 over a >= 0, t in {-1,0,1}^N.

    For a support of k weights the best choice keeps the k largest |w|; the
    error left is ||w||^2 - S_k^2 / k, so k* = argmax_k S_k^2 / k and
    a = S_k* / k*. Zero padding never enters the support (it only lowers S_k^2/k).
    """
    magnitude = np.abs(groups)
    order = np.argsort(-magnitude, axis=-1, kind="stable")
    sorted_mag = np.take_along_axis(magnitude, order, axis=-1).astype(np.float64)
    prefix = np.cumsum(sorted_mag, axis=-1)
    k_range = np.arange(1, groups.shape[-1] + 1)
    best_k = np.argmax(prefix**2 / k_range, axis=-1) + 1
    scale = np.take_along_axis(prefix, best_k[..., None] - 1, axis=-1)[..., 0] / best_k
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(k_range - 1, order.shape), axis=-1)
    codes = (np.sign(groups) * (rank < best_k[..., None])).astype(np.int8)
    return codes, scale.astype(np.float32)


def solve_weighted(groups: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares optimum per group: min sum_i h_i (w_i - a t_i)^2 over a >= 0, t in {-1,0,1}^N.

    With h_i = E[x_i^2], the mean square of the input weight i multiplies,
    this is the layer's output error when inputs are uncorrelated, instead
    of the weight error: an input channel whose activations are 100x larger
    weighs 10^4x more. For a given a, weight i joins the support exactly when
    h_i (|w_i| - a)^2 < h_i w_i^2, i.e. |w_i| > a / 2 (h_i > 0): the optimum
    keeps the k largest |w| as before, only the choice of k and the scale
    change: a = P_k / Q_k and the error left is sum h w^2 - P_k^2 / Q_k, with
    P_k = sum over the support of h |w| and Q_k = sum of h. Weights with
    h_i = 0 (padding) add nothing to either and are never kept.
    """
    magnitude = np.abs(groups)
    order = np.argsort(-magnitude, axis=-1, kind="stable")
    sorted_mag = np.take_along_axis(magnitude, order, axis=-1).astype(np.float64)
    sorted_h = np.take_along_axis(np.asarray(importance, np.float64), order, axis=-1)
    p = np.cumsum(sorted_h * sorted_mag, axis=-1)
    q = np.cumsum(sorted_h, axis=-1)
    gain = np.divide(p**2, q, out=np.zeros_like(p), where=q > 0)
    best_k = np.argmax(gain, axis=-1) + 1
    p_best = np.take_along_axis(p, best_k[..., None] - 1, axis=-1)[..., 0]
    q_best = np.take_along_axis(q, best_k[..., None] - 1, axis=-1)[..., 0]
    scale = np.divide(p_best, q_best, out=np.zeros_like(p_best), where=q_best > 0)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(groups.shape[-1]), order.shape), axis=-1)
    kept = (rank < best_k[..., None]) & (np.asarray(importance) > 0) & (scale[..., None] > 0)
    codes = (np.sign(groups) * kept).astype(np.int8)
    return codes, scale.astype(np.float32)


def solve_twn(groups: np.ndarray, valid: np.ndarray, ratio: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """TWN: threshold ratio * mean|w| over the group's real weights, scale = mean of kept |w|."""
    magnitude = np.abs(groups)
    delta = ratio * magnitude.sum(axis=-1) / valid
    kept = magnitude > delta[..., None]
    count = kept.sum(axis=-1)
    scale = np.where(count > 0, (magnitude * kept).sum(axis=-1) / np.maximum(count, 1), 0.0)
    return (np.sign(groups) * kept).astype(np.int8), scale.astype(np.float32)


def solve_asymmetric(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact optimum with separate scales for positive and negative weights.

    The squared error splits by sign, so the exact solver on max(w, 0) and on
    max(-w, 0) gives the joint optimum. Returns codes, positive and negative scales.
    """
    pos_codes, pos_scale = solve_exact(np.maximum(groups, 0))
    neg_codes, neg_scale = solve_exact(np.maximum(-groups, 0))
    return (pos_codes - neg_codes).astype(np.int8), pos_scale, neg_scale


def dequantize(codes: np.ndarray, pos_scale: np.ndarray, neg_scale: np.ndarray | None = None) -> np.ndarray:
    """Group codes [..., N] and scales [...] back to float weights."""
    neg_scale = pos_scale if neg_scale is None else neg_scale
    scale = np.where(codes > 0, pos_scale[..., None], neg_scale[..., None])
    return (codes * scale).astype(np.float32)


@dataclass(frozen=True)
class TernaryWeight:
    """A ternarized weight: codes [S, G_seg, N] and scales [S, G_seg] in `layout`."""

    layout: GroupLayout
    codes: np.ndarray
    scale: np.ndarray
    neg_scale: np.ndarray | None = None  # only for the asymmetric method

    def dequantize(self) -> np.ndarray:
        return self.layout.ungroup(dequantize(self.codes, self.scale, self.neg_scale))

    def sqnr_db(self, weight: np.ndarray, dtype: np.dtype = np.dtype(np.float32)) -> float:
        """SQNR of the decoded weight, rounded to `dtype` as the graph computes it, against `weight`.

        Works on the groups a chunk at a time (zero padding adds nothing to
        signal or noise), so a large weight needs no full-size float copies.
        """
        groups = self.layout.group(np.asarray(weight, dtype=np.float32))
        signal = noise = 0.0
        for part in _chunks(len(groups), groups.shape[1] * groups.shape[2]):
            neg = None if self.neg_scale is None else self.neg_scale[part]
            decoded = dequantize(self.codes[part], self.scale[part], neg).astype(dtype).astype(np.float32)
            noise += float(np.sum((groups[part] - decoded) ** 2, dtype=np.float64))
            signal += float(np.sum(np.square(groups[part]), dtype=np.float64))
        if noise == 0.0:
            return float("inf")
        return float(10.0 * np.log10(max(signal, 1e-30) / noise))


# Weights per solver call: the solvers' temporaries (int64 ranks, float64 sums) take ~40 bytes a weight.
_CHUNK_WEIGHTS = 1 << 21


def _chunks(count: int, weights_per_item: int) -> list[slice]:
    step = max(1, _CHUNK_WEIGHTS // max(1, weights_per_item))
    return [slice(start, start + step) for start in range(0, count, step)]


def ternarize(weight: np.ndarray, layout: GroupLayout, method: Method, importance: np.ndarray | None = None) -> TernaryWeight:
    """Ternarize a weight tensor group by group with the chosen solver, a bounded chunk of segments at a time.

    `importance` (broadcastable to the weight's shape, >= 0): for the exact
    solver (and the fits, which start from it), how much each weight's error
    counts, e.g. the mean square of the input it multiplies (solve_weighted).
    """
    groups = layout.group(np.asarray(weight, dtype=np.float32))
    if importance is not None and (method is Method.EXACT or method.fits):
        weights = layout.group(np.broadcast_to(np.asarray(importance, np.float32), layout.shape))
        parts = [solve_weighted(groups[part], weights[part]) for part in _chunks(len(groups), groups.shape[1] * groups.shape[2])]
        return TernaryWeight(layout, *(np.concatenate(arrays) for arrays in zip(*parts)))
    if method is Method.EXACT or method.fits:  # fitting starts from exact; the data-aware part needs calibration data
        solve = solve_exact
    elif method is Method.TWN:
        solve = functools.partial(solve_twn, valid=layout.valid_counts())
    elif method is Method.ASYMMETRIC:
        solve = solve_asymmetric
    else:
        raise ValueError(f"unknown method {method!r}")
    parts = [solve(groups[part]) for part in _chunks(len(groups), groups.shape[1] * groups.shape[2])]
    return TernaryWeight(layout, *(np.concatenate(arrays) for arrays in zip(*parts)))


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(||w||^2 / ||w - w_hat||^2)."""
    noise = float(np.sum((reference - approximation) ** 2, dtype=np.float64))
    signal = float(np.sum(np.square(reference), dtype=np.float64))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(signal, 1e-30) / noise))
