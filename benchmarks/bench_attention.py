#!/usr/bin/env python3
"""GPU benchmark of the head-wise attention kernel (pallas_kernels).

Checks the compiled kernel against the dense reference on random data for each
shape, then times it for the plans all-full, all-arrow(8/16/32)
(w = n_img // (2k)), mixed (heads cycle full / arrow_8 / cached) and
all-cached, against ``jax.nn.dot_product_attention(implementation="cudnn")``
(dense) and PyTorch FlexAttention (compiled) given the same tile-granular
block mask (and, for FLUX-2K arrow_8, the token-level arrow mask of the
reference measurements).  Optionally sweeps the Triton backend's launch
configuration (execution tiles dividing the default band, warps, stages, loop
structure); the band, hence the computed function, stays the default.

Timing: JAX calls are dispatched back to back (async) N times and the host
waits once; the time per call is the median over repetitions (warm-up first).
Plans with cached heads chain the output into the next call's donated cache,
as in a denoising loop, so the cache is aliased in place.  Torch uses
``triton.testing.do_bench`` (CUDA events, median).

The Mosaic GPU backend ("mosaic_gpu", default config) is one more variant:
on every shape and plan its output (into a cache poisoned with NaN on the
computed heads) is checked against the dense reference per head and, all-full,
against cuDNN, then timed like the Triton backend.

Usage (on the GPU machine, repository root):
  PYTHONUNBUFFERED=1 python3 benchmarks/bench_attention.py [--sweep]
      [--shapes FLUX-1K,FLUX-2K,SD3-1K] [--no-flex] [--budget-s 520]
      [--quick]  (plans full, arrow8, mixed, cached; no small checks or Triton variants; Flex arrow8 only)
      [--backends triton,mosaic_gpu]
      [--carried-padding]  (only: SD3-1K called as it is and carried padded to 4432 tokens, as the model does)
Writes bench.json and bench_log.txt under $OUT (or --out) and prints a short
table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--cpu-smoke" in sys.argv:  # the Mosaic GPU interpreter can deadlock under this scheduler (tests/conftest.py)
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, [os.environ.get("XLA_FLAGS"), "--xla_cpu_enable_concurrency_optimized_scheduler=false"]))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import schedule  # noqa: E402

DEFAULT = pk.TritonConfig()  # the defaults of the options below (single_loop, sort_heads)

# name: (batch, text_len, n_img, heads, head_dim, text_first)
SHAPES = {
    "FLUX-1K": (1, 512, 4096, 24, 128, True),
    "FLUX-2K": (1, 512, 16384, 24, 128, True),
    "FLUX-4K": (1, 512, 65536, 24, 128, True),
    "SD3-1K": (2, 333, 4096, 24, 64, False),
    # SD3 with 384 text tokens: no padding copy (a multiple of 8) and a length jax's attention_mgpu example takes
    "SD3-1K-384": (2, 384, 4096, 24, 64, False),
}

INTERPRET = False  # --cpu-smoke: tiny shapes, interpret mode, no GPU
QUICK_PLANS = ("full", "arrow8", "mixed", "cached")
BACKEND_LIST = ("triton", "mosaic_gpu")
DENSE_IMPL = "cudnn"
T0 = time.time()
LOG_LINES: list[str] = []
RESULTS: dict = {"records": [], "checks": [], "env": {}}
OUT = None


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG_LINES.append(s)


def save():
    if OUT is None:
        return
    with open(os.path.join(OUT, "bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    with open(os.path.join(OUT, "bench_log.txt"), "w") as f:
        f.write("\n".join(LOG_LINES) + "\n")


def elapsed():
    return time.time() - T0


def plans_for(n_img, heads):
    w = lambda k: n_img // (2 * k)  # noqa: E731
    return {
        "full": np.full(heads, -1, np.int32),
        "arrow8": np.full(heads, w(8), np.int32),
        "arrow16": np.full(heads, w(16), np.int32),
        "arrow32": np.full(heads, w(32), np.int32),
        "mixed": np.array([[-1, w(8), 0][h % 3] for h in range(heads)], np.int32),
        # 1/6 full, 1/6 each arrow 8/16/32, 1/3 cached.
        "mixed2": np.array([[-1, w(8), w(16), w(32), 0, 0][h % 6] for h in range(heads)], np.int32),
        "cached": np.zeros(heads, np.int32),
    }


def time_jax(fn, args, chain=None, target_ms=40.0, reps=7):
    """Median ms per call of ``fn(*args)`` dispatched back to back."""
    args = list(args)
    out = None
    if INTERPRET:  # --cpu-smoke: one call, the timing means nothing
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ms = (time.perf_counter() - t) * 1e3
        return ms, ms, ms, 1
    for _ in range(3):
        out = fn(*args)
        if chain is not None:
            args[chain] = out
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(3):
        out = fn(*args)
        if chain is not None:
            args[chain] = out
    jax.block_until_ready(out)
    est = (time.perf_counter() - t) / 3 * 1e3
    n = int(min(max(target_ms / max(est, 1e-3), 5), 400))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
            if chain is not None:
                args[chain] = out
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(ts), min(ts), max(ts), n


_OURS_CACHE: dict = {}


def _kernel(text_len, text_first, bq, bk, nw, ns, **options):
    """The Triton backend under the default band with this launch config (q, k, v, head_window, cache remain)."""
    config = pk.TritonConfig(block_q=bq, block_k=bk, num_warps=nw, num_stages=ns, interpret=INTERPRET, **options)
    return functools.partial(pk.headwise_attention, text_len=text_len, text_first=text_first, backend="triton",
                             config=config)


def ours_fn(
    tokens, text_len, text_first, bq, bk, nw, ns, *, cache, single_loop=DEFAULT.single_loop,
    sort_heads=DEFAULT.sort_heads, donate=True
):
    key = (tokens, text_len, text_first, bq, bk, nw, ns, cache, single_loop, sort_heads, donate)
    if key not in _OURS_CACHE:
        f = _kernel(text_len, text_first, bq, bk, nw, ns, sort_heads=sort_heads, single_loop=single_loop)
        if cache:
            _OURS_CACHE[key] = jax.jit(f, donate_argnums=(4,) if donate else ())
        else:
            _OURS_CACHE[key] = jax.jit(lambda q, k, v, hw: f(q, k, v, hw, None))
    return _OURS_CACHE[key]


_UNROLL_CACHE: dict = {}


def ours_unrolled(tokens, text_len, text_first, bq, bk, nw, ns, n=16):
    """n chained calls inside one jit (cache donated and aliased in place):
    time per call = kernel time, no per-call dispatch or plan preparation
    (identical across the n calls, so XLA computes it once)."""
    key = (tokens, text_len, text_first, bq, bk, nw, ns, n)
    if key not in _UNROLL_CACHE:
        f = _kernel(text_len, text_first, bq, bk, nw, ns)

        def many(q, k, v, hw, c):
            for _ in range(n):
                c = f(q, k, v, hw, c)
            return c

        _UNROLL_CACHE[key] = jax.jit(many, donate_argnums=(4,))
    return _UNROLL_CACHE[key]


_MOSAIC_CACHE: dict = {}
# --mosaic-variants name -> (impl name, MosaicConfig fields): the default (persistent grid), one program per work
# item, each of the default's 2026-12-07 changes undone alone, and both undone (the default before that day, but
# for the work list's dealing; "band" stands for the band's key size, 64 at head_dim 64); a fixed K/V ring depth
# (the default: as deep as SMEM allows), the compute warpgroups' matmuls not alternated, and their alternation set
# up at every work item ("handoff", MosaicConfig.pingpong_per_item) and the next item's Q loaded after the item's
# second key tile ("late-prefetch", MosaicConfig.prefetch_q_in_loop), the next item's indices read while the
# current one runs ("ahead", MosaicConfig.schedule_ahead), and all three: candidates against the per-item overhead.
MOSAIC_VARIANTS = {
    "default": ("mosaic_gpu", {}),
    "grid": ("mosaic_gpu/grid", dict(persistent=False)),
    "no-prefetch": ("mosaic_gpu/no-prefetch", dict(prefetch_q=False)),
    "band-tiles": ("mosaic_gpu/band-tiles", dict(block_k="band")),
    "previous": ("mosaic_gpu/previous", dict(prefetch_q=False, block_k="band")),
    "stages2": ("mosaic_gpu/stages2", dict(num_stages=2)),
    "stages3": ("mosaic_gpu/stages3", dict(num_stages=3)),
    "no-pingpong": ("mosaic_gpu/no-pingpong", dict(pingpong=False)),
    "handoff": ("mosaic_gpu/handoff", dict(pingpong_per_item=True)),
    "late-prefetch": ("mosaic_gpu/late-prefetch", dict(prefetch_q_in_loop=True)),
    "handoff+late-prefetch": ("mosaic_gpu/handoff+late-prefetch", dict(pingpong_per_item=True,
                                                                        prefetch_q_in_loop=True)),
    "ahead": ("mosaic_gpu/ahead", dict(schedule_ahead=True)),
    "all-three": ("mosaic_gpu/all-three", dict(pingpong_per_item=True, prefetch_q_in_loop=True,
                                                schedule_ahead=True)),
}
MOSAIC_IMPLS = dict(MOSAIC_VARIANTS.values())
MOSAIC_LIST = ("mosaic_gpu",)


def mosaic_config(impl, head_dim):
    """The MosaicConfig of variant ``impl`` at ``head_dim``."""
    fields = dict(MOSAIC_IMPLS[impl])
    if fields.get("block_k") == "band":
        fields["block_k"] = min(pk.default_band(head_dim)[1], 128)
    return pk.MosaicConfig(interpret=INTERPRET, **fields)


def mosaic_tile_fraction(hw, tokens, text_len, text_first, head_dim, cfg):
    """Share of the dense key tiles a mosaic_gpu config runs on plan ``hw`` (its own tiles: 128-key tiles over a
    64-key band run whole tiles)."""
    from pallas_kernels import mosaic_backend

    block_k = cfg.block_k  # a completed config (default_config): never None
    n_pairs = -(-tokens // 128)
    count = mosaic_backend.item_tiles(jnp.arange(n_pairs)[None, :], jnp.asarray(hw)[:, None], tokens=tokens,
                                      text_len=text_len, text_first=text_first, band=pk.default_band(head_dim),
                                      block_k=block_k).count
    return float(np.asarray(count).sum()) / (len(hw) * n_pairs * -(-tokens // block_k))


def mosaic_fn(text_len, text_first, *, cache, impl="mosaic_gpu", head_dim=128):
    """A mosaic_gpu variant (:data:`MOSAIC_VARIANTS`) under jit (the cache donated when given)."""
    key = (text_len, text_first, cache, impl, head_dim)
    if key not in _MOSAIC_CACHE:
        cfg = mosaic_config(impl, head_dim)
        f = functools.partial(pk.headwise_attention, text_len=text_len, text_first=text_first, backend="mosaic_gpu",
                              config=cfg)
        if cache:
            _MOSAIC_CACHE[key] = jax.jit(f, donate_argnums=(4,))
        else:
            _MOSAIC_CACHE[key] = jax.jit(lambda q, k, v, hw: f(q, k, v, hw, None))
    return _MOSAIC_CACHE[key]


def same_bits(x, y):
    u = jnp.uint16 if jnp.dtype(x.dtype).itemsize == 2 else jnp.uint32
    return bool(jnp.all(jax.lax.bitcast_convert_type(x, u) == jax.lax.bitcast_convert_type(y, u)))


def mosaic_checks(name, q, k, v, plans, text_len, text_first, cudnn_out, impl):
    """A mosaic_gpu variant on this shape, every plan: output written into a cache poisoned with NaN on the computed
    heads; computed heads finite and (one full, one arrow head) within 1e-2 of the reference; cached heads
    bit-exact; all-full within 1e-2 of cuDNN.  Returns True when every check passed."""
    ok_all = True
    base = rand(jax.random.PRNGKey(98), q.shape, q.dtype)
    kw = dict(text_len=text_len, text_first=text_first)
    for plan, hw in plans.items():
        computed = hw != 0
        cache = jnp.where(jnp.asarray(computed)[None, None, :, None], jnp.nan, base)
        out = mosaic_fn(text_len, text_first, cache=True, impl=impl, head_dim=q.shape[-1])(
            q, k, v, jnp.asarray(hw), jnp.copy(cache))
        res = dict(kind="mosaic", shape=name, plan=plan, impl=impl)
        res["finite"] = bool(jnp.all(jnp.isfinite(out[:, :, computed]))) if computed.any() else True
        res["cached_bitexact"] = same_bits(out[:, :, ~computed], base[:, :, ~computed]) if (~computed).any() else True
        errs = {}
        for h in sorted({int(np.argmax(hw == -1)) if (hw == -1).any() else -1,
                         int(np.argmax(hw > 0)) if (hw > 0).any() else -1} - {-1}):
            sl = slice(h, h + 1)
            ref = pk.headwise_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], hw[sl], None, backend="xla", **kw)
            errs[f"head{h}(w={hw[h]})"] = rel_err(out[:, :, sl], ref)
            del ref
        res["rel_err_vs_reference"] = errs
        if plan == "full" and cudnn_out is not None:
            res["rel_err_vs_cudnn"] = rel_err(out, cudnn_out)
        ok = res["finite"] and res["cached_bitexact"] and all(e <= 1e-2 for e in errs.values())
        ok = ok and res.get("rel_err_vs_cudnn", 0.0) <= 1e-2
        res["ok"] = ok
        ok_all &= ok
        RESULTS["checks"].append(res)
        log(f"check {name} {plan} {impl}: finite={res['finite']} cached_bitexact={res['cached_bitexact']} "
            + " ".join(f"{h}:{e:.2e}" for h, e in errs.items())
            + (f" vs cudnn {res['rel_err_vs_cudnn']:.2e}" if "rel_err_vs_cudnn" in res else "")
            + f" {'OK' if ok else 'FAIL'}")
        del out
    save()
    return ok_all


def bench_mosaic(name, q, k, v, plans, text_len, text_first, cudnn_ms, cudnn_out):
    """Every variant of :data:`MOSAIC_LIST`: checks (:func:`mosaic_checks`), then times it on every plan (cache
    chained and donated)."""
    for impl in MOSAIC_LIST:
        _bench_mosaic_variant(name, q, k, v, plans, text_len, text_first, cudnn_ms, cudnn_out, impl)


def _bench_mosaic_variant(name, q, k, v, plans, text_len, text_first, cudnn_ms, cudnn_out, impl):
    batch, tokens, heads, d = q.shape
    try:
        ok = mosaic_checks(name, q, k, v, plans, text_len, text_first, cudnn_out, impl)
    except Exception as ex:
        log(f"check {name} {impl} FAILED: {type(ex).__name__}: {str(ex)[:800]}")
        traceback.print_exc()
        return
    if not ok:
        log(f"{name} {impl}: checks failed, timing anyway (marked)")
    cache = rand(jax.random.PRNGKey(99), q.shape, q.dtype)
    full_ms = None
    cfg = pk.get_backend("mosaic_gpu").default_config(q.shape, q.dtype, pk.default_band(d))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in dataclasses.asdict(mosaic_config(impl, d)).items()
                                      if v is not None and k != "interpret"})
    for plan, hw in plans.items():
        cost = pk.plan_cost(hw, batch=batch, tokens=tokens, text_len=text_len, text_first=text_first, head_dim=d)
        exec_fraction = mosaic_tile_fraction(hw, tokens, text_len, text_first, d, cfg)
        try:
            if (hw == 0).any():
                f = mosaic_fn(text_len, text_first, cache=True, impl=impl, head_dim=d)
                ms, lo, hi, n = time_jax(f, (q, k, v, jnp.asarray(hw), jnp.copy(cache)), chain=4)
            else:
                f = mosaic_fn(text_len, text_first, cache=False, impl=impl, head_dim=d)
                ms, lo, hi, n = time_jax(f, (q, k, v, jnp.asarray(hw)))
        except Exception as ex:
            log(f"{name} {plan} {impl} FAILED: {type(ex).__name__}: {str(ex)[:800]}")
            continue
        tile_flops = int(cost.total_tile_flops)
        tfl = tile_flops / ms / 1e9 if tile_flops else 0.0
        if plan == "full":
            full_ms = ms
        rec = dict(shape=name, plan=plan, impl=impl, ms=ms, lo=lo, hi=hi, n=n, checks_ok=ok,
                   block_k=cfg.block_k, num_stages=cfg.num_stages, persistent=cfg.persistent,
                   num_programs=cfg.num_programs if cfg.persistent else None,
                   prefetch_q=cfg.prefetch_q, tile_fraction=float(cost.tile_fraction),
                   exec_tile_fraction=exec_fraction, tile_tflops=tfl,
                   speedup_vs_cudnn=(cudnn_ms / ms) if cudnn_ms else None)
        if full_ms is not None:  # the tile floor: this variant's own tiles at its all-full time per tile
            rec["predicted_ms"] = full_ms * exec_fraction
        record(**rec)
        log(f"{name} {plan:8s} {impl:16s}: {ms:8.3f} ms [{lo:.3f}-{hi:.3f} n={n}] "
            f"tiles {cost.tile_fraction:6.1%} {tfl:5.0f} TFLOP/s(tiles)"
            + (f" x{cudnn_ms / ms:.2f} vs cudnn" if cudnn_ms else "")
            + (f" pred {rec['predicted_ms']:.3f}" if "predicted_ms" in rec else "")
            + ("" if ok else " CHECKS FAILED"))


FP8_PLANS = {  # name -> (plan it is compared with, heads turned FP8: every head / every other full head)
    "fp8": ("full", "all"),
    "fp8-half": ("full", "half"),
    "mixed-fp8": ("mixed", "all"),
}


def one_head_reference(q, k, v, **kw):
    """Exact attention of one head: cuDNN on a GPU (the XLA reference's fp32 scores need 17 GB at FLUX-4K), the XLA
    reference elsewhere."""
    if jax.default_backend() == "gpu":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return pk.headwise_attention(q, k, v, np.array([-1], np.int32), None, backend="xla", **kw)


def bench_fp8(name, q, k, v, text_len, text_first, cudnn_ms):
    """FP8 heads (window -2) on the mosaic_gpu default config: every computed head checked (the cache poisoned
    with NaN on them; FP8 heads within 0.1 of exact attention, bf16 heads within 1e-2), then each plan timed
    beside the bf16 plan it replaces, same process."""
    from pallas_kernels import fp8 as fp8_ops

    base = rand(jax.random.PRNGKey(97), q.shape, q.dtype)
    kw = dict(text_len=text_len, text_first=text_first)
    call = {fp8: jax.jit(functools.partial(pk.headwise_attention, backend="mosaic_gpu", fp8=fp8,
                                           config=pk.MosaicConfig(interpret=INTERPRET), **kw), donate_argnums=(4,))
            for fp8 in (False, True)}  # the cache donated

    ms, lo, hi, n = time_jax(jax.jit(fp8_ops.quantize), (q, k, v))  # the XLA part of an FP8 call
    record(shape=name, plan="quantize", impl="fp8-quantize", ms=ms, lo=lo, hi=hi, n=n)
    log(f"{name} FP8 quantisation of q, k, v (XLA): {ms:.3f} ms [{lo:.3f}-{hi:.3f} n={n}]")
    for plan, (bf16_plan, which) in FP8_PLANS.items():
        hw16 = plans_for(q.shape[1] - text_len, q.shape[2])[bf16_plan]
        full = np.flatnonzero(hw16 == -1)
        turned = full if which == "all" else full[::2]
        hw = hw16.copy()
        hw[turned] = -2
        computed = hw != 0
        try:
            cache = jnp.where(jnp.asarray(computed)[None, None, :, None], jnp.nan, base)
            out = call[True](q, k, v, jnp.asarray(hw), cache)
            finite = bool(jnp.all(jnp.isfinite(out[:, :, computed])))
            errs = {}
            for h in sorted({int(turned[0]), *[int(x) for x in np.flatnonzero(hw16 == -1) if x not in turned][:1]}):
                sl = slice(h, h + 1)
                ref = one_head_reference(q[:, :, sl], k[:, :, sl], v[:, :, sl], **kw)
                errs[f"head{h}({'fp8' if hw[h] == -2 else 'bf16'})"] = rel_err(out[:, :, sl], ref)
            ok = finite and all(e <= (0.1 if "fp8" in h else 1e-2) for h, e in errs.items())
            RESULTS["checks"].append(dict(kind="fp8", shape=name, plan=plan, finite=finite, rel_err=errs, ok=ok))
            log(f"check {name} {plan}: finite={finite} " + " ".join(f"{h}:{e:.2e}" for h, e in errs.items())
                + f" {'OK' if ok else 'FAIL'}")
            del out
            rows = {}
            for label, windows, fp8 in ((bf16_plan, hw16, False), (plan, hw, True)):
                rows[label] = time_jax(call[fp8], (q, k, v, jnp.asarray(windows), jnp.copy(base)), chain=4)
            (ms16, *_), (ms8, lo, hi, n) = rows[bf16_plan], rows[plan]
            record(shape=name, plan=plan, impl="mosaic_gpu/fp8", ms=ms8, lo=lo, hi=hi, n=n, checks_ok=ok,
                   fp8_heads=int(len(turned)), bf16_plan=bf16_plan, bf16_ms=ms16, speedup_vs_bf16=ms16 / ms8,
                   speedup_vs_cudnn=(cudnn_ms / ms8) if cudnn_ms else None)
            log(f"{name} {plan:9s} mosaic_gpu/fp8: {ms8:8.3f} ms [{lo:.3f}-{hi:.3f} n={n}] against {bf16_plan} "
                f"(bf16) {ms16:.3f} ms: x{ms16 / ms8:.2f}" + (f", x{cudnn_ms / ms8:.2f} vs cudnn" if cudnn_ms else "")
                + ("" if ok else " CHECKS FAILED"))
        except Exception as ex:
            log(f"{name} {plan} fp8 FAILED: {type(ex).__name__}: {str(ex)[:800]}")
            traceback.print_exc()
    save()


def fp8_table():
    rows = [r for r in RESULTS["records"] if r.get("impl") == "mosaic_gpu/fp8"]
    if not rows:
        return ""
    quantize = {r["shape"]: r["ms"] for r in RESULTS["records"] if r.get("impl") == "fp8-quantize"}
    lines = ["| shape | FP8 plan | FP8 heads | ms | of which quantisation | bf16 plan | bf16 ms | FP8 speed-up | "
             "x cuDNN | checks |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['plan']} | {r['fp8_heads']} | {r['ms']:.3f} | "
                     f"{quantize.get(r['shape'], float('nan')):.3f} | {r['bf16_plan']} | "
                     f"{r['bf16_ms']:.3f} | {r['speedup_vs_bf16']:.2f} | "
                     f"{r['speedup_vs_cudnn'] or 0:.2f} | {'OK' if r['checks_ok'] else 'FAIL'} |")
    return "\n" + "\n".join(lines)


def bench_carried_padding(name, plans_to_run):
    """A length that is not a multiple of 8 (SD3-1K: 4429) called as it is (the Mosaic backend pads q, k, v and
    the cache by a copy) and carried padded, as the SD3 model does (``padding``, 4432 rows): every backend of
    :data:`BACKEND_LIST` on every plan, and cuDNN dense on both (the padded one masks the padding keys). Each
    carried call is checked first: output poisoned with NaN on computed heads, the real rows against the same
    backend's unpadded call, the padding rows finite, cached heads bit for bit."""
    batch, text_len, n_img, heads, d, text_first = SHAPES[name]
    tokens = text_len + n_img
    pad = -tokens % 8
    if not pad:
        log(f"{name}: a multiple of 8 already, nothing to carry")
        return
    ks = jax.random.split(jax.random.PRNGKey(7), 4)
    q, k, v, cache = (rand(x, (batch, tokens + pad, heads, d), jnp.bfloat16) for x in ks)
    real = (slice(None), slice(0, tokens))
    kw = dict(text_len=text_len, text_first=text_first)
    log(f"\n=== {name} carried padded: {tokens} -> {tokens + pad} tokens  [t={elapsed():.0f}s]")
    lengths = jnp.full((batch,), tokens, jnp.int32)
    dense = {"unpadded": (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=DENSE_IMPL)),
                          real),
             "carried": (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                 q, k, v, key_value_seq_lengths=lengths, implementation=DENSE_IMPL)), (slice(None),) * 2)}
    outs = {}
    for form, (f, rows) in dense.items():
        args = tuple(x[rows] for x in (q, k, v))
        outs[form] = f(*args)
        ms, lo, hi, n = time_jax(f, args)
        record(shape=name, plan="full", impl=f"cudnn/{form}", ms=ms, lo=lo, hi=hi, carried=form == "carried")
        log(f"{name} cudnn {form:9s}: {ms:.3f} ms [{lo:.3f}-{hi:.3f} n={n}]")
    e = rel_err(outs["carried"][real], outs["unpadded"])
    RESULTS["checks"].append(dict(kind="carried-cudnn", shape=name, rel_err=e, ok=e <= 1e-2))
    log(f"check {name} cudnn carried vs unpadded: {e:.2e} {'OK' if e <= 1e-2 else 'FAIL'}")
    del outs
    plans = {p: hw for p, hw in plans_for(n_img, heads).items() if p in plans_to_run}
    for backend in BACKEND_LIST:
        config = (pk.MosaicConfig(interpret=INTERPRET) if backend == "mosaic_gpu"
                  else pk.TritonConfig(interpret=INTERPRET))
        calls = {form: jax.jit(functools.partial(pk.headwise_attention, backend=backend, config=config,
                                                 padding=pad if form == "carried" else 0, **kw),
                               donate_argnums=(4,))
                 for form in ("unpadded", "carried")}
        for plan, hw in plans.items():
            computed = hw != 0
            poison = jnp.where(jnp.asarray(computed)[None, None, :, None], jnp.nan, cache)
            want = calls["unpadded"](*(x[real] for x in (q, k, v)), jnp.asarray(hw), jnp.copy(poison[real]))
            got = calls["carried"](q, k, v, jnp.asarray(hw), jnp.copy(poison))
            e = rel_err(got[real][:, :, computed], want[:, :, computed]) if computed.any() else 0.0
            ok = (e <= 1e-2 and bool(jnp.all(jnp.isfinite(got[:, :, computed])))
                  and same_bits(got[:, :, ~computed], cache[:, :, ~computed]))
            RESULTS["checks"].append(dict(kind="carried", shape=name, plan=plan, impl=backend, rel_err=e, ok=ok))
            del got, want
            times = {}
            for form, rows in (("unpadded", real), ("carried", (slice(None),) * 2)):
                args = (*(x[rows] for x in (q, k, v)), jnp.asarray(hw), jnp.copy(cache[rows]))
                times[form] = time_jax(calls[form], args, chain=4)
                record(shape=name, plan=plan, impl=f"{backend}/{form}", ms=times[form][0], lo=times[form][1],
                       hi=times[form][2], carried=form == "carried", checks_ok=ok)
            log(f"{name} {plan:8s} {backend:10s}: unpadded {times['unpadded'][0]:.3f} ms, carried "
                f"{times['carried'][0]:.3f} ms ({times['unpadded'][0] / times['carried'][0]:.2f}x); check "
                f"{e:.2e} {'OK' if ok else 'FAIL'}")


