#!/usr/bin/env python
"""Build tiny PyTorch/diffusers parity fixtures for the ditfa-jax AutoencoderKL (SD3 / FLUX VAE).

Run (from the repo root, with the reference venv that has torch + diffusers):

    /work/venv-ref/bin/python tools/make_vae_fixtures.py

Deletes and rewrites tests/fixtures/vae/ (README.md included). Deterministic: fixed seeds, fp32, one CPU thread.
Per variant it writes `<name>/config.json + diffusion_pytorch_model.safetensors` (diffusers' `save_pretrained`, the
real `vae/` folder layout) and `<name>/reference.npz` (see the README this script writes). Note that
`tools/make_fixtures.py` deletes all of tests/fixtures/: rerun this script after it.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import diffusers  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.pipelines.flux import pipeline_flux, pipeline_flux_img2img  # noqa: E402
from diffusers.pipelines.stable_diffusion import (  # noqa: E402
    pipeline_stable_diffusion,
    pipeline_stable_diffusion_img2img,
)
from diffusers.pipelines.stable_diffusion_3 import (  # noqa: E402
    pipeline_stable_diffusion_3,
    pipeline_stable_diffusion_3_img2img,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "vae"
MAX_TOTAL_BYTES = 3 * 1024 * 1024
BATCH, HEIGHT, WIDTH = 2, 64, 48  # non-square, so a height/width mix-up cannot pass

VARIANTS = [
    dict(name="flux", seed=601,
         note="FLUX.1-like: 16 latent channels, no quant convs, FLUX scaling/shift",
         config=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=16,
                     use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
                     sample_size=64)),
    dict(name="sd3_no_mid_attention", seed=602,
         note="SD3-like (16 channels, no quant convs, SD3 scaling/shift), mid_block_add_attention=False, "
              "2 resnets per encoder block",
         config=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=16,
                     use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
                     mid_block_add_attention=False, sample_size=64)),
    dict(name="quant_conv", seed=603,
         note="classic SD-style: 4 latent channels, quant_conv + post_quant_conv, scaling 0.18215, no shift_factor",
         config=dict(block_out_channels=(8, 16, 16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                     use_quant_conv=True, use_post_quant_conv=True, scaling_factor=0.18215, sample_size=64)),
]


def block_types(n: int) -> dict:
    return dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter away from diffusers' defaults (no 0/1 norms or biases, no identity path)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:  # GroupNorm scale
                p.copy_(1.0 + 0.25 * noise)
            else:  # conv [O, I, kh, kw] or linear [O, I]
                p.copy_(noise / np.sqrt(p[0].numel()))
            assert not torch.any(p == 0) and not torch.any(p == 1), name


def pipeline_expression(module, assignment: str) -> str:
    """The right-hand side of the line of a diffusers pipeline's source that starts with `assignment`."""
    for line in inspect.getsource(module).splitlines():
        if line.strip().startswith(assignment):
            return line.split("=", 1)[1].strip()
    raise RuntimeError(f"{module.__name__}: no line starting with {assignment!r}; diffusers changed its formula")


