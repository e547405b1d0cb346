"""`ditfa` command line: convert checkpoints and run the jitted sampler.

    ditfa convert CHECKPOINT OUT_DIR        diffusers / BFL checkpoint -> converted JAX params (fast reloads)
    ditfa sample CHECKPOINT [options]       run the flow-matching sampler on random noise and prompt embeddings
    ditfa calibrate CHECKPOINT [options]    search a head-wise compression plan (RSE + MILP), write plan + heatmap
    ditfa demo [options]                    the main job on the embedded testbed model: plan, dense vs compressed

Text encoders and the VAE arrive with the end-to-end pipelines; until then `sample` and `calibrate` take prompt
embeddings from an .npz (`prompt_embeds`, `pooled_prompt_embeds`, optional `negative_*`) or draw random ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _dtype(name: str):
    import jax.numpy as jnp

    return {"bf16": jnp.bfloat16, "fp32": jnp.float32, "auto": None}[name]


def cmd_convert(args) -> int:
    from ditfa_jax.loading import load_transformer, save_converted

    model = load_transformer(args.checkpoint, dtype=_dtype(args.dtype), config=args.config)
    out = save_converted(model, args.out_dir)
    print(f"converted {type(model.config).__name__} -> {out}")
    return 0


def _prompt_inputs(args, cfg, batch: int):
    """Prompt embeddings from --embeddings (.npz) or seeded random ones; (text, pooled, negative kwargs)."""
    import jax
    import jax.numpy as jnp

    if args.embeddings:
        data = np.load(args.embeddings)
        missing = [k for k in ("prompt_embeds", "pooled_prompt_embeds") if k not in data]
        if missing:
            raise ValueError(f"{args.embeddings}: missing arrays {missing}; found {sorted(data.files)}")
        text, pooled = jnp.asarray(data["prompt_embeds"]), jnp.asarray(data["pooled_prompt_embeds"])
        negative = {k: jnp.asarray(data[k]) for k in ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
                    if k in data}
    else:
        key_text, key_pool = jax.random.split(jax.random.key(args.seed + 1))
        text = jax.random.normal(key_text, (batch, args.text_len, cfg.joint_attention_dim))
        pooled = jax.random.normal(key_pool, (batch, cfg.pooled_projection_dim))
        negative = {}
    if cfg.family == "sd3" and not negative:
        negative = dict(negative_prompt_embeds=jnp.zeros_like(text), negative_pooled_prompt_embeds=jnp.zeros_like(pooled))
    return text, pooled, negative


def _guidance(args, cfg) -> float:
    return args.guidance if args.guidance is not None else (3.5 if cfg.family == "flux" else 7.0)


def cmd_sample(args) -> int:
    import jax
    import jax.numpy as jnp

    from ditfa_jax.configs import FluxConfig
    from ditfa_jax.loading import load_transformer
    from ditfa_jax.plan import CompressionPlan, image_tokens_for
    from ditfa_jax.sampler import cache_bytes, flux_latent_grid, sample, scheduler_for

    model = load_transformer(args.checkpoint, dtype=_dtype(args.dtype))
    cfg = model.config
    text, pooled, negative = _prompt_inputs(args, cfg, args.batch)
    b = text.shape[0]
    key_noise = jax.random.key(args.seed)
    if isinstance(cfg, FluxConfig):
        rows, cols = flux_latent_grid(args.height, args.width, cfg.vae_scale_factor)
        latents = jax.random.normal(key_noise, (b, rows * cols, cfg.in_channels))
    else:
        scale = cfg.vae_scale_factor
        latents = jax.random.normal(key_noise, (b, cfg.in_channels, args.height // scale, args.width // scale))
    plan = CompressionPlan.load(args.plan) if args.plan else None
    scheduler = scheduler_for(args.checkpoint, model)
    timings = []
    for _ in range(2):  # first call compiles
        start = time.perf_counter()
        final = sample(model, latents, text, pooled, height=args.height, width=args.width, num_steps=args.steps,
                       guidance_scale=_guidance(args, cfg), scheduler=scheduler, plan=plan, **negative)
        final.block_until_ready()
        timings.append(time.perf_counter() - start)
    report = {"model": type(cfg).__name__, "checkpoint": str(args.checkpoint), "steps": args.steps,
              "height": args.height, "width": args.width, "batch": b, "plan": args.plan,
              "attention_flops_kept": None if plan is None else round(plan.flops_kept_fraction(), 4),
              "attention_cache_mb": 0.0 if plan is None else round(cache_bytes(
                  cfg, b * (2 if cfg.family == "sd3" else 1),  # SD3 runs CFG on a doubled batch
                  image_tokens_for(cfg, args.height, args.width) + text.shape[1], model.dtype) / 2 ** 20, 2),
              "first_call_s": round(timings[0], 3), "second_call_s": round(timings[1], 3),
              "final_latents_std": float(jnp.std(final)), "device": str(jax.devices()[0])}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, np.asarray(final))
        report["latents"] = str(out)
    print(json.dumps(report, indent=2))
    return 0


def cmd_calibrate(args) -> int:
    from ditfa_jax.calibrate import calibrate
    from ditfa_jax.loading import load_transformer
    from ditfa_jax.plan import save_heatmap
    from ditfa_jax.sampler import scheduler_for

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    model = load_transformer(args.checkpoint, dtype=_dtype(args.dtype))
    text, pooled, negative = _prompt_inputs(args, model.config, args.prompts)
    plan = calibrate(model, text, pooled, height=args.height, width=args.width, num_steps=args.steps,
                     guidance_scale=_guidance(args, model.config), delta=args.delta, c=args.c,
                     candidates=tuple(args.candidates.split(",")), scheduler=scheduler_for(args.checkpoint, model),
                     seed=args.seed, **negative)
    plan.save(out)
    heatmap = save_heatmap(plan, out.with_suffix(".png"))
    print(plan.summary())
    print(f"calibration took {plan.notes['calibration_seconds']} s; plan -> {out}; heatmap -> {heatmap}")
    return 0


def cmd_demo(args) -> int:
    from ditfa_jax.testbed.demo import DEFAULT_DELTA, run_demo
    from ditfa_jax.testbed.model import DEFAULT_STEPS

    run_demo(args.out, checkpoint=args.checkpoint, prompts=args.prompts, calibration_prompts=args.calibration_prompts,
             num_steps=args.steps or DEFAULT_STEPS, delta=DEFAULT_DELTA if args.delta is None else args.delta,
             seed=args.seed, overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditfa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a checkpoint to JAX params for fast reloads")
    p.add_argument("checkpoint", help="diffusers pipeline/transformer folder or BFL single .safetensors file")
    p.add_argument("out_dir", help="new folder to write (refuses an existing one)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="parameter dtype (auto: keep the checkpoint's)")
    p.add_argument("--config", help="diffusers config.json for a single-file checkpoint (non-standard shapes)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("sample", help="run the jitted sampler on random noise and random prompt embeddings")
    p.add_argument("checkpoint", help="checkpoint folder or file (see `convert`)")
    p.add_argument("--height", type=int, default=64, help="image height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=64, help="image width in pixels (multiple of 16)")
    p.add_argument("--steps", type=int, default=4, help="number of denoising steps")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--text-len", type=int, default=16, help="prompt tokens (random embeddings)")
    p.add_argument("--guidance", type=float, help="FLUX distilled guidance / SD3 CFG scale (default 3.5 / 7.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--out", help="write the final latents here (.npy)")
    p.add_argument("--plan", help="compression plan (.json from `ditfa calibrate`)")
    p.add_argument("--embeddings", help=".npz with prompt_embeds, pooled_prompt_embeds (+ negative_*)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("calibrate", help="search a head-wise compression plan (single-layer RSE + MILP)")
    p.add_argument("checkpoint", help="checkpoint folder or file (see `convert`)")
    p.add_argument("--out", required=True, help="plan file to write (.json); the heatmap goes beside it (.png)")
    p.add_argument("--delta", type=float, default=0.2, help="RSE budget per (step, layer); larger compresses more")
    p.add_argument("--c", type=float, default=1.5, help="per-head eligibility: rse < c * delta / heads")
    p.add_argument("--candidates", default="cached,arrow_8,arrow_16,arrow_32", help="comma-separated methods")
    p.add_argument("--height", type=int, default=64, help="image height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=64, help="image width in pixels (multiple of 16)")
    p.add_argument("--steps", type=int, default=4, help="number of denoising steps the plan is for")
    p.add_argument("--prompts", type=int, default=8, help="calibration prompts (random embeddings)")
    p.add_argument("--embeddings", help=".npz with prompt_embeds, pooled_prompt_embeds (+ negative_*)")
    p.add_argument("--text-len", type=int, default=16, help="prompt tokens (random embeddings)")
    p.add_argument("--guidance", type=float, help="FLUX distilled guidance / SD3 CFG scale (default 3.5 / 7.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("demo", help="calibrate + generate dense vs compressed on the embedded testbed model",
                       description="Search a plan for the trained testbed model (shipped in the package), generate "
                                   "held-out captions densely and with the plan from the same noise, and write "
                                   "the plan, heatmap, images, a side-by-side comparison and a report.")
    p.add_argument("--out", default="outputs/demo", help="folder to write (refused if it exists, see --overwrite)")
    p.add_argument("--checkpoint", help="testbed folder (default: the weights shipped in ditfa_jax/testbed)")
    p.add_argument("--prompts", type=int, default=4, help="held-out captions to generate")
    p.add_argument("--calibration-prompts", type=int, default=4, help="training captions the plan search uses")
    p.add_argument("--steps", type=int, help="denoising steps (default: the testbed's 20)")
    p.add_argument("--delta", type=float, help="RSE budget per (step, layer) (default: ditfa_jax.testbed.demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"ditfa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