def carried_table():
    recs = [r for r in RESULTS["records"] if "carried" in r]
    if not recs:
        return ""
    ms = {(r["shape"], r["plan"], r["impl"]): r["ms"] for r in recs}
    lines = ["| shape | plan | impl | unpadded ms | carried ms | speed-up | carried x cuDNN unpadded | checks |",
             "|---|---|---|---|---|---|---|---|"]
    for (shape, plan, impl), t in ms.items():
        base, form = impl.rsplit("/", 1)
        if form != "carried":
            continue
        before, cudnn = ms.get((shape, plan, f"{base}/unpadded")), ms.get((shape, "full", "cudnn/unpadded"))
        ok = all(c["ok"] for c in RESULTS["checks"] if c.get("kind") in ("carried", "carried-cudnn")
                 and c["shape"] == shape and c.get("plan", plan) == plan and c.get("impl", base) == base)
        lines.append(f"| {shape} | {plan} | {base} | {before:.3f} | {t:.3f} | {before / t:.2f} | "
                     f"{cudnn / t if plan == 'full' else float('nan'):.2f} | {'OK' if ok else 'FAIL'} |")
    return "\n" + "\n".join(lines)


def rel_err(x, ref):
    x = jnp.asarray(x, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def record(**kw):
    RESULTS["records"].append(kw)
    save()


# --------------------------------------------------------------------------


def env_info():
    import jaxlib

    info = dict(
        date=datetime.date.today().isoformat(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        devices=str(jax.devices()),
        device_kind=jax.devices()[0].device_kind,
        python=sys.version,
    )
    try:
        import torch
        import triton

        info.update(
            torch=torch.__version__,
            torch_cuda=torch.version.cuda,
            triton=triton.__version__,
            torch_device=torch.cuda.get_device_name(),
        )
    except Exception as e:  # pragma: no cover
        info["torch_error"] = repr(e)
    RESULTS["env"] = info
    for k, v in info.items():
        log(f"env {k}: {v}")
    save()


def small_checks():
    """fp32 and bf16 on small shapes with non-default bands, both orders."""
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        for text_first, tokens, text_len, d, bq, bk in (
            (True, 1101, 77, 128, 64, 64),
            (False, 1029, 333, 64, 128, 64),
            (True, 700, 100, 128, 128, 128),
        ):
            ks = jax.random.split(jax.random.PRNGKey(tokens), 4)
            q, k, v, c = (rand(x, (2, tokens, 6, d), dtype) for x in ks)
            hw = np.array([-1, 0, 3, 40, 0, 2000], np.int32)
            kw = dict(text_len=text_len, text_first=text_first, band=(bq, bk))
            config = pk.TritonConfig(interpret=INTERPRET)
            try:
                out = pk.headwise_attention(q, k, v, hw, c, backend="triton", config=config, **kw)
                ref = pk.headwise_attention(q, k, v, hw, c, backend="xla", **kw)
                sel = hw != 0
                e = rel_err(out[:, :, sel], ref[:, :, sel])
                bits = bool(
                    jnp.all(
                        jax.lax.bitcast_convert_type(
                            out[:, :, ~sel], jnp.uint16 if dtype == jnp.bfloat16 else jnp.uint32
                        )
                        == jax.lax.bitcast_convert_type(
                            c[:, :, ~sel], jnp.uint16 if dtype == jnp.bfloat16 else jnp.uint32
                        )
                    )
                )
                ok = e <= tol and bits
                log(
                    f"check small {jnp.dtype(dtype).name} T={tokens} D={d} "
                    f"text_first={text_first} band=({bq},{bk}): rel_err={e:.2e} "
                    f"cached_bitexact={bits} {'OK' if ok else 'FAIL'}"
                )
                RESULTS["checks"].append(
                    dict(
                        kind="small",
                        dtype=jnp.dtype(dtype).name,
                        tokens=tokens,
                        d=d,
                        rel_err=e,
                        cached_bitexact=bits,
                        ok=ok,
                    )
                )
            except Exception as ex:
                log(f"check small {jnp.dtype(dtype).name} FAILED: {type(ex).__name__}: {str(ex)[:600]}")
                RESULTS["checks"].append(dict(kind="small", error=repr(ex)[:600]))
    save()


def shape_checks(name, q, k, v, plans, text_len, text_first):
    """Compiled kernel vs dense reference (head slices) on this shape, default band and config."""
    heads = q.shape[2]
    cache = rand(jax.random.PRNGKey(99), q.shape, q.dtype)
    kw = dict(text_len=text_len, text_first=text_first)
    for plan in ("mixed", "arrow32"):
        hw = plans[plan]
        out = pk.headwise_attention(q, k, v, hw, cache, backend="triton", config=pk.TritonConfig(interpret=INTERPRET),
                                    **kw)
        for h in sorted(
            {int(np.argmax(hw == -1)) if (hw == -1).any() else 0, int(np.argmax(hw > 0)) if (hw > 0).any() else 0}
        ):
            sl = slice(h, h + 1)
            ref = pk.headwise_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], hw[sl], None, backend="xla", **kw)
            e = rel_err(out[:, :, sl], ref)
            ok = e <= 1e-2
            log(f"check {name} {plan} head {h} (w={hw[h]}): rel_err={e:.2e} {'OK' if ok else 'FAIL'}")
            RESULTS["checks"].append(dict(kind="shape", shape=name, plan=plan, head=h, w=int(hw[h]), rel_err=e, ok=ok))
            del ref
        cached = np.flatnonzero(hw == 0)
        if cached.size:
            bits = bool(
                jnp.all(
                    jax.lax.bitcast_convert_type(out[:, :, cached], jnp.uint16)
                    == jax.lax.bitcast_convert_type(cache[:, :, cached], jnp.uint16)
                )
            )
            log(f"check {name} {plan} cached heads bit-exact: {bits}")
            RESULTS["checks"].append(dict(kind="cached", shape=name, ok=bits))
    del heads
    save()


