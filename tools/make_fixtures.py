#!/usr/bin/env python
"""Build tiny PyTorch/diffusers parity fixtures for the ditfa-jax port.

Run (from the repo root, with the reference venv that has torch + diffusers):

    /work/venv-ref/bin/python tools/make_fixtures.py

Deletes and rewrites everything under tests/fixtures/ (README.md included,
which is generated from the configs below). Fully deterministic: fixed seeds,
fp32 everywhere, single-threaded CPU torch.

Per variant (flux_dev, flux_schnell, sd3, sd35_large, sd35_medium) it writes a
folder in the real diffusers pipeline layout (model_index.json,
transformer/{config.json,*.safetensors}, scheduler/scheduler_config.json) and
a reference.npz with (a) one transformer forward pass, (b) scheduler
sigma/timestep tables, (c) a 4-step sampling run through the real diffusers
pipeline class. It also writes flux_dev_bfl.safetensors (flux_dev weights in
the original Black Forest Labs single-file layout) and verifies it round-trips
exactly through diffusers' own BFL->diffusers converter and from_single_file.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import shutil
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.loaders import single_file_model, single_file_utils  # noqa: E402
from diffusers.pipelines.flux import pipeline_flux  # noqa: E402
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as pipeline_sd3  # noqa: E402
from diffusers.utils import logging as dlogging  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

dlogging.set_verbosity_error()
dlogging.disable_progress_bar()

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
MAX_TOTAL_BYTES = 6 * 1024 * 1024

BATCH = 2
STEP_COUNTS = (1, 4, 28, 50)
SAMPLE_STEPS = 4

# ----------------------------------------------------------------------------
# Variant definitions
# ----------------------------------------------------------------------------
FLUX_BASE = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels x (2x2 packing)
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)
FLUX_SCHED_COMMON = dict(
    num_train_timesteps=1000,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
SD3_BASE = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=24,
    out_channels=4,
    pos_embed_max_size=24,
    qk_norm=None,
    dual_attention_layers=(),
)

FLUX_MODEL_INDEX_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD3_MODEL_INDEX_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

VARIANTS = [
    dict(
        name="flux_dev",
        family="flux",
        seed=1001,
        model=dict(FLUX_BASE, guidance_embeds=True),
        scheduler=dict(FLUX_SCHED_COMMON, shift=3.0, use_dynamic_shifting=True),
        shard_size=None,
        fwd_guidance=(3.5, 5.0),
        sample_guidance_scale=3.5,
    ),
    dict(
        name="flux_schnell",
        family="flux",
        seed=2002,
        model=dict(FLUX_BASE, guidance_embeds=False),
        scheduler=dict(FLUX_SCHED_COMMON, shift=1.0, use_dynamic_shifting=False),
        shard_size="200KB",
        fwd_guidance=None,
        sample_guidance_scale=0.0,
    ),
    dict(
        name="sd3",
        family="sd3",
        seed=3003,
        model=dict(SD3_BASE),
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
        shard_size=None,
        sample_guidance_scale=7.0,
    ),
    dict(
        name="sd35_large",
        family="sd3",
        seed=4004,
        model=dict(SD3_BASE, qk_norm="rms_norm", num_layers=3),
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
        shard_size=None,
        sample_guidance_scale=7.0,
    ),
    dict(
        name="sd35_medium",
        family="sd3",
        seed=5005,
        model=dict(SD3_BASE, qk_norm="rms_norm", num_layers=3, dual_attention_layers=(0, 1)),
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
        shard_size=None,
        sample_guidance_scale=7.0,
    ),
]

# Forward-pass geometry
FLUX_FWD_GRID = (8, 6)  # (height, width) in packed tokens -> S_img = 48
FLUX_FWD_TXT = 7
SD3_FWD_LATENT_HW = (16, 12)  # latent H, W -> 8x6 patch tokens (cropped from the 24x24 pos-embed grid)
SD3_FWD_TXT = 9
# Sampling geometry (pixel sizes, vae_scale_factor = 8)
FLUX_SAMPLE_HW = (64, 96)  # -> latent 8x12 -> packed 4x6 tokens
FLUX_SAMPLE_TXT = 5
SD3_SAMPLE_HW = (64, 128)  # -> latent 8x16 -> 4x8 patch tokens
SD3_SAMPLE_TXT = 11
VAE_SCALE_FACTOR = 8


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Re-initialise every parameter so that nothing is 0 or 1.

    * matrices / conv kernels: N(0, 1/fan_in)  (std 0.06-0.25 here) -> O(1) activations
    * biases: N(0, 0.1^2)
    * RMSNorm (qk-norm) scales: 1 + N(0, 0.25^2)
    Non-persistent / persistent buffers (SD3 pos_embed sincos table) are left untouched.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                val = torch.randn(p.shape, generator=gen) / np.sqrt(fan_in)
            elif name.endswith(".bias"):
                val = torch.randn(p.shape, generator=gen) * 0.1
            elif name.endswith(".weight"):  # norm scales
                val = 1.0 + torch.randn(p.shape, generator=gen) * 0.25
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
            p.copy_(val.to(p.dtype))
        for name, p in model.named_parameters():
            if torch.any(p == 0) or torch.any(p == 1):
                raise RuntimeError(f"parameter {name} has an exact 0 or 1 after randomisation")


def to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind == "f":
        return x.astype(np.float32)
    return x


def stats(a: np.ndarray) -> str:
    return f"std={a.std():.4f} mean={a.mean():+.4f} absmax={np.abs(a).max():.4f}"


def assert_close(name, a, b, atol=0.0):
    a = to_np(a).astype(np.float64)
    b = to_np(b).astype(np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {a.shape} != {b.shape}")
    d = float(np.max(np.abs(a - b))) if a.size else 0.0
    if not d <= atol:
        raise AssertionError(f"{name}: max abs diff {d} > {atol}")
    return d


def check_nontrivial(name, a, min_std=0.05):
    a = to_np(a)
    if not np.all(np.isfinite(a)):
        raise AssertionError(f"{name}: non-finite values")
    if a.std() < min_std:
        raise AssertionError(f"{name}: output looks trivial ({stats(a)})")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_model_index(folder: Path, pipeline_cls: str, components: dict) -> None:
    idx = {"_class_name": pipeline_cls, "_diffusers_version": diffusers.__version__}
    idx.update(components)
    write_json(folder / "model_index.json", idx)


def fresh_scheduler(cfg: dict) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**cfg)


# ----------------------------------------------------------------------------
# Scheduler tables (exactly the pipelines' logic)
# ----------------------------------------------------------------------------
def flux_schedule(sched_cfg: dict, n: int, image_seq_len: int):
    s = fresh_scheduler(sched_cfg)
    sigmas = np.linspace(1.0, 1 / n, n)  # FluxPipeline.__call__ step 5
    mu = pipeline_flux.calculate_shift(
        image_seq_len,
        s.config.get("base_image_seq_len", 256),
        s.config.get("max_image_seq_len", 4096),
        s.config.get("base_shift", 0.5),
        s.config.get("max_shift", 1.15),
    )
    timesteps, _ = pipeline_flux.retrieve_timesteps(s, n, "cpu", sigmas=sigmas, mu=mu)
    return to_np(s.sigmas), to_np(timesteps)


def sd3_schedule(sched_cfg: dict, n: int):
    # StableDiffusion3Pipeline (0.42.1): sigmas=None by default, mu only if
    # scheduler.config.use_dynamic_shifting (False for SD3/SD3.5) -> plain set_timesteps(n).
    s = fresh_scheduler(sched_cfg)
    assert not s.config.get("use_dynamic_shifting", False)
    timesteps, _ = pipeline_sd3.retrieve_timesteps(s, n, "cpu", sigmas=None)
    return to_np(s.sigmas), to_np(timesteps)


# ----------------------------------------------------------------------------
# FLUX
# ----------------------------------------------------------------------------
def build_flux(v, out_dir: Path, gen: torch.Generator):
    model = FluxTransformer2DModel(**v["model"]).eval()
    randomize_(model, gen)
    tdir = out_dir / "transformer"
    kw = {} if v["shard_size"] is None else {"max_shard_size": v["shard_size"]}
    model.save_pretrained(tdir, safe_serialization=True, **kw)
    sched = fresh_scheduler(v["scheduler"])
    sched.save_pretrained(out_dir / "scheduler")
    write_model_index(out_dir, "FluxPipeline", FLUX_MODEL_INDEX_COMPONENTS)
    return model, sched


def flux_reference(v, model, sched, gen):
    cfg = model.config
    data = {}
    H, W = FLUX_FWD_GRID
    S = H * W
    hs = torch.randn(BATCH, S, cfg.in_channels, generator=gen)
    ehs = torch.randn(BATCH, FLUX_FWD_TXT, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(BATCH, cfg.pooled_projection_dim, generator=gen)
    timestep = torch.tensor([0.8125, 0.2371], dtype=torch.float32)
    img_ids = FluxPipeline._prepare_latent_image_ids(BATCH, H, W, "cpu", torch.float32)
    txt_ids = torch.zeros(FLUX_FWD_TXT, 3)
    guidance = None
    if cfg.guidance_embeds:
        guidance = torch.tensor(v["fwd_guidance"], dtype=torch.float32)
    with torch.no_grad():
        out = model(
            hidden_states=hs,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
    data.update(
        hidden_states=hs,
        encoder_hidden_states=ehs,
        pooled_projections=pooled,
        timestep=timestep,
        img_ids=img_ids,
        txt_ids=txt_ids,
        output=out,
    )
    if guidance is not None:
        data["guidance"] = guidance

    # scheduler tables
    for n in STEP_COUNTS:
        sg, ts = flux_schedule(v["scheduler"], n, S)
        data[f"sigmas_n{n}"], data[f"timesteps_n{n}"] = sg, ts
        sg, ts = flux_schedule(v["scheduler"], n, 4096)
        data[f"sigmas_n{n}_seq4096"], data[f"timesteps_n{n}_seq4096"] = sg, ts

    # sampling through the real FluxPipeline (vae/text encoders/tokenizers = None;
    # FluxPipeline then falls back to vae_scale_factor = 8).
    ph, pw = FLUX_SAMPLE_HW
    lh, lw = 2 * (ph // (VAE_SCALE_FACTOR * 2)), 2 * (pw // (VAE_SCALE_FACTOR * 2))
    s_img = (lh // 2) * (lw // 2)
    lat0 = torch.randn(BATCH, s_img, cfg.in_channels, generator=gen)  # packed [B, S, C*4]
    pe = torch.randn(BATCH, FLUX_SAMPLE_TXT, cfg.joint_attention_dim, generator=gen)
    pp = torch.randn(BATCH, cfg.pooled_projection_dim, generator=gen)
    gscale = float(v["sample_guidance_scale"])
    pipe = FluxPipeline(
        scheduler=fresh_scheduler(v["scheduler"]),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == VAE_SCALE_FACTOR
    final = pipe(
        prompt_embeds=pe.clone(),
        pooled_prompt_embeds=pp.clone(),
        latents=lat0.clone(),
        height=ph,
        width=pw,
        num_inference_steps=SAMPLE_STEPS,
        guidance_scale=gscale,
        output_type="latent",
        return_dict=False,
    )[0]
    used_sigmas, used_ts = to_np(pipe.scheduler.sigmas), to_np(pipe.scheduler.timesteps)

    # independent hand-written loop mirroring FluxPipeline.__call__ (sanity check)
    sg_ref, ts_ref = flux_schedule(v["scheduler"], SAMPLE_STEPS, s_img)
    assert_close("flux sample sigmas", used_sigmas, sg_ref)
    assert_close("flux sample timesteps", used_ts, ts_ref)
    s = fresh_scheduler(v["scheduler"])
    c = s.config
    mu = pipeline_flux.calculate_shift(s_img, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    pipeline_flux.retrieve_timesteps(s, SAMPLE_STEPS, "cpu", sigmas=np.linspace(1.0, 1 / SAMPLE_STEPS, SAMPLE_STEPS), mu=mu)
    ids = FluxPipeline._prepare_latent_image_ids(BATCH, lh // 2, lw // 2, "cpu", torch.float32)
    g = torch.full([BATCH], gscale) if cfg.guidance_embeds else None
    lat = lat0.clone()
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            vel = model(
                hidden_states=lat,
                timestep=t.expand(BATCH) / 1000,
                guidance=g,
                pooled_projections=pp,
                encoder_hidden_states=pe,
                txt_ids=torch.zeros(FLUX_SAMPLE_TXT, 3),
                img_ids=ids,
                return_dict=False,
            )[0]
            lat = lat + (s.sigmas[i + 1] - s.sigmas[i]) * vel
    d = assert_close("flux manual loop vs FluxPipeline", lat, final, atol=1e-5)

    data.update(
        sample_latents_init=lat0,
        sample_prompt_embeds=pe,
        sample_pooled=pp,
        sample_height=np.array(ph, dtype=np.int64),
        sample_width=np.array(pw, dtype=np.int64),
        sample_guidance_scale=np.array(gscale, dtype=np.float32),
        sample_num_steps=np.array(SAMPLE_STEPS, dtype=np.int64),
        sample_latents_final=final,
        sample_sigmas=used_sigmas,
        sample_timesteps=used_ts,
    )
    return data, d


# ----------------------------------------------------------------------------
# SD3 / SD3.5
# ----------------------------------------------------------------------------
def build_sd3(v, out_dir: Path, gen: torch.Generator):
    model = SD3Transformer2DModel(**v["model"]).eval()
    randomize_(model, gen)
    model.save_pretrained(out_dir / "transformer", safe_serialization=True)
    sched = fresh_scheduler(v["scheduler"])
    sched.save_pretrained(out_dir / "scheduler")
    write_model_index(out_dir, "StableDiffusion3Pipeline", SD3_MODEL_INDEX_COMPONENTS)
    return model, sched


def sd3_reference(v, model, sched, gen):
    cfg = model.config
    data = {}
    LH, LW = SD3_FWD_LATENT_HW
    hs = torch.randn(BATCH, cfg.in_channels, LH, LW, generator=gen)
    ehs = torch.randn(BATCH, SD3_FWD_TXT, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(BATCH, cfg.pooled_projection_dim, generator=gen)
    timestep = torch.tensor([873.4567, 128.125], dtype=torch.float32)
    with torch.no_grad():
        out = model(
            hidden_states=hs,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=timestep,
            return_dict=False,
        )[0]
    data.update(
        hidden_states=hs,
        encoder_hidden_states=ehs,
        pooled_projections=pooled,
        timestep=timestep,
        output=out,
    )
    for n in STEP_COUNTS:
        data[f"sigmas_n{n}"], data[f"timesteps_n{n}"] = sd3_schedule(v["scheduler"], n)

    ph, pw = SD3_SAMPLE_HW
    lat0 = torch.randn(BATCH, cfg.in_channels, ph // VAE_SCALE_FACTOR, pw // VAE_SCALE_FACTOR, generator=gen)
    pe = torch.randn(BATCH, SD3_SAMPLE_TXT, cfg.joint_attention_dim, generator=gen)
    pp = torch.randn(BATCH, cfg.pooled_projection_dim, generator=gen)
    npe = torch.randn(BATCH, SD3_SAMPLE_TXT, cfg.joint_attention_dim, generator=gen)
    npp = torch.randn(BATCH, cfg.pooled_projection_dim, generator=gen)
    gscale = float(v["sample_guidance_scale"])
    pipe = StableDiffusion3Pipeline(
        transformer=model,
        scheduler=fresh_scheduler(v["scheduler"]),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == VAE_SCALE_FACTOR
    final = pipe(
        prompt_embeds=pe.clone(),
        pooled_prompt_embeds=pp.clone(),
        negative_prompt_embeds=npe.clone(),
        negative_pooled_prompt_embeds=npp.clone(),
        latents=lat0.clone(),
        height=ph,
        width=pw,
        num_inference_steps=SAMPLE_STEPS,
        guidance_scale=gscale,
        output_type="latent",
        return_dict=False,
    )[0]
    used_sigmas, used_ts = to_np(pipe.scheduler.sigmas), to_np(pipe.scheduler.timesteps)

    # independent hand-written loop mirroring StableDiffusion3Pipeline.__call__
    sg_ref, ts_ref = sd3_schedule(v["scheduler"], SAMPLE_STEPS)
    assert_close("sd3 sample sigmas", used_sigmas, sg_ref)
    assert_close("sd3 sample timesteps", used_ts, ts_ref)
    s = fresh_scheduler(v["scheduler"])
    s.set_timesteps(SAMPLE_STEPS)
    lat = lat0.clone()
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            x = torch.cat([lat, lat])
            vel = model(
                hidden_states=x,
                timestep=t.expand(2 * BATCH),
                encoder_hidden_states=torch.cat([npe, pe]),  # [uncond, cond]
                pooled_projections=torch.cat([npp, pp]),
                return_dict=False,
            )[0]
            vu, vc = vel.chunk(2)
            vel = vu + gscale * (vc - vu)
            lat = lat + (s.sigmas[i + 1] - s.sigmas[i]) * vel
    d = assert_close("sd3 manual loop vs StableDiffusion3Pipeline", lat, final, atol=1e-5)

    data.update(
        sample_latents_init=lat0,
        sample_prompt_embeds=pe,
        sample_pooled=pp,
        sample_negative_prompt_embeds=npe,
        sample_negative_pooled=npp,
        sample_height=np.array(ph, dtype=np.int64),
        sample_width=np.array(pw, dtype=np.int64),
        sample_guidance_scale=np.array(gscale, dtype=np.float32),
        sample_num_steps=np.array(SAMPLE_STEPS, dtype=np.int64),
        sample_latents_final=final,
        sample_sigmas=used_sigmas,
        sample_timesteps=used_ts,
    )
    return data, d


# ----------------------------------------------------------------------------
# BFL single-file export of flux_dev + verification
# ----------------------------------------------------------------------------
def diffusers_to_bfl(sd: dict, num_layers: int, num_single_layers: int) -> dict:
    """Exact inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    src = {k: v.clone() for k, v in sd.items()}
    out = {}

    def mv(bfl, dif):
        out[bfl] = src.pop(dif).contiguous()

    def cat(bfl, difs):
        out[bfl] = torch.cat([src.pop(d) for d in difs], dim=0).contiguous()

    def swap_shift_scale(w):  # diffusers [scale, shift] -> BFL [shift, scale]
        scale, shift = w.chunk(2, dim=0)
        return torch.cat([shift, scale], dim=0).contiguous()

    for wb in ("weight", "bias"):
        mv(f"time_in.in_layer.{wb}", f"time_text_embed.timestep_embedder.linear_1.{wb}")
        mv(f"time_in.out_layer.{wb}", f"time_text_embed.timestep_embedder.linear_2.{wb}")
        mv(f"vector_in.in_layer.{wb}", f"time_text_embed.text_embedder.linear_1.{wb}")
        mv(f"vector_in.out_layer.{wb}", f"time_text_embed.text_embedder.linear_2.{wb}")
        if f"time_text_embed.guidance_embedder.linear_1.{wb}" in src:
            mv(f"guidance_in.in_layer.{wb}", f"time_text_embed.guidance_embedder.linear_1.{wb}")
            mv(f"guidance_in.out_layer.{wb}", f"time_text_embed.guidance_embedder.linear_2.{wb}")
        mv(f"txt_in.{wb}", f"context_embedder.{wb}")
        mv(f"img_in.{wb}", f"x_embedder.{wb}")
        for i in range(num_layers):
            d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            mv(f"{b}img_mod.lin.{wb}", f"{d}norm1.linear.{wb}")
            mv(f"{b}txt_mod.lin.{wb}", f"{d}norm1_context.linear.{wb}")
            cat(f"{b}img_attn.qkv.{wb}", [f"{d}attn.to_q.{wb}", f"{d}attn.to_k.{wb}", f"{d}attn.to_v.{wb}"])
            cat(
                f"{b}txt_attn.qkv.{wb}",
                [f"{d}attn.add_q_proj.{wb}", f"{d}attn.add_k_proj.{wb}", f"{d}attn.add_v_proj.{wb}"],
            )
            mv(f"{b}img_mlp.0.{wb}", f"{d}ff.net.0.proj.{wb}")
            mv(f"{b}img_mlp.2.{wb}", f"{d}ff.net.2.{wb}")
            mv(f"{b}txt_mlp.0.{wb}", f"{d}ff_context.net.0.proj.{wb}")
            mv(f"{b}txt_mlp.2.{wb}", f"{d}ff_context.net.2.{wb}")
            mv(f"{b}img_attn.proj.{wb}", f"{d}attn.to_out.0.{wb}")
            mv(f"{b}txt_attn.proj.{wb}", f"{d}attn.to_add_out.{wb}")
        for i in range(num_single_layers):
            d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            mv(f"{b}modulation.lin.{wb}", f"{d}norm.linear.{wb}")
            cat(
                f"{b}linear1.{wb}",
                [f"{d}attn.to_q.{wb}", f"{d}attn.to_k.{wb}", f"{d}attn.to_v.{wb}", f"{d}proj_mlp.{wb}"],
            )
            mv(f"{b}linear2.{wb}", f"{d}proj_out.{wb}")
        mv(f"final_layer.linear.{wb}", f"proj_out.{wb}")
        out[f"final_layer.adaLN_modulation.1.{wb}"] = swap_shift_scale(src.pop(f"norm_out.linear.{wb}"))
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        mv(f"{b}img_attn.norm.query_norm.scale", f"{d}attn.norm_q.weight")
        mv(f"{b}img_attn.norm.key_norm.scale", f"{d}attn.norm_k.weight")
        mv(f"{b}txt_attn.norm.query_norm.scale", f"{d}attn.norm_added_q.weight")
        mv(f"{b}txt_attn.norm.key_norm.scale", f"{d}attn.norm_added_k.weight")
    for i in range(num_single_layers):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        mv(f"{b}norm.query_norm.scale", f"{d}attn.norm_q.weight")
        mv(f"{b}norm.key_norm.scale", f"{d}attn.norm_k.weight")
    if src:
        raise RuntimeError(f"diffusers keys not mapped to BFL: {sorted(src)}")
    return out


