"""Tile schedule of head-wise attention: which key tiles each query tile visits.

This module is the single definition of the masked function that
:func:`pallas_kernels.headwise_attention` computes.  The kernel calls
:func:`kv_tile_ranges` on scalars inside the Pallas kernel body, the dense
reference expands it to a token mask (:func:`dense_mask`), and the cost model
(:func:`pallas_kernels.plan_cost`) sums it with numpy.  Everything here is plain
elementwise integer arithmetic written against an array namespace ``xp``
(``numpy`` or ``jax.numpy``), so the three users share one piece of code.

Tokens are tiled along the sequence: query tile ``qt`` holds tokens
``[qt*BQ, (qt+1)*BQ)`` and key tile ``kt`` holds ``[kt*BK, (kt+1)*BK)``, clipped
to ``tokens`` (the last tile of each may be partial; its missing tokens are
padding and are masked exactly).  The image region is ``[text_len, tokens)``
when ``text_first`` (FLUX) and ``[0, tokens - text_len)`` otherwise (SD3).

Head window ``w`` (one int32 per head):

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
  band is the smallest tile-aligned superset of the nominal band: image query
  ``i`` sees every image key ``j`` with ``|i - j| <= w`` and more (at most
  ``BQ - 1 + BK - 1`` extra keys on each side).  This is the reference
  kernel's band (DiTFastAttnV2: ``floor((j*BM - w)/BN) .. ceil(((j+1)*BM + w)/BN)``
  clamped to the image) made exact for partial tiles and either token order.

For every (query tile, head) the visited key tiles are two disjoint half-open
ranges ``[t0, t1)`` and ``[b0, b1)`` of key-tile indices (either may be
empty); for a full tile ``[t0, t1) = [0, n_k)`` and the second is empty.
The kernel runs one loop per range, so no score needs masking except the
key padding of the last (partial) key tile.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "num_tiles",
    "image_region",
    "text_key_tile_range",
    "query_tile_has_text",
    "kv_tile_ranges",
    "tile_visit_matrix",
    "dense_mask",
    "rotate_text_tiles_first",
]


def num_tiles(tokens: int, block: int) -> int:
    """Number of tiles of ``block`` tokens covering ``tokens`` (last may be partial)."""
    return -(-tokens // block)


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


def kv_tile_ranges(qt, w, *, tokens: int, text_len: int, text_first: bool, block_q: int, block_k: int, xp=np):
    """Key-tile ranges visited by query tile ``qt`` of a head with window ``w``.

    ``qt`` and ``w`` are integer scalars or broadcastable arrays (numpy or jax,
    int32); ``xp`` is the matching namespace.  Returns ``(t0, t1, b0, b1)``, each
    of the broadcast shape, meaning the half-open key-tile ranges ``[t0, t1)``
    and ``[b0, b1)`` (disjoint, ``t0 <= t1``, ``b0 <= b1``).  ``w < 0``: full,
    ``w == 0``: cached (nothing), ``w > 0``: arrow (see the module docstring).
    """
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


def tile_visit_matrix(head_window, *, tokens: int, text_len: int, text_first: bool, block_q: int, block_k: int, xp=np):
    """Boolean ``[..., H, n_q, n_k]``: does query tile ``qt`` visit key tile ``kt``."""
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
        xp=xp,
    )
    kt = xp.arange(nk, dtype=xp.int32)
    return ((kt >= t0) & (kt < t1)) | ((kt >= b0) & (kt < b1))


def dense_mask(head_window, *, tokens: int, text_len: int, text_first: bool, block_q: int, block_k: int, xp=np):
    """Boolean token mask ``[..., H, tokens, tokens]`` (query, key) of the
    function the kernel computes: visited tiles expanded to tokens."""
    vis = tile_visit_matrix(
        head_window, tokens=tokens, text_len=text_len, text_first=text_first, block_q=block_q, block_k=block_k, xp=xp
    )
    qi = xp.arange(tokens) // block_q
    ki = xp.arange(tokens) // block_k
    return vis[..., qi, :][..., :, ki]
