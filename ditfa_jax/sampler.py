"""Flow-matching Euler sampling as one jitted `lax.scan` over timesteps.

From initial noise latents and prompt embeddings to final latents, exactly as diffusers' FluxPipeline /
StableDiffusion3Pipeline step their scheduler: FLUX-dev feeds the guidance scale to the model (distilled guidance),
SD3 runs classifier-free guidance on a doubled batch [uncond, cond]. Latents are carried in float32 (diffusers
steps in float32 and casts back to the model dtype; we keep the float32 value). The schedule is computed on the host
and scanned as data, so one compile serves a resolution and step count.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ditfa_jax.configs import VAE_SCALE_FACTOR, FluxConfig
from ditfa_jax.loading import Transformer
from ditfa_jax.models.flux import rope_tables
from ditfa_jax.scheduler import (FLUX_DEV_SCHEDULER, FLUX_SCHNELL_SCHEDULER, SD3_SCHEDULER, SchedulerConfig,
                                 flux_schedule, sd3_schedule)
from ditfa_jax.token_order import image_token_order



# ---- FLUX latent packing (2x2 patches of the latent image become one token) ----

def flux_latent_grid(height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> tuple[int, int]:
    """Packed token grid (rows, cols) for a pixel size; both must be multiples of 2 * vae_scale_factor (16)."""
    step = 2 * vae_scale_factor
    if height % step or width % step:
        raise ValueError(f"height and width must be multiples of {step} for FLUX; got {height}x{width}")
    return height // step, width // step


def flux_image_ids(rows: int, cols: int) -> np.ndarray:
    """Position ids [rows*cols, 3] = (0, row, col), as FluxPipeline._prepare_latent_image_ids."""
    ids = np.zeros((rows, cols, 3), np.float32)
    ids[..., 1] = np.arange(rows)[:, None]
    ids[..., 2] = np.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def pack_latents(latents: jax.Array) -> jax.Array:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4] (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: jax.Array, height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR
                   ) -> jax.Array:
    """[B, S, C*4] -> [B, C, H/8, W/8] for a pixel size (FluxPipeline._unpack_latents)."""
    rows, cols = flux_latent_grid(height, width, vae_scale_factor)
    b, s, c4 = packed.shape
    x = packed.reshape(b, rows, cols, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, rows * 2, cols * 2)


def default_scheduler(model: Transformer) -> SchedulerConfig:
    if isinstance(model.config, FluxConfig):
        return FLUX_DEV_SCHEDULER if model.config.guidance_embeds else FLUX_SCHNELL_SCHEDULER
    return SD3_SCHEDULER


def scheduler_for(checkpoint: str | Path | None, model: Transformer) -> SchedulerConfig:
    """The checkpoint folder's scheduler/scheduler_config.json if present, else the family default."""
    if checkpoint is not None:
        path = Path(checkpoint) / "scheduler" / "scheduler_config.json"
        if path.is_file():
            return SchedulerConfig.from_file(path)
    return default_scheduler(model)


def _check_batch(latents, named: dict) -> None:
    b = latents.shape[0]
    for name, arr in named.items():
        if arr is not None and np.shape(arr)[0] != b:
            raise ValueError(f"batch mismatch: latents have batch {b} but {name} has shape {np.shape(arr)}")


def euler_scan(velocity, latents, sigmas, timesteps, head_windows=None, cache=None):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, t_i), scanned over the steps; latents in float32.

    `velocity(x, t, head_window, cache) -> (v, cache)`. With a plan, `head_windows` [steps, layers, H] is scanned
    as data and `cache` [layers, B, T, H, D] (each layer's last computed attention output) is carried.
    """

    def step(carry, xs):
        x, cache = carry
        t, sigma, sigma_next, head_window = xs
        v, cache = velocity(x, t, head_window, cache)
        return (x + (sigma_next - sigma) * v.astype(jnp.float32), cache), None

    (x, _), _ = jax.lax.scan(step, (latents.astype(jnp.float32), cache),
                             (timesteps, sigmas[:-1], sigmas[1:], head_windows))
    return x


def cache_shape(config, batch: int, tokens: int) -> tuple[int, ...]:
    """Shape of the per-layer attention cache: [layers, batch, tokens, heads, head_dim]."""
    return (config.total_layers, batch, tokens, config.num_attention_heads, config.attention_head_dim)


def _zero_cache(cache_spec):
    """The zeroed cache built inside the jitted sampler from a static (shape, dtype name), or None without a plan:
    made in the program rather than passed in, so the loop's carry is its only copy (an input buffer that is not
    donated would be a second one)."""
    return None if cache_spec is None else jnp.zeros(cache_spec[0], cache_spec[1])


def cache_bytes(config, batch: int, tokens: int, dtype=jnp.bfloat16) -> int:
    """Memory the caching sampler holds for the per-layer attention outputs."""
    return int(np.prod(cache_shape(config, batch, tokens))) * jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What a sampling (or calibration) run derives from the model and settings, in one place.

    `prompt_embeds`/`pooled` are the conditioning batch the model sees (SD3 with CFG: [uncond; cond]); `rope` is
    FLUX's RoPE table (None for SD3), its image rows in `image_order`; `latent_shape` is one sample's latent shape;
    `image_order` the order of the image tokens inside the blocks (raster indices; None: raster, see
    `ditfa_jax.token_order.image_token_order`).
    """
    latent_shape: tuple[int, ...]
    image_tokens: int
    sigmas: np.ndarray
    timesteps: np.ndarray
    rope: tuple | None
    prompt_embeds: jax.Array
    pooled: jax.Array
    cfg_guidance: bool
    image_order: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.prompt_embeds.shape[1]


