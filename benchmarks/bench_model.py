"""Dense per-step transformer latency, JAX (ours, cuDNN attention) vs diffusers PyTorch (SDPA), same GPU, same run.

Real dimensions, random weights, bf16: FLUX.1-dev at 1024^2 (4096 image + 512 text tokens, batch 1) and 2048^2
(16384 + 512), SD3-medium at 1024^2 with CFG (batch 2, 4096 + 333 tokens). Each (backend, case) runs in its own
process so the two frameworks never share GPU memory. Also reports the compile time of the first sampler call
(28 steps) at 1024^2: first-call wall time minus a second, compiled call.

    python benchmarks/bench_model.py            # all cases, both backends; table last; JSON lines in $OUT
    python benchmarks/bench_model.py --backend jax --case flux_1k   # one measurement (used by the driver)

diffusers is pure Python: carry its wheel to the GPU machine (see benchmarks/RESULTS.md for the command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
CASES = {
    "flux_1k": dict(family="flux", config=FLUX_DEV, pixels=1024, batch=1, text=512),
    "flux_2k": dict(family="flux", config=FLUX_DEV, pixels=2048, batch=1, text=512),
    "sd3_1k_cfg": dict(family="sd3", config=SD3_MEDIUM, pixels=1024, batch=2, text=333),
}
SAMPLER_STEPS = 28


def median_ms(fn, sync, warmup: int = 3, reps: int = 10) -> tuple[float, float]:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def run_jax(case: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ditfa_jax.configs import FluxConfig, SD3Config
    from ditfa_jax.loading import Transformer
    from ditfa_jax.models.flux import FluxTransformer
    from ditfa_jax.models.sd3 import SD3Transformer
    from ditfa_jax.models.flux import flux_image_ids
    from ditfa_jax.sampler import sample

    flux = case["family"] == "flux"
    cfg = FluxConfig(**case["config"]) if flux else SD3Config(**case["config"])
    cls = FluxTransformer if flux else SD3Transformer
    graphdef = nnx.split(nnx.eval_shape(lambda: cls(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))[0]
    state = jax.jit(lambda: nnx.split(cls(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))[1])()
    model = Transformer(cfg, graphdef, state)
    b, n_txt, px = case["batch"], case["text"], case["pixels"]
    keys = jax.random.split(jax.random.key(0), 4)
    text = jax.random.normal(keys[1], (b, n_txt, cfg.joint_attention_dim), jnp.bfloat16)
    pooled = jax.random.normal(keys[2], (b, cfg.pooled_projection_dim), jnp.bfloat16)
    if flux:
        rows = cols = px // 16
        latents = jax.random.normal(keys[0], (b, rows * cols, cfg.in_channels), jnp.bfloat16)
        kwargs = dict(img_ids=flux_image_ids(rows, cols), txt_ids=np.zeros((n_txt, 3), np.float32),
                      guidance=np.full((b,), 3.5, np.float32))
    else:
        latents = jax.random.normal(keys[0], (b, cfg.in_channels, px // 8, px // 8), jnp.bfloat16)
        kwargs = {}
    timestep = np.full((b,), 0.5 if flux else 500.0, np.float32)
    forward = lambda: model(latents, text, pooled, timestep, **kwargs)  # noqa: E731
    start = time.perf_counter()
    jax.block_until_ready(forward())
    compile_forward_s = time.perf_counter() - start
    med, best = median_ms(forward, jax.block_until_ready)
    result = dict(step_ms=med, step_min_ms=best, forward_first_call_s=compile_forward_s)

    if px == 1024:  # sampler compile time: first call minus a compiled second call
        if flux:
            s_lat, s_kw = latents[:1].astype(jnp.float32), {}
            s_text, s_pool = text[:1], pooled[:1]
        else:
            half = b // 2
            s_lat = latents[:half].astype(jnp.float32)
            s_text, s_pool = text[:half], pooled[:half]
            s_kw = dict(negative_prompt_embeds=text[half:], negative_pooled_prompt_embeds=pooled[half:])
        call = lambda: sample(model, s_lat, s_text, s_pool, height=px, width=px, num_steps=SAMPLER_STEPS,  # noqa
                              guidance_scale=3.5 if flux else 7.0, **s_kw)
        start = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(call())
        second = time.perf_counter() - start
        result.update(sampler_first_call_s=first, sampler_compiled_call_s=second,
                      sampler_compile_s=first - second, sampler_ms_per_step=second / SAMPLER_STEPS * 1e3)
    result["versions"] = dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind))
    return result


def run_torch(case: dict) -> dict:
    import diffusers
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    flux = case["family"] == "flux"
    cls = FluxTransformer2DModel if flux else SD3Transformer2DModel
    with torch.device("cuda"):
        model = cls(**case["config"]).to(torch.bfloat16).eval()
    b, n_txt, px = case["batch"], case["text"], case["pixels"]
    dev, dt = "cuda", torch.bfloat16
    cfg = case["config"]
    text = torch.randn(b, n_txt, cfg["joint_attention_dim"], device=dev, dtype=dt)
    pooled = torch.randn(b, cfg["pooled_projection_dim"], device=dev, dtype=dt)
    if flux:
        rows = cols = px // 16
        latents = torch.randn(b, rows * cols, cfg["in_channels"], device=dev, dtype=dt)
        img_ids = torch.zeros(rows, cols, 3, device=dev)
        img_ids[..., 1] += torch.arange(rows, device=dev)[:, None]
        img_ids[..., 2] += torch.arange(cols, device=dev)[None, :]
        kwargs = dict(img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(n_txt, 3, device=dev),
                      guidance=torch.full((b,), 3.5, device=dev), timestep=torch.full((b,), 0.5, device=dev, dtype=dt))
    else:
        latents = torch.randn(b, cfg["in_channels"], px // 8, px // 8, device=dev, dtype=dt)
        kwargs = dict(timestep=torch.full((b,), 500.0, device=dev, dtype=dt))

    @torch.no_grad()
    def forward():
        return model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                     return_dict=False, **kwargs)[0]

    med, best = median_ms(forward, lambda _: torch.cuda.synchronize())
    return dict(step_ms=med, step_min_ms=best,
                versions=dict(torch=torch.__version__, diffusers=diffusers.__version__,
                              device=torch.cuda.get_device_name()))


def drive(out_dir: str | None) -> None:
    rows = []
    for name in CASES:
        for backend in ("torch", "jax"):
            proc = subprocess.run([sys.executable, __file__, "--backend", backend, "--case", name],
                                  capture_output=True, text=True)
            line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            if proc.returncode != 0 or not line.startswith("{"):
                print(f"[{backend} {name}] FAILED rc={proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
                rows.append(dict(case=name, backend=backend, error=proc.stderr[-500:]))
                continue
            rec = dict(case=name, backend=backend, **json.loads(line))
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    if out_dir:
        with open(os.path.join(out_dir, "bench_model.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n| case | torch ms/step | jax ms/step | jax/torch | jax sampler compile s (28 steps) |")
    print("|---|---|---|---|---|")
    for name in CASES:
        t = next((r for r in rows if r["case"] == name and r["backend"] == "torch" and "step_ms" in r), None)
        j = next((r for r in rows if r["case"] == name and r["backend"] == "jax" and "step_ms" in r), None)
        ratio = f"{j['step_ms'] / t['step_ms']:.3f}" if t and j else "n/a"
        comp = f"{j['sampler_compile_s']:.1f}" if j and "sampler_compile_s" in j else "-"
        print(f"| {name} | {t['step_ms']:.1f} | {j['step_ms']:.1f} | {ratio} | {comp} |" if t and j
              else f"| {name} | {t and round(t['step_ms'], 1)} | {j and round(j['step_ms'], 1)} | n/a | {comp} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["jax", "torch"])
    parser.add_argument("--case", choices=list(CASES))
    args = parser.parse_args()
    if args.backend is None:
        drive(os.environ.get("OUT"))
        return
    result = (run_jax if args.backend == "jax" else run_torch)(CASES[args.case])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
