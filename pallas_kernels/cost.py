"""Cost of a head-wise attention plan, from the tile schedule (host, numpy)."""

from __future__ import annotations

import dataclasses

import numpy as np

from pallas_kernels import schedule
from pallas_kernels._validate import check_block, resolve_band

__all__ = ["PlanCost", "plan_cost"]


@dataclasses.dataclass(frozen=True)
class PlanCost:
    """Attention cost of a plan; per-head arrays have the plan's shape ``[..., H]``.

    Two FLOP counts are given, both ``4 * D`` per (query, key) pair (``2*D`` for
    QK^T and ``2*D`` for PV; softmax not counted):

    * ``flops``: exact count over the (query, key) pairs of real tokens that
      the plan attends to (the band-granular mask of
      :mod:`pallas_kernels.schedule`, padding excluded); it depends on ``band``
      only.  Use this (or ``saved_flops``) to rank plans.
    * ``tile_flops``: ``4 * BQ * BK * D`` per computed execution tile
      (``BQ, BK = block_q, block_k``), i.e. what a tiled kernel issues to the
      tensor cores including padding rows/columns.

    ``dense_*`` are the same quantities for full attention on every head;
    ``tiles`` counts (batch, query tile, key tile) execution-tile triples that
    run and ``programs`` the (batch, query tile) pairs that compute anything
    (each costs a fixed Q load, pipeline fill and output store on top of its
    tiles).

    FLOPs over-state the time saved by arrow heads: their programs visit few
    tiles, so the fixed per-program cost weighs more.  :meth:`time_estimate`
    models ``time = tiles * t_tile + programs * t_program``; fitted H100 values
    are in benchmarks/RESULTS.md ("Head-wise attention kernel").
    """

    band: tuple[int, int]
    block_q: int
    block_k: int
    tiles: np.ndarray  # int64 [..., H]
    flops: np.ndarray  # int64 [..., H]
    tile_flops: np.ndarray  # int64 [..., H]
    dense_tiles: int  # per head
    dense_flops: int  # per head
    dense_tile_flops: int  # per head
    programs: np.ndarray  # int64 [..., H]

    def time_estimate(self, t_tile: float, t_program: float) -> np.ndarray:
        """``tiles * t_tile + programs * t_program`` summed over heads."""
        return (self.tiles * t_tile + self.programs * t_program).sum(-1)

    @property
    def saved_flops(self) -> np.ndarray:
        """Per head ``dense_flops - flops``."""
        return self.dense_flops - self.flops

    @property
    def saving(self) -> np.ndarray:
        """Per head fraction of the dense attention FLOPs removed (exact count)."""
        return 1.0 - self.flops / self.dense_flops

    @property
    def total_tiles(self) -> np.ndarray:
        return self.tiles.sum(-1)

    @property
    def total_flops(self) -> np.ndarray:
        return self.flops.sum(-1)

    @property
    def total_tile_flops(self) -> np.ndarray:
        return self.tile_flops.sum(-1)

    @property
    def total_dense_flops(self) -> int:
        return self.dense_flops * self.tiles.shape[-1]

    @property
    def tile_fraction(self) -> np.ndarray:
        """Computed tiles over the dense tile count (all heads)."""
        return self.total_tiles / (self.dense_tiles * self.tiles.shape[-1])

    @property
    def flop_fraction(self) -> np.ndarray:
        """Exact attended pairs over the dense count (all heads)."""
        return self.total_flops / self.total_dense_flops


def _valid(lo_tile, hi_tile, block, tokens):
    """Real tokens in tiles [lo_tile, hi_tile)."""
    n = np.minimum(hi_tile * block, tokens) - lo_tile * block
    return np.where(hi_tile > lo_tile, np.maximum(n, 0), 0)


def plan_cost(
    head_window,
    *,
    batch: int,
    tokens: int,
    text_len: int,
    text_first: bool,
    head_dim: int,
    band: tuple[int, int] | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> PlanCost:
    """Tiles and FLOPs a plan computes, per head and in total.

    ``head_window``: integer array ``[..., H]`` (numpy or anything
    ``np.asarray`` accepts; leading axes, e.g. steps and layers, are kept):
    -1 full, 0 cached, w > 0 arrow.  ``band`` (the computed function) defaults
    to :func:`pallas_kernels.default_band` ``(head_dim)``; the execution tiles
    ``block_q``, ``block_k`` (tile and program counts) default to the band and
    must divide it.
    """
    hw = np.asarray(head_window)
    if hw.ndim < 1 or not np.issubdtype(hw.dtype, np.integer):
        raise ValueError(f"head_window: expected an integer array [..., heads], got shape {hw.shape} dtype {hw.dtype}")
    if np.any(hw < -1):
        raise ValueError(f"head_window: values must be >= -1, got min {hw.min()}")
    if not 0 <= text_len <= tokens:
        raise ValueError(f"text_len={text_len} must be in [0, tokens={tokens}]")
    band = resolve_band(band, head_dim)
    bq = band[0] if block_q is None else check_block("block_q", block_q)
    bk = band[1] if block_k is None else check_block("block_k", block_k)
    schedule.check_band(band, bq, bk)
    hw = np.clip(hw, -1, np.iinfo(np.int32).max).astype(np.int64)

    nq = schedule.num_tiles(tokens, bq)
    nk = schedule.num_tiles(tokens, bk)
    qt = np.arange(nq, dtype=np.int64)
    t0, t1, b0, b1 = schedule.kv_tile_ranges(
        qt,
        hw[..., None],
        tokens=tokens,
        text_len=text_len,
        text_first=text_first,
        block_q=bq,
        block_k=bk,
        band=band,
        xp=np,
    )
    tiles_q = (t1 - t0) + (b1 - b0)  # [..., H, nq]
    keys_q = _valid(t0, t1, bk, tokens) + _valid(b0, b1, bk, tokens)
    rows_q = _valid(qt, qt + 1, bq, tokens)  # [nq]
    tiles = batch * tiles_q.sum(-1)
    pairs = batch * (rows_q * keys_q).sum(-1)
    unit = 4 * head_dim
    return PlanCost(
        band=band,
        block_q=bq,
        block_k=bk,
        tiles=tiles.astype(np.int64),
        flops=(unit * pairs).astype(np.int64),
        tile_flops=(unit * bq * bk * tiles).astype(np.int64),
        dense_tiles=batch * nq * nk,
        dense_flops=unit * batch * tokens * tokens,
        dense_tile_flops=unit * bq * bk * batch * nq * nk,
        programs=(batch * (tiles_q > 0).sum(-1)).astype(np.int64),
    )
