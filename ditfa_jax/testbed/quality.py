"""What compression costs on the testbed: prompt fidelity, and quality against cost over a grid of methods.

`prompt_fidelity` scores the model on held-out captions with the world's detector. `quality_sweep` generates the
same captions from the same noise densely and with plans searched at each delta (per (step, layer) MILP, and
optionally the global MILP over the same recorded RSE table with the same total budget), and always with the plain
baseline at equal cost: dense with fewer steps. Every row reports its cost (a FLUX.1-dev-sized step's measured time,
`ditfa_jax.cost_model`), PSNR / SSIM against the dense images, the detector's prompt fidelity, the Fréchet distance
to ground-truth renders of the same captions (when the testbed ships a feature network) and the wall time.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ditfa_jax.calibrate import METHOD_FAMILIES, least_error_plan, unified_plan
from ditfa_jax.cost_model import (StepCostModel, attention_kept, gated_cost, get_cost_model, plan_cost,
                                  steps_cost)
from ditfa_jax.denoise import DynamicGate
from ditfa_jax.methods import DEFAULT_CANDIDATES, FP8_WINDOW, windows_from_choice
from ditfa_jax.milp import solve_global
from ditfa_jax.plan import CompressionPlan
from ditfa_jax.testbed.features import frechet_score
from ditfa_jax.testbed.metrics import image_grid, psnr, relative_squared_error, ssim
from ditfa_jax.testbed.model import DEFAULT_STEPS
from ditfa_jax.testbed.testbeds import get_testbed

__all__ = ["heldout_scenes", "prompt_fidelity", "global_plan", "quality_sweep", "comparison_grid", "line_plot"]


def heldout_scenes(n: int, *, seed: int = 1234, objects: int | None = 1, testbed: str = "v1", **options):
    """N held-out scenes (captions never trained on) of a testbed's world; ``objects`` fixes the object count (None:
    1 to the world's maximum); ``options`` go to the world's ``sample_scenes`` (v2: ``mention="all"``)."""
    world = get_testbed(testbed).world
    rng = np.random.default_rng(seed)
    lo, hi = (1, world.MAX_OBJECTS) if objects is None else (objects, objects)
    return world.sample_scenes(rng, n, split="heldout", min_objects=lo, max_objects=hi, **options)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _batched(pipe, texts, seeds, num_steps, plan, batch_size, **options):
    """Images for `texts`, `batch_size` captions per pipeline call (bounds device memory)."""
    return np.concatenate([pipe(texts[i:i + batch_size], seeds=seeds[i:i + batch_size], num_steps=num_steps,
                                plan=plan, **options) for i in range(0, len(texts), batch_size)])


def prompt_fidelity(pipe, scenes, *, seeds=0, num_steps: int = DEFAULT_STEPS, plan=None,
                    batch_size: int = 256, **options) -> tuple[dict, np.ndarray]:
    """(detector scores, images) for the scenes' captions; see the testbed detector's `score` for the fields;
    ``options`` go to the pipeline call (``guidance_scale``)."""
    texts = pipe.testbed.world.captions(scenes)
    seeds = seeds + np.arange(len(texts)) if np.isscalar(seeds) else np.asarray(seeds)
    images = _batched(pipe, texts, seeds, num_steps, plan, batch_size, **options)
    return pipe.testbed.detector.score(images, scenes), images


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


def _heads(**options):
    """A head-wise search: the sweep's budget is the per-(step, layer) head RSE ``delta``."""
    return lambda budget: {"delta": budget, **options}


def _family(name: str, mlp: bool = False):
    """A search of `ditfa_jax.calibrate.METHOD_FAMILIES` with the sweep's one budget as each of its budgets (the
    MLP-branch budget only with ``mlp``)."""
    return lambda budget: METHOD_FAMILIES[name](budget, budget, ALL_BLOCKS, budget if mlp else 0.0)