def scaling_formulas(shifted: bool) -> tuple[str, str]:
    """(to-model, from-model) expressions of `init_latents` / `latents`, exactly as diffusers' pipelines write them."""
    if shifted:
        to_model = pipeline_expression(pipeline_stable_diffusion_3_img2img, "init_latents = (init_latents - ")
        from_model = pipeline_expression(pipeline_stable_diffusion_3, "latents = (latents / ")
        assert to_model.replace("init_latents", "image_latents") == pipeline_expression(
            pipeline_flux_img2img, "image_latents = (image_latents - ")
        assert from_model == pipeline_expression(pipeline_flux, "latents = (latents / ")
        return to_model, from_model
    to_model = pipeline_expression(pipeline_stable_diffusion_img2img, "init_latents = self.vae.config.scaling_factor")
    from_model = pipeline_expression(pipeline_stable_diffusion, "latents = 1 / self.vae.config.scaling_factor")
    return to_model, from_model


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def build(variant: dict) -> dict:
    torch.manual_seed(variant["seed"])
    cfg = dict(variant["config"], **block_types(len(variant["config"]["block_out_channels"])))
    vae = AutoencoderKL(**cfg).eval()
    randomise(vae, variant["seed"])
    folder = OUT / variant["name"]
    vae.save_pretrained(folder, safe_serialization=True)
    reloaded = AutoencoderKL.from_pretrained(folder).eval()

    gen = torch.Generator().manual_seed(variant["seed"] + 1)
    images = torch.rand(BATCH, 3, HEIGHT, WIDTH, generator=gen) * 2 - 1
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    latents = torch.randn(BATCH, cfg["latent_channels"], HEIGHT // f, WIDTH // f, generator=gen)
    with torch.no_grad():
        posterior = reloaded.encode(images).latent_dist
        decoded = reloaded.decode(latents).sample
        assert torch.equal(decoded, vae.decode(latents).sample), "save_pretrained round trip changed the model"

    to_model, from_model = scaling_formulas(cfg.get("shift_factor") is not None)
    scope = {"self": SimpleNamespace(vae=reloaded)}
    model_latents = eval(to_model, scope, {"init_latents": posterior.mean})
    vae_latents = eval(from_model, scope, {"latents": latents})

    ref = dict(images=nhwc(images), mean=nhwc(posterior.mean), logvar=nhwc(posterior.logvar),
               latents=nhwc(latents), decoded=nhwc(decoded),
               model_latents=nhwc(model_latents), vae_latents=nhwc(vae_latents))
    for key in ("mean", "logvar", "decoded"):
        assert ref[key].std() > 1e-2, f"{variant['name']}: reference {key} is degenerate"
    np.savez(folder / "reference.npz", **ref)
    return dict(cfg=json.loads((folder / "config.json").read_text()), to_model=to_model, from_model=from_model)


def write_readme(results: dict) -> None:
    lines = [
        "# VAE parity fixtures (generated — do not edit)",
        "",
        f"Made by `/work/venv-ref/bin/python tools/make_vae_fixtures.py` (deletes and rewrites this folder). "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, numpy {np.__version__}, CPU, fp32, 1 thread, "
        "fixed seeds. Weights are random: conv/linear normal std 1/sqrt(fan_in), biases std 0.1, GroupNorm scales "
        "1 + normal std 0.25 (no weight is 0 or 1; asserted).",
        "",
        "## Files",
        "- `<variant>/config.json`, `<variant>/diffusion_pytorch_model.safetensors`: `AutoencoderKL.save_pretrained` "
        "output, i.e. a pipeline's `vae/` folder (fp32).",
        f"- `<variant>/reference.npz`, float32, all **NHWC** (transposed from torch's NCHW), batch {BATCH}, "
        f"{HEIGHT}x{WIDTH} px:",
        "  - `images` uniform in [-1, 1); `mean`, `logvar`: `vae.encode(images).latent_dist.mean / .logvar` "
        "(logvar clamped to [-30, 20] by diffusers).",
        "  - `latents` standard normal at H/8 x W/8; `decoded`: `vae.decode(latents).sample`.",
        "  - `model_latents`: `mean` scaled into the transformer's space, `vae_latents`: `latents` unscaled for "
        "decoding, each with the expression copied at fixture time from the diffusers pipeline sources (below).",
        "",
        "## Variants",
    ]
    for v in VARIANTS:
        r = results[v["name"]]
        shown = {k: r["cfg"][k] for k in sorted(r["cfg"]) if not k.startswith("_")}
        lines += [f"### {v['name']} (seed {v['seed']})", f"- {v['note']}", f"- config: `{json.dumps(shown)}`",
                  f"- to model: `{r['to_model']}`; from model: `{r['from_model']}`", ""]
    (OUT / "README.md").write_text("\n".join(lines))


def main() -> None:
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    results = {v["name"]: build(v) for v in VARIANTS}
    write_readme(results)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.stat().st_size:>9d}  {p.relative_to(OUT)}")
    print(f"total {total} bytes")
    assert total <= MAX_TOTAL_BYTES, f"fixtures take {total} bytes, over {MAX_TOTAL_BYTES}"


if __name__ == "__main__":
    main()
