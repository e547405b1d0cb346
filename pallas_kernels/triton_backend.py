"""Backend "triton": head-wise attention in Pallas (Triton lowering), with cached heads.

One launch computes a layer's joint attention where every head follows its
own method (full / arrow band / cached), chosen by the int32 data array
``head_window``; see :mod:`pallas_kernels.schedule` for the exact function.
This module holds the backend's launch configuration (:class:`TritonConfig`,
tuned defaults) and its kernel.

Kernel structure (one program = one (batch, head, query tile)):

* grid order: one program per (batch, head, execution query tile), batch
  fastest, heads in index order, and inside a head the query tiles holding
  text (full rows, the heavy ones of an arrow head) first.  Optionally
  (``sort_heads``) heads are ranked heavy-first (full, wider arrows, narrower,
  cached last) by every program from the window vector, without any sort
  outside the kernel;
* the program computes its key-tile ranges ``[t0, t1)`` (text tiles, or all
  for full rows) and ``[b0, b1)`` (band) with
  :func:`pallas_kernels.schedule.kv_tile_ranges` and runs one pipelined
  online-softmax loop over a virtual index spanning both ranges (the range
  that ends at the last key tile goes second, so the padded key tile, if
  visited, is a separate masked final step), or one loop per range with
  ``single_loop=False``; :func:`_attend_tile` is the tile math.  No score is
  masked except in the last key tile when the real keys (``tokens`` less the
  caller's ``padding``) do not fill it;
* cached heads (window 0): the program returns at once; the output buffer is
  the ``cache`` input (``input_output_aliases``), so the cache passes through
  bit for bit with no copy when the cache buffer can be donated (it is dead
  after the call, e.g. the previous output carried by a ``lax.scan``, or a
  ``jit`` argument in ``donate_argnums``); otherwise XLA inserts one copy of
  the cache before the kernel.

Tuned defaults, chosen on an H100 80GB HBM3 (jax 0.11.2, bf16, 2026-11-22),
see benchmarks/RESULTS.md, section "Head-wise attention kernel".  Execution
tiles default to the band (:data:`pallas_kernels.schedule.DEFAULT_BAND`,
which equals these measurements):

* D=128 (FLUX): 128x128 tiles, 8 warps, 3 stages -- best full (482 TFLOP/s at
  FLUX-2K) and best arrow_8 of the sweep (128/64 blocks, 4/8 warps, 2/3
  stages);
* D=64 (SD3): 128x64 tiles, 8 warps, 3 stages -- best full (0.695 ms at
  SD3-1K); 64x64 with 4 warps was 5 % faster on arrow_8 but 6 % slower on
  full, and 4 warps at 128x64 (the first guess) was 35-45 % slower;
* heads in index order: ranking them heavy-first was 2-11 % slower on mixed
  plans at FLUX-1K/SD3-1K (index order interleaves heavy and light programs)
  and equal at FLUX-2K; one pipelined loop over both key-tile ranges.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import schedule
from pallas_kernels._validate import check_block, validate

__all__ = ["TritonConfig", "TritonBackend", "headwise_attention_with_tile_counts"]

_LOG2E = math.log2(math.e)
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# (head_dim, itemsize) -> (num_warps, num_stages) for the compiled kernel.
_TUNED_LAUNCH = {
    (64, 2): (8, 3),
    (128, 2): (8, 3),
}
_SORT_HEADS = False
_SINGLE_LOOP = True


def _default_launch(head_dim: int, itemsize: int, block_q: int) -> tuple[int, int]:
    """``(num_warps, num_stages)`` for the Triton compilation."""
    if itemsize >= 4:
        # float32 tiles are twice as large: keep shared memory within the H100's
        # 227 KiB by not multi-buffering the key/value tiles.
        return (8 if head_dim >= 128 or block_q >= 128 else 4), 1
    if (head_dim, itemsize) in _TUNED_LAUNCH:
        return _TUNED_LAUNCH[(head_dim, itemsize)]
    return (8 if head_dim >= 128 else 4), 2


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch configuration of the Triton backend: how the function is run, never which function.

    ``None`` fields take the tuned default for the call (see
    :meth:`TritonBackend.default_config`): execution tiles ``block_q``,
    ``block_k`` = the band (they may be smaller, dividing it), ``num_warps``
    and ``num_stages`` from the H100 tuning, ``interpret`` = not on a GPU.
    ``single_loop``: one loop over both key-tile ranges (else one per range);
    ``sort_heads``: run heads heavy-first (else in index order).
    """

    block_q: int | None = None
    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    single_loop: bool = _SINGLE_LOOP
    sort_heads: bool = _SORT_HEADS
    interpret: bool | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            if getattr(self, name) is not None:
                check_block(f"TritonConfig.{name}", getattr(self, name))
        for name in ("num_warps", "num_stages"):
            n = getattr(self, name)
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise ValueError(f"TritonConfig.{name}: expected a positive int, got {n!r}")


