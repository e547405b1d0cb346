"""The training recipe of the testbed models: rectified flow on a synthetic world, optax, one seed.

Each step draws a batch of training-split scenes of the testbed's world on the host (captions, word ids; with
caption dropout, a share of the captions replaced by the empty one, the uncond branch of CFG), renders them on the
device inside the jitted step, and regresses the velocity ``noise - x0`` at ``x_t = (1 - sigma) x0 + sigma noise``
with sigma logit-normal (SD3's choice). The forward pass is the sampler's (`embed`, the block stacks, `unembed`),
the timestep given as the family's pipeline gives it.
Parameters are fp32 (AdamW, gradient clipping, an EMA whose weights are the ones shipped); the forward pass runs in
``compute_dtype``. The adaLN modulations and the final projection start at zero, so every block starts as the
identity (DiT's adaLN-Zero).

    python -m ditfa_jax.testbed.train --out runs/testbed --steps 6000 [--testbed v2]

writes a testbed folder (`ditfa_jax.testbed.pipeline`) with the EMA weights in bf16, ``training.json`` (this
recipe, the loss curve, throughput, device) and ``loss.png``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from ditfa_jax.attention import AttentionSettings
from ditfa_jax.family import family_of, layout_for
from ditfa_jax.loading import Transformer
from ditfa_jax.models.layers import run_stacks
from ditfa_jax.testbed.model import TextEncoder, TextEncoderConfig
from ditfa_jax.testbed.testbeds import Testbed, get_testbed, images_to_latents
from ditfa_jax.testbed.tokenizer import WordTokenizer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 6000
    batch_size: int = 128
    learning_rate: float = 4e-4
    warmup_steps: int = 250
    decay: bool = False  # after warm-up, decay the learning rate linearly to 0 at `steps` (else constant)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    compute_dtype: str = "bfloat16"
    attention_impl: str = "auto"
    log_every: int = 50
    time_limit_s: float | None = None  # stop after this much training time (the steps reached are recorded)
    init_from: str | None = None  # start from a testbed folder's weights (a continued run; its record is kept)
    testbed: str = "v1"  # which world and model (`ditfa_jax.testbed.testbeds`)
    caption_dropout: float | None = None  # share of empty captions (None: the testbed's, 0 for v1)
    data_workers: int = 0  # host processes drawing batches (0: one thread, one random stream; see `BatchSource`)
    steps_per_call: int = 1  # optimizer steps per jitted call (a scan over that many batches: less dispatch)


class TestbedModel(nnx.Module):
    """Text encoder + MMDiT as one module, so one optimizer and one EMA cover both."""

    def __init__(self, vocab_size: int, testbed: Testbed, *, dtype=jnp.float32, rngs: nnx.Rngs):
        config = testbed.model.TRANSFORMER_CONFIG
        self.text_encoder = TextEncoder(TextEncoderConfig(vocab_size=vocab_size, max_length=testbed.model.TEXT_LENGTH),
                                        rngs=rngs)
        self.transformer = family_of(config).module_class(config, dtype=dtype, rngs=rngs)

    def __call__(self, latents, ids, mask, sigma, layout, rope, settings: AttentionSettings):
        """The velocity at noise level sigma [B], as the sampler evaluates it (no guidance)."""
        text, pooled = self.text_encoder(ids, mask)
        family = family_of(self.transformer.config)
        timestep = family.model_timestep(1000 * sigma)  # the scheduler's timestep, as the family's model takes it
        carry, temb = self.transformer.embed(latents, text, pooled, timestep)
        carry, _ = run_stacks(self.transformer, carry, temb, rope, None, layout, settings)
        return self.transformer.unembed(carry, temb, layout)


def _zero_init(state) -> None:
    """adaLN-Zero: zero every adaLN modulation (`norm*.linear`) and the final `proj_out`."""
    for path, var in nnx.to_flat_state(state):
        names = [str(p) for p in path]
        if names[0] != "transformer":
            continue
        adaln = len(names) >= 3 and names[-3].startswith("norm") and names[-2] == "linear"
        if adaln or names[1:] in (["proj_out", "kernel"], ["proj_out", "bias"]):
            var.set_value(jnp.zeros_like(var.get_value()))


def init_model(vocab_size: int, seed: int, compute_dtype=jnp.float32, testbed: str = "v1") -> TestbedModel:
    """The model whose layers compute in ``compute_dtype`` (the transformer's Linear layers fix their computation
    dtype at construction; the text encoder's follow its parameters)."""
    model = TestbedModel(vocab_size, get_testbed(testbed), dtype=compute_dtype, rngs=nnx.Rngs(seed))
    _zero_init(nnx.state(model, nnx.Param))
    return model


def _load_weights(folder: str, params):
    """(params filled from a testbed folder's weights in fp32, that folder's training record or None)."""
    from ditfa_jax.testbed.pipeline import TestbedPipeline

    pipe = TestbedPipeline.from_pretrained(folder, dtype=jnp.float32)
    loaded = {"transformer": nnx.to_flat_state(pipe.transformer.state),
              "text_encoder": nnx.to_flat_state(nnx.state(pipe.text_encoder, nnx.Param))}
    flat = {(part,) + tuple(path): var for part, state in loaded.items() for path, var in state}
    for path, var in nnx.to_flat_state(params):
        source = flat[tuple(path)]
        if source.get_value().shape != var.get_value().shape:
            raise ValueError(f"{folder}: {'/'.join(map(str, path))} has shape {source.get_value().shape}, expected "
                             f"{var.get_value().shape}")
        var.set_value(source.get_value().astype(jnp.float32))
    record = Path(folder) / "training.json"
    return params, (json.loads(record.read_text()) if record.is_file() else None)


def testbed_layout(testbed: Testbed):
    """(token layout, positional tables or None) of the testbed's images and captions, as the sampler builds them."""
    config, size = testbed.model.TRANSFORMER_CONFIG, testbed.world.IMAGE_SIZE
    layout = layout_for(config, height=size, width=size, text_len=testbed.model.TEXT_LENGTH, vae_scale_factor=1)
    rope = family_of(config).positions(config, layout, None)
    return layout, None if rope is None else tuple(jnp.asarray(t) for t in rope)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    if not cfg.decay:
        return _adamw(warmup, cfg)  # constant after warm-up: any stop (a time limit) is fine
    if cfg.steps <= cfg.warmup_steps:
        raise ValueError(f"decay: steps {cfg.steps} must exceed warmup_steps {cfg.warmup_steps}")
    fall = optax.linear_schedule(cfg.learning_rate, 0.0, cfg.steps - cfg.warmup_steps)
    return _adamw(optax.join_schedules([warmup, fall], [cfg.warmup_steps]), cfg)


def _adamw(schedule, cfg: TrainConfig) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay, mask=decay_mask))


