"""The one denoising core: a run's setup, the velocity of one denoiser evaluation and the Euler step.

`ditfa_jax.sampler.sample` scans `velocity` + `euler_step` over the steps in one jitted program; the plan search
(`ditfa_jax.calibrate`) runs the same `embed`, blocks and `guided_velocity` + `euler_step` layer by layer, so a
search samples exactly as `sample` does with the plan being built. Everything family-specific is asked of the
model family (`ditfa_jax.family`): FLUX-dev feeds the guidance scale to the model (distilled guidance), SD3 runs
classifier-free guidance on a doubled batch [uncond, cond]. Latents are carried in float32 (diffusers steps in
float32 and casts back to the model dtype; we keep the float32 value).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ditfa_jax import sharding
from ditfa_jax.attention import AttentionSettings
from ditfa_jax.family import ModelFamily, TokenLayout, family_of, layout_for
from ditfa_jax.models.layers import empty_block_residuals, run_stacks_with_blocks
from ditfa_jax.scheduler import SchedulerConfig
from ditfa_jax.token_order import image_token_order


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on, as traced data of the jitted program.

    `prompt_embeds`/`pooled`: the batch the model sees (with CFG: [uncond; cond]); `guidance`: FLUX-dev's distilled
    guidance per sample, or None; `cfg_scale`: the CFG scale (float32 scalar), or None without CFG; `rope`: FLUX's
    RoPE tables, or None; `image_order`: raster indices of the image tokens inside the blocks, or None (raster).
    """
    prompt_embeds: jax.Array
    pooled: jax.Array
    guidance: jax.Array | None = None
    cfg_scale: jax.Array | None = None
    rope: tuple | None = None
    image_order: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What a sampling (or calibration) run derives from the model and settings, in one place.

    `layout` (static) places the tokens; `latent_shape` is one sample's latent; `sigmas`/`timesteps` the schedule
    (host arrays, scanned as data); `cond` the conditioning.
    """
    family: ModelFamily
    layout: TokenLayout
    latent_shape: tuple[int, ...]
    sigmas: np.ndarray
    timesteps: np.ndarray
    cond: Conditioning

    @property
    def batch(self) -> int:
        """Rows of the batch the model sees (twice the latents' batch with CFG)."""
        return self.cond.prompt_embeds.shape[0]


def default_scheduler(config) -> SchedulerConfig:
    return family_of(config).default_scheduler(config)


def prepare_run(config, prompt_embeds, pooled_prompt_embeds, *, height: int, width: int, num_steps: int,
                guidance_scale: float, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                scheduler: SchedulerConfig | None = None, token_order: str = "raster", vae_scale_factor: int = 8,
                dtype=None) -> RunSetup:
    """Check the settings and derive the layout, schedule, positions and conditioning of a run.

    height/width are pixels of `vae_scale_factor` per latent cell; the image tokens run in `token_order` inside
    the blocks (a plan's). Prompt embeddings are cast to `dtype` when given.
    """
    family = family_of(config)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps: expected an integer >= 1, got {num_steps!r}")
    cast = (lambda a: jnp.asarray(a, dtype)) if dtype is not None else jnp.asarray  # noqa: E731
    prompt_embeds, pooled = cast(prompt_embeds), cast(pooled_prompt_embeds)
    if prompt_embeds.ndim != 3 or pooled.ndim != 2 or pooled.shape[0] != prompt_embeds.shape[0]:
        raise ValueError(f"prompt_embeds must be [B, L, dim] and pooled_prompt_embeds [B, dim] of one batch; got "
                         f"{prompt_embeds.shape} and {pooled.shape}")
    layout = layout_for(config, height=height, width=width, text_len=prompt_embeds.shape[1],
                        vae_scale_factor=vae_scale_factor)
    sigmas, timesteps = family.schedule(scheduler or family.default_scheduler(config), num_steps,
                                        layout.image_tokens)
    order = image_token_order(token_order, *layout.grid)
    kind = family.guidance(config)
    batch = prompt_embeds.shape[0]
    guidance = jnp.full((batch,), guidance_scale, jnp.float32) if kind == "distilled" else None
    cfg_scale = None
    if kind == "cfg" and guidance_scale > 1:
        if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
            raise ValueError(f"{family.name} with guidance_scale > 1 runs classifier-free guidance: pass "
                             "negative_prompt_embeds and negative_pooled_prompt_embeds")
        prompt_embeds = jnp.concatenate([jnp.asarray(negative_prompt_embeds, prompt_embeds.dtype), prompt_embeds])
        pooled = jnp.concatenate([jnp.asarray(negative_pooled_prompt_embeds, pooled.dtype), pooled])
        cfg_scale = jnp.float32(guidance_scale)
    rope = family.positions(config, layout, order)
    cond = Conditioning(prompt_embeds, pooled, guidance, cfg_scale,
                        None if rope is None else tuple(jnp.asarray(t) for t in rope),
                        None if order is None else jnp.asarray(order))
    return RunSetup(family, layout, family.latent_shape(config, layout.grid), sigmas, timesteps, cond)


# ---- the pieces of one denoiser evaluation (pure functions of the NNX module, used under jit) ----

def embed(module, family: ModelFamily, cond: Conditioning, x, t):
    """Latents x [B, ...] (float32) at scheduler timestep t -> (carry of the first block stack, temb)."""
    x_in = jnp.concatenate([x, x]) if cond.cfg_scale is not None else x
    timestep = jnp.full((x_in.shape[0],), family.model_timestep(t), jnp.float32)
    return module.embed(x_in, cond.prompt_embeds, cond.pooled, timestep, cond.guidance,
                        image_order=cond.image_order)


def embed_split(module, family: ModelFamily, cond: Conditioning, settings: AttentionSettings, x, t):
    """`embed`, its carry split over `settings.mesh` (batch over the data axis, tokens over the head axis)."""
    carry, temb = embed(module, family, cond, x, t)
    return sharding.split_tokens(carry, settings.mesh), temb


def guided_velocity(module, cond: Conditioning, layout: TokenLayout, carry, temb):
    """The last stack's carry -> the velocity in float32, classifier-free guidance applied."""
    v = module.unembed(carry, temb, layout, cond.image_order).astype(jnp.float32)
    if cond.cfg_scale is not None:
        uncond, conditioned = jnp.split(v, 2)
        v = uncond + cond.cfg_scale * (conditioned - uncond)
    return v


def velocity(module, family: ModelFamily, cond: Conditioning, layout: TokenLayout, settings: AttentionSettings,
             x, t, head_window=None, cache=None, compute_blocks=None, residuals=None, head_order=None,
             compute_mlps=None, mlp_cache=None):
    """One denoiser evaluation: (velocity float32, new attention cache or None, new block residuals or None, new
    MLP-branch cache or None).

    With a plan, `head_window` [layers, H] is this step's plan and `cache` [layers, B, T, H, D] each layer's last
    computed attention output; `compute_blocks` [layers] bool which blocks run, the others reusing `residuals`
    (`ditfa_jax.models.layers.run_stacks_with_blocks`); `head_order` [layers, H] how the heads are grouped over
    a mesh's devices (`ditfa_jax.sharding.balance_heads`), or None; `compute_mlps` [layers] bool which blocks run
    their MLP branch, the others using `mlp_cache`."""
    carry, temb = embed_split(module, family, cond, settings, x, t)
    plan = None if cache is None else (head_window, cache, head_order)
    carry, cache, residuals, mlp_cache = run_stacks_with_blocks(module, carry, temb, cond.rope, plan, layout,
                                                                settings, compute_blocks, residuals, compute_mlps,
                                                                mlp_cache)
    return guided_velocity(module, cond, layout, carry, temb), cache, residuals, mlp_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VelocityHistory:
    """The velocities of the last three computed steps (newest first) and their sigmas, for steps that reuse or
    extrapolate the velocity instead of running the transformer (TaylorSeer-like, in sigma)."""
    velocities: jax.Array  # [3, *latent shape] float32
    sigmas: jax.Array  # [3] float32

    @classmethod
    def empty(cls, shape) -> "VelocityHistory":
        return cls(jnp.zeros((3, *shape), jnp.float32), jnp.zeros((3,), jnp.float32))

    def push(self, v, sigma) -> "VelocityHistory":
        return VelocityHistory(jnp.concatenate([v[None].astype(jnp.float32), self.velocities[:2]]),
                               jnp.concatenate([jnp.reshape(sigma, (1,)).astype(jnp.float32), self.sigmas[:2]]))

    def extrapolate(self, sigma, order: int):
        """The velocity at `sigma` from the polynomial of degree `order` (0, 1 or 2) through the newest computed
        points (Lagrange form; order 0 is the last computed velocity)."""
        points = range(order + 1)
        v = jnp.zeros_like(self.velocities[0])
        for j in points:
            weight = jnp.float32(1.0)
            for m in points:
                if m != j:
                    weight = weight * (sigma - self.sigmas[m]) / (self.sigmas[j] - self.sigmas[m])
            v = v + weight * self.velocities[j]
        return v


@dataclasses.dataclass(frozen=True)
class DynamicGate:
    """Skip the rest of the transformer when its first blocks barely changed (FBCache-like, decided on the device).

    At each step the first `first_blocks` blocks run; when the relative L1 change of their residual (output minus
    input) since the last fully computed step is below `threshold`, the other blocks reuse their cached residuals
    (`ditfa_jax.models.layers.run_stacks_with_blocks`) instead of running. Step 0 always runs everything, and so
    does a threshold of 0. A step that runs everything pays its first blocks twice (first_blocks / layers of a step)."""
    first_blocks: int = 1
    threshold: float = 0.1

    def __post_init__(self):
        if isinstance(self.first_blocks, bool) or not isinstance(self.first_blocks, (int, np.integer)) \
                or self.first_blocks < 1:
            raise ValueError(f"DynamicGate.first_blocks: expected an integer >= 1, got {self.first_blocks!r}")
        if not np.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"DynamicGate.threshold: expected a number >= 0, got {self.threshold!r}")

    def check(self, module) -> None:
        """The first blocks must lie in the first block stack (where the gate reads them)."""
        first_stack = module.stacks()[0][2]
        if self.first_blocks >= first_stack:
            raise ValueError(f"DynamicGate.first_blocks={self.first_blocks}: the gate reads blocks of the first "
                             f"stack, which has {first_stack} blocks; expected 1..{first_stack - 1}")


