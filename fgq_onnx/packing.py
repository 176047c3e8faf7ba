"""The packed 2-bit ternary layout (docs/packed-format.md), in numpy.

Codes are 2-bit two's complement, as ONNX INT2: 0 -> 00, +1 -> 01, -1 -> 11.
Four codes a byte, the first in the least significant bits; each row of a
packed matrix starts on a byte boundary.
"""

from __future__ import annotations

import numpy as np

INVALID_CODE = 0b10


def pack_rows(ternary: np.ndarray) -> np.ndarray:
    """Pack an [M, L] array of {-1, 0, +1} into uint8 [M, ceil(L / 4)]."""
    ternary = np.asarray(ternary)
    if ternary.ndim != 2:
        raise ValueError(f"pack_rows takes a 2-D array, got shape {ternary.shape}")
    if ternary.size and (np.abs(ternary).max() > 1):
        raise ValueError("pack_rows takes values in {-1, 0, +1} only")
    rows, length = ternary.shape
    padded = np.zeros((rows, -(-length // 4) * 4), dtype=np.uint8)
    padded[:, :length] = ternary.astype(np.int8).view(np.uint8) & 0b11
    quads = padded.reshape(rows, -1, 4)
    return (quads[..., 0] | quads[..., 1] << 2 | quads[..., 2] << 4 | quads[..., 3] << 6).astype(np.uint8)


def unpack_rows(packed: np.ndarray, length: int) -> np.ndarray:
    """Inverse of pack_rows: uint8 [M, B] -> int8 [M, length]; rejects the invalid code."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] * 4 < length:
        raise ValueError(f"packed shape {packed.shape} cannot hold rows of {length} codes")
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    codes = ((packed[..., None] >> shifts) & 0b11).reshape(packed.shape[0], -1)[:, :length]
    if np.any(codes == INVALID_CODE):
        raise ValueError("packed weights hold the invalid 2-bit code 0b10")
    return np.where(codes == 0b11, -1, codes).astype(np.int8)
