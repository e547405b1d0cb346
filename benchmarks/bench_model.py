"""The dense transformer step: ours (JAX, cuDNN attention) against diffusers PyTorch, same GPU, same run (issue 18).

Real dimensions, random weights, bf16: FLUX.1-dev at 1024^2 (4096 image + 512 text tokens, batch 1) and 2048^2
(16384 + 512), SD3-medium at 1024^2 with CFG (batch 2, 4096 + 333 tokens). Each (variant, case) runs in its own
process, so the frameworks never share GPU memory and each variant's XLA flags stay its own.

Variants (`--variants`, comma-separated):
* ``jax``: the shipped model: one forward call and ms/step inside the sampler's scan (and its compile time);
* ``jax/<flag>``: the same with one XLA flag set (see `JAX_FLAGS`), to test what a profile suggests;
* ``jax_fp8/<flag>``: likewise for the FP8 model;
* ``jax_triton_gemm[/flag]``: the model's programs compiled with XLA's default Triton GEMM fusions (the shipped
  `ditfa_jax.xla_options` turn them off), to measure that choice side by side;
* ``jax/unrolled``: the layer scans unrolled (``lax.scan(unroll=True)``), same weights;
* ``jax_gemm_barrier[/flag]``: each linear's GEMM behind an optimisation barrier, its bias added after (a cuBLAS
  GEMM without epilogue is what XLA fuses with the weight slice, reading the stacked weights in place);
* ``jax_fp8``: the block linears in FP8 (`ditfa_jax.fp8`), with its output error against bf16;
* ``jax_fp8_bf16_gemm``: the same with the FP8 GEMMs writing bfloat16 instead of float32 before their scales
  (`fp8_matmul(gemm_dtype=)`: half the output traffic of every block linear);
* ``torch``, ``torch_compile``: diffusers eager and under ``torch.compile`` (default mode);
* ``torch_compile_fp8``: torchao's dynamic FP8 (per-row scales) on every Linear, then ``torch.compile``.

``--profile`` traces a 3-step sampler call of each JAX variant and writes the GPU time per kernel and step
(largest first) to $OUT/profile_<variant>_<case>.txt, with the kernel categories in the JSON line. Profile with
``/no_command_buffer``: inside a CUDA graph every kernel is named after its graph.

    python benchmarks/bench_model.py [--cases flux_1k,flux_2k,sd3_1k_cfg] [--variants jax,torch_compile] [--profile]
    python benchmarks/bench_model.py --one jax --case flux_1k   # one measurement (what the driver runs)

diffusers and torchao are pure Python here: carry their wheels to the GPU machine (RESULTS.md has the command).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import os
import statistics
import subprocess
import sys
import tempfile
import time

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
CASES = {
    "flux_1k": dict(family="flux", config=FLUX_DEV, pixels=1024, batch=1, text=512, sampler_steps=28),
    "flux_2k": dict(family="flux", config=FLUX_DEV, pixels=2048, batch=1, text=512, sampler_steps=8),
    "sd3_1k_cfg": dict(family="sd3", config=SD3_MEDIUM, pixels=1024, batch=2, text=333, sampler_steps=28),
}
JAX_FLAGS = {
    "slice_fusion": "--xla_gpu_enable_dynamic_slice_fusion=true",
    "no_command_buffer": "--xla_gpu_enable_command_buffer=",  # kernels, not CUDA graphs, in the profile
    "double_buffer": "--xla_gpu_enable_while_loop_double_buffering=true",
    "no_cublaslt": "--xla_gpu_enable_cublaslt=false",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "graph_while": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE",
}
DEFAULT_VARIANTS = "jax,jax_fp8,torch,torch_compile"
PROFILE_STEPS = 3


def median_ms(fn, sync, warmup: int = 3, reps: int = 10) -> tuple[float, float]:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def op_category(name: str) -> str:
    """A coarse kind for a GPU kernel or XLA op name, for the profile's summary."""
    n = name.lower()
    if "cudnn" in n or "flash" in n or "fmha" in n or "sdpa" in n:
        return "attention"
    if any(s in n for s in ("gemm", "cublas", "nvjet", "xmma", "cutlass", "dot", "matmul", "triton_gemm")):
        return "matmul"
    if "copy" in n or "dynamic-slice" in n or "dynamic_slice" in n or "memcpy" in n or "memset" in n:
        return "copy"
    return "other"