def tiny_flux_converter(inner_dim: int):
    """diffusers' own BFL->diffusers converter, made usable for a tiny model.

    diffusers 0.42.1 hard-codes `inner_dim = 3072` (FLUX.1 width) inside
    convert_flux_transformer_checkpoint_to_diffusers, which it uses to split
    single_blocks.N.linear1 into q/k/v/mlp. We re-exec the function's own source
    with only that constant replaced; everything else is diffusers' code.
    """
    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    src = textwrap.dedent(inspect.getsource(fn))
    needle = "inner_dim = 3072"
    if src.count(needle) == 0:
        return fn, False  # a future diffusers may infer it; use as is
    if src.count(needle) != 1:
        raise RuntimeError("unexpected converter source; update tools/make_fixtures.py")
    src = src.replace(needle, f"inner_dim = {inner_dim}")
    ns = dict(vars(single_file_utils))
    exec(compile(src, "<patched convert_flux_transformer_checkpoint_to_diffusers>", "exec"), ns)
    return ns[fn.__name__], True


def make_bfl(flux_dev_dir: Path, model: FluxTransformer2DModel, out_path: Path, ref: dict):
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bfl = diffusers_to_bfl(sd, cfg.num_layers, cfg.num_single_layers)
    save_file(bfl, str(out_path), metadata={"format": "pt"})

    inner = cfg.num_attention_heads * cfg.attention_head_dim
    conv, patched = tiny_flux_converter(inner)

    # 1) call the converter directly on the file contents
    ckpt = load_file(str(out_path))
    n_in = len(ckpt)
    converted = conv(ckpt)
    if ckpt:
        raise RuntimeError(f"BFL keys not consumed by diffusers converter: {sorted(ckpt)}")
    if set(converted) != set(sd):
        raise RuntimeError(
            "BFL round trip key mismatch: missing "
            f"{sorted(set(sd) - set(converted))}, extra {sorted(set(converted) - set(sd))}"
        )
    for k in sd:
        if converted[k].dtype != sd[k].dtype or converted[k].shape != sd[k].shape or not torch.equal(converted[k], sd[k]):
            raise RuntimeError(f"BFL round trip NOT exact for {k}")

    # 2) full FluxTransformer2DModel.from_single_file(..., config=<tiny transformer folder>)
    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    orig_fn = entry["checkpoint_mapping_fn"]
    entry["checkpoint_mapping_fn"] = conv
    try:
        loaded = FluxTransformer2DModel.from_single_file(
            str(out_path), config=str(flux_dev_dir / "transformer"), torch_dtype=torch.float32, local_files_only=True
        ).eval()
    finally:
        entry["checkpoint_mapping_fn"] = orig_fn
    lsd = loaded.state_dict()
    if set(lsd) != set(sd):
        raise RuntimeError("from_single_file key mismatch")
    for k in sd:
        if not torch.equal(lsd[k], sd[k]):
            raise RuntimeError(f"from_single_file weights differ for {k}")
    with torch.no_grad():
        out = loaded(
            hidden_states=torch.from_numpy(ref["hidden_states"]),
            encoder_hidden_states=torch.from_numpy(ref["encoder_hidden_states"]),
            pooled_projections=torch.from_numpy(ref["pooled_projections"]),
            timestep=torch.from_numpy(ref["timestep"]),
            img_ids=torch.from_numpy(ref["img_ids"]),
            txt_ids=torch.from_numpy(ref["txt_ids"]),
            guidance=torch.from_numpy(ref["guidance"]),
            return_dict=False,
        )[0]
    assert_close("from_single_file(BFL) forward vs reference output", out, ref["output"], atol=0.0)
    return n_in, patched


