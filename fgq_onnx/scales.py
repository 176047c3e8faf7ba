"""How group scales are stored: float32, float16, or uint8 codes under a per-row float32 scale.

docs/packed-format.md ("Packed tensors", `scales`) defines the three forms.
`store_scales` rounds the solver's scales to one of them and returns both the
stored arrays and the exact float32 values they decode to; the converter
builds its weights from those decoded values, so the portable (qdq) graph, the
custom-op graph and the report all see the same numbers.

uint8: `row_scale[m] = max_g a[m, g] / 127` (float32) and
`q = round(a / row_scale)`, codes 0..127. Seven bits, not eight, because
then every `t * q` fits an int8: the custom-op kernels fold the codes into
the ternary weights and run a layer as one exact int8 GEMM with one float
per row (docs/custom-ops.md, "Folded scales"). Measured on the embedded
model (exact method, full test set, N = 4/16/64, 8- and 4-bit activations),
127 instead of 255 levels changes top-1 by at most 0.2 points either way and
the weight SQNR by 0.001 dB. For fixed ternary codes the squared error of a
group is `k * (a - a_stored)^2 + const` (k: its non-zero codes), so the nearest
code is the least-squares choice given the row scale. Re-choosing the codes for
the rounded scales, or refitting the row scale, gains < 0.001 dB of weight
SQNR on the embedded Fashion-MNIST model (u8 loses at most 0.0007 dB against
float32 per layer there), so neither is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fgq_onnx.errors import FgqError
from fgq_onnx.ternary import GroupLayout

SCALE_FORMATS = ("f32", "f16", "u8")
U8_LEVELS = 127  # largest code: t * q must fit an int8 (see above)


@dataclass(frozen=True)
class StoredScales:
    """One set of group scales as stored, in the solver's [S, G_seg] order.

    `values` is float32, float16 or uint8 (the codes q); `row_scale` is
    float32 [M] for uint8 and None otherwise; `decoded` is float32 [S, G_seg],
    bit-exactly what the stored form decodes to (uint8: float32(q) * row_scale,
    one float32 multiply, as DequantizeLinear computes it).
    """

    format: str
    values: np.ndarray
    row_scale: np.ndarray | None
    decoded: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + (self.row_scale.nbytes if self.row_scale is not None else 0))


def store_scales(scales: np.ndarray, layout: GroupLayout, scale_format: str) -> StoredScales:
    """Round group scales [S, G_seg] (>= 0, finite) to `scale_format`: "f32", "f16" or "u8"."""
    scales = np.asarray(scales, dtype=np.float32)
    if scale_format == "f32":
        return StoredScales("f32", scales, None, scales.copy())
    if scale_format == "f16":
        if scales.size and float(scales.max()) > float(np.finfo(np.float16).max):
            raise FgqError("a group scale overflows float16 (> 65504): use --scale-format u8 or f32")
        values = scales.astype(np.float16)  # round to nearest even; scales under ~6e-5 lose precision, under 3e-8 become 0
        decoded = values.astype(np.float32)
        return StoredScales("f16", values, None, decoded)
    if scale_format == "u8":
        rows = layout.rows_view(scales)  # [M, G]
        row_scale = (rows.max(axis=1) / np.float32(U8_LEVELS)).astype(np.float32)
        safe = np.where(row_scale > 0, row_scale, np.float32(1))[:, None]
        q = np.clip(np.rint(rows / safe), 0, U8_LEVELS).astype(np.uint8)  # an all-zero row keeps q = 0
        decoded = (q.astype(np.float32) * row_scale[:, None]).astype(np.float32)
        return StoredScales("u8", q.reshape(scales.shape), row_scale, decoded.reshape(scales.shape))
    raise ValueError(f"scale format must be one of {', '.join(SCALE_FORMATS)}, got {scale_format!r}")


def row_axis(layout: GroupLayout) -> int:
    """The output-row axis of the (possibly flattened) weight: where row_scale runs in the graph."""
    return next(i for i in range(len(layout.work_shape)) if i != layout.axis)