def make_train_step(graphdef, buffers, tx, cfg: TrainConfig):
    """Jitted (params, opt_state, ema, scenes, ids, mask, key, first_step) -> (params, opt_state, ema, losses):
    ``cfg.steps_per_call`` optimizer steps scanned over batches stacked on a leading axis, step i drawing its noise
    from ``fold_in(key, i)``; ``buffers`` are the model's fixed non-parameter state (SD3's position table)."""
    testbed = get_testbed(cfg.testbed)
    layout, rope = testbed_layout(testbed)
    config, render = testbed.model.TRANSFORMER_CONFIG, testbed.world.render
    settings = AttentionSettings(implementation=cfg.attention_impl)
    dtype = jnp.dtype(cfg.compute_dtype)

    def loss_fn(params, scenes, ids, mask, key):
        x0 = images_to_latents(config, render(**scenes))
        key_noise, key_sigma = jax.random.split(key)
        noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
        sigma = jax.nn.sigmoid(jax.random.normal(key_sigma, (x0.shape[0],), jnp.float32))
        s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
        x_t = (1 - s) * x0 + s * noise
        compute = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
        v = nnx.merge(graphdef, compute, buffers)(x_t.astype(dtype), ids, mask, sigma, layout, rope, settings)
        return jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - x0)))

    def one_step(key, state, batch):
        params, opt_state, ema = state
        scenes, ids, mask, index = batch
        loss, grads = jax.value_and_grad(loss_fn)(params, scenes, ids, mask, jax.random.fold_in(key, index))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + index) / (10.0 + index))  # short warm-up of the average
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return (params, opt_state, ema), loss

    @jax.jit
    def steps(params, opt_state, ema, scenes, ids, mask, key, first_step):
        indices = first_step + jnp.arange(cfg.steps_per_call)
        (params, opt_state, ema), losses = jax.lax.scan(functools.partial(one_step, key), (params, opt_state, ema),
                                                        (scenes, ids, mask, indices))
        return params, opt_state, ema, losses

    return steps


