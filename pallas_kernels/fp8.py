"""FP8 heads: full attention with its two matmuls in float8 e4m3 (the head window :data:`FP8_WINDOW`).

A head with window ``-2`` attends to every key, like a full head (``-1``), with ``Q K^T`` and ``P V`` run in
e4m3 with float32 accumulation (FlashAttention-3's FP8 recipe):

* K is smoothed first, its mean over the tokens subtracted per (batch, head, channel): every score of a query
  row moves by the same amount, so the softmax is unchanged, and the quantised K loses less to a shared offset
  (SageAttention's observation);
* Q, smoothed K and V are scaled per (batch, head) so their largest magnitude maps to e4m3's largest value (448),
  and the scales are folded back into the softmax's exponent factor (Q, K) and the output (V);
* the softmax probabilities are quantised to e4m3 as ``448 * p``: the factor cancels between the numerator and
  the normaliser, and it puts ``p`` in e4m3's normal range.

:func:`quantize` is shared by the kernels and the XLA reference, so every backend quantises the same way; the
backends may still round ``P`` differently (the kernels against a running row maximum), so FP8 heads agree across
backends within FP8 error, not bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["FP8_WINDOW", "FP8_DTYPE", "FP8_MAX", "Fp8Operands", "quantize"]

FP8_WINDOW = -2
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
_TINY = 1e-30


class Fp8Operands(NamedTuple):
    """Quantised operands of the FP8 heads: ``q8``, ``k8`` ``[B, T, H, D]`` e4m3 (K smoothed), ``v8t`` ``[B, H,
    D, T]`` e4m3 (V transposed: the ``P V`` matmul needs V with the keys contiguous), ``scales`` ``[B, H, 3]``
    float32: what multiplies the e4m3 values of Q, K and V back to the originals."""

    q8: jax.Array
    k8: jax.Array
    v8t: jax.Array
    scales: jax.Array


def _scale(x):
    """Per-(batch, head) scale of ``x`` [B, T, H, D] (float32) so that its largest magnitude maps to FP8_MAX."""
    return jnp.maximum(jnp.max(jnp.abs(x), axis=(1, 3)), _TINY) / FP8_MAX


def quantize(q, k, v) -> Fp8Operands:
    """:class:`Fp8Operands` of ``q, k, v`` ``[B, T, H, D]`` (every head: the caller keeps the FP8 heads')."""
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    kf = kf - jnp.mean(kf, axis=1, keepdims=True)
    sq, sk, sv = _scale(qf), _scale(kf), _scale(vf)

    def to_fp8(x, s):
        return (x / s[:, None, :, None]).astype(FP8_DTYPE)

    return Fp8Operands(to_fp8(qf, sq), to_fp8(kf, sk), to_fp8(vf, sv).transpose(0, 2, 3, 1),
                       jnp.stack([sq, sk, sv], axis=-1))
