"""Plan search: single-layer RSE per head and a MILP per (step, layer), progressive over one calibration pass.

One sampling pass over the calibration prompts, layer by layer. At each step and layer:

1. the block's q, k, v on the *current* (already compressed) inputs;
2. exact attention `y_full`, every arrow candidate's output for all heads at once (the kernel with every head on
   that window), and the cached candidate (the layer's last computed output);
3. `rse[h, m] = mean((y_m - y_full)^2) / var(y_full)` over batch, tokens and channels of head h (ANCHORS.md);
4. `ditfa_jax.milp.solve_layer`: at most one method per head, sum of chosen RSE <= delta, only pairs with
   rse < c * delta / heads, maximising the attention FLOPs saved taken from the kernel's exact cost for this shape;
5. each head's chosen output (computed in 2, nothing is recomputed) feeds the next layer, so errors compound as
   they will at inference.

With ``step_delta`` > 0 the same pass also searches step methods: after a step has run (with its head choices),
the velocity that reusing or extrapolating the earlier computed ones would give (`STEP_KINDS`) is scored by its RSE
against the step's computed velocity; the best one within ``step_delta`` replaces the step (the whole step's time
saved). Else, with ``block_candidates``, the velocity with blocks F.. reusing their residuals (FBCache/DBCache-like)
is scored the same way, fewest blocks first. The trajectory, the velocity history, the attention caches and the
block residuals continue as the sampler runs the plan (what did not run leaves them as they were).
With ``step_prompts`` k the step methods are scored before the step runs instead, against the dense velocity of
the first k prompts only, so that a step they skip never runs on the others (a cheaper search where plans skip).

With ``mlp_delta`` > 0 each block of a computed step also scores its MLP branch: the RSE of the branch's output
cached at the last step it ran against the one it computes now; within ``mlp_delta`` the cached one is used
(FORA-like: the MLP's time saved), on the trajectory as at inference.

Step 0 is always full and runs the layers uncompressed (no candidates). The per-layer caches live in pinned host
memory when they would crowd the GPU, with transfers overlapped with compute. The result holds the plan for this
model, resolution, text length and step count, the RSE table and the pass's final latents.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import pallas_kernels
from ditfa_jax import sharding
from ditfa_jax.attention import AttentionSettings, dense_attention, headwise, joint_attention
from ditfa_jax.configs import VAE_SCALE_FACTOR
from ditfa_jax.cost_model import AttentionLayout, fp8_head_time
from ditfa_jax.denoise import (Conditioning, VelocityHistory, cache_bytes, embed, euler_step, guided_velocity,
                               prepare_run, velocity)
from ditfa_jax.family import TokenLayout
from ditfa_jax.fp8 import quantized_layers
from ditfa_jax.loading import Transformer
from ditfa_jax.methods import (CACHED_WINDOW, DEFAULT_CANDIDATES, STEP_HISTORY, STEP_KINDS, candidate_savings,
                               candidate_windows, check_candidates, flop_windows, windows_from_choice)
from ditfa_jax.milp import solve_layer, solve_unified
from ditfa_jax.models.layers import attention_inputs, block_forward
from ditfa_jax.plan import CompressionPlan
from ditfa_jax.scheduler import SchedulerConfig
from ditfa_jax.xla_options import model_jit


RSE_REDUCTIONS = ("mean", "max")
BUDGET_SCHEDULES = ("constant", "ramp")


def head_rse(candidates: jax.Array, y_full: jax.Array, over_prompts: str = "mean") -> jax.Array:
    """RSE per head and candidate: candidates [M, B, T, H, D], y_full [B, T, H, D] -> [H, M] (fp32).

    ``"mean"`` is the paper's RSE (mean and variance over batch, tokens and channels together); ``"max"`` is the
    worst batch row's own RSE, so a head that is harmless on average but breaks one prompt is not compressed.
    """
    y_full = y_full.astype(jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    sq = jnp.square(candidates.astype(jnp.float32) - y_full[None])
    if over_prompts == "mean":
        err = jnp.mean(sq, axis=(1, 2, 4))  # [M, H]
        var = jnp.var(y_full, axis=(0, 1, 3))  # [H]
        return (err / jnp.maximum(var, tiny)[None]).T
    if over_prompts == "max":
        err = jnp.mean(sq, axis=(2, 4))  # [M, B, H]
        var = jnp.var(y_full, axis=(1, 3))  # [B, H]
        return jnp.max(err / jnp.maximum(var, tiny)[None], axis=1).T
    raise ValueError(f"over_prompts={over_prompts!r}: expected one of {RSE_REDUCTIONS}")


def step_budgets(delta: float, num_steps: int, schedule: str = "constant") -> np.ndarray:
    """The RSE budget of each step's layers, float64 [num_steps] (step 0 is always full: 0).

    ``"constant"``: delta at every step (the paper). ``"ramp"``: proportional to the step index, averaging delta
    over steps 1..n-1 (same total budget), so the early steps, where the layout forms and an error propagates
    through every later step, are compressed least.
    """
    if schedule not in BUDGET_SCHEDULES:
        raise ValueError(f"budget schedule {schedule!r}: expected one of {BUDGET_SCHEDULES}")
    steps = np.arange(num_steps, dtype=np.float64)
    weights = np.ones(num_steps) if schedule == "constant" else steps / max(steps[1:].mean(), 1e-12)
    weights[0] = 0.0
    return delta * weights


def _cache_exceeds_device(nbytes: int, share: float = 0.35) -> bool:
    """True when the calibration cache would take more than `share` of the device's memory limit (if reported)."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return bool(limit) and nbytes > share * limit


class _LayerCaches:
    """Each layer's last computed attention output, on the device or in pinned host memory.

    In host memory, `fetch(layer)` returns the device copy of `layer`'s cache and starts copying the next layer's
    (asynchronously, while this layer computes); `store` starts the copy home. Both transfers overlap compute, so
    a cache larger than the GPU (FLUX-2K, 8 prompts: 47 GB) costs little time. Nothing is allocated up front:
    step 0, which is always computed, stores every layer before any is fetched.

    ``store(..., until_fetched=True)`` (a step search, storing a step's outputs once it is kept) leaves the value
    on the device until the layer is next fetched; that fetch returns it and starts its copy home, where it stays
    in case the fetching step is skipped. The copies then overlap the next step's layers, where copying every
    layer at the step's end would queue the next step's reads behind all of them, and a kept step followed by
    another reads nothing back from the host.
    """

    def __init__(self, layers: int, batch: int, on_host: bool, mesh=None):
        if mesh is None:
            device = jax.devices()[0]
            self.device = jax.sharding.SingleDeviceSharding(device)
            self.home = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host") if on_host else self.device
        else:  # the prompts' rows split over the mesh's data axis, as the calibration pass splits them
            spec = sharding.batch_spec(batch, mesh)
            self.device = jax.sharding.NamedSharding(mesh, spec)
            self.home = jax.sharding.NamedSharding(mesh, spec, memory_kind="pinned_host") if on_host else self.device
        self.on_host = on_host
        self.layers: list[jax.Array | None] = [None] * layers
        self._on_device: set[int] = set()  # layers stored until fetched, whose value is still on the device
        self._ahead: tuple[int, jax.Array] | None = None

    def fetch(self, layer: int) -> jax.Array:
        value = self.layers[layer]
        if value is None:
            raise RuntimeError(f"calibration cache: layer {layer} fetched before any step stored it")
        if not self.on_host:
            return value
        ahead, self._ahead = self._ahead, None
        if layer in self._on_device:
            self._on_device.discard(layer)
            self.layers[layer] = jax.device_put(value, self.home)
            current = value
        else:
            current = ahead[1] if ahead and ahead[0] == layer else jax.device_put(value, self.device)
        following = (layer + 1) % len(self.layers)
        if self.layers[following] is not None and following not in self._on_device:
            self._ahead = (following, jax.device_put(self.layers[following], self.device))
        return current

    def store(self, layer: int, out: jax.Array, until_fetched: bool = False) -> None:
        if self.on_host and until_fetched:
            self.layers[layer] = out
            self._on_device.add(layer)
        else:
            self.layers[layer] = jax.device_put(out, self.home) if self.on_host else out
            self._on_device.discard(layer)
        if self._ahead is not None and self._ahead[0] == layer:  # a prefetched copy of the value just replaced
            self._ahead = None


