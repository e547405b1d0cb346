"""SD3 / SD3.5 MMDiT in Flax NNX, mirroring diffusers' `SD3Transformer2DModel`.

Covers SD3-medium (plain joint blocks), SD3.5-large (qk RMSNorm) and SD3.5-medium (MMDiT-X: a second, image-only
self-attention in the layers listed by `dual_attention_layers`). Token order is [image, text]; positions are a
2-D sin-cos table of `pos_embed_max_size`^2 entries (a checkpoint buffer) cropped to the latent's centre. The last
block is "context pre-only": its text stream ends after the attention.

Consecutive layers of identical structure form a segment whose blocks are stacked and scanned; a per-layer plan is
sliced per segment. A dual-attention layer's second (image-only) attention always runs dense: the plan covers the
joint attention of every layer.

The joint attention's q, k, v are concatenated with zero rows up to a multiple of `JOINT_TOKEN_MULTIPLE` tokens
(4096 + 333 -> 4432 at 1024^2), masked as keys: the Mosaic GPU kernel's TMA tiles tokens in groups of 8 and would
otherwise copy q, k, v and the attention cache at every call. The padding rides in the concatenation the block does
anyway; the text stream itself stays unpadded.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from ditfa_jax.attention import AttentionSettings, joint_attention
from ditfa_jax.configs import SD3Config
from ditfa_jax.family import TokenLayout
from ditfa_jax.models.flux import merge_heads, split_heads
from ditfa_jax.models.layers import (AdaLayerNorm, FeedForward, RMSNorm, TimeTextEmbedding, create_stack,
                                     layer_norm, linear, modulate, reorder_tokens, restore_tokens, run_stacks)
from ditfa_jax.scheduler import SD3_SCHEDULER, SchedulerConfig, sd3_schedule

JOINT_TOKEN_MULTIPLE = 8  # the joint attention's length is padded to a multiple of this (1: no padding)


def joint_padding(tokens: int) -> int:
    """Zero tokens appended to a joint sequence of `tokens` real ones (`JOINT_TOKEN_MULTIPLE`)."""
    return -tokens % JOINT_TOKEN_MULTIPLE


class Buffer(nnx.Variable):
    """A non-trainable array stored in the checkpoint (the SD3 position table)."""


class PatchEmbed(nnx.Module):
    """Conv patchify + cropped sin-cos position table (diffusers' PatchEmbed with pos_embed_max_size)."""

    def __init__(self, config: SD3Config, *, dtype, rngs: nnx.Rngs):
        p, dim = config.patch_size, config.inner_dim
        self.patch_size = p
        self.max_size = config.pos_embed_max_size
        self.proj = nnx.Conv(config.in_channels, dim, kernel_size=(p, p), strides=(p, p), padding="VALID",
                             dtype=dtype, param_dtype=dtype, rngs=rngs,
                             kernel_init=nnx.initializers.normal(0.02), bias_init=nnx.initializers.normal(0.02))
        self.pos_embed = Buffer(0.5 * jax.random.normal(rngs.params(), (1, self.max_size ** 2, dim), jnp.float32))

    def __call__(self, latents: jax.Array) -> jax.Array:
        """latents [B, C, H, W] (NCHW, as diffusers) -> tokens [B, (H/p)*(W/p), dim] in raster order."""
        h, w = latents.shape[2] // self.patch_size, latents.shape[3] // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"latent grid {h}x{w} patches exceeds pos_embed_max_size={self.max_size}")
        x = self.proj(jnp.transpose(latents, (0, 2, 3, 1)))
        x = x.reshape(x.shape[0], h * w, x.shape[-1])
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed[...].reshape(self.max_size, self.max_size, -1)[top:top + h, left:left + w]
        return (x.astype(jnp.float32) + table.reshape(1, h * w, -1)).astype(x.dtype)


class JointAttention(nnx.Module):
    """SD3 attention projections: image to_*, text add_* (absent for the image-only `attn2`), optional qk RMSNorm.

    With `context_pre_only` (last block) the text output projection is absent.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, qk_norm: bool, added: bool, context_pre_only: bool,
                 dtype, rngs: nnx.Rngs):
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (linear(dim, dim, dtype=dtype, rngs=rngs) for _ in range(3))
        self.norm_q = RMSNorm(head_dim, dtype=dtype, rngs=rngs) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, dtype=dtype, rngs=rngs) if qk_norm else None
        self.to_out_0 = linear(dim, dim, dtype=dtype, rngs=rngs)
        if added:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (linear(dim, dim, dtype=dtype, rngs=rngs)
                                                                 for _ in range(3))
            self.norm_added_q = RMSNorm(head_dim, dtype=dtype, rngs=rngs) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim, dtype=dtype, rngs=rngs) if qk_norm else None
            self.to_add_out = None if context_pre_only else linear(dim, dim, dtype=dtype, rngs=rngs)

    def _heads(self, proj, norm, x):
        y = split_heads(proj(x), self.head_dim)
        return norm(y) if norm is not None else y

    def qkv(self, x, c=None):
        """q, k, v [B, image (+ text + padding), H, D]: image tokens first, as SD3 concatenates them, then zero rows
        up to a multiple of `JOINT_TOKEN_MULTIPLE` (`joint_padding`)."""
        q = self._heads(self.to_q, self.norm_q, x)
        k = self._heads(self.to_k, self.norm_k, x)
        v = split_heads(self.to_v(x), self.head_dim)
        if c is None:
            return q, k, v
        text = (self._heads(self.add_q_proj, self.norm_added_q, c),
                self._heads(self.add_k_proj, self.norm_added_k, c),
                split_heads(self.add_v_proj(c), self.head_dim))
        pad = joint_padding(x.shape[1] + c.shape[1])
        return tuple(jnp.concatenate([img, txt, jnp.zeros((txt.shape[0], pad, *txt.shape[2:]), txt.dtype)], axis=1)
                     for img, txt in zip((q, k, v), text))


class JointBlock(nnx.Module):
    """diffusers' JointTransformerBlock (optionally MMDiT-X dual attention, optionally context pre-only).

    Split into `prepare` (adaLN), `qkv` and `finish` around the joint attention, as the FLUX blocks are.
    Carry: (image tokens x, text tokens c).
    """

    def __init__(self, config: SD3Config, *, dual: bool, context_pre_only: bool, dtype, rngs: nnx.Rngs):
        dim, heads, hd = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        qk_norm = config.qk_norm == "rms_norm"
        self.dual, self.context_pre_only = dual, context_pre_only
        self.norm1 = AdaLayerNorm(dim, 9 if dual else 6, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaLayerNorm(dim, 2 if context_pre_only else 6, dtype=dtype, rngs=rngs)
        self.attn = JointAttention(dim, heads, hd, qk_norm=qk_norm, added=True, context_pre_only=context_pre_only,
                                   dtype=dtype, rngs=rngs)
        self.attn2 = (JointAttention(dim, heads, hd, qk_norm=qk_norm, added=False, context_pre_only=False,
                                     dtype=dtype, rngs=rngs) if dual else None)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.ff_context = None if context_pre_only else FeedForward(dim, dtype=dtype, rngs=rngs)

    def prepare(self, carry, temb):
        x, c = carry
        mods = self.norm1(temb)
        shift, scale = mods[:2]
        x_norm = layer_norm(x)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(temb)  # AdaLayerNormContinuous: scale first
            txt = None
        else:
            c_shift, c_scale, *txt = self.norm1_context(temb)
        return dict(x_norm=x_norm, x=modulate(x_norm, shift, scale), c=modulate(layer_norm(c), c_shift, c_scale),
                    img=mods[2:], txt=txt)

    def qkv(self, ctx, rope=None):
        return self.attn.qkv(ctx["x"], ctx["c"])

    def finish(self, carry, ctx, attn):
        mid = self.finish_attention(carry, ctx, attn)
        return self.add_mlp(mid, ctx, self.mlp(mid, ctx))

    # `finish` in three parts, for a plan that caches the MLP branch (`ditfa_jax.models.layers.block_forward`)

    def finish_attention(self, carry, ctx, attn):
        """The carry with the attention outputs added (gated; MMDiT-X's image-only attention too): the MLP input."""
        x, c = carry
        n_img, n_txt = x.shape[1], c.shape[1]
        attn = merge_heads(attn)
        x = x + ctx["img"][0][:, None] * self.attn.to_out_0(attn[:, :n_img])
        if self.dual:  # MMDiT-X: image-only self-attention, always dense
            shift2, scale2, gate2 = ctx["img"][4:]
            q, k, v = self.attn2.qkv(modulate(ctx["x_norm"], shift2, scale2))
            out2 = joint_attention(q, k, v, text_len=0, text_first=False)
            x = x + gate2[:, None] * self.attn2.to_out_0(merge_heads(out2))
        if not self.context_pre_only:
            c = c + ctx["txt"][0][:, None] * self.attn.to_add_out(attn[:, n_img:n_img + n_txt])
        return x, c

    def mlp(self, mid, ctx):
        """Both streams' MLP outputs (before their gates); zeros for the text of a context-pre-only block."""
        x, c = mid
        _, shift, scale = ctx["img"][:3]
        fx = self.ff(modulate(layer_norm(x), shift, scale))
        if self.context_pre_only:
            return fx, jnp.zeros_like(c)
        _, c_shift, c_scale, _ = ctx["txt"]
        return fx, self.ff_context(modulate(layer_norm(c), c_shift, c_scale))

    def add_mlp(self, mid, ctx, value):
        (x, c), (fx, fc) = mid, value
        x = x + ctx["img"][3][:, None] * fx
        return x, c if self.context_pre_only else c + ctx["txt"][3][:, None] * fc


def layer_segments(config: SD3Config) -> list[tuple[int, int, bool, bool]]:
    """Runs of consecutive layers of one structure: (first layer, count, dual, context_pre_only)."""
    kinds = [(i in config.dual_attention_layers, i == config.num_layers - 1) for i in range(config.num_layers)]
    segments, start = [], 0
    for kind, group in itertools.groupby(kinds):
        n = len(list(group))
        segments.append((start, n, *kind))
        start += n
    return segments


class SD3Transformer(nnx.Module):
    """SD3/SD3.5 transformer. `__call__` takes NCHW latents and returns the NCHW velocity."""

    def __init__(self, config: SD3Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        dim = config.inner_dim
        self.pos_embed = PatchEmbed(config, dtype=dtype, rngs=rngs)
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, guidance=False, dtype=dtype,
                                                 rngs=rngs)
        self.context_embedder = linear(config.joint_attention_dim, dim, dtype=dtype, rngs=rngs)
        self.segments = nnx.List([
            create_stack(lambda r, d=dual, p=pre: JointBlock(config, dual=d, context_pre_only=p, dtype=dtype, rngs=r),
                         n, rngs)
            for _, n, dual, pre in layer_segments(config)])
        self.norm_out = AdaLayerNorm(dim, 2, dtype=dtype, rngs=rngs)
        self.proj_out = linear(dim, config.patch_size ** 2 * config.output_channels, dtype=dtype, rngs=rngs)

    # ---- the pieces the sampler and the plan search share ----

    def embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance=None,
              image_order=None):
        """NCHW latents + prompt embeddings -> ((image tokens, text tokens), temb); timestep as the pipeline passes it.

        `image_order` (raster indices, see `ditfa_jax.token_order.image_token_order`) puts the image tokens in that order
        for the blocks, after the positional embedding."""
        del guidance  # SD3 has no guidance embedding (CFG happens in the sampler)
        p = self.config.patch_size
        if hidden_states.shape[2] % p or hidden_states.shape[3] % p:
            raise ValueError(f"latent height/width {hidden_states.shape[2:]} must be multiples of patch_size {p}")
        dtype = self.context_embedder.kernel.dtype
        x = reorder_tokens(self.pos_embed(hidden_states.astype(dtype)), image_order)
        c = self.context_embedder(encoder_hidden_states.astype(dtype))
        return (x, c), self.time_text_embed(jnp.asarray(timestep, jnp.float32), pooled_projections.astype(dtype))

    def stacks(self):
        return [(stack, start, n) for (start, n, _, _), stack in zip(layer_segments(self.config), self.segments)]

    @staticmethod
    def enter_stack(index: int, carry):
        return carry

    def unembed(self, carry, temb, layout: TokenLayout, image_order=None):
        """Final adaLN + projection, back to raster order, then unpatchify to NCHW [B, C, rows*p, cols*p]."""
        cfg, x = self.config, carry[0]
        p, co = cfg.patch_size, cfg.output_channels
        scale, shift = self.norm_out(temb)
        x = restore_tokens(self.proj_out(modulate(layer_norm(x), shift, scale)), image_order)
        h, w = layout.grid
        return x.reshape(x.shape[0], h, w, p, p, co).transpose(0, 5, 1, 3, 2, 4).reshape(x.shape[0], co, h * p,
                                                                                          w * p)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, plan=None,
                 attention_impl: str = "auto", image_order=None):
        """One denoiser evaluation; NCHW latents -> NCHW velocity; `timestep` [B] as the SD3 pipeline passes it.

        `plan` is None or (head_window [layers, H], cache [layers, B, T, H, D]); with a plan the call returns
        (output, new_cache), otherwise the output alone. `image_order` runs the blocks on the image tokens in that
        order (inputs and outputs stay NCHW).
        """
        carry, temb = self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                 image_order=image_order)
        p = self.config.patch_size
        grid = (hidden_states.shape[2] // p, hidden_states.shape[3] // p)
        text_len = encoder_hidden_states.shape[1]
        layout = TokenLayout(grid=grid, text_len=text_len, text_first=False,
                             padding=joint_padding(grid[0] * grid[1] + text_len))
        carry, cache = run_stacks(self, carry, temb, None, plan, layout, AttentionSettings(implementation=attention_impl))
        out = self.unembed(carry, temb, layout, image_order)
        return out if plan is None else (out, cache)


# ---- the SD3 family: geometry, conditioning (`ditfa_jax.family.ModelFamily`) ----

class SD3Family:
    """SD3 / SD3.5: NCHW latents patchified in the model, [image, text] tokens, a learned position table, CFG."""

    name = "sd3"
    config_class = SD3Config
    module_class = SD3Transformer
    text_first = False
    latent_layout = "NCHW"

    default_guidance_scale = 7.0

    def guidance(self, config: SD3Config) -> str:
        return "cfg"

    def native_size(self, config: SD3Config, vae_scale_factor: int) -> int:
        return config.sample_size * vae_scale_factor

    def latent_multiple(self, config: SD3Config) -> int:
        return config.patch_size

    def token_padding(self, tokens: int) -> int:
        return joint_padding(tokens)

    def token_grid(self, config: SD3Config, latent_height: int, latent_width: int) -> tuple[int, int]:
        p = config.patch_size
        if latent_height % p or latent_width % p:
            raise ValueError(f"SD3 patchifies {p}x{p} latent cells into a token: latent size "
                             f"{latent_height}x{latent_width} must be a multiple of {p}")
        return latent_height // p, latent_width // p

    def latent_shape(self, config: SD3Config, grid: tuple[int, int]) -> tuple[int, ...]:
        return (config.in_channels, grid[0] * config.patch_size, grid[1] * config.patch_size)

    def pack_latents(self, config: SD3Config, latents):
        return latents

    def unpack_latents(self, config: SD3Config, latents, grid: tuple[int, int]):
        return latents

    def default_scheduler(self, config: SD3Config) -> SchedulerConfig:
        return SD3_SCHEDULER

    def schedule(self, scheduler: SchedulerConfig, num_steps: int, image_tokens: int):
        return sd3_schedule(scheduler, num_steps, image_tokens)

    def model_timestep(self, timestep):
        return timestep

    def positions(self, config: SD3Config, layout: TokenLayout, image_order):
        return None  # the position table is added inside `embed`

    def forward_inputs(self, config: SD3Config, *, hidden_states, encoder_hidden_states, img_ids, txt_ids,
                       guidance) -> dict:
        return {}


FAMILY = SD3Family()
