"""What compression costs on the testbed: prompt fidelity, and dense-vs-compressed image quality over a delta grid.

`prompt_fidelity` scores the model on held-out captions with the world's detector. `quality_sweep` generates the
same captions from the same noise densely and with plans searched at each delta (per (step, layer) MILP, and
optionally the global MILP over the same recorded RSE table with the same total budget), and reports PSNR / SSIM
against the dense images, the detector's fidelity, the attention FLOPs kept and the wall time.
"""

from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm

from ditfa_jax.methods import windows_from_choice
from ditfa_jax.milp import solve_global
from ditfa_jax.plan import CompressionPlan
from ditfa_jax.testbed import detector
from ditfa_jax.testbed.metrics import image_grid, psnr, ssim
from ditfa_jax.testbed.model import DEFAULT_STEPS
from ditfa_jax.testbed.world import SceneBatch, captions, sample_scenes

__all__ = ["heldout_scenes", "prompt_fidelity", "global_plan", "quality_sweep", "comparison_grid", "line_plot"]


def heldout_scenes(n: int, *, seed: int = 1234, objects: int | None = 1) -> SceneBatch:
    """N held-out scenes (captions never trained on); ``objects`` fixes the object count (None: 1 to 3)."""
    rng = np.random.default_rng(seed)
    lo, hi = (1, 3) if objects is None else (objects, objects)
    return sample_scenes(rng, n, split="heldout", min_objects=lo, max_objects=hi)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _batched(pipe, texts, seeds, num_steps, plan, batch_size):
    """Images for `texts`, `batch_size` captions per pipeline call (bounds device memory)."""
    return np.concatenate([pipe(texts[i:i + batch_size], seeds=seeds[i:i + batch_size], num_steps=num_steps,
                                plan=plan) for i in range(0, len(texts), batch_size)])


def prompt_fidelity(pipe, scenes: SceneBatch, *, seeds=0, num_steps: int = DEFAULT_STEPS, plan=None,
                    batch_size: int = 256) -> tuple[dict, np.ndarray]:
    """(detector scores, images) for the scenes' captions; see `detector.score` for the fields."""
    texts = captions(scenes)
    seeds = seeds + np.arange(len(texts)) if np.isscalar(seeds) else np.asarray(seeds)
    images = _batched(pipe, texts, seeds, num_steps, plan, batch_size)
    return detector.score(images, scenes), images


def global_plan(per_layer: CompressionPlan, rse: np.ndarray, saving: np.ndarray) -> CompressionPlan:
    """The global-MILP plan with the per-layer plan's total budget, from the RSE table its calibration recorded.

    Budget: delta for each (step >= 1, layer), summed; step 0 stays full (its RSE is set to infinity).
    """
    rse = np.array(rse, np.float64)
    rse[0] = np.inf
    rse[~np.isfinite(rse)] = np.inf
    steps, layers = rse.shape[:2]
    total = per_layer.delta * (steps - 1) * layers
    saving = np.asarray(saving)
    choice = solve_global(rse, saving.reshape(-1, saving.shape[-1])[0], total, c=per_layer.c)  # same for every head
    windows = windows_from_choice(choice, per_layer.candidates, per_layer.image_tokens)
    return per_layer.replace(head_window=windows, notes={**per_layer.notes, "search": "global MILP",
                                                         "delta_total": total})


# Plan searches the sweep can compare: name -> options of `ditfa_jax.calibrate.calibrate` ("per-layer" is the paper's)
SEARCHES = {
    "per-layer": {},
    "worst-prompt": {"rse_over_prompts": "max"},
    "ramp": {"budget_schedule": "ramp"},
    "worst-prompt+ramp": {"rse_over_prompts": "max", "budget_schedule": "ramp"},
    "hilbert": {"token_order": "hilbert"},
    "morton": {"token_order": "morton"},
    "worst-prompt+hilbert": {"rse_over_prompts": "max", "token_order": "hilbert"},
}