def prepare_run(model: Transformer, prompt_embeds, pooled_prompt_embeds, *, height: int, width: int,
                num_steps: int, guidance_scale: float, negative_prompt_embeds=None,
                negative_pooled_prompt_embeds=None, scheduler: SchedulerConfig | None = None,
                token_order: str = "raster") -> RunSetup:
    """Check the settings and derive the schedule, positions and conditioning batch of a run (image tokens in
    `token_order` inside the blocks: a plan's `token_order`)."""
    cfg, scheduler = model.config, scheduler or default_scheduler(model)
    prompt_embeds, pooled = jnp.asarray(prompt_embeds), jnp.asarray(pooled_prompt_embeds)
    if pooled.shape[0] != prompt_embeds.shape[0]:
        raise ValueError(f"batch mismatch: prompt_embeds has shape {prompt_embeds.shape} but pooled_prompt_embeds "
                         f"has shape {pooled.shape}")
    if isinstance(cfg, FluxConfig):
        rows, cols = flux_latent_grid(height, width, cfg.vae_scale_factor)
        sigmas, timesteps = flux_schedule(scheduler, num_steps, rows * cols)
        order = image_token_order(token_order, rows, cols)
        image_ids = flux_image_ids(rows, cols)
        rope = rope_tables(np.concatenate([np.zeros((prompt_embeds.shape[1], 3), np.float32),
                                           image_ids if order is None else image_ids[order]]), cfg.axes_dims_rope)
        return RunSetup((rows * cols, cfg.in_channels), rows * cols, sigmas, timesteps, rope, prompt_embeds, pooled,
                        cfg_guidance=False, image_order=order)
    scale = cfg.vae_scale_factor
    step = scale * cfg.patch_size
    if height % step or width % step:
        raise ValueError(f"height and width must be multiples of {step} for SD3; got {height}x{width}")
    latent_shape = (cfg.in_channels, height // scale, width // scale)
    image_tokens = (height // step) * (width // step)
    sigmas, timesteps = sd3_schedule(scheduler, num_steps, image_tokens)
    cfg_guidance = guidance_scale > 1
    if cfg_guidance:
        if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
            raise ValueError("SD3 with guidance_scale > 1 runs classifier-free guidance: pass negative_prompt_embeds "
                             "and negative_pooled_prompt_embeds")
        prompt_embeds = jnp.concatenate([jnp.asarray(negative_prompt_embeds, prompt_embeds.dtype), prompt_embeds])
        pooled = jnp.concatenate([jnp.asarray(negative_pooled_prompt_embeds, pooled.dtype), pooled])
    order = image_token_order(token_order, height // step, width // step)
    return RunSetup(latent_shape, image_tokens, sigmas, timesteps, None, prompt_embeds, pooled, cfg_guidance, order)


def sample(model: Transformer, latents, prompt_embeds, pooled_prompt_embeds, *, height: int, width: int,
           num_steps: int, guidance_scale: float, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
           scheduler: SchedulerConfig | None = None, plan=None, attention_impl: str = "auto", memory: bool = False):
    """Run the full denoising loop; returns the final latents (FLUX: packed [B, S, C*4]; SD3: [B, C, H/8, W/8]).

    height/width are pixel sizes (the latents must match them). FLUX-dev uses `guidance_scale` as distilled
    guidance; SD3 runs classifier-free guidance when guidance_scale > 1 (negative embeddings required).
    `plan` (a `ditfa_jax.plan.CompressionPlan` made for this model, resolution, text length and step count) turns
    on head-wise compression: its per-step head windows are scanned and the attention cache is carried; CFG
    batches share the plan. An all-full plan runs the dense sampler.
    memory=True compiles without running and returns the program's `memory_analysis()` (argument, output and
    temporary bytes): what a plan costs in memory, found without a GPU.
    """
    latents = jnp.asarray(latents)
    _check_batch(latents, {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
                           "negative_prompt_embeds": negative_prompt_embeds,
                           "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds})
    compressed = plan is not None and bool((np.asarray(plan.head_window) != -1).any())  # else: the dense program
    run = prepare_run(model, prompt_embeds, pooled_prompt_embeds, height=height, width=width, num_steps=num_steps,
                      guidance_scale=guidance_scale, negative_prompt_embeds=negative_prompt_embeds,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, scheduler=scheduler,
                      token_order=plan.token_order if compressed else "raster")
    if latents.shape[1:] != run.latent_shape:
        layout = "packed " if model.family == "flux" else ""
        raise ValueError(f"{model.family.upper()} latents for {height}x{width} must be {layout}"
                         f"[B, {', '.join(map(str, run.latent_shape))}]; got {latents.shape}")
    windows, cache_spec = _plan_inputs(model, plan, compressed, height=height, width=width,
                                       text_len=run.prompt_embeds.shape[1], num_steps=num_steps,
                                       batch=run.prompt_embeds.shape[0], tokens=run.tokens)
    schedule = (jnp.asarray(run.sigmas), jnp.asarray(run.timesteps), windows, run.image_order)
    if isinstance(model.config, FluxConfig):
        guidance = guidance_scale if model.config.guidance_embeds else None
        runner = _flux_runner(model.graphdef, attention_impl)
        args = (model.state, latents, run.prompt_embeds, run.pooled, run.rope, guidance, *schedule)
    else:
        runner = _sd3_runner(model.graphdef, attention_impl, run.cfg_guidance)
        args = (model.state, latents, run.prompt_embeds, run.pooled, jnp.float32(guidance_scale), *schedule)
    if memory:
        return runner.lower(*args, cache_spec=cache_spec).compile().memory_analysis()
    return runner(*args, cache_spec=cache_spec)


def _plan_inputs(model, plan, compressed: bool, *, height, width, text_len, num_steps, batch, tokens):
    """(head windows [steps, layers, H], cache (shape, dtype name)) for a plan checked against these settings, or
    (None, None).

    A plan that keeps every head full everywhere (e.g. calibrated with delta 0) runs the dense sampler: the same
    program as no plan, so the same result, and no cache memory.
    """
    if plan is None:
        return None, None
    plan.check_compatible(model.config, height=height, width=width, text_len=text_len, num_steps=num_steps)
    if not compressed:
        return None, None
    return (jnp.asarray(plan.head_window, jnp.int32),
            (cache_shape(model.config, batch, tokens), jnp.dtype(model.dtype).name))


_RUNNERS: dict = {}


def _flux_runner(graphdef, attention_impl):
    key = ("flux", graphdef, attention_impl)
    if key not in _RUNNERS:
        @functools.partial(jax.jit, static_argnames="cache_spec")
        def run(state, latents, prompt_embeds, pooled, rope, guidance, sigmas, timesteps, windows, order,
                cache_spec):
            model = nnx.merge(graphdef, state)
            cache = _zero_cache(cache_spec)
            b = latents.shape[0]
            g = None if guidance is None else jnp.full((b,), guidance, jnp.float32)

            def velocity(x, t, head_window, cache):
                out = model(x, prompt_embeds, pooled, jnp.full((b,), t / 1000), rope, guidance=g,
                            plan=None if cache is None else (head_window, cache), attention_impl=attention_impl,
                            image_order=order)
                return out if cache is not None else (out, None)

            return euler_scan(velocity, latents, sigmas, timesteps, windows, cache)

        _RUNNERS[key] = run
    return _RUNNERS[key]


def _sd3_runner(graphdef, attention_impl, cfg_guidance: bool):
    key = ("sd3", graphdef, attention_impl, cfg_guidance)
    if key not in _RUNNERS:
        @functools.partial(jax.jit, static_argnames="cache_spec")
        def run(state, latents, prompt_embeds, pooled, guidance_scale, sigmas, timesteps, windows, order,
                cache_spec):
            model = nnx.merge(graphdef, state)
            cache = _zero_cache(cache_spec)

            def velocity(x, t, head_window, cache):
                x_in = jnp.concatenate([x, x]) if cfg_guidance else x
                out = model(x_in.astype(model.context_embedder.kernel.dtype), prompt_embeds, pooled,
                            jnp.full((x_in.shape[0],), t), plan=None if cache is None else (head_window, cache),
                            attention_impl=attention_impl, image_order=order)
                v, cache = out if cache is not None else (out, None)
                if cfg_guidance:
                    uncond, cond = jnp.split(v.astype(jnp.float32), 2)
                    v = uncond + guidance_scale * (cond - uncond)
                return v, cache

            return euler_scan(velocity, latents, sigmas, timesteps, windows, cache)

        _RUNNERS[key] = run
    return _RUNNERS[key]
