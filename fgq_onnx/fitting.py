"""Data-aware ternary fitting (TSQ-style): group codes and scales fitted to a layer's outputs.

For one output row with fp32 weights w and inputs X (im2col columns for Conv)
from calibration data, the ternary row s = sum_g a_g t_g should reproduce
w^T X, not w itself:

    min_s ||X^T (w - s)||^2  =  s^T H s - 2 s^T b + const,   H = X X^T, b = H w

(damped: H += lambda * mean(diag H) * I). With the fp32 model's inputs X_fp
for the same samples the target becomes the fp32 layer on fp32 inputs,
||X_fp^T w - X^T s||^2, i.e. b = X X_fp^T w: the fit then also absorbs the
error that the converted layers upstream left in X. Starting, per row, from the
better of the exact per-group solution (the weight-space optimum) and the one
weighted by diag(H) (ternary.solve_weighted), `fit_rows` alternates

- a scale step: with the codes fixed the objective is quadratic in the G
  group scales of a row; one Gauss-Seidel sweep sets each scale to its exact
  minimiser given the others (flipping the codes of a group whose scale comes
  out negative);
- a code step: one sweep of coordinate descent, each weight choosing the best
  of {-1, 0, +1} times its group's scale given all the others;

and never accepts a step that raises the objective, so the objective is
monotone and the result is never worse than `exact` on it.

H is shared by every row that sees the same inputs: all output channels of a
Conv see the same patches. For Gemm/MatMul and whole-filter groups it is the
full d x d. For a Conv with groups along input channels it is the full
(R*S*C) x (R*S*C) in (r, s, c) order when the caller asks (`joint`, for
filters small enough: cross-tap terms matter, neighbouring pixels being
strongly correlated), else block-diagonal, one C x C block per kernel tap
(memory and time ~1/(R*S) of the full matrix). Plain numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fgq_onnx.ternary import solve_exact, solve_weighted


@dataclass
class FitResult:
    codes: np.ndarray  # [rows, G, N] int8
    scales: np.ndarray  # [rows, G] float32, >= 0
    history: list[float] = field(default_factory=list)  # objective after init and after every step

    @property
    def improvement(self) -> float:
        """Objective drop, relative to the exact solution's."""
        return 1.0 - self.history[-1] / self.history[0] if self.history and self.history[0] else 0.0