def _first_prompts(cond: Conditioning, prompts: int, k: int) -> Conditioning:
    """The conditioning of the first k of `prompts` calibration prompts (with CFG, both halves of [uncond, cond])."""
    halves = 2 if cond.cfg_scale is not None else 1
    rows = np.concatenate([np.arange(k) + half * prompts for half in range(halves)])
    take = lambda a: None if a is None else a[rows]  # noqa: E731
    return dataclasses.replace(cond, prompt_embeds=take(cond.prompt_embeds), pooled=take(cond.pooled),
                               guidance=take(cond.guidance))


def _layer_state(state, index):
    return jax.tree_util.tree_map(lambda a: a[index], state)


def prediction_rse(predicted, computed, over_prompts: str = "mean") -> jax.Array:
    """RSE of a value a method predicts instead of computing it (an extrapolated velocity, a cached MLP branch)
    against the computed one, both pytrees of [B, ...] arrays (e.g. the image and text streams): the squared error
    over the computed value's variance, both summed over every leaf, per batch row (prompt), then the mean or max
    over rows (`head_rse`'s reductions)."""
    err, var = 0.0, 0.0
    for p, c in zip(jax.tree_util.tree_leaves(predicted), jax.tree_util.tree_leaves(computed)):
        c = c.astype(jnp.float32)
        axes = tuple(range(1, c.ndim))
        err = err + jnp.sum(jnp.square(p.astype(jnp.float32) - c), axis=axes)
        var = var + jnp.sum(jnp.square(c - jnp.mean(c, axis=axes, keepdims=True)), axis=axes)
    per_row = err / jnp.maximum(var, jnp.finfo(jnp.float32).tiny)
    return per_row.max() if over_prompts == "max" else per_row.mean()


def _finish(block, carry, ctx, out, mlp, over_prompts: str):
    """`block.finish`, or with ``mlp = (cached, threshold)`` the MLP branch scored and, within the threshold, its
    cached value used: (carry, (value used, its RSE, reused)); ``cached`` None at the step that first runs it."""
    if mlp is None:
        return block.finish(carry, ctx, out), None
    cached, threshold = mlp
    mid = block.finish_attention(carry, ctx, out)
    fresh = block.mlp(mid, ctx)
    if cached is None:
        return block.add_mlp(mid, ctx, fresh), (fresh, jnp.float32(jnp.nan), jnp.bool_(False))
    rse = prediction_rse(cached, fresh, over_prompts)
    reused = rse <= threshold
    value = jax.tree_util.tree_map(lambda c, f: jnp.where(reused, c.astype(f.dtype), f), cached, fresh)
    return block.add_mlp(mid, ctx, value), (value, rse, reused)


def _select_heads(outs: jax.Array, choice: jax.Array) -> jax.Array:
    """outs [1+M, B, T, H, D] (exact, then each candidate), choice int32 [H] (0 exact, m+1 candidate m)."""
    return jnp.take_along_axis(outs, choice[None, None, None, :, None], axis=0)[0]


def sampled_query_tiles(layout: TokenLayout, band_q: int, stride: int) -> np.ndarray:
    """bool [band query tiles]: the query tiles whose RSE is measured, every ``stride``-th of those that hold only
    image tokens (from the first of them; every ``stride``-th of all tiles when no tile is image only).

    Text tiles are left out: an arrow head computes text queries exactly, so they add no error to measure, and a
    text tile of an arrow head is a full row, which at large images costs as much as the rest of the sample.
    """
    tokens = layout.tokens
    img0, img1 = pallas_kernels.schedule.image_region(tokens, layout.text_len, layout.text_first)
    starts = np.arange(pallas_kernels.schedule.num_tiles(tokens, band_q)) * band_q
    image_only = np.flatnonzero((starts >= img0) & (np.minimum(starts + band_q, tokens) <= img1))
    pool = image_only if image_only.size else np.arange(starts.size)
    tiles = np.zeros(starts.size, bool)
    tiles[pool[::stride]] = True
    return tiles


class _LayerRunner:
    """Jitted per-layer pieces for one block stack (the layer index is data: one compile per stack).

    `exact` runs a layer uncompressed (step 0), as the sampler's `block_forward` does. Both `exact` and `apply` take
    ``mlp``: None, or (cached MLP value or None, RSE threshold) to score the MLP branch (`_finish`); they return
    (carry, attention output, MLP result or None). `probe` computes the exact
    attention and every candidate's output for all heads at once, and their RSE; `apply` finishes the block with
    each head's chosen output (``all_exact``, static: no head compressed, a dense layer). With ``query_stride`` 1
    the probe computes every query and `apply` takes the chosen outputs from it (no attention is recomputed). With
    ``query_stride`` s > 1 the probe computes (and the RSE measures) only every s-th band query tile of the image
    (`sampled_query_tiles`), and `apply` runs the chosen methods once over all queries: about (1 + candidates) / s +
    kept of a layer's attention, instead of 1 + candidates.
    """

    def __init__(self, stack, *, layout: TokenLayout, windows: tuple[int, ...], settings: AttentionSettings,
                 query_stride: int = 1):
        self.graphdef, self.state = nnx.split(stack)
        graphdef = self.graphdef
        where = dict(text_len=layout.text_len, text_first=layout.text_first, padding=layout.padding)
        real = layout.tokens  # the RSE leaves the padding rows out

        @model_jit(static_argnames="rse_over_prompts")
        def exact(state, index, carry, temb, rope, mlp=None, rse_over_prompts="mean"):
            block = nnx.merge(graphdef, _layer_state(state, index))
            ctx, qkv = attention_inputs(block, carry, temb, rope)
            out = joint_attention(*qkv, **where, settings=settings)
            carry, mlp_result = _finish(block, carry, ctx, out, mlp, rse_over_prompts)
            return carry, out, mlp_result

        self.exact = exact
        if query_stride > 1:
            self.probe, self.apply = self._jitted = _sampled_probe_apply(graphdef, layout, windows, settings,
                                                                         query_stride)
            return

        @model_jit(static_argnames="rse_over_prompts")
        def probe(state, index, carry, temb, rope, prev_out, rse_over_prompts):
            block = nnx.merge(graphdef, _layer_state(state, index))
            ctx, (q, k, v) = attention_inputs(block, carry, temb, rope)
            heads = q.shape[2]
            y_full = dense_attention(q, k, v, settings.implementation, layout.padding)
            outs = jnp.stack([y_full] + [headwise(q, k, v, jnp.full((heads,), w, jnp.int32), None, **where,
                                                  settings=settings) if w != CACHED_WINDOW else prev_out
                                         for w in windows])
            return head_rse(outs[1:, :, :real], y_full[:, :real], rse_over_prompts), (ctx, outs)

        @model_jit(static_argnames=("all_exact", "rse_over_prompts"))
        def apply(state, index, carry, probed, choice, prev_out, all_exact, mlp=None, rse_over_prompts="mean"):
            block = nnx.merge(graphdef, _layer_state(state, index))
            ctx, outs = probed
            out = outs[0] if all_exact else _select_heads(outs, choice)
            carry, mlp_result = _finish(block, carry, ctx, out, mlp, rse_over_prompts)
            return carry, out, mlp_result

        self.probe, self.apply = self._jitted = probe, apply

    def compile_ahead(self, carry, temb, rope, prev_out, rse_over_prompts: str, mlp=None) -> None:
        """Compile `probe` and `apply` for these arguments' shapes (arrays or shape structs), so that the first
        compressed step does not wait on the compiler: `calibrate` runs this in a worker thread during step 0."""
        probe, apply = self._jitted
        lowered = probe.lower(self.state, 0, carry, temb, rope, prev_out, rse_over_prompts=rse_over_prompts)
        lowered.compile()
        choice = jax.ShapeDtypeStruct(prev_out.shape[-2:-1], jnp.int32)
        for all_exact in (False, True):
            apply.lower(self.state, 0, carry, lowered.out_info[1], choice, prev_out, all_exact=all_exact, mlp=mlp,
                        rse_over_prompts=rse_over_prompts).compile()