def timeline_stats(events: list[tuple[str, float, float, str]], calls: int) -> dict:
    """From GPU kernel events (stream, start ns, duration ns, name): per call, the time any kernel ran (the union
    of intervals over streams), the busiest stream's busy and idle time within its span, and the number of
    launches. Idle time on the compute stream is what a faster host or fewer kernel boundaries could win back."""
    def union_ms(intervals):
        total, end = 0.0, -1.0
        for a, b in sorted(intervals):
            if b > end:
                total += b - max(a, end)
                end = b
        return total / 1e6
    by_stream = collections.defaultdict(list)
    for stream, start, dur, _ in events:
        by_stream[stream].append((start, start + dur))
    if not by_stream:
        return {}
    compute = max(by_stream, key=lambda k: sum(b - a for a, b in by_stream[k]))
    spans = sorted(by_stream[compute])
    gaps = sorted(((b[0] - a[1]) for a, b in zip(spans, spans[1:]) if b[0] > a[1]), reverse=True)
    return dict(any_stream_busy_ms=union_ms([i for v in by_stream.values() for i in v]) / calls,
                compute_stream=compute, compute_busy_ms=union_ms(spans) / calls,
                compute_span_ms=(spans[-1][1] - spans[0][0]) / 1e6 / calls,
                compute_idle_ms=sum(gaps) / 1e6 / calls, compute_launches=len(spans) // calls,
                gaps_over_20us=sum(g > 2e4 for g in gaps) // calls,
                idle_in_gaps_over_20us_ms=sum(g for g in gaps if g > 2e4) / 1e6 / calls,
                streams={k: round(union_ms(v) / calls, 2) for k, v in by_stream.items()})


def write_profile(path: str, events, calls: int, wall_ms: float, hlo_ops: dict | None = None) -> dict:
    """Write the GPU time per kernel (ms per call, largest first) and the timeline stats to `path`."""
    totals, counts = collections.Counter(), collections.Counter()
    for _, _, dur, name in events:
        totals[name] += dur / 1e6 / calls
        counts[name] += 1
    hlo_ops = hlo_ops or {}
    by_category = collections.Counter()
    for op, ms in totals.items():
        by_category[op_category(op + " " + hlo_ops.get(op, ""))] += ms
    stats = timeline_stats(events, calls)
    with open(path, "w") as f:
        f.write(f"traced wall time {wall_ms:.2f} ms per call; GPU busy {sum(totals.values()):.2f} ms per call\n")
        f.write("by category (ms per call): " + json.dumps({k: round(v, 2) for k, v in by_category.items()}) + "\n")
        f.write("timeline: " + json.dumps(stats) + "\n\n")
        f.write(f"{'ms/call':>9} {'launches':>8}  kernel  [an XLA op]\n")
        for op, ms in totals.most_common():
            f.write(f"{ms:9.3f} {counts[op] // calls:8d}  {op[:150]}  [{hlo_ops.get(op, '')[:80]}]\n")
    return dict(profile_wall_ms=wall_ms, profile_busy_ms=sum(totals.values()),
                profile_ms=dict((k, round(v, 2)) for k, v in by_category.items()),
                timeline={k: v for k, v in stats.items() if k != "streams"})