class TritonBackend:
    """The Pallas kernel lowered through Triton: compiled on a GPU, interpret mode elsewhere."""

    name = "triton"
    config_type = TritonConfig

    def default_config(self, q_shape, dtype, band) -> TritonConfig:
        """Tuned launch configuration for ``q_shape``, ``dtype`` and ``band``."""
        return self._complete(TritonConfig(), q_shape, dtype, band)

    def supports(self, q_shape, dtype, band, platform) -> str | None:
        """None when it runs there; ``platform=None`` (named by the caller): anywhere, interpret mode off a GPU."""
        if platform is not None and platform != "gpu":
            return f"compiles for a GPU only (platform {platform!r}); name it to run it in interpret mode"
        return None

    def __call__(self, q, k, v, head_window, cache, *, text_len, text_first, band, config, padding=0):
        """Validated arguments (``head_window`` int32, ``band`` a pair) -> output."""
        return self._run(q, k, v, head_window, cache, text_len, text_first, band, config, count_tiles=False,
                         padding=padding)

    def _complete(self, config, q_shape, dtype, band) -> TritonConfig:
        """``config`` with every None field set to its default; checks the tiles divide the band."""
        head_dim, itemsize = q_shape[-1], jnp.dtype(dtype).itemsize
        bq = band[0] if config.block_q is None else config.block_q
        bk = band[1] if config.block_k is None else config.block_k
        schedule.check_band(band, bq, bk)
        nw, ns = _default_launch(head_dim, itemsize, bq)
        return dataclasses.replace(
            config,
            block_q=bq,
            block_k=bk,
            num_warps=nw if config.num_warps is None else config.num_warps,
            num_stages=ns if config.num_stages is None else config.num_stages,
            interpret=jax.default_backend() != "gpu" if config.interpret is None else config.interpret,
        )

    def _run(self, q, k, v, hw, cache, text_len, text_first, band, config, *, count_tiles, padding=0):
        cfg = self._complete(TritonConfig() if config is None else config, q.shape, q.dtype, band)
        return _headwise_jit(
            q,
            k,
            v,
            hw,
            cache,
            text_len=int(text_len),
            text_first=bool(text_first),
            band=tuple(band),
            block_q=cfg.block_q,
            block_k=cfg.block_k,
            interpret=bool(cfg.interpret),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            sort_heads=cfg.sort_heads,
            count_tiles=count_tiles,
            single_loop=cfg.single_loop,
            padding=int(padding),
        )


def headwise_attention_with_tile_counts(
    q,
    k,
    v,
    head_window,
    cache=None,
    *,
    text_len: int,
    text_first: bool,
    band: tuple[int, int] | None = None,
    config: TritonConfig | None = None,
):
    """:func:`pallas_kernels.headwise_attention` on backend "triton", also
    returning int32 ``[batch, heads, n_q]``: the key tiles each program
    attended to (execution tiles).  For tests and benchmarks."""
    hw, band = validate(q, k, v, head_window, cache, text_len=text_len, text_first=text_first, band=band)
    return TritonBackend()._run(q, k, v, hw, cache, text_len, text_first, band, config, count_tiles=True)


# ----------------------------------------------------------------------------
# Tile math: one online-softmax step over a key tile.


