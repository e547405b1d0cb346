"""Backend "mosaic_gpu": head-wise attention in Pallas Mosaic GPU (Hopper), with cached heads.

The same function as every backend (:mod:`pallas_kernels.schedule`).  Kernel
structure (``plgpu.kernel``, three warpgroups; a work item = one (batch,
head, pair of 64-row query tiles)):

* each item's key tiles come from :func:`item_tiles`: the two key ranges of
  :func:`pallas_kernels.schedule.kv_tile_ranges` with ``head_window[h]`` read
  from memory (the band's query size is a multiple of 128, so both compute
  warpgroups visit the same key tiles), in ``block_k`` tiles.  The loops have
  dynamic bounds, so one compiled kernel serves every plan.  Only a range's
  end tiles may need their scores masked: the padded last key tile (``tokens
  % block_k != 0``), and, with 128-key tiles over a band of 64 keys (head_dim
  64), the half of an end tile outside the range;
* warpgroup 2 (memory) streams the K/V tiles by TMA straight from
  ``[B, T, H, D]`` into ``num_stages``-deep SMEM rings (input dtype),
  released by the compute warpgroups on "consumed" barriers; out-of-bounds
  rows are zero-filled by the TMA unit.  Its tile counter runs across a
  program's items, so the ring keeps streaming from one item into the next;
* warpgroups 0 and 1 (compute) each load 64 query rows (the next item's while
  computing this one, in a second buffer), run wgmma for ``Q K^T`` and ``P V``
  with the online softmax of :func:`_softmax_step` in between (base 2,
  ``1/sqrt(D)`` folded into the exp2 factor) and optionally alternate their
  matmuls on a schedule barrier (``pingpong``) so that one's softmax overlaps
  the other's wgmma; the result goes back through SMEM by TMA (rows past
  ``tokens`` are clipped by the TMA unit);
* cached heads (window 0) are never run, nor the query tiles a call leaves
  out (``query_tiles``: the work list skips them); the output buffer is the cache,
  passed in as a ``jax.new_ref`` (lowered to an operand alias), so the cache
  passes through bit for bit, with no copy when it is donated.

Two launch schedules (``MosaicConfig.persistent``):

* persistent (default): one program per SM, each walking the items
  :func:`_program_items` deals it from the work list (:func:`work_list`: full
  rows, then arrow rows, cached last).  Hopper has no way for a program to
  claim the next item (no returned atomic in Pallas Mosaic GPU, no cluster
  launch control), so the split is static;
* ``persistent=False``: one program per item, heads fastest and the query
  tiles holding text first, so the hardware's block scheduler hands the long
  rows out first.

FP8 heads (window -2, ``fp8=True``; :mod:`pallas_kernels.fp8`) run in a second
launch after the others, into their output: the same kernel with e4m3 Q, K
and transposed V tiles (8-bit wgmma takes its B operand only K-major), the
per-head scales folded into the exponent factor and the output, and P passed
to the ``P V`` wgmma through SMEM (Mosaic GPU finds no register layout for an
8-bit A operand produced by the softmax).

TMA moves tiles in groups of 8 token rows (the SMEM tiling), so a token
count that is not a multiple of 8 (SD3: 4096 + 333) is padded to one outside
the kernel (a copy of q, k, v and the cache, and a slice of the output),
unless the caller carries its sequence so padded (``padding``: the SD3 model
does); the padding keys are masked in the last key tile.  Off a GPU it runs in
Mosaic GPU interpret mode, where plain dots replace wgmma (the interpreter
does not run wgmma accumulators).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import fp8 as fp8_ops
from pallas_kernels import schedule

__all__ = ["MosaicConfig", "MosaicBackend"]

_LOG2E = math.log2(math.e)
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_BLOCK_Q = 64  # query rows per compute warpgroup (one wgmma M tile)
_COMPUTE_WGS = 2
_PROGRAM_Q = _BLOCK_Q * _COMPUTE_WGS
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_HEAD_DIMS = (64, 128)
_HOPPER_SMS = 132  # H100 / H200 SXM; used when the device does not report its core count
_INTERPRET_PROGRAMS = 3  # persistent programs in interpret mode: few, so each walks several items
_FP8_P_LOG2_SCALE = math.log2(fp8_ops.FP8_MAX)  # FP8 heads: P in [0, 448], e4m3's normal range


def _default_stages(head_dim: int, block_k: int, q_buffers: int, fp8: bool = False) -> int:
    """SMEM ring depth within Hopper's 227 KiB: Q/O q_buffers x 2x64xD + (K + V) stages x block_k x D, 2 bytes
    each; FP8 operands take 1 byte, plus 2x64xD of output (2 bytes) and 2x64xblock_k of P (1 byte)."""
    if fp8:
        budget = 220 * 1024 - q_buffers * _PROGRAM_Q * head_dim - _PROGRAM_Q * (2 * head_dim + block_k)
        return max(2, min(4, budget // (2 * block_k * head_dim)))
    budget = 220 * 1024 - q_buffers * _PROGRAM_Q * head_dim * 2
    return max(2, min(4, budget // (2 * block_k * head_dim * 2)))


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Launch configuration of the Mosaic GPU backend: how the function is run, never which function.

    ``block_k``: key tile, 64 or 128 (None: 128); a tile coarser than the
    band's ``band_k`` (128 over 64) masks the columns of a key range's end
    tiles that lie outside the range, a tile finer than it divides it;
    ``num_stages``: K/V ring depth (None: as deep as SMEM allows, 2 to 4);
    ``pingpong``: alternate the two compute warpgroups' matmuls;
    ``schedule_ahead``: persistent programs read the next work item's indices and key ranges while the current
    item runs (carried through the item loop) rather than at its start (a candidate, not yet timed on a GPU);
    ``pingpong_per_item``: with ``pingpong``, set up the alternation at every work item (warpgroup 1 waits at
    the item's start, warpgroup 0 lets it go before its epilogue), so that one warpgroup's epilogue and the next
    item's prologue overlap the other's last matmuls; False: once per program, which pairs warpgroup 1's last
    ``P V`` of an item with warpgroup 0's first ``Q K^T`` of the next (a candidate, not yet timed on a GPU);
    ``persistent``: launch ``num_programs`` programs (None: one per SM) that
    each walk a share of the work list, instead of one program per work item;
    ``prefetch_q``: persistent programs load the next item's queries into a
    second buffer while they compute the current item; ``prefetch_q_in_loop``:
    issue that load after the item's second key tile rather than before its
    first, when the last output store (through the same buffer) has long read
    it (a candidate, not yet timed on a GPU); ``interpret``: Mosaic
    GPU interpret mode (None: when the default backend is not a GPU).
    """

    block_k: int | None = None
    num_stages: int | None = None
    pingpong: bool = True
    pingpong_per_item: bool = False
    schedule_ahead: bool = False
    persistent: bool = True
    num_programs: int | None = None
    prefetch_q: bool = True
    prefetch_q_in_loop: bool = False
    interpret: bool | None = None

    def __post_init__(self):
        if self.block_k is not None and self.block_k not in (64, 128):
            raise ValueError(f"MosaicConfig.block_k: expected 64 or 128, got {self.block_k!r}")
        n = self.num_stages
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 2):
            raise ValueError(f"MosaicConfig.num_stages: expected an int >= 2, got {n!r}")
        n = self.num_programs
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"MosaicConfig.num_programs: expected an int >= 1, got {n!r}")