# ----------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------
def fmt_cfg(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=list)


def write_readme(summary: list, bfl_patched: bool):
    lines = [
        "# Parity fixtures (generated — do not edit)",
        "",
        "Made by `/work/venv-ref/bin/python tools/make_fixtures.py` (deletes and rewrites this folder, this README",
        f"included). torch {torch.__version__}, diffusers {diffusers.__version__}, numpy {np.__version__}, CPU, fp32,",
        "1 thread, fixed seeds. Weights are random (tiny configs, no hub access): every parameter is re-initialised",
        "(matrices/conv: normal std 1/sqrt(fan_in); biases: std 0.1; RMSNorm scales: 1 + normal std 0.25), so no",
        "weight is 0 or 1 (asserted) and AdaLN/proj_out layers are not zero;",
        "the SD3 `pos_embed.pos_embed` buffer is diffusers' own sincos table (persistent, saved in the checkpoint).",
        "",
        "## Files",
        "- `<variant>/model_index.json` — like the real repo's (text encoders/tokenizers/VAE are listed but absent).",
        "- `<variant>/transformer/` — `save_pretrained` output (`config.json` + safetensors, fp32).",
        "  `flux_schnell` is sharded (`diffusion_pytorch_model-0000N-of-0000M.safetensors` + `.index.json`).",
        "- `<variant>/scheduler/scheduler_config.json` — `FlowMatchEulerDiscreteScheduler`.",
        "- `<variant>/reference.npz` — float32 (ints are int64 0-d arrays):",
        "  - forward: `hidden_states, encoder_hidden_states, pooled_projections, timestep, output`",
        "    (+ FLUX: `img_ids, txt_ids`, dev only `guidance`). Batch 2, default diffusers attention processor.",
        "    FLUX: packed latents for an 8(h)x6(w) token grid, `timestep` in (0,1) as FluxPipeline passes it",
        "    (model does *1000), `guidance` raw (model does *1000), `img_ids` = `FluxPipeline._prepare_latent_image_ids`.",
        "    SD3: NCHW latents 16x12 (8x6 patches, centre-cropped from the 24x24 pos-embed grid), `timestep` in [0,1000].",
        "  - scheduler: `sigmas_n{1,4,28,50}`, `timesteps_n{...}` (sigmas incl. trailing 0). FLUX: FluxPipeline logic",
        "    (`np.linspace(1, 1/n, n)` + `calculate_shift(seq_len)`), seq_len = 48; `*_seq4096` with seq_len 4096.",
        "    SD3: `scheduler.set_timesteps(n)` exactly as StableDiffusion3Pipeline (no sigmas, no mu).",
        "  - sampling (4 steps, batch 2) through the real `FluxPipeline` / `StableDiffusion3Pipeline` with",
        "    vae/text encoders/tokenizers = None (the pipelines then use vae_scale_factor = 8; nothing else changes),",
        "    given `prompt_embeds`/`pooled_prompt_embeds` (+ SD3 negatives), `latents`, `output_type=\"latent\"`:",
        "    `sample_latents_init, sample_prompt_embeds, sample_pooled, [sample_negative_prompt_embeds,",
        "    sample_negative_pooled], sample_height, sample_width (pixels), sample_guidance_scale, sample_num_steps,",
        "    sample_latents_final, sample_sigmas, sample_timesteps` (the schedule the pipeline used).",
        "    FLUX: 64x96 px -> packed [2, 24, 16] (4x6 tokens). SD3: 64x128 px -> [2, 4, 8, 16]. Each run is also",
        "    checked against a hand-written loop in the script.",
        "- `flux_dev_bfl.safetensors` — the flux_dev weights in the original Black Forest Labs single-file layout",
        "  (fused qkv / linear1, `final_layer.adaLN_modulation.1` in BFL [shift, scale] order), fp32. Verified",
        "  bit-exact through diffusers' `convert_flux_transformer_checkpoint_to_diffusers` and",
        "  `FluxTransformer2DModel.from_single_file(..., config=flux_dev/transformer)` (same forward output)."
        + (
            " Note: diffusers hard-codes `inner_dim = 3072` in that converter, so the script re-execs its source"
            " with that one constant set to 32."
            if bfl_patched
            else ""
        ),
        "",
        "## Conventions worth knowing",
        "- FLUX packed channel order is (c, 2, 2) with c slowest (`_pack_latents`); SD3 `proj_out` is (p, q, c), c fastest.",
        "- Joint attention token order: FLUX [text, image]; SD3 [image, text].",
        "- Final `norm_out` (AdaLayerNormContinuous) chunks as [scale, shift]; AdaLayerNormZero as",
        "  [shift, scale, gate, shift_mlp, scale_mlp, gate_mlp] (SD3.5 dual: + [shift2, scale2, gate2]).",
        "- SD3 schedule: endpoints come from the already-shifted training sigmas, then shifted again",
        "  (4 steps -> sigmas 1, .857692, .602151, .008929, 0).",
        "",
        "## Configs",
    ]
    for row in summary:
        lines += [
            f"### {row['name']} (seed {row['seed']})",
            f"- transformer: `{row['cls']}` `{fmt_cfg(row['model'])}`",
            f"- scheduler: `{fmt_cfg(row['scheduler'])}`",
            f"- sample: guidance_scale {row['gs']}, {row['sample_desc']}",
            "",
        ]
    (FIX / "README.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------
def main() -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    keep = {"plans"}  # schema-1 plan files: written by an old version, they cannot be remade
    FIX.mkdir(parents=True, exist_ok=True)
    for entry in FIX.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    print(f"torch {torch.__version__}  diffusers {diffusers.__version__}  numpy {np.__version__}")
    summary = []
    flux_dev = None
    for v in VARIANTS:
        gen = seed_all(v["seed"])
        out_dir = FIX / v["name"]
        if v["family"] == "flux":
            model, sched = build_flux(v, out_dir, gen)
            data, loop_diff = flux_reference(v, model, sched, gen)
            cls = "FluxTransformer2DModel"
            sample_desc = f"{FLUX_SAMPLE_HW[0]}x{FLUX_SAMPLE_HW[1]} px, txt len {FLUX_SAMPLE_TXT}"
            reload_cls = FluxTransformer2DModel
        else:
            model, sched = build_sd3(v, out_dir, gen)
            data, loop_diff = sd3_reference(v, model, sched, gen)
            cls = "SD3Transformer2DModel"
            sample_desc = f"{SD3_SAMPLE_HW[0]}x{SD3_SAMPLE_HW[1]} px, txt len {SD3_SAMPLE_TXT}, CFG with negatives"
            reload_cls = SD3Transformer2DModel
        data = {k: to_np(x) for k, x in data.items()}
        for k, a in data.items():
            if a.dtype.kind == "f" and a.dtype != np.float32:
                raise AssertionError(k)
        check_nontrivial(f"{v['name']} output", data["output"])
        check_nontrivial(f"{v['name']} sample_latents_final", data["sample_latents_final"])
        if np.allclose(data["sample_latents_final"], data["sample_latents_init"], atol=1e-3):
            raise AssertionError("sampling did not move the latents")
        np.savez(out_dir / "reference.npz", **data)

        # reload from disk (incl. sharded) and re-check the forward output bit-exactly
        reloaded = reload_cls.from_pretrained(out_dir / "transformer", torch_dtype=torch.float32).eval()
        for k, t in model.state_dict().items():
            if not torch.equal(reloaded.state_dict()[k], t):
                raise RuntimeError(f"{v['name']}: saved weights differ for {k}")
        kw = dict(
            hidden_states=torch.from_numpy(data["hidden_states"]),
            encoder_hidden_states=torch.from_numpy(data["encoder_hidden_states"]),
            pooled_projections=torch.from_numpy(data["pooled_projections"]),
            timestep=torch.from_numpy(data["timestep"]),
            return_dict=False,
        )
        if v["family"] == "flux":
            kw.update(img_ids=torch.from_numpy(data["img_ids"]), txt_ids=torch.from_numpy(data["txt_ids"]))
            if "guidance" in data:
                kw["guidance"] = torch.from_numpy(data["guidance"])
        with torch.no_grad():
            assert_close(f"{v['name']} reload forward", reloaded(**kw)[0], data["output"])

        print(f"\n[{v['name']}] {cls}  params={sum(p.numel() for p in model.parameters())}")
        print(f"  output {data['output'].shape}: {stats(data['output'])}")
        print(f"  sample_latents_final {data['sample_latents_final'].shape}: {stats(data['sample_latents_final'])}")
        print(f"  manual-loop vs pipeline max|diff| = {loop_diff:.3g}")
        print(f"  sample_sigmas    {np.array2string(data['sample_sigmas'], precision=6)}")
        print(f"  sample_timesteps {np.array2string(data['sample_timesteps'], precision=4)}")
        for k in sorted(data):
            print(f"    {k:34s} {str(data[k].dtype):8s} {data[k].shape}")
        summary.append(
            dict(
                name=v["name"],
                seed=v["seed"],
                cls=cls,
                model=dict(model.config),
                scheduler=v["scheduler"],
                gs=v["sample_guidance_scale"],
                sample_desc=sample_desc,
            )
        )
        if v["name"] == "flux_dev":
            flux_dev = (model, out_dir, data)

    model, out_dir, data = flux_dev
    bfl_path = FIX / "flux_dev_bfl.safetensors"
    n_keys, patched = make_bfl(out_dir, model, bfl_path, data)
    print(f"\n[flux_dev_bfl] {n_keys} BFL tensors; diffusers converter + from_single_file round trip: EXACT"
          + (" (converter inner_dim patched 3072->32)" if patched else ""))

    for row in summary:  # JSON-friendly config dumps (drop private keys)
        row["model"] = {k: (list(x) if isinstance(x, tuple) else x) for k, x in row["model"].items() if not k.startswith("_")}
    write_readme(summary, patched)

    total = 0
    print("\nfiles:")
    for p in sorted(FIX.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.stat().st_size:>9d}  {p.relative_to(FIX)}")
    print(f"total {total} bytes ({total / 2**20:.2f} MiB)")
    if total > MAX_TOTAL_BYTES:
        raise RuntimeError("fixtures exceed 6 MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
