"""Quality on the trained testbeds: prompt fidelity, realism checks, and quality against cost for every method.

1. ``--fidelity N``: the dense model on N held-out single-object and N held-out multi-object captions (one seed
   each); the world's detector scores what each caption mentions. Writes ``fidelity_{single,multi}.png``.
2. ``--guidance 1,2,4``: (v2) fidelity and Fréchet distance of the dense model at each CFG scale.
3. ``--realism``: (a) dense with 1/2 and 1/4 of the steps against full steps (PSNR / SSIM against full steps,
   Fréchet distance to ground-truth renders, fidelity); (b) attention structure per head (share of image-query
   attention inside the arrow_8 band, step-to-step similarity of each head's output; ``attention_heads.png``);
   (c) dense fidelity on held-out captions of 2+ objects with every attribute mentioned.
4. ``--sweep``: held-out captions x seeds, dense, dense with fewer steps (the plain baseline at equal cost) and
   plans searched at each delta, from the same noise; cost = a FLUX.1-dev-sized step's measured time
   (`ditfa_jax.cost_model`); ``quality_{psnr,fidelity,frechet}.png`` put every method's quality-vs-cost curve
   on one set of axes with the fewer-steps curve; ``--choose-at`` adds, at each cost, the plan of least error on
   the calibration captions among every search's plans within it.

Rows go to $OUT/bench_testbed.jsonl (or --out-dir) as they come; a table is printed last.

    python benchmarks/bench_testbed.py --testbed v2 --realism --sweep
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from ditfa_jax.testbed.features import frechet_score, load_feature_net
from ditfa_jax.testbed.metrics import image_grid, psnr, save_png, ssim
from ditfa_jax.testbed.pipeline import TestbedPipeline
from ditfa_jax.testbed.quality import (SEARCHES, attention_structure, comparison_grid, heldout_scenes, line_plot,
                                       prompt_fidelity, quality_sweep)
from ditfa_jax.testbed.testbeds import get_testbed

ROWS = []


def record(out_dir: Path, **row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(out_dir / "bench_testbed.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def feature_net(testbed, folder):
    """The Fréchet feature network in ``folder``, else the testbed's shipped one, else None (no Fréchet column)."""
    path = Path(folder) if folder else testbed.feature_net
    return load_feature_net(path) if path is not None and (folder or path.is_dir()) else None


