"""Weights that are already ternary: recognise them and store them without loss.

Models trained ternary (TTQ, TWN, BitNet-style) export float weights that
take three values {-a_n, 0, +a_p} per tensor, per output row or per group,
possibly different per row after a BatchNorm or a scale Mul was folded in.
Fitting such a weight again can only lose accuracy, so the converter keeps
its own codes and scales instead.

A weight counts as ternary in a layout when, in every group, its positive
values agree to RTOL of the group's largest |w| and so do its negative ones
(anything within RTOL of zero is a 0 code). Per-tensor and per-row ternary
weights are special cases. Scales are the mean of the values they replace,
so values that agree bit for bit are reproduced bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fgq_onnx.scales import StoredScales, row_axis, store_scales
from fgq_onnx.ternary import GroupLayout, TernaryWeight

RTOL = 1e-6  # a few float32 ulps: rounding, not a real difference between weights


@dataclass(frozen=True)
class AlreadyTernary:
    """A detected weight: its exact ternary form and how its scales vary."""

    weight: TernaryWeight
    granularity: str  # "per tensor", "per row" or "per group": the coarsest that holds
    asymmetric: bool  # +a_p and -a_n differ somewhere

    def describe(self) -> str:
        return f"{self.granularity}, {'asymmetric' if self.asymmetric else 'symmetric'}"


def _sign_scale(groups: np.ndarray, mask: np.ndarray, tolerance: np.ndarray) -> np.ndarray | None:
    """Mean |w| over `mask` per group (0 where empty), or None when those values disagree beyond tolerance."""
    magnitude = np.abs(groups)
    high = np.where(mask, magnitude, -np.inf).max(axis=-1)
    low = np.where(mask, magnitude, np.inf).min(axis=-1)
    count = mask.sum(axis=-1)
    if np.any((count > 0) & (high - low > tolerance)):
        return None
    total = np.where(mask, magnitude, 0.0).sum(axis=-1, dtype=np.float64)
    return (total / np.maximum(count, 1)).astype(np.float32)


def _granularity(layout: GroupLayout, scales: list[np.ndarray], codes: np.ndarray) -> str:
    """The coarsest level at which the scales in use are constant."""
    per_tensor = per_row = True
    for sign, scale in zip((1, -1), scales):
        used = layout.rows_view((codes == sign).any(axis=-1))  # [M, G]
        rows = layout.rows_view(scale)
        high = np.where(used, rows, -np.inf).max(axis=1)
        low = np.where(used, rows, np.inf).min(axis=1)
        present = used.any(axis=1)
        per_row &= bool(np.all(high[present] == low[present]))
        per_tensor &= bool(np.unique(rows[used]).size <= 1)
    return "per tensor" if per_tensor else "per row" if per_row else "per group"


def _first_row(weight: np.ndarray, layout: GroupLayout) -> tuple[np.ndarray, GroupLayout]:
    """Output row 0 of `weight` (a copy of one row) and its layout: a float weight fails there already."""
    work = weight.reshape(layout.work_shape)
    row = np.take(work, [0], axis=row_axis(layout))
    return row, GroupLayout(row.shape, layout.axis, layout.n)


def detect(weight: np.ndarray, layout: GroupLayout) -> AlreadyTernary | None:
    """The exact ternary form of `weight` in `layout`, or None if it is not ternary there."""
    if layout.rows > 1 and _detect_groups(*_first_row(np.asarray(weight), layout)) is None:
        return None  # without grouping (copying) the whole weight
    return _detect_groups(weight, layout)


def _detect_groups(weight: np.ndarray, layout: GroupLayout) -> AlreadyTernary | None:
    groups = layout.group(np.asarray(weight, dtype=np.float32))
    largest = np.abs(groups).max(axis=-1, keepdims=True)
    if not np.all(np.isfinite(largest)) or not np.any(largest > 0):
        return None
    tolerance = RTOL * largest
    codes = (np.sign(groups) * (np.abs(groups) > tolerance)).astype(np.int8)
    positive = _sign_scale(groups, codes > 0, tolerance[..., 0])
    negative = _sign_scale(groups, codes < 0, tolerance[..., 0])
    if positive is None or negative is None:
        return None
    both = (codes > 0).any(axis=-1) & (codes < 0).any(axis=-1)
    asymmetric = bool(np.any(both & (positive != negative)))
    if not asymmetric:  # one scale per group: whichever sign is present
        ternary = TernaryWeight(layout, codes, np.maximum(positive, negative))
    else:
        ternary = TernaryWeight(layout, codes, positive, negative)
    return AlreadyTernary(ternary, _granularity(layout, [positive, negative], codes), asymmetric)


def _row_constant_u8(scales: np.ndarray, layout: GroupLayout) -> StoredScales | None:
    """uint8 scales with row_scale = the row's single non-zero scale and q in {0, 1}, if every row has one."""
    rows = layout.rows_view(scales)
    row_scale = rows.max(axis=1).astype(np.float32)
    if not np.all((rows == 0) | (rows == row_scale[:, None])):
        return None
    q = (rows > 0).astype(np.uint8)
    return StoredScales("u8", q.reshape(scales.shape), row_scale, (q * row_scale[:, None]).reshape(scales.shape).astype(np.float32))


def store_exact(ternary: TernaryWeight, scale_format: str) -> tuple[list[StoredScales], str]:
    """Stored scales that decode to exactly `ternary`'s, in `scale_format` if it can, else float32; and a note.

    u8 is exact when each row has one non-zero scale (it becomes the row
    scale, codes 0/1) or when the usual max/127 rounding happens to be exact;
    f16 when the scales are float16 values.
    """
    layout = ternary.layout
    exact = [s for s in (ternary.scale, ternary.neg_scale) if s is not None]
    stored = [(_row_constant_u8(s, layout) if scale_format == "u8" else None) or store_scales(s, layout, scale_format) for s in exact]
    if scale_format != "f32" and not all(np.array_equal(s.decoded, e) for s, e in zip(stored, exact)):
        return [store_scales(s, layout, "f32") for s in exact], f"{scale_format} scales would round these: stored as f32"
    return stored, ""
