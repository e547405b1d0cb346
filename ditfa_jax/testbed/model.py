"""The testbed text-to-image model: a small learned text encoder feeding a FLUX-style MMDiT in pixel space.

The transformer is the project's own :class:`ditfa_jax.models.flux.FluxTransformer` with a small config: 64x64 RGB
pixels packed 2x2 into 32x32 = 1024 image tokens of 12 channels (a pixel-space model: its pipeline samples at ``vae_scale_factor`` 1), 6 heads of 32,
2 double-stream + 8 single-stream blocks, 32 text tokens first, so 1056 tokens per attention. The text encoder
(token + learned position embeddings, pre-LN transformer layers) plays T5's part (per-token states, padding
zeroed) and CLIP's (a pooled vector from the masked mean). Together about 7.5M parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ditfa_jax.configs import FluxConfig
from ditfa_jax.scheduler import SchedulerConfig
from ditfa_jax.testbed.tokenizer import MAX_LENGTH

__all__ = ["TRANSFORMER_CONFIG", "SCHEDULER", "DEFAULT_STEPS", "TEXT_LENGTH", "GUIDANCE_SCALE", "CAPTION_DROPOUT",
           "TextEncoderConfig", "TextEncoder"]

TRANSFORMER_CONFIG = FluxConfig(
    patch_size=1, in_channels=12, num_layers=2, num_single_layers=8, attention_head_dim=32, num_attention_heads=6,
    joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
)
SCHEDULER = SchedulerConfig(shift=1.0)  # sigmas linspace(1, 1/n, n), unshifted: matches the logit-normal training
DEFAULT_STEPS = 20
TEXT_LENGTH = MAX_LENGTH  # text tokens per caption (the tokenizer's padded length)
GUIDANCE_SCALE = 1.0  # no guidance: trained without caption dropout
CAPTION_DROPOUT = 0.0


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    max_length: int = 32
    width: int = 128  # = the transformer's joint_attention_dim
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    pooled_dim: int = 128  # = the transformer's pooled_projection_dim


class TextEncoderLayer(nnx.Module):
    """Pre-LN transformer layer: self-attention over the caption's real tokens, then a GELU MLP."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=cfg.num_heads, in_features=cfg.width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.mlp_in = nnx.Linear(cfg.width, cfg.mlp_ratio * cfg.width, rngs=rngs)
        self.mlp_out = nnx.Linear(cfg.mlp_ratio * cfg.width, cfg.width, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask=mask[:, None, None, :])
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))


class TextEncoder(nnx.Module):
    """Word ids [B, L] + mask [B, L] -> (per-token states [B, L, width] with padding rows zero, pooled [B, pooled])."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs)
        self.position_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.max_length, cfg.width)))
        self.layers = nnx.List([TextEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.pooled_projection = nnx.Linear(cfg.width, cfg.pooled_dim, rngs=rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        if ids.shape[-1] != self.config.max_length:
            raise ValueError(f"text encoder: expected {self.config.max_length} tokens per caption, got ids of shape "
                             f"{ids.shape}")
        mask = mask.astype(bool)
        x = self.token_embedding(ids) + self.position_embedding[...].astype(self.token_embedding.embedding.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_norm(x) * mask[..., None]
        pooled = x.sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)
        return x, self.pooled_projection(pooled)