def frechet(net, images, reference):
    return None if net is None else round(frechet_score(net, images, reference).distance, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", default="v1", choices=("v1", "v2"), help="which world and shipped weights")
    parser.add_argument("--checkpoint", help="testbed folder (default: the testbed's shipped weights)")
    parser.add_argument("--features", help="feature-network folder for the Fréchet score (default: shipped)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "outputs/bench_testbed"))
    parser.add_argument("--steps", type=int, help="denoising steps (default: the testbed's)")
    parser.add_argument("--fidelity", type=int, default=0, help="held-out captions per fidelity set (0: skip)")
    parser.add_argument("--guidance", help="comma-separated CFG scales to compare (v2)")
    parser.add_argument("--realism", action="store_true", help="run the realism checks (a), (b), (c)")
    parser.add_argument("--fp8", action="store_true",
                        help="FP8 linear layers (ditfa_jax.fp8) against the model's own dtype, dense, on "
                             "--realism-captions held-out captions")
    parser.add_argument("--fp8-roles", action="store_true",
                        help="which layers FP8 hurts: each layer role (to_q, ff/net_2, ... over every stack) alone "
                             "in FP8 against the model's own dtype, on --realism-captions held-out captions")
    parser.add_argument("--realism-captions", type=int, default=256)
    parser.add_argument("--sweep", action="store_true", help="run the quality-vs-cost sweep")
    parser.add_argument("--captions", type=int, default=64, help="held-out captions in the sweep")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per caption in the sweep")
    parser.add_argument("--calibration", type=int, default=8, help="training captions for the plan search")
    parser.add_argument("--deltas", default="0.02,0.05,0.1,0.2,0.4,0.8")
    parser.add_argument("--fewer-steps", default="15,12,10,8,6,5",
                        help="step counts of the fewer-steps baseline (empty: none)")
    parser.add_argument("--base-steps", default="",
                        help="with --sweep: step counts below --steps on which every search also runs (a method on "
                             "top of fewer steps), e.g. 14,10")
    parser.add_argument("--cost-model", default="h200-flux-dev-1024", help="ditfa_jax.cost_model name")
    parser.add_argument("--head-deltas", default="",
                        help="with --sweep: comma-separated head budgets of the searches that spend a head and a step "
                             "budget (taylor+heads, unified), each with every --deltas as the step budget")
    parser.add_argument("--no-global", action="store_true", help="skip the global-MILP variant")
    parser.add_argument("--no-timing", action="store_true",
                        help="generate each sweep row once (no timed second call): for CPUs, where times mean nothing")
    parser.add_argument("--gates", default="",
                        help="dynamic-gate rows in the sweep: comma-separated FIRST_BLOCKS:THRESHOLD, e.g. 1:0.05,1:0.1")
    parser.add_argument("--choose-at", default="",
                        help="comma-separated costs: rows of the least-error plan over every search's plans there")
    parser.add_argument("--price-at-cost-model", action="store_true",
                        help="with --sweep: every search prices its candidates at --cost-model's layout (searches "
                             "with the candidate fp8 always do)")
    parser.add_argument("--searches", default="per-layer",
                        help=f"comma-separated plan searches to compare, from {list(SEARCHES)}")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    testbed = get_testbed(args.testbed)
    pipe = TestbedPipeline.from_pretrained(args.checkpoint or args.testbed)
    world = testbed.world
    steps = args.steps or testbed.model.DEFAULT_STEPS
    device = str(jax.devices()[0].device_kind)
    features = feature_net(testbed, args.features)
    common = dict(testbed=testbed.name, steps=steps, device=device, guidance_scale=pipe.guidance_scale)

    if args.fidelity:
        sets = [("single", 1, {}), ("multi", None, {})]
        sets += [("all mentioned", None, {"mention": "all"})] if testbed.name == "v2" else []
        for name, objects, options in sets:
            scenes = heldout_scenes(args.fidelity, seed=99 if objects else 98, objects=objects,
                                    testbed=testbed.name, **options)
            start = time.perf_counter()
            score, images = prompt_fidelity(pipe, scenes, seeds=0, num_steps=steps)
            seconds = time.perf_counter() - start
            record(out_dir, kind="fidelity", set=name, captions=len(scenes), seconds_incl_compile=round(seconds, 2),
                   **common, **{k: round(v, 4) for k, v in score.items()})
            save_png(out_dir / f"fidelity_{name.replace(' ', '_')}.png", image_grid([images[:8], images[8:16]], scale=2),
                     {"captions": " | ".join(world.captions(scenes[np.arange(min(16, len(scenes)))]))})

    if args.fp8:
        from ditfa_jax.fp8 import quantize_transformer

        scenes = heldout_scenes(args.realism_captions, seed=41, objects=None, testbed=testbed.name)
        truth = world.render_scenes(scenes)
        fp8 = pipe.with_transformer(quantize_transformer(pipe.transformer))
        base_score, base = prompt_fidelity(pipe, scenes, seeds=0, num_steps=steps)
        score, images = prompt_fidelity(fp8, scenes, seeds=0, num_steps=steps)
        record(out_dir, kind="fp8", captions=len(scenes), **common, dtype=str(pipe.transformer.dtype),
               psnr_vs_base_db=round(float(np.mean(psnr(images, base))), 2),
               ssim_vs_base=round(float(np.mean(ssim(images, base))), 4),
               fidelity_base=round(base_score["object"], 4), fidelity=round(score["object"], 4),
               frechet_base=frechet(features, base, truth), frechet=frechet(features, images, truth))

    if args.fp8_roles:
        from ditfa_jax.fp8 import layer_roles, quantize_transformer

        scenes = heldout_scenes(args.realism_captions, seed=41, objects=None, testbed=testbed.name)
        base_score, base = prompt_fidelity(pipe, scenes, seeds=0, num_steps=steps)
        for role, names in [("all", None)] + sorted(layer_roles(pipe.transformer.module()).items()):
            quantised = pipe.with_transformer(quantize_transformer(pipe.transformer, layers=names))
            score, images = prompt_fidelity(quantised, scenes, seeds=0, num_steps=steps)
            record(out_dir, kind="fp8_role", role=role, captions=len(scenes), **common,
                   psnr_vs_base_db=round(float(np.mean(psnr(images, base))), 2),
                   ssim_vs_base=round(float(np.mean(ssim(images, base))), 4),
                   fidelity_base=round(base_score["object"], 4), fidelity=round(score["object"], 4))

    if args.guidance:
        scenes = heldout_scenes(args.realism_captions, seed=11, objects=None, testbed=testbed.name)
        truth = world.render_scenes(scenes)
        for scale in (float(g) for g in args.guidance.split(",")):
            score, images = prompt_fidelity(pipe, scenes, seeds=0, num_steps=steps, guidance_scale=scale)
            record(out_dir, kind="guidance", scale=scale, captions=len(scenes), **common,
                   fidelity=round(score["object"], 4),
                   frechet=frechet(features, images, truth))

    if args.realism:
        scenes = heldout_scenes(args.realism_captions, seed=21, objects=None, testbed=testbed.name)
        truth = world.render_scenes(scenes)
        full = None
        for n in (steps, steps // 2, steps // 4):
            score, images = prompt_fidelity(pipe, scenes, seeds=0, num_steps=n)
            full = images if full is None else full
            record(out_dir, kind="realism-steps", run_steps=n, captions=len(scenes), **common,
                   psnr_vs_full_db=round(float(np.mean(psnr(images, full))), 2),
                   ssim_vs_full=round(float(np.mean(ssim(images, full))), 4), fidelity=round(score["object"], 4),
                   frechet=frechet(features, images, truth))
        structure = attention_structure(pipe, world.captions(scenes[np.arange(8)]), num_steps=steps)
        mass, similarity = structure["band_mass"].mean(0), structure["step_similarity"].mean(0)
        np.savez(out_dir / "attention_structure.npz", **structure)
        for layer in range(mass.shape[0]):
            record(out_dir, kind="realism-heads", layer=layer, **common,
                   band_mass=[round(float(m), 3) for m in mass[layer]],
                   step_similarity=[round(float(s), 4) for s in similarity[layer]])
        line_plot({f"layer {i}": list(zip(mass[i].tolist(), similarity[i].tolist())) for i in range(len(mass))},
                  title="heads: attention inside arrow_8 vs step-to-step similarity", xlabel="mass in arrow_8",
                  ylabel="similarity", lines=False).save(out_dir / "attention_heads.png")
        multi = heldout_scenes(args.realism_captions, seed=31, objects=None, testbed=testbed.name,
                               **({"mention": "all"} if testbed.name == "v2" else {}))
        multi = multi[np.flatnonzero(multi.num_objects >= 2)]
        score, _ = prompt_fidelity(pipe, multi, seeds=0, num_steps=steps)
        record(out_dir, kind="realism-fidelity", set="held-out, 2+ objects, all mentioned", captions=len(multi),
               **common, **{k: round(v, 4) for k, v in score.items()})

    if args.sweep:
        scenes = heldout_scenes(args.captions, seed=7, objects=None, testbed=testbed.name)
        calibration = world.captions(world.sample_scenes(np.random.default_rng(3), args.calibration, split="train"))
        deltas = [float(d) for d in args.deltas.split(",") if d]
        fewer = [int(n) for n in args.fewer_steps.split(",") if n]
        rows, images = quality_sweep(pipe, scenes, calibration, deltas, seeds_per_caption=args.seeds,
                                     num_steps=steps, include_global=not args.no_global,
                                     searches=args.searches.split(","), fewer_steps=fewer,
                                     base_steps=[int(n) for n in args.base_steps.split(",") if n],
                                     head_deltas=[float(h) for h in args.head_deltas.split(",") if h],
                                     cost_model=args.cost_model, features=features, timed=not args.no_timing,
                                     choose_at=[float(c) for c in args.choose_at.split(",") if c],
                                     price_at_cost_model=args.price_at_cost_model,
                                     gates=[tuple(float(x) for x in g.split(":")) for g in args.gates.split(",") if g])
        for row in rows:
            record(out_dir, kind="quality", captions=len(scenes), seeds=args.seeds, cost_model=args.cost_model,
                   **{**common, **row})  # the row's steps (fewer-steps rows) over the run's
        metrics = [("psnr_db", "PSNR vs dense (dB)"), ("fidelity", "prompt fidelity")]
        metrics += [("frechet", "Frechet distance to renders")] if features is not None else []
        for metric, label in metrics:
            series = {}
            for row in rows:
                if row["search"] != "dense" or metric != "psnr_db":
                    name = "fewer steps" if row["search"] in ("dense", "fewer steps") else row["search"]
                    series.setdefault(name, []).append((row["cost"], row[metric]))
            line_plot(series, title=f"testbed {testbed.name}: {label} vs cost ({args.cost_model})",
                      xlabel="cost (dense = 1)", ylabel=metric).save(out_dir / f"quality_{metric.split('_')[0]}.png")
        names = ["dense"] + [f"dense {n} steps" for n in sorted(set(fewer), reverse=True)[:3]]
        first = args.searches.split(",")[0]
        names += [f"{first} delta={d:g}" for d in deltas]
        save_png(out_dir / "comparison.png", comparison_grid(images, names, columns=8, scale=2),
                 {"captions": " | ".join(world.captions(scenes[np.arange(min(4, len(scenes)))]))})

    print_table()


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def print_table() -> None:
    print("\n| kind | what | steps | FLOPs kept | cost | PSNR dB | SSIM | fidelity | Frechet | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        kind = r["kind"]
        if kind == "fidelity":
            print(f"| fidelity | {r['set']} ({r['captions']}) | {r['steps']} | 1.0 | | | | {r['object']:.3f} | | "
                  f"{r['seconds_incl_compile']} |")
        elif kind == "guidance":
            print(f"| guidance | CFG {r['scale']:g} | {r['steps']} | | | | | {r['fidelity']:.3f} | "
                  f"{_fmt(r['frechet'], '.3f')} | |")
        elif kind == "fp8":
            print(f"| fp8 | FP8 linears vs {r['dtype']} ({r['captions']}) | {r['steps']} | | | {r['psnr_vs_base_db']} | "
                  f"{r['ssim_vs_base']} | {r['fidelity']:.3f} (base {r['fidelity_base']:.3f}) | "
                  f"{_fmt(r['frechet'], '.3f')} (base {_fmt(r['frechet_base'], '.3f')}) | |")
        elif kind == "fp8_role":
            print(f"| fp8 role | {r['role']} alone in FP8 ({r['captions']}) | {r['steps']} | | | "
                  f"{r['psnr_vs_base_db']} | {r['ssim_vs_base']} | {r['fidelity']:.3f} (base {r['fidelity_base']:.3f}) | | |")
        elif kind == "realism-steps":
            print(f"| realism (a) | dense | {r['run_steps']} | 1.0 | | {r['psnr_vs_full_db']} | {r['ssim_vs_full']} | "
                  f"{r['fidelity']:.3f} | {_fmt(r['frechet'], '.3f')} | |")
        elif kind == "realism-heads":
            print(f"| realism (b) | layer {r['layer']}: mass in arrow_8 {r['band_mass']}, similarity "
                  f"{r['step_similarity']} | | | | | | | | |")
        elif kind == "realism-fidelity":
            print(f"| realism (c) | {r['set']} ({r['captions']}) | {r['steps']} | | | | | {r['object']:.3f} | | |")
        else:
            work = (f", {r['steps_skipped']} steps skipped" if r.get("steps_skipped") else "") + (
                f", {r['blocks_cached']:.0%} blocks cached" if r.get("blocks_cached") else "") + (
                f", {r['mlp_cached']:.0%} MLPs cached" if r.get("mlp_cached") else "")
            what = (f"{r['search']} (cost <= {r['max_cost']:g}: {r['chosen']})" if "chosen" in r
                    else f"{r['search']} delta {r['delta']}")
            print(f"| quality | {what}{work} | {r['steps']} | {r['flops_kept']:.3f} | "
                  f"{r['cost']:.3f} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['fidelity']:.3f} | "
                  f"{_fmt(r['frechet'], '.3f')} | {r['seconds']} |")


if __name__ == "__main__":
    main()
