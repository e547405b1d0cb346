"""Backend "xla": the head-wise function computed densely with an explicit mask (any platform)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import schedule

__all__ = ["XlaConfig", "XlaBackend"]


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """Launch configuration of the XLA backend: it has no options."""


class XlaBackend:
    """Dense masked attention in XLA: the mask is :func:`pallas_kernels.schedule.dense_mask`.

    Math in float32 (HIGHEST precision dots); result in q's dtype.  Cached
    heads (window 0) return ``cache[:, :, h, :]`` exactly; with ``cache=None``
    a traced 0 computes as full, like every backend.  Memory is
    O(heads * tokens^2): for tests, CPU runs and small shapes.
    """

    name = "xla"
    config_type = XlaConfig

    def default_config(self, q_shape, dtype, band) -> XlaConfig:
        return XlaConfig()

    def supports(self, q_shape, dtype, band, platform) -> str | None:
        return None

    def __call__(self, q, k, v, head_window, cache, *, text_len, text_first, band, config):
        """Validated arguments (``head_window`` int32, ``band`` a pair) -> output."""
        return _reference(q, k, v, head_window, cache, text_len=int(text_len), text_first=bool(text_first),
                          band=tuple(band))


@functools.partial(jax.jit, static_argnames=("text_len", "text_first", "band"))
def _reference(q, k, v, hw, cache, *, text_len, text_first, band):
    _, tokens, _, head_dim = q.shape
    if cache is None:
        hw = jnp.where(hw == 0, -1, hw)
    hw = jnp.maximum(hw, -1)
    mask = schedule.dense_mask(hw, tokens=tokens, text_len=text_len, text_first=text_first, band=band, xp=jnp)
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