def _batch(rng: np.random.Generator, testbed: Testbed, tokenizer: WordTokenizer, n: int, caption_dropout: float):
    """Training-split scenes (render arguments), their word ids and mask; dropped captions are empty (all padding)."""
    world = testbed.world
    scenes = world.sample_scenes(rng, n, split="train")
    ids, mask = tokenizer.encode(world.captions(scenes), max_length=testbed.model.TEXT_LENGTH)
    if caption_dropout > 0:
        keep = rng.random(n) >= caption_dropout
        ids, mask = ids * keep[:, None], mask & keep[:, None]
    return scenes.arrays(), ids, mask


def _stack(batches):
    """Batches stacked on a new leading axis (the scan axis of a training call)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)


_worker_state: dict = {}
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start_worker(testbed_name: str) -> None:
    testbed = get_testbed(testbed_name)
    _worker_state.update(testbed=testbed, tokenizer=WordTokenizer.from_file(testbed.tokenizer_file))


def _draw_numbered(seed: int, index: int, n: int, caption_dropout: float):
    """Batch ``index`` of a run, from its own random stream (so it does not depend on which process draws it)."""
    rng = np.random.default_rng((seed, index))
    return _batch(rng, _worker_state["testbed"], _worker_state["tokenizer"], n, caption_dropout)


class BatchSource:
    """The training batches, drawn on the host ahead of the device.

    ``workers=0``: one thread and one random stream seeded by ``seed`` (the recipe of the shipped v1 model).
    ``workers>0``: that many processes, batch i from the stream ``(seed, i)``: the same batches for any worker
    count, and a host that keeps up with the device (one thread draws ~8k scenes/s, below what an H200 trains on).
    ``waited_s`` is the time the device loop spent waiting for a batch.
    """

    def __init__(self, testbed: Testbed, tokenizer: WordTokenizer, cfg: TrainConfig, caption_dropout: float):
        if cfg.data_workers < 0:
            raise ValueError(f"data_workers {cfg.data_workers}: expected >= 0")
        self.waited_s = 0.0
        if cfg.data_workers == 0:
            rng = np.random.default_rng(cfg.seed)
            self._pool = ThreadPoolExecutor(max_workers=1)
            self._submit = lambda: self._pool.submit(_batch, rng, testbed, tokenizer, cfg.batch_size,
                                                     caption_dropout)
            self._queue = collections.deque([self._submit()])
            return
        indices = itertools.count()
        self._pool = ProcessPoolExecutor(cfg.data_workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker, initargs=(testbed.name,))
        self._submit = lambda: self._pool.submit(_draw_numbered, cfg.seed, next(indices), cfg.batch_size,
                                                 caption_dropout)
        saved = {name: os.environ.get(name) for name in _ONE_THREAD}
        os.environ.update(_ONE_THREAD)  # the workers spawned now draw on one core each (no spinning thread pools)
        try:
            self._queue = collections.deque(self._submit() for _ in range(2 * cfg.data_workers))
        finally:
            for name, value in saved.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value

    def next(self):
        """(scenes, ids, mask) of the next step."""
        start = time.perf_counter()
        batch = self._queue.popleft().result()
        self.waited_s += time.perf_counter() - start
        self._queue.append(self._submit())
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def train(cfg: TrainConfig, *, progress: bool = True) -> tuple[TestbedModel, dict]:
    """Train from scratch; returns (the EMA model in fp32, the training record)."""
    testbed = get_testbed(cfg.testbed)
    dropout = testbed.model.CAPTION_DROPOUT if cfg.caption_dropout is None else cfg.caption_dropout
    if not 0 <= dropout < 1:
        raise ValueError(f"caption_dropout {dropout}: expected a share in [0, 1)")
    tokenizer = WordTokenizer.from_file(testbed.tokenizer_file)
    model = init_model(tokenizer.vocab_size, cfg.seed, jnp.dtype(cfg.compute_dtype), cfg.testbed)
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)  # fp32 master weights
    previous = None
    if cfg.init_from:
        params, previous = _load_weights(cfg.init_from, params)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    ema = jax.tree_util.tree_map(jnp.copy, params)
    step_fn = make_train_step(graphdef, buffers, tx, cfg)
    key = jax.random.key(cfg.seed)
    curve, window, start, steps_done = [], [], None, 0
    per_call = cfg.steps_per_call
    if per_call < 1 or cfg.steps % per_call or cfg.log_every % per_call:
        raise ValueError(f"steps_per_call {per_call}: expected >= 1 and dividing steps {cfg.steps} and log_every "
                         f"{cfg.log_every}")
    bar = tqdm(total=cfg.steps, desc="training testbed", unit="step", disable=not progress)
    batches = BatchSource(testbed, tokenizer, cfg, dropout)
    for first in range(0, cfg.steps, per_call):
        scenes, ids, mask = _stack([batches.next() for _ in range(per_call)])
        params, opt_state, ema, losses = step_fn(params, opt_state, ema, scenes, ids, mask, key, first)
        window.append(losses)
        steps_done = first + per_call
        bar.update(per_call)
        if first == 0:
            jax.block_until_ready(losses)
            start = time.perf_counter()  # the first call includes compilation
        if steps_done % cfg.log_every == 0 or steps_done == cfg.steps:
            mean = float(np.mean(jax.device_get(window)))
            curve.append((steps_done, round(mean, 5)))
            window = []
            bar.set_postfix(loss=f"{mean:.4f}")
            if not math.isfinite(mean):
                raise FloatingPointError(f"training diverged: mean loss {mean} at step {steps_done}")
            if cfg.time_limit_s is not None and time.perf_counter() - start > cfg.time_limit_s:
                break
    batches.close()
    bar.close()
    jax.block_until_ready(ema)
    seconds = time.perf_counter() - start
    record = {"recipe": {**dataclasses.asdict(cfg), "caption_dropout": dropout}, "steps_done": steps_done,
              "loss_curve": curve,
              "train_seconds_after_compile": round(seconds, 1),
              "steps_per_second": round((steps_done - per_call) / max(seconds, 1e-9), 2),
              "host_wait_seconds": round(batches.waited_s, 1),
              "parameters": int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
              "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "command": _command(cfg, steps_done),
              "continued_from": previous}
    nnx.update(model, ema)
    return model, record


def _command(cfg: TrainConfig, steps_done: int) -> str:
    """The command that reruns this recipe (a constant-rate run stopped by its time limit: the steps it reached)."""
    words = []
    for k, v in dataclasses.asdict(cfg).items():
        if v is None or v is False or k == "time_limit_s":
            continue
        v = steps_done if k == "steps" and not cfg.decay else v
        words.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return "python -m ditfa_jax.testbed.train " + " ".join(words)


def save_loss_plot(curve, path: Path) -> None:
    """Loss curve as a small PNG (log scale), drawn with Pillow."""
    from PIL import Image, ImageDraw

    w, h, pad = 480, 240, 36
    steps = np.array([s for s, _ in curve], float)
    loss = np.log10(np.array([v for _, v in curve], float))
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    x = pad + (steps - steps.min()) / max(np.ptp(steps), 1) * (w - 2 * pad)
    y = h - pad - (loss - loss.min()) / max(np.ptp(loss), 1e-9) * (h - 2 * pad)
    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    draw.line(list(zip(x.tolist(), y.tolist())), fill=(31, 119, 180), width=2)
    draw.text((pad, 8), f"training loss (log10), {10 ** loss.max():.3f} -> {10 ** loss[-1]:.4f}", fill="black")
    draw.text((pad, h - pad + 6), f"step {int(steps.min())}", fill="black")
    draw.text((w - pad - 70, h - pad + 6), f"step {int(steps.max())}", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    from ditfa_jax.testbed.pipeline import save_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="testbed folder to write (must not exist)")
    for field in dataclasses.fields(TrainConfig):
        kind = {"steps": int, "batch_size": int, "warmup_steps": int, "seed": int, "log_every": int,
                "data_workers": int, "steps_per_call": int}.get(field.name)
        kind = kind or (str if field.name in ("compute_dtype", "attention_impl", "init_from", "testbed") else float)
        if field.type in (bool, "bool"):
            parser.add_argument(f"--{field.name.replace('_', '-')}", action="store_true")
            continue
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; choose a new folder")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    testbed = get_testbed(cfg.testbed)
    model, record = train(cfg)
    transformer = Transformer(testbed.model.TRANSFORMER_CONFIG, *nnx.split(model.transformer))
    save_pipeline(out, transformer, model.text_encoder, scheduler=testbed.model.SCHEDULER,
                  tokenizer_file=testbed.tokenizer_file, training=record, testbed=testbed.name,
                  guidance_scale=testbed.model.GUIDANCE_SCALE, image_size=testbed.world.IMAGE_SIZE)
    save_loss_plot(record["loss_curve"], out / "loss.png")
    print(json.dumps({k: v for k, v in record.items() if k != "loss_curve"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