def _first_residual_change(new, old, first_blocks: int):
    """Relative L1 change of the first blocks' residuals (stack 0): sum |new - old| / sum |old| (inf if old is 0)."""
    leaves = zip(jax.tree_util.tree_leaves(new[0]), jax.tree_util.tree_leaves(old[0]))
    diff, base = jnp.float32(0), jnp.float32(0)
    for n, o in leaves:
        n, o = n[:first_blocks].astype(jnp.float32), o[:first_blocks].astype(jnp.float32)
        diff, base = diff + jnp.abs(n - o).sum(), base + jnp.abs(o).sum()
    return jnp.where(base > 0, diff / jnp.maximum(base, 1e-30), jnp.inf)


def gated_velocity(module, family: ModelFamily, cond: Conditioning, layout: TokenLayout, settings: AttentionSettings,
                   gate: DynamicGate, x, t, head_window, cache, residuals, force, head_order=None):
    """One denoiser evaluation under `gate`: (velocity, attention cache, residuals, skipped). `force` (a traced
    bool) runs everything regardless, as at step 0. The residuals of a skipped step stay those of the last full
    step, so the gate measures the change since then."""
    carry, temb = embed_split(module, family, cond, settings, x, t)
    plan = None if cache is None else (head_window, cache, head_order)
    layers = module.config.total_layers
    first = jnp.arange(layers) < gate.first_blocks
    out_first, cache_first, res_first, _ = run_stacks_with_blocks(module, carry, temb, cond.rope, plan, layout,
                                                                  settings, first, residuals)
    skipped = jnp.logical_and(~force, _first_residual_change(res_first, residuals, gate.first_blocks)
                              < gate.threshold)

    def run_all():
        return run_stacks_with_blocks(module, carry, temb, cond.rope, plan, layout, settings,
                                      jnp.ones((layers,), bool), residuals)[:3]

    out, cache, residuals = jax.lax.cond(skipped, lambda: (out_first, cache_first, residuals), run_all)
    return guided_velocity(module, cond, layout, out, temb), cache, residuals, skipped