def _sampled_probe_apply(graphdef, layout: TokenLayout, windows, settings: AttentionSettings, stride: int):
    """`_LayerRunner`'s probe and apply when the RSE is measured on every ``stride``-th band query tile."""
    where = dict(text_len=layout.text_len, text_first=layout.text_first, padding=layout.padding)
    tiles = sampled_query_tiles(layout, settings.band[0], stride)
    rows = np.flatnonzero(pallas_kernels.schedule.query_rows(tiles, tokens=layout.tokens, band_q=settings.band[0]))
    window_of = np.asarray((-1, *windows), np.int32)  # choice code (0 exact, m + 1 candidate m) -> head window

    @model_jit(static_argnames="rse_over_prompts")
    def probe(state, index, carry, temb, rope, prev_out, rse_over_prompts):
        block = nnx.merge(graphdef, _layer_state(state, index))
        ctx, (q, k, v) = attention_inputs(block, carry, temb, rope)
        heads = q.shape[2]
        y_full = dense_attention(q[:, rows], k, v, settings.implementation, layout.padding)
        outs = jnp.stack([headwise(q, k, v, jnp.full((heads,), w, jnp.int32), None, **where, settings=settings,
                                   query_tiles=jnp.asarray(tiles))[:, rows] if w != CACHED_WINDOW
                          else prev_out[:, rows] for w in windows])
        return head_rse(outs, y_full, rse_over_prompts), (ctx, (q, k, v))

    @model_jit(static_argnames=("all_exact", "rse_over_prompts"))
    def apply(state, index, carry, probed, choice, prev_out, all_exact, mlp=None, rse_over_prompts="mean"):
        block = nnx.merge(graphdef, _layer_state(state, index))
        ctx, (q, k, v) = probed
        out = (dense_attention(q, k, v, settings.implementation, layout.padding) if all_exact  # as the sampler does
               else headwise(q, k, v, jnp.asarray(window_of)[choice], prev_out, **where, settings=settings))
        carry, mlp_result = _finish(block, carry, ctx, out, mlp, rse_over_prompts)
        return carry, out, mlp_result

    return probe, apply


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """What a plan search produced.

    `plan`: the compression plan. `rse`: float64 [steps, layers, heads, candidates], each head's RSE per candidate
    along the compressed trajectory (NaN at step 0, which is always full). `saving`: float64 [heads, candidates],
    the attention FLOPs each candidate removes (the MILP's objective). `final_latents`: the calibration pass's
    last latents, as `sample(plan=plan)` gives them from the same noise (`jax.random.normal(key(seed), ...)`).
    `step_rse`: float64 [steps, len(STEP_KINDS)], each step method's velocity RSE (NaN where not scored: compute,
    step 0, too little history, or no step search). `block_rse`: float64 [steps, len(block_candidates)], the
    velocity RSE of running only the first F blocks (`block_candidates`, increasing) at each step (NaN at step 0 or
    without a block search). `mlp_rse`: float64 [steps, layers], each block's MLP-branch RSE of its cached value
    (`prediction_rse`; NaN where not scored: step 0, skipped steps and cached blocks, or without an MLP search).
    """
    plan: CompressionPlan
    rse: np.ndarray
    saving: np.ndarray
    final_latents: jax.Array
    step_rse: np.ndarray | None = None
    block_rse: np.ndarray | None = None
    block_candidates: tuple[int, ...] = ()
    mlp_rse: np.ndarray | None = None