ALL_BLOCKS = "all"  # block_candidates placeholder: every number of first blocks 1..layers-1 of the model
# Plan searches the sweep can compare: name -> (budget -> options of `ditfa_jax.calibrate.calibrate`). "per-layer"
# is the paper's head-wise search; the step-level ones keep every head full so each method is measured alone;
# "unified" spends one budget on heads and steps together.
SEARCHES = {
    "per-layer": _heads(),
    "per-layer+fp8": _heads(candidates=(*DEFAULT_CANDIDATES, "fp8")),
    "worst-prompt": _heads(rse_over_prompts="max"),
    "ramp": _heads(budget_schedule="ramp"),
    "worst-prompt+ramp": _heads(rse_over_prompts="max", budget_schedule="ramp"),
    "hilbert": _heads(token_order="hilbert"),
    "morton": _heads(token_order="morton"),
    "worst-prompt+hilbert": _heads(rse_over_prompts="max", token_order="hilbert"),
    "step-reuse": _family("reuse"),
    "taylor": _family("taylor"),
    # Taylor with its steps scored before they run, on the first 1 or 2 calibration prompts (`calibrate`'s
    # step_prompts)
    "taylor-on-1-prompt": lambda budget: {**_family("taylor")(budget), "step_prompts": 1},
    "taylor-on-2-prompts": lambda budget: {**_family("taylor")(budget), "step_prompts": 2},
    "block-cache": _family("blocks"),
    "steps+blocks": _family("steps+blocks"),
    "taylor+heads": _family("taylor+heads"),
    "mlp-cache": _family("mlp", mlp=True),
    "taylor+mlp": _family("taylor+mlp", mlp=True),
    "unified": _family("all"),
}
# The same pass as "unified", then every method re-chosen at once for time (`unified_plan`; its options here).
UNIFIED_MILP = {"unified-milp": {}, "unified-milp-cap1": {"max_skips_in_a_row": 1}}
SEARCHES.update({name: SEARCHES["unified"] for name in UNIFIED_MILP})


def _block_budget(options: dict) -> str | None:
    """The per-block budget a search spends beside the step budget: "delta" (heads) or "mlp_delta" (MLP branches)."""
    return next((key for key in ("delta", "mlp_delta") if options.get(key, 0) > 0), None)


def spends_both_budgets(search: str) -> bool:
    """Whether a named search spends a per-block budget (heads or MLP branches) and a step budget (which
    ``head_delta`` can set apart)."""
    options = SEARCHES[search](1.0)
    return _block_budget(options) is not None and options.get("step_delta", 0) > 0


def search_options(search: str, budget: float, num_layers: int, head_delta: float | None = None) -> dict:
    """The `calibrate` options of a named search at one budget, for a model of ``num_layers`` blocks; a search that
    spends both budgets takes ``head_delta`` as its per-block budget (heads, or MLP branches) where given."""
    options = SEARCHES[search](float(budget))
    if head_delta is not None and spends_both_budgets(search):
        options[_block_budget(options)] = float(head_delta)
    if options.get("block_candidates") == ALL_BLOCKS:
        options["block_candidates"] = tuple(range(1, num_layers))
    return options


def plan_work(plan: CompressionPlan | None) -> dict:
    """Steps a plan skips (reuse / Taylor), the share of (computed step, block) pairs it serves from the cache, the
    share of the blocks that run whose MLP branch is cached, and the share of the heads of computed steps in FP8."""
    if plan is None:
        return {"steps_skipped": 0, "blocks_cached": 0.0, "mlp_cached": 0.0, "fp8_heads": 0.0}
    computed = np.asarray(plan.step_kind) == 0
    blocks = np.asarray(plan.block_compute, bool)[computed]
    runs = plan.work_per_step_layer() > 0
    return {"steps_skipped": int((~computed).sum()), "blocks_cached": round(float(1 - blocks.mean()), 4),
            "mlp_cached": round(float(plan.cached_mlps().sum() / max(runs.sum(), 1)), 4),
            "fp8_heads": round(float((plan.head_window[computed] == FP8_WINDOW).mean()), 4)}


