"""A distribution-level quality score: the Fréchet distance between generated images and ground-truth renders of the
same captions, in the feature space of a small CNN trained on world renders.

PSNR / SSIM against dense punish any sample that differs from dense, even a valid one (another position for an
unspecified attribute, another texture). A Fréchet distance compares two *distributions* of features (mean and
covariance), as FID does with Inception; Inception does not know this world's 64 px renders, so the features come
from :class:`FeatureNet`, trained here to name a scene's attributes (multi-hot labels: which colour/shape pairs are
present, where, on which background) from its render. It is meant to train in about a minute on a GPU (not yet
measured there; on 2 CPU cores a step of 64 images takes ~0.5 s), is seeded and small enough to ship (340k fp32
parameters, 1.4 MB).

    python -m ditfa_jax.testbed.features --world v1 --out runs/features --steps 1500 --seed 0

writes a folder (``config.json``, ``model.safetensors``, ``training.json``) that :func:`load_feature_net` reads.
The world supplies the training data through ``draw_batch(rng, n) -> (images, labels)``, so any world works;
:func:`world_draw_batch` builds it from a world module (``sample_scenes``, ``render_scenes``, and
``attribute_labels`` or this module's :func:`v1_attribute_labels`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ditfa_jax.files import atomic_folder
from ditfa_jax.testbed.params import fill_params, flat_params

__all__ = ["FeatureNetConfig", "FeatureNet", "FrechetScore", "train_feature_net", "save_feature_net",
           "load_feature_net", "embed_images", "frechet_distance", "frechet_score", "v1_attribute_labels",
           "world_draw_batch"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "training.json"

DrawBatch = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------------------------------------------
# The network


@dataclasses.dataclass(frozen=True)
class FeatureNetConfig:
    """A stem conv at full resolution, then one stride-2 3x3 conv per entry of ``channels`` (64 -> 4 px), a linear
    from the flattened last map to ``feature_dim`` (the embedding; flattened, not pooled, so that it keeps where
    things are) and a linear head to ``num_labels`` logits."""

    num_labels: int
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 96, 128)
    feature_dim: int = 64

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.num_labels < 1 or self.feature_dim < 1 or not self.channels or min(self.channels) < 1:
            raise ValueError(f"FeatureNetConfig: expected num_labels, feature_dim and channels >= 1, got "
                             f"num_labels={self.num_labels}, feature_dim={self.feature_dim}, "
                             f"channels={self.channels}")
        if self.image_size % 2 ** len(self.channels):
            raise ValueError(f"FeatureNetConfig: image_size {self.image_size} is not divisible by "
                             f"2**{len(self.channels)} (one halving per entry of channels {self.channels})")


class FeatureNet(nnx.Module):
    """Images [N, H, W, 3] in [0, 1] -> (embedding [N, feature_dim], logits [N, num_labels]); fp32, no
    normalisation layers (so the features keep each image's contrast and noise level, which the score must see)."""

    def __init__(self, config: FeatureNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        c0 = config.channels[0]
        self.stem = nnx.Conv(3, c0, (3, 3), padding="SAME", rngs=rngs)
        widths = (c0,) + config.channels
        self.down = nnx.List([nnx.Conv(a, b, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
                              for a, b in zip(widths[:-1], widths[1:])])
        side = config.image_size // 2 ** len(config.channels)
        self.embed = nnx.Linear(config.channels[-1] * side * side, config.feature_dim, rngs=rngs)
        self.head = nnx.Linear(config.feature_dim, config.num_labels, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.stem(images * 2.0 - 1.0))
        for conv in self.down:
            x = jax.nn.gelu(conv(x))
        return self.embed(x.reshape(x.shape[0], -1))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = self.features(images)
        return features, self.head(features)


def num_parameters(net: FeatureNet) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(nnx.state(net, nnx.Param))))


# ----------------------------------------------------------------------------------------------------------------
# Labels and data from a world


def v1_attribute_labels(scenes) -> np.ndarray:
    """Multi-hot float32 [N, 110] for the v1 world: each (colour, shape) pair present (8 x 4), each colour in each
    region (8 x 9), the background one-hot (6)."""
    from ditfa_jax.testbed import world

    n_col, n_shape, n_reg = len(world.COLOURS), len(world.SHAPES), len(world.REGIONS)
    n = len(scenes)
    present = scenes.shape >= 0
    rows = np.broadcast_to(np.arange(n)[:, None], scenes.shape.shape)[present]
    colour_shape = np.zeros((n, n_col * n_shape), np.float32)
    colour_shape[rows, (scenes.colour * n_shape + scenes.shape)[present]] = 1
    colour_region = np.zeros((n, n_col * n_reg), np.float32)
    colour_region[rows, (scenes.colour * n_reg + scenes.region)[present]] = 1
    background = np.eye(len(world.BACKGROUNDS), dtype=np.float32)[scenes.background]
    return np.concatenate([colour_shape, colour_region, background], axis=1)


def world_draw_batch(world_module, labels: Callable | None = None, *, split: str = "any") -> DrawBatch:
    """``draw_batch(rng, n) -> (renders, labels)`` from a world module with ``sample_scenes(rng, n, split=...)`` and
    ``render_scenes(scenes)``; labels: ``labels(scenes)``, default the module's ``attribute_labels``."""
    labels = labels or getattr(world_module, "attribute_labels", None)
    if labels is None:
        raise ValueError(f"{world_module.__name__} has no attribute_labels(scenes); pass labels=")

    def draw_batch(rng: np.random.Generator, n: int):
        scenes = world_module.sample_scenes(rng, n, split=split)
        return world_module.render_scenes(scenes), np.asarray(labels(scenes), np.float32)

    return draw_batch


def _check_batch(images, labels, n: int, num_labels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.float32)
    if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
        raise ValueError(f"draw_batch: expected images [{n}, H, W, 3], got shape {images.shape}")
    if labels.ndim != 2 or labels.shape[0] != n or (num_labels is not None and labels.shape[1] != num_labels):
        raise ValueError(f"draw_batch: expected labels [{n}, {num_labels or 'L'}], got shape {labels.shape}")
    return images, labels


# ----------------------------------------------------------------------------------------------------------------
# Training


def _label_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    guess = logits > 0
    truth = labels > 0.5
    positives = truth.sum()
    return {"label_accuracy": round(float(np.mean(guess == truth)), 5),
            "positive_recall": round(float((guess & truth).sum() / max(positives, 1)), 5),
            "exact_match": round(float(np.mean(np.all(guess == truth, axis=1))), 5)}


@functools.lru_cache(maxsize=8)
def _training_step(graphdef, steps: int, learning_rate: float):
    """(warm-up steps, optimizer, jitted step) of one recipe; cached so that runs of one recipe compile once."""
    import optax

    warmup = min(100, max(steps // 10, 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                  end_value=learning_rate * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))

    def loss_fn(params, images, labels):
        _, logits = nnx.merge(graphdef, params)(images)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

    @jax.jit
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return warmup, tx, step


def train_feature_net(draw_batch: DrawBatch, *, num_labels: int, steps: int = 1500, batch_size: int = 128,
                      learning_rate: float = 2e-3, seed: int = 0, progress: bool = True,
                      config: FeatureNetConfig | None = None, heldout_size: int = 512,
                      log_every: int = 50) -> tuple[FeatureNet, dict]:
    """Train a FeatureNet to predict the multi-hot labels of renders drawn by ``draw_batch(rng, n)`` (sigmoid
    cross-entropy, AdamW with warm-up and cosine decay). Seeded: one seed gives one set of weights on one machine.
    Returns (net, record): the recipe, loss curve and label accuracy on a fresh held-out batch."""
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_feature_net: expected steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    config = config or FeatureNetConfig(num_labels=num_labels)
    if config.num_labels != num_labels:
        raise ValueError(f"train_feature_net: num_labels {num_labels} but config.num_labels {config.num_labels}")
    net = FeatureNet(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(net, nnx.Param)
    warmup, tx, step = _training_step(graphdef, steps, learning_rate)
    opt_state = tx.init(params)

    rng = np.random.default_rng(seed)
    curve, window, start = [], [], None
    for index in tqdm(range(steps), desc="training feature net", unit="step", disable=not progress):
        images, labels = _check_batch(*draw_batch(rng, batch_size), batch_size, num_labels)
        if images.shape[1:3] != (config.image_size,) * 2:
            raise ValueError(f"draw_batch: images of {images.shape[1]}x{images.shape[2]} px, expected "
                             f"{config.image_size}x{config.image_size} (config.image_size)")
        params, opt_state, loss = step(params, opt_state, images, labels)
        window.append(loss)
        if index == 0:
            jax.block_until_ready(loss)
            start = time.perf_counter()  # the first step includes compilation
        if (index + 1) % log_every == 0 or index + 1 == steps:
            mean = float(np.mean(jax.device_get(window)))
            curve.append((index + 1, round(mean, 5)))
            window = []
            if not math.isfinite(mean):
                raise FloatingPointError(f"feature net training diverged: mean loss {mean} at step {index + 1}")
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    nnx.update(net, params)
    held_images, held_labels = _check_batch(*draw_batch(np.random.default_rng([seed, 1]), heldout_size),
                                            heldout_size, num_labels)
    logits = np.concatenate([np.asarray(_logits(net, jnp.asarray(held_images[i:i + 256])))
                             for i in range(0, heldout_size, 256)])
    record = {"recipe": {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
                         "warmup_steps": warmup, "schedule": "warmup + cosine to 5 %", "weight_decay": 1e-4,
                         "grad_clip": 1.0, "loss": "sigmoid cross-entropy"},
              "config": dataclasses.asdict(config), "parameters": num_parameters(net), "loss_curve": curve,
              "heldout": {"size": heldout_size, **_label_metrics(logits, held_labels)},
              "train_seconds_after_compile": round(seconds, 1),
              "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    return net, record


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


def save_feature_net(net: FeatureNet, folder: str | Path, *, record: dict | None = None,
                     overwrite: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (fp32, flat NNX paths) [+ ``training.json``] atomically."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(net.config), indent=2))
        save_file(flat_params(net, jnp.float32), str(tmp / WEIGHTS_FILE))
        if record is not None:
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
    return folder


def load_feature_net(folder: str | Path) -> FeatureNet:
    """Read a folder written by :func:`save_feature_net`; errors name the file and the missing or misshapen tensor."""
    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; expected a feature net folder written by save_feature_net")
    raw = json.loads(cfg_path.read_text())
    known = {f.name for f in dataclasses.fields(FeatureNetConfig)}
    if sorted(set(raw) - known) or "num_labels" not in raw:
        raise ValueError(f"{cfg_path}: fields {sorted(raw)}; expected num_labels and a subset of {sorted(known)}")
    config = FeatureNetConfig(**raw)
    net = nnx.eval_shape(lambda: FeatureNet(config, rngs=nnx.Rngs(0)))
    nnx.update(net, fill_params(nnx.state(net, nnx.Param), weights, jnp.float32))
    return net


# ----------------------------------------------------------------------------------------------------------------
# Embedding and the distance


@nnx.jit
def _logits(net: FeatureNet, images: jax.Array) -> jax.Array:
    return net(images)[1]


@nnx.jit
def _features(net: FeatureNet, images: jax.Array) -> jax.Array:
    return net.features(images)


def embed_images(net: FeatureNet, images, batch_size: int = 256) -> np.ndarray:
    """Embeddings float64 [N, feature_dim] of images [N, H, W, 3] (float in [0, 1] or uint8), ``batch_size`` at a
    time (the last batch is padded, so one compilation serves any N)."""
    images = np.asarray(images)
    size = net.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"embed_images: expected images [N, {size}, {size}, 3], got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"embed_images: batch_size must be >= 1, got {batch_size}")
    scale = 1 / 255 if images.dtype == np.uint8 else 1.0
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size].astype(np.float32) * np.float32(scale)
        n = len(chunk)
        if n < batch_size and len(images) > batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.float32)])
        out.append(np.asarray(_features(net, jnp.asarray(chunk)), np.float64)[:n])
    return np.concatenate(out) if out else np.zeros((0, net.config.feature_dim), np.float64)


def frechet_distance(features_a, features_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] and [M, D]:
    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, as FID computes it (scipy's sqrtm, imaginary parts
    from rounding discarded, ``eps * I`` added to both covariances when their product has no finite root)."""
    from scipy import linalg

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: expected two feature sets [N, D] and [M, D] of one D, got shapes "
                         f"{a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance: expected at least 2 samples per set (a covariance), got {len(a)} and "
                         f"{len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("frechet_distance: the features hold NaN or inf")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # a singular product is handled below, as FID does
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        offset = np.eye(len(cov_a)) * eps
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.real(root)
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root), 0.0))


@dataclasses.dataclass(frozen=True)
class FrechetScore:
    """A Fréchet distance with the sample counts it was measured on (its absolute value depends on them)."""

    distance: float
    num_images: int
    num_reference: int
    feature_dim: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def frechet_score(net: FeatureNet, images, reference_images, *, batch_size: int = 256) -> FrechetScore:
    """Fréchet distance between generated ``images`` and ``reference_images`` (ground-truth renders of the same
    captions) in ``net``'s feature space; lower is better, ~0 for two samples of one distribution.

    It compares distributions, not image pairs: a valid sample that differs from its reference (another position
    for an unspecified attribute, another texture) is not punished as long as the set of samples looks like the
    set of renders. The estimate is biased upwards by a finite sample (roughly in proportion to feature_dim / N),
    so compare scores measured on the same number of images and report N beside the value."""
    return FrechetScore(frechet_distance(embed_images(net, images, batch_size),
                                         embed_images(net, reference_images, batch_size)),
                        len(images), len(reference_images), net.config.feature_dim)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _world(name: str) -> DrawBatch:
    if name == "v1":
        from ditfa_jax.testbed import world

        return world_draw_batch(world, v1_attribute_labels)
    if name == "v2":
        try:  # built separately; imported only when asked for
            from ditfa_jax.testbed.v2 import world as world_v2
        except ImportError as err:
            raise SystemExit(f"--world v2: cannot import ditfa_jax.testbed.v2.world ({err})") from None

        return world_draw_batch(world_v2)
    raise ValueError(f"--world: expected 'v1' or 'v2', got {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=("v1", "v2"), required=True, help="the world whose renders to train on")
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; choose a new folder")
    draw_batch = _world(args.world)
    _, probe = draw_batch(np.random.default_rng([args.seed, 2]), 2)
    net, record = train_feature_net(draw_batch, num_labels=probe.shape[1], steps=args.steps,
                                    batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed)
    record["world"] = args.world
    record["command"] = (f"python -m ditfa_jax.testbed.features --world {args.world} --out {out} --steps "
                         f"{args.steps} --batch-size {args.batch_size} --learning-rate {args.learning_rate} "
                         f"--seed {args.seed}")
    save_feature_net(net, out, record=record)
    print(json.dumps({k: v for k, v in record.items() if k != "loss_curve"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
