"""The one attention entry point every MMDiT block calls.

`joint_attention` takes q, k, v in [batch, tokens, heads, head_dim] plus where the text tokens sit (`text_len`,
`text_first`), and dispatches to an implementation:

* ``"xla"``: plain softmax attention in XLA (any device; fp32 math for the softmax).
* ``"cudnn"``: `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16).
* ``"pallas"``: the head-wise compressed kernel (`pallas_kernels.headwise_attention`), used whenever a per-head
  plan is given on a GPU. Elsewhere a plan runs the kernel's dense masked reference (same function, XLA; the
  kernel's interpret mode is ~10x slower) unless ``"pallas"`` is asked for.

A per-head plan is `head_window: int32[heads]` (-1 full, 0 cached, w > 0 arrow with image-band half-width w) and
`cache: [batch, tokens, heads, head_dim]` holds the last computed output of each head (the value a cached head
returns). Both are data, so one compiled model serves every step of a sampler whose plan changes per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")


def default_implementation(dtype) -> str:
    """cuDNN flash attention on a GPU for half-precision inputs, XLA otherwise."""
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Exact softmax attention with fp32 logits and softmax; [B, T, H, D] in and out."""
    scale = 1.0 / (q.shape[-1] ** 0.5)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto") -> jax.Array:
    """Exact attention of every head through cuDNN or XLA ("auto": cuDNN for half precision on a GPU)."""
    if implementation == "auto":
        implementation = default_implementation(q.dtype)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return xla_attention(q, k, v)


def joint_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    text_len: int,
    text_first: bool,
    head_window: jax.Array | None = None,
    cache: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Joint text-image attention of one layer; returns [batch, tokens, heads, head_dim] in q's dtype.

    Without a plan (`head_window=None`) every head is exact attention. With a plan, the head-wise kernel runs and
    cached heads return `cache`'s value for that head; a plan whose heads are all full runs the dense path (the
    uncompressed model's attention). `implementation="pallas"` forces the kernel.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"joint_attention expects q, k, v of one shape [batch, tokens, heads, head_dim]; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}")
    if not 0 <= text_len <= q.shape[1]:
        raise ValueError(f"text_len={text_len} must lie in [0, tokens={q.shape[1]}]")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")

    if head_window is not None or implementation == "pallas":
        import pallas_kernels  # deferred: the kernel package is only needed with a plan

        if head_window is None:
            head_window = jnp.full((q.shape[2],), -1, jnp.int32)

        backend = "triton" if implementation == "pallas" else None  # None: the platform's default backend

        def compressed():
            return pallas_kernels.headwise_attention(q, k, v, head_window, cache, text_len=text_len,
                                                     text_first=text_first, backend=backend)

        if implementation == "pallas":
            return compressed()
        # An all-full plan (e.g. every step 0) takes the dense path: identical to the uncompressed model, and
        # cuDNN is the fastest dense attention on a GPU.
        return jax.lax.cond(jnp.all(head_window == -1), lambda: dense_attention(q, k, v, implementation), compressed)

    return dense_attention(q, k, v, implementation)
