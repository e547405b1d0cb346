"""End-to-end FLUX.1-dev-sized pipeline (random weights, real dimensions, bf16): encode, denoise, decode, memory.

Components at FLUX.1-dev's sizes, built directly on the device in bf16 (abstract shapes from `nnx.eval_shape`, each
leaf then drawn with `jax.random` in its own dtype under jit, so no fp32 copy is ever materialised): T5-XXL encoder
(24 layers, d_model 4096, d_ff 10240, 64 heads, vocab 32128), CLIP-L text model, the FLUX transformer (19 + 38
blocks, 3072 wide; `bench_plan.random_model`) and the 16-channel VAE (block_out_channels 128, 256, 512, 512). The
tokenizers are the tiny fixture ones (ids only need the right lengths: 77 CLIP, 512 T5 tokens). Text encoders are
stay on the GPU (peak memory includes T5-XXL's 9.5 GB); with `--offload-text-encoders` they go to host memory after
encoding and each call moves them back, timed apart as `onload_s` (about 18 s per call for T5-XXL on an H100).

Cases: 1024^2 and 2048^2, 28 steps, batch 1, dense and with a synthetic plan keeping ~32 % of the attention FLOPs
(`bench_plan.random_plan`: heads drawn from full / arrow_8 / cached, step 0 full). Each case runs in its own process
so its peak device memory (`memory_stats()['peak_bytes_in_use']`) is its own; times are the best of two calls after
a warm-up call that compiles, each stage synchronised. Writes JSON lines to $OUT/bench_pipeline.jsonl, prints a
table last.

    python benchmarks/bench_pipeline.py                 # all four cases on the GPU
    python benchmarks/bench_pipeline.py --case 2048:plan
    python benchmarks/bench_pipeline.py --tiny          # small configs on CPU: checks the script end to end
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench_plan import random_model, random_plan
from ditfa_jax.configs import FluxConfig
from ditfa_jax.models.clip import CLIPTextConfig, CLIPTextModel
from ditfa_jax.models.t5 import T5Config, T5Encoder
from ditfa_jax.models.vae import AutoencoderKL, VAEConfig
from ditfa_jax.pipelines import FluxPipeline
from ditfa_jax.scheduler import FLUX_DEV_SCHEDULER
from ditfa_jax.tokenization import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT / "tests" / "fixtures" / "pipelines" / "flux_tiny"
PROMPT = "a photo of a red fox in the snow at dawn, highly detailed"
VAE_BLOCKS = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4

FULL = dict(
    flux=FluxConfig(guidance_embeds=True),
    t5=T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    clip=CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, eos_token_id=49407),
    vae=VAEConfig(down_block_types=VAE_BLOCKS[0], up_block_types=VAE_BLOCKS[1], block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=16, norm_num_groups=32, scaling_factor=0.3611,
                  shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    sizes=(1024, 2048), steps=28, max_sequence_length=512)
TINY = dict(
    flux=FluxConfig(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    t5=T5Config(vocab_size=256, d_model=48, d_kv=16, d_ff=96, num_layers=2, num_heads=3),
    clip=CLIPTextConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=77, eos_token_id=767),
    vae=VAEConfig(down_block_types=VAE_BLOCKS[0], up_block_types=VAE_BLOCKS[1], block_out_channels=(8, 16, 16, 16),
                  layers_per_block=1, latent_channels=16, norm_num_groups=4, scaling_factor=0.3611,
                  shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    sizes=(64, 128), steps=28, max_sequence_length=512)


def random_module(build):
    """An NNX module with random parameters drawn on the device in each parameter's own dtype (no fp32 copies):
    matrices N(0, 1/fan_in), vectors (norm scales, biases) 1 + N(0, 0.02^2)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    shapes = [(leaf.shape, leaf.dtype) for leaf in leaves]

    @jax.jit
    def fill(key):
        out = []
        for k, (shape, dtype) in zip(jax.random.split(key, len(shapes)), shapes):
            if len(shape) >= 2:
                out.append(jax.random.normal(k, shape, dtype) * jnp.asarray(1 / np.sqrt(np.prod(shape[:-1])), dtype))
            else:
                out.append(1 + jax.random.normal(k, shape, dtype) * jnp.asarray(0.02, dtype))
        return out

    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, fill(jax.random.key(0))))


