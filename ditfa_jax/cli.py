"""`ditfa` command line: convert checkpoints and run the jitted sampler.

    ditfa convert CHECKPOINT OUT_DIR        diffusers / BFL checkpoint -> converted JAX params (fast reloads)
    ditfa sample CHECKPOINT [options]       run the flow-matching sampler on random noise and prompt embeddings

Text encoders and the VAE arrive with the end-to-end pipelines; until then `sample` feeds random prompt embeddings
and writes the final latents.
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


def cmd_sample(args) -> int:
    import jax
    import jax.numpy as jnp

    from ditfa_jax.configs import FluxConfig
    from ditfa_jax.loading import load_transformer
    from ditfa_jax.sampler import VAE_SCALE_FACTOR, flux_latent_grid, sample, scheduler_for

    model = load_transformer(args.checkpoint, dtype=_dtype(args.dtype))
    cfg = model.config
    key_noise, key_text, key_pool = jax.random.split(jax.random.key(args.seed), 3)
    b = args.batch
    if isinstance(cfg, FluxConfig):
        rows, cols = flux_latent_grid(args.height, args.width)
        latents = jax.random.normal(key_noise, (b, rows * cols, cfg.in_channels))
    else:
        latents = jax.random.normal(key_noise, (b, cfg.in_channels, args.height // VAE_SCALE_FACTOR,
                                                args.width // VAE_SCALE_FACTOR))
    text = jax.random.normal(key_text, (b, args.text_len, cfg.joint_attention_dim))
    pooled = jax.random.normal(key_pool, (b, cfg.pooled_projection_dim))
    negative = {} if cfg.family == "flux" else dict(negative_prompt_embeds=jnp.zeros_like(text),
                                                    negative_pooled_prompt_embeds=jnp.zeros_like(pooled))
    guidance = args.guidance if args.guidance is not None else (3.5 if cfg.family == "flux" else 7.0)
    scheduler = scheduler_for(args.checkpoint, model)
    timings = []
    for _ in range(2):  # first call compiles
        start = time.perf_counter()
        final = sample(model, latents, text, pooled, height=args.height, width=args.width, num_steps=args.steps,
                       guidance_scale=guidance, scheduler=scheduler, **negative)
        final.block_until_ready()
        timings.append(time.perf_counter() - start)
    report = {"model": type(cfg).__name__, "checkpoint": str(args.checkpoint), "steps": args.steps,
              "height": args.height, "width": args.width, "batch": b, "first_call_s": round(timings[0], 3),
              "second_call_s": round(timings[1], 3), "final_latents_std": float(jnp.std(final)),
              "device": str(jax.devices()[0])}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, np.asarray(final))
        report["latents"] = str(out)
    print(json.dumps(report, indent=2))
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
    p.set_defaults(func=cmd_sample)
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