def gpu_profile(fn, path: str, calls: int = 1) -> dict:
    """Trace `calls` calls of a JAX function `fn` and `write_profile` its GPU kernels."""
    import jax
    from jax.profiler import ProfileData

    trace_dir = tempfile.mkdtemp()
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(calls):
            jax.block_until_ready(fn())
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    events, hlo_ops = [], {}
    for plane in ProfileData.from_file(files[0]).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("XLA") or "Stream" not in line.name:
                continue  # derived op/module timelines would count every kernel twice
            for event in line.events:
                events.append((line.name, event.start_ns, event.duration_ns, event.name))
                hlo_ops.setdefault(event.name, str(dict(event.stats).get("hlo_op", "")))
    return write_profile(path, events, calls, wall_ms, hlo_ops)


def torch_profile(fn, path: str, calls: int = 1) -> dict:
    """`gpu_profile` for a PyTorch function: its CUDA kernels from `torch.profiler`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    events = [(f"stream {e.device_index}/{getattr(e, 'thread', 0)}", e.time_range.start * 1e3,
               (e.time_range.end - e.time_range.start) * 1e3, e.name)
              for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return write_profile(path, events, calls, wall_ms)


def hlo_summary(text: str) -> dict:
    """Counts, in a compiled HLO module, of what decides whether the layer scan reads its weights in place:
    copies and dynamic slices (a weight slice materialised before its GEMM), cuBLAS custom calls by target, and
    dynamic-slice fusions (a GEMM reading a slice of the stacked weights in place)."""
    counts = collections.Counter()
    for line in text.splitlines():
        line = line.strip()
        if " = " not in line or line.startswith(("//", "ROOT tuple", "HloModule")):
            continue
        op = re.search(r"= \S+(?:\[[^\]]*\])?(?:\{[^}]*\})? ([a-z][a-z\-]*)\(", line)
        if op and op.group(1) in ("copy", "dynamic-slice", "dynamic-update-slice", "transpose"):
            counts[op.group(1)] += 1
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target:
            counts["custom-call " + target.group(1)] += 1
        if "dynamic_address_computation" in line or "address_computation" in line:
            counts["dynamic-slice fusion"] += 1
    return dict(counts)


def compiled_forward_text(case: dict) -> str:
    """The compiled HLO of the model's jitted forward at the case's shapes, from abstract weights (no memory)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ditfa_jax.loading import Transformer

    model = random_jax_model(case, abstract=True)
    captured = {}
    model.__dict__["_apply"] = lambda state, kwargs: captured.update(args=(state, kwargs))
    *args, kwargs = jax_inputs(case, model.config)
    model(*args, **kwargs)
    return Transformer._apply.func(model).lower(*captured["args"]).compile().as_text()


def random_jax_model(case: dict, abstract: bool = False):
    """The case's model with random bf16 weights (or only their shapes, `abstract`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ditfa_jax.configs import FluxConfig, SD3Config
    from ditfa_jax.loading import Transformer
    from ditfa_jax.models.flux import FluxTransformer
    from ditfa_jax.models.sd3 import SD3Transformer

    flux = case["family"] == "flux"
    cfg = FluxConfig(**case["config"]) if flux else SD3Config(**case["config"])
    cls = FluxTransformer if flux else SD3Transformer
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: cls(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    state = shapes if abstract else jax.jit(lambda: nnx.split(cls(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))[1])()
    return Transformer(cfg, graphdef, state)


def jax_inputs(case: dict, cfg):
    """(latents, text, pooled, timestep, keyword inputs) of one forward call, random, at the case's shapes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ditfa_jax.models.flux import flux_image_ids

    flux = case["family"] == "flux"
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
    return latents, text, pooled, timestep, kwargs