def calibrate(model: Transformer, prompt_embeds, pooled_prompt_embeds, *, height: int, width: int, num_steps: int,
              guidance_scale: float, delta: float, c: float = 1.5, candidates=DEFAULT_CANDIDATES,
              negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
              scheduler: SchedulerConfig | None = None, seed: int = 0, vae_scale_factor: int = VAE_SCALE_FACTOR,
              attention: AttentionSettings | None = None, band: tuple[int, int] | None = None,
              progress: bool = True, cache_on_host: bool | None = None, rse_over_prompts: str = "mean",
              budget_schedule: str = "constant", token_order: str = "raster", step_delta: float = 0.0,
              step_kinds=("reuse", "taylor1", "taylor2"), block_candidates=(), rse_query_stride: int = 1,
              mesh=None, price_at: AttentionLayout | None = None, mlp_delta: float = 0.0,
              step_prompts: int | None = None) -> CalibrationResult:
    """Search a head-wise compression plan on calibration prompts (embeddings [N, L, dim], pooled [N, dim]).

    The pass samples from seeded noise (`seed`) with the core `ditfa_jax.sample` runs (`ditfa_jax.denoise`), the
    plan being built applied as it goes (FLUX: distilled guidance; SD3: CFG on [uncond, cond], which share the
    plan). Returns a `CalibrationResult`; the plan's `notes` hold the per-step kept fraction, the RSE budget used
    and the time taken. `band` is the arrow band's granularity the plan records (default: the kernel's for the
    head size).

    Beyond the paper (defaults reproduce it): ``rse_over_prompts="max"`` scores a head by its worst calibration
    prompt (`head_rse`), and ``budget_schedule="ramp"`` spends the same total budget unevenly, little at early steps
    (`step_budgets`). ``token_order="hilbert"`` (or "morton") searches, and the plan runs, with the image tokens
    along a space-filling curve, so that arrow bands are 2-D neighbourhoods (`ditfa_jax.token_order`).
    ``step_delta`` > 0 also searches step methods (``step_kinds``, names from `STEP_KINDS`): a step whose
    velocity one of them predicts within that RSE is skipped (module docstring). ``block_candidates`` (numbers F of
    first blocks that run) adds block-residual caching to that menu: blocks F.. reuse their residuals when the
    velocity that gives is within ``step_delta``. The candidate saving the most time wins (a skipped step saves it
    all, F blocks save (layers - F) / layers of it). ``mlp_delta`` > 0 lets each block of a computed step reuse its
    MLP branch's cached output where that output's RSE is within it (module docstring; `prediction_rse`).

    ``step_prompts`` k (with ``step_delta`` > 0) scores the step methods before the step runs, on the first k
    calibration prompts only: their velocity is computed dense (one jitted evaluation of k prompts) and each step
    method's prediction scored against it. A step it skips never runs the layers (no heads, blocks or MLP branches
    are scored there); a step it keeps runs as without it. The search then costs about k / prompts of a dense step
    more on computed steps and that much instead of a whole step on skipped ones: cheaper wherever more than about
    k / prompts of the steps are skipped. None (default): every step runs on every prompt and is scored after.

    ``rse_query_stride`` s > 1 measures each head's RSE on every s-th band query tile of the image only (an
    estimate from a sample of the queries, `sampled_query_tiles`) and computes each layer's chosen methods once over
    all of them, which at large images costs less than computing every candidate everywhere (`_LayerRunner`); 1
    measures on all queries.

    ``mesh`` (`ditfa_jax.sharding.make_mesh` with a head axis of 1) splits the calibration prompts over its data
    axis; the RSEs are reduced over all prompts on all devices, so the plan is the one a single device finds.

    ``price_at`` (a `ditfa_jax.cost_model.AttentionLayout`, e.g. a cost model's) prices the candidates where the
    plan is meant to run rather than at this run's size: a testbed searched for FLUX.1-dev at 2048^2 weighs an
    arrow_8 head by the FLOPs it removes there. The candidate "fp8" (a full head in FP8) saves time, not FLOPs: it is
    priced by its measured time (`ditfa_jax.cost_model.fp8_head_time`) at that layout, which needs a measured head
    size; a layer takes FP8 heads only when they save more than the layer's FP8 overhead (`solve_layer`'s
    ``shared_cost``).
    """
    if rse_over_prompts not in RSE_REDUCTIONS:
        raise ValueError(f"rse_over_prompts={rse_over_prompts!r}: expected one of {RSE_REDUCTIONS}")
    if not np.isfinite(step_delta) or step_delta < 0:
        raise ValueError(f"step_delta={step_delta!r}: expected a number >= 0 (0: no step methods)")
    if not np.isfinite(mlp_delta) or mlp_delta < 0:
        raise ValueError(f"mlp_delta={mlp_delta!r}: expected a number >= 0 (0: every MLP branch runs)")
    search_mlp = mlp_delta > 0
    bad = [k for k in step_kinds if k not in STEP_KINDS[1:]]
    if bad:
        raise ValueError(f"step_kinds {bad}: expected names from {list(STEP_KINDS[1:])}")
    kind_codes = [STEP_KINDS.index(k) for k in step_kinds]
    layers_total = model.config.total_layers
    bad = [f for f in block_candidates if isinstance(f, bool) or not isinstance(f, (int, np.integer))
           or not 1 <= f < layers_total]
    if bad:
        raise ValueError(f"block_candidates {bad}: expected numbers of first blocks that run, in 1..{layers_total - 1}")
    if isinstance(rse_query_stride, bool) or not isinstance(rse_query_stride, (int, np.integer)) \
            or rse_query_stride < 1:
        raise ValueError(f"rse_query_stride={rse_query_stride!r}: expected an int >= 1 (1: every query)")
    search_blocks = step_delta > 0 and bool(block_candidates)
    budgets = step_budgets(delta, num_steps, budget_schedule)
    start_time = time.perf_counter()
    cfg = model.config
    run = prepare_run(cfg, prompt_embeds, pooled_prompt_embeds, height=height, width=width, num_steps=num_steps,
                      guidance_scale=guidance_scale, negative_prompt_embeds=negative_prompt_embeds,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, scheduler=scheduler,
                      token_order=token_order, vae_scale_factor=vae_scale_factor, dtype=model.dtype)
    layout, cond, family = run.layout, run.cond, run.family
    if mesh is not None:
        if mesh.shape.get(sharding.HEADS, 1) != 1:
            raise ValueError(f"calibrate: mesh head axis {mesh.shape[sharding.HEADS]}: the search splits its prompts "
                             "over the data axis only; make the mesh with heads=1")
        mesh = sharding.check_mesh(mesh, cfg, run.batch)
    band = tuple(band or pallas_kernels.default_band(cfg.attention_head_dim))
    settings = dataclasses.replace(attention or AttentionSettings(), band=band)
    n = cond.prompt_embeds.shape[0] // (2 if cond.cfg_scale is not None else 1)
    if step_prompts is not None:
        if isinstance(step_prompts, bool) or not isinstance(step_prompts, (int, np.integer)) \
                or not 1 <= step_prompts <= n:
            raise ValueError(f"step_prompts={step_prompts!r}: expected a number of prompts in 1..{n} (the "
                             "calibration prompts)")
        if step_delta == 0:
            raise ValueError(f"step_prompts={step_prompts!r} scores step methods: give step_delta > 0 too")
        if mesh is not None:
            raise ValueError("step_prompts: scoring steps on a subset of the prompts runs on one device; "
                             "calibrate without a mesh")
    latents = jax.random.normal(jax.random.key(seed), (n, *run.latent_shape), jnp.float32)
    if mesh is not None:  # the prompts' rows over the data axis; positions and scales replicated
        rows = sharding.split_batch(dict(prompt_embeds=cond.prompt_embeds, pooled=cond.pooled, guidance=cond.guidance),
                                    mesh)
        cond = dataclasses.replace(sharding.replicate(cond, mesh), **rows)
        latents = sharding.split_batch(latents, mesh)

    tokens, heads = layout.tokens, cfg.num_attention_heads
    candidates = check_candidates(candidates)
    windows = tuple(int(w) for w in candidate_windows(candidates, layout.image_tokens))
    at = price_at or AttentionLayout(image_tokens=layout.image_tokens, text_len=layout.text_len,
                                     head_dim=cfg.attention_head_dim, band=band)
    fp8_time, shared_cost = None, None
    if "fp8" in candidates:
        fp8_time = fp8_head_time(at.image_tokens + at.text_len, at.head_dim)
        shared_cost = (candidates.index("fp8"), fp8_time.layer_overhead * heads)  # in head-savings units
        settings = dataclasses.replace(settings, fp8=True)
    saving = np.broadcast_to(candidate_savings(candidates, image_tokens=at.image_tokens, text_len=at.text_len,
                                               text_first=layout.text_first if price_at is None else True,
                                               head_dim=at.head_dim, band=at.band,
                                               fp8_head_ratio=fp8_time and fp8_time.head_ratio),
                             (heads, len(windows)))

    def kept_fraction(step_windows):
        return float(pallas_kernels.plan_cost(flop_windows(step_windows), batch=1, tokens=tokens,
                                              text_len=layout.text_len, text_first=layout.text_first,
                                              head_dim=cfg.attention_head_dim, band=band).flop_fraction.mean())

    module = model.module() if mesh is None else nnx.merge(model.graphdef, sharding.replicate(model.state, mesh))
    runners = [(_LayerRunner(stack, layout=layout, windows=windows, settings=settings,
                             query_stride=int(rse_query_stride)), first, count)
               for stack, first, count in module.stacks()]
    graphdef, state = nnx.split(module)

    @model_jit
    def embed_step(state, x, t):
        return embed(nnx.merge(graphdef, state), family, cond, x, t)

    enter = jax.jit(lambda index, carry: module.enter_stack(index, carry), static_argnums=0)

    @model_jit
    def step_velocity(state, carry, temb):
        return guided_velocity(nnx.merge(graphdef, state), cond, layout, carry, temb)

    step_latents = jax.jit(euler_step)
    tree_sub = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.subtract, a, b))
    tree_add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))
    stack_of = {first: index for index, (_, first, _) in enumerate(runners)}

    def cached_from(first_run, entry_stack, x):
        """The last stack's carry when blocks first_run.. reuse their residuals from the last step they ran."""
        for layer in range(first_run, layers_total):
            if layer in stack_of and stack_of[layer] > entry_stack:
                x = enter(stack_of[layer], x)
            x = tree_add(x, residuals[layer])
        return x

    velocity_rse = jax.jit(functools.partial(prediction_rse, over_prompts=rse_over_prompts))

    @functools.partial(jax.jit, static_argnums=3)
    def step_candidates(history, v, sigma, orders):
        """Each extrapolation order's velocity (every prompt) and its RSE against the computed one (of every prompt,
        or of the first few: `step_prompts`)."""
        preds = [history.extrapolate(sigma, order) for order in orders]
        return jnp.stack([velocity_rse(p[:v.shape[0]], v) for p in preds]), jnp.stack(preds)

    scout_cond = None if step_prompts is None else _first_prompts(cond, n, step_prompts)

    @model_jit
    def scout_velocity(state, scout_cond, x, t):
        """The dense velocity of the first `step_prompts` prompts (their latents x), to score step methods on."""
        return velocity(nnx.merge(graphdef, state), family, scout_cond, layout, settings, x, t)[0]

    if cache_on_host is None:
        cache_on_host = _cache_exceeds_device(cache_bytes(cfg, run.batch, layout.attention_tokens, model.dtype))
    caches = _LayerCaches(cfg.total_layers, run.batch, cache_on_host, mesh)
    mlp_caches = _LayerCaches(cfg.total_layers, run.batch, cache_on_host, mesh)  # used with an MLP search only
    mlp_threshold = jnp.float32(mlp_delta)
    mlp_compute = np.ones((num_steps, cfg.total_layers), bool)
    mlp_rse = np.full((num_steps, cfg.total_layers), np.nan)
    head_window = np.full((num_steps, cfg.total_layers, heads), -1, np.int32)
    rse_used = np.zeros((num_steps, cfg.total_layers))
    rse_table = np.full((num_steps, cfg.total_layers, heads, len(windows)), np.nan)
    kept_per_step = []
    step_kind = np.zeros(num_steps, np.int8)
    step_rse = np.full((num_steps, len(STEP_KINDS)), np.nan)
    block_order = tuple(sorted(int(f) for f in block_candidates)) if search_blocks else ()
    block_rse = np.full((num_steps, len(block_order)), np.nan)
    history, computed = VelocityHistory.empty(latents.shape), 0
    block_compute = np.ones((num_steps, layers_total), bool)
    residuals = {}  # layer -> its residual (output minus input) at the last step it ran (block search only)
    # step 0 runs exactly; meanwhile a worker compiles each stack's probe and apply for the later steps
    compiler, compiling = concurrent.futures.ThreadPoolExecutor(len(runners) + 1), {}

    def run_layers(step):
        """Run every layer of this step on all prompts, searching heads (and MLP branches, block entries):
        (last carry, temb, attention outputs to keep, MLP results, block entries, fresh residuals)."""
        pending = {}  # with a step search, a step's attention outputs are kept only if the step is not skipped
        store = (lambda layer, out: pending.__setitem__(layer, out)) if step_delta > 0 else caches.store
        mlp_used = {}  # MLP search: layer -> (value used, its RSE, reused), stored once the step is kept
        carry, temb = embed_step(state, latents, run.timesteps[step])
        entries, fresh = {}, {}  # block search: the carry entering each candidate F, each layer's new residual
        for stack_index, (runner, first, count) in enumerate(runners):
            carry = enter(stack_index, carry)
            for i in range(count):
                layer = first + i
                before = carry
                if search_blocks and layer in block_candidates:
                    entries[layer] = (stack_index, carry)
                if step == 0:  # always full: the cached candidate has no value yet
                    carry, out, mlp_result = runner.exact(runner.state, i, carry, temb, cond.rope,
                                                          mlp=(None, mlp_threshold) if search_mlp else None,
                                                          rse_over_prompts=rse_over_prompts)
                    store(layer, out)
                    if search_mlp:
                        mlp_used[layer] = mlp_result
                    if i == 0 and num_steps > 1:
                        compiling[stack_index] = compiler.submit(
                            runner.compile_ahead, before, temb, cond.rope, out, rse_over_prompts,
                            (mlp_result[0], mlp_threshold) if search_mlp else None)
                    if search_blocks:
                        fresh[layer] = tree_sub(carry, before)
                    continue
                if i == 0 and stack_index in compiling:
                    compiling.pop(stack_index).result()
                prev_out = caches.fetch(layer)
                rse, probed = runner.probe(runner.state, i, carry, temb, cond.rope, prev_out,
                                           rse_over_prompts=rse_over_prompts)
                rse_table[step, layer] = np.asarray(rse, np.float64)
                choice = np.full(heads, -1)
                if budgets[step] > 0:
                    choice = solve_layer(rse_table[step, layer], saving, budgets[step], c, shared_cost=shared_cost)
                    chosen = choice >= 0
                    head_window[step, layer, chosen] = np.asarray(windows)[choice[chosen]]
                    rse_used[step, layer] = rse_table[step, layer][chosen, choice[chosen]].sum()
                mlp = (mlp_caches.fetch(layer), mlp_threshold) if search_mlp else None
                carry, out, mlp_result = runner.apply(runner.state, i, carry, probed,
                                                      np.asarray(choice + 1, np.int32), prev_out,
                                                      all_exact=bool((choice < 0).all()), mlp=mlp,
                                                      rse_over_prompts=rse_over_prompts)
                store(layer, out)
                if search_mlp:
                    mlp_used[layer] = mlp_result
                if search_blocks:
                    fresh[layer] = tree_sub(carry, before)
        return carry, temb, pending, mlp_used, entries, fresh

    def choose_step(step, allowed, v, sigma):
        """Score each allowed step method against the velocity v of all prompts or of the first k; the least
        error within step_delta as (step kind, its velocity for every prompt), else None."""
        rse, preds = step_candidates(history, v, sigma, tuple(order for _, order in allowed))
        rse = np.asarray(rse, np.float64)
        for (code, _), r in zip(allowed, rse):
            step_rse[step, code] = r
        best = int(np.argmin(rse))
        return (allowed[best][0], preds[best]) if rse[best] <= step_delta else None

    def choose_blocks(step, entries, computed_v, temb):
        """Score every block candidate F (blocks F.. reusing their residuals) against the computed velocity, even
        on a step a step method skips (the unified MILP reads them all): the fewest blocks within step_delta, as
        (F, its velocity), else None."""
        chosen = None
        for j, f in enumerate(block_order):
            entry_stack, entry = entries[f]
            v_f = step_velocity(state, cached_from(f, entry_stack, entry), temb)
            block_rse[step, j] = float(velocity_rse(v_f, computed_v))
            if chosen is None and block_rse[step, j] <= step_delta:
                chosen = f, v_f  # fewest blocks first: the first within budget saves the most
        return chosen

    step_seconds, seconds_before_steps = [], time.perf_counter() - start_time
    bar = tqdm(range(num_steps), desc=f"calibrating (delta={delta})", unit="step", disable=not progress)
    for step in bar:
        step_start = time.perf_counter()
        sigma = jnp.float32(run.sigmas[step])
        allowed = [(code, code - 1) for code in kind_codes if computed >= STEP_HISTORY[code]] if step else []
        skip = None  # (step kind, predicted velocity) of a skipped step
        if scout_cond is not None and allowed:  # scored before the step runs, on k prompts
            if "scout" in compiling:
                compiling.pop("scout").result()
            skip = choose_step(step, allowed, scout_velocity(state, scout_cond, latents[:step_prompts],
                                                              run.timesteps[step]), sigma)
        ran_layers = skip is None
        pending, mlp_used, fresh = {}, {}, {}
        if ran_layers:
            carry, temb, pending, mlp_used, entries, fresh = run_layers(step)
            v = computed_v = step_velocity(state, carry, temb)
            if step == 0 and scout_cond is not None and num_steps > 1:
                x_k = jax.ShapeDtypeStruct((step_prompts, *latents.shape[1:]), latents.dtype)
                compiling["scout"] = compiler.submit(
                    lambda: scout_velocity.lower(state, scout_cond, x_k, run.timesteps[1]).compile())
            if scout_cond is None and step_delta > 0 and allowed:
                skip = choose_step(step, allowed, v, sigma)
        first_run = layers_total  # blocks that run this step: 0..first_run-1
        if skip is not None:  # every step method saves the whole step: the least error won
            step_kind[step], v = skip
            head_window[step] = -1  # the transformer does not run: its head choices mean nothing
        if search_blocks and step and ran_layers:
            chosen = choose_blocks(step, entries, computed_v, temb)
            if chosen is not None and step_kind[step] == 0:
                (first_run, v) = chosen
                block_compute[step, first_run:] = False
                head_window[step, first_run:] = -1  # those blocks do not run: their head choices mean nothing
        if step_kind[step] == 0:
            history, computed = history.push(v, sigma), computed + 1
            for layer, out in pending.items():
                if layer < first_run:
                    caches.store(layer, out, until_fetched=True)
            residuals.update({layer: r for layer, r in fresh.items() if layer < first_run})
            for layer, (value, rse, reused) in mlp_used.items():
                if layer < first_run:  # a cached block ran no MLP: its cached value stays
                    mlp_caches.store(layer, value, until_fetched=True)
                    mlp_rse[step, layer], mlp_compute[step, layer] = float(rse), not bool(reused)
        latents = step_latents(latents, v, run.sigmas[step], run.sigmas[step + 1])
        kept_per_step.append(kept_fraction(head_window[step, :first_run]) * first_run / layers_total
                             if step_kind[step] == 0 else 0.0)
        bar.set_postfix(kept=f"{kept_per_step[-1]:.2f}", skipped=int((step_kind != 0).sum()))
        if step == 1 or num_steps == 1:
            compiler.shutdown()
        step_seconds.append(time.perf_counter() - step_start)
    jax.block_until_ready(latents)
    plan = CompressionPlan.from_config(
        cfg, head_window, height=height, width=width, text_len=layout.text_len, candidates=tuple(candidates),
        vae_scale_factor=vae_scale_factor, delta=delta, c=c, token_order=token_order, band=band,
        step_kind=step_kind, block_compute=block_compute, mlp_compute=mlp_compute,
        notes=dict(calibration_seconds=round(time.perf_counter() - start_time, 2), prompts=int(n),
                   guidance_scale=float(guidance_scale), seed=seed, rse_used_max=float(rse_used.max()),
                   cache_on_host=bool(cache_on_host), rse_over_prompts=rse_over_prompts,
                   **({"rse_query_stride": int(rse_query_stride)} if rse_query_stride > 1 else {}),
                   budget_schedule=budget_schedule, **({"step_delta": float(step_delta),
                                                        "step_kinds": list(step_kinds),
                                                        "block_candidates": [int(f) for f in block_candidates]}
                                                       if step_delta > 0 else {}),
                   **({"mlp_delta": float(mlp_delta)} if search_mlp else {}),
                   **({"step_prompts": int(step_prompts)} if step_prompts is not None else {}),
                   kept_per_step=[round(k, 4) for k in kept_per_step],
                   **({"priced_at": dataclasses.asdict(price_at)} if price_at is not None else {}),
                   **({"fp8_time": dataclasses.asdict(fp8_time)} if fp8_time is not None else {}),
                   seconds_before_steps=round(seconds_before_steps, 2),
                   step_seconds=[round(t, 3) for t in step_seconds]),
        fp8_layers=quantized_layers(module) or None)  # what the errors were measured with: the plan runs the same
    return CalibrationResult(plan=plan, rse=rse_table, saving=np.array(saving), final_latents=latents,
                             step_rse=step_rse, block_rse=block_rse, block_candidates=block_order,
                             mlp_rse=mlp_rse if search_mlp else None)


