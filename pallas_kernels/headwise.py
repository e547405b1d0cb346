"""Head-wise arrow attention in Pallas (Triton lowering), with cached heads.

One launch computes a layer's joint attention where every head follows its
own method (full / arrow band / cached), chosen by the int32 data array
``head_window``; see :mod:`pallas_kernels.schedule` for the exact function.

Kernel structure (one program = one (batch, head, query tile)):

* grid order: one program per (batch, head, query tile), batch fastest, heads
  in index order, and inside a head the query tiles holding text (full rows,
  the heavy ones of an arrow head) first.  Optionally (``sort_heads``) heads
  are ranked heavy-first (full, wider arrows, narrower, cached last) by every
  program from the window vector, without any sort outside the kernel; on the
  H100 that was equal at FLUX-2K and 2-11 % slower on mixed plans at
  FLUX-1K/SD3-1K than index order, which interleaves heavy and light
  programs, so it is off by default (config.SORT_HEADS);
* the program computes its key-tile ranges ``[t0, t1)`` (text tiles, or all
  for full rows) and ``[b0, b1)`` (band) with
  :func:`pallas_kernels.schedule.kv_tile_ranges` and runs one pipelined
  online-softmax loop over a virtual index spanning both ranges (the range
  that ends at the last key tile goes second, so the padded key tile, if
  visited, is a separate masked final step), or one loop per range with
  ``single_loop=False``; :func:`_attend_tile` is the tile math.  No score is
  masked except in the last key tile when ``tokens`` is not a multiple of
  ``block_k``;
* cached heads (window 0): the program returns at once; the output buffer is
  the ``cache`` input (``input_output_aliases``), so the cache passes through
  bit for bit with no copy when the cache buffer can be donated (it is dead
  after the call, e.g. the previous output carried by a ``lax.scan``, or a
  ``jit`` argument in ``donate_argnums``); otherwise XLA inserts one copy of
  the cache before the kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import schedule
from pallas_kernels._validate import validate
from pallas_kernels.config import SINGLE_LOOP, SORT_HEADS, default_launch

__all__ = ["headwise_attention"]

_LOG2E = math.log2(math.e)
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def headwise_attention(
    q,
    k,
    v,
    head_window,
    cache=None,
    *,
    text_len: int,
    text_first: bool,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Joint attention where each head is full, arrow or cached.

    Args:
      q, k, v: ``[batch, tokens, heads, head_dim]``, bfloat16/float16/float32,
        same shape and dtype; ``head_dim`` in {16, 32, 64, 128, 256}.
      head_window: int32 ``[heads]`` data (may be traced; changing it does not
        recompile): -1 full, 0 cached, w > 0 arrow with image-band half-width w
        tokens (band defined at tile granularity, see
        :mod:`pallas_kernels.schedule`).
      cache: ``[batch, tokens, heads, head_dim]`` in q's dtype, the previous
        output; required when any head is cached.  Heads with window 0 return
        ``cache[:, :, h, :]`` bit for bit and are not computed.  If ``cache`` is
        None, a concrete ``head_window`` containing 0 raises ValueError; a
        traced one cannot be checked and its zeros compute as full attention.
        Give the call a donatable cache (dead afterwards) to avoid a copy.
      text_len: number of text tokens (static).
      text_first: True for [text, image] (FLUX), False for [image, text] (SD3).
      block_q, block_k: tile sizes (powers of two >= 16); default
        :func:`pallas_kernels.default_block_sizes` ``(head_dim)``.
      interpret: None = interpret mode unless the default backend is a GPU.

    Returns:
      ``[batch, tokens, heads, head_dim]`` in q's dtype; softmax scale
      ``1/sqrt(head_dim)``.
    """
    hw, bq, bk = validate(
        q, k, v, head_window, cache, text_len=text_len, text_first=text_first, block_q=block_q, block_k=block_k
    )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    nw, ns = default_launch(q.shape[-1], jnp.dtype(q.dtype).itemsize, bq, bk)
    return _headwise_jit(
        q,
        k,
        v,
        hw,
        cache,
        text_len=int(text_len),
        text_first=bool(text_first),
        block_q=bq,
        block_k=bk,
        interpret=bool(interpret),
        num_warps=nw,
        num_stages=ns,
        sort_heads=SORT_HEADS,
        count_tiles=False,
        single_loop=SINGLE_LOOP,
    )


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
    text_len,
    text_first,
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
    n_full_k = tokens // block_k  # key tiles without padding
    pad_q = tokens % block_q != 0
    pad_k = tokens % block_k != 0
    head_dim = q_ref.shape[-1]
    qk_scale = _LOG2E / math.sqrt(head_dim)

    pid = pl.program_id(0)
    b = pid % batch
    item = pid // batch
    h = _head_of_slot(hw_ref, item // nq) if sort_heads else item // nq
    qt = (item % nq + q_rotation) % nq
    w = hw_ref[h]
    t0, t1, b0, b1 = schedule.kv_tile_ranges(
        qt, w, tokens=tokens, text_len=text_len, text_first=text_first, block_q=block_q, block_k=block_k, xp=jnp
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
                valid = (k_start + jnp.arange(block_k, dtype=jnp.int32)) < tokens
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
        "block_q",
        "block_k",
        "interpret",
        "num_warps",
        "num_stages",
        "sort_heads",
        "count_tiles",
        "single_loop",
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
    block_q,
    block_k,
    interpret,
    num_warps,
    num_stages,
    sort_heads=SORT_HEADS,
    count_tiles=False,
    single_loop=SINGLE_LOOP,
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
        text_len=text_len,
        text_first=text_first,
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