class MosaicBackend:
    """The Pallas kernel lowered through Mosaic GPU: compiled on Hopper (sm_90), interpret mode elsewhere."""

    name = "mosaic_gpu"
    config_type = MosaicConfig
    skips_query_tiles = True  # a work list without the unselected query tiles
    runs_fp8 = True  # heads of window -2 in FP8 (pallas_kernels.fp8)

    def default_config(self, q_shape, dtype, band) -> MosaicConfig:
        """Launch configuration for ``q_shape``, ``dtype`` and ``band``."""
        return self._complete(MosaicConfig(), q_shape, band)

    def supports(self, q_shape, dtype, band, platform) -> str | None:
        """None when it runs there; ``platform=None`` (named by the caller): judge the shape only."""
        if jnp.dtype(dtype) not in _DTYPES:
            return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16"
        head_dim = q_shape[-1]
        if head_dim not in _HEAD_DIMS:
            return f"head_dim {head_dim} is not one of {list(_HEAD_DIMS)}"
        band_q, band_k = band
        if band_q % _PROGRAM_Q or band_k % 64:
            return f"band {tuple(band)}: needs band_q a multiple of {_PROGRAM_Q} and band_k a multiple of 64"
        if platform is None:
            return None
        if platform != "gpu":
            return f"compiles for a Hopper GPU only (platform {platform!r}); name it to run it in interpret mode"
        cc = getattr(jax.devices()[0], "compute_capability", None)
        if cc is None or not str(cc).startswith("9."):
            return f"needs compute capability 9.x (Hopper), got {cc}"
        return None

    def __call__(self, q, k, v, head_window, cache, *, text_len, text_first, band, config, query_tiles=None,
                 fp8=False, padding=0):
        """Validated arguments (``head_window`` int32, ``band`` a pair) -> output; ``fp8``: heads of window
        :data:`pallas_kernels.fp8.FP8_WINDOW` run in FP8 (a second launch)."""
        config = config or MosaicConfig()
        cfg = self._complete(config, q.shape, band)
        q_buffers = 2 if cfg.persistent and cfg.prefetch_q else 1
        fp8_stages = (_default_stages(q.shape[-1], cfg.block_k, q_buffers, fp8=True) if config.num_stages is None
                      else config.num_stages)
        return _headwise_jit(
            q, k, v, head_window, cache, query_tiles, text_len=int(text_len), text_first=bool(text_first),
            band=tuple(band),
            block_k=cfg.block_k, num_stages=cfg.num_stages, pingpong=cfg.pingpong,
            pingpong_per_item=cfg.pingpong_per_item, prefetch_q_in_loop=cfg.prefetch_q_in_loop,
            schedule_ahead=cfg.schedule_ahead,
            num_programs=cfg.num_programs if cfg.persistent else None, prefetch_q=cfg.prefetch_q,
            fp8=bool(fp8), fp8_stages=fp8_stages, interpret=bool(cfg.interpret), padding=int(padding),
        )

    def _complete(self, config, q_shape, band) -> MosaicConfig:
        """``config`` with every None field set to its default; checks the tiles divide the band."""
        bk = 128 if config.block_k is None else config.block_k
        schedule.check_band(band, _PROGRAM_Q, min(bk, band[1]))  # band_k, a power of two >= 64, and bk nest
        interpret = jax.default_backend() != "gpu" if config.interpret is None else config.interpret
        if config.num_programs is not None:
            programs = config.num_programs
        elif interpret:
            programs = _INTERPRET_PROGRAMS
        else:
            device = jax.devices()[0]
            programs = (device.platform == "gpu" and getattr(device, "core_count", None)) or _HOPPER_SMS
        return dataclasses.replace(
            config,
            block_k=bk,
            num_stages=(_default_stages(q_shape[-1], bk, 2 if config.persistent and config.prefetch_q else 1)
                        if config.num_stages is None else config.num_stages),
            num_programs=programs,
            interpret=interpret,
        )


