"""Flow-matching Euler sampling as one jitted `lax.scan` over timesteps (`ditfa_jax.denoise` is the loop itself).

From initial noise latents and prompt embeddings to final latents, exactly as diffusers' FluxPipeline /
StableDiffusion3Pipeline step their scheduler. The schedule is computed on the host and scanned as data, so one
compile serves a resolution and step count; a compression plan's per-step head windows are scanned as data too,
and each layer's last attention output rides in the loop's carry as the cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ditfa_jax import sharding
from ditfa_jax.attention import AttentionSettings
from ditfa_jax.configs import VAE_SCALE_FACTOR
from ditfa_jax.denoise import (DynamicGate, activation_bytes, cache_bytes, cache_shape, check_finite_steps,
                               default_scheduler, denoise, prepare_run)
from ditfa_jax.family import family_of, layout_for
from ditfa_jax.fp8 import check_plan_layers
from ditfa_jax.hub import CONFIGS, resolve
from ditfa_jax.loading import Transformer
from ditfa_jax.memory import check_fits, state_bytes
from ditfa_jax.scheduler import SchedulerConfig
from ditfa_jax.xla_options import model_jit

__all__ = ["sample", "scheduler_for", "cache_bytes", "cache_shape"]


def scheduler_for(checkpoint: str | Path | None, model: Transformer) -> SchedulerConfig:
    """The checkpoint folder's (or repo id's) scheduler/scheduler_config.json if present, else the family default."""
    if checkpoint is not None:
        path = resolve(checkpoint, CONFIGS) / "scheduler" / "scheduler_config.json"
        if path.is_file():
            return SchedulerConfig.from_file(path)
    return default_scheduler(model.config)


def _check_batch(latents, named: dict) -> None:
    b = latents.shape[0]
    for name, arr in named.items():
        if arr is not None and np.shape(arr)[0] != b:
            raise ValueError(f"batch mismatch: latents have batch {b} but {name} has shape {np.shape(arr)}")


def sample(model: Transformer, latents, prompt_embeds, pooled_prompt_embeds, *, height: int, width: int,
           num_steps: int, guidance_scale: float, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
           scheduler: SchedulerConfig | None = None, plan=None, vae_scale_factor: int = VAE_SCALE_FACTOR,
           attention: AttentionSettings | None = None, attention_impl: str = "auto", memory: bool = False,
           gate: DynamicGate | None = None, mesh=None, balance: bool = True):
    """Run the full denoising loop; returns the final latents (FLUX: packed [B, S, C*4]; SD3: [B, C, H/8, W/8]).

    height/width are pixel sizes of `vae_scale_factor` pixels per latent cell (the pipeline's VAE; 1 for a
    pixel-space model); the latents must match them. FLUX-dev uses `guidance_scale` as distilled guidance; SD3 runs
    classifier-free guidance when guidance_scale > 1 (negative embeddings required).
    `plan` (a `ditfa_jax.plan.CompressionPlan` made for this model, resolution, text length and step count) turns
    on head-wise compression: its per-step head windows are scanned and the attention cache is carried; CFG
    batches share the plan. A plan whose heads are all full runs the dense sampler unless `attention.shortcuts` is
    off. `attention` (or the shorthand `attention_impl`, the dense implementation) says how attention runs.
    memory=True compiles without running and returns the program's `memory_analysis()` (argument, output and
    temporary bytes): what a plan costs in memory, found without a GPU.
    `gate` (a `ditfa_jax.denoise.DynamicGate`) decides on the device, step by step, whether the blocks after the
    first ones run (FBCache-like); then `sample` returns (final latents, skipped [num_steps] bool).
    `mesh` (`ditfa_jax.sharding.make_mesh`: a data axis and a head axis) runs the sampler over several devices:
    the batch the model sees split over the data axis, attention head-parallel over the head axis with the plan's
    heads regrouped per step and layer to even out the devices' work (`balance`; `ditfa_jax.sharding.balance_heads`).
    The weights are replicated unless `Transformer.place_on(mesh)` placed them (once, which also avoids a copy
    per call; split over the devices when they do not fit one). A one-device mesh runs the single-device program.
    """
    settings = attention or AttentionSettings(implementation=attention_impl)
    latents = jnp.asarray(latents)
    _check_batch(latents, {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
                           "negative_prompt_embeds": negative_prompt_embeds,
                           "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds})
    compressed = plan is not None and (not settings.shortcuts or bool((np.asarray(plan.head_window) != -1).any()))
    steps_on = plan is not None and plan.uses_step_methods
    blocks_on = plan is not None and plan.uses_block_caching
    mlps_on = plan is not None and plan.uses_mlp_caching
    if gate is not None:
        gate.check(nnx.merge(model.graphdef, model.state))
        if blocks_on or mlps_on:
            what = "blocks (block_compute" if blocks_on else "MLP branches (mlp_compute"
            raise ValueError(f"gate: a dynamic gate decides which blocks run itself; the plan also caches {what} "
                             "has False entries): use one or the other")
    text_len = np.shape(prompt_embeds)[1] if np.ndim(prompt_embeds) == 3 else 0  # prepare_run checks the shape
    layout = layout_for(model.config, height=height, width=width, text_len=text_len,
                        vae_scale_factor=vae_scale_factor)  # checked here too: the memory check needs the tokens
    if not memory:  # memory=True only compiles: it may ask about a machine larger than this one
        cfg = family_of(model.config).guidance(model.config) == "cfg" and guidance_scale > 1
        batch = latents.shape[0] * (2 if cfg else 1)
        check_fits(state_bytes(model.state) + activation_bytes(model.config, batch, layout.tokens, model.dtype)
                   + (cache_bytes(model.config, batch, layout.attention_tokens, model.dtype) if compressed else 0)
                   # block residuals: a carry per layer, as large as the attention cache
                   + (cache_bytes(model.config, batch, layout.tokens, model.dtype) if blocks_on or gate is not None
                      else 0)
                   # cached MLP branches: the same again
                   + (cache_bytes(model.config, batch, layout.tokens, model.dtype) if mlps_on else 0),
                   f"sampling {latents.shape[0]} x {height}x{width} (parameters + activations)", host=False)
    run = prepare_run(model.config, prompt_embeds, pooled_prompt_embeds, height=height, width=width,
                      num_steps=num_steps, guidance_scale=guidance_scale,
                      negative_prompt_embeds=negative_prompt_embeds,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, scheduler=scheduler,
                      token_order=plan.token_order if compressed or steps_on or blocks_on or mlps_on else "raster",
                      vae_scale_factor=vae_scale_factor)
    if latents.shape[1:] != run.latent_shape:
        raise ValueError(f"{run.family.name} latents for {height}x{width} at vae_scale_factor {vae_scale_factor} "
                         f"must be {run.family.latent_layout} [B, {', '.join(map(str, run.latent_shape))}]; got "
                         f"{latents.shape}")
    if mesh is not None:
        mesh = sharding.check_mesh(mesh, model.config, run.batch)
    windows, cache_spec, orders = None, None, None
    if plan is not None:
        plan.check_compatible(model.config, height=height, width=width, text_len=run.layout.text_len,
                              num_steps=num_steps, vae_scale_factor=vae_scale_factor)
        check_plan_layers(model, plan)
        if compressed:
            windows = jnp.asarray(plan.head_window, jnp.int32)
            cache_spec = (cache_shape(model.config, run.batch, run.layout.attention_tokens),
                          jnp.dtype(model.dtype).name)
            settings = dataclasses.replace(settings, band=tuple(plan.band), fp8=plan.uses_fp8_heads)
            if mesh is not None and balance and mesh.shape[sharding.HEADS] > 1:
                costs = sharding.plan_head_costs(plan, run.layout, model.config.attention_head_dim)
                orders = jnp.asarray(sharding.balance_heads(costs, mesh.shape[sharding.HEADS]))
    step_kinds = jnp.asarray(plan.step_kind, jnp.int32) if steps_on else None
    block_compute = jnp.asarray(plan.block_compute, bool) if blocks_on else None
    mlp_compute = jnp.asarray(plan.mlp_compute, bool) if mlps_on else None
    args = (model.state, latents, run.cond, jnp.asarray(run.sigmas), jnp.asarray(run.timesteps), windows, step_kinds,
            block_compute, orders, mlp_compute)
    if mesh is not None:
        settings = dataclasses.replace(settings, mesh=mesh)
        state = args[0] if sharding.on_mesh(args[0], mesh) else sharding.replicate(args[0], mesh)
        args = (state, *sharding.replicate(args[1:], mesh))  # the jit then splits them as its constraints say
    static = dict(graphdef=model.graphdef, layout=run.layout, settings=settings,
                  cache_spec=cache_spec, gate=gate)
    if memory:
        return _run.lower(*args, **static).compile().memory_analysis()
    final, finite, *skipped = _run(*args, **static)
    check_finite_steps(finite, run.sigmas)
    return final if gate is None else (final, np.asarray(skipped[0]))


@model_jit(static_argnames=("graphdef", "layout", "settings", "cache_spec", "gate"))
def _run(state, latents, cond, sigmas, timesteps, windows, step_kinds, block_compute, orders, mlp_compute, *,
         graphdef, layout, settings, cache_spec, gate):
    """The jitted sampler: (final latents, per-step finite flags). The zeroed cache (static (shape, dtype name), or
    None without a plan) is made inside the program rather than passed in, so the loop's carry is its only copy (an
    input buffer that is not donated would be a second one)."""
    module = nnx.merge(graphdef, state)
    cache = None if cache_spec is None else sharding.split_tokens(jnp.zeros(cache_spec[0], cache_spec[1]),
                                                                  settings.mesh, batch_axis=1)
    return denoise(module, family_of(module.config), cond, layout, settings, latents, sigmas, timesteps, windows,
                   cache, step_kinds, block_compute, gate, orders, mlp_compute)
