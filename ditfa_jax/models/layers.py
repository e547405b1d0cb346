"""Building blocks shared by the FLUX.1 and SD3/SD3.5 MMDiTs, in Flax NNX.

Module and attribute names mirror the diffusers modules (`to_q`, `norm1.linear`, `ff.net_0.proj`, ...) so that
checkpoint conversion is a mechanical rename. Parameters keep the checkpoint dtype (bf16 or fp32); normalisations and
the sinusoidal embeddings compute in float32 and cast back, as diffusers does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ditfa_jax.attention import AttentionSettings, joint_attention


class Linear(nnx.Linear):
    """`nnx.Linear`, or its FP8 form once `ditfa_jax.fp8.quantize_transformer` gave it an e4m3 kernel (stored
    [out, in]) and a per-output-channel ``kernel_scale`` (then the activations are quantised per token on the fly)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel.get_value()
        if kernel.dtype != jnp.float8_e4m3fn:
            return super().__call__(x)
        from ditfa_jax.fp8 import fp8_matmul

        y = fp8_matmul(x, kernel, self.kernel_scale.get_value())
        if self.bias is not None:
            y = y + self.bias.get_value().astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)

    def rows(self, x: jax.Array, start: int, stop: int, *, bias: bool) -> jax.Array:
        """``x @ kernel[start:stop]`` (+ the bias if ``bias``): the product with input features start..stop only,
        where x holds just those; the sum of such parts over a split of the inputs is the layer's output."""
        kernel = self.kernel.get_value()
        if kernel.dtype == jnp.float8_e4m3fn:  # stored [out, in]
            from ditfa_jax.fp8 import fp8_matmul

            y = fp8_matmul(x, kernel[:, start:stop], self.kernel_scale.get_value())
        else:
            dtype = self.dtype or x.dtype
            y = jnp.dot(x.astype(dtype), kernel[start:stop].astype(dtype), precision=self.precision)
        if bias and self.bias is not None:
            y = y + self.bias.get_value().astype(y.dtype)
        return y.astype(self.dtype or x.dtype)