def quality_sweep(pipe, scenes, calibration_captions: list[str], deltas, *, seeds_per_caption: int = 1,
                  num_steps: int = DEFAULT_STEPS, include_global: bool = True, searches=("per-layer",),
                  fewer_steps=(), base_steps=(), gates=(), head_deltas=(),
                  cost_model: StepCostModel | str = "h200-flux-dev-1024", features=None, choose_at=(),
                  price_at_cost_model: bool = False, batch_size: int = 256, timed: bool = True,
                  progress: bool = True) -> tuple[list[dict], dict]:
    """Rows of metrics (dense first, then dense with each of ``fewer_steps``, then one per search and delta) and
    the images by row name.

    ``searches`` names entries of `SEARCHES`; ``include_global`` adds the global MILP over the paper search's
    recorded RSE table. ``base_steps``: step counts below ``num_steps`` on which every search also runs (rows
    "<search> on <n> steps": the method on top of fewer steps, its cost relative to dense with all ``num_steps``,
    its PSNR / SSIM against that dense). ``head_deltas``: head budgets of the searches that spend both a head and a
    step budget (`spends_both_budgets`), each a row "<search> heads <h>" with the sweep's budget as the step budget
    (default: the one budget as both). ``gates``: (first_blocks, threshold) pairs, each a row of the dynamic gate
    (`TestbedPipeline.gated`, one caption at a time; its cost `gated_cost`). Every caption of ``scenes`` is
    generated ``seeds_per_caption`` times (seeds 0..k-1 offset per caption) from the same noise in every row.
    ``cost`` is the row's run time relative to dense with all steps under ``cost_model``, and a plan row's
    ``attention_kept_priced`` the attention FLOPs its heads keep where its blocks run, at that model's layout
    (`ditfa_jax.cost_model.attention_kept`). ``features`` (a `ditfa_jax.testbed.features.FeatureNet`, or None to
    skip) gives each row the Fréchet distance of its images to ground-truth renders of the same captions.
    ``choose_at``: costs at which a row "least error over methods" picks, among every plan of the sweep and dense
    with each of ``fewer_steps`` within that cost, the one whose images of the calibration captions are closest to
    dense (`ditfa_jax.calibrate.least_error_plan`; the mean relative squared error over those images), then reports
    that candidate's held-out row; a row "least error over methods (median)" does the same by the median over
    images. Wall time is the second of two identical generation calls (the first compiles); ``timed=False`` makes
    one call (its time includes compilation), which halves the work where times mean nothing (a CPU).
    ``price_at_cost_model``: every search prices its candidates at ``cost_model``'s layout (`calibrate`'s
    ``price_at``) rather than at the testbed's size; a search with the candidate fp8 always does (FP8's time is
    measured at real sizes only).
    """
    unknown = [s for s in searches if s not in SEARCHES]
    if unknown:
        raise ValueError(f"unknown searches {unknown}; expected names from {list(SEARCHES)}")
    for name, counts in (("fewer_steps", fewer_steps), ("base_steps", base_steps)):
        bad = [n for n in counts if not 1 <= int(n) < num_steps]
        if bad:
            raise ValueError(f"{name} {bad}: expected step counts in 1..{num_steps - 1}")
    cost_model = get_cost_model(cost_model) if isinstance(cost_model, str) else cost_model
    world, detector = pipe.testbed.world, pipe.testbed.detector
    texts = [t for t in world.captions(scenes) for _ in range(seeds_per_caption)]
    targets = type(scenes).concatenate([scenes[i] for i in range(len(scenes)) for _ in range(seeds_per_caption)])
    truth = world.render_scenes(targets)
    seeds = np.arange(len(texts))

    def generate(plan, steps=num_steps):
        if timed:
            _batched(pipe, texts[:batch_size], seeds[:batch_size], steps, plan, batch_size)  # compile
        return _timed(lambda: _batched(pipe, texts, seeds, steps, plan, batch_size))

    def row(name, images, seconds, *, delta, steps, kept, cost, calibration_seconds=0.0, plan=None):
        score = detector.score(images, targets)
        p_db, s = psnr(images, dense), ssim(images, dense)
        work = plan_work(plan)
        return dict(search=name, delta=delta, steps=steps, flops_kept=round(kept, 4), cost=round(cost, 4),
                    steps_skipped=work["steps_skipped"], blocks_cached=work["blocks_cached"],
                    mlp_cached=work["mlp_cached"], fp8_heads=work["fp8_heads"],
                    psnr_db=float(np.mean(p_db)), psnr_min_db=float(np.min(p_db)), ssim=float(np.mean(s)),
                    ssim_min=float(np.min(s)), fidelity=score["object"], fidelity_size=score["size"],
                    frechet=None if features is None else round(frechet_score(features, images, truth).distance, 4),
                    seconds=round(seconds, 3), calibration_seconds=calibration_seconds)

    dense, dense_s = generate(None)
    rows = [row("dense", dense, dense_s, delta=0.0, steps=num_steps, kept=1.0, cost=1.0)]
    images = {"dense": dense}
    candidates, rows_by_plan = {}, {}
    calibration_errors = {"mean": {}, "median": {}}  # key -> error, by reduction over the calibration images
    if choose_at:
        calibration_seeds = np.arange(len(calibration_captions))
        calibration_dense = _batched(pipe, calibration_captions, calibration_seeds, num_steps, None, batch_size)

    def candidate(key, plan, steps, cost):
        """A row the least-error rows may choose: scored by its images of the calibration captions."""
        seen = _batched(pipe, calibration_captions, calibration_seeds, steps, plan, batch_size)
        candidates[key], rows_by_plan[key] = cost, rows[-1]
        for reduction, errors in calibration_errors.items():
            errors[key] = relative_squared_error(seen, calibration_dense, reduction)
        rows[-1]["calibration_error"] = round(calibration_errors["mean"][key], 6)
        rows[-1]["calibration_error_median"] = round(calibration_errors["median"][key], 6)

    for n in sorted({int(n) for n in fewer_steps}, reverse=True):
        out, seconds = generate(None, n)
        rows.append(row("fewer steps", out, seconds, delta=0.0, steps=n, kept=1.0, cost=steps_cost(n, num_steps)))
        images[f"dense {n} steps"] = out
        if choose_at:
            candidate(f"dense {n} steps", None, n, steps_cost(n, num_steps))
    layers = pipe.transformer.config.total_layers
    for first_blocks, threshold in gates:
        gate = DynamicGate(first_blocks=int(first_blocks), threshold=float(threshold))
        start = time.perf_counter()
        out, skipped = pipe.gated(texts, gate=gate, seeds=seeds, num_steps=num_steps)
        cost = float(np.mean([gated_cost(s, gate.first_blocks, layers) for s in skipped]))
        name = f"gate F={gate.first_blocks}"
        r = row(name, out, time.perf_counter() - start, delta=gate.threshold, steps=num_steps, kept=1.0, cost=cost)
        r["blocks_cached"] = round(float(skipped[:, 1:].mean()) * (1 - gate.first_blocks / layers), 4)
        rows.append(r)
        images[f"{name} threshold={gate.threshold:g}"] = out
    bar = tqdm(list(deltas), desc="quality sweep", unit="delta", disable=not progress)
    for delta in bar:
        variants = []
        for steps in (num_steps, *sorted({int(n) for n in base_steps}, reverse=True)):
            on = "" if steps == num_steps else f" on {steps} steps"
            for search in searches:
                for head_delta in (head_deltas if head_deltas and spends_both_budgets(search) else (None,)):
                    options = search_options(search, delta, pipe.transformer.config.total_layers, head_delta)
                    if price_at_cost_model or "fp8" in options.get("candidates", ()):
                        options["price_at"] = cost_model.layout
                    result = pipe.calibrate(calibration_captions, num_steps=steps, progress=False, **options)
                    plan = (unified_plan(result, cost_model, **UNIFIED_MILP[search]) if search in UNIFIED_MILP
                            else result.plan)
                    heads = "" if head_delta is None else (f" heads {float(head_delta):g}" if options.get("delta")
                                                           else f" mlp {float(head_delta):g}")
                    variants.append((search + heads + on, plan, head_delta))
                    if include_global and search == "per-layer":
                        variants.append(("global" + on, global_plan(result.plan, result.rse, result.saving), None))
        for name, p, head_delta in variants:
            out, seconds = generate(p, p.num_steps)
            cost = plan_cost(p, cost_model) * p.num_steps / num_steps
            rows.append(row(name, out, seconds, delta=float(delta), steps=p.num_steps, kept=p.flops_kept_fraction(),
                            cost=cost, calibration_seconds=p.notes["calibration_seconds"], plan=p))
            if head_delta is not None:
                rows[-1]["head_delta"] = float(head_delta)
            runs = p.work_per_step_layer() > 0  # the (step, block) pairs that compute
            rows[-1]["attention_kept_priced"] = round(float(attention_kept(p, cost_model)[runs].mean()), 4)
            images[f"{name} delta={delta:g}"] = out
            if choose_at:
                candidate(f"{name} delta={delta:g}", p, p.num_steps, cost)
        bar.set_postfix(kept=f"{rows[-1]['flops_kept']:.2f}")
    for reduction, errors in calibration_errors.items():
        for max_cost in choose_at:
            chosen = least_error_plan(candidates, errors, cost_model, max_cost=float(max_cost))
            name = "least error over methods" + ("" if reduction == "mean" else f" ({reduction})")
            rows.append({**rows_by_plan[chosen], "search": name, "max_cost": float(max_cost), "chosen": chosen})
            images[f"{name}, cost <= {max_cost:g}"] = images[chosen]
    return rows, images


