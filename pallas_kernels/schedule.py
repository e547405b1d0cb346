"""Tile schedule of head-wise attention: which key tiles each query tile visits.

This module is the single definition of the masked function that
:func:`pallas_kernels.headwise_attention` computes, whatever the backend.  The
Triton kernel calls :func:`kv_tile_ranges` on scalars inside its body, the XLA
backend expands it to a token mask (:func:`dense_mask`), and the cost model
(:func:`pallas_kernels.plan_cost`) sums it with numpy.  Everything here is plain
elementwise integer arithmetic written against an array namespace ``xp``
(``numpy`` or ``jax.numpy``), so all users share one piece of code.

Two tilings of the sequence appear here:

* the **band** ``(band_q, band_k)``: the granularity at which the arrow band is
  defined.  It is part of the computed function (plans are calibrated under
  it); :func:`default_band` gives the default per ``head_dim``;
* the **execution tiles** ``(block_q, block_k)``: what a backend runs.  They
  must divide the band; the function does not depend on them.

Query tile ``qt`` of size ``BQ`` holds tokens ``[qt*BQ, (qt+1)*BQ)`` and key
tile ``kt`` of size ``BK`` holds ``[kt*BK, (kt+1)*BK)``, clipped to ``tokens``
(the last tile of each may be partial; its missing tokens are padding and are
masked exactly).  The image region is ``[text_len, tokens)`` when
``text_first`` (FLUX) and ``[0, tokens - text_len)`` otherwise (SD3).

Head window ``w`` (one int32 per head), stated for band tiles
(``BQ, BK = band``):

* ``w == -1`` (any ``w < 0``) **full**: every query tile visits every key tile.
* ``w == 0`` **cached**: nothing is visited; the output is the cache.
* ``w > 0`` **arrow**:

  - a query tile holding at least one text query visits every key tile (full);
  - an image-only query tile with image rows ``i_lo..i_hi`` (0-based within the
    image region) visits

    1. the *text key tiles*: every key tile holding at least one text key, and
    2. the *band tiles*: the key tiles that hold at least one image key of the
       nominal band ``[i_lo - w, i_hi + w]`` (clipped to the image), i.e. the
       tile range ``[(img0 + max(i_lo - w, 0)) // BK,
       (img0 + min(i_hi + w, n_img - 1)) // BK]`` inclusive, minus text tiles.

  Inside a visited tile every (non-padding) key is attended to, so the computed
  band is the smallest band-tile-aligned superset of the nominal band: image
  query ``i`` sees every image key ``j`` with ``|i - j| <= w`` and more (at
  most ``BQ - 1 + BK - 1`` extra keys on each side).  This is the reference
  kernel's band (DiTFastAttnV2: ``floor((j*BM - w)/BN) .. ceil(((j+1)*BM + w)/BN)``
  clamped to the image) made exact for partial tiles and either token order.

Execution tiles that divide the band visit exactly the band tiles' tokens:
execution query tile ``qt`` uses the ranges of band query tile
``(qt*block_q) // band_q``, each band key tile spanning ``band_k // block_k``
execution key tiles.

For every (query tile, head) the visited key tiles are two disjoint half-open
ranges ``[t0, t1)`` and ``[b0, b1)`` of key-tile indices (either may be
empty); for a full tile ``[t0, t1) = [0, n_k)`` and the second is empty.
A kernel runs one loop per range, so no score needs masking except the
key padding of the last (partial) key tile.

**Padding tokens.** A caller may carry a sequence padded to a multiple of 8
tokens (what Mosaic GPU's TMA needs) and declare its last ``padding < 8``
tokens padding.  They belong to the region they end (the text when text is
last, the image otherwise; :func:`padded_text_len`), so every tile and range
is the same as for the unpadded sequence, and no query attends to them
(:func:`dense_mask`, the kernels' last key tile).  Their own rows are computed
like the other rows of their region.
"""

from __future__ import annotations

import types

import numpy as np

__all__ = [
    "DEFAULT_BAND",
    "default_band",
    "check_band",
    "num_tiles",
    "query_rows",
    "image_region",
    "text_key_tile_range",
    "query_tile_has_text",
    "kv_tile_ranges",
    "tile_visit_matrix",
    "dense_mask",
    "rotate_text_tiles_first",
    "padded_text_len",
]


# head_dim -> (band_q, band_k).  Frozen: plans of schema v1 were calibrated
# under exactly this table (it equals the H100 tiles of the Triton kernel).
DEFAULT_BAND = types.MappingProxyType(
    {
        16: (128, 64),
        32: (128, 64),
        64: (128, 64),
        128: (128, 128),
        256: (64, 64),
    }
)


