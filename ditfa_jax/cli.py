"""`ditfa` command line: convert checkpoints and run the jitted sampler.

    ditfa convert CHECKPOINT OUT_DIR        diffusers / BFL checkpoint -> converted JAX params (fast reloads)
    ditfa generate FOLDER --prompt TEXT     prompt(s) -> PNGs (settings in the PNG metadata), optionally with a plan
    ditfa calibrate CHECKPOINT [options]    search a head-wise compression plan (RSE + MILP), write plan + heatmap
    ditfa bench FOLDER [options]            time encode / denoise / decode and peak memory, dense and with a plan
    ditfa sample CHECKPOINT [options]       run the transformer's sampler alone on random noise and embeddings
    ditfa demo [options]                    the main job on the embedded testbed model: plan, dense vs compressed

`generate` and `bench` need a complete diffusers pipeline folder (text encoders, tokenizers, transformer, VAE,
scheduler). `calibrate` takes prompts as text when the folder has text encoders, prompt embeddings from an .npz
(`prompt_embeds`, `pooled_prompt_embeds`, optional `negative_*`), or draws random embeddings.

Every CHECKPOINT / FOLDER (and demo's --checkpoint) may be a Hugging Face repo id instead, "org/name" or
"org/name@revision": the files the command needs are fetched into the local Hugging Face cache (json files first,
so that settings are checked before any weight downloads); HF_HUB_OFFLINE=1 reads only that cache.

Exit status: 0 done; 2 the request was refused before anything was written (a bad argument, input file, config or
output path, or a model or run that cannot fit in memory); 1 the run failed (NaN/Inf output, out of memory, an I/O
error), leaving nothing half-written. Either way the reason is one line on stderr.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from ditfa_jax.cost_model import COST_MODELS  # numpy only: the parser lists the measured cost models

# == ditfa_jax.token_order.TOKEN_ORDERS (a test checks): written out so that building the parser does not import jax
TOKEN_ORDER_CHOICES = ("raster", "morton", "hilbert")


# ---- argument types: a bad value is refused while parsing, with the range that is accepted ----

MAX_SEED = 2 ** 32 - 1  # JAX keys take 32-bit seeds (larger ones wrap around and repeat smaller seeds' noise)
MAX_SEQUENCE_LENGTH = 512  # T5's limit in the FLUX and SD3 pipelines


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]."""
    accepted = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {value}")
        return value

    return parse


def _float_at_least(lo: float, *, above: bool = False):
    """An argparse type: a finite number >= lo (> lo with `above`)."""
    accepted = f"a finite number {'>' if above else '>='} {lo}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
        if not np.isfinite(value) or value < lo or (above and value == lo):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return value

    return parse


def _file_prefix(text: str) -> str:
    """An argparse type: a file name prefix, which must stay inside --out (no folder separators)."""
    if any(sep and sep in text for sep in ("/", "\\", "\0")):
        raise argparse.ArgumentTypeError(f"expected a file name prefix without '/' (the files go into --out), got "
                                         f"{text!r}")
    return text


POSITIVE = _int_in(1)
SEED = _int_in(0, MAX_SEED)
STEPS = _int_in(1, 10_000)
PIXELS = _int_in(1, 2 ** 16)
SEQUENCE_LENGTH = _int_in(1, MAX_SEQUENCE_LENGTH)
NON_NEGATIVE = _float_at_least(0.0)


# == ditfa_jax.methods.STEP_KINDS without "compute" (a test checks), written out like TOKEN_ORDER_CHOICES
STEP_METHOD_CHOICES = ("reuse", "taylor1", "taylor2")


# ditfa_jax.calibrate.METHOD_FAMILIES (a test checks)
METHOD_FAMILY_NAMES = ("heads", "reuse", "taylor", "blocks", "mlp", "steps+blocks", "taylor+heads", "taylor+mlp",
                       "all")
METHOD_CHOICES = METHOD_FAMILY_NAMES + ("fewer-steps",)  # + calibrate.FEWER_STEPS (a test checks)


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in METHOD_CHOICES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated names from {','.join(METHOD_CHOICES)}")
    return names


def _step_counts(text: str) -> tuple[int, ...]:
    """Step counts for --base-steps (argparse type): comma-separated integers >= 1."""
    try:
        counts = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated step counts >= 1, e.g. 14,10")
    return counts