# ----------------------------------------------------------------------------
# Tile math: one online-softmax step over a key tile.


def _softmax_step(s, carry, *, qk_scale, cols=None, p_log2_scale=0.0):
    """Scores ``s`` [block_q, block_k] (float32) of one key tile -> (rescaled acc, m, l, unnormalised p).

    ``m`` is kept in the scaled base-2 domain, so ``exp2(s * qk_scale - m)`` is
    one FMA per score.  ``cols``: ``(lo, hi)``, only the tile's columns in
    ``[lo, hi)`` are keys (the others: outside the band, or padding); ``lo``
    None when it is 0.  ``p_log2_scale``: p (and so acc and l alike) comes out
    multiplied by ``2**p_log2_scale``, a factor that cancels in ``acc / l``.
    """
    acc, m_prev, l_prev = carry
    if cols is not None:
        lo, hi = cols
        col = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        keep = col < hi if lo is None else (col >= lo) & (col < hi)
        s = jnp.where(keep, s, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=1) * qk_scale)
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_next - p_log2_scale, s.shape, [0]))
    l_next = l_prev * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    return acc, m_next, l_next, p


# ----------------------------------------------------------------------------
# Schedule: which key tiles an item visits, and which program runs which items in which order.


class ItemTiles(NamedTuple):
    """The key tiles a work item visits: range A (``n_a`` execution tiles from ``a0``), then range C.

    A range's first tile attends to its columns from ``lo_*`` on and its last tile to those below ``hi_*``
    (``block_k``: the whole tile); other tiles attend to every column.  Columns fall outside a range when the key
    tile is coarser than the band's (a 128-key tile over a band of 64: the range may start or end mid-tile) or
    past ``tokens`` (the last key tile).  The range that ends at the last key tile, if any, is C.
    """

    a0: jax.Array
    n_a: jax.Array
    lo_a: jax.Array
    hi_a: jax.Array
    c0: jax.Array
    n_c: jax.Array
    lo_c: jax.Array
    hi_c: jax.Array

    @property
    def count(self):
        return self.n_a + self.n_c