def euler_step(x, v, sigma, sigma_next):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, t_i), in float32."""
    return x + (sigma_next - sigma) * v


def denoise(module, family: ModelFamily, cond: Conditioning, layout: TokenLayout, settings: AttentionSettings,
            latents, sigmas, timesteps, head_windows=None, cache=None, step_kinds=None, block_compute=None,
            gate: DynamicGate | None = None, head_orders=None, mlp_compute=None):
    """The whole loop as one `lax.scan` over the steps: (final latents float32, finite [steps] bool).

    `finite[i]` says whether the latents after step i are all finite (one reduction per step, on the device), so
    a NaN is traced to the step that made it (`check_finite_steps`). With a plan, `head_windows` [steps, layers,
    H] is scanned as data and the cache carried; `step_kinds` [steps] int32 (0 compute, 1 reuse the last computed
    velocity, 2 / 3 extrapolate it to first / second order in sigma) and `block_compute` [steps, layers] bool (which
    blocks run; the others reuse their residual) are scanned too, with the velocity history and the blocks'
    residuals in the carry. None: every step and block runs. `head_orders` [steps, layers, H] (a plan on a mesh)
    groups the heads over the devices, step by step. `mlp_compute` [steps, layers] bool says which blocks run
    their MLP branch (the others reuse its value from the last step it ran, carried); None: every MLP runs."""
    x0 = latents.astype(jnp.float32)
    history = None if step_kinds is None else VelocityHistory.empty(x0.shape)
    if gate is not None and mlp_compute is not None:
        raise ValueError("denoise: a dynamic gate with cached MLP branches is not supported; use one or the other")
    residuals, mlp_cache = None, None
    if block_compute is not None or gate is not None or mlp_compute is not None:
        carry, _ = embed_split(module, family, cond, settings, x0, timesteps[0])
        empty = empty_block_residuals(module, carry)  # zeros shaped like each stack's carry (shapes only)
        residuals = empty if block_compute is not None or gate is not None else None
        mlp_cache = empty if mlp_compute is not None else None

    def step(carry, xs):
        x, cache, history, residuals, mlp_cache = carry
        index, t, sigma, sigma_next, head_window, kind, compute_blocks, head_order, compute_mlps = xs

        def evaluate(cache, history, residuals, mlp_cache):
            if gate is None:
                v, cache, residuals, mlp_cache = velocity(module, family, cond, layout, settings, x, t, head_window,
                                                          cache, compute_blocks, residuals, head_order, compute_mlps,
                                                          mlp_cache)
                skipped = jnp.bool_(False)
            else:
                v, cache, residuals, skipped = gated_velocity(module, family, cond, layout, settings, gate, x, t,
                                                              head_window, cache, residuals, index == 0, head_order)
            return v, cache, None if history is None else history.push(v, sigma), residuals, mlp_cache, skipped

        if kind is None:
            v, cache, history, residuals, mlp_cache, skipped = evaluate(cache, history, residuals, mlp_cache)
        else:
            extrapolated = [lambda c, h, r, m, order=order: (h.extrapolate(sigma, order), c, h, r, m,
                                                             jnp.bool_(False))
                            for order in (0, 1, 2)]
            v, cache, history, residuals, mlp_cache, skipped = jax.lax.switch(
                kind, [evaluate, *extrapolated], cache, history, residuals, mlp_cache)
        x = euler_step(x, v, sigma, sigma_next)
        return (x, cache, history, residuals, mlp_cache), (jnp.isfinite(x).all(), skipped)

    steps = jnp.arange(len(timesteps))
    (x, *_), (finite, skipped) = jax.lax.scan(
        step, (x0, cache, history, residuals, mlp_cache),
        (steps, timesteps, sigmas[:-1], sigmas[1:], head_windows, step_kinds, block_compute, head_orders,
         mlp_compute))
    return (x, finite) if gate is None else (x, finite, skipped)


class NonFiniteError(FloatingPointError):
    """A run produced NaN or infinite values (latents or pixels)."""


def check_finite_steps(finite, sigmas) -> None:
    """Raise NonFiniteError naming the first step whose latents are not all finite (`denoise`'s flags)."""
    finite = np.asarray(finite)
    if finite.all():
        return
    first = int(np.argmin(finite))
    raise NonFiniteError(f"sampling produced NaN/Inf latents, first at step {first + 1} of {len(finite)} (sigma "
                         f"{float(sigmas[first]):.4g} -> {float(sigmas[first + 1]):.4g}); check the inputs (noise, "
                         "prompt embeddings: all finite?) and the dtype (fp16/bf16 overflow?)")


def cache_shape(config, batch: int, tokens: int) -> tuple[int, ...]:
    """Shape of the per-layer attention cache: [layers, batch, tokens, heads, head_dim]."""
    return (config.total_layers, batch, tokens, config.num_attention_heads, config.attention_head_dim)


def cache_bytes(config, batch: int, tokens: int, dtype=jnp.bfloat16) -> int:
    """Memory the caching sampler holds for the per-layer attention outputs."""
    return int(np.prod(cache_shape(config, batch, tokens), dtype=np.float64)) * jnp.dtype(dtype).itemsize


def activation_bytes(config, batch: int, tokens: int, dtype=jnp.bfloat16) -> int:
    """A lower bound of the activations one denoiser evaluation holds at once: one block's residual stream, q, k,
    v, attention output and 4x MLP hidden state ([batch, tokens, 9 * inner_dim] in `dtype`); for refusing a run
    that cannot fit (`ditfa_jax.memory.check_fits`), not for promising one does."""
    return batch * tokens * 9 * config.inner_dim * jnp.dtype(dtype).itemsize


def check_memory(config, *, dtype, batch: int, tokens: int) -> None:
    """Refuse, from the config alone (shapes only, nothing allocated), a transformer whose parameters cannot fit
    the host and the device, or a run of `batch` x `tokens` whose parameters + activations cannot fit the device."""
    from convert.diffusers_to_jax import build_abstract
    from ditfa_jax.memory import check_fits, state_bytes

    params = state_bytes(build_abstract(config, jnp.dtype(dtype))[1])
    check_fits(params, f"the parameters of this {type(config).__name__} ({jnp.dtype(dtype).name})")
    check_fits(params + activation_bytes(config, batch, tokens, dtype),
               f"a run of {batch} x {tokens} tokens (parameters + activations)", host=False)