def bench_jax_mgpu(name, q, k, v, text_len, text_first):
    """Dense attention in float16, same inputs: cuDNN, jax's own Mosaic-GPU flash attention example
    (``jax.experimental.pallas.ops.gpu.attention_mgpu``, float16 only as shipped, no softmax scale: it gets q
    pre-scaled) and our mosaic_gpu kernel all-full (below head_dim 128 also with 128-key tiles); each checked against
    cuDNN first (ours writing into a NaN-filled cache; theirs on its first call, while cuDNN's output is alive, so no
    stale buffer can hold the answer)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as example

    q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
    heads, d = q.shape[2], q.shape[3]
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    ref = cudnn(q, k, v)
    scale = 1.0 / math.sqrt(d)
    config = example.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
    theirs = jax.jit(lambda q, k, v: example.attention(q * scale, k, v, config))
    full = jnp.full((1, heads), -1, jnp.int32)[0]
    common = dict(text_len=text_len, text_first=text_first, backend="mosaic_gpu")
    ours = {"mosaic_gpu-fp16": {}}
    if pk.default_band(d)[1] < 128:  # the band sets our key tile; full heads compute the same function at any band
        ours["mosaic_gpu-fp16-block_k128"] = dict(band=(128, 128), config=pk.MosaicConfig(block_k=128))
    variants = [("jax-cudnn-dense-fp16", cudnn), ("jax-attention-mgpu-fp16", theirs)]
    variants += [(impl, jax.jit(functools.partial(pk.headwise_attention, head_window=full, cache=None, **common, **kw)))
                 for impl, kw in ours.items()]
    for impl, fn in variants:
        try:
            if impl != "jax-cudnn-dense-fp16":
                out = (fn(q, k, v) if impl not in ours else
                       pk.headwise_attention(q, k, v, full, jnp.full_like(q, jnp.nan), **common, **ours[impl]))
                e = rel_err(out, ref)
                ok = bool(e <= 1e-2)
                RESULTS["checks"].append(dict(kind="fp16-full-vs-cudnn", shape=name, impl=impl, rel_err=e, ok=ok))
                log(f"check {name} {impl} vs cudnn fp16: rel_err={e:.2e} {'OK' if ok else 'FAIL'}")
            ms, lo, hi, n = time_jax(fn, (q, k, v))
            log(f"{name} {impl}: {ms:.3f} ms [{lo:.3f}-{hi:.3f}, n={n}]")
            record(shape=name, plan="full", impl=impl, ms=ms, lo=lo, hi=hi)
        except Exception as ex:
            log(f"{name} {impl} FAILED: {type(ex).__name__}: {str(ex)[:400]}")


def bench_shape(name, args, sweep_cfgs):
    batch, text_len, n_img, heads, d, text_first = SHAPES[name]
    tokens = text_len + n_img
    default = pk.get_backend("triton").default_config((batch, tokens, heads, d), jnp.bfloat16, pk.default_band(d))
    bq, bk, nw, ns = default.block_q, default.block_k, default.num_warps, default.num_stages
    log(
        f"\n=== {name}: B={batch} T={tokens} ({text_len} text "
        f"{'first' if text_first else 'last'}) H={heads} D={d} "
        f"blocks=({bq},{bk}) warps={nw} stages={ns}  [t={elapsed():.0f}s]"
    )
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    shape = (batch, tokens, heads, d)
    q, k, v, cache = (rand(x, shape, jnp.bfloat16) for x in ks)
    plans = plans_for(n_img, heads)
    if args.quick:
        plans = {p: plans[p] for p in args.plans.split(",")}
    dense_flops = 4 * batch * heads * tokens * tokens * d
    triton = "triton" in BACKEND_LIST

    if triton:
        try:
            shape_checks(name, q, k, v, plans_for(n_img, heads), text_len, text_first)
        except Exception as ex:
            log(f"check {name} FAILED: {type(ex).__name__}: {str(ex)[:800]}")
            traceback.print_exc()

    # cuDNN dense.
    cudnn_ms = cudnn_out = None
    try:
        f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=DENSE_IMPL))
        cudnn_out = f(q, k, v)
        ms, lo, hi, n = time_jax(f, (q, k, v))
        cudnn_ms = ms
        log(f"{name} cudnn dense: {ms:.3f} ms [{lo:.3f}-{hi:.3f}, n={n}] {dense_flops / ms / 1e9:.0f} TFLOP/s")
        record(shape=name, plan="full", impl="jax-cudnn-dense", ms=ms, lo=lo, hi=hi, tflops=dense_flops / ms / 1e9)
        if not triton:
            raise StopIteration
        out_full = ours_fn(tokens, text_len, text_first, bq, bk, nw, ns, cache=False)(
            q, k, v, jnp.asarray(plans["full"])
        )
        e = rel_err(out_full, f(q, k, v))
        log(f"check {name} all-full vs cudnn: rel_err={e:.2e} {'OK' if e <= 1e-2 else 'FAIL'}")
        RESULTS["checks"].append(dict(kind="full-vs-cudnn", shape=name, rel_err=e, ok=e <= 1e-2))
        del out_full
    except StopIteration:
        pass
    except Exception as ex:
        log(f"{name} cudnn FAILED: {type(ex).__name__}: {str(ex)[:400]}")

    if "mosaic_gpu" in BACKEND_LIST:
        bench_mosaic(name, q, k, v, plans, text_len, text_first, cudnn_ms, cudnn_out)
    if args.fp8:
        bench_fp8(name, q, k, v, text_len, text_first, cudnn_ms)
    del cudnn_out
    if args.jax_mgpu:
        bench_jax_mgpu(name, q, k, v, text_len, text_first)

    # Ours, default config.
    full_ms = None
    for plan, hw in plans.items() if triton else ():
        cost = pk.plan_cost(
            hw, batch=batch, tokens=tokens, text_len=text_len, text_first=text_first, head_dim=d, block_q=bq, block_k=bk
        )
        tile_flops = int(cost.total_tile_flops)
        hwj = jnp.asarray(hw)
        variants = [("ours", dict(cache=(hw == 0).any()))]
        if plan in ("full", "arrow8") and args.loop_variants:
            variants.append(("ours-2loops", dict(cache=False, single_loop=not DEFAULT.single_loop)))
        if plan in ("mixed", "mixed2"):
            variants += [
                ("ours-sorted" if not DEFAULT.sort_heads else "ours-unsorted",
                 dict(cache=True, sort_heads=not DEFAULT.sort_heads))
            ]
        if plan == "mixed":
            variants += [("ours-nodonate", dict(cache=True, donate=False))]
        if plan in ("mixed", "cached"):
            variants.append(("ours-unrolled16", dict(cache=True, unrolled=16)))
        if args.quick:
            variants = variants[:1]
        for impl, opt in variants:
            try:
                if opt.get("unrolled"):
                    f = ours_unrolled(tokens, text_len, text_first, bq, bk, nw, ns, n=opt["unrolled"])
                    ms, lo, hi, n = time_jax(f, (q, k, v, hwj, jnp.copy(cache)), chain=4)
                    ms, lo, hi = (x / opt["unrolled"] for x in (ms, lo, hi))
                elif opt["cache"]:
                    f = ours_fn(
                        tokens,
                        text_len,
                        text_first,
                        bq,
                        bk,
                        nw,
                        ns,
                        **{a: b for a, b in opt.items() if a != "cache"},
                        cache=True,
                    )
                    c0 = jnp.copy(cache)
                    if opt.get("donate", True):
                        ms, lo, hi, n = time_jax(f, (q, k, v, hwj, c0), chain=4)
                    else:
                        ms, lo, hi, n = time_jax(f, (q, k, v, hwj, c0))
                else:
                    f = ours_fn(tokens, text_len, text_first, bq, bk, nw, ns, **opt)
                    ms, lo, hi, n = time_jax(f, (q, k, v, hwj))
            except Exception as ex:
                log(f"{name} {plan} {impl} FAILED: {type(ex).__name__}: {str(ex)[:800]}")
                continue
            tfl = tile_flops / ms / 1e9 if tile_flops else 0.0
            rec = dict(
                shape=name,
                plan=plan,
                impl=impl,
                ms=ms,
                lo=lo,
                hi=hi,
                n=n,
                block_q=bq,
                block_k=bk,
                num_warps=nw,
                num_stages=ns,
                tile_fraction=float(cost.tile_fraction),
                flop_fraction=float(cost.flop_fraction),
                tile_tflops=tfl,
                speedup_vs_cudnn=(cudnn_ms / ms) if cudnn_ms else None,
            )
            if plan == "full" and impl == "ours":
                full_ms = ms
            if full_ms is not None:
                rec["predicted_ms"] = full_ms * float(cost.tile_fraction)
            record(**rec)
            log(
                f"{name} {plan:8s} {impl:14s}: {ms:8.3f} ms [{lo:.3f}-{hi:.3f} n={n}] "
                f"tiles {cost.tile_fraction:6.1%} {tfl:5.0f} TFLOP/s(tiles)"
                + (f" x{cudnn_ms / ms:.2f} vs cudnn" if cudnn_ms else "")
                + (f" pred {rec['predicted_ms']:.3f}" if "predicted_ms" in rec else "")
            )

    # Sweep.
    for cfg in sweep_cfgs:
        if elapsed() > args.budget_s * 0.6:
            log(f"sweep {name}: skipped (time)")
            break
        sbq, sbk, snw, sns, single = cfg
        for plan in ("full", "arrow8"):
            hw = plans[plan]
            try:
                cost = pk.plan_cost(
                    hw,
                    batch=batch,
                    tokens=tokens,
                    text_len=text_len,
                    text_first=text_first,
                    head_dim=d,
                    block_q=sbq,
                    block_k=sbk,
                )
                f = ours_fn(tokens, text_len, text_first, sbq, sbk, snw, sns, cache=False, single_loop=single)
                ms, lo, hi, n = time_jax(f, (q, k, v, jnp.asarray(hw)), reps=5)
            except Exception as ex:
                log(f"sweep {name} {plan} {cfg} FAILED: {type(ex).__name__}: {str(ex)[:300]}")
                continue
            tfl = int(cost.total_tile_flops) / ms / 1e9
            record(
                shape=name,
                plan=plan,
                impl="sweep",
                ms=ms,
                lo=lo,
                hi=hi,
                block_q=sbq,
                block_k=sbk,
                num_warps=snw,
                num_stages=sns,
                single_loop=single,
                tile_fraction=float(cost.tile_fraction),
                tile_tflops=tfl,
            )
            log(
                f"sweep {name} {plan:7s} bq={sbq:3d} bk={sbk:3d} w={snw} s={sns} "
                f"{'1loop' if single else '2loops'}: "
                f"{ms:8.3f} ms tiles {cost.tile_fraction:6.1%} {tfl:5.0f} TFLOP/s"
            )

    return dict(q=q, k=k, v=v, plans=plans, tokens=tokens, bq=bq, bk=bk)


def flex_block_mask(vis, tokens, bq, bk, device, FB=128):
    """FlexAttention BlockMask (FBxFB blocks) computing our kernel's function.

    ``vis``: bool [H, n_q, n_k] tile-visit matrix of our schedule.  A Flex block
    is *full* when every token pair in it is attended (no mask_mod call),
    *partial* when some are (mask_mod looks our tiles up), absent otherwise.
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    heads = vis.shape[0]
    nqb = nkb = -(-tokens // FB)
    vis_t = torch.as_tensor(vis, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return vis_t[h, q_idx // bq, kv_idx // bk]

    qi = np.minimum(np.arange(nqb * FB), tokens - 1) // bq
    ki = np.minimum(np.arange(nkb * FB), tokens - 1) // bk
    blk_any = np.zeros((heads, nqb, nkb), bool)
    blk_all = np.zeros((heads, nqb, nkb), bool)
    for h in range(heads):
        tm = vis[h][qi][:, ki].reshape(nqb, FB, nkb, FB)
        blk_any[h] = tm.any((1, 3))
        blk_all[h] = tm.all((1, 3))
    partial = blk_any & ~blk_all

    def pack(m):
        m = torch.as_tensor(m, device=device)[None]  # [1, H, nq, nk]
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(blk_all)
    bm = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FB, mask_mod=mask_mod, seq_lengths=(tokens, tokens)
    )
    return bm, int(blk_any.sum()), int(partial.sum())


def bench_flex(name, st):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    batch, text_len, n_img, heads, d, text_first = SHAPES[name]
    tokens, bq, bk = st["tokens"], st["bq"], st["bk"]
    flex = torch.compile(flex_attention, dynamic=False)

    def to_torch(x):
        try:
            t = torch.from_dlpack(x)
        except Exception:
            t = torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda().to(torch.bfloat16)
        return t.permute(0, 2, 1, 3).contiguous()  # [B, H, T, D]

    qt, kt, vt = (to_torch(st[n]) for n in ("q", "k", "v"))
    for plan in ("arrow8",) if args.quick else ("full", "arrow8", "arrow16", "arrow32", "mixed", "mixed2"):
        if elapsed() > args.budget_s * 0.92:
            log(f"flex {name}: skipped {plan} (time)")
            break
        hw = st["plans"][plan]
        try:
            vis = schedule.tile_visit_matrix(
                hw, tokens=tokens, text_len=text_len, text_first=text_first, block_q=bq, block_k=bk
            )  # [H, nq, nk]
            bm, n_blk, n_partial = flex_block_mask(vis, tokens, bq, bk, "cuda")
            fn = lambda: flex(qt, kt, vt, block_mask=bm)  # noqa: E731
            out = fn()
            torch.cuda.synchronize()
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            rec = dict(
                shape=name, plan=plan, impl="torch-flex-tilemask", ms=ms, flex_blocks=n_blk, flex_partial=n_partial
            )
            # Same function as ours?
            ours = pk.headwise_attention(
                st["q"],
                st["k"],
                st["v"],
                np.where(hw == 0, -1, hw),
                text_len=text_len,
                text_first=text_first,
                band=(bq, bk),
                backend="triton",
            )
            ot = to_torch(ours).float()
            sel = torch.as_tensor(hw != 0, device="cuda")
            e = float((out.float() - ot)[:, sel].norm() / ot[:, sel].norm())
            rec["rel_err_vs_ours"] = e
            record(**rec)
            log(
                f"{name} {plan:8s} torch-flex(tile mask): {ms:8.3f} ms "
                f"(blocks {n_blk} of which partial {n_partial}; "
                f"rel_err vs ours {e:.1e})"
            )
            del out, ours, ot
        except Exception as ex:
            log(f"flex {name} {plan} FAILED: {type(ex).__name__}: {str(ex)[:800]}")
            traceback.print_exc()
    # Token-level arrow_8 mask (as in shared/reference/probe_attention.py).
    if elapsed() < args.budget_s * 0.92:
        try:
            w = n_img // 16

            def arrow(b, h, q_idx, kv_idx):
                if text_first:
                    txt = (q_idx < text_len) | (kv_idx < text_len)
                else:
                    txt = (q_idx >= n_img) | (kv_idx >= n_img)
                return txt | ((q_idx - kv_idx).abs() <= w)

            bm = create_block_mask(arrow, None, None, tokens, tokens, device="cuda")
            fn = lambda: flex(qt, kt, vt, block_mask=bm)  # noqa: E731
            fn()
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            record(shape=name, plan="arrow8", impl="torch-flex-nominal", ms=ms)
            log(f"{name} arrow8   torch-flex(token arrow): {ms:8.3f} ms")
        except Exception as ex:
            log(f"flex nominal {name} FAILED: {type(ex).__name__}: {str(ex)[:500]}")


def table():
    recs = RESULTS["records"]

    def get(shape, plan, impl):
        for r in recs:
            if r["shape"] == shape and r["plan"] == plan and r["impl"] == impl:
                return r
        return None

    lines = [
        "",
        "| shape | plan | tiles | ours ms | TFLOP/s (tiles) | x cuDNN |"
        " Flex (tile mask) ms | Flex / ours | predicted ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        cud = get(shape, "full", "jax-cudnn-dense")
        if cud:
            lines.append(f"| {shape} | cuDNN dense | 100% | {cud['ms']:.3f} | {cud['tflops']:.0f} | 1.00 | | | |")
        for plan in ("full", "arrow8", "arrow16", "arrow32", "mixed", "mixed2", "cached"):
            r = get(shape, plan, "ours")
            if not r:
                continue
            fx = get(shape, plan, "torch-flex-tilemask")
            sp = f"{r['speedup_vs_cudnn']:.2f}" if r.get("speedup_vs_cudnn") else ""
            lines.append(
                f"| {shape} | {plan} | {r['tile_fraction']:.1%} | {r['ms']:.3f} | "
                f"{r['tile_tflops']:.0f} | {sp} | "
                + (f"{fx['ms']:.3f} | {fx['ms'] / r['ms']:.2f}x |" if fx else " | |")
                + (f" {r['predicted_ms']:.3f} |" if "predicted_ms" in r else " |")
            )
    for shape in SHAPES:
        nom = get(shape, "arrow8", "torch-flex-nominal")
        if nom:
            lines.append(f"{shape} arrow8 Flex token-level arrow mask: {nom['ms']:.3f} ms")
    nominal = get("FLUX-2K", "arrow8", "torch-flex-nominal")
    # Goals.
    g = []
    a8 = get("FLUX-2K", "arrow8", "ours")
    fx = get("FLUX-2K", "arrow8", "torch-flex-tilemask")
    if a8:
        ref = min([x["ms"] for x in (fx, nominal) if x] + [1.93])
        g.append(
            f"goal FLUX-2K arrow8 < Flex ({ref:.3f} ms): ours {a8['ms']:.3f} -> {'MET' if a8['ms'] < ref else 'MISSED'}"
        )
    fu = get("FLUX-2K", "full", "ours")
    if fu:
        g.append(
            f"goal FLUX-2K full >= 380 TFLOP/s: {fu['tile_tflops']:.0f} -> "
            f"{'MET' if fu['tile_tflops'] >= 380 else 'MISSED'}"
        )
    for shape in SHAPES:
        mx = get(shape, "mixed", "ours")
        if mx and "predicted_ms" in mx:
            dev = mx["ms"] / mx["predicted_ms"] - 1
            fu_, a8_ = get(shape, "full", "ours"), get(shape, "arrow8", "ours")
            parts = (fu_["ms"] + a8_["ms"]) / 3 if fu_ and a8_ else float("nan")
            g.append(
                f"goal {shape} mixed within 15% of tile prediction: "
                f"{mx['ms']:.3f} vs {mx['predicted_ms']:.3f} ({dev:+.1%}) -> "
                f"{'MET' if abs(dev) <= 0.15 else 'MISSED'}; "
                f"(full + arrow8)/3 = {parts:.3f}"
            )
        m2 = get(shape, "mixed2", "ours")
        if m2 and "predicted_ms" in m2:
            dev = m2["ms"] / m2["predicted_ms"] - 1
            g.append(
                f"goal {shape} mixed2 within 15% of tile prediction: "
                f"{m2['ms']:.3f} vs {m2['predicted_ms']:.3f} ({dev:+.1%}) -> "
                f"{'MET' if abs(dev) <= 0.15 else 'MISSED'}"
            )
        for plan in ("cached", "mixed", "full"):
            un = get(shape, plan, "ours-unrolled16")
            if un:
                g.append(f"{shape} {plan} inside one jit (16 chained calls): {un['ms'] * 1e3:.1f} us per call")
        ca = get(shape, "cached", "ours")
        if ca:
            g.append(f"{shape} all-cached, one dispatch per call: {ca['ms'] * 1e3:.1f} us")
    lines += [""] + g
    return "\n".join(lines)


def backend_table():
    """cuDNN / Triton / every Mosaic GPU variant run, side by side (the last table printed); the default's ratio to
    cuDNN, to Triton and to its tile floor (its own tiles at its all-full time per tile)."""
    recs = RESULTS["records"]

    def rec(shape, plan, impl):
        return next((r for r in recs if r["shape"] == shape and r["plan"] == plan and r["impl"] == impl), None)

    impls = [i for i in MOSAIC_LIST if i != "mosaic_gpu"] + ["mosaic_gpu"]
    lines = ["", "| shape | plan | tiles (mosaic_gpu's) | cuDNN dense ms | triton ms | "
             + " | ".join(f"{i} ms" for i in impls)
             + " | mosaic_gpu x cuDNN | mosaic_gpu / triton speed-up | mosaic_gpu over its tile floor | checks |",
             "|---" * (9 + len(impls)) + "|"]
    for shape in SHAPES:
        cud = rec(shape, "full", "jax-cudnn-dense")
        for plan in ("full", "arrow8", "arrow16", "arrow32", "mixed", "mixed2", "cached"):
            tr, mo = rec(shape, plan, "ours"), rec(shape, plan, "mosaic_gpu")
            variants = [rec(shape, plan, i) for i in impls]
            if not (tr or any(variants)):
                continue
            first = mo or next((r for r in variants if r), None) or tr
            frac = first.get("exec_tile_fraction", first["tile_fraction"])
            f = lambda r: f"{r['ms']:.3f}" if r else ""  # noqa: E731
            checks = [r["checks_ok"] for r in variants if r]
            lines.append(
                f"| {shape} | {plan} | {frac:.1%} | {f(cud) if plan == 'full' else ''} | {f(tr)} | "
                + " | ".join(f(r) for r in variants) + " | "
                + (f"{cud['ms'] / mo['ms']:.2f}" if cud and mo and plan == "full" else "") + " | "
                + (f"{tr['ms'] / mo['ms']:.2f}" if tr and mo else "") + " | "
                + (f"{mo['ms'] / mo['predicted_ms'] - 1:+.1%}" if mo and mo.get("predicted_ms") else "") + " | "
                + (("OK" if all(checks) else "FAIL") if checks else "") + " |")
    bad = [c for c in RESULTS["checks"] if c.get("ok") is False or "error" in c]
    lines.append(f"checks: {len(RESULTS['checks'])} run, {len(bad)} failed"
                 + (": " + "; ".join(f"{c.get('kind')} {c.get('shape', '')} {c.get('plan', '')}" for c in bad[:12])
                    if bad else ""))
    return "\n".join(lines)


# (block_q, block_k, num_warps, num_stages, single_loop); run 1 (2026-11-22)
# swept FLUX-2K and SD3-1K over the first grid, run 2 over the second.
SWEEP_RUN1 = {
    128: [
        (128, 128, 8, 2, True),
        (128, 128, 4, 3, True),
        (128, 64, 8, 3, True),
        (128, 64, 4, 3, True),
        (64, 128, 4, 3, True),
        (64, 64, 4, 3, True),
    ],
    64: [
        (128, 64, 4, 2, True),
        (128, 128, 4, 3, True),
        (128, 128, 8, 3, True),
        (64, 64, 4, 3, True),
        (128, 64, 8, 3, True),
        (64, 128, 4, 3, True),
    ],
}
SWEEP = {
    128: [(128, 128, 8, 2, True), (128, 64, 8, 3, True), (64, 64, 4, 3, True), (64, 128, 8, 3, True)],
    64: [(128, 64, 8, 2, True), (64, 64, 4, 3, True), (64, 64, 4, 3, False), (64, 64, 8, 3, True)],
}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="FLUX-1K,FLUX-2K,SD3-1K")
    ap.add_argument("--sweep", default="", help="comma list of shapes to sweep configs on")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--jax-mgpu", action="store_true",
                    help="also dense float16: cuDNN, jax's attention_mgpu example and ours all-full, same inputs")
    ap.add_argument("--no-small", action="store_true")
    ap.add_argument("--loop-variants", action="store_true", help="also time the other loop structure (full, arrow8)")
    ap.add_argument("--budget-s", type=float, default=520.0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in interpret mode (script test, no GPU)")
    ap.add_argument("--quick", action="store_true", help="plans " + ",".join(QUICK_PLANS) + "; no small checks, "
                    "no Triton variants, Flex arrow8 only")
    ap.add_argument("--backends", default=",".join(BACKEND_LIST), help="ours to run: triton, mosaic_gpu")
    ap.add_argument("--plans", default=",".join(QUICK_PLANS), help="with --quick: the plans to time")
    ap.add_argument("--fp8", action="store_true", help="also FP8 heads (mosaic_gpu): " + ", ".join(FP8_PLANS))
    ap.add_argument("--carried-padding", action="store_true",
                    help="only: shapes not a multiple of 8 tokens called as they are and carried padded (SD3)")
    ap.add_argument("--mosaic-variants", default="default",
                    help="mosaic_gpu launch variants to time: " + ", ".join(MOSAIC_VARIANTS)
                         + " (default: persistent, one program per SM walking the work list; grid: one program per "
                           "work item; the others: one of the default's changes undone, or all: previous)")
    args = ap.parse_args()
    BACKEND_LIST = tuple(b for b in args.backends.split(",") if b)
    MOSAIC_LIST = tuple(MOSAIC_VARIANTS[v][0] for v in args.mosaic_variants.split(",") if v)
    if args.quick:
        args.no_small = True
    if args.cpu_smoke:
        INTERPRET, DENSE_IMPL = True, "xla"
        SHAPES.clear()
        SHAPES.update(
            {
                "FLUX-1K": (1, 64, 192, 3, 128, True),
                "FLUX-2K": (1, 64, 256, 3, 128, True),
                "SD3-1K": (2, 45, 192, 3, 64, False),
            }
        )
        SWEEP[128] = SWEEP[128][:1]
        SWEEP[64] = SWEEP[64][2:3]
        args.no_flex = True
    OUT = args.out
    if OUT:
        os.makedirs(OUT, exist_ok=True)
    env_info()
    if not args.no_small:
        small_checks()
    states = {}
    sweep_shapes = [s for s in args.sweep.split(",") if s]
    for name in args.shapes.split(",") if args.carried_padding else ():
        try:
            bench_carried_padding(name, args.plans.split(","))
        except Exception as ex:
            log(f"{name} carried FAILED: {type(ex).__name__}: {str(ex)[:800]}")
            traceback.print_exc()
        save()
    for name in args.shapes.split(",") if not args.carried_padding else ():
        if elapsed() > args.budget_s * 0.75:
            log(f"{name}: skipped (time)")
            continue
        d = SHAPES[name][4]
        try:
            states[name] = bench_shape(name, args, SWEEP[d] if name in sweep_shapes else [])
        except Exception as ex:
            log(f"{name} FAILED: {type(ex).__name__}: {str(ex)[:800]}")
            traceback.print_exc()
        save()
    if not args.no_flex:
        for name, st in states.items():
            try:
                bench_flex(name, st)
            except Exception as ex:
                log(f"flex {name} FAILED: {type(ex).__name__}: {str(ex)[:800]}")
                traceback.print_exc()
            save()
    log(f"\ntotal {elapsed():.0f}s")
    log(table())
    log(backend_table())
    log(fp8_table())
    log(carried_table())
    save()
