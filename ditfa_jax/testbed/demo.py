"""The main job on an embedded testbed model: calibrate a plan, generate dense and compressed, report.

The default testbed is v2 (SD3 MMDiT with CFG, partly specified captions of up to five textured objects); ``v1``
(FLUX-style, no guidance, up to three plain shapes) stays available. `run_demo` searches a compression plan on training-split captions, generates held-out captions densely and with
the plan from the same noise, and writes into one new folder (atomically: a temp folder renamed at the end):

    plan.json, plan.png       the plan and its heatmap (steps x layers, colour = attention FLOPs kept)
    comparison.png            dense (top row) vs compressed (bottom row), with the captions listed in report.md
    images/*.png              every image, with caption, seed, model and plan in the PNG metadata
    report.md, report.json    FLOPs kept, PSNR / SSIM vs dense, prompt fidelity (detector), timings
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from ditfa_jax.files import atomic_folder
from ditfa_jax.plan_pictures import save_heatmap
from ditfa_jax.testbed.metrics import image_grid, psnr, save_png, ssim
from ditfa_jax.testbed.pipeline import TestbedPipeline
from ditfa_jax.testbed.quality import heldout_scenes

DEFAULT_DELTA = 0.1
DEFAULT_TESTBED = "v2"


def run_demo(out: str | Path, *, testbed: str = DEFAULT_TESTBED, checkpoint: str | Path | None = None,
             prompts: int = 4, calibration_prompts: int = 4, num_steps: int | None = None,
             delta: float = DEFAULT_DELTA, seed: int = 0, overwrite: bool = False, log=print) -> dict:
    """``checkpoint`` (a testbed folder or repo id) overrides ``testbed``'s shipped weights; ``num_steps`` default:
    the testbed's."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if prompts < 1 or calibration_prompts < 1:
        raise ValueError(f"prompts ({prompts}) and calibration prompts ({calibration_prompts}) must be >= 1")
    pipe = TestbedPipeline.from_pretrained(checkpoint or testbed)
    world, detector = pipe.testbed.world, pipe.testbed.detector
    num_steps = num_steps or pipe.testbed.model.DEFAULT_STEPS
    calibration = world.captions(world.sample_scenes(np.random.default_rng(seed), calibration_prompts, split="train"))
    scenes = heldout_scenes(prompts, seed=seed + 1, objects=None, testbed=pipe.testbed.name)
    texts = world.captions(scenes)

    log(f"1/3 searching a plan on {calibration_prompts} training captions, {num_steps} steps, delta {delta}")
    plan = pipe.calibrate(calibration, delta=delta, num_steps=num_steps, seed=seed).plan
    log(f"2/3 generating {prompts} held-out captions, dense")
    start = time.perf_counter()
    dense = pipe(texts, seeds=seed, num_steps=num_steps)
    dense_s = time.perf_counter() - start
    log("3/3 generating the same captions from the same noise with the plan")
    start = time.perf_counter()
    compressed = pipe(texts, seeds=seed, num_steps=num_steps, plan=plan)
    compressed_s = time.perf_counter() - start

    dense_score, comp_score = detector.score(dense, scenes), detector.score(compressed, scenes)
    p_db, s = psnr(compressed, dense), ssim(compressed, dense)
    report = {
        "testbed": pipe.testbed.name, "checkpoint": str(pipe.folder), "guidance_scale": pipe.guidance_scale,
        "steps": num_steps, "delta": delta, "seed": seed,
        "attention_flops_kept": round(plan.flops_kept_fraction(), 4),
        "psnr_db_mean": round(float(np.mean(p_db)), 2), "ssim_mean": round(float(np.mean(s)), 4),
        "fidelity_dense": round(dense_score["object"], 3), "fidelity_compressed": round(comp_score["object"], 3),
        "calibration_seconds": plan.notes["calibration_seconds"],
        "dense_seconds_incl_compile": round(dense_s, 2), "compressed_seconds_incl_compile": round(compressed_s, 2),
        "captions": texts, "calibration_captions": calibration, "device": jax.default_backend(),
    }

    with atomic_folder(out, overwrite=overwrite) as tmp:
        plan.save(tmp / "plan.json")
        save_heatmap(plan, tmp / "plan.png")
        grid = image_grid([dense, compressed], labels=["dense", f"plan ({report['attention_flops_kept']:.0%} kept)"],
                          scale=3)
        save_png(tmp / "comparison.png", grid, {"captions": " | ".join(texts)})
        (tmp / "images").mkdir()
        for kind, images in (("dense", dense), ("compressed", compressed)):
            for i, image in enumerate(images):
                meta = {"caption": texts[i], "seed": str(seed + i), "model": str(pipe.folder), "steps": str(num_steps),
                        "plan": "none" if kind == "dense" else f"plan.json (delta {delta})"}
                save_png(tmp / "images" / f"{i:02d}_{kind}.png", image, meta)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(_markdown(report, p_db, s))
    log(f"attention FLOPs kept {report['attention_flops_kept']:.1%}, PSNR {report['psnr_db_mean']} dB, "
        f"SSIM {report['ssim_mean']}, fidelity {report['fidelity_dense']:.2f} dense / "
        f"{report['fidelity_compressed']:.2f} compressed -> {out}")
    return report


def _timing_caveat(device: str) -> list[str]:
    """On a CPU the head-wise kernel does not run compiled (its XLA reference, or the Pallas kernel in interpret
    mode, stands in), so the demo's times say nothing about speed."""
    if device == "gpu":
        return []
    return [f"These times were taken on a {device.upper()}: there the head-wise attention runs its dense XLA "
            "reference (or the Pallas kernel in interpret mode), not the compiled GPU kernel, so they measure "
            "correctness work, not speed. Speed is measured on a GPU: benchmarks/RESULTS.md.", ""]


def _markdown(report: dict, p_db, s) -> str:
    lines = [
        f"# ditfa-jax demo on the testbed {report['testbed']} model", "",
        f"Plan searched with delta {report['delta']} on {len(report['calibration_captions'])} training captions, "
        f"{report['steps']} steps: attention FLOPs kept **{report['attention_flops_kept']:.1%}** "
        f"(heatmap: plan.png; search took {report['calibration_seconds']} s). CFG scale "
        f"{report['guidance_scale']:g}.", "",
        "| | dense | compressed |", "|---|---|---|",
        f"| prompt fidelity (detector: objects with every attribute the caption names) | "
        f"{report['fidelity_dense']:.3f} "
        f"| {report['fidelity_compressed']:.3f} |",
        f"| seconds (including compilation) | {report['dense_seconds_incl_compile']} | "
        f"{report['compressed_seconds_incl_compile']} |", "",
        *_timing_caveat(report["device"]),
        "| # | caption | PSNR vs dense (dB) | SSIM vs dense |", "|---|---|---|---|",
    ]
    lines += [f"| {i} | {t} | {p:.2f} | {q:.4f} |" for i, (t, p, q) in enumerate(zip(report["captions"], p_db, s))]
    lines += ["", "comparison.png: top row dense, bottom row compressed, in the order above.", ""]
    return "\n".join(lines)
