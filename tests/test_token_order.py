"""Token orders: space-filling curves over the image-token grid, and what an arrow band holds along them (CPU)."""

import numpy as np
import pytest

from ditfa_jax.cli import TOKEN_ORDER_CHOICES
from ditfa_jax.token_order import TOKEN_ORDERS, image_token_order
from pallas_kernels.schedule import dense_mask


def _grid_positions(order, cols):
    return np.stack(np.divmod(np.asarray(order), cols), axis=-1)


def test_image_token_order_curves():
    assert set(TOKEN_ORDER_CHOICES) == set(TOKEN_ORDERS)
    assert image_token_order("raster", 4, 6) is None
    for rows, cols in ((16, 16), (6, 10), (64, 96), (1, 5)):
        for name in ("hilbert", "morton"):
            order = image_token_order(name, rows, cols)
            assert order.dtype == np.int32 and sorted(order.tolist()) == list(range(rows * cols)), (name, rows, cols)
    steps = np.abs(np.diff(_grid_positions(image_token_order("hilbert", 16, 16), 16), axis=0)).sum(-1)
    assert (steps == 1).all()  # the Hilbert curve moves to a grid neighbour at every step
    z = _grid_positions(image_token_order("morton", 8, 8), 8)
    for start in range(0, 64, 4):  # every aligned run of 4 Z-order tokens is a 2x2 square
        block = z[start:start + 4]
        assert np.ptp(block[:, 0]) == 1 and np.ptp(block[:, 1]) == 1
    with pytest.raises(ValueError, match="token_order 'snake'"):
        image_token_order("snake", 4, 4)


def test_arrow_band_along_a_curve_is_a_2d_neighbourhood():
    """The keys an image query of an arrow head sees, in image coordinates: a strip of whole rows in raster order, a
    compact region along the Hilbert curve (same count of tiles, so the same cost)."""
    rows = cols = 32
    n_img, text_len, block = rows * cols, 64, 64  # text fills whole tiles: no image key rides in a text tile
    mask = dense_mask(np.array([64]), tokens=n_img + text_len, text_len=text_len, text_first=True,
                      band=(block, block))[0]
    img_mask = mask[text_len:, text_len:]
    query = n_img // 2 + cols // 2  # an image token near the centre, by sequence position
    raster_seen = np.flatnonzero(img_mask[query])
    order = image_token_order("hilbert", rows, cols)
    hilbert_seen = order[img_mask[query]]  # sequence positions -> raster indices
    assert len(hilbert_seen) == len(raster_seen)
    width = lambda idx: np.ptp(idx % cols) + 1  # noqa: E731
    height = lambda idx: np.ptp(idx // cols) + 1  # noqa: E731
    assert width(raster_seen) == cols and height(raster_seen) <= len(raster_seen) // cols + 1
    assert width(hilbert_seen) < cols and height(hilbert_seen) < rows
    # here: 192 keys in a 6 x 32 strip (raster) vs a 16 x 16 box (Hilbert); the query's grid neighbours are inside
    q = order[query]
    neighbours = [q - 1, q + 1, q - cols, q + cols]
    assert np.isin(neighbours, hilbert_seen).sum() >= 3