def comparison_grid(images: dict[str, np.ndarray], names: list[str], columns: int = 8, scale: int = 2) -> np.ndarray:
    """One row per name (dense first), the first ``columns`` images side by side, upscaled for eyeballing."""
    return image_grid([images[n][:columns] for n in names], labels=names, scale=scale)


def line_plot(series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
              size=(520, 320), lines: bool = True):
    """A small line chart (Pillow): each series a list of (x, y) points (``lines=False``: a scatter plot); returns
    a PIL image."""
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
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
               (23, 190, 207), (227, 119, 194), (188, 189, 34), (127, 127, 127)]
    for i, (name, points) in enumerate(series.items()):
        points = sorted((x, y) for x, y in points if np.isfinite(y))
        colour = colours[i % len(colours)]
        px = [to_px(x, y) for x, y in points]
        if lines and len(px) > 1:
            draw.line(px, fill=colour, width=2)
        for x, y in px:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((w - right + 8, top + 16 * i), name, fill=colour)
    draw.text((left, 6), title, fill="black")
    draw.text(((left + w - right) // 2 - 40, h - 18), xlabel, fill="black")
    draw.text((w - right + 8, h - bottom - 14), ylabel, fill="black")
    return img


def attention_structure(pipe, captions: list[str], *, num_steps: int = DEFAULT_STEPS, seed: int = 0,
                        arrow: int = 8) -> dict[str, np.ndarray]:
    """Per (step, layer, head) of dense sampling: how local and how stable each attention head is.

    ``band_mass`` [steps, layers, heads]: the share of image queries' attention probability that arrow(``arrow``)
    keeps at token level (every text key plus the image keys within ``image_tokens // (2 * arrow)`` raster
    positions), averaged over image queries and the batch (both CFG halves). ``step_similarity`` [steps - 1,
    layers, heads]: cosine similarity of each head's attention output (all tokens of the batch) with its output
    at the previous step, which is what caching a head bets on. Sampling is the pipeline's (same noise per seed,
    same CFG), with attention computed explicitly so that its probabilities can be read.
    """
    from flax import nnx

    from ditfa_jax.denoise import embed, euler_step, guided_velocity, prepare_run
    from ditfa_jax.models.layers import scan_stack

    model, size = pipe.transformer, pipe.image_size
    text, pooled = pipe.encode(captions)
    run = prepare_run(model.config, text, pooled, height=size, width=size, num_steps=num_steps,
                      guidance_scale=pipe.guidance_scale, scheduler=pipe.scheduler, vae_scale_factor=1,
                      dtype=model.dtype, **pipe.negative(len(captions)))
    layout, cond, family = run.layout, run.cond, run.family
    n_img, n_txt = layout.image_tokens, layout.text_len
    image_rows = np.arange(n_img) + (n_txt if layout.text_first else 0)  # token index of raster image position
    near = np.abs(np.arange(n_img)[:, None] - np.arange(n_img)[None, :]) <= n_img // (2 * arrow)
    kept = np.ones((n_img, layout.tokens), bool)  # [image query, key]: text keys always kept
    kept[:, image_rows] = near
    kept, image_rows = jnp.asarray(kept), jnp.asarray(image_rows)
    graphdef, state = model.graphdef, model.state

    @jax.jit
    def step(state, x, t, sigma, sigma_next):
        module = nnx.merge(graphdef, state)
        carry, temb = embed(module, family, cond, x, t)
        masses, outs = [], []
        for index, (stack, _, _) in enumerate(module.stacks()):
            carry = module.enter_stack(index, carry)

            def body(block, c, _):
                ctx = block.prepare(c, temb)
                q, k, v = block.qkv(ctx, cond.rope)
                logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
                probs = jax.nn.softmax(logits / np.sqrt(q.shape[-1]), axis=-1)
                out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                                 preferred_element_type=jnp.float32).astype(q.dtype)
                mass = jnp.where(kept, probs[:, :, image_rows, :], 0).sum(-1).mean((0, 2))  # [H]
                return block.finish(c, ctx, out), (mass, out.astype(jnp.float32))

            carry, (mass, out) = scan_stack(stack, carry, None, body)
            masses.append(mass)
            outs.append(out)
        v = guided_velocity(module, cond, layout, carry, temb)
        return euler_step(x, v, sigma, sigma_next), jnp.concatenate(masses), jnp.concatenate(outs)

    x = pipe.initial_noise(seed + np.arange(len(captions)))
    band_mass, similarity, previous = [], [], None
    for i in range(num_steps):
        x, mass, outs = step(state, x, run.timesteps[i], run.sigmas[i], run.sigmas[i + 1])
        band_mass.append(np.asarray(mass))
        if previous is not None:
            dot = jnp.sum(outs * previous, axis=(1, 2, 4))
            norms = jnp.sqrt(jnp.sum(outs ** 2, axis=(1, 2, 4)) * jnp.sum(previous ** 2, axis=(1, 2, 4)))
            similarity.append(np.asarray(dot / jnp.maximum(norms, 1e-30)))
        previous = outs
    return {"band_mass": np.stack(band_mass), "step_similarity": np.stack(similarity) if similarity else
            np.zeros((0,) + band_mass[0].shape)}