def apply_code_variant(variant: str) -> None:
    """Patch the model code for the variants that change it rather than XLA's flags (``jax/unrolled``,
    ``jax_gemm_barrier``, ``jax_fp8_bf16_gemm``)."""
    import jax

    import ditfa_jax.models.layers as layers

    if "unrolled" in variant:
        def unrolled(stack, carry, xs, body):
            from flax import nnx
            graphdef, state = nnx.split(stack)
            return jax.lax.scan(lambda c, layer: body(nnx.merge(graphdef, layer[0]), c, layer[1]), carry,
                                (state, xs), unroll=True)
        layers.scan_stack = unrolled
    if "bf16_gemm" in variant:  # jax_fp8_bf16_gemm: the FP8 GEMMs write bfloat16, then the scales apply
        import functools

        import jax.numpy as jnp

        import ditfa_jax.fp8 as fp8
        fp8.fp8_matmul = functools.partial(fp8.fp8_matmul, gemm_dtype=jnp.bfloat16)
    if "gemm_barrier" in variant:
        def plain_epilogue(self, x):  # the GEMM alone, then its bias: XLA fuses only such GEMMs with their slices
            y = jax.lax.optimization_barrier(jax.lax.dot_general(x, self.kernel.get_value(),
                                                                 (((x.ndim - 1,), (0,)), ((), ()))))
            return y if self.bias is None else y + self.bias.get_value()
        layers.Linear.__call__ = plain_epilogue


def run_jax(case: dict, variant: str, profile_path: str | None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ditfa_jax.sampler import sample

    apply_code_variant(variant)
    model = random_jax_model(case)
    flux = case["family"] == "flux"
    b, px = case["batch"], case["pixels"]
    latents, text, pooled, timestep, kwargs = jax_inputs(case, model.config)
    result = {}
    if variant.startswith("jax_fp8"):
        from ditfa_jax.fp8 import quantize_transformer

        reference = np.asarray(model(latents, text, pooled, timestep, **kwargs), np.float32)
        model = quantize_transformer(model)
    forward = lambda: model(latents, text, pooled, timestep, **kwargs)  # noqa: E731
    start = time.perf_counter()
    first_out = jax.block_until_ready(forward())
    result["forward_first_call_s"] = time.perf_counter() - start
    if variant.startswith("jax_fp8"):
        out = np.asarray(first_out, np.float32)
        result["fp8_rel_error"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        result["fp8_finite"] = bool(np.isfinite(out).all())
    result["step_ms"], result["step_min_ms"] = median_ms(forward, jax.block_until_ready)

    steps = case["sampler_steps"]
    if flux:
        s_lat, s_kw, s_text, s_pool = latents[:1].astype(jnp.float32), {}, text[:1], pooled[:1]
    else:
        half = b // 2
        s_lat, s_text, s_pool = latents[:half].astype(jnp.float32), text[:half], pooled[:half]
        s_kw = dict(negative_prompt_embeds=text[half:], negative_pooled_prompt_embeds=pooled[half:])
    run_sampler = lambda n: sample(model, s_lat, s_text, s_pool, height=px, width=px, num_steps=n,  # noqa: E731
                                   guidance_scale=3.5 if flux else 7.0, **s_kw)
    call = lambda: run_sampler(steps)  # noqa: E731
    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    _, second = median_ms(call, jax.block_until_ready, warmup=0, reps=2)
    result.update(sampler_steps=steps, sampler_first_call_s=first, sampler_compile_s=first - second / 1e3,
                  sampler_ms_per_step=second / steps)
    if profile_path:
        jax.block_until_ready(run_sampler(PROFILE_STEPS))
        result.update(gpu_profile(lambda: run_sampler(PROFILE_STEPS), profile_path), profile_steps=PROFILE_STEPS)
    result["versions"] = dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind))
    return result


def run_torch(case: dict, variant: str, profile_path: str | None) -> dict:
    import diffusers
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    flux = case["family"] == "flux"
    cls = FluxTransformer2DModel if flux else SD3Transformer2DModel
    with torch.device("cuda"):
        model = cls(**case["config"]).to(torch.bfloat16).eval()
    versions = dict(torch=torch.__version__, diffusers=diffusers.__version__, device=torch.cuda.get_device_name())
    if variant == "torch_compile_fp8":
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        versions["torchao"] = torchao.__version__
    if variant != "torch":
        model = torch.compile(model)
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

    start = time.perf_counter()
    forward()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    med, best = median_ms(forward, lambda _: torch.cuda.synchronize())
    result = dict(step_ms=med, step_min_ms=best, forward_first_call_s=first, versions=versions)
    if profile_path:
        try:
            result.update(torch_profile(forward, profile_path, calls=PROFILE_STEPS), profile_steps=PROFILE_STEPS)
        except Exception as e:  # the timing above still counts
            result["profile_error"] = repr(e)[:300]
    return result


