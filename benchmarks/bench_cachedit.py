"""cache-dit as a speed peer: its own step caching on FLUX.1-dev, same model, same GPU (issue 17, benchmark 2's peer).

Issue 17's benchmark 2 times our step caching (a static schedule of fully computed steps, TaylorSeer order 2 in
between) on FLUX.1-dev. This script times cache-dit (PyTorch) doing the same on diffusers' FLUX pipeline: a
FLUX.1-dev-sized `FluxTransformer2DModel` with random bf16 weights (no download; time is what is measured, quality
means nothing here), batch 1, 512 text tokens, 28 steps, 1024^2 (and 2048^2 with ``--sizes 1024,2048``). The
pipeline has no text encoders or VAE: it gets random prompt embeddings and returns latents.

Variants (``--variants``, comma-separated; they always run in this order, on one transformer per size):
* ``dense``: the plain pipeline, transformer under ``torch.compile`` (default mode, whole model);
* ``dense_regional``: the same, compiled as cache-dit compiles it (``compile_repeated_blocks``: each block);
* ``cachedit_static_1.5x``, ``_2x``, ``_3x``: cache-dit with a static step mask (``steps_computation_mask``,
  ``steps_computation_policy="static"``) computing our schedule, n = 19, 14, 9 of 28 steps: the first 3, then the
  others spread evenly; F1B0 (cache-dit's minimum: one block runs on every step), TaylorSeer order 2;
* ``cachedit_dbcache``: cache-dit's default dynamic DBCache (``DBCacheConfig()``: F8B0, residual threshold 0.08),
  no calibrator.
cache-dit variants are compiled regionally, as cache-dit's own examples do. Each variant: one warm-up (compile)
call, then the best of 2 timed calls of the whole 28-step loop; ms/step = total / steps. ``computed_steps`` is what
cache-dit's stats (``cache_dit.summary``) say it computed fully. `cache_dit.set_compile_configs` applies to every
variant alike (``--descent-tuning`` turns on its inductor tuning too); dynamo is reset between sizes.

One JSON line per measurement goes to $OUT/bench_cachedit.jsonl, the log to $OUT/bench_cachedit.log. On the GPU
machine (diffusers and cache-dit from the wheels in .whl/):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/bench_cachedit.py --sizes 1024 --out $OUT

``--smoke`` runs a tiny model at 128^2 for 12 steps (on CPU: float32, no compile) to test the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(FLUX_DEV, num_layers=4, num_single_layers=6, attention_head_dim=64, num_attention_heads=2,
                 joint_attention_dim=128, pooled_projection_dim=64, axes_dims_rope=(16, 24, 24))
# FLUX.1-dev's scheduler config (resolution-dependent shift)
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)
STATIC = {"cachedit_static_1.5x": 1.5, "cachedit_static_2x": 2.0, "cachedit_static_3x": 3.0}
VARIANTS = ["dense", "dense_regional", *STATIC, "cachedit_dbcache"]
FIRST_COMPUTED = 3
TIMED_CALLS = 2


class Log:
    """Print with flush and append to the log file."""

    def __init__(self, path: str):
        self.file = open(path, "a")

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def computed_schedule(steps: int, n: int) -> list[int]:
    """Our static schedule: the first 3 steps, then n - 3 more spread evenly up to the last step."""
    import numpy as np

    first = min(FIRST_COMPUTED, n)
    rest = np.round(np.linspace(first, steps - 1, n - first)).astype(int).tolist()
    return sorted(set(range(first)) | set(rest))


def cache_configs(variant: str, steps: int):
    """cache-dit's (cache_config, calibrator_config, schedule) for a cache-dit variant."""
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    if variant == "cachedit_dbcache":
        return DBCacheConfig(num_inference_steps=steps), None, None
    schedule = computed_schedule(steps, round(steps / STATIC[variant]))
    mask = [int(i in schedule) for i in range(steps)]  # 1: compute the step, 0: reuse the cache
    config = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=FIRST_COMPUTED,
                           num_inference_steps=steps, steps_computation_mask=mask,
                           steps_computation_policy="static")
    return config, TaylorSeerCalibratorConfig(taylorseer_order=2), schedule


def build_transformer(config: dict, device: str, dtype):
    """A FluxTransformer2DModel with random weights, built on `device` (as bench_model.py does)."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        return FluxTransformer2DModel(**config).to(dtype).eval()


def make_pipe(transformer):
    """A FluxPipeline around `transformer` without text encoders or VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_pipe(pipe, inputs: dict, sync) -> tuple[float, list[float]]:
    """The first call's seconds and the timed calls' seconds of the whole denoising loop."""
    import torch

    def call():
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            latents = pipe(**inputs, generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
                           return_dict=False)[0]
        sync()
        assert latents.shape[0] == 1
        return time.perf_counter() - start

    first = call()
    return first, [call() for _ in range(TIMED_CALLS)]


def cached_steps(pipe) -> list[int]:
    """The steps cache-dit reused its cache on in the last call, from its own stats."""
    import cache_dit

    steps = set()
    for stats in cache_dit.summary(pipe, logging=False):
        steps |= set(stats.cached_steps)
    return sorted(steps)


