"""FLUX.1 (dev and schnell) MMDiT in Flax NNX, mirroring diffusers' `FluxTransformer2DModel`.

Why NNX: parameters live in plain modules whose names match diffusers, `nnx.split` gives a (graph, state) pair and
the model runs as a pure function of its state under `jit`. Blocks of one kind are created with `nnx.vmap` (stacked
parameters, leading layer axis) and run with `lax.scan`, so compile time does not grow with depth (19 + 38 blocks).

Token order is [text, image]. Positions enter through 3-axis RoPE built from `txt_ids`/`img_ids` (on the host, in
float64, as diffusers does). Every attention call goes through `ditfa_jax.attention.joint_attention`; a per-layer
plan (`head_window` [layers, heads]) and cache ([layers, B, T, H, D]) can be scanned alongside the blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ditfa_jax.attention import AttentionSettings
from ditfa_jax.configs import FluxConfig
from ditfa_jax.family import TokenLayout
from ditfa_jax.models.layers import (AdaLayerNorm, FeedForward, RMSNorm, TimeTextEmbedding, create_stack,
                                     layer_norm, linear, modulate, reorder_tokens, restore_tokens, run_stacks)
from ditfa_jax.scheduler import FLUX_DEV_SCHEDULER, FLUX_SCHNELL_SCHEDULER, SchedulerConfig, flux_schedule


def rope_tables(ids: np.ndarray, axes_dims: tuple[int, ...], theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [tokens, head_dim] for FLUX's per-axis RoPE (diffusers' FluxPosEmbed), computed in float64."""
    ids = np.asarray(ids, np.float64)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"position ids must be [tokens, {len(axes_dims)}]; got shape {ids.shape}")
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.outer(ids[:, axis], freqs)
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return np.concatenate(cos, 1).astype(np.float32), np.concatenate(sin, 1).astype(np.float32)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate interleaved pairs (x0, x1) of each head by the position angle; x is [B, T, H, D]."""
    cos, sin = rope
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)


def split_heads(x: jax.Array, head_dim: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], -1, head_dim)


def merge_heads(x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-2], -1)


class FluxDoubleAttention(nnx.Module):
    """Attention of a double-stream block: separate image (to_*) and text (add_*) projections, one joint softmax."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, rngs: nnx.Rngs):
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (linear(dim, dim, dtype=dtype, rngs=rngs) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (linear(dim, dim, dtype=dtype, rngs=rngs)
                                                             for _ in range(3))
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (
            RMSNorm(head_dim, dtype=dtype, rngs=rngs) for _ in range(4))
        self.to_out_0 = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.to_add_out = linear(dim, dim, dtype=dtype, rngs=rngs)

    def qkv(self, x, c, rope):
        """q, k, v [B, text + image, H, D] with qk-norm and RoPE applied."""
        d = self.head_dim
        q = jnp.concatenate([self.norm_added_q(split_heads(self.add_q_proj(c), d)),
                             self.norm_q(split_heads(self.to_q(x), d))], axis=1)
        k = jnp.concatenate([self.norm_added_k(split_heads(self.add_k_proj(c), d)),
                             self.norm_k(split_heads(self.to_k(x), d))], axis=1)
        v = jnp.concatenate([split_heads(self.add_v_proj(c), d), split_heads(self.to_v(x), d)], axis=1)
        return apply_rope(q, rope), apply_rope(k, rope), v


class FluxDoubleBlock(nnx.Module):
    """diffusers' FluxTransformerBlock: image and text streams with their own adaLN, MLPs and projections.

    Split into `prepare` (adaLN), `qkv` and `finish` (output projections, residuals, MLPs) around the attention, so
    that the sampler and the plan search run the same code (`ditfa_jax.models.layers.block_forward`).
    Carry: (image tokens x, text tokens c).
    """

    def __init__(self, config: FluxConfig, *, dtype, rngs: nnx.Rngs):
        dim = config.inner_dim
        self.norm1 = AdaLayerNorm(dim, 6, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaLayerNorm(dim, 6, dtype=dtype, rngs=rngs)
        self.attn = FluxDoubleAttention(dim, config.num_attention_heads, config.attention_head_dim, dtype=dtype,
                                        rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.ff_context = FeedForward(dim, dtype=dtype, rngs=rngs)

    def prepare(self, carry, temb):
        x, c = carry
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        return dict(x=modulate(layer_norm(x), shift, scale), c=modulate(layer_norm(c), c_shift, c_scale),
                    img=(gate, shift_mlp, scale_mlp, gate_mlp), txt=(c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp))

    def qkv(self, ctx, rope):
        return self.attn.qkv(ctx["x"], ctx["c"], rope)

    def finish(self, carry, ctx, attn):
        mid = self.finish_attention(carry, ctx, attn)
        return self.add_mlp(mid, ctx, self.mlp(mid, ctx))

    # `finish` in three parts, for a plan that caches the MLP branch (`ditfa_jax.models.layers.block_forward`)

    def finish_attention(self, carry, ctx, attn):
        """The carry with the attention's output projections added (gated): the MLP branch's input."""
        x, c = carry
        text_len = c.shape[1]
        attn = merge_heads(attn)
        x = x + ctx["img"][0][:, None] * self.attn.to_out_0(attn[:, text_len:])
        c = c + ctx["txt"][0][:, None] * self.attn.to_add_out(attn[:, :text_len])
        return x, c

    def mlp(self, mid, ctx):
        """Both streams' MLP outputs (before their gates)."""
        (x, c), (_, shift, scale, _), (_, c_shift, c_scale, _) = mid, ctx["img"], ctx["txt"]
        return (self.ff(modulate(layer_norm(x), shift, scale)),
                self.ff_context(modulate(layer_norm(c), c_shift, c_scale)))

    def add_mlp(self, mid, ctx, value):
        (x, c), (fx, fc) = mid, value
        return x + ctx["img"][3][:, None] * fx, c + ctx["txt"][3][:, None] * fc


class FluxSingleAttention(nnx.Module):
    """Attention of a single-stream block: one projection set over the concatenated [text, image] tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, rngs: nnx.Rngs):
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (linear(dim, dim, dtype=dtype, rngs=rngs) for _ in range(3))
        self.norm_q, self.norm_k = (RMSNorm(head_dim, dtype=dtype, rngs=rngs) for _ in range(2))

    def qkv(self, h, rope):
        d = self.head_dim
        q = apply_rope(self.norm_q(split_heads(self.to_q(h), d)), rope)
        k = apply_rope(self.norm_k(split_heads(self.to_k(h), d)), rope)
        return q, k, split_heads(self.to_v(h), d)


class FluxSingleBlock(nnx.Module):
    """diffusers' FluxSingleTransformerBlock: parallel attention and MLP on the joint sequence, one out projection.

    Carry: the joint [text, image] sequence h.
    """

    def __init__(self, config: FluxConfig, *, dtype, rngs: nnx.Rngs):
        dim = config.inner_dim
        self.norm = AdaLayerNorm(dim, 3, dtype=dtype, rngs=rngs)
        self.proj_mlp = linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
        self.attn = FluxSingleAttention(dim, config.num_attention_heads, config.attention_head_dim, dtype=dtype,
                                        rngs=rngs)
        self.proj_out = linear(5 * dim, dim, dtype=dtype, rngs=rngs)

    def prepare(self, h, temb):
        shift, scale, gate = self.norm(temb)
        return dict(h=modulate(layer_norm(h), shift, scale), gate=gate)

    def qkv(self, ctx, rope):
        return self.attn.qkv(ctx["h"], rope)

    def finish(self, h, ctx, attn):
        mlp = jax.nn.gelu(self.proj_mlp(ctx["h"]), approximate=True)
        return h + ctx["gate"][:, None] * self.proj_out(jnp.concatenate([merge_heads(attn), mlp], axis=-1))

    # `finish` in three parts (`FluxDoubleBlock`'s): the out projection split by rows into its attention part (with
    # the bias) and its MLP part, so that the MLP branch's value is one [B, T, dim] array

    def finish_attention(self, h, ctx, attn):
        attn = merge_heads(attn)
        return h + ctx["gate"][:, None] * self.proj_out.rows(attn, 0, attn.shape[-1], bias=True)

    def mlp(self, mid, ctx):
        mlp = jax.nn.gelu(self.proj_mlp(ctx["h"]), approximate=True)
        dim = mid.shape[-1]
        return self.proj_out.rows(mlp, dim, dim + mlp.shape[-1], bias=False)

    def add_mlp(self, mid, ctx, value):
        return mid + ctx["gate"][:, None] * value


class FluxTransformer(nnx.Module):
    """FLUX.1 transformer. `__call__` takes packed latents [B, S_img, in_channels] and returns the velocity."""

    def __init__(self, config: FluxConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        dim = config.inner_dim
        self.x_embedder = linear(config.in_channels, dim, dtype=dtype, rngs=rngs)
        self.context_embedder = linear(config.joint_attention_dim, dim, dtype=dtype, rngs=rngs)
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, guidance=config.guidance_embeds,
                                                 dtype=dtype, rngs=rngs)
        self.transformer_blocks = create_stack(lambda r: FluxDoubleBlock(config, dtype=dtype, rngs=r),
                                               config.num_layers, rngs)
        self.single_transformer_blocks = create_stack(lambda r: FluxSingleBlock(config, dtype=dtype, rngs=r),
                                                      config.num_single_layers, rngs)
        self.norm_out = AdaLayerNorm(dim, 2, dtype=dtype, rngs=rngs)
        self.proj_out = linear(dim, config.patch_size ** 2 * config.output_channels, dtype=dtype, rngs=rngs)

    # ---- the pieces the sampler and the plan search share ----

    def embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance=None,
              image_order=None):
        """Inputs -> (carry of the first stack, conditioning vector temb).

        timestep/guidance are per-sample [B] floats as the FLUX pipeline passes them (sigma in [0, 1]; guidance
        scale); they are scaled by 1000 here, as in diffusers. `image_order` (raster indices, see
        `ditfa_jax.token_order.image_token_order`) puts the image tokens in that order for the blocks.
        """
        dtype = self.x_embedder.kernel.dtype
        x = reorder_tokens(self.x_embedder(hidden_states.astype(dtype)), image_order)
        c = self.context_embedder(encoder_hidden_states.astype(dtype))
        timestep = jnp.asarray(timestep, dtype) * 1000
        guidance = None if guidance is None else jnp.asarray(guidance, dtype) * 1000
        return (x, c), self.time_text_embed(timestep, pooled_projections.astype(dtype), guidance)

    def stacks(self):
        """The scanned block stacks in run order: (stack, first layer, layer count)."""
        cfg = self.config
        return [(self.transformer_blocks, 0, cfg.num_layers),
                (self.single_transformer_blocks, cfg.num_layers, cfg.num_single_layers)]

    @staticmethod
    def enter_stack(index: int, carry):
        """Carry hand-over between stacks: the single-stream blocks run on the joint [text, image] sequence."""
        if index == 1:
            x, c = carry
            return jnp.concatenate([c, x], axis=1)
        return carry

    def unembed(self, carry, temb, layout: TokenLayout, image_order=None):
        """Final adaLN + projection of the image tokens of the joint sequence `carry`, back in raster order:
        packed [B, S_img, out]."""
        scale, shift = self.norm_out(temb)
        return restore_tokens(self.proj_out(modulate(layer_norm(carry[:, layout.text_len:]), shift, scale)),
                              image_order)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, rope, guidance=None,
                 plan=None, attention_impl: str = "auto", image_order=None):
        """One denoiser evaluation on packed latents [B, S_img, in_channels] -> velocity [B, S_img, out].

        `rope` is `rope_tables(cat(txt_ids, img_ids))`. `plan` is None or (head_window [layers, H],
        cache [layers, B, T, H, D]) over all double then single layers; with a plan the call returns
        (output, new_cache), otherwise the output alone. `image_order` runs the blocks on the image tokens in that
        order (inputs and outputs stay in raster order); `rope`'s image rows must then follow it too.
        """
        carry, temb = self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance,
                                 image_order)
        text_len = encoder_hidden_states.shape[1]
        rope = tuple(jnp.asarray(t) for t in rope)
        # packed tokens do not tell the grid's shape, only its size; FLUX's unembed reads text_len alone
        layout = TokenLayout(grid=(1, hidden_states.shape[1]), text_len=text_len, text_first=True)
        carry, cache = run_stacks(self, carry, temb, rope, plan, layout,
                                  AttentionSettings(implementation=attention_impl))
        out = self.unembed(carry, temb, layout, image_order)
        return out if plan is None else (out, cache)


# ---- the FLUX family: geometry, packing, conditioning (`ditfa_jax.family.ModelFamily`) ----

def flux_image_ids(rows: int, cols: int) -> np.ndarray:
    """Position ids [rows*cols, 3] = (0, row, col), as FluxPipeline._prepare_latent_image_ids."""
    ids = np.zeros((rows, cols, 3), np.float32)
    ids[..., 1] = np.arange(rows)[:, None]
    ids[..., 2] = np.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def pack_latents(latents: jax.Array) -> jax.Array:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4]: 2x2 latent patches become one token (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """[B, rows*cols, C*4] -> [B, C, 2*rows, 2*cols] (FluxPipeline._unpack_latents) for a token grid."""
    rows, cols = grid
    b, s, c4 = packed.shape
    if s != rows * cols:
        raise ValueError(f"packed latents have {s} tokens, the grid {rows}x{cols} has {rows * cols}")
    x = packed.reshape(b, rows, cols, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, rows * 2, cols * 2)


class FluxFamily:
    """FLUX.1 dev / schnell: packed 2x2 latents, [text, image] tokens, 3-axis RoPE, distilled guidance (dev)."""

    name = "flux"
    config_class = FluxConfig
    module_class = FluxTransformer
    text_first = True
    latent_layout = "packed"

    default_guidance_scale = 3.5

    def guidance(self, config: FluxConfig) -> str:
        return "distilled" if config.guidance_embeds else "none"

    def native_size(self, config: FluxConfig, vae_scale_factor: int) -> int:
        return 128 * vae_scale_factor  # FluxPipeline's default_sample_size

    def latent_multiple(self, config: FluxConfig) -> int:
        return 2

    def token_padding(self, tokens: int) -> int:
        return 0  # the single blocks project the joint sequence at once: no concatenation to pad for free

    def token_grid(self, config: FluxConfig, latent_height: int, latent_width: int) -> tuple[int, int]:
        if latent_height % 2 or latent_width % 2:
            raise ValueError(f"FLUX packs 2x2 latent cells into a token: latent size {latent_height}x{latent_width} "
                             "must be even")
        return latent_height // 2, latent_width // 2

    def latent_shape(self, config: FluxConfig, grid: tuple[int, int]) -> tuple[int, ...]:
        return (grid[0] * grid[1], config.in_channels)

    def pack_latents(self, config: FluxConfig, latents):
        return pack_latents(latents)

    def unpack_latents(self, config: FluxConfig, latents, grid: tuple[int, int]):
        return unpack_latents(latents, grid)

    def default_scheduler(self, config: FluxConfig) -> SchedulerConfig:
        return FLUX_DEV_SCHEDULER if config.guidance_embeds else FLUX_SCHNELL_SCHEDULER

    def schedule(self, scheduler: SchedulerConfig, num_steps: int, image_tokens: int):
        return flux_schedule(scheduler, num_steps, image_tokens)

    def model_timestep(self, timestep):
        return timestep / 1000  # the pipeline passes sigma; the model scales by 1000 again

    def positions(self, config: FluxConfig, layout: TokenLayout, image_order):
        image_ids = flux_image_ids(*layout.grid)
        if image_order is not None:
            image_ids = image_ids[np.asarray(image_order)]
        return rope_tables(np.concatenate([np.zeros((layout.text_len, 3), np.float32), image_ids]),
                           config.axes_dims_rope)

    def forward_inputs(self, config: FluxConfig, *, hidden_states, encoder_hidden_states, img_ids, txt_ids,
                       guidance) -> dict:
        if img_ids is None or txt_ids is None:
            raise ValueError("FLUX needs img_ids [S_img, 3] and txt_ids [S_txt, 3]")
        img_ids, txt_ids = np.asarray(img_ids), np.asarray(txt_ids)
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        if img_ids.shape[0] != hidden_states.shape[1] or txt_ids.shape[0] != encoder_hidden_states.shape[1]:
            raise ValueError(f"img_ids {img_ids.shape} / txt_ids {txt_ids.shape} do not match the token counts "
                             f"{hidden_states.shape[1]} / {encoder_hidden_states.shape[1]}")
        extra = {"rope": rope_tables(np.concatenate([txt_ids, img_ids]), config.axes_dims_rope)}
        if config.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX model embeds guidance (dev): pass `guidance`")
            extra["guidance"] = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (hidden_states.shape[0],))
        return extra


FAMILY = FluxFamily()
