"""Plan search time and compressed-sampler speed for a FLUX.1-dev-sized transformer (random weights, bf16).

1. Sampler ms/step at 2048^2 for plans keeping ~60 %, ~45 % and ~32 % of the attention FLOPs against the dense
   sampler, same process (``--sampler 1024,2048``; ``--family sd3``: SD3-medium with CFG instead). With random
   weights a calibrated plan means nothing, so these plans are drawn at random per (step, layer, head) from
   {full, arrow_8, cached} in proportions that give the target kept fraction (step 0 full, as always); the kernel
   runs what the plan says, which is what the timing measures.
2. Calibration (plan search) wall time at 1024^2 and 2048^2, 8 prompts, 28 and 50 steps, delta 0.2. At 2048^2 the
   8 prompts' attention cache (47 GB) does not fit beside the 24 GB of weights on an 80 GB H100: it lives in pinned
   host memory (`calibrate` picks that itself). ``--calibration 2048:50:8 --rse-query-stride 1,8 --step-delta 0.05
   --dense-pass``: only those, with the RSE measured on every 8th query tile, step methods searched too, and the
   dense sampler on the same prompts; the kernel's sampled-query path is checked against the full one first.
   ``--step-prompts 1``: the step methods scored on the first prompt before each step runs (`calibrate`'s
   ``step_prompts``), so that a skipped step never runs on the others.

3. ``--step-methods 1024,2048``: step reuse, Taylor extrapolation, block-residual caching and the dynamic gate
   (issue 17) at 28 steps: measured ms/step against the dense sampler and against what
   `ditfa_jax.cost_model.plan_cost` predicts from the dense step and this run's dense attention time, which checks
   the cost model's assumptions (a skipped step costs nothing, a cached block saves its share of the step).

4. ``--speedup-plans 1024,2048``: the compute profile of the plans testbed v2's search chose (Taylor, order 2)
   at 1.5x, 2x and 3x fewer transformer evaluations, and 3x with heads, in the same table.

Writes JSON lines to $OUT/bench_plan.jsonl as it goes and prints a table last.

    python benchmarks/bench_plan.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from ditfa_jax.attention import AttentionSettings, dense_attention
from ditfa_jax.calibrate import calibrate, sampled_query_tiles
from ditfa_jax.configs import FluxConfig, SD3Config
from ditfa_jax.loading import Transformer
from ditfa_jax.cost_model import StepCostModel, attention_kept
from ditfa_jax.methods import FP8_WINDOW, method_window
from ditfa_jax.models.flux import FluxTransformer
from ditfa_jax.models.sd3 import SD3Transformer
from ditfa_jax.family import TokenLayout, family_of, layout_for
from ditfa_jax.plan import CompressionPlan
from ditfa_jax.sampler import cache_bytes, sample

FLUX_DEV = FluxConfig(guidance_embeds=True)
SD3_MEDIUM = SD3Config(num_layers=24, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
                       pos_embed_max_size=192)
# --family: (config, text tokens, guidance scale: FLUX-dev's distilled guidance, SD3's classifier-free guidance on a
# doubled batch). Only the sampler rows (--sampler) take SD3; the other measurements are FLUX.1-dev's.
FAMILIES = {"flux": (FLUX_DEV, 512, 3.5), "sd3": (SD3_MEDIUM, 333, 7.0)}
TEXT = 512
GUIDANCE = 3.5
RESULTS = []


COMPILE_SECONDS: dict[str, float] = {}  # jax's compile-phase durations (tracing, lowering, XLA), summed per event


def _count_compile(event: str, seconds: float, **_) -> None:
    if event.startswith("/jax/core/compile") or "compilation" in event:
        COMPILE_SECONDS[event] = COMPILE_SECONDS.get(event, 0.0) + seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def record(**row):
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_plan.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


MOSAIC_FIELDS: dict = {}


def use_mosaic_fields(spec: str) -> None:
    """Every mosaic_gpu call takes these MosaicConfig fields ('name=value,...': ints and True/False) over its
    defaults."""
    backend = pallas_kernels.get_backend("mosaic_gpu")
    for item in spec.split(","):
        name, value = item.split("=")
        MOSAIC_FIELDS[name] = {"True": True, "False": False}.get(value) if value in ("True", "False") else int(value)
    default_config = type(backend).default_config
    type(backend).default_config = lambda self, *a: dataclasses.replace(default_config(self, *a), **MOSAIC_FIELDS)


def random_model(cfg) -> Transformer:
    cls = SD3Transformer if isinstance(cfg, SD3Config) else FluxTransformer
    graphdef = nnx.split(nnx.eval_shape(lambda: cls(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))[0]
    state = jax.jit(lambda: nnx.split(cls(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))[1])()
    return Transformer(cfg, graphdef, state)


def model_batch(cfg) -> int:
    """Rows of the batch the model sees for one image: two with classifier-free guidance."""
    return 2 if family_of(cfg).guidance(cfg) == "cfg" and GUIDANCE > 1 else 1


def random_plan(cfg, *, px: int, steps: int, target: float, seed: int = 0) -> CompressionPlan:
    """Heads drawn from {full, arrow_8, cached}; proportions chosen so the plan keeps ~target of the FLOPs."""
    layout = layout_for(cfg, height=px, width=px, text_len=TEXT, vae_scale_factor=8)
    n_img = layout.image_tokens
    tokens, layers, heads = n_img + TEXT, cfg.total_layers, cfg.num_attention_heads
    arrow = method_window("arrow_8", n_img)
    arrow_kept = float(pallas_kernels.plan_cost(np.array([arrow]), batch=1, tokens=tokens, text_len=TEXT,
                                                text_first=layout.text_first,
                                                head_dim=cfg.attention_head_dim).flop_fraction)
    # per-step kept after step 0: p_full + p_arrow * arrow_kept, with p_cached = p_arrow / 2
    want = (target * steps - 1) / (steps - 1)
    p_arrow = (1 - want) / (1 - arrow_kept + 0.5)
    p_cached = p_arrow / 2
    rng = np.random.default_rng(seed)
    draw = rng.random((steps, layers, heads))
    hw = np.where(draw < p_cached, 0, np.where(draw < p_cached + p_arrow, arrow, -1)).astype(np.int32)
    hw[0] = -1
    return CompressionPlan.from_config(cfg, hw, height=px, width=px, text_len=TEXT,
                                       notes=dict(synthetic=True, target=target))


def time_sampler(model, px: int, steps: int, plan, backend: str | None = None, **options) -> tuple[float, float]:
    """(first call s, best of 2 compiled calls in ms per step) of the sampler on seeded random inputs, batch 1;
    `options` go to `sample` (mesh=, balance=)."""
    cfg = model.config
    keys = jax.random.split(jax.random.key(0), 5)
    layout = layout_for(cfg, height=px, width=px, text_len=TEXT, vae_scale_factor=8)
    latents = jax.random.normal(keys[0], (1, *family_of(cfg).latent_shape(cfg, layout.grid)))
    text, negative = (jax.random.normal(k, (1, TEXT, cfg.joint_attention_dim), jnp.bfloat16) for k in keys[1:3])
    pooled, negative_pooled = (jax.random.normal(k, (1, cfg.pooled_projection_dim), jnp.bfloat16) for k in keys[3:])
    if model_batch(cfg) == 2:
        options = dict(options, negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(sample(model, latents, text, pooled, height=px, width=px, num_steps=steps,
                                     guidance_scale=GUIDANCE, plan=plan, attention=AttentionSettings(backend=backend),
                                     **options))
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:]) / steps * 1e3


def dense_attention_ms(cfg, px: int, reps: int = 50) -> float:
    """One layer's dense (cuDNN on a GPU) attention at this size, ms: median of `reps` calls chained in one jit."""
    tokens = (px // 16) ** 2 + TEXT
    shape = (model_batch(cfg), tokens, cfg.num_attention_heads, cfg.attention_head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in jax.random.split(jax.random.key(7), 3))

    @jax.jit
    def chained(q, k, v):
        for _ in range(10):
            q = dense_attention(q, k, v)
        return q

    jax.block_until_ready(chained(q, k, v))
    times = []
    for _ in range(reps // 10):
        start = time.perf_counter()
        jax.block_until_ready(chained(q, k, v))
        times.append((time.perf_counter() - start) / 10 * 1e3)
    return float(np.median(times))


def with_fp8_heads(plan: CompressionPlan, share: float = 1.0) -> CompressionPlan:
    """The plan with its full heads after step 0 in FP8, in a random ``share`` of its (step, layer) pairs."""
    hw = np.array(plan.head_window)
    pick = np.random.default_rng(1).random(hw.shape[:2]) < share
    pick[0] = False
    hw[pick[..., None] & (hw == -1)] = FP8_WINDOW
    return plan.replace(head_window=hw, notes=dict(plan.notes, fp8_share=share))


def bench_sampler(model, px: int, steps: int, backend: str | None = None, fp8: bool = False) -> None:
    """Dense and ~60 / 45 / 32 % plans; each plan's Amdahl bound from the dense step and the dense attention time
    of this run (all layers' attention scaled by the FLOPs kept, the rest unchanged). With ``fp8``, also every
    head in FP8 and the ~60 % plan with its full heads in FP8 (window -2), each with the time the search's FP8
    model predicts (`ditfa_jax.cost_model.fp8_head_time`, at this size) from this run's dense attention time."""
    cfg = model.config
    layout = layout_for(cfg, height=px, width=px, text_len=TEXT, vae_scale_factor=8)
    attention_ms = dense_attention_ms(cfg, px) * cfg.total_layers
    dense_ms = None
    targets = (None, 0.60, "fp8", "~60 % fp8") if fp8 else (None, 0.60, 0.45, 0.32)
    for target in targets:
        if target == "fp8":
            plan = with_fp8_heads(CompressionPlan.from_config(cfg, np.full((steps, cfg.total_layers,
                                                                            cfg.num_attention_heads), -1, np.int32),
                                                              height=px, width=px, text_len=TEXT))
        elif target == "~60 % fp8":
            plan = with_fp8_heads(random_plan(cfg, px=px, steps=steps, target=0.60))
        else:
            plan = None if target is None else random_plan(cfg, px=px, steps=steps, target=target)
        first, ms = time_sampler(model, px, steps, plan, backend)
        dense_ms = ms if target is None else dense_ms
        kept = 1.0 if plan is None else plan.flops_kept_fraction()
        bound = dense_ms / (dense_ms - attention_ms * (1 - kept))
        predicted_by = "FLOPs"
        if plan is not None and plan.uses_fp8_heads:  # the attention time the FP8 model prices, not FLOPs
            predicted_by = "FP8 time model"
            timed = attention_kept(plan, StepCostModel("this run", "", (0.0, 1.0), (dense_ms - attention_ms, dense_ms),
                                                       "this run")).mean()
            bound = dense_ms / (dense_ms - attention_ms * (1 - timed))
        label = "dense" if plan is None else target if isinstance(target, str) else f"~{target:.0%}"
        record(kind="sampler", px=px, steps=steps, plan=label,
               backend=backend or "auto", attention_flops_kept=round(kept, 4), ms_per_step=round(ms, 2),
               speedup_vs_dense=round(dense_ms / ms, 3), amdahl_bound=round(bound, 3), bound_from=predicted_by,
               of_bound=round(dense_ms / ms / bound, 3), dense_attention_ms_per_step=round(attention_ms, 2),
               first_call_s=round(first, 2), mosaic_fields=MOSAIC_FIELDS or None,
               model=type(cfg).model_class, attention_tokens=layout.attention_tokens,
               cache_gb=0.0 if plan is None else round(
                   cache_bytes(cfg, model_batch(cfg), layout.attention_tokens) / 1e9, 2))


def step_method_plans(cfg, *, px: int, steps: int) -> dict:
    """Plans with the compute profiles of step-level caching (FLUX.1-dev, random weights: only time is measured).

    reuse / taylor2: the transformer runs at every other / every third step after step 3; blocks F8B0: on two of
    every three steps after step 3 only the first 8 blocks run, the others reuse their residual (DBCache F8B0-like);
    taylor2 + heads: taylor2 with a ~45 % head plan on the steps that run."""
    full = CompressionPlan.full(cfg, height=px, width=px, text_len=TEXT, num_steps=steps)
    late = np.arange(steps) > 3
    reuse = np.where(late & (np.arange(steps) % 2 == 1), 1, 0).astype(np.int8)
    taylor = np.where(late & (np.arange(steps) % 3 != 0), 3, 0).astype(np.int8)
    blocks = np.ones((steps, cfg.total_layers), bool)
    blocks[late & (np.arange(steps) % 3 != 0), 8:] = False
    heads = random_plan(cfg, px=px, steps=steps, target=0.45)
    return {"reuse every other step": full.replace(step_kind=reuse),
            "taylor2, 1 step in 3": full.replace(step_kind=taylor),
            "blocks F8B0, 2 steps in 3": full.replace(block_compute=blocks),
            "taylor2 1 in 3 + heads ~45 %": heads.replace(step_kind=taylor)}


def taylor_schedule(steps: int, computed: int) -> np.ndarray:
    """int8 step kinds of a Taylor order-2 plan computing ``computed`` of ``steps`` steps: the first three
    (taylor2's history), then the others spread evenly over the rest."""
    keep = np.unique(np.concatenate([np.arange(3), np.round(np.linspace(3, steps - 1, computed - 3))]))
    kinds = np.full(steps, 3, np.int8)
    kinds[keep.astype(int)] = 0
    return kinds


def speedup_plans(cfg, *, px: int, steps: int) -> dict:
    """Plans with the compute profile the testbed v2 search chose (Taylor order 2 between computed steps) at
    1.5x, 2x and 3x fewer transformer evaluations, and the 3x one with a ~45 % head plan on its computed steps."""
    full = CompressionPlan.full(cfg, height=px, width=px, text_len=TEXT, num_steps=steps)
    plans = {}
    for speedup in (1.5, 2.0, 3.0):
        kinds = taylor_schedule(steps, max(3, round(steps / speedup)))
        plans[f"taylor2, {speedup:g}x fewer evaluations ({(kinds == 0).sum()} of {steps})"] = full.replace(
            step_kind=kinds)
    heads = random_plan(cfg, px=px, steps=steps, target=0.45)
    plans[f"same 3x + heads ~45 % ({(kinds == 0).sum()} of {steps})"] = heads.replace(step_kind=kinds)
    return plans


def mixture_plans(cfg, *, px: int, steps: int, arrow_shares=()) -> dict:
    """The compute profile testbed v2's least-error search chose at cost 0.35 (Taylor order 2 on 10 of 20 steps,
    7 computed) scaled to ``steps``: Taylor on fewer steps. Plans for 14 and 13 steps computing 10 and 9 (2.8x and
    3.1x fewer evaluations than dense with ``steps``), the 13-step one with a ~45 % head plan, and the 14-step one
    with each of ``arrow_shares`` of its heads arrow_8 and the others full (the method shares of testbed v2's Taylor
    + heads choice, run at this size)."""
    plans = {}
    for base, computed in ((steps // 2, 10), (steps // 2 - 1, 9)):
        full = CompressionPlan.full(cfg, height=px, width=px, text_len=TEXT, num_steps=base)
        kinds = taylor_schedule(base, computed)
        plans[f"taylor2 on {base} steps, {computed} computed"] = full.replace(step_kind=kinds)
    heads = random_plan(cfg, px=px, steps=base, target=0.45)
    plans[f"same on {base} steps + heads ~45 %"] = heads.replace(step_kind=kinds)
    kinds = taylor_schedule(steps // 2, 10)
    n_img = layout_for(cfg, height=px, width=px, text_len=TEXT, vae_scale_factor=8).image_tokens
    for share in arrow_shares:
        draw = np.random.default_rng(1).random((steps // 2, cfg.total_layers, cfg.num_attention_heads))
        hw = np.where(draw < float(share), method_window("arrow_8", n_img), -1).astype(np.int32)
        hw[0] = -1
        heads = CompressionPlan.from_config(cfg, hw, height=px, width=px, text_len=TEXT, step_kind=kinds)
        kept = float(np.asarray(heads.flops_kept_per_step())[kinds == 0].mean())  # on the computed steps
        plans[f"taylor2 on {steps // 2} steps, 10 computed + {float(share):.0%} arrow_8 (keeping {kept:.1%})"] = heads
    return plans


def mlp_plans(cfg, *, px: int, steps: int, shares=(0.5, 1.0)) -> dict:
    """Plans caching MLP branches (issue 17): each of ``shares`` of the blocks (spread evenly) reuses its MLP output
    at every step after the first, which measures the MLP branches' share of the step; and the 2.8x Taylor profile
    of `mixture_plans` (14 steps computing 10) with half the MLP branches cached on its computed steps after the
    third."""
    full = CompressionPlan.full(cfg, height=px, width=px, text_len=TEXT, num_steps=steps)
    layers = cfg.total_layers
    plans = {}
    for share in shares:
        picked = np.zeros(layers, bool)
        picked[np.unique(np.round(np.linspace(0, layers - 1, max(1, round(share * layers)))).astype(int))] = True
        mlp = np.ones((steps, layers), bool)
        mlp[1:, picked] = False
        plans[f"MLP cached in {picked.sum()} of {layers} blocks, steps 1-{steps - 1}"] = full.replace(mlp_compute=mlp)
    base = steps // 2
    kinds = taylor_schedule(base, 10)
    mlp = np.ones((base, layers), bool)
    mlp[np.flatnonzero(kinds == 0)[3:][:, None], np.arange(0, layers, 2)[None, :]] = False
    taylor = CompressionPlan.full(cfg, height=px, width=px, text_len=TEXT, num_steps=base, step_kind=kinds)
    plans[f"taylor2 on {base} steps, 10 computed"] = taylor
    plans["same + MLP cached in every other block after the 3rd computed step"] = taylor.replace(mlp_compute=mlp)
    return plans


def bench_speedup_plans(model, px: int, steps: int = 28, mixtures: bool = False, arrow_shares=()) -> None:
    """The `speedup_plans` (or `mixture_plans`) against the dense sampler and the cost model's prediction (issue
    17, benchmark 2)."""
    plans = (mixture_plans(model.config, px=px, steps=steps, arrow_shares=arrow_shares) if mixtures
             else speedup_plans(model.config, px=px, steps=steps))
    bench_step_methods(model, px, steps, plans=plans, gates=())


def bench_step_methods(model, px: int, steps: int = 28, plans: dict | None = None,
                       gates: tuple = (0.05, 0.2)) -> None:
    """Measured against predicted time of step-level plans, and the dynamic gate at two thresholds."""
    from ditfa_jax.cost_model import StepCostModel, plan_cost
    from ditfa_jax.denoise import DynamicGate

    cfg = model.config
    attention_ms = dense_attention_ms(cfg, px) * cfg.total_layers
    _, dense_ms = time_sampler(model, px, steps, None)
    from ditfa_jax.cost_model import COST_MODELS

    estimate = COST_MODELS.get(f"h200-flux-dev-{px}")  # the cost model's MLP share, where it has one for this size
    local = StepCostModel("this run", "dense step and attention of this run", (0.0, 1.0),
                          (dense_ms - attention_ms, dense_ms), "bench_plan.py --step-methods",
                          mlp_share=estimate.mlp_share if estimate else None)
    record(kind="step_methods", px=px, steps=steps, plan="dense", ms_per_step=round(dense_ms, 2),
           speedup_vs_dense=1.0, predicted_speedup=1.0, dense_attention_ms_per_step=round(attention_ms, 2))
    for name, plan in (plans or step_method_plans(cfg, px=px, steps=steps)).items():
        first, ms = time_sampler(model, px, plan.num_steps, plan)
        ms *= plan.num_steps / steps  # a plan on fewer steps: its time per step of the dense schedule
        predicted = (steps / (plan.num_steps * plan_cost(plan, local))
                     if local.mlp_share is not None or not plan.uses_mlp_caching else float("nan"))
        extra = {}
        if plan.uses_mlp_caching and not plan.uses_step_methods:  # the MLP branches' measured share of the rest
            cached = float(plan.cached_mlps().sum())
            extra["measured_mlp_share"] = round((dense_ms - ms) * steps / (cached / cfg.total_layers)
                                                / (dense_ms - attention_ms), 4)
        record(kind="step_methods", px=px, steps=steps, plan=name, ms_per_step=round(ms, 2),
               speedup_vs_dense=round(dense_ms / ms, 3), predicted_speedup=round(predicted, 3),
               of_predicted=round(dense_ms / ms / predicted, 3), first_call_s=round(first, 2), **extra)
    for threshold in gates:
        gate = DynamicGate(1, threshold)
        ms, skipped = time_gate(model, px, steps, gate)
        record(kind="step_methods", px=px, steps=steps, plan=f"gate F1 threshold {threshold}",
               ms_per_step=round(ms, 2), speedup_vs_dense=round(dense_ms / ms, 3),
               skipped_steps=int(skipped.sum()))


def time_gate(model, px: int, steps: int, gate) -> tuple[float, np.ndarray]:
    """(best of 2 compiled calls in ms per step, skipped steps) of the gated sampler, inputs as `time_sampler`."""
    cfg = model.config
    keys = jax.random.split(jax.random.key(0), 3)
    latents = jax.random.normal(keys[0], (1, (px // 16) ** 2, cfg.in_channels))
    text = jax.random.normal(keys[1], (1, TEXT, cfg.joint_attention_dim), jnp.bfloat16)
    pooled = jax.random.normal(keys[2], (1, cfg.pooled_projection_dim), jnp.bfloat16)
    times, skipped = [], None
    for _ in range(3):
        start = time.perf_counter()
        final, skipped = sample(model, latents, text, pooled, height=px, width=px, num_steps=steps,
                                guidance_scale=3.5, gate=gate)
        jax.block_until_ready(final)
        times.append(time.perf_counter() - start)
    return min(times[1:]) / steps * 1e3, skipped


def bench_mesh(model, px: int, steps: int = 28) -> None:
    """The sampler over meshes of 1, 2, 4 and 8 devices (as many as there are; all on the head axis), dense and
    with a ~45 % head plan (balanced and in the model's head order), against no mesh; with the cost model's
    predicted imbalance (issue 19)."""
    from ditfa_jax import sharding

    plan = random_plan(model.config, px=px, steps=steps, target=0.45)
    layout = layout_for(model.config, height=px, width=px, text_len=TEXT, vae_scale_factor=8)
    costs = sharding.plan_head_costs(plan, layout, model.config.attention_head_dim)
    no_mesh = {}
    for devices in [n for n in (0, 1, 2, 4, 8) if n <= jax.device_count()]:  # 0: no mesh
        mesh = sharding.make_mesh(1, devices) if devices else None
        if mesh is not None:
            model.place_on(mesh)  # the weights replicated once, not per call
        runs = [("dense", None, True), ("heads ~45 %", plan, True)]
        if devices >= 2:
            runs.append(("heads ~45 %, model's head order", plan, False))
        for name, p, balance in runs:
            first, ms = time_sampler(model, px, steps, p, mesh=mesh, balance=balance)
            if not devices:
                no_mesh[name] = ms
            row = dict(kind="mesh", px=px, steps=steps, devices=devices or "no mesh", plan=name,
                       ms_per_step=round(ms, 2), vs_no_mesh=round(no_mesh[name.split(",")[0]] / ms, 3),
                       first_call_s=round(first, 2))
            if p is not None and devices >= 2:
                report = sharding.balance_report(costs, devices)
                row["predicted_imbalance"] = report["predicted_imbalance" + ("_balanced" if balance else "")]
            record(**row)


def bench_layer_skip(model, px: int, steps: int) -> None:
    """What skipping q/k/v saves: half the layers all-cached at steps >= 1 (projections skipped) against the same
    plan with one head of each of those layers left full (so the layer must compute q/k/v; one head's attention)."""
    cfg = model.config
    hw = np.full((steps, cfg.total_layers, cfg.num_attention_heads), -1, np.int32)
    hw[1:, ::2] = 0
    one_full = hw.copy()
    one_full[1:, ::2, 0] = -1
    for name, windows in (("half the layers all-cached (q/k/v skipped)", hw),
                          ("same, one head per layer full (q/k/v computed)", one_full)):
        plan = CompressionPlan.from_config(cfg, windows, height=px, width=px, text_len=TEXT)
        _, ms = time_sampler(model, px, steps, plan)
        record(kind="layer_skip", px=px, steps=steps, plan=name, ms_per_step=round(ms, 2),
               attention_flops_kept=round(plan.flops_kept_fraction(), 4))


def check_query_tiles(cfg, px: int, stride: int) -> None:
    """The kernel computing every ``stride``-th query tile (the search's samples) at this size: its rows equal the
    unrestricted call's bit for bit, the others the cache's; and both timed (median of 20 chained calls)."""
    tokens = (px // 16) ** 2 + TEXT
    shape = (1, tokens, cfg.num_attention_heads, cfg.attention_head_dim)
    q, k, v, cache = (jax.random.normal(key, shape, jnp.bfloat16) for key in jax.random.split(jax.random.key(5), 4))
    band = pallas_kernels.default_band(cfg.attention_head_dim)
    tiles = jnp.asarray(sampled_query_tiles(TokenLayout(((px // 16), (px // 16)), TEXT, True), band[0], stride))
    rows = np.asarray(pallas_kernels.schedule.query_rows(tiles, tokens=tokens, band_q=band[0]))
    arrow = method_window("arrow_8", tokens - TEXT)
    for name, window in (("full", -1), ("arrow_8", arrow)):
        hw = jnp.full((cfg.num_attention_heads,), window, jnp.int32)
        run = jax.jit(lambda t, c: pallas_kernels.headwise_attention(q, k, v, hw, c, text_len=TEXT, text_first=True,
                                                                     query_tiles=t))
        every, some = np.asarray(run(None, cache)), np.asarray(run(tiles, cache))
        exact = bool(np.array_equal(every[:, rows], some[:, rows]))
        kept = bool(np.array_equal(np.asarray(cache)[:, ~rows], some[:, ~rows]))
        times = {}
        for label, t in (("all", None), ("sampled", tiles)):
            jax.block_until_ready(run(t, cache))
            laps = []
            for _ in range(20):
                start = time.perf_counter()
                jax.block_until_ready(run(t, cache))
                laps.append(time.perf_counter() - start)
            times[label] = float(np.median(laps) * 1e3)
        record(kind="query_tiles", px=px, stride=stride, method=name, rows_equal=exact, others_are_cache=kept,
               ms_all=round(times["all"], 3), ms_sampled=round(times["sampled"], 3))
        if not (exact and kept):
            raise SystemExit(f"query_tiles check failed at {px}^2 {name}: rows equal {exact}, others cache {kept}")


def bench_calibration(model, px: int, steps: int, prompts: int, stride: int = 1, step_delta: float = 0.0,
                      step_prompts: int | None = None) -> None:
    """Wall time of one `calibrate` call (compilation included) on random prompts, delta 0.2; ``step_delta`` > 0
    also searches Taylor / reuse steps (the unified search); ``stride``: `calibrate(rse_query_stride=)`;
    ``step_prompts``: `calibrate(step_prompts=)` (steps scored on that many prompts before they run)."""
    cfg = model.config
    keys = jax.random.split(jax.random.key(1), 2)
    text = jax.random.normal(keys[0], (prompts, TEXT, cfg.joint_attention_dim), jnp.bfloat16)
    pooled = jax.random.normal(keys[1], (prompts, cfg.pooled_projection_dim), jnp.bfloat16)
    compiles = dict(COMPILE_SECONDS)
    start = time.perf_counter()
    plan = calibrate(model, text, pooled, height=px, width=px, num_steps=steps, guidance_scale=3.5, delta=0.2,
                     step_delta=step_delta, rse_query_stride=stride, step_prompts=step_prompts).plan
    wall = time.perf_counter() - start
    compiles = {event.rsplit("/", 1)[-1]: round(total - compiles.get(event, 0.0), 1)
                for event, total in COMPILE_SECONDS.items() if total - compiles.get(event, 0.0) >= 0.05}
    record(kind="calibration", px=px, steps=steps, prompts=prompts, stride=stride, step_delta=step_delta,
           step_prompts=step_prompts,
           seconds=round(wall, 1), s_per_step=round(wall / steps, 2),
           attention_flops_kept=round(plan.flops_kept_fraction(), 4),
           skipped_steps=int((plan.step_kind != 0).sum()), cache_on_host=plan.notes["cache_on_host"],
           seconds_before_steps=plan.notes["seconds_before_steps"], step_seconds=plan.notes["step_seconds"],
           step_kind=plan.step_kind.tolist(), kept_per_step=plan.notes["kept_per_step"],
           compile_seconds_summed_over_threads=compiles)


def bench_dense_pass(model, px: int, prompts: int, steps: int = 3) -> None:
    """The dense sampler on the calibration batch (all prompts in one call): the cost of one plain pass."""
    cfg = model.config
    keys = jax.random.split(jax.random.key(1), 3)
    text = jax.random.normal(keys[0], (prompts, TEXT, cfg.joint_attention_dim), jnp.bfloat16)
    pooled = jax.random.normal(keys[1], (prompts, cfg.pooled_projection_dim), jnp.bfloat16)
    latents = jax.random.normal(keys[2], (prompts, (px // 16) ** 2, cfg.in_channels))
    run = lambda: jax.block_until_ready(sample(model, latents, text, pooled, height=px, width=px,  # noqa: E731
                                               num_steps=steps, guidance_scale=3.5))
    run()
    start = time.perf_counter()
    run()
    record(kind="dense_pass", px=px, prompts=prompts, s_per_step=round((time.perf_counter() - start) / steps, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
    parser.add_argument("--layer-skip-only", action="store_true", help="only the q/k/v-skipping measurement")
    parser.add_argument("--calibration", help="only these calibrations, e.g. '2048:28:4,1024:50:8' (px:steps:prompts)")
    parser.add_argument("--rse-query-stride", default="1",
                        help="with --calibration: comma-separated `calibrate(rse_query_stride=)` values, a row each")
    parser.add_argument("--dense-pass", action="store_true",
                        help="with --calibration: also time the dense sampler on the same prompts (3 steps)")
    parser.add_argument("--step-delta", type=float, default=0.0,
                        help="with --calibration: also search step methods within this RSE (the unified search)")
    parser.add_argument("--step-prompts", type=int,
                        help="with --step-delta: score the step methods on this many prompts before each step runs")
    parser.add_argument("--sampler", help="only the sampler rows at these sizes, e.g. '1024,2048' (10 steps)")
    parser.add_argument("--backend", help="head-wise kernel backend of the plans (default: the device's choice)")
    parser.add_argument("--fp8", action="store_true", help="with --sampler: also plans with FP8 heads")
    parser.add_argument("--family", default="flux", choices=sorted(FAMILIES),
                        help="with --sampler: FLUX.1-dev (default) or SD3-medium (1024^2: 4096 + 333 tokens, CFG)")
    parser.add_argument("--sd3-token-multiple", type=int, default=None,
                        help="with --family sd3: pad the joint attention to a multiple of this many tokens "
                             "(ditfa_jax.models.sd3.JOINT_TOKEN_MULTIPLE, default 8; 1: unpadded, the kernel copies)")
    parser.add_argument("--mosaic-fields", default="",
                        help="MosaicConfig fields replacing the mosaic_gpu backend's defaults in every call, e.g. "
                             "'prefetch_q=False' (a kernel variant end to end)")
    parser.add_argument("--step-methods", help="only the step-method rows at these sizes, e.g. '1024,2048' (28 steps)")
    parser.add_argument("--speedup-plans", help="only the 1.5x / 2x / 3x Taylor plans at these sizes (28 steps)")
    parser.add_argument("--mesh", help="only the sampler over meshes of 1..8 devices at these sizes (28 steps)")
    parser.add_argument("--mixture-plans", help="only the Taylor-on-fewer-steps plans at these sizes (against 28 "
                                                "dense steps)")
    parser.add_argument("--mlp-plans", help="only the MLP-branch caching plans at these sizes (28 steps): their time "
                                            "measures the MLP share of the step (issue 17)")
    parser.add_argument("--mixture-arrow-shares", default="",
                        help="with --mixture-plans: comma-separated shares of arrow_8 heads (the others full) on the "
                             "14-step Taylor plan's computed steps, a row each")
    args = parser.parse_args()
    if args.family != "flux" and not args.sampler:
        parser.error("--family sd3 takes --sampler only (the other measurements are FLUX.1-dev's)")
    global TEXT, GUIDANCE
    config, TEXT, GUIDANCE = FAMILIES[args.family]
    if args.mosaic_fields:
        use_mosaic_fields(args.mosaic_fields)
    if args.sd3_token_multiple is not None:
        from ditfa_jax.models import sd3

        sd3.JOINT_TOKEN_MULTIPLE = args.sd3_token_multiple
    cache_dir = os.path.join(os.environ.get("OUT", "/tmp"), "..", "jax_cache")
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache_dir))
    model = random_model(config)
    if args.mesh:
        for px in args.mesh.split(","):
            bench_mesh(model, int(px))
        print("\n| size | devices | plan | ms/step | vs no mesh | predicted imbalance |\n|---|---|---|---|---|---|")
        for r in RESULTS:
            print(f"| {r['px']}^2 | {r['devices']} | {r['plan']} | {r['ms_per_step']} | {r['vs_no_mesh']} | "
                  f"{r.get('predicted_imbalance', '')} |")
        return
    if args.layer_skip_only:
        bench_layer_skip(model, 2048, 10)
        return
    if args.step_methods or args.speedup_plans or args.mixture_plans or args.mlp_plans:
        for px in filter(None, (args.step_methods or "").split(",")):
            bench_step_methods(model, int(px))
        for px in filter(None, (args.mlp_plans or "").split(",")):
            bench_step_methods(model, int(px), plans=mlp_plans(model.config, px=int(px), steps=28), gates=())
        for px in filter(None, (args.speedup_plans or "").split(",")):
            bench_speedup_plans(model, int(px))
        for px in filter(None, (args.mixture_plans or "").split(",")):
            bench_speedup_plans(model, int(px), mixtures=True,
                                arrow_shares=[float(k) for k in args.mixture_arrow_shares.split(",") if k])
        print_tables()
        return
    if args.sampler:
        for px in args.sampler.split(","):
            bench_sampler(model, int(px), 10, args.backend, fp8=args.fp8)
        print_tables()
        return
    if args.calibration:
        strides = [int(v) for v in args.rse_query_stride.split(",")]
        for case in args.calibration.split(","):
            px, steps, prompts = (int(v) for v in case.split(":"))
            for stride in strides:  # first, so that nothing compiled (or autotuned) before helps it
                bench_calibration(model, px, steps, prompts, stride, args.step_delta, args.step_prompts)
            for stride in strides:
                if stride > 1:
                    check_query_tiles(model.config, px, stride)
            if args.dense_pass:
                bench_dense_pass(model, px, prompts)
        print_tables()
        return
    bench_sampler(model, 2048, 4 if args.quick else 10)
    for px, steps, prompts in ([(1024, 4, 2)] if args.quick else
                               [(1024, 28, 8), (1024, 50, 8), (2048, 28, 8), (2048, 50, 8)]):
        bench_calibration(model, px, steps, prompts)

    print_tables()


def print_tables() -> None:
    if any(r["kind"] == "sampler" for r in RESULTS):
        print("\n| model | sampler size | attention tokens | backend | plan | attention FLOPs kept | ms/step | "
              "speedup vs dense | Amdahl bound | of bound |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS:
        if r["kind"] == "sampler":
            print(f"| {r['model']} | {r['px']}^2 | {r['attention_tokens']} | {r['backend']} | {r['plan']} | "
                  f"{r['attention_flops_kept']:.3f} | {r['ms_per_step']} | {r['speedup_vs_dense']} | "
                  f"{r['amdahl_bound']} | {r['of_bound']} |")
    if any(r["kind"] == "step_methods" for r in RESULTS):
        print("\n| size | step-level plan | ms/step | speed-up vs dense | predicted (cost model) | skipped steps | "
              "measured MLP share |")
        print("|---|---|---|---|---|---|---|")
        for r in RESULTS:
            if r["kind"] == "step_methods":
                print(f"| {r['px']}^2 | {r['plan']} | {r['ms_per_step']} | {r['speedup_vs_dense']} | "
                      f"{r.get('predicted_speedup', '')} | {r.get('skipped_steps', '')} | "
                      f"{r.get('measured_mlp_share', '')} |")
    if not any(r["kind"] == "calibration" for r in RESULTS):
        return
    for r in RESULTS:
        if r["kind"] == "query_tiles":
            print(f"query tiles {r['px']}^2 {r['method']} stride {r['stride']}: {r['ms_sampled']} ms against "
                  f"{r['ms_all']} ms for every tile (checked: {r['rows_equal'] and r['others_are_cache']})")
        if r["kind"] == "dense_pass":
            print(f"dense sampler, {r['prompts']} prompts in one call at {r['px']}^2: {r['s_per_step']} s/step")
    print("\n| calibration | prompts | steps | query stride | step delta (prompts scored) | seconds | s/step | kept (delta 0.2) | "
          "skipped steps | s before step 0 | s of steps 0, 1 | median s/step computed / skipped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS:
        if r["kind"] == "calibration":
            times, kinds = np.asarray(r["step_seconds"]), np.asarray(r["step_kind"])
            later = np.arange(len(times)) >= 2
            computed, skipped = times[later & (kinds == 0)], times[later & (kinds != 0)]
            medians = " / ".join(f"{np.median(t):.2f}" if t.size else "-" for t in (computed, skipped))
            print(f"| {r['px']}^2 | {r['prompts']} | {r['steps']} | {r.get('stride', 1)} | {r.get('step_delta', 0)} "
                  f"({r.get('step_prompts') or 'all'}) | "
                  f"{r['seconds']} | {r['s_per_step']} | {r['attention_flops_kept']} | {r.get('skipped_steps', 0)} | "
                  f"{r['seconds_before_steps']} | {' + '.join(f'{t:.1f}' for t in times[:2])} | {medians} |")


if __name__ == "__main__":
    main()
