"""Token orders: where each image token sits in the attention sequence, which decides what an arrow band holds.

In raster order an arrow head's band is a horizontal strip of whole rows; along a space-filling curve ("morton":
Z-order, "hilbert") a stretch of the sequence is a compact 2-D region, so the band becomes a 2-D neighbourhood at
the same cost. Host-side numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TOKEN_ORDERS", "image_token_order"]

TOKEN_ORDERS = ("raster", "morton", "hilbert")


def _interleave_bits(v: np.ndarray) -> np.ndarray:
    """Spread the bits of v (< 2**16) apart: bit i moves to bit 2i."""
    v = v.astype(np.uint64)
    for shift, mask in ((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def _hilbert_index(side: int, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Position of each (row, col) along the Hilbert curve over a side x side grid (side a power of two)."""
    x, y, d = col.astype(np.int64), row.astype(np.int64), np.zeros(row.shape, np.int64)
    s = side // 2
    while s > 0:
        rx, ry = (x & s) > 0, (y & s) > 0
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant so the sub-curve starts where the parent curve enters it
        flip = ~ry & rx
        x, y = np.where(flip, side - 1 - x, x), np.where(flip, side - 1 - y, y)
        x, y = np.where(~ry, y, x), np.where(~ry, x, y)
        s //= 2
    return d


def image_token_order(name: str, rows: int, cols: int) -> np.ndarray | None:
    """The order in which image tokens sit in the attention sequence, as raster indices (None for "raster").

    Full heads compute the same function in any order (the model is equivariant to it: positions travel with the
    tokens). Grids that are not a power-of-two square follow the curve of the enclosing one, skipping missing cells.
    """
    if name not in TOKEN_ORDERS:
        raise ValueError(f"token_order {name!r}: expected one of {TOKEN_ORDERS}")
    if name == "raster":
        return None
    row, col = np.divmod(np.arange(rows * cols), cols)
    if name == "morton":
        key = (_interleave_bits(row) << np.uint64(1)) | _interleave_bits(col)
    else:
        key = _hilbert_index(1 << max(rows - 1, cols - 1, 1).bit_length(), row, col)
    return np.argsort(key, kind="stable").astype(np.int32)