def calibrate_for_speedup(run, target_speedup: float, cost_model, *, num_steps: int,
                          scales=(1 / 16, 16.0), iterations: int = 6, log=None) -> CalibrationResult:
    """The least-error plan of one search family that reaches ``target_speedup`` under ``cost_model``.

    ``run(scale)`` runs one calibration pass with every budget of the search (the head ``delta``, the
    ``step_delta``) multiplied by ``scale`` and returns its `CalibrationResult`; a larger scale removes more work.
    The scale is bisected (geometrically, ``iterations`` passes after the two ends of ``scales``) for the smallest
    one whose plan runs at least ``target_speedup`` times faster than dense (`cost_model.plan_cost`): the smallest
    budget, so the least error, at that speed. ValueError naming the value and the limit when the target is out of
    reach: below 1, above the ``num_steps``x that skipping every step after the first would give, or above what the
    loosest scale reaches. The plan's notes record the passes (scale, speed-up).
    """
    from ditfa_jax.cost_model import plan_cost

    bound = float(num_steps)  # step 0 always computes; every later step skipped costs nothing
    if not np.isfinite(target_speedup) or not 1.0 < target_speedup <= bound:
        raise ValueError(f"target speed-up {target_speedup!r}: expected a number in (1, {bound:g}] (with {num_steps} "
                         f"steps, step 0 always computes)")
    lo, hi = (float(s) for s in scales)
    if not 0 < lo < hi:
        raise ValueError(f"scales {scales!r}: expected 0 < low < high")
    passes = []

    def speedup(scale):
        result = run(scale)
        value = 1.0 / plan_cost(result.plan, cost_model)
        passes.append((round(scale, 6), round(value, 4)))
        if log is not None:
            log(f"budget scale {scale:.4g}: {value:.3f}x (target {target_speedup:g}x)")
        return result, value

    best, value = speedup(hi)
    if value < target_speedup:
        raise ValueError(f"target speed-up {target_speedup:g}x is out of reach: the loosest budget tried (scale "
                         f"{hi:g}) gives {value:.3f}x under the cost model {cost_model.name}")
    result, value = speedup(lo)
    if value >= target_speedup:
        best, hi = result, lo
    else:
        for _ in range(iterations):
            mid = float(np.sqrt(lo * hi))
            result, value = speedup(mid)
            if value >= target_speedup:
                best, hi = result, mid
            else:
                lo = mid
    notes = {**best.plan.notes, "target_speedup": float(target_speedup), "budget_scale": hi,
             "speedup_passes": passes, "cost_model": cost_model.name}
    return dataclasses.replace(best, plan=best.plan.replace(notes=notes))