def item_tiles(pair, w, *, tokens, text_len, text_first, band, block_k, key_tokens=None) -> ItemTiles:
    """:class:`ItemTiles` of query pair ``pair`` (128 rows) of a head with window ``w`` (scalars or arrays);
    keys from ``key_tokens`` (default ``tokens``) on are padding.

    The ranges come from :func:`pallas_kernels.schedule.kv_tile_ranges` in tiles of ``fine = min(block_k,
    band_k)`` keys.  With ``block_k > band_k`` two touching ranges are merged (they could share a key tile) and
    each range is widened to whole ``block_k`` tiles, its ends masked by ``lo`` / ``hi``.
    """
    fine = min(block_k, band[1])
    ratio = block_k // fine
    t0, t1, b0, b1 = schedule.kv_tile_ranges(pair, w, tokens=tokens, text_len=text_len, text_first=text_first,
                                             block_q=_PROGRAM_Q, block_k=fine, band=band, xp=jnp)
    if ratio > 1:
        touch = (t1 > t0) & (b1 > b0) & ((t1 == b0) | (b1 == t0))
        t0, t1 = jnp.where(touch, jnp.minimum(t0, b0), t0), jnp.where(touch, jnp.maximum(t1, b1), t1)
        b0, b1 = jnp.where(touch, 0, b0), jnp.where(touch, 0, b1)
    nk = schedule.num_tiles(tokens, block_k)
    last_valid = (tokens if key_tokens is None else key_tokens) - (nk - 1) * block_k  # real keys in the last tile

    def widen(x0, x1):  # fine tiles [x0, x1) -> (first tile, count, lo, hi) in block_k tiles
        first, end = x0 // ratio, (x1 + ratio - 1) // ratio
        count = jnp.where(x1 > x0, end - first, 0)
        hi = ((x1 - 1) % ratio + 1) * fine
        return first, count, (x0 % ratio) * fine, jnp.where(end == nk, jnp.minimum(hi, last_valid), hi)

    t_last = t1 == schedule.num_tiles(tokens, fine)  # the text range (or a full row) ends at the last key tile
    band_range, text_range = widen(b0, b1), widen(t0, t1)
    first = [jnp.where(t_last, x, y) for x, y in zip(band_range, text_range)]
    second = [jnp.where(t_last, y, x) for x, y in zip(band_range, text_range)]
    return ItemTiles(*first, *second)


def work_list(hw, *, batch, tokens, text_len, text_first, band, block_k, query_tiles=None):
    """``[2 + W]`` int32: ``n_full, n_arrow``, then all ``W = batch * heads * n_prog`` items ``(b * heads + h) *
    n_prog + p`` (``p``: a pair of 64-row query tiles): the ``n_full`` full rows (full heads, and the text query
    tiles of arrow heads), then the ``n_arrow`` arrow rows, then the items that visit nothing (cached heads; with
    ``query_tiles``, the unselected tiles), each class in (batch, head, query) order, so that programs running
    together share a head's K/V in L2.  :func:`_program_items` deals them out.

    A stable partition by cumulative sums rather than a sort: an XLA sort of a few thousand items costs about
    0.1 ms on an H200 (measured, RESULTS.md).
    """
    n_prog = schedule.num_tiles(tokens, _PROGRAM_Q)
    nk = schedule.num_tiles(tokens, block_k)
    cost = item_tiles(jnp.arange(n_prog, dtype=jnp.int32)[None, :], jnp.asarray(hw, jnp.int32)[:, None],
                      tokens=tokens, text_len=text_len, text_first=text_first, band=band, block_k=block_k).count
    if query_tiles is not None:
        pair_tile = jnp.arange(n_prog) * _PROGRAM_Q // band[0]  # band_q is a multiple of _PROGRAM_Q
        cost = jnp.where(jnp.asarray(query_tiles)[pair_tile][None, :], cost, 0)
    cost = jnp.broadcast_to(cost[None], (batch, *cost.shape)).reshape(-1)
    cls = jnp.where(cost == 0, 2, jnp.where(cost >= nk, 0, 1))  # full rows, arrow rows, nothing
    one_hot = (cls[:, None] == jnp.arange(3)[None, :]).astype(jnp.int32)
    before = jnp.cumsum(one_hot, axis=0) - one_hot  # items of the same class ahead of each item
    counts = one_hot.sum(axis=0)
    rank = (jnp.cumsum(counts) - counts)[cls] + jnp.take_along_axis(before, cls[:, None], axis=1)[:, 0]
    order = jnp.zeros_like(cost).at[rank].set(jnp.arange(cost.shape[0], dtype=cost.dtype))
    return jnp.concatenate([counts[:2], order]).astype(jnp.int32)


def _snake(round_, slot, n):
    """Where in a list dealt out round by round over ``n`` slots the item of ``slot`` in ``round_`` is: rounds
    alternate direction, so the longest items of one round and the shortest of the next go to the same slot."""
    forward = lax.rem(round_, 2) == 0
    return round_ * n + jnp.where(forward, slot, n - 1 - slot)


