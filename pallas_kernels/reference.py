"""Dense pure-JAX reference of :func:`pallas_kernels.headwise_attention`."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import schedule
from pallas_kernels._validate import validate

__all__ = ["reference_headwise_attention"]


def reference_headwise_attention(
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
) -> jax.Array:
    """Same function as the kernel, computed densely with an explicit mask.

    The mask is :func:`pallas_kernels.schedule.dense_mask` (tile-granular band,
    so ``block_q``/``block_k`` must match the kernel's; both default to
    :func:`pallas_kernels.default_block_sizes`).  Math in float32 (HIGHEST
    precision dots); result in q's dtype.  Cached heads (window 0) return
    ``cache[:, :, h, :]`` exactly; with ``cache=None`` a traced 0 computes as
    full, like the kernel.  Memory is O(heads * tokens^2): for tests.
    """
    hw, bq, bk = validate(
        q, k, v, head_window, cache, text_len=text_len, text_first=text_first, block_q=block_q, block_k=block_k
    )
    return _reference(q, k, v, hw, cache, text_len=int(text_len), text_first=bool(text_first), block_q=bq, block_k=bk)


@functools.partial(jax.jit, static_argnames=("text_len", "text_first", "block_q", "block_k"))
def _reference(q, k, v, hw, cache, *, text_len, text_first, block_q, block_k):
    _, tokens, _, head_dim = q.shape
    if cache is None:
        hw = jnp.where(hw == 0, -1, hw)
    hw = jnp.maximum(hw, -1)
    mask = schedule.dense_mask(
        hw, tokens=tokens, text_len=text_len, text_first=text_first, block_q=block_q, block_k=block_k, xp=jnp
    )  # [H, Tq, Tk]
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=jax.lax.Precision.HIGHEST) / math.sqrt(head_dim)
    s = jnp.where(mask[None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with nothing (cached heads)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=jax.lax.Precision.HIGHEST)
    o = o.astype(q.dtype)
    if cache is not None:
        o = jnp.where((hw == 0)[None, None, :, None], cache, o)
    return o