def build_pipeline(cfgs: dict, offload_text_encoders: bool) -> FluxPipeline:
    bf16 = jnp.bfloat16
    clip = random_module(lambda: CLIPTextModel(cfgs["clip"], dtype=bf16, rngs=nnx.Rngs(0)))
    t5 = random_module(lambda: T5Encoder(cfgs["t5"], dtype=bf16, rngs=nnx.Rngs(0)))
    vae = random_module(lambda: AutoencoderKL(cfgs["vae"], dtype=bf16, rngs=nnx.Rngs(0)))
    tokenizers = {"text_encoder": load_tokenizer(TOKENIZERS / "tokenizer", "clip"),
                  "text_encoder_2": load_tokenizer(TOKENIZERS / "tokenizer_2", "t5")}
    return FluxPipeline(transformer=random_model(cfgs["flux"]), vae=vae, scheduler=FLUX_DEV_SCHEDULER,
                        text_encoders={"text_encoder": clip, "text_encoder_2": t5}, tokenizers=tokenizers,
                        offload_text_encoders=offload_text_encoders)


def run_case(cfgs: dict, px: int, mode: str, tiny: bool, offload: bool) -> dict:
    pipe = build_pipeline(cfgs, offload)
    steps, length = cfgs["steps"], cfgs["max_sequence_length"]
    plan = None if mode == "dense" else random_plan(cfgs["flux"], px=px, steps=steps, target=0.32)
    best, first_call = pipe.time_stages(PROMPT, repeat=2, height=px, width=px, num_inference_steps=steps,
                                        max_sequence_length=length, plan=plan)
    best = {k: round(v, 3) for k, v in best.items()}
    stats = jax.devices()[0].memory_stats() or {}
    return {"kind": "pipeline", "tiny": tiny, "offload_text_encoders": offload, "px": px, "steps": steps,
            "text_len": length, "run": mode,
            "attention_flops_kept": 1.0 if plan is None else round(plan.flops_kept_fraction(), 4), **best,
            "total_s": round(sum(best.values()), 3), "first_call_s": round(first_call, 1),
            "peak_gb": round(stats["peak_bytes_in_use"] / 1e9, 2) if "peak_bytes_in_use" in stats else None,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def record(row: dict) -> None:
    print(json.dumps(row), flush=True)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench_pipeline.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small configs at 64 and 128 px (CPU smoke run)")
    parser.add_argument("--case", help="run one case in this process: PX:dense or PX:plan (e.g. 2048:plan)")
    parser.add_argument("--offload-text-encoders", action="store_true",
                        help="keep T5/CLIP in host memory between calls (less GPU memory, onload_s per call)")
    args = parser.parse_args()
    cfgs = TINY if args.tiny else FULL
    if args.case:
        px, mode = args.case.split(":")
        if mode not in ("dense", "plan") or int(px) not in cfgs["sizes"]:
            raise SystemExit(f"--case {args.case!r}: expected one of {[f'{s}:dense' for s in cfgs['sizes']]} or :plan")
        record(run_case(cfgs, int(px), mode, args.tiny, args.offload_text_encoders))
        return
    rows = []
    for px in cfgs["sizes"]:
        for mode in ("dense", "plan"):
            cmd = [sys.executable, __file__, "--case", f"{px}:{mode}"] + (["--tiny"] if args.tiny else []) + (
                ["--offload-text-encoders"] if args.offload_text_encoders else [])
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"case {px}:{mode} failed:\n{result.stderr[-3000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"\nFLUX.1-dev-sized pipeline, random bf16 weights, {cfgs['steps']} steps, T5 {cfgs['max_sequence_length']} "
          f"tokens, batch 1, {rows[0]['device']}{' (TINY configs)' if args.tiny else ''}")
    print("| size | run | attention FLOPs kept | T5/CLIP onload s | encode s | denoise s | decode s | total s | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['px']}^2 | {r['run']} | {r['attention_flops_kept']:.3f} | {r['onload_s']} | {r['encode_s']} | "
              f"{r['denoise_s']} | "
              f"{r['decode_s']} | {r['total_s']} | {r['peak_gb']} |")


if __name__ == "__main__":
    main()