_STEP_METHODS = ("reuse", "taylor1", "taylor2")
# The plan searches one budget can be spent over: name -> (delta, step_delta, block candidates, mlp_delta) ->
# `calibrate` options. Each searches one kind of saving alone (the others stay off), except "taylor+heads" (Taylor
# on the skipped steps, head-wise compression on the computed ones: where attention weighs more, at 2048^2, this
# mixture beats fewer steps at 3x; `benchmarks/RESULTS.md`), "taylor+mlp" (Taylor on the skipped steps, cached MLP
# branches on the computed ones) and "all", the greedy pass over every method at once (MLP branches where
# mlp_delta > 0).
METHOD_FAMILIES = {
    "heads": lambda delta, step_delta, blocks, mlp_delta=0.0: {"delta": delta, "step_delta": 0.0},
    "reuse": lambda delta, step_delta, blocks, mlp_delta=0.0: {"delta": 0.0, "step_delta": step_delta,
                                                               "step_kinds": ("reuse",)},
    "taylor": lambda delta, step_delta, blocks, mlp_delta=0.0: {"delta": 0.0, "step_delta": step_delta,
                                                                "step_kinds": ("taylor1", "taylor2")},
    "blocks": lambda delta, step_delta, blocks, mlp_delta=0.0: {"delta": 0.0, "step_delta": step_delta,
                                                                "step_kinds": (), "block_candidates": blocks},
    "mlp": lambda delta, step_delta, blocks, mlp_delta=0.0: {"delta": 0.0, "step_delta": 0.0,
                                                             "mlp_delta": mlp_delta},
    "steps+blocks": lambda delta, step_delta, blocks, mlp_delta=0.0: {"delta": 0.0, "step_delta": step_delta,
                                                                      "step_kinds": _STEP_METHODS,
                                                                      "block_candidates": blocks},
    "taylor+heads": lambda delta, step_delta, blocks, mlp_delta=0.0: {"delta": delta, "step_delta": step_delta,
                                                                      "step_kinds": ("taylor1", "taylor2")},
    "taylor+mlp": lambda delta, step_delta, blocks, mlp_delta=0.0: {"delta": 0.0, "step_delta": step_delta,
                                                                    "step_kinds": ("taylor1", "taylor2"),
                                                                    "mlp_delta": mlp_delta},
    "all": lambda delta, step_delta, blocks, mlp_delta=0.0: {"delta": delta, "step_delta": step_delta,
                                                             "step_kinds": _STEP_METHODS,
                                                             "block_candidates": blocks, "mlp_delta": mlp_delta},
}