def _accumulate(total: np.ndarray | None, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """total + a b^T per block ([blocks, width, columns] each); float32 BLAS per batch, float64 across batches."""
    gram = np.stack([x @ y.T for x, y in zip(a, b)]).astype(np.float64)  # 2-D BLAS calls: batched matmul with a transpose is not
    return gram if total is None else total + gram


def damp(h: np.ndarray, damping: float = 0.01) -> np.ndarray:
    """H + damping * mean(diag H) * I: keeps rarely excited inputs from steering the fit."""
    h = np.array(h, np.float64)
    mean_diag = float(np.mean(np.diag(h))) if h.size else 0.0
    h[np.diag_indices_from(h)] += damping * (mean_diag if mean_diag > 0 else 1.0)
    return h


def objective(s: np.ndarray, h: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: s^T H s - 2 s^T b, for s and b [rows, L], H [L, L]."""
    return np.sum((s @ h) * s, axis=1) - 2.0 * np.sum(s * b, axis=1)


def _rows_of(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return (codes * scales[..., None]).reshape(codes.shape[0], -1).astype(np.float64)


def _scale_step(codes: np.ndarray, scales: np.ndarray, h: np.ndarray, b: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One Gauss-Seidel sweep over a row's group scales: each the exact minimiser given the others.

    The objective is quadratic in a_g: the step is -t_g^T r_g / (t_g^T H_gg t_g)
    with r = H s - b. A scale that comes out negative flips its group's codes.
    As in the code step, the gradient outside the current block of groups is
    brought up to date once per block. Cost about rows * L^2 per sweep, in
    BLAS (a joint G x G solve per row would be rows * G^3).
    """
    rows, groups, n = codes.shape
    codes, scales = codes.copy(), scales.astype(np.float64).copy()
    residual = _rows_of(codes, scales) @ h - b
    per_block = max(1, block // n)
    for first in range(0, groups, per_block):
        last = min(first + per_block, groups)
        cols = slice(first * n, last * n)
        local = residual[:, cols].copy()
        h_local = h[cols, cols]
        moved_by = np.zeros((rows, (last - first) * n))
        for g in range(first, last):
            part = slice((g - first) * n, (g - first + 1) * n)
            t = codes[:, g, :].astype(np.float64)  # [rows, N]
            ht = np.einsum("rn,nl->rl", t, h_local[part, :])  # (H t_g)^T within the block; inner size N: einsum, not threaded BLAS
            curvature = np.sum(ht[:, part] * t, axis=1)
            slope = np.sum(t * local[:, part], axis=1)
            step = np.divide(-slope, curvature, out=np.zeros(rows), where=curvature > 0)
            local += step[:, None] * ht
            moved_by[:, part] = step[:, None] * t
            new = scales[:, g] + step
            codes[:, g, :] = np.where((new < 0)[:, None], -codes[:, g, :], codes[:, g, :])
            scales[:, g] = np.abs(new)
        if moved_by.any():
            residual += moved_by @ h[cols, :]
    return codes.astype(np.int8), scales


def _code_step(codes: np.ndarray, scales: np.ndarray, h: np.ndarray, b: np.ndarray, valid: np.ndarray, block: int = 64) -> np.ndarray:
    """One coordinate-descent sweep over the weights of all rows at once (rows share H).

    Sequential in the weights, but the gradient outside the current block of
    `block` weights is brought up to date once per block (one BLAS product)
    instead of after every weight; the result is the same.
    """
    rows, groups, n = codes.shape
    codes = codes.copy()
    flat = codes.reshape(rows, -1)
    residual = _rows_of(codes, scales) @ h - b  # gradient / 2 of the objective
    scale_of = np.repeat(scales.astype(np.float64), n, axis=1)
    diag = np.diag(h)
    candidates = np.array([-1, 0, 1], np.int8)
    every = np.arange(rows)
    for start in range(0, flat.shape[1], block):
        stop = min(start + block, flat.shape[1])
        local = residual[:, start:stop].copy()
        h_local = h[start:stop, start:stop]
        moved_by = np.zeros((rows, stop - start))
        for j, i in enumerate(range(start, stop)):
            if not valid[i]:
                continue
            delta = scale_of[:, i, None] * (candidates[None, :] - flat[:, i, None])  # [rows, 3]
            gain = 2.0 * delta * local[:, j, None] + delta**2 * diag[i]
            best = np.argmin(gain, axis=1)
            moved = gain[every, best] < 0.0
            if not moved.any():
                continue
            step = np.where(moved, delta[every, best], 0.0)
            flat[:, i] = np.where(moved, candidates[best], flat[:, i])
            local += step[:, None] * h_local[j][None, :]
            moved_by[:, j] = step
        if moved_by.any():
            residual += moved_by @ h[start:stop, :]
    return codes


def _best_start(groups: np.ndarray, h: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the better on the objective of two closed-form starts: the exact per-group solution
    and the one weighted by diag(H) (each input's mean square, ternary.solve_weighted: exact for
    uncorrelated inputs). Returns codes, scales and the objective per row."""
    starts = [solve_exact(groups), solve_weighted(groups, np.diag(h).reshape(groups.shape[1:])[None])]
    values = [objective(_rows_of(codes, scales.astype(np.float64)), h, b) for codes, scales in starts]
    weighted_better = values[1] < values[0]
    codes = np.where(weighted_better[:, None, None], starts[1][0], starts[0][0]).astype(np.int8)
    scales = np.where(weighted_better[:, None], starts[1][1], starts[0][1]).astype(np.float64)
    return codes, scales, np.where(weighted_better, values[1], values[0])


def fit_rows(weights: np.ndarray, h: np.ndarray, n: int, *, b: np.ndarray | None = None, iterations: int = 4, init: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
    """Fit ternary groups of N to rows `weights` [rows, L] that all see inputs with (damped) H [L, L].

    The objective per row is s^T H s - 2 s^T b with b = H w by default (the
    fp32 row on the same inputs); pass `b` [rows, L] for another target (e.g.
    the fp32 row on fp32 inputs: b = w C^T with C = X X_fp^T). Groups run
    along the row in runs of N, the last one zero padded (padding stays
    zero). `init` = (codes [rows, G, N], scales [rows, G]) defaults to the
    better per row of the exact and the diag(H)-weighted per-group solutions
    (_best_start). Every step is kept only where it lowers a row's
    objective, so `history` (total objective) never increases.
    """
    rows, length = weights.shape
    groups = -(-length // n)
    padded = groups * n
    w = np.zeros((rows, padded))
    w[:, :length] = weights
    hp = np.zeros((padded, padded))
    hp[:length, :length] = h
    valid = np.arange(padded) < length
    if b is None:
        b = w @ hp
    else:
        b = np.concatenate([np.asarray(b, np.float64), np.zeros((rows, padded - length))], axis=1)
    if init is None:
        codes, scales, current = _best_start(w.reshape(rows, groups, n).astype(np.float32), hp, b)
    else:
        codes, scales = init[0].astype(np.int8), init[1].astype(np.float64)
        current = objective(_rows_of(codes, scales), hp, b)
    history = [float(current.sum())]
    for _ in range(iterations):
        for step in ("scale", "codes"):
            if step == "scale":
                new_codes, new_scales = _scale_step(codes, scales, hp, b)
            else:
                new_codes, new_scales = _code_step(codes, scales, hp, b, valid), scales
            value = objective(_rows_of(new_codes, new_scales), hp, b)
            better = value < current
            codes = np.where(better[:, None, None], new_codes, codes)
            scales = np.where(better[:, None], new_scales, scales)
            current = np.where(better, value, current)
            history.append(float(current.sum()))
        if len(history) > 3 and history[-3] - history[-1] <= 1e-9 * abs(history[0]):
            break
    return FitResult(codes.astype(np.int8), scales.astype(np.float32), history)


# -- input statistics -----------------------------------------------------------------


class PatchGram:
    """Streamed H blocks of a layer's input.

    `kernel` = None: inputs are rows [.., d] (Gemm/MatMul) and H is d x d.
    Otherwise a Conv input [B, C, *spatial] with the given kernel geometry:
    `per_tap` keeps one C x C block per kernel tap (groups along channels),
    else one (C * taps) x (C * taps) block in (c, tap) order (whole-filter groups).
    `joint` (groups along channels) keeps the full (taps * C) x (taps * C)
    matrix in (tap, c) order instead of the per-tap blocks: the cross-tap
    terms (neighbouring pixels are strongly correlated) enter the fit, at
    taps^2 times the memory.
    Given the fp32 model's input for the same samples too (`update(x, x_fp)`),
    it also keeps the cross blocks C = X X_fp^T and F = X_fp X_fp^T, for the
    target w^T X_fp (the fp32 layer on fp32 inputs) instead of w^T X.
    Given a target for the layer's output instead (`update(x, target=t)`, t
    shaped like the layer's bias-free output), it keeps T = X t^T
    ([blocks, width, outputs]) and the target's energy, for the objective
    ||X^T s - t||^2 (fgq_onnx/blockwise.py), at the same sampled columns.
    """

    def __init__(self, kernel=None, strides=None, dilations=None, pads=None, per_tap: bool = True, max_columns: int = 4096, joint: bool = False):
        self.kernel, self.per_tap, self.joint, self.max_columns = kernel, per_tap, joint, max_columns
        rank = len(kernel) if kernel else 0
        self.strides = tuple(strides or (1,) * rank)
        self.dilations = tuple(dilations or (1,) * rank)
        self.pads = tuple(pads or (0,) * (2 * rank))
        self.h: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.fp: np.ndarray | None = None
        self.toward: np.ndarray | None = None
        self.target_energy = 0.0
        self.columns = 0

    def _columns(self, x: np.ndarray) -> np.ndarray:
        """[blocks, width, columns], contiguous."""
        x = np.asarray(x, np.float32)
        if self.kernel is None:
            cols = x.reshape(-1, x.shape[-1])
            return np.ascontiguousarray(cols[:: max(1, len(cols) // self.max_columns)].T)[None]
        patches = self._patches(x)  # [taps, C, columns]
        if self.joint:
            patches = patches.reshape(1, -1, patches.shape[2])
        elif not self.per_tap:
            patches = patches.transpose(1, 0, 2).reshape(1, -1, patches.shape[2])
        return np.ascontiguousarray(patches)

    def update(self, x: np.ndarray, x_fp: np.ndarray | None = None, target: np.ndarray | None = None) -> None:
        cols = self._columns(x)
        self.h = _accumulate(self.h, cols, cols)
        if x_fp is not None:
            cols_fp = self._columns(x_fp)
            self.cross = _accumulate(self.cross, cols, cols_fp)
            self.fp = _accumulate(self.fp, cols_fp, cols_fp)
        if target is not None:
            outputs = self._output_columns(x, target)
            self.toward = _accumulate(self.toward, cols, np.broadcast_to(outputs, (len(cols), *outputs.shape)))
            self.target_energy += float(np.sum(np.square(outputs, dtype=np.float64)))
        self.columns += cols.shape[2]

    def output_shape(self, x: np.ndarray, outputs: int) -> tuple[int, ...]:
        """The shape of the layer's output on input `x`, for `outputs` output channels."""
        if self.kernel is None:
            return (*x.shape[:-1], outputs)
        return (x.shape[0], outputs, *self._picks(x)[1])

    def _output_columns(self, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        """The target's values [outputs, columns] at the columns _columns(x) samples."""
        target = np.asarray(target, np.float32)
        if target.shape != self.output_shape(x, target.shape[-1 if self.kernel is None else 1]):
            raise ValueError(f"a target of shape {target.shape} does not match the layer's output on inputs of shape {x.shape}")
        if self.kernel is None:
            rows = target.reshape(-1, target.shape[-1])
            return np.ascontiguousarray(rows[:: max(1, len(rows) // self.max_columns)].T)
        where, _ = self._picks(x)
        return np.ascontiguousarray(target[(where[0], slice(None), *where[1:])].T)

    def _picks(self, x: np.ndarray) -> tuple[tuple[np.ndarray, ...], list[int]]:
        """Evenly spaced (sample, output position) columns, at most max_columns, and the output's spatial size."""
        spatial, rank = x.shape[2:], x.ndim - 2
        pads = list(zip(self.pads[:rank], self.pads[rank:]))
        out = [(size + b + e - d * (k - 1) - 1) // s + 1 for size, (b, e), k, s, d in zip(spatial, pads, self.kernel, self.strides, self.dilations)]
        total = x.shape[0] * int(np.prod(out))
        picks = np.arange(0, total, max(1, -(-total // self.max_columns)))
        return np.unravel_index(picks, (x.shape[0], *out)), out

    def _patches(self, x: np.ndarray) -> np.ndarray:
        rank = x.ndim - 2
        padded = np.pad(x, [(0, 0), (0, 0), *zip(self.pads[:rank], self.pads[rank:])])
        where, _ = self._picks(x)
        taps = []
        for offset in np.ndindex(*self.kernel):
            index = tuple(p * s + o * d for p, s, o, d in zip(where[1:], self.strides, offset, self.dilations))
            taps.append(padded[(where[0], slice(None), *index)].T)  # [C, columns], only the picked columns copied
        return np.stack(taps)
