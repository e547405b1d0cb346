"""The one attention entry point every MMDiT block calls.

`joint_attention` takes q, k, v in [batch, tokens, heads, head_dim] plus where the text tokens sit (`text_len`,
`text_first`) and how many tokens at the end are padding (`padding`: SD3 carries its joint sequence padded to a
multiple of 8 tokens, which the Mosaic GPU kernel's TMA needs; no query attends to a padding key). Without a plan
every head is exact attention through `dense_attention`:

* ``"xla"``: plain softmax attention in XLA (any device; fp32 math for the softmax);
* ``"cudnn"``: `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16);
* ``"auto"``: cuDNN for half precision on a GPU, XLA otherwise.

With a per-head plan (`head_window: int32[heads]`: -1 full, 0 cached, w > 0 arrow with image-band half-width w,
-2 full in FP8 when `AttentionSettings.fp8`;
`cache: [batch, tokens, heads, head_dim]` the last computed output of each head) the head-wise kernel runs, through
the backend `pallas_kernels.headwise_attention` picks for the device (or the one `AttentionSettings.backend`
names). Both are data, so one compiled model serves every step of a sampler whose plan changes per step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ditfa_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """How attention runs; static under jit (hashable).

    `implementation`: dense attention (IMPLEMENTATIONS). `backend`: the head-wise kernel backend for layers with a
    plan (None: the first one that supports the device, see `pallas_kernels.BACKENDS`). `band`: the arrow band's
    granularity (query, key tokens) of the plan being run (None: the kernel's default for the head size).
    `shortcuts`: a layer whose heads are all full runs dense attention and one whose heads are all cached skips its
    q/k/v projections (same function, less work); False sends every planned layer through the kernel backend, as
    tests that check the kernel path need. `mesh`: a (data, heads) `jax.sharding.Mesh` to run attention on each
    device's slice of the batch and heads (`ditfa_jax.sharding`); None: one device. `fp8`: heads of window -2 run
    in FP8 (`pallas_kernels.fp8`), on a backend that can; the sampler sets it for a plan with FP8 heads.
    """
    implementation: str = "auto"
    backend: str | None = None
    band: tuple[int, int] | None = None
    shortcuts: bool = True
    mesh: jax.sharding.Mesh | None = None
    fp8: bool = False

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {self.implementation!r}: expected one of {IMPLEMENTATIONS}")


def default_implementation(dtype) -> str:
    """cuDNN flash attention on a GPU for half-precision inputs, XLA otherwise."""
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, padding: int = 0) -> jax.Array:
    """Exact softmax attention with fp32 logits and softmax; [B, T, H, D] in and out; the last `padding` keys
    masked."""
    scale = 1.0 / (q.shape[-1] ** 0.5)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if padding:
        logits = jnp.where(jnp.arange(k.shape[1]) < k.shape[1] - padding, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto",
                    padding: int = 0) -> jax.Array:
    """Exact attention of every head through cuDNN or XLA ("auto": cuDNN for half precision on a GPU); the last
    `padding` keys masked (q may have fewer rows than k and v)."""
    if implementation == "auto":
        implementation = default_implementation(q.dtype)
    if implementation == "cudnn":
        lengths = None
        if padding:
            lengths = jnp.full((k.shape[0],), k.shape[1] - padding, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    return xla_attention(q, k, v, padding)


def headwise(q, k, v, head_window, cache, *, text_len: int, text_first: bool, padding: int = 0,
             settings: AttentionSettings = AttentionSettings(), query_tiles=None) -> jax.Array:
    """The head-wise kernel on one layer (no shortcut): the backend `settings` names or the device's default;
    ``query_tiles`` and ``padding`` as in `pallas_kernels.headwise_attention`."""
    import pallas_kernels  # deferred: the kernel package is only needed with a plan

    return pallas_kernels.headwise_attention(q, k, v, head_window, cache, text_len=text_len, text_first=text_first,
                                             band=settings.band, backend=settings.backend, query_tiles=query_tiles,
                                             fp8=settings.fp8, padding=padding)


def joint_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    text_len: int,
    text_first: bool,
    padding: int = 0,
    head_window: jax.Array | None = None,
    cache: jax.Array | None = None,
    head_order: jax.Array | None = None,
    settings: AttentionSettings = AttentionSettings(),
) -> jax.Array:
    """Joint text-image attention of one layer; returns [batch, tokens, heads, head_dim] in q's dtype.

    Without a plan (`head_window=None`) every head is exact attention. With a plan the head-wise kernel runs and
    cached heads return `cache`'s value for that head; with `settings.shortcuts`, a step whose heads are all full
    runs the dense path (the uncompressed model's attention, cuDNN on a GPU). With `settings.mesh` each device runs
    its slice of the batch and heads; `head_order` (a permutation of the heads, `ditfa_jax.sharding.balance_heads`)
    says which heads share a device.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"joint_attention expects q, k, v of one shape [batch, tokens, heads, head_dim]; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}")
    if not 0 <= text_len <= q.shape[1] - padding:
        raise ValueError(f"text_len={text_len} must lie in [0, tokens={q.shape[1]} - padding={padding}]")
    if sharding.is_parallel(settings.mesh):
        local = dataclasses.replace(settings, mesh=None)

        def attend(q, k, v, head_window, cache):
            return joint_attention(q, k, v, text_len=text_len, text_first=text_first, padding=padding,
                                   head_window=head_window, cache=cache, settings=local)

        return sharding.head_parallel(attend, settings.mesh, q, k, v, head_window, cache, head_order)
    if head_window is None:
        return dense_attention(q, k, v, settings.implementation, padding)

    def compressed():
        return headwise(q, k, v, head_window, cache, text_len=text_len, text_first=text_first, padding=padding,
                        settings=settings)

    if not settings.shortcuts:
        return compressed()
    return jax.lax.cond(jnp.all(head_window == -1),
                        lambda: dense_attention(q, k, v, settings.implementation, padding), compressed)