FEWER_STEPS = "fewer-steps"  # the plain baseline as a candidate of `least_error_for_speedup`


def least_error_for_speedup(search, target_speedup: float, cost_model, *, num_steps: int, methods, dense_latents,
                            base_steps=(), log=None) -> CalibrationResult:
    """The plan of least end-to-end error among ``methods`` at ``target_speedup``: names of `METHOD_FAMILIES`, or
    `FEWER_STEPS`; with ``base_steps``, also each method on top of fewer steps (candidates "<method> on <n>
    steps": a plan for n < ``num_steps`` steps reaching the speed against dense with all ``num_steps``).

    ``search(scale, method=None, num_steps=None)`` runs one calibration pass of that method with its budgets times
    ``scale`` (``num_steps`` steps; default: the run's). Each method finds its own smallest budget reaching the speed
    (`calibrate_for_speedup`); `FEWER_STEPS` is dense with the most steps that reach it (``search(0.0, num_steps=n)``),
    whose plan is a dense plan for those steps: a sampler given it runs that many steps. A candidate's error is the
    median over the calibration prompts of the relative squared error of its final latents (what it produces from
    the calibration noise) against ``dense_latents`` (dense with all steps from the same noise;
    `median_relative_error`); `least_error_plan` keeps the best. A method that
    cannot reach the speed is left out (logged); ValueError when none can. The plan's notes record every error.

    On testbed v2 at a third of the cost, Taylor on 10 of 20 steps beats both Taylor on 20 steps and dense with 7
    (`benchmarks/RESULTS.md`, issue 17): where skipping alone would skip too much, fewer steps plus skipping wins.
    """
    from ditfa_jax.cost_model import plan_cost, steps_cost

    unknown = [m for m in methods if m not in METHOD_FAMILIES and m != FEWER_STEPS]
    if unknown or not methods:
        raise ValueError(f"methods {list(methods)}: expected names from {list(METHOD_FAMILIES) + [FEWER_STEPS]}")
    bad = [n for n in base_steps if not 1 <= int(n) < num_steps]
    if bad:
        raise ValueError(f"base steps {bad}: expected step counts in 1..{num_steps - 1} (fewer than the run's)")
    runs = [(m, num_steps) for m in methods]
    runs += [(m, int(n)) for n in sorted(set(base_steps), reverse=True) for m in methods if m != FEWER_STEPS]
    results, candidates, errors, out_of_reach = {}, {}, {}, {}
    dense = np.asarray(dense_latents, np.float64)
    for method, steps_run in runs:
        name = method if steps_run == num_steps else f"{method} on {steps_run} steps"
        try:
            if method == FEWER_STEPS:
                steps = int(np.floor(num_steps / target_speedup * (1 + 1e-9)))  # 20 / 1.25 is 16 despite rounding
                if steps < 1:
                    raise ValueError(f"{target_speedup:g}x would leave less than one of {num_steps} steps")
                result = search(0.0, num_steps=steps)
                candidates[name] = steps_cost(steps, num_steps)
            else:
                target = target_speedup * steps_run / num_steps  # of dense with steps_run steps
                if target <= 1.0:
                    raise ValueError(f"{steps_run} dense steps alone reach {target_speedup:g}x (that is "
                                     f"{FEWER_STEPS})")
                result = calibrate_for_speedup(functools.partial(search, method=method, num_steps=steps_run),
                                               target, cost_model, num_steps=steps_run, log=log)
                candidates[name] = plan_cost(result.plan, cost_model) * steps_run / num_steps
        except ValueError as err:
            out_of_reach[name] = str(err)
            if log is not None:
                log(f"{name}: {err}")
            continue
        results[name], errors[name] = result, median_relative_error(result.final_latents, dense)
        if log is not None:
            log(f"{name}: end-to-end RSE (median over prompts) {errors[name]:.3g} at {target_speedup:g}x")
    if not results:
        raise ValueError(f"target speed-up {target_speedup:g}x is out of reach for every method: "
                         + "; ".join(f"{m}: {e}" for m, e in out_of_reach.items()))
    chosen = least_error_plan(candidates, errors, cost_model, max_cost=1.0 / target_speedup)
    best = results[chosen]
    notes = {**best.plan.notes, "method": chosen, "method_errors": {m: round(e, 8) for m, e in errors.items()},
             "methods_out_of_reach": sorted(out_of_reach), "against_dense_steps": int(num_steps)}
    return dataclasses.replace(best, plan=best.plan.replace(notes=notes))