def _attend_tile(q, k, v, carry, *, qk_scale, key_valid=None):
    """Updates (acc, m, l) with one key tile.

    ``m`` is kept in the scaled base-2 domain (``qk_scale`` includes log2(e)),
    so ``exp2(s * qk_scale - m)`` contracts to one FMA per score.
    """
    acc, m_prev, l_prev = carry
    # float32 inputs: exact (IEEE) products, not the TF32 default of Triton.
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)
    if key_valid is not None:
        s = jnp.where(key_valid[None, :], s, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1) * qk_scale)
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s * qk_scale - m_next[:, None])
    l_next = l_prev * alpha + jnp.sum(p, axis=1)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
    )
    acc = acc * alpha[:, None] + pv
    return acc, m_next, l_next


# ----------------------------------------------------------------------------
# Kernel: schedule lookup, key-tile loop(s), store.


def _head_of_slot(hw_ref, slot):
    """Head run in grid slot ``slot`` (0 = heaviest).

    Heads are ranked by cost, computed from the (padded) window vector by every
    program with a few vector ops, so no sort runs outside the kernel: full
    heads first, then arrows by decreasing window, cached last (ties by index;
    padding entries are 0 and rank last).
    """
    hv = hw_ref[...]
    key = jnp.where(hv < 0, jnp.iinfo(jnp.int32).max, hv)
    idx = lax.broadcasted_iota(jnp.int32, hv.shape, 0)
    ahead = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (idx[None, :] < idx[:, None]))
    rank = jnp.sum(ahead.astype(jnp.int32), axis=1)
    return jnp.sum(jnp.where(rank == slot, idx, 0))