def default_band(head_dim: int) -> tuple[int, int]:
    """``(band_q, band_k)`` used when the caller passes ``band=None``."""
    if head_dim in DEFAULT_BAND:
        return DEFAULT_BAND[head_dim]
    raise ValueError(f"head_dim={head_dim} is not supported: expected one of {sorted(DEFAULT_BAND)}")


def check_band(band, block_q: int, block_k: int) -> tuple[int, int]:
    """The band of execution tiles ``(block_q, block_k)``: ``band``, or the
    tiles themselves when ``band`` is None.  Raises ValueError unless the tiles
    divide the band."""
    if band is None:
        return block_q, block_k
    band_q, band_k = (int(b) for b in band)
    if band_q % block_q or band_k % block_k:
        raise ValueError(
            f"execution tiles (block_q, block_k) = ({block_q}, {block_k}) must divide "
            f"the band (band_q, band_k) = ({band_q}, {band_k})"
        )
    return band_q, band_k


def num_tiles(tokens: int, block: int) -> int:
    """Number of tiles of ``block`` tokens covering ``tokens`` (last may be partial)."""
    return -(-tokens // block)


def query_rows(query_tiles, *, tokens: int, band_q: int, xp=np):
    """bool ``[tokens]``: the rows of the band query tiles marked in ``query_tiles`` (``[num_tiles(tokens,
    band_q)]``)."""
    return xp.repeat(xp.asarray(query_tiles, bool), band_q)[:tokens]


def padded_text_len(text_len: int, text_first: bool, padding: int) -> int:
    """The text length the schedule uses when the last ``padding`` tokens are padding: they extend the region
    they end (the text when text is last; the image, whose length the schedule derives, otherwise)."""
    return text_len if text_first else text_len + padding


def image_region(tokens: int, text_len: int, text_first: bool) -> tuple[int, int]:
    """Global token range ``[img0, img1)`` of the image tokens."""
    return (text_len, tokens) if text_first else (0, tokens - text_len)


def text_key_tile_range(tokens: int, text_len: int, text_first: bool, block_k: int) -> tuple[int, int]:
    """Key tiles ``[t0, t1)`` holding at least one text key (static ints).

    Without text the range is empty and sits where the text would be
    (``(0, 0)`` for text first, ``(n_k, n_k)`` for text last)."""
    nk = num_tiles(tokens, block_k)
    if text_len <= 0:
        return (0, 0) if text_first else (nk, nk)
    if text_first:
        return (0, num_tiles(text_len, block_k))
    return ((tokens - text_len) // block_k, nk)


def query_tile_has_text(qt, *, tokens: int, text_len: int, text_first: bool, block_q: int, xp=np):
    """True where query tile ``qt`` holds at least one text query."""
    if text_len <= 0:
        return xp.zeros_like(qt, dtype=bool)
    q_lo = qt * block_q
    q_hi = xp.minimum(q_lo + block_q, tokens) - 1  # last real query of the tile
    if text_first:
        return q_lo < text_len
    return q_hi >= tokens - text_len


def kv_tile_ranges(
    qt, w, *, tokens: int, text_len: int, text_first: bool, block_q: int, block_k: int, band=None, xp=np
):
    """Key-tile ranges visited by execution query tile ``qt`` of a head with window ``w``.

    ``qt`` and ``w`` are integer scalars or broadcastable arrays (numpy or jax,
    int32); ``xp`` is the matching namespace.  Returns ``(t0, t1, b0, b1)``, each
    of the broadcast shape, meaning the half-open ranges ``[t0, t1)`` and
    ``[b0, b1)`` of execution key tiles (``block_k`` tokens; disjoint,
    ``t0 <= t1``, ``b0 <= b1``).  ``w < 0``: full, ``w == 0``: cached
    (nothing), ``w > 0``: arrow (see the module docstring).  ``band``:
    ``(band_q, band_k)``, divisible by the execution tiles; None means the
    execution tiles themselves.
    """
    band_q, band_k = check_band(band, block_q, block_k)
    rq, rk = band_q // block_q, band_k // block_k
    qt = xp.asarray(qt)
    band_qt = qt if rq == 1 else qt // rq
    ranges = _band_tile_ranges(
        band_qt, w, tokens=tokens, text_len=text_len, text_first=text_first, block_q=band_q, block_k=band_k, xp=xp
    )
    if rk == 1:
        return ranges
    nk = num_tiles(tokens, block_k)
    return tuple(xp.minimum(r * rk, nk) for r in ranges)


def _band_tile_ranges(qt, w, *, tokens: int, text_len: int, text_first: bool, block_q: int, block_k: int, xp):
    """:func:`kv_tile_ranges` of band query tile ``qt`` in band key tiles (``block_* = band_*``)."""
    nk = num_tiles(tokens, block_k)
    img0, img1 = image_region(tokens, text_len, text_first)
    n_img = img1 - img0
    tt0, tt1 = text_key_tile_range(tokens, text_len, text_first, block_k)

    qt = xp.asarray(qt)
    w = xp.asarray(w)
    zero = xp.zeros_like(qt) + xp.zeros_like(w)  # broadcast shape, int dtype

    full = (w < 0) | (
        (w > 0)
        & query_tile_has_text(qt, tokens=tokens, text_len=text_len, text_first=text_first, block_q=block_q, xp=xp)
    )
    arrow = (w > 0) & ~full

    # Band of the tile's image rows, clipped to the image (w clipped first so
    # that i_hi + w cannot overflow int32).
    wc = xp.minimum(xp.maximum(w, 0), max(n_img, 1))
    q_lo = qt * block_q
    q_hi = xp.minimum(q_lo + block_q, tokens) - 1
    i_lo = xp.maximum(q_lo - img0, 0)
    i_hi = xp.maximum(q_hi - img0, 0)
    k_lo = img0 + xp.maximum(i_lo - wc, 0)
    k_hi = img0 + xp.maximum(xp.minimum(i_hi + wc, n_img - 1), 0)
    b0 = k_lo // block_k
    b1 = k_hi // block_k + 1
    # Remove the text key tiles (they are visited by the first range).
    if text_first:
        b0 = xp.maximum(b0, tt1)
    else:
        b1 = xp.minimum(b1, tt0)
    b1 = xp.maximum(b1, b0)

    t0 = xp.where(full, zero, xp.where(arrow, zero + tt0, zero))
    t1 = xp.where(full, zero + nk, xp.where(arrow, zero + tt1, zero))
    b0 = xp.where(arrow, b0 + zero, zero)
    b1 = xp.where(arrow, b1 + zero, zero)
    return t0, t1, b0, b1


def rotate_text_tiles_first(tokens: int, text_len: int, text_first: bool, block_q: int) -> int:
    """Static rotation ``r`` such that query tile ``(i + r) % n_q`` for
    ``i = 0, 1, ...`` visits the tiles holding text queries (the heavy ones of an
    arrow head) first.  Used by the kernel to order its grid."""
    nq = num_tiles(tokens, block_q)
    if text_first or text_len <= 0:
        return 0
    return ((tokens - text_len) // block_q) % nq


def tile_visit_matrix(
    head_window, *, tokens: int, text_len: int, text_first: bool, block_q: int, block_k: int, band=None, xp=np
):
    """Boolean ``[..., H, n_q, n_k]``: does execution query tile ``qt`` visit
    execution key tile ``kt`` (``band`` as in :func:`kv_tile_ranges`)."""
    nq = num_tiles(tokens, block_q)
    nk = num_tiles(tokens, block_k)
    hw = xp.asarray(head_window).astype(xp.int32)
    qt = xp.arange(nq, dtype=xp.int32)
    t0, t1, b0, b1 = kv_tile_ranges(
        qt[:, None],
        hw[..., None, None],
        tokens=tokens,
        text_len=text_len,
        text_first=text_first,
        block_q=block_q,
        block_k=block_k,
        band=band,
        xp=xp,
    )
    kt = xp.arange(nk, dtype=xp.int32)
    return ((kt >= t0) & (kt < t1)) | ((kt >= b0) & (kt < b1))


def dense_mask(head_window, *, tokens: int, text_len: int, text_first: bool, band, padding: int = 0, xp=np):
    """Boolean token mask ``[..., H, tokens, tokens]`` (query, key) of the
    function computed under ``band = (band_q, band_k)``: visited band tiles
    expanded to tokens (the same for any execution tiles dividing the band),
    without the last ``padding`` keys (``text_len`` as the schedule takes it,
    :func:`padded_text_len`)."""
    band_q, band_k = (int(b) for b in band)
    vis = tile_visit_matrix(
        head_window, tokens=tokens, text_len=text_len, text_first=text_first, block_q=band_q, block_k=band_k, xp=xp
    )
    qi = xp.arange(tokens) // band_q
    ki = xp.arange(tokens) // band_k
    mask = vis[..., qi, :][..., :, ki]
    return mask & (xp.arange(tokens) < tokens - padding) if padding else mask