def _program_items(program, num_programs, n_full, n_arrow):
    """(number of items, item r's position in the work list) of ``program``: the full rows round robin, then the
    arrow rows in snake order (:func:`_snake`)."""
    r_full = lax.div(n_full - program + num_programs - 1, num_programs)
    rounds = lax.div(n_arrow, num_programs)
    pos = jnp.where(lax.rem(rounds, 2) == 0, program, num_programs - 1 - program)
    r_arrow = rounds + (pos < lax.rem(n_arrow, num_programs)).astype(jnp.int32)

    def position(r):
        return jnp.where(r < r_full, r * num_programs + program,
                         n_full + _snake(r - r_full, program, num_programs))

    return r_full + r_arrow, position


# ----------------------------------------------------------------------------
# Kernel: memory warpgroup, compute warpgroups, both walking the same items.


def _kernel(
    *refs, tokens, key_tokens, text_len, text_first, band, block_k, num_stages, pingpong, persistent, q_buffers,
    q_rotation, fp8, interpret, pingpong_per_item=False, prefetch_q_in_loop=False, schedule_ahead=False,
):
    if persistent:
        work_ref, *refs = refs
    if fp8:  # e4m3 operands (V transposed, [B, H, D, T]), their scales, and SMEM for P and the output
        (hw_ref, scale_ref, q_ref, k_ref, v_ref, o_ref, q_smem, k_smem, v_smem, p_smem, o_smem,
         q_bar, k_bar, v_bar, k_free, v_free, sched_bar) = refs
    else:
        hw_ref, q_ref, k_ref, v_ref, o_ref, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free, v_free, sched_bar = refs
    batch, _, heads, head_dim = q_ref.shape
    p_dtype, out_dtype = q_ref.dtype, o_ref.dtype  # P goes into the P V matmul in the dtype of the operands
    n_prog = schedule.num_tiles(tokens, _PROGRAM_Q)
    coarse = block_k > band[1]  # a range may start or end mid-tile
    ragged = key_tokens % block_k != 0  # the last key tile holds padding
    qk_scale = _LOG2E / math.sqrt(head_dim)

    program = lax.axis_index("programs")
    num_programs = lax.axis_size("programs")
    wg = lax.axis_index("wg")
    if persistent:
        rounds, position = _program_items(program, num_programs, work_ref[0], work_ref[1])
    else:
        rounds = 1

    def item_index(r):
        """(batch, head, query pair) of this program's r-th item (r < rounds; with ``schedule_ahead`` also the one
        past the last, which is read and never run: its position is clamped into the work list)."""
        if persistent:
            at = jnp.minimum(position(r), work_ref.shape[0] - 3) if schedule_ahead else position(r)
            idx = work_ref[2 + at]
            return lax.div(idx, n_prog * heads), lax.rem(lax.div(idx, n_prog), heads), lax.rem(idx, n_prog)
        # program order: heads fastest, query pairs holding text first (the long rows of arrow heads)
        p = lax.rem(lax.rem(lax.div(program, heads), n_prog) + q_rotation, n_prog)
        return lax.div(program, heads * n_prog), lax.rem(program, heads), p

    def item(r):
        """(batch, head, query pair, :class:`ItemTiles`) of this program's r-th item."""
        b, h, p = item_index(r)
        tiles = item_tiles(p, hw_ref[h], tokens=tokens, text_len=text_len, text_first=text_first, band=band,
                           block_k=block_k, key_tokens=key_tokens)
        return b, h, p, tiles

    def walk_items(body, g):
        """``g = body(r, item(r), g)`` for each of this program's items; with ``schedule_ahead`` the next item is
        read at the start of the current one and carried, so its loads overlap the current item's work."""
        if not (persistent and schedule_ahead):
            return lax.fori_loop(0, rounds, lambda r, g: body(r, item(r), g), g)

        def ahead(r, carry):
            g, current = carry
            following = item(r + 1)
            return body(r, current, g), following

        return lax.fori_loop(0, rounds, ahead, (g, item(0)))[0]

    def key_tile(tiles, i):  # step i runs range A, then range C
        return jnp.where(i < tiles.n_a, tiles.a0 + i, tiles.c0 + (i - tiles.n_a))

    def slot_of(g):  # g counts K/V tiles over all of this program's items, so the ring runs across items
        return lax.rem(g, num_stages)

    def sched():
        if pingpong:
            plgpu.barrier_arrive(sched_bar)
            plgpu.barrier_wait(sched_bar)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory_wg():
        plgpu.set_max_registers(40, action="decrease")

        def stream_item(r, current, g):
            b, h, _, tiles = current
            n = tiles.count

            @pl.loop(0, n)
            def _load(i):
                gi = g + i
                slot = slot_of(gi)
                keys = pl.ds(key_tile(tiles, i) * block_k, block_k)
                pl.when(gi >= num_stages)(lambda: plgpu.barrier_wait(k_free.at[slot]))
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[slot], k_bar.at[slot])
                pl.when(gi >= num_stages)(lambda: plgpu.barrier_wait(v_free.at[slot]))
                v_tile = v_ref.at[b, h, :, keys] if fp8 else v_ref.at[b, keys, h]
                plgpu.copy_gmem_to_smem(v_tile, v_smem.at[slot], v_bar.at[slot])

            return g + n

        g = walk_items(stream_item, jnp.int32(0))
        for s in range(num_stages):  # await the last release of every slot used

            @pl.when(s < g)
            def _drain():
                plgpu.barrier_wait(k_free.at[s])
                plgpu.barrier_wait(v_free.at[s])

    @pl.when(wg < _COMPUTE_WGS)
    def _compute_wg():
        plgpu.set_max_registers(232, action="increase")

        def q_rows(b, h, p):
            return b, pl.ds(p * _PROGRAM_Q + wg * _BLOCK_Q, _BLOCK_Q), h

        def load_q(r):  # item r's 64 query rows of this warpgroup into Q buffer r % q_buffers
            b, h, p = item_index(r)
            buf = lax.rem(r, q_buffers)
            plgpu.copy_gmem_to_smem(q_ref.at[q_rows(b, h, p)], q_smem.at[buf, wg],
                                    q_bar.at[buf * _COMPUTE_WGS + wg])

        def scores(q_tile, slot):
            k_tile = k_smem.at[slot]
            if interpret:
                s = jnp.dot(q_tile[...], k_tile[...].T, preferred_element_type=jnp.float32)
                sched()
                return s

            def issue(acc_ref):
                plgpu.wgmma(acc_ref, q_tile, k_tile.transpose((1, 0)))
                sched()
                return acc_ref[...]

            return pl.run_scoped(issue, plgpu.ACC((_BLOCK_Q, block_k), jnp.float32))

        def accumulate(acc, pv_in, slot, next_k):
            v_tile = v_smem.at[slot].transpose((1, 0)) if fp8 else v_smem.at[slot]  # [block_k, D] either way
            if interpret:
                acc = acc + jnp.dot(pv_in[...] if fp8 else pv_in, v_tile[...], preferred_element_type=jnp.float32)
                next_k()
                return acc

            def issue(acc_ref):
                plgpu.wgmma(acc_ref, pv_in, v_tile)
                next_k()  # overlaps the wgmma in flight

            return pl.run_state(issue)(plgpu.ACC.init(acc))

        def attend_item(r, current, g):
            b, h, p, tiles = current
            n = tiles.count
            buf = lax.rem(r, q_buffers)
            q_tile = q_smem.at[buf, wg]
            o_tile = o_smem.at[wg] if fp8 else q_tile  # where the output goes out through
            if fp8:  # the Q and K scales into the exponent factor
                item_qk_scale = qk_scale * scale_ref[b, h, 0] * scale_ref[b, h, 1]
            else:
                item_qk_scale = qk_scale

            def prefetch_next():  # the next item's Q into the other buffer, once the last store has read it
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                load_q(r + 1)

            def step(i, carry, cols=None):
                slot = slot_of(g + i)

                def next_k():
                    pl.when(i + 1 < n)(lambda: plgpu.barrier_wait(k_bar.at[slot_of(g + i + 1)]))

                s = scores(q_tile, slot)
                plgpu.barrier_arrive(k_free.at[slot])
                if q_buffers == 2 and prefetch_q_in_loop:
                    pl.when((i == jnp.minimum(1, n - 1)) & (r + 1 < rounds))(prefetch_next)
                acc, m, l, pr = _softmax_step(s, carry, qk_scale=item_qk_scale, cols=cols,
                                              p_log2_scale=_FP8_P_LOG2_SCALE if fp8 else 0.0)
                pr = pr.astype(p_dtype)
                if fp8:  # 8-bit P enters the matmul from SMEM (Mosaic GPU has no 8-bit register A operand here)
                    p_smem.at[wg][...] = pr
                    plgpu.commit_smem()
                    pr = p_smem.at[wg]
                if pingpong:
                    plgpu.barrier_arrive(sched_bar)
                plgpu.barrier_wait(v_bar.at[slot])
                if pingpong:
                    plgpu.barrier_wait(sched_bar)
                acc = accumulate(acc, pr, slot, next_k)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m, l

            def run(start, stop, carry, cols=None):
                return lax.fori_loop(start, stop, functools.partial(step, cols=cols), carry)

            def run_range(start, count, lo, hi, carry, *, head, tail):
                """Steps ``[start, start + count)`` of one range, its first step masked from ``lo`` (where ``head``
                is possible) and its last below ``hi`` (where ``tail`` is); the others unmasked."""
                n_head = n_tail = 0
                if head:
                    n_head = ((count > 0) & ((lo > 0) | ((count == 1) & (hi < block_k)))).astype(jnp.int32)
                    carry = run(start, start + n_head, carry, (lo, jnp.where(count == 1, hi, block_k)))
                if tail:
                    n_tail = ((count - n_head > 0) & (hi < block_k)).astype(jnp.int32)
                carry = run(start + n_head, start + count - n_tail, carry)
                if tail:
                    carry = run(start + count - n_tail, start + count, carry, (None, hi))
                return carry

            @pl.when(n > 0)
            def _attend():
                if q_buffers == 1:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output store has read q_tile
                    load_q(r)
                plgpu.barrier_wait(q_bar.at[buf * _COMPUTE_WGS + wg])
                if q_buffers == 2 and not prefetch_q_in_loop:
                    pl.when(r + 1 < rounds)(prefetch_next)

                plgpu.barrier_wait(k_bar.at[slot_of(g)])
                if pingpong_per_item:
                    pl.when(wg == 1)(sched)  # warpgroup 0 issues the item's first matmul
                carry = (
                    plgpu.layout_cast(jnp.zeros((_BLOCK_Q, head_dim), jnp.float32), plgpu.Layout.WGMMA),
                    plgpu.layout_cast(jnp.full((_BLOCK_Q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                    plgpu.layout_cast(jnp.zeros((_BLOCK_Q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                )
                # Only a coarse tile can start mid-range; only range C can hold the padded last key tile.
                carry = run_range(0, tiles.n_a, tiles.lo_a, tiles.hi_a, carry, head=coarse, tail=coarse)
                carry = run_range(tiles.n_a, tiles.n_c, tiles.lo_c, tiles.hi_c, carry, head=coarse,
                                  tail=coarse or ragged)
                if pingpong_per_item:
                    pl.when(wg == 0)(sched)  # warpgroup 1's last P V runs while warpgroup 0 finishes the item
                acc, _, l = carry
                out = acc / lax.broadcast_in_dim(l, acc.shape, [0])
                if fp8:
                    out = out * scale_ref[b, h, 2]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output store has read o_tile
                o_tile[...] = out.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_tile, o_ref.at[q_rows(b, h, p)])

            return g + n

        if not pingpong_per_item:
            pl.when(wg == 1)(sched)  # warpgroup 0 issues its matmuls first
        if q_buffers == 2:
            pl.when(rounds > 0)(lambda: load_q(0))
        walk_items(attend_item, jnp.int32(0))
        if not pingpong_per_item:
            pl.when(wg == 0)(sched)
        plgpu.wait_smem_to_gmem(0)


@functools.partial(
    jax.jit,
    static_argnames=("text_len", "text_first", "band", "block_k", "num_stages", "pingpong", "num_programs",
                     "prefetch_q", "fp8", "fp8_stages", "interpret", "padding", "pingpong_per_item",
                     "prefetch_q_in_loop", "schedule_ahead"),
)
def _headwise_jit(
    q, k, v, hw, cache, query_tiles, *, text_len, text_first, band, block_k, num_stages, pingpong, num_programs,
    prefetch_q, fp8, fp8_stages, interpret, padding=0, pingpong_per_item=False, prefetch_q_in_loop=False,
    schedule_ahead=False
):
    """The call: one launch for the bf16/fp16 heads, and with ``fp8`` a second one for the FP8 heads (window
    :data:`fp8_ops.FP8_WINDOW`), run only when a head has that window, writing into the first one's output.
    ``text_len`` is the schedule's (it counts ``padding`` when text is last)."""
    real = q.shape[1]
    if cache is None:
        hw = jnp.where(hw == 0, -1, hw)  # documented: no cache -> full
        if query_tiles is not None or fp8:
            cache = jnp.zeros_like(q)  # the rows of unselected query tiles; the FP8 heads' until they are written
    # TMA views the token axis in groups of 8 rows (the SMEM tiling): other lengths are padded here (one copy of
    # q, k, v and the cache), as a caller that carries `padding` has done once for every call.
    pad = (-real) % 8
    tokens = real + pad
    text_len = schedule.padded_text_len(text_len, text_first, pad)
    common = dict(text_len=text_len, text_first=text_first, band=band, block_k=block_k, pingpong=pingpong,
                  pingpong_per_item=pingpong_per_item, prefetch_q_in_loop=prefetch_q_in_loop,
                  schedule_ahead=schedule_ahead, num_programs=num_programs, prefetch_q=prefetch_q,
                  interpret=interpret,
                  key_tokens=tokens - pad - padding)

    def padded(x, axis=1):
        return jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)]) if pad else x

    is_fp8 = (hw == fp8_ops.FP8_WINDOW) & fp8  # without `fp8`, such windows are full like any w < 0
    out = _launch(*(padded(x) for x in (q, k, v)), jnp.where(is_fp8, 0, jnp.maximum(hw, -1)),
                  None if cache is None else padded(cache), query_tiles, tokens=tokens, num_stages=num_stages,
                  scales=None, **common)
    if fp8:

        def fp8_heads(out):
            ops = fp8_ops.quantize(q, k, v)
            v8t = jnp.pad(ops.v8t, ((0, 0), (0, 0), (0, 0), (0, (-real) % 128)))  # TMA: whole 128-key tiles
            return _launch(padded(ops.q8), padded(ops.k8), v8t, jnp.where(is_fp8, -1, 0), out,
                           query_tiles, tokens=tokens, num_stages=fp8_stages, scales=ops.scales, **common)

        out = lax.cond(is_fp8.any(), fp8_heads, lambda out: out, out)
    return out[:, :real] if pad else out


def _launch(q, k, v, hw, cache, query_tiles, *, tokens, key_tokens, text_len, text_first, band, block_k, num_stages,
            pingpong, num_programs, prefetch_q, scales, interpret, pingpong_per_item=False,
            prefetch_q_in_loop=False, schedule_ahead=False):
    """One kernel launch over ``q, k, v`` of ``tokens`` (a multiple of 8), the keys from ``key_tokens`` on
    padding, heads of window >= -1; with ``scales`` (:class:`pallas_kernels.fp8.Fp8Operands`' fields), e4m3
    operands."""
    batch, _, heads, head_dim = q.shape
    fp8 = scales is not None
    n_items = batch * heads * schedule.num_tiles(tokens, _PROGRAM_Q)
    if query_tiles is not None:  # only a work list can leave items out
        num_programs = min(num_programs or n_items, n_items)
    persistent = num_programs is not None and (num_programs < n_items or query_tiles is not None)
    if persistent:
        work = (work_list(hw, batch=batch, tokens=tokens, text_len=text_len, text_first=text_first, band=band,
                          block_k=block_k, query_tiles=query_tiles),)
    else:
        work = ()

    def smem(shape, dtype):  # rows of the last axis, swizzled as wgmma and TMA want them
        row_bytes = shape[-1] * jnp.dtype(dtype).itemsize
        swizzle = min(128, row_bytes)
        transforms = () if interpret else (
            plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
        return plgpu.SMEM(shape, dtype, transforms=transforms)

    q_buffers = 2 if persistent and prefetch_q else 1
    out_dtype = q.dtype if cache is None else cache.dtype
    if fp8:
        buffers = (
            smem((q_buffers, _COMPUTE_WGS, _BLOCK_Q, head_dim), q.dtype),
            smem((num_stages, block_k, head_dim), k.dtype),
            smem((num_stages, head_dim, block_k), v.dtype),  # V transposed
            smem((_COMPUTE_WGS, _BLOCK_Q, block_k), q.dtype),  # P
            smem((_COMPUTE_WGS, _BLOCK_Q, head_dim), out_dtype),  # the output
        )
    else:
        buffers = (
            smem((q_buffers, _COMPUTE_WGS, _BLOCK_Q, head_dim), q.dtype),  # Q, and the output on its way out
            smem((num_stages, block_k, head_dim), q.dtype),
            smem((num_stages, block_k, head_dim), q.dtype),
        )
    scratch = buffers + (
        plgpu.Barrier(num_barriers=q_buffers * _COMPUTE_WGS),
        plgpu.Barrier(num_barriers=num_stages),
        plgpu.Barrier(num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
    )
    body = functools.partial(
        _kernel, tokens=tokens, key_tokens=key_tokens, text_len=text_len, text_first=text_first, band=band,
        block_k=block_k,
        num_stages=num_stages, pingpong=pingpong, pingpong_per_item=pingpong_per_item,
        prefetch_q_in_loop=prefetch_q_in_loop, schedule_ahead=schedule_ahead, persistent=persistent,
        q_buffers=q_buffers,
        q_rotation=schedule.rotate_text_tiles_first(tokens, text_len, text_first, _PROGRAM_Q), fp8=fp8,
        interpret=interpret,
    )
    launch = functools.partial(
        plgpu.kernel,
        body,
        scratch_types=scratch,
        grid=(num_programs if persistent else n_items,),
        grid_names=("programs",),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="headwise_attention_mgpu_fp8" if fp8 else "headwise_attention_mgpu",
    )
    inputs = (*work, hw, *((scales,) if fp8 else ()), q, k, v)
    if cache is None:
        return launch(out_type=jax.ShapeDtypeStruct(q.shape, out_dtype))(*inputs)
    ref = jax.new_ref(cache)
    launch(out_type=())(*inputs, ref)
    return jax.freeze(ref)