def _kernel(
    hw_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    batch,
    tokens,
    key_tokens,
    text_len,
    text_first,
    band,
    block_q,
    block_k,
    q_rotation,
    has_cache,
    count_tiles,
    single_loop,
    sort_heads,
):
    if has_cache:
        refs = refs[1:]  # the aliased cache input is never read
    o_ref = refs[0]
    cnt_ref = refs[1] if count_tiles else None

    nq = schedule.num_tiles(tokens, block_q)
    nk = schedule.num_tiles(tokens, block_k)
    n_full_k = key_tokens // block_k  # key tiles without padding
    pad_q = tokens % block_q != 0
    pad_k = key_tokens % block_k != 0
    head_dim = q_ref.shape[-1]
    qk_scale = _LOG2E / math.sqrt(head_dim)

    pid = pl.program_id(0)
    b = pid % batch
    item = pid // batch
    h = _head_of_slot(hw_ref, item // nq) if sort_heads else item // nq
    qt = (item % nq + q_rotation) % nq
    w = hw_ref[h]
    t0, t1, b0, b1 = schedule.kv_tile_ranges(
        qt,
        w,
        tokens=tokens,
        text_len=text_len,
        text_first=text_first,
        block_q=block_q,
        block_k=block_k,
        band=band,
        xp=jnp,
    )
    n_tiles = (t1 - t0) + (b1 - b0)

    if count_tiles:
        cnt_ref[b, h, qt] = n_tiles * 0

    @pl.when(n_tiles > 0)
    def _compute():
        q_start = pl.multiple_of(qt * block_q, block_q)
        q_rows = q_start + jnp.arange(block_q, dtype=jnp.int32)
        q_blk = q_ref.at[b, pl.ds(q_start, block_q), h, :]
        if pad_q:
            q = plgpu.load(q_blk, mask=(q_rows < tokens)[:, None], other=0.0)
        else:
            q = plgpu.load(q_blk)

        def step(kt, carry, masked):
            k_start = pl.multiple_of(kt * block_k, block_k)
            k_blk = k_ref.at[b, pl.ds(k_start, block_k), h, :]
            v_blk = v_ref.at[b, pl.ds(k_start, block_k), h, :]
            if masked:
                valid = (k_start + jnp.arange(block_k, dtype=jnp.int32)) < key_tokens
                kk = plgpu.load(k_blk, mask=valid[:, None], other=0.0)
                vv = plgpu.load(v_blk, mask=valid[:, None], other=0.0)
            else:
                valid = None
                kk = plgpu.load(k_blk)
                vv = plgpu.load(v_blk)
            if count_tiles:
                acc_m_l, cnt = carry
                return _attend_tile(q, kk, vv, acc_m_l, qk_scale=qk_scale, key_valid=valid), cnt + 1
            return _attend_tile(q, kk, vv, carry, qk_scale=qk_scale, key_valid=valid)

        carry = (
            jnp.zeros((block_q, head_dim), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32),
        )
        if count_tiles:
            carry = (carry, jnp.int32(0))

        if single_loop:
            # One pipelined loop over a virtual index running through both ranges;
            # the range that ends at n_k (it may hold the padded key tile) goes
            # last, so the padded tile is the final step and gets its own masked
            # iteration after the loop.
            t_last = t1 == nk
            a0 = jnp.where(t_last, b0, t0)
            a1 = jnp.where(t_last, b1, t1)
            c0 = jnp.where(t_last, t0, b0)
            n_a = a1 - a0
            n_run = n_tiles
            if pad_k:
                ends_padded = ((t1 == nk) & (t1 > t0)) | ((b1 == nk) & (b1 > b0))
                n_run = n_tiles - ends_padded.astype(jnp.int32)

            def virtual(i, carry):
                kt = jnp.where(i < n_a, a0 + i, c0 + (i - n_a))
                return step(kt, carry, masked=False)

            carry = lax.fori_loop(0, n_run, virtual, carry)
            if pad_k:
                carry = lax.fori_loop(
                    n_full_k, n_full_k + (n_tiles - n_run), functools.partial(step, masked=True), carry
                )
        else:

            def run_range(lo, hi, carry):
                if not pad_k:
                    return lax.fori_loop(lo, hi, functools.partial(step, masked=False), carry)
                mid = jnp.minimum(hi, n_full_k)
                carry = lax.fori_loop(lo, mid, functools.partial(step, masked=False), carry)
                # The last, partial key tile (0 or 1 iteration).
                return lax.fori_loop(jnp.maximum(lo, n_full_k), hi, functools.partial(step, masked=True), carry)

            carry = run_range(t0, t1, carry)
            carry = run_range(b0, b1, carry)

        if count_tiles:
            carry, cnt = carry
        acc, _, l = carry
        out = (acc / l[:, None]).astype(o_ref.dtype)
        o_blk = o_ref.at[b, pl.ds(q_start, block_q), h, :]
        if pad_q:
            plgpu.store(o_blk, out, mask=(q_rows < tokens)[:, None])
        else:
            plgpu.store(o_blk, out)
        if count_tiles:
            cnt_ref[b, h, qt] = cnt


@functools.partial(
    jax.jit,
    static_argnames=(
        "text_len",
        "text_first",
        "band",
        "block_q",
        "block_k",
        "interpret",
        "num_warps",
        "num_stages",
        "sort_heads",
        "count_tiles",
        "single_loop",
        "padding",
    ),
)
def _headwise_jit(
    q,
    k,
    v,
    hw,
    cache,
    *,
    text_len,
    text_first,
    band,
    block_q,
    block_k,
    interpret,
    num_warps,
    num_stages,
    sort_heads,
    count_tiles,
    single_loop,
    padding=0,
):
    batch, tokens, heads, head_dim = q.shape
    has_cache = cache is not None
    if not has_cache:
        hw = jnp.where(hw == 0, -1, hw)  # documented: no cache -> full
    hw = jnp.maximum(hw, -1)
    nq = schedule.num_tiles(tokens, block_q)
    # Pad the plan to a power of two (Triton tensors); padding = cached heads,
    # ranked last and never scheduled.
    hpad = max(16, 1 << (heads - 1).bit_length())
    hw = jnp.pad(hw, (0, hpad - heads))

    kernel = functools.partial(
        _kernel,
        batch=batch,
        tokens=tokens,
        key_tokens=tokens - padding,
        text_len=text_len,
        text_first=text_first,
        band=band,
        block_q=block_q,
        block_k=block_k,
        q_rotation=schedule.rotate_text_tiles_first(tokens, text_len, text_first, block_q),
        has_cache=has_cache,
        count_tiles=count_tiles,
        single_loop=single_loop,
        sort_heads=sort_heads,
    )

    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if count_tiles:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, nq), jnp.int32))
    args = [hw, q, k, v] + ([cache] if has_cache else [])
    outs = pl.pallas_call(
        kernel,
        grid=(batch * heads * nq,),
        out_shape=out_shape,
        input_output_aliases={4: 0} if has_cache else {},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="headwise_attention",
    )(*args)
    return tuple(outs) if count_tiles else outs[0]