def linear(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, bias: bool = True) -> Linear:
    """A dense layer whose kernel is [in, out] (the transpose of torch's weight)."""
    return Linear(
        in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs,
        kernel_init=nnx.initializers.normal(0.02), bias_init=nnx.initializers.normal(0.02),
    )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters (every MMDiT norm that adaLN modulates)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale (diffusers' / torch's RMSNorm, weight named `weight`)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = nnx.Param(1.0 + 0.1 * jax.random.normal(rngs.params(), (dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift, with per-sample shift/scale [B, C] broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNorm(nnx.Module):
    """adaLN: SiLU -> Linear(dim, n*dim) on the conditioning, split into n chunks.

    `n` is 6 for AdaLayerNormZero (shift, scale, gate for attention and MLP), 3 for the single-stream variant,
    9 for SD3.5's MMDiT-X variant and 2 for AdaLayerNormContinuous (note: scale first, then shift).
    """

    def __init__(self, dim: int, n_chunks: int, *, dtype, rngs: nnx.Rngs):
        self.n_chunks = n_chunks
        self.linear = linear(dim, n_chunks * dim, dtype=dtype, rngs=rngs)

    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        return jnp.split(self.linear(jax.nn.silu(temb)), self.n_chunks, axis=-1)


class GELUProj(nnx.Module):
    """diffusers' GELU activation module: a projection followed by tanh-approximate GELU."""

    def __init__(self, dim: int, inner: int, *, dtype, rngs: nnx.Rngs):
        self.proj = linear(dim, inner, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    """diffusers' FeedForward(activation_fn="gelu-approximate"): net.0 = GELU(proj), net.2 = Linear."""

    def __init__(self, dim: int, *, mult: int = 4, dtype, rngs: nnx.Rngs):
        self.net_0 = GELUProj(dim, dim * mult, dtype=dtype, rngs=rngs)
        self.net_2 = linear(dim * mult, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net_2(self.net_0(x))


def reorder_tokens(x: jax.Array, image_order) -> jax.Array:
    """Image tokens [B, S, ...] from raster order into `image_order` (raster indices; None keeps raster)."""
    return x if image_order is None else jnp.take(x, jnp.asarray(image_order), axis=1)


def restore_tokens(x: jax.Array, image_order) -> jax.Array:
    """Inverse of `reorder_tokens`: tokens in `image_order` back to raster order."""
    return x if image_order is None else jnp.take(x, jnp.argsort(jnp.asarray(image_order)), axis=1)


def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """diffusers' get_timestep_embedding with flip_sin_to_cos=True, downscale_freq_shift=0: [cos | sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPEmbedder(nnx.Module):
    """Linear -> SiLU -> Linear (diffusers' TimestepEmbedding and PixArtAlphaTextProjection(act="silu"))."""

    def __init__(self, in_dim: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = linear(in_dim, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbedding(nnx.Module):
    """Conditioning vector: timestep MLP (+ guidance MLP for FLUX-dev) + pooled-text MLP.

    diffusers' CombinedTimestepTextProjEmbeddings / CombinedTimestepGuidanceTextProjEmbeddings. Timesteps are
    taken as the model sees them (FLUX: sigma*1000 after the model's own scaling; SD3: the scheduler's timestep).
    """

    def __init__(self, dim: int, pooled_dim: int, *, guidance: bool, dtype, rngs: nnx.Rngs):
        self.timestep_embedder = MLPEmbedder(256, dim, dtype=dtype, rngs=rngs)
        self.guidance_embedder = MLPEmbedder(256, dim, dtype=dtype, rngs=rngs) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
        dtype = pooled.dtype
        emb = self.timestep_embedder(timestep_sinusoid(timestep).astype(dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model has a guidance embedding (FLUX.1-dev style): pass `guidance`")
            emb = emb + self.guidance_embedder(timestep_sinusoid(guidance).astype(dtype))
        return emb + self.text_embedder(pooled)


def create_stack(make_block, n: int, rngs: nnx.Rngs):
    """Create `n` blocks with identical structure whose parameters are stacked on a leading layer axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return make_block(r)

    return make(rngs)


def scan_stack(stack, carry, xs, body):
    """Run `body(block, carry, x) -> (carry, y)` over a stack of blocks with `lax.scan`.

    The stack is split into its graph and stacked state outside the scan and merged per layer inside it, so compile
    time does not grow with depth. `xs` is any pytree of per-layer arrays (leading layer axis) or None.
    """
    graphdef, state = nnx.split(stack)

    def step(c, layer):
        layer_state, x = layer
        return body(nnx.merge(graphdef, layer_state), c, x)

    return jax.lax.scan(step, carry, (state, xs))


def attention_inputs(block, carry, temb, rope):
    """adaLN (`prepare`) then q, k, v of one MMDiT block: (ctx for `finish`, (q, k, v) [B, T, H, D])."""
    ctx = block.prepare(carry, temb)
    return ctx, block.qkv(ctx, rope)


def block_forward(block, carry, temb, rope, layer_plan, layout, settings: AttentionSettings, mlp_plan=None):
    """One MMDiT block: adaLN, q/k/v, joint attention, then `finish`; returns (carry, attention output).

    With a plan, `layer_plan = (head_window [H], cache [B, T, H, D], head_order [H] or None)`: the head-wise kernel
    runs and cached heads return the cache; with `settings.shortcuts`, a layer whose heads are all cached skips
    q/k/v and the kernel. `head_order` groups the heads over a mesh's devices (`ditfa_jax.sharding`). The attention
    output (all rows, before the output projection) is what the next step's cache holds.

    With ``mlp_plan = (runs, cached)`` (a traced bool and the MLP branch's value from the last step it ran, shaped
    like the carry) the MLP branch runs only where ``runs``, else its cached value is used (FORA-like); then the
    result is (carry, attention output, the MLP branch's value).
    """
    head_window, cache, head_order = layer_plan if layer_plan is not None else (None, None, None)
    ctx = block.prepare(carry, temb)

    def attend():
        q, k, v = block.qkv(ctx, rope)
        return joint_attention(q, k, v, text_len=layout.text_len, text_first=layout.text_first,
                               padding=layout.padding, head_window=head_window, cache=cache, head_order=head_order,
                               settings=settings)

    if layer_plan is None or not settings.shortcuts:
        out = attend()
    else:
        out = jax.lax.cond(jnp.all(head_window == 0), lambda: cache, attend)
    if mlp_plan is None:
        return block.finish(carry, ctx, out), out
    runs, cached = mlp_plan
    mid = block.finish_attention(carry, ctx, out)
    value = jax.lax.cond(runs, lambda: _like(block.mlp(mid, ctx), cached), lambda: cached)
    return block.add_mlp(mid, ctx, value), out, value


def _like(tree, reference):
    """`tree` cast leaf by leaf to the dtypes of `reference` (the two branches of a cond must agree)."""
    return jax.tree_util.tree_map(lambda a, r: a.astype(r.dtype), tree, reference)


def run_stacks(model, carry, temb, rope, plan, layout, settings: AttentionSettings):
    """Scan every block stack of `model` in order; returns (carry, per-layer attention outputs or None).

    `plan` is None or (head_window [layers, H], cache [layers, ...][, head_order [layers, H] or None]) over all
    layers of all stacks. The whole cache rides in the scan carry and each layer overwrites its own slot
    (`dynamic_update_index_in_dim`), so XLA updates it in place: the sampler holds one copy of the cache, not the
    old one, per-stack outputs and their concatenation.
    """
    carry, cache, _, _ = run_stacks_with_blocks(model, carry, temb, rope, plan, layout, settings)
    return carry, cache


def empty_block_residuals(model, carry):
    """Per stack, zeros shaped like its blocks' residual cache: the stack's carry with a leading layer axis (from
    the first stack's input `carry`; blocks keep their carry's shape)."""
    residuals = []
    for index, (_, _, count) in enumerate(model.stacks()):
        carry = model.enter_stack(index, carry)
        residuals.append(jax.tree_util.tree_map(lambda a, n=count: jnp.zeros((n, *a.shape), a.dtype), carry))
    return residuals


def run_stacks_with_blocks(model, carry, temb, rope, plan, layout, settings: AttentionSettings, compute=None,
                           residuals=None, mlp_compute=None, mlp_cache=None):
    """`run_stacks`, optionally with block-residual and MLP-branch caching; returns (carry, attention cache,
    residuals, MLP cache).

    `compute` [layers] bool says which blocks run; a block that does not run returns its input plus `residuals`'
    entry for it (its output minus its input when it last ran: FBCache/DBCache-like reuse), so its attention heads
    and its attention-cache slot are left alone. `residuals` is per stack a pytree like the stack's carry with a
    leading layer axis (`empty_block_residuals`); the returned one holds the new residuals of the blocks that ran.
    Without `compute` (None), every block runs and no residual is kept.

    `mlp_compute` [layers] bool says which blocks run their MLP branch; the others use their entry of `mlp_cache`
    (shaped as `residuals`: the branch's value at the last step it ran), and the returned cache holds every
    block's value used. None: every MLP runs and none is kept.
    """
    cache = None if plan is None else plan[1]
    orders = plan[2] if plan is not None and len(plan) > 2 else None
    new_residuals = [] if compute is not None else None
    new_mlp = [] if mlp_compute is not None else None
    for index, (stack, first, count) in enumerate(model.stacks()):
        carry = model.enter_stack(index, carry)
        if plan is None and compute is None and mlp_compute is None:
            carry, _ = scan_stack(stack, carry, None, lambda block, c, _: (block_forward(
                block, c, temb, rope, None, layout, settings)[0], None))
            continue

        def body(block, state, layer):
            c, cache = state
            window, order, i, runs, residual, mlp_runs, mlp_value = layer

            def run():
                layer_plan = None if window is None else (
                    window, jax.lax.dynamic_index_in_dim(cache, i, keepdims=False), order)
                mlp_plan = None if mlp_runs is None else (mlp_runs, mlp_value)
                out_c, out, *used = block_forward(block, c, temb, rope, layer_plan, layout, settings, mlp_plan)
                new_cache = cache if window is None else jax.lax.dynamic_update_index_in_dim(cache, out, i, 0)
                kept = None if runs is None else jax.tree_util.tree_map(jnp.subtract, out_c, c)
                return (out_c, new_cache), (kept, used[0] if used else None)

            if runs is None:
                return run()
            return jax.lax.cond(runs, run, lambda: ((jax.tree_util.tree_map(jnp.add, c, residual), cache),
                                                    (residual, mlp_value)))

        layers = (None if plan is None else plan[0][first:first + count],
                  None if orders is None else orders[first:first + count], jnp.arange(first, first + count),
                  None if compute is None else compute[first:first + count],
                  None if compute is None else residuals[index],
                  None if mlp_compute is None else mlp_compute[first:first + count],
                  None if mlp_compute is None else mlp_cache[index])
        (carry, cache), (kept, mlp_used) = scan_stack(stack, (carry, cache), layers, body)
        if compute is not None:
            new_residuals.append(kept)
        if mlp_compute is not None:
            new_mlp.append(mlp_used)
    return carry, cache, new_residuals, new_mlp