def quality_sweep(pipe, scenes: SceneBatch, calibration_captions: list[str], deltas, *, seeds_per_caption: int = 1,
                  num_steps: int = DEFAULT_STEPS, include_global: bool = True, searches=("per-layer",),
                  batch_size: int = 256, progress: bool = True) -> tuple[list[dict], dict]:
    """Rows of metrics (one per search variant and delta, dense first) and the images by row name.

    ``searches`` names entries of `SEARCHES`; ``include_global`` adds the global MILP over the paper search's
    recorded RSE table. Every caption of ``scenes`` is generated ``seeds_per_caption`` times (seeds 0..k-1 offset
    per caption) from the same noise in every variant. Wall time is the second of two identical generation calls
    (the first compiles).
    """
    unknown = [s for s in searches if s not in SEARCHES]
    if unknown:
        raise ValueError(f"unknown searches {unknown}; expected names from {list(SEARCHES)}")
    texts = [t for t in captions(scenes) for _ in range(seeds_per_caption)]
    targets = SceneBatch.concatenate([scenes[i] for i in range(len(scenes)) for _ in range(seeds_per_caption)])
    seeds = np.arange(len(texts))

    def generate(plan):
        _batched(pipe, texts[:batch_size], seeds[:batch_size], num_steps, plan, batch_size)  # compile
        return _timed(lambda: _batched(pipe, texts, seeds, num_steps, plan, batch_size))

    dense, dense_s = generate(None)
    dense_score = detector.score(dense, targets)
    rows = [dict(search="dense", delta=0.0, flops_kept=1.0, psnr_db=float("inf"), psnr_min_db=float("inf"),
                 ssim=1.0, ssim_min=1.0, fidelity=dense_score["object"], fidelity_size=dense_score["size"],
                 seconds=round(dense_s, 3), calibration_seconds=0.0)]
    images = {"dense": dense}
    bar = tqdm(list(deltas), desc="quality sweep", unit="delta", disable=not progress)
    for delta in bar:
        variants = []
        for search in searches:
            result = pipe.calibrate(calibration_captions, delta=float(delta), num_steps=num_steps, progress=False,
                                    **SEARCHES[search])
            variants.append((search, result.plan))
            if include_global and search == "per-layer":
                variants.append(("global", global_plan(result.plan, result.rse, result.saving)))
        for name, p in variants:
            out, seconds = generate(p)
            score = detector.score(out, targets)
            p_db, s = psnr(out, dense), ssim(out, dense)
            rows.append(dict(search=name, delta=float(delta), flops_kept=round(p.flops_kept_fraction(), 4),
                             psnr_db=float(np.mean(p_db)), psnr_min_db=float(np.min(p_db)),
                             ssim=float(np.mean(s)), ssim_min=float(np.min(s)), fidelity=score["object"],
                             fidelity_size=score["size"], seconds=round(seconds, 3),
                             calibration_seconds=p.notes["calibration_seconds"]))
            images[f"{name} delta={delta:g}"] = out
        bar.set_postfix(kept=f"{rows[-1]['flops_kept']:.2f}")
    return rows, images


def comparison_grid(images: dict[str, np.ndarray], names: list[str], columns: int = 8, scale: int = 2) -> np.ndarray:
    """One row per name (dense first), the first ``columns`` images side by side, upscaled for eyeballing."""
    return image_grid([images[n][:columns] for n in names], labels=names, scale=scale)


def line_plot(series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
              size=(520, 320)):
    """A small line chart (Pillow): each series a list of (x, y) points; returns a PIL image."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 56, 130, 28, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s if np.isfinite(p[1])]
    if not pts:
        draw.text((left, h // 2), f"{title}: no finite values to plot", fill="black")
        return img
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    x0, x1 = min(xs.min(), 0.0), max(xs.max(), 1.0)
    y0, y1 = ys.min(), ys.max()
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-9 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in np.linspace(0, 1, 5):
        x = x0 + frac * (x1 - x0)
        y = y0 + frac * (y1 - y0)
        px, _ = to_px(x, y0)
        _, py = to_px(x0, y)
        draw.text((px - 10, h - bottom + 4), f"{x:.2f}", fill="black")
        draw.text((4, py - 6), f"{y:.3g}", fill="black")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for i, (name, points) in enumerate(series.items()):
        points = sorted((x, y) for x, y in points if np.isfinite(y))
        colour = colours[i % len(colours)]
        px = [to_px(x, y) for x, y in points]
        if len(px) > 1:
            draw.line(px, fill=colour, width=2)
        for x, y in px:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((w - right + 8, top + 16 * i), name, fill=colour)
    draw.text((left, 6), title, fill="black")
    draw.text(((left + w - right) // 2 - 40, h - 18), xlabel, fill="black")
    draw.text((w - right + 8, h - bottom - 14), ylabel, fill="black")
    return img