def _devices(text: str) -> tuple[int, int]:
    """--devices (argparse type): "N" or "DxH" (`ditfa_jax.sharding.parse_devices`)."""
    from ditfa_jax.sharding import parse_devices

    try:
        return parse_devices(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--devices ")) from None


def _mesh(args, *, calibration: bool = False):
    """The mesh --devices asks for (None without it). "N" is N devices on the head axis, or for calibration (which
    splits its prompts only) on the data axis."""
    if args.devices is None:
        return None
    from ditfa_jax.sharding import make_mesh

    data, heads = args.devices
    if calibration and data == 1:
        data, heads = heads, 1
    return make_mesh(data, heads)


def _step_kinds(text: str) -> tuple[str, ...]:
    """Step method names for --step-kinds (argparse type); 'none' is the empty list."""
    names = () if text.strip() == "none" else tuple(n.strip() for n in text.split(","))
    bad = [n for n in names if n not in STEP_METHOD_CHOICES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown step methods {bad}; expected reuse, taylor1, taylor2 or none")
    return names


def _positive_ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers >= 1 (argparse type)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 8,16; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _dtype(name: str):
    import jax.numpy as jnp

    return {"bf16": jnp.bfloat16, "fp32": jnp.float32, "auto": None}[name]


def _param_dtype(args):
    """The parameter dtype a memory check assumes before loading: fp32 if asked, else bf16 (a lower bound)."""
    import jax.numpy as jnp

    return jnp.float32 if args.dtype == "fp32" else jnp.bfloat16


def cmd_convert(args) -> int:
    from ditfa_jax.files import check_output, exists_error
    from ditfa_jax.loading import load_transformer, save_converted

    out = check_output(args.out_dir, folder=True)
    if out.exists():
        raise exists_error(out)
    model = load_transformer(args.checkpoint, dtype=_dtype(args.dtype), config=args.config, progress=True)
    out = save_converted(model, args.out_dir)
    print(f"converted {type(model.config).__name__} -> {out}")
    return 0


# ---- the settings of a run: from the command line, the plan and the model, checked before anything loads ----

DEFAULT_STEPS = 28


def _load_plan(args):
    from ditfa_jax.plan import CompressionPlan

    return CompressionPlan.load(args.plan) if getattr(args, "plan", None) else None


def _with_fp8(args, plan, model):
    """(model, record): the transformer with FP8 linear layers where ``--fp8`` or the plan (``methods.linear``)
    says, the plan supplying what the command line leaves out and a ``--fp8`` it contradicts an error; ``record``
    describes them for PNG metadata and reports (None: no FP8)."""
    from ditfa_jax.fp8 import quantize_transformer, select_layers

    given = select_layers(model.module(), args.fp8) if getattr(args, "fp8", None) else None
    recorded = None if plan is None else plan.fp8_layers
    if given is not None and recorded is not None and sorted(given) != list(recorded):
        raise ValueError(f"--fp8 {args.fp8} conflicts with the plan {args.plan}, calibrated with FP8 in "
                         f"{len(recorded)} layers (methods.linear.fp8_layers): drop --fp8 (the plan's layers are "
                         "used) or calibrate a plan with these layers")
    layers = given if given is not None else recorded
    if layers is None:
        return model, None
    try:
        model = quantize_transformer(model, layers)
    except ValueError as e:
        raise ValueError(f"{args.plan}: methods.linear.fp8_layers: {e}" if given is None else str(e)) from None
    return model, {"format": "e4m3", "weights": "per output channel", "activations": "per token",
                   "layers": sorted(layers)}


def _from_plan(args, plan, flag: str, attr: str, plan_value, default):
    """A setting given on the command line, else the plan's, else the default; a given value the plan contradicts
    is an error naming both."""
    given = getattr(args, attr)
    if plan is None:
        return default if given is None else given
    if given is not None and given != plan_value:
        raise ValueError(f"{flag} {given} conflicts with the plan {args.plan}, made for {plan_value}: drop {flag} "
                         "(the plan's value is used) or calibrate a plan for it")
    return plan_value


def _geometry(args, plan, *, text_len_default: int, batch: int) -> dict:
    """height, width, steps and text length of a transformer-level run (sample, calibrate), checked against the
    model before any weight loads; a plan supplies what the command line leaves out."""
    from ditfa_jax.family import family_of, layout_for
    from ditfa_jax.hub import CONFIGS, resolve
    from ditfa_jax.loading import transformer_config
    from ditfa_jax.pipelines import vae_scale_factor_of

    config = transformer_config(args.checkpoint)
    folder = resolve(args.checkpoint, CONFIGS)  # a repo id's json files, fetched before any weight
    vae = vae_scale_factor_of(folder) if folder.is_dir() else 8
    native = family_of(config).native_size(config, vae)
    run = dict(height=_from_plan(args, plan, "--height", "height", plan and plan.height, native),
               width=_from_plan(args, plan, "--width", "width", plan and plan.width, native),
               steps=_from_plan(args, plan, "--steps", "steps", plan and plan.num_steps, DEFAULT_STEPS),
               text_len=_from_plan(args, plan, "--text-len", "text_len", plan and plan.text_len, text_len_default))
    for name in ("steps", "text_len"):
        if run[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {run[name]}")
    layout = layout_for(config, height=run["height"], width=run["width"], text_len=run["text_len"],
                        vae_scale_factor=vae)
    _check_memory(args, config, layout, batch)
    return dict(run, config=config, vae_scale_factor=vae)


def _check_memory(args, config, layout, batch: int) -> None:
    """Refuse, before anything loads, a model or run that cannot fit in memory (parameters + activations)."""
    from ditfa_jax.denoise import check_memory
    from ditfa_jax.family import family_of

    cfg_batch = batch * (2 if family_of(config).guidance(config) == "cfg" else 1)
    check_memory(config, dtype=_param_dtype(args), batch=cfg_batch, tokens=layout.tokens)


def _load_npz(path):
    """An .npz of arrays, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no embeddings file at {path}")
    import zipfile

    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz of arrays ({e})") from None
    if not hasattr(data, "files"):
        raise ValueError(f"{path}: a single array, not an .npz holding prompt_embeds and pooled_prompt_embeds")
    return data


def _prompt_inputs(args, cfg, batch: int, text_len: int):
    """Prompt embeddings from --embeddings (.npz) or seeded random ones; (text, pooled, negative kwargs)."""
    import jax
    import jax.numpy as jnp

    from ditfa_jax.family import family_of

    if args.embeddings:
        data = _load_npz(args.embeddings)
        missing = [k for k in ("prompt_embeds", "pooled_prompt_embeds") if k not in data]
        if missing:
            raise ValueError(f"{args.embeddings}: missing arrays {missing}; found {sorted(data.files)}")
        text, pooled = jnp.asarray(data["prompt_embeds"]), jnp.asarray(data["pooled_prompt_embeds"])
        negative = {k: jnp.asarray(data[k]) for k in ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
                    if k in data}
    else:
        key_text, key_pool = jax.random.split(jax.random.key((args.seed + 1) % (MAX_SEED + 1)))
        text = jax.random.normal(key_text, (batch, text_len, cfg.joint_attention_dim))
        pooled = jax.random.normal(key_pool, (batch, cfg.pooled_projection_dim))
        negative = {}
    if family_of(cfg).guidance(cfg) == "cfg" and not negative:
        negative = dict(negative_prompt_embeds=jnp.zeros_like(text), negative_pooled_prompt_embeds=jnp.zeros_like(pooled))
    return text, pooled, negative


def _guidance(args, cfg) -> float:
    from ditfa_jax.family import family_of

    return args.guidance if args.guidance is not None else family_of(cfg).default_guidance_scale


def cmd_sample(args) -> int:
    import jax
    import jax.numpy as jnp

    from ditfa_jax.family import family_of, layout_for
    from ditfa_jax.files import check_output
    from ditfa_jax.loading import load_transformer
    from ditfa_jax.sampler import cache_bytes, sample, scheduler_for

    out = check_output(args.out, overwrite=args.overwrite) if args.out else None
    plan = _load_plan(args)
    run = _geometry(args, plan, text_len_default=16, batch=args.batch)
    model, fp8 = _with_fp8(args, plan, load_transformer(args.checkpoint, dtype=_dtype(args.dtype), progress=False))
    cfg, family = model.config, family_of(model.config)
    text, pooled, negative = _prompt_inputs(args, cfg, args.batch, run["text_len"])
    b = text.shape[0]
    layout = layout_for(cfg, height=run["height"], width=run["width"], text_len=text.shape[1],
                        vae_scale_factor=run["vae_scale_factor"])
    latents = jax.random.normal(jax.random.key(args.seed), (b, *family.latent_shape(cfg, layout.grid)))
    scheduler = scheduler_for(args.checkpoint, model)
    mesh = _mesh(args)
    if mesh is not None:
        model.place_on(mesh)
    timings = []
    for _ in range(2):  # first call compiles
        start = time.perf_counter()
        final = sample(model, latents, text, pooled, height=run["height"], width=run["width"],
                       num_steps=run["steps"], guidance_scale=_guidance(args, cfg), scheduler=scheduler, plan=plan,
                       vae_scale_factor=run["vae_scale_factor"], mesh=mesh, **negative)
        final.block_until_ready()
        timings.append(time.perf_counter() - start)
    cfg_batch = b * (2 if negative else 1)  # classifier-free guidance runs a doubled batch
    report = {"model": type(cfg).__name__, "checkpoint": str(args.checkpoint), "steps": run["steps"],
              "height": run["height"], "width": run["width"], "text_len": layout.text_len, "batch": b,
              "plan": args.plan, "fp8": fp8,
              "attention_flops_kept": None if plan is None else round(plan.flops_kept_fraction(), 4),
              "attention_cache_mb": 0.0 if plan is None else round(cache_bytes(
                  cfg, cfg_batch, layout.attention_tokens, model.dtype) / 2 ** 20, 2),
              "first_call_s": round(timings[0], 3), "second_call_s": round(timings[1], 3),
              "final_latents_std": float(jnp.std(final)), "device": str(jax.devices()[0])}
    if mesh is not None:
        from ditfa_jax.sharding import HEADS, balance_report, plan_head_costs

        report["mesh"] = dict(mesh.shape)
        if plan is not None and mesh.shape[HEADS] > 1:
            report.update(balance_report(plan_head_costs(plan, layout, cfg.attention_head_dim), mesh.shape[HEADS]))
    if out is not None:
        from ditfa_jax.files import atomic_write

        buf = io.BytesIO()
        np.save(buf, np.asarray(final))
        atomic_write(out, buf.getvalue(), overwrite=args.overwrite)
        report["latents"] = str(out)
    print(json.dumps(report, indent=2))
    return 0


def _read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    return prompts


def _check_methods(args) -> None:
    """--methods: only with --target-speedup, and every budget a method searches must be non-zero."""
    from ditfa_jax.calibrate import METHOD_FAMILIES

    if args.methods is None:
        if args.base_steps:
            raise ValueError("--base-steps adds candidates to --methods: give --methods (and --target-speedup) too")
        return
    if args.target_speedup is None:
        raise ValueError("--methods chooses among methods at a speed: give --target-speedup too")
    for flag, budget, key, example in (("--step-delta", args.step_delta, "step_delta", "0.05"),
                                       ("--delta", args.delta, "delta", "0.2"),
                                       ("--mlp-delta", args.mlp_delta, "mlp_delta", "0.05")):
        users = [m for m in args.methods
                 if m in METHOD_FAMILIES and METHOD_FAMILIES[m](1.0, 1.0, (), 1.0).get(key, 0) > 0
                 and (key != "mlp_delta" or m != "all")]  # "all" takes MLP branches only where --mlp-delta > 0
        if budget == 0 and users:
            raise ValueError(f"--methods {','.join(users)} search {flag}, which is 0; give it a starting budget "
                             f"(e.g. {flag} {example})")


def _price_at(args, config):
    """Where the candidates are priced: None (calibrate's default: at the run's own size), except with the
    candidate fp8 on a head size without FP8 measurements (the testbed): then at --cost-model's layout."""
    from ditfa_jax.cost_model import FP8_HEAD_TIMES, get_cost_model

    if "fp8" not in args.candidates.split(",") or config.attention_head_dim in FP8_HEAD_TIMES:
        return None
    at = get_cost_model(args.cost_model).layout
    print(f"candidate fp8: no FP8 measurement at head_dim {config.attention_head_dim}; every candidate priced as at "
          f"{args.cost_model} ({at.image_tokens} + {at.text_len} tokens, head_dim {at.head_dim})")
    return at


def cmd_calibrate(args) -> int:
    from ditfa_jax.calibrate import (FEWER_STEPS, METHOD_FAMILIES, calibrate, calibrate_for_speedup,
                                     least_error_for_speedup)
    from ditfa_jax.cost_model import get_cost_model
    from ditfa_jax.loading import load_transformer
    from ditfa_jax.files import check_output
    from ditfa_jax.plan_pictures import save_heatmap
    from ditfa_jax.sampler import scheduler_for

    _check_methods(args)
    out = check_output(args.out, overwrite=args.overwrite)
    check_output(out.with_suffix(".png"), overwrite=args.overwrite)
    text_prompts = not args.prompts.isdigit()
    if text_prompts and args.text_len is not None:
        raise ValueError("--text-len sets the length of random embeddings; with text --prompts the T5 length is "
                         "--max-sequence-length")
    if not text_prompts and int(args.prompts) < 1:
        raise ValueError(f"--prompts must be a prompt file or a number >= 1, got {args.prompts}")
    prompts = _read_prompts(args.prompts) if text_prompts else None
    prompt_count = len(prompts) if text_prompts else int(args.prompts)
    run = _geometry(args, None, text_len_default=16, batch=prompt_count)
    if args.step_prompts is not None:
        if args.step_delta == 0:
            raise ValueError("--step-prompts scores step methods: give --step-delta too (e.g. --step-delta 0.05)")
        if args.step_prompts > prompt_count:
            raise ValueError(f"--step-prompts {args.step_prompts}: expected at most the {prompt_count} calibration "
                             "prompts")
    too_many = [n for n in args.base_steps or () if n >= run["steps"]]
    if too_many:
        raise ValueError(f"--base-steps {','.join(map(str, too_many))}: expected fewer than --steps {run['steps']}")
    if not text_prompts:
        model, _ = _with_fp8(args, None, load_transformer(args.checkpoint, dtype=_dtype(args.dtype), progress=False))
        scheduler = scheduler_for(args.checkpoint, model)
        text, pooled, negative = _prompt_inputs(args, model.config, int(args.prompts), run["text_len"])
    else:
        from ditfa_jax.pipelines import load_pipeline

        pipe = load_pipeline(args.checkpoint, dtype=_dtype(args.dtype), offload_text_encoders=True)
        (model, _), scheduler = _with_fp8(args, None, pipe.transformer), pipe.scheduler
        cond = pipe.encode(prompts, max_sequence_length=args.max_sequence_length,
                           guidance_scale=_guidance(args, model.config))
        text, pooled = cond.pop("prompt_embeds"), cond.pop("pooled_prompt_embeds")
        negative = cond
    mesh = _mesh(args, calibration=True)
    price_at = _price_at(args, model.config)

    def search(scale=1.0, method=None, num_steps=None):
        budgets = {"delta": args.delta * scale, "step_delta": args.step_delta * scale,
                   "step_kinds": args.step_kinds, "block_candidates": args.block_candidates,
                   "mlp_delta": args.mlp_delta * scale}
        if method is not None:  # one of --methods: its own kinds of saving, the others off
            blocks = args.block_candidates or tuple(range(1, model.config.total_layers))
            budgets = {"step_kinds": (), "block_candidates": (),
                       **METHOD_FAMILIES[method](budgets["delta"], budgets["step_delta"], blocks,
                                                 budgets["mlp_delta"])}
        if budgets["step_delta"] > 0:  # a search without steps (heads, the dense pass) scores none
            budgets["step_prompts"] = args.step_prompts
        return calibrate(model, text, pooled, height=run["height"], width=run["width"],
                         num_steps=num_steps or run["steps"],
                         guidance_scale=_guidance(args, model.config), c=args.c,
                         candidates=tuple(args.candidates.split(",")), scheduler=scheduler, seed=args.seed,
                         vae_scale_factor=run["vae_scale_factor"], rse_over_prompts=args.rse_over_prompts,
                         rse_query_stride=args.rse_query_stride, budget_schedule=args.budget_schedule,
                         token_order=args.token_order, price_at=price_at,
                         progress=args.target_speedup is None, mesh=mesh, **budgets, **negative)

    if args.target_speedup is None:
        result = search()
    elif args.methods is None:
        result = calibrate_for_speedup(search, args.target_speedup, get_cost_model(args.cost_model),
                                       num_steps=run["steps"], log=print)
    else:
        dense = search(0.0).final_latents  # every budget 0: the dense trajectory from the same noise
        result = least_error_for_speedup(search, args.target_speedup, get_cost_model(args.cost_model),
                                         num_steps=run["steps"], methods=args.methods, dense_latents=dense,
                                         base_steps=args.base_steps or (), log=print)
        chosen, steps = result.plan.notes["method"], result.plan.num_steps
        print(f"chosen: {chosen} (least end-to-end error on the calibration prompts)"
              + (f": dense with {steps} of {run['steps']} steps; the plan runs that many" if chosen == FEWER_STEPS
                 else f": a plan for {steps} of {run['steps']} steps; the sampler runs that many"
                 if steps != run["steps"] else ""))
    plan = result.plan
    plan.save(out, overwrite=args.overwrite)
    try:
        heatmap = save_heatmap(plan, out.with_suffix(".png"), overwrite=args.overwrite)
    except BaseException:
        if not args.overwrite:
            out.unlink(missing_ok=True)  # the plan written just now: both files or neither
        raise
    print(plan.summary())
    print(f"calibration took {plan.notes['calibration_seconds']} s; plan -> {out}; heatmap -> {heatmap}")
    return 0


def _png_metadata(settings: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        if value is not None:
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("parameters", json.dumps(settings))
    return info


def _write_images(images, metadata: list[dict], paths: list[Path], *, overwrite: bool) -> None:
    """All PNGs or none: each goes to a temp folder beside the targets, then every file is moved into place:
    replacing (overwrite) or create-if-absent, removing the ones placed so far if one name was taken meanwhile."""
    import os
    import shutil
    import tempfile

    from ditfa_jax.files import cleanup_on_signal, place_new_file

    folder = paths[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    with cleanup_on_signal():
        tmp = Path(tempfile.mkdtemp(prefix=".ditfa-generate-", dir=folder))
        placed = []
        try:
            for img, meta, path in zip(images, metadata, paths):
                img.save(tmp / path.name, pnginfo=_png_metadata(meta))
            for path in paths:
                if overwrite:
                    os.replace(tmp / path.name, path)
                else:
                    place_new_file(tmp / path.name, path)
                    placed.append(path)
        except BaseException:
            for path in placed:
                path.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _pipeline_run(args, plan, *, batch: int) -> dict:
    """height, width, steps and T5 length of a pipeline run (generate, bench), checked against the folder's model
    before anything loads; a plan supplies what the command line leaves out."""
    from ditfa_jax.configs import read_json
    from ditfa_jax.family import family_of, layout_for
    from ditfa_jax.hub import CONFIGS, resolve
    from ditfa_jax.loading import transformer_config
    from ditfa_jax.pipelines import PIPELINES, vae_scale_factor_of

    folder = resolve(args.checkpoint, CONFIGS)  # a repo id's json files, fetched before any weight
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a pipeline folder (expected a diffusers folder with model_index.json)")
    name = read_json(folder / "model_index.json", "model_index.json").get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{folder / 'model_index.json'}: _class_name {name!r} is not supported; expected one of "
                         f"{sorted(PIPELINES)}")
    config, vae = transformer_config(folder / "transformer"), vae_scale_factor_of(folder)
    native = family_of(config).native_size(config, vae)
    length = None if plan is None else PIPELINES[name].max_sequence_length_for(plan.text_len)
    run = dict(height=_from_plan(args, plan, "--height", "height", plan and plan.height, native),
               width=_from_plan(args, plan, "--width", "width", plan and plan.width, native),
               steps=_from_plan(args, plan, "--steps", "steps", plan and plan.num_steps, DEFAULT_STEPS),
               max_sequence_length=_from_plan(args, plan, "--max-sequence-length", "max_sequence_length", length,
                                              None))
    if run["steps"] < 1:
        raise ValueError(f"--steps must be >= 1, got {run['steps']}")
    layout = layout_for(config, height=run["height"], width=run["width"], text_len=run["max_sequence_length"] or 0,
                        vae_scale_factor=vae)
    _check_memory(args, config, layout, batch)
    return run


def cmd_generate(args) -> int:
    from ditfa_jax.files import check_output
    from ditfa_jax.pipelines import load_pipeline

    prompts = list(args.prompt or []) + (_read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    total = len(prompts) * args.num_images
    out = check_output(args.out, folder=True)
    paths = [out / f"{args.name}{k:03d}.png" for k in range(total)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} of the {total} target files do); choose another "
                              "--out / --name or pass --overwrite")
    plan = _load_plan(args)
    run = _pipeline_run(args, plan, batch=total)
    pipe = load_pipeline(args.checkpoint, dtype=_dtype(args.dtype), offload_text_encoders=args.offload_text_encoders)
    pipe.transformer, fp8 = _with_fp8(args, plan, pipe.transformer)
    images = pipe(prompts, negative_prompt=args.negative_prompt, height=run["height"], width=run["width"],
                  num_inference_steps=run["steps"], guidance_scale=args.guidance, seed=args.seed,
                  num_images=args.num_images, plan=plan, max_sequence_length=run["max_sequence_length"],
                  progress=True, mesh=_mesh(args))
    common = {"negative_prompt": args.negative_prompt, "seed": args.seed, "model": str(args.checkpoint),
              "pipeline": type(pipe).__name__, "steps": run["steps"],
              "guidance_scale": pipe.default_guidance_scale if args.guidance is None else args.guidance,
              "height": images[0].height, "width": images[0].width,
              "text_len": pipe.text_len(run["max_sequence_length"]),
              "plan": None if plan is None else {"file": str(args.plan), "digest": plan.digest(),
                                                 "attention_flops_kept": round(plan.flops_kept_fraction(), 4)},
              "fp8": fp8, "software": "ditfa-jax"}
    metadata = [{"prompt": prompts[k // args.num_images], "image_index": k, **common} for k in range(total)]
    _write_images(images, metadata, paths, overwrite=args.overwrite)
    timings = ", ".join(f"{k} {v:.2f}" for k, v in pipe.timings.items())
    print(f"{total} image(s) -> {out} ({timings})")
    return 0


def _peak_gb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 1e9, 2) if "peak_bytes_in_use" in stats else None


def cmd_bench(args) -> int:
    from ditfa_jax.files import check_output
    from ditfa_jax.pipelines import load_pipeline

    out = check_output(args.out, overwrite=args.overwrite) if args.out else None
    plan = _load_plan(args)
    run = _pipeline_run(args, plan, batch=args.batch)
    pipe = load_pipeline(args.checkpoint, dtype=_dtype(args.dtype), offload_text_encoders=True)
    prompts = [args.prompt] * args.batch
    rows = []
    for name, run_plan in [("dense", None)] + ([("plan", plan)] if plan is not None else []):
        fp8 = None
        if run_plan is not None:  # the plan runs with the FP8 layers it was calibrated with, if any
            pipe.transformer, fp8 = _with_fp8(args, run_plan, pipe.transformer)
        best, first_call = pipe.time_stages(prompts, repeat=args.repeat, height=run["height"], width=run["width"],
                                            num_inference_steps=run["steps"], guidance_scale=args.guidance,
                                            plan=run_plan, max_sequence_length=run["max_sequence_length"])
        best = {k: round(v, 4) for k, v in best.items()}
        rows.append({"checkpoint": str(args.checkpoint), "run": name, "height": run["height"],
                     "width": run["width"], "steps": run["steps"], "batch": args.batch,
                     "attention_flops_kept": 1.0 if run_plan is None else round(run_plan.flops_kept_fraction(), 4),
                     "fp8_layers": 0 if fp8 is None else len(fp8["layers"]),
                     "first_call_s": round(first_call, 2), **best,
                     "total_s": round(sum(best.values()), 4), "peak_gb_so_far": _peak_gb()})
        print(json.dumps(rows[-1]), flush=True)
    if out is not None:
        from ditfa_jax.files import atomic_write

        atomic_write(out, "".join(json.dumps(r) + "\n" for r in rows).encode(), overwrite=args.overwrite)
    print("\n| run | attention FLOPs kept | FP8 layers | encoders onload s | encode s | denoise s | decode s | "
          "total s | peak GB (so far) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['attention_flops_kept']} | {r['fp8_layers']} | {r['onload_s']} | {r['encode_s']} | "
              f"{r['denoise_s']} | "
              f"{r['decode_s']} | "
              f"{r['total_s']} | {r['peak_gb_so_far']} |")
    return 0


def cmd_demo(args) -> int:
    from ditfa_jax.files import check_output
    from ditfa_jax.testbed.demo import DEFAULT_DELTA, run_demo

    check_output(args.out, folder=True)
    run_demo(args.out, testbed=args.testbed, checkpoint=args.checkpoint, prompts=args.prompts,
             calibration_prompts=args.calibration_prompts, num_steps=args.steps,
             delta=DEFAULT_DELTA if args.delta is None else args.delta, seed=args.seed, overwrite=args.overwrite)
    return 0


class _Parser(argparse.ArgumentParser):
    """A parser whose errors are one line (`ditfa CMD: error: ...`, exit status 2), like every refused request."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.HelpFormatter):
    """Help text that shows each option's default where it has a fixed one (derived defaults are said in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        fixed = not any(action.default is v for v in (None, False, True, argparse.SUPPRESS))
        if fixed and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


SEED_HELP = ("random seed in 0..2^32-1: the noise of image k is drawn from key fold_in(key(SEED), k), and random "
             "prompt embeddings from key(SEED + 1); the same seed gives the same images")
FROM_PLAN = "default: the plan's (--plan), else {}; a value the plan contradicts is an error"


def _add_fp8(p, default: str) -> None:
    p.add_argument("--fp8", nargs="?", const="all", metavar="LAYERS",
                   help="run block-stack linear layers in FP8 (e4m3 weights with per-channel scales, per-token "
                        "activation scales; adaLN modulations stay; ditfa_jax.fp8): all of them (--fp8 alone) or "
                        "comma-separated roles such as attn/to_q,ff/net_2 (that layer in every stack) or paths "
                        "such as stack0/attn/to_q" + default)


def _add_devices(p, what: str) -> None:
    p.add_argument("--devices", type=_devices, metavar="N|DxH",
                   help="run on several accelerators of this host (ditfa_jax.sharding): " + what)


def _add_run_settings(p, *, text_len: bool) -> None:
    """--height/--width/--steps (+ --text-len): a plan's settings unless given, checked against the model."""
    p.add_argument("--height", type=PIXELS, help="image height in pixels, a multiple of the model's step (16 for "
                                             "FLUX.1 and SD3); " + FROM_PLAN.format("the model's native size"))
    p.add_argument("--width", type=PIXELS, help="image width in pixels; " + FROM_PLAN.format("the native size"))
    p.add_argument("--steps", type=STEPS, help="denoising steps; " + FROM_PLAN.format(DEFAULT_STEPS))
    if text_len:
        p.add_argument("--text-len", type=POSITIVE, help="prompt tokens of random embeddings; "
                                                    + FROM_PLAN.format(16))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditfa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=_Help)

    p = add("convert", help="convert a checkpoint to JAX params for fast reloads")
    p.add_argument("checkpoint", help="diffusers pipeline/transformer folder, BFL single .safetensors file, or "
                                      "Hugging Face repo id (org/name[@revision])")
    p.add_argument("out_dir", help="new folder to write (refuses an existing one)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="parameter dtype (auto: keep the checkpoint's)")
    p.add_argument("--config", help="diffusers config.json for a single-file checkpoint (non-standard shapes)")
    p.set_defaults(func=cmd_convert)

    p = add("sample", help="run the transformer's jitted sampler alone on random noise and embeddings",
            description="Time the transformer's sampler (one jitted scan) on seeded random noise and prompt "
                        "embeddings (or --embeddings), dense or with a plan; prints a JSON report.")
    p.add_argument("checkpoint", help="checkpoint folder, file or repo id (see `convert`)")
    _add_run_settings(p, text_len=True)
    p.add_argument("--batch", type=POSITIVE, default=1, help="images per call")
    p.add_argument("--guidance", type=NON_NEGATIVE, help="FLUX distilled guidance / SD3 CFG scale (default 3.5 / 7.0)")
    p.add_argument("--seed", type=SEED, default=0, help=SEED_HELP)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="parameter dtype")
    p.add_argument("--out", help="write the final latents here (.npy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--plan", help="compression plan (.json from `ditfa calibrate`); its settings are the defaults")
    p.add_argument("--embeddings", help=".npz with prompt_embeds, pooled_prompt_embeds (+ negative_*)")
    _add_fp8(p, "; default: the plan's (methods.linear), else none")
    _add_devices(p, "N on the head axis (attention head-parallel, the rest split over tokens), or D x H with the "
                    "batch (x2 with CFG) over D")
    p.set_defaults(func=cmd_sample)

    p = add("calibrate", help="search a head-wise compression plan (single-layer RSE + MILP)",
            description="Search a compression plan for a resolution, step count and text length on calibration "
                        "prompts; writes the plan (which records these settings: `sample`, `generate` and "
                        "`bench` take them from it) and its heatmap.")
    p.add_argument("checkpoint", help="checkpoint folder, file or repo id (see `convert`); a full pipeline for "
                                      "text --prompts")
    p.add_argument("--out", required=True, help="plan file to write (.json); the heatmap goes beside it (.png)")
    p.add_argument("--delta", type=NON_NEGATIVE, default=0.2,
                   help="RSE budget per (step, layer); larger compresses more")
    p.add_argument("--c", type=_float_at_least(0.0, above=True), default=1.5,
                   help="per-head eligibility: rse < c * delta / heads")
    p.add_argument("--candidates", default="cached,arrow_8,arrow_16,arrow_32",
                   help="comma-separated head methods: cached, arrow_K, fp8 (a full head in FP8, priced by its "
                        "measured time at this size, or at --cost-model's for an unmeasured head size; Hopper GPUs)")
    p.add_argument("--rse-over-prompts", choices=["mean", "max"], default="mean",
                   help="score a head's error over all calibration prompts pooled (mean, the paper's) or by its "
                        "worst prompt (max: more conservative; better PSNR/SSIM at equal FLOPs on the testbed)")
    p.add_argument("--rse-query-stride", type=POSITIVE, default=1,
                   help="measure each head's error on every S-th query tile of 128 tokens only, then run the chosen "
                        "methods once (1: every query); at 2048^2 and above this cuts the search's attention work "
                        "(benchmarks/RESULTS.md)")
    p.add_argument("--budget-schedule", choices=["constant", "ramp"], default="constant",
                   help="delta at every step (constant, the paper's) or rising with the step index, same total "
                        "(ramp: protects the early steps)")
    p.add_argument("--step-delta", type=NON_NEGATIVE, default=0.0,
                   help="also search step methods: a step whose velocity reusing or extrapolating (Taylor, order 1 "
                        "or 2) the earlier computed ones predicts within this RSE skips the transformer (0: off)")
    p.add_argument("--step-kinds", type=_step_kinds, default=STEP_METHOD_CHOICES,
                   help="with --step-delta: the step methods to consider, comma-separated from reuse, taylor1, "
                        "taylor2, or none (block caching only)")
    p.add_argument("--block-candidates", type=_positive_ints, default=(),
                   help="with --step-delta: comma-separated numbers F of first blocks that run while the others "
                        "reuse their cached residuals (FBCache/DBCache-like), e.g. 8,16; a step takes the fewest "
                        "blocks within the budget")
    p.add_argument("--step-prompts", type=POSITIVE,
                   help="with --step-delta: score the step methods before each step runs, on the dense velocity of "
                        "the first K prompts only; a step they skip never runs on the others (a faster search where "
                        "a plan skips more than about K / prompts of its steps; default: every prompt, after the "
                        "step ran)")
    p.add_argument("--mlp-delta", type=NON_NEGATIVE, default=0.0,
                   help="also cache MLP branches: a block of a computed step reuses its MLP output from the last "
                        "step it ran where that output's RSE is within this (FORA-like; 0: off)")
    p.add_argument("--target-speedup", type=_float_at_least(1.0, above=True),
                   help="search the budget instead: the smallest multiple of --delta, --step-delta and --mlp-delta "
                        "whose plan "
                        "runs this many times faster than dense under --cost-model (up to 8 calibration passes)")
    p.add_argument("--cost-model", choices=sorted(COST_MODELS), default="h200-flux-dev-1024",
                   help="with --target-speedup: the measured step-time model that prices a plan (and the "
                        "candidate fp8 on a model whose head size has no FP8 measurement)")
    p.add_argument("--methods", type=_methods,
                   help="with --target-speedup: comma-separated methods from " + ",".join(METHOD_CHOICES)
                        + "; each finds its plan at that speed, and the plan whose calibration images (final "
                          "latents) are closest to dense is kept (e.g. taylor,blocks,steps+blocks,all,fewer-steps; "
                          "fewer-steps, the plain baseline, is dense with the most steps that reach the speed, "
                          "written as a dense plan for that many steps)")
    p.add_argument("--base-steps", type=_step_counts,
                   help="with --methods: comma-separated step counts below --steps on which each method also "
                        "searches (a method on top of fewer steps, e.g. 14,10), scored against dense with --steps")
    p.add_argument("--token-order", choices=TOKEN_ORDER_CHOICES, default="raster",
                   help="order of the image tokens that arrow bands follow: raster (the paper's: a band is a strip "
                        "of whole rows) or along a space-filling curve (hilbert, morton: a band is a 2-D "
                        "neighbourhood); the plan records it and the sampler uses it")
    p.add_argument("--height", type=PIXELS, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=PIXELS, help="image width in pixels (default: the model's native size)")
    p.add_argument("--steps", type=STEPS, help=f"denoising steps the plan is for (default: {DEFAULT_STEPS})")
    p.add_argument("--prompts", default="8",
                   help="a text file with one calibration prompt per line (encoded with the folder's text encoders), "
                        "or a number of random prompt embeddings (ignored with --embeddings)")
    p.add_argument("--max-sequence-length", type=SEQUENCE_LENGTH,
                   help="T5 tokens for text prompts (default FLUX-dev 512, schnell 256, SD3 256); the plan records "
                        "the text length and later commands take it from there")
    p.add_argument("--embeddings", help=".npz with prompt_embeds, pooled_prompt_embeds (+ negative_*)")
    p.add_argument("--text-len", type=POSITIVE, help="prompt tokens of random embeddings (default: 16)")
    p.add_argument("--guidance", type=NON_NEGATIVE, help="FLUX distilled guidance / SD3 CFG scale (default 3.5 / 7.0)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the calibration noise (key(SEED)) and of random "
                                                       "prompt embeddings (key(SEED + 1))")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="parameter dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    _add_fp8(p, "; the errors are measured with them and the plan records them, so runs of the plan use them too")
    _add_devices(p, "N, the calibration prompts split over N devices (the plan is the one-device plan)")
    p.set_defaults(func=cmd_calibrate)

    p = add("generate", help="prompt(s) -> PNG images with a diffusers FLUX.1 / SD3 pipeline folder",
            description="Encode the prompts with the folder's text encoders, denoise in one jitted scan "
                        "(optionally with a compression plan, whose settings are the defaults) and decode with its "
                        "VAE. Each PNG carries the prompt, negative prompt, seed, model, steps, guidance and plan "
                        "as text metadata. Existing files are never overwritten unless --overwrite is given; on "
                        "failure nothing is written.")
    p.add_argument("checkpoint", help="diffusers pipeline folder (model_index.json, text encoders, tokenizers, "
                                      "transformer, vae, scheduler) or Hugging Face repo id (org/name[@revision])")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (one batch)")
    p.add_argument("--prompts-file", help="text file with one prompt per line (added after --prompt)")
    p.add_argument("--negative-prompt", help="SD3 only: what to steer away from with CFG (default empty)")
    p.add_argument("--num-images", type=POSITIVE, default=1, help="images per prompt")
    _add_run_settings(p, text_len=False)
    p.add_argument("--guidance", type=NON_NEGATIVE,
                   help="FLUX-dev distilled guidance / SD3 CFG scale (default 3.5 / 7.0)")
    p.add_argument("--seed", type=SEED, default=0, help=SEED_HELP)
    p.add_argument("--max-sequence-length", type=SEQUENCE_LENGTH,
                   help="T5 tokens; " + FROM_PLAN.format("FLUX-dev 512, schnell 256, SD3 256"))
    p.add_argument("--plan", help="compression plan (.json from `ditfa calibrate`); its settings are the defaults")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="parameter dtype of every component (auto: the checkpoint's)")
    p.add_argument("--offload-text-encoders", action="store_true",
                   help="keep text encoders in host memory after encoding (frees ~9.5 GB of T5-XXL on the GPU)")
    p.add_argument("--out", default="outputs/images", help="folder for the PNGs")
    p.add_argument("--name", default="image_", type=_file_prefix,
                   help="file name prefix: <out>/<name>000.png, ... (no '/': the files stay in --out)")
    _add_fp8(p, "; default: the plan's (methods.linear), else none")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same names")
    _add_devices(p, "N on the head axis (attention head-parallel, the rest split over tokens), or D x H with the "
                    "images (x2 with CFG) over D")
    p.set_defaults(func=cmd_generate)

    p = add("bench", help="time encode / denoise / decode and peak memory, dense and with a plan",
            description="Run the full pipeline of a folder on one prompt repeated --batch times: a warm-up call "
                        "(compiles), then --repeat timed calls; reports the best time of each stage "
                        "(device-synchronised) and JAX's peak device memory so far (the dense run comes first, "
                        "so the plan row's peak includes it). Text encoders are offloaded to host memory after "
                        "encoding. With --plan, its settings are the defaults.")
    p.add_argument("checkpoint", help="diffusers pipeline folder or Hugging Face repo id")
    p.add_argument("--plan", help="compression plan (.json) for these settings, timed after the dense run")
    p.add_argument("--prompt", default="a photo of a red fox in the snow", help="the prompt to encode")
    p.add_argument("--batch", type=POSITIVE, default=1, help="images per call")
    _add_run_settings(p, text_len=False)
    p.add_argument("--guidance", type=NON_NEGATIVE,
                   help="FLUX-dev distilled guidance / SD3 CFG scale (default 3.5 / 7.0)")
    p.add_argument("--max-sequence-length", type=SEQUENCE_LENGTH,
                   help="T5 tokens; " + FROM_PLAN.format("FLUX-dev 512, schnell 256, SD3 256"))
    p.add_argument("--repeat", type=POSITIVE, default=2, help="timed calls after the warm-up (best is reported)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="parameter dtype (auto: the checkpoint's)")
    p.add_argument("--out", help="write the rows as JSON lines here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_bench)

    p = add("demo", help="calibrate + generate dense vs compressed on the embedded testbed model",
            description="Search a plan for the trained testbed model (shipped in the package), generate held-out "
                        "captions densely and with the plan from the same noise, and write the plan, heatmap, "
                        "images, a side-by-side comparison and a report.")
    p.add_argument("--out", default="outputs/demo", help="folder to write (refused if it exists, see --overwrite)")
    p.add_argument("--testbed", choices=("v1", "v2"), default="v2",
                   help="which shipped testbed: v2 (SD3 MMDiT, CFG, up to 5 textured objects) or v1 (FLUX-style, "
                        "up to 3 plain shapes)")
    p.add_argument("--checkpoint", help="testbed folder or repo id (default: the --testbed weights shipped in "
                                        "ditfa_jax/testbed)")
    p.add_argument("--prompts", type=POSITIVE, default=4, help="held-out captions to generate")
    p.add_argument("--calibration-prompts", type=POSITIVE, default=4, help="training captions the plan search uses")
    p.add_argument("--steps", type=STEPS, help="denoising steps (default: the testbed's 20)")
    p.add_argument("--delta", type=NON_NEGATIVE,
                   help="RSE budget per (step, layer) (default: ditfa_jax.testbed.demo's)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the captions drawn, the calibration noise and the "
                                                       "generated images' noise")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=cmd_demo)
    for command in sub.choices.values():
        command.set_defaults(parser=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command: 0 done; 2 refused (a bad request: nothing was written); 1 failed (NaN/Inf, out of memory, I/O:
    nothing half-written). Both errors are one line on stderr; anything else is a bug and shows its traceback."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # reported by the command's parser, so the message names the command
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"ditfa {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (FloatingPointError, MemoryError, OSError) as e:  # FloatingPointError: denoise.NonFiniteError
        print(f"ditfa {args.command}: failed: {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
