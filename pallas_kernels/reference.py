"""Backend "xla": the head-wise function computed densely with an explicit mask (any platform)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import fp8 as fp8_ops
from pallas_kernels import schedule

__all__ = ["XlaConfig", "XlaBackend"]


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """Launch configuration of the XLA backend: it has no options."""


class XlaBackend:
    """Dense masked attention in XLA: the mask is :func:`pallas_kernels.schedule.dense_mask`.

    Math in float32 (HIGHEST precision dots); result in q's dtype.  Cached
    heads (window 0) return ``cache[:, :, h, :]`` exactly; with ``cache=None``
    a traced 0 computes as full, like every backend.  FP8 heads (``fp8``,
    window -2) use the operands of :func:`pallas_kernels.fp8.quantize` and P
    rounded to e4m3 against the final row maximum.  Memory is
    O(heads * tokens^2): for tests, CPU runs and small shapes.
    """

    name = "xla"
    config_type = XlaConfig
    runs_fp8 = True

    def default_config(self, q_shape, dtype, band) -> XlaConfig:
        return XlaConfig()

    def supports(self, q_shape, dtype, band, platform) -> str | None:
        return None

    def __call__(self, q, k, v, head_window, cache, *, text_len, text_first, band, config, fp8=False, padding=0):
        """Validated arguments (``head_window`` int32, ``band`` a pair) -> output."""
        return _reference(q, k, v, head_window, cache, text_len=int(text_len), text_first=bool(text_first),
                          band=tuple(band), fp8=bool(fp8), padding=int(padding))


@functools.partial(jax.jit, static_argnames=("text_len", "text_first", "band", "fp8", "padding"))
def _reference(q, k, v, hw, cache, *, text_len, text_first, band, fp8=False, padding=0):
    _, tokens, _, head_dim = q.shape
    if cache is None:
        hw = jnp.where(hw == 0, -1, hw)
    is_fp8 = (hw == fp8_ops.FP8_WINDOW) & fp8
    hw = jnp.maximum(hw, -1)
    mask = schedule.dense_mask(hw, tokens=tokens, text_len=text_len, text_first=text_first, band=band,
                               padding=padding, xp=jnp)
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    o = _attend(qf, kf, vf, mask, head_dim)
    if fp8:
        ops = fp8_ops.quantize(q, k, v)
        scale = ops.scales[:, None, :, None, :]  # [B, 1, H, 1, 3]
        o8 = _attend(ops.q8.astype(jnp.float32) * scale[..., 0], ops.k8.astype(jnp.float32) * scale[..., 1],
                     ops.v8t.transpose(0, 3, 1, 2).astype(jnp.float32), mask, head_dim, fp8_p=True) * scale[..., 2]
        o = jnp.where(is_fp8[None, None, :, None], o8, o)
    o = o.astype(q.dtype)
    if cache is not None:
        o = jnp.where((hw == 0)[None, None, :, None], cache, o)
    return o


def _attend(q, k, v, mask, head_dim, fp8_p=False):
    """Masked softmax attention in float32; ``fp8_p``: P as e4m3 values of ``448 * p`` (normalised by their
    unrounded sum), as the FP8 kernels feed it to the ``P V`` matmul."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) / math.sqrt(head_dim)
    s = jnp.where(mask[None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with nothing (cached heads)
    p = jnp.exp(s - m)
    if fp8_p:
        p = p * fp8_ops.FP8_MAX
    l = jnp.sum(p, axis=-1, keepdims=True)
    if fp8_p:
        p = p.astype(fp8_ops.FP8_DTYPE).astype(jnp.float32)
    p = p / jnp.where(l > 0, l, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=jax.lax.Precision.HIGHEST)