def drive(cases: list[str], variants: list[str], profile: bool, out_dir: str | None, hlo: bool = False) -> None:
    rows = []
    for name in cases:
        for variant in variants:
            env = dict(os.environ)
            flag = JAX_FLAGS.get(variant.partition("/")[2])
            if flag:
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
            if variant.partition("/")[0] == "jax_triton_gemm":
                env["DITFA_XLA_TRITON_GEMM"] = "1"
            argv = ([sys.executable, __file__, "--one", variant, "--case", name] + (["--profile"] if profile else [])
                    + (["--hlo"] if hlo else []))
            start = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env)
            line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            if proc.returncode != 0 or not line.startswith("{"):
                print(f"[{variant} {name}] FAILED rc={proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
                rec = dict(case=name, variant=variant, error=proc.stderr[-1500:])
            else:
                rec = dict(case=name, variant=variant, process_s=round(time.perf_counter() - start, 1),
                           **json.loads(line))
                print(json.dumps(rec), flush=True)
            rows.append(rec)
            if out_dir:
                with open(os.path.join(out_dir, "bench_model.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
    if hlo:
        print("\n| case | variant | compile s | HLO counts |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['variant']} | {r.get('compile_s', 'failed')} | {r.get('hlo', '')} |")
        return
    print("\n| case | variant | forward ms | sampler ms/step | vs torch_compile | sampler compile s | note |")
    print("|---|---|---|---|---|---|---|")
    for name in cases:
        ref = next((r["step_ms"] for r in rows if r["case"] == name and r["variant"] == "torch_compile"
                    and "step_ms" in r), None)
        for r in (r for r in rows if r["case"] == name):
            if "step_ms" not in r:
                print(f"| {name} | {r['variant']} | failed | | | | {r['error'][-80:]!r} |")
                continue
            per_step = r.get("sampler_ms_per_step", r["step_ms"])
            ratio = f"{per_step / ref:.3f}" if ref else "-"
            comp = f"{r['sampler_compile_s']:.1f}" if "sampler_compile_s" in r else "-"
            note = f"rel err {r['fp8_rel_error']:.4f}" if "fp8_rel_error" in r else ""
            sampler = f"{r['sampler_ms_per_step']:.1f}" if "sampler_ms_per_step" in r else "-"
            print(f"| {name} | {r['variant']} | {r['step_ms']:.1f} | {sampler} | {ratio} | {comp} | {note} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--profile", action="store_true", help="trace the JAX variants' forward calls")
    parser.add_argument("--hlo", action="store_true",
                        help="only compile each JAX variant's forward: its HLO to $OUT/hlo_<variant>_<case>.txt, "
                             "counts of copies, slices and GEMM kinds in the table")
    parser.add_argument("--one", help="run one variant in this process (with --case)")
    parser.add_argument("--case", choices=list(CASES))
    args = parser.parse_args()
    out_dir = os.environ.get("OUT")
    if args.one is None:
        drive(args.cases.split(","), args.variants.split(","), args.profile, out_dir, args.hlo)
        return
    case = CASES[args.case]
    if args.hlo:
        apply_code_variant(args.one)
        start = time.perf_counter()
        text = compiled_forward_text(case)
        result = dict(compile_s=round(time.perf_counter() - start, 1), hlo=hlo_summary(text))
        with open(os.path.join(out_dir or ".", f"hlo_{args.one.replace('/', '-')}_{args.case}.txt"), "w") as f:
            f.write(text)
    else:
        path = (os.path.join(out_dir or ".", f"profile_{args.one.replace('/', '-')}_{args.case}.txt")
                if args.profile else None)
        result = run_jax(case, args.one, path) if args.one.startswith("jax") else run_torch(case, args.one, path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