def median_relative_error(latents, dense) -> float:
    """The median over prompts (the leading axis) of each prompt's relative squared error of ``latents`` against
    ``dense``. Not the error pooled over prompts: one prompt whose dense image settles on another valid layout under
    fewer steps dominates a pooled (or mean) error, and on testbed v2 that once made the choice a plan 5 dB worse on
    held-out captions than the one the median picks (`benchmarks/RESULTS.md`, "Cached MLP branches")."""
    x, d = np.asarray(latents, np.float64), np.asarray(dense, np.float64)
    axes = tuple(range(1, d.ndim))
    per_prompt = np.sum((x - d) ** 2, axis=axes) / np.maximum(np.sum(d ** 2, axis=axes), 1e-30)
    return float(np.median(per_prompt))


def least_error_plan(candidates: dict[str, CompressionPlan | float], errors: dict[str, float], cost_model, *,
                     max_cost: float) -> str:
    """The name of the candidate with the least measured ``errors`` among those that cost at most ``max_cost`` (a
    share of dense with all steps, compared with a relative tolerance of 1e-9 so that a plan skipping 5 of 20 steps
    costs 0.75 despite rounding). A candidate is a plan (priced by `cost_model.plan_cost`) or, for one that is not
    a plan, its cost: dense with fewer steps (`cost_model.steps_cost`), the plain baseline every plan must beat.

    This is how one budget is spent over every method: each method's own search finds its plans (`calibrate` with
    its budgets, or `calibrate_for_speedup`), each plan is run end to end on the calibration prompts and scored
    against dense there (the error of the images it actually produces, so errors that compound along its trajectory
    count), and the best plan at the price wins. Per-step choices from recorded errors cannot do this: the greedy
    pass and the unified MILP both misjudge how errors of skipped steps compound (`benchmarks/RESULTS.md`, issue
    17). ValueError naming the cheapest candidate when none is within ``max_cost``.
    """
    from ditfa_jax.cost_model import plan_cost

    if not candidates:
        raise ValueError("least_error_plan: no candidate plans")
    missing = sorted(set(candidates) - set(errors))
    if missing:
        raise ValueError(f"least_error_plan: no measured error for {missing}")
    costs = {name: float(c) if isinstance(c, (int, float)) else plan_cost(c, cost_model)
             for name, c in candidates.items()}
    within = [name for name, cost in costs.items() if cost <= max_cost * (1 + 1e-9)]  # 15/20 is 0.75
    if not within:
        cheapest = min(costs, key=costs.get)
        raise ValueError(f"cost {max_cost:g} is out of reach: the cheapest candidate, {cheapest!r}, costs "
                         f"{costs[cheapest]:.3f} of dense under the cost model {cost_model.name}")
    return min(within, key=lambda name: (errors[name], costs[name]))


def unified_plan(result: CalibrationResult, cost_model, *, head_budget: float | None = None,
                 step_budget: float | None = None, max_skips_in_a_row: int | None = None,
                 c: float | None = None) -> CompressionPlan:
    """Every method chosen at once (`ditfa_jax.milp.solve_unified`) from one calibration's recorded errors: heads,
    skipped steps and cached block ranges compete for the time they save under ``cost_model`` (a head its share of
    the step's attention time times the FLOPs it removes; a skipped step the whole step; F blocks of L the other
    (L - F) / L of it).

    Budgets default to the totals the progressive pass had: ``delta`` per (step >= 1, layer) for the heads and
    ``step_delta`` per step >= 1 for the step choices. ``max_skips_in_a_row`` caps runs of skipped steps.

    For comparison, not for use: the errors were measured along the pass's own trajectory, each skipped step with
    computed steps before it, so the MILP skips runs of steps whose real errors compound. On testbed v2 its plans
    are far below the greedy pass's at every cost (`benchmarks/RESULTS.md`, issue 17); the CLI does not offer it.
    """
    plan = result.plan
    steps, layers, heads = plan.head_window.shape
    if "fp8" in plan.candidates:
        raise ValueError("unified_plan: the candidate fp8 has a per-layer overhead the unified MILP does not model; "
                         "calibrate without it")
    if result.step_rse is None or "step_delta" not in plan.notes:
        raise ValueError("unified_plan: the calibration had no step search (step_delta 0): nothing to unify")
    if "step_prompts" in plan.notes:
        raise ValueError(f"unified_plan: the calibration scored steps on {plan.notes['step_prompts']} prompts before "
                         "running them (step_prompts), so the steps it skipped have no head or block errors; "
                         "calibrate without step_prompts")
    rse = np.array(result.rse, np.float64)
    rse[0] = np.inf  # step 0 stays full
    attention_ms = cost_model.dense_ms - cost_model.step_ms[0]
    head_saving = np.asarray(result.saving, np.float64) * attention_ms / (layers * heads)
    kinds = np.array(result.step_rse, np.float64)[:, 1:]
    kinds[0] = np.inf
    blocks = (np.full((steps, 0), np.inf) if result.block_rse is None
              else np.array(result.block_rse, np.float64))
    first = np.asarray(result.block_candidates, np.int64)
    choice = solve_unified(
        rse, head_saving, plan.delta * (steps - 1) * layers if head_budget is None else head_budget,
        kinds, cost_model.dense_ms, STEP_HISTORY[1:], blocks, first, (layers - first) / layers * cost_model.dense_ms,
        plan.notes["step_delta"] * (steps - 1) if step_budget is None else step_budget,
        c=plan.c if c is None else c, max_skips_in_a_row=max_skips_in_a_row)
    block_compute = np.arange(layers)[None, :] < choice.first_run[:, None]
    head_window = windows_from_choice(choice.head, plan.candidates, plan.image_tokens)
    head_window[~block_compute] = -1
    head_window[choice.step_kind != 0] = -1
    block_compute[choice.step_kind != 0] = True
    notes = {**plan.notes, "search": "unified MILP", "cost_model": cost_model.name,
             "time_saved_ms": round(choice.saved, 3), "head_rse_spent": choice.head_error,
             "step_rse_spent": choice.step_error, "max_skips_in_a_row": max_skips_in_a_row}
    return plan.replace(head_window=head_window, step_kind=choice.step_kind.astype(np.int8),
                        block_compute=block_compute, notes=notes)
