"""Prompt fidelity of the trained testbed model, and what compression costs in quality (issue: trained testbed).

1. ``--fidelity N``: the dense model on N held-out single-object captions and N held-out 1-3-object captions (one
   seed each); the world's detector scores colour / shape / region (goal >= 80 % on single objects). Writes
   ``fidelity_single.png`` / ``fidelity_multi.png`` (first 16 images, caption order as in the jsonl).
2. ``--sweep``: held-out captions x seeds generated densely and with plans searched at each delta (per (step,
   layer) MILP and the global MILP with the same total budget) from the same noise: PSNR / SSIM vs dense,
   fidelity, attention FLOPs kept, wall time; ``quality_psnr.png``, ``quality_ssim.png``, ``comparison.png``.

Rows go to $OUT/bench_testbed.jsonl (or --out-dir) as they come; a table is printed last.

    python benchmarks/bench_testbed.py --fidelity 256 --sweep
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from ditfa_jax.testbed.metrics import image_grid, save_png
from ditfa_jax.testbed.model import DEFAULT_STEPS
from ditfa_jax.testbed.pipeline import TestbedPipeline
from ditfa_jax.testbed.quality import SEARCHES, comparison_grid, heldout_scenes, line_plot, prompt_fidelity, quality_sweep
from ditfa_jax.testbed.world import captions, sample_scenes

ROWS = []


def record(out_dir: Path, **row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(out_dir / "bench_testbed.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="testbed folder (default: the shipped weights)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "outputs/bench_testbed"))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--fidelity", type=int, default=0, help="held-out captions per fidelity set (0: skip)")
    parser.add_argument("--sweep", action="store_true", help="run the dense-vs-compressed quality sweep")
    parser.add_argument("--captions", type=int, default=64, help="held-out captions in the sweep (1-3 objects)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per caption in the sweep")
    parser.add_argument("--calibration", type=int, default=8, help="training captions for the plan search")
    parser.add_argument("--deltas", default="0.02,0.05,0.1,0.2,0.4,0.8")
    parser.add_argument("--no-global", action="store_true", help="skip the global-MILP variant")
    parser.add_argument("--searches", default="per-layer",
                        help=f"comma-separated plan searches to compare, from {list(SEARCHES)}")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = TestbedPipeline.from_pretrained(args.checkpoint)
    device = str(jax.devices()[0].device_kind)

    if args.fidelity:
        for name, objects in (("single", 1), ("multi", None)):
            scenes = heldout_scenes(args.fidelity, seed=99 if objects else 98, objects=objects)
            start = time.perf_counter()
            score, images = prompt_fidelity(pipe, scenes, seeds=0, num_steps=args.steps)
            seconds = time.perf_counter() - start
            record(out_dir, kind="fidelity", set=name, captions=len(scenes), steps=args.steps, device=device,
                   seconds_incl_compile=round(seconds, 2), **{k: round(v, 4) for k, v in score.items()})
            save_png(out_dir / f"fidelity_{name}.png", image_grid([images[:8], images[8:16]], scale=2),
                     {"captions": " | ".join(captions(scenes[np.arange(min(16, len(scenes)))]))})

    if args.sweep:
        scenes = heldout_scenes(args.captions, seed=7, objects=None)
        calibration = captions(sample_scenes(np.random.default_rng(3), args.calibration, split="train"))
        deltas = [float(d) for d in args.deltas.split(",")]
        rows, images = quality_sweep(pipe, scenes, calibration, deltas, seeds_per_caption=args.seeds,
                                     num_steps=args.steps, include_global=not args.no_global,
                                     searches=args.searches.split(","))
        for row in rows:
            record(out_dir, kind="quality", captions=len(scenes), seeds=args.seeds, steps=args.steps, device=device,
                   **row)
        for metric, label in (("psnr_db", "PSNR vs dense (dB)"), ("ssim", "SSIM vs dense")):
            series = {}
            for row in rows[1:]:
                series.setdefault(row["search"], []).append((row["flops_kept"], row[metric]))
            line_plot(series, title=f"testbed: {label} vs attention FLOPs kept", xlabel="attention FLOPs kept",
                      ylabel=metric).save(out_dir / f"quality_{metric.split('_')[0]}.png")
        names = ["dense"] + [f"per-layer delta={d:g}" for d in deltas]
        save_png(out_dir / "comparison.png", comparison_grid(images, names, columns=8, scale=2),
                 {"captions": " | ".join(t for t in captions(scenes[np.arange(min(4, len(scenes)))]))})

    print("\n| kind | set / search | delta | FLOPs kept | PSNR dB (min) | SSIM (min) | fidelity | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        if r["kind"] == "fidelity":
            print(f"| fidelity | {r['set']} ({r['captions']}) | | 1.0 | | | {r['object']:.3f} "
                  f"(colour {r['colour']:.3f}, shape {r['shape']:.3f}, size {r['size']:.3f}) | "
                  f"{r['seconds_incl_compile']} |")
        else:
            print(f"| quality | {r['search']} | {r['delta']} | {r['flops_kept']:.3f} | {r['psnr_db']:.2f} "
                  f"({r['psnr_min_db']:.2f}) | {r['ssim']:.4f} ({r['ssim_min']:.4f}) | {r['fidelity']:.3f} | "
                  f"{r['seconds']} |")


if __name__ == "__main__":
    main()