def run_variant(variant: str, transformer, inputs: dict, steps: int, use_compile: bool, state: dict, sync) -> dict:
    """Time one variant on `transformer` and return its row (without the common keys)."""
    import cache_dit
    import torch

    pipe = make_pipe(transformer)
    row = dict(compile=None, schedule=None, cache_config=None, calibrator=None)
    is_cachedit = variant.startswith("cachedit")
    try:
        if variant == "dense":
            if use_compile:
                pipe.transformer = torch.compile(transformer)
                row["compile"] = "full"
        else:
            if is_cachedit:
                config, calibrator, row["schedule"] = cache_configs(variant, steps)
                cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
                row["cache_config"] = config.strify()
                row["calibrator"] = calibrator.strify() if calibrator else None
            if use_compile:
                if not state.get("regional"):  # the blocks stay compiled for the later variants
                    transformer.compile_repeated_blocks()
                    state["regional"] = True
                row["compile"] = "regional"
        first_s, times = time_pipe(pipe, inputs, sync)
        row.update(ms_per_step=min(times) * 1e3 / steps, first_call_s=first_s,
                   call_ms=[t * 1e3 for t in times])
        if is_cachedit:
            row["cached_steps"] = cached_steps(pipe)
            row["computed_steps"] = steps - len(row["cached_steps"])
        else:
            row["computed_steps"] = steps
        return row
    finally:
        if is_cachedit:
            cache_dit.disable_cache(pipe)
            # cache-dit's FLUX patch leaves its own copy of the forward on the instance: back to diffusers' own
            transformer.__dict__.pop("forward", None)
            transformer.__dict__.pop("_is_patched", None)
        del pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="comma-separated image sizes in pixels (1024; 128 with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (28; 12 with --smoke)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ",".join(VARIANTS))
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip what is left after 85%% of this")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 12 steps, 128^2")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the transformer (auto: on CUDA only)")
    parser.add_argument("--descent-tuning", action="store_true",
                        help="cache_dit.set_compile_configs' inductor tuning (coordinate descent etc.) for all")
    args = parser.parse_args()
    out_dir = args.out or "."
    os.makedirs(out_dir, exist_ok=True)
    log = Log(os.path.join(out_dir, "bench_cachedit.log"))
    wanted = args.variants.split(",")
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    variants = [v for v in VARIANTS if v in wanted]
    steps = args.steps or (12 if args.smoke else 28)
    sizes = [int(s) for s in (args.sizes or ("128" if args.smoke else "1024")).split(",")]
    model_config = FLUX_TINY if args.smoke else FLUX_DEV
    text_tokens = 16 if args.smoke else 512

    import cache_dit
    import diffusers
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    use_compile = {"auto": cuda, "on": True, "off": False}[args.compile]
    if use_compile:
        cache_dit.set_compile_configs(descent_tuning=args.descent_tuning)
    versions = dict(torch=torch.__version__, diffusers=diffusers.__version__, cache_dit=cache_dit.__version__,
                    gpu=torch.cuda.get_device_name() if cuda else "cpu")
    log(f"bench_cachedit: sizes {sizes}, {steps} steps, variants {variants}, {device} {dtype}, "
        f"compile {use_compile}, descent tuning {args.descent_tuning}, budget {args.budget_s:.0f} s; {versions}")

    start = time.perf_counter()
    over_budget = lambda: time.perf_counter() - start > 0.85 * args.budget_s
    rows = []
    for px in sizes:
        if over_budget():
            log(f"over 85% of the {args.budget_s:.0f} s budget: skipping size {px}")
            break
        t0 = time.perf_counter()
        transformer = build_transformer(model_config, device, dtype)
        log(f"{px}px: built the random transformer in {time.perf_counter() - t0:.1f} s")
        gen = torch.Generator("cpu").manual_seed(1)
        inputs = dict(
            prompt_embeds=torch.randn(1, text_tokens, model_config["joint_attention_dim"], generator=gen).to(
                device, dtype),
            pooled_prompt_embeds=torch.randn(1, model_config["pooled_projection_dim"], generator=gen).to(
                device, dtype),
            height=px, width=px, num_inference_steps=steps, guidance_scale=3.5)
        state = {}
        for variant in variants:
            if over_budget():
                log(f"over 85% of the {args.budget_s:.0f} s budget after {time.perf_counter() - start:.0f} s: "
                    f"skipping {variant} at {px}px")
                continue
            log(f"{px}px {variant} ...")
            try:
                row = dict(kind="cachedit", variant=variant, px=px, steps=steps)
                row.update(run_variant(variant, transformer, inputs, steps, use_compile, state, sync))
                row.update(smoke=args.smoke, dtype=str(dtype).removeprefix("torch."), versions=versions)
                with open(os.path.join(out_dir, "bench_cachedit.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                log(f"{px}px {variant}: {row['ms_per_step']:.2f} ms/step, computed {row['computed_steps']}/{steps} "
                    f"steps, first call {row['first_call_s']:.1f} s; schedule {row['schedule']}")
            except Exception:
                log(f"{px}px {variant} failed:\n{traceback.format_exc()}")
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        del transformer, inputs
        if use_compile:
            torch._dynamo.reset()  # the next size compiles for its own static shapes
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    log(f"done in {time.perf_counter() - start:.0f} s")

    lines = ["| px | variant | ms/step | computed steps | vs dense | first call s | compile |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = next((d["ms_per_step"] for d in rows if d["px"] == r["px"] and d["variant"] == "dense"), None)
        ratio = f"{dense / r['ms_per_step']:.2f}x" if dense else "-"
        lines.append(f"| {r['px']} | {r['variant']} | {r['ms_per_step']:.2f} | {r['computed_steps']}/{r['steps']} | "
                     f"{ratio} | {r['first_call_s']:.1f} | {r['compile']} |")
    log("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
