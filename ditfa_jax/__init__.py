"""ditfa-jax: head-wise attention compression (DiTFastAttnV2-style) for MMDiT diffusion transformers in JAX."""

from ditfa_jax.attention import joint_attention
from ditfa_jax.configs import FluxConfig, SD3Config
from ditfa_jax.loading import Transformer, load_transformer, save_converted
from ditfa_jax.sampler import flux_image_ids, pack_latents, sample, unpack_latents
from ditfa_jax.scheduler import SchedulerConfig, flow_match_schedule

__all__ = ["FluxConfig", "SD3Config", "SchedulerConfig", "Transformer", "flow_match_schedule", "flux_image_ids",
           "joint_attention", "load_transformer", "pack_latents", "sample", "save_converted", "unpack_latents"]
