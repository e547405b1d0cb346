"""A procedurally generated, captioned world of coloured shapes on grey backgrounds.

A scene holds 1 to ``MAX_OBJECTS`` objects, each a (shape, colour, size) in its own cell of a 3x3 grid (so objects
never overlap), with a small position jitter inside the cell, on one of a few neutral backgrounds. A
:class:`SceneBatch` stores N scenes as index arrays; :func:`captions` writes each scene as one canonical sentence
("a small red circle at the top left and a large blue square in the centre on a striped background") and
:func:`parse_caption` reads it back. :func:`render` is pure JAX (signed distances, ~1 px anti-aliased edges), so a
training step can render its batch on the accelerator inside ``jit``.

Captions are split, not scenes: a caption is held out when ``crc32(caption) % 10 == 0``, so "heldout" prompts are
combinations never seen in training. :func:`sample_scenes` stores objects in reading order of their regions, so a
scene has exactly one caption.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "IMAGE_SIZE",
    "MAX_OBJECTS",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "DIAMETERS",
    "REGIONS",
    "BACKGROUNDS",
    "CELL",
    "SceneBatch",
    "sample_scenes",
    "captions",
    "parse_caption",
    "is_heldout",
    "shape_sdfs",
    "render",
    "render_scenes",
    "to_uint8",
]

IMAGE_SIZE = 64
MAX_OBJECTS = 3
SHAPES = ("circle", "square", "triangle", "cross")
# Saturated colours with well separated hues (0, 30, 60, 125, 188, 229, 276, 328 degrees): the detector reads the
# hue, which blending with a grey background leaves unchanged.
COLOURS = {
    "red": (0.90, 0.12, 0.12),
    "orange": (0.95, 0.50, 0.05),
    "yellow": (0.90, 0.90, 0.10),
    "green": (0.10, 0.75, 0.15),
    "cyan": (0.05, 0.75, 0.85),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.15, 0.90),
    "pink": (0.95, 0.30, 0.65),
}
SIZES = ("small", "large")
DIAMETERS = (10.0, 16.0)  # px at IMAGE_SIZE: every shape fits a DIAMETER x DIAMETER box
REGIONS = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the centre", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
# Neutral backgrounds (R = G = B everywhere): three plain greys and three low-contrast textures.
BACKGROUNDS = ("grey", "light", "dark", "striped", "checked", "cloudy")

CELL = IMAGE_SIZE / 3  # side of a region cell, px
_MARGIN = 1.25  # px kept between an object's outline and its cell border (room for the anti-aliased rim)
MAX_OFFSET = tuple((CELL - d) / 2 - _MARGIN for d in DIAMETERS)  # largest jitter per axis, by size
PALETTE = np.array(list(COLOURS.values()), np.float32)
COLOUR_NAMES = tuple(COLOURS)

_FIELDS = ("shape", "colour", "size", "region", "offset", "background")
_OBJECT_PHRASES = np.array(
    [[[[f"a {s} {c} {sh} {r}" for r in REGIONS] for sh in SHAPES] for c in COLOUR_NAMES] for s in SIZES], dtype=object)
_BACKGROUND_PHRASES = np.array([f"on a {b} background" for b in BACKGROUNDS], dtype=object)


# ----------------------------------------------------------------------------------------------------------------
# Scenes


class SceneArrays:
    """Batch behaviour of a world's scene dataclass whose fields are all [N, ...] arrays (v1's and v2's
    `SceneBatch`): length, subsets, object counts, concatenation."""

    def __len__(self) -> int:
        return len(self.background)

    def __getitem__(self, idx):
        """A subset of the scenes (an integer index gives a batch of one)."""
        if isinstance(idx, (int, np.integer)):
            idx = np.array([idx])
        return type(self)(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

    @property
    def num_objects(self) -> np.ndarray:
        return (self.shape >= 0).sum(axis=1)

    @classmethod
    def concatenate(cls, batches):
        return cls(**{f.name: np.concatenate([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True, eq=False)
class SceneBatch(SceneArrays):
    """N scenes as index arrays; absent objects are -1 (offset 0) and come after the present ones."""

    shape: np.ndarray  # int32 [N, MAX_OBJECTS], index into SHAPES
    colour: np.ndarray  # int32 [N, MAX_OBJECTS], index into COLOURS
    size: np.ndarray  # int32 [N, MAX_OBJECTS], index into SIZES
    region: np.ndarray  # int32 [N, MAX_OBJECTS], index into REGIONS (3x3 grid in reading order)
    offset: np.ndarray  # float32 [N, MAX_OBJECTS, 2], (dx, dy) in px from the region cell's centre
    background: np.ndarray  # int32 [N], index into BACKGROUNDS

    def __post_init__(self):
        for name in _FIELDS:
            dtype = np.float32 if name == "offset" else np.int32
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype))
        n = self.background.shape
        for name in ("shape", "colour", "size", "region"):
            if getattr(self, name).shape != n + (MAX_OBJECTS,):
                raise ValueError(f"SceneBatch.{name}: expected shape {n + (MAX_OBJECTS,)}, "
                                 f"got {getattr(self, name).shape}")
        if self.offset.shape != n + (MAX_OBJECTS, 2):
            raise ValueError(f"SceneBatch.offset: expected shape {n + (MAX_OBJECTS, 2)}, got {self.offset.shape}")

    def arrays(self) -> dict[str, np.ndarray]:
        """The six arrays by name, in :func:`render`'s argument order: ``render(**scenes.arrays())``."""
        return {name: getattr(self, name) for name in _FIELDS}


def is_heldout(caption: str) -> bool:
    """Whether a caption belongs to the held-out split (a stable hash of the caption string)."""
    return zlib.crc32(caption.encode()) % 10 == 0


def _sample_raw(rng: np.random.Generator, n: int, min_objects: int, max_objects: int) -> SceneBatch:
    count = rng.integers(min_objects, max_objects + 1, size=n)
    present = np.arange(MAX_OBJECTS) < count[:, None]
    # distinct regions: the first MAX_OBJECTS of a random permutation, the present ones sorted into reading order
    region = np.argsort(rng.random((n, len(REGIONS))), axis=1)[:, :MAX_OBJECTS]
    region = np.sort(np.where(present, region, len(REGIONS)), axis=1)
    size = rng.integers(0, len(SIZES), (n, MAX_OBJECTS))
    reach = np.asarray(MAX_OFFSET, np.float32)[size]
    offset = rng.uniform(-1.0, 1.0, (n, MAX_OBJECTS, 2)) * reach[..., None]

    def absent(a, fill=-1):
        return np.where(present.reshape(present.shape + (1,) * (a.ndim - 2)), a, fill)

    return SceneBatch(
        shape=absent(rng.integers(0, len(SHAPES), (n, MAX_OBJECTS))),
        colour=absent(rng.integers(0, len(COLOURS), (n, MAX_OBJECTS))),
        size=absent(size),
        region=absent(region),
        offset=absent(offset, 0.0),
        background=rng.integers(0, len(BACKGROUNDS), n),
    )


def sample_scenes(rng: np.random.Generator, n: int, *, split: str = "train", min_objects: int = 1,
                  max_objects: int = MAX_OBJECTS) -> SceneBatch:
    """N random scenes whose captions are in ``split`` ("train", "heldout" or "any"); rejected scenes are redrawn."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split: expected 'train', 'heldout' or 'any', got {split!r}")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"min_objects={min_objects}, max_objects={max_objects}: "
                         f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}")
    scenes = _sample_raw(rng, n, min_objects, max_objects)
    if split == "any":
        return scenes
    want = split == "heldout"
    arrays = scenes.arrays()
    redraw = np.flatnonzero([is_heldout(c) != want for c in captions(scenes)])
    while redraw.size:
        fresh = _sample_raw(rng, redraw.size, min_objects, max_objects)
        for name, a in fresh.arrays().items():
            arrays[name][redraw] = a
        redraw = redraw[[is_heldout(c) != want for c in captions(fresh)]]
    return SceneBatch(**arrays)


# ----------------------------------------------------------------------------------------------------------------
# Captions


def captions(scenes: SceneBatch) -> list[str]:
    """One canonical caption per scene, objects in their stored order."""
    present = scenes.shape >= 0
    phrases = _OBJECT_PHRASES[scenes.size, scenes.colour, scenes.shape, scenes.region]  # -1s masked below
    phrases = np.where(present, phrases, "")
    backgrounds = _BACKGROUND_PHRASES[scenes.background]
    return [" and ".join(p for p in row if p) + " " + bg for row, bg in zip(phrases.tolist(), backgrounds)]


def _lookup(word: str, names, what: str, text: str) -> int:
    if word not in names:
        raise ValueError(f"caption {text!r}: unknown {what} {word!r}, expected one of {list(names)}")
    return list(names).index(word)


def parse_caption(text: str) -> SceneBatch:
    """The scene (a batch of one, offsets zero) that :func:`captions` would describe as ``text``."""
    words = text.lower().split()
    if len(words) < 4 or words[-4:-2] != ["on", "a"] or words[-1] != "background":
        raise ValueError(f"caption {text!r}: expected it to end with 'on a <background> background', "
                         f"got {' '.join(words[-4:])!r}")
    background = _lookup(words[-2], BACKGROUNDS, "background", text)
    chunks = [[]]
    for word in words[:-4]:
        if word == "and":
            chunks.append([])
        else:
            chunks[-1].append(word)
    if len(chunks) > MAX_OBJECTS:
        raise ValueError(f"caption {text!r}: {len(chunks)} objects, at most {MAX_OBJECTS} allowed")
    fields = {name: np.full((1, MAX_OBJECTS), -1, np.int32) for name in ("shape", "colour", "size", "region")}
    for k, chunk in enumerate(chunks):
        if len(chunk) < 5 or chunk[0] != "a":
            raise ValueError(f"caption {text!r}: object phrase {' '.join(chunk)!r} is not "
                             f"'a <size> <colour> <shape> <region>'")
        fields["size"][0, k] = _lookup(chunk[1], SIZES, "size", text)
        fields["colour"][0, k] = _lookup(chunk[2], COLOUR_NAMES, "colour", text)
        fields["shape"][0, k] = _lookup(chunk[3], SHAPES, "shape", text)
        region = _lookup(" ".join(chunk[4:]), REGIONS, "region", text)
        if region in fields["region"][0]:
            raise ValueError(f"caption {text!r}: two objects {REGIONS[region]!r}")
        fields["region"][0, k] = region
    return SceneBatch(**fields, offset=np.zeros((1, MAX_OBJECTS, 2), np.float32),
                      background=np.array([background], np.int32))


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def shape_sdfs(x, y, half, xp=jnp) -> list:
    """Signed distance (negative inside) to each of SHAPES, centred at the origin, fitting a 2*half box.

    ``y`` grows downwards (the triangle points up). Polygons take the max over their edges' half-plane distances:
    exact inside and on the outline, a slight underestimate outside near corners. ``xp`` is jnp or np.
    """
    ax, ay = xp.abs(x), xp.abs(y)
    arm = half / 3
    return [
        xp.sqrt(x * x + y * y) - half,
        xp.maximum(ax, ay) - half,
        xp.maximum(y - half, (2 * ax - y - half) / math.sqrt(5)),
        xp.minimum(xp.maximum(ax - half, ay - arm), xp.maximum(ax - arm, ay - half)),
    ]


def _background_greys(x, y) -> jax.Array:
    """Grey level [len(BACKGROUNDS), H, W] of every background at pixel centres (x, y) in IMAGE_SIZE px."""
    flat = jnp.ones_like(x + y)
    stripes = jnp.tanh(3 * jnp.sin(2 * jnp.pi * (x + y) / 8))
    checks = jnp.tanh(3 * jnp.sin(2 * jnp.pi * x / 16) * jnp.sin(2 * jnp.pi * y / 16))
    clouds = (jnp.sin(2 * jnp.pi * (0.8 * x + 0.3 * y) / 29 + 1.0)
              + jnp.sin(2 * jnp.pi * (-0.4 * x + 0.9 * y) / 23 + 2.0)
              + jnp.sin(2 * jnp.pi * (0.6 * x - 0.7 * y) / 17 + 4.0)) / 3
    # in BACKGROUNDS order: grey, light, dark, striped, checked, cloudy
    return jnp.stack([0.5 * flat, 0.75 * flat, 0.25 * flat, 0.5 + 0.06 * stripes, 0.5 + 0.06 * checks,
                      0.5 + 0.08 * clouds])


def render(shape, colour, size, region, offset, background, *, image_size: int = IMAGE_SIZE) -> jax.Array:
    """Images float32 [..., image_size, image_size, 3] in [0, 1] of scenes given as SceneBatch arrays.

    Pure JAX: jittable, and any leading batch shape works (so it also vmaps over single scenes). Geometry is in
    IMAGE_SIZE px and scales with ``image_size``; edges are anti-aliased over one output pixel.
    """
    shape, colour, size, region = (jnp.asarray(a, jnp.int32) for a in (shape, colour, size, region))
    offset = jnp.asarray(offset, jnp.float32)
    background = jnp.asarray(background, jnp.int32)
    scale = image_size / IMAGE_SIZE
    centres = (jnp.arange(image_size, dtype=jnp.float32) + 0.5) / scale
    x, y = centres[None, :], centres[:, None]
    grey = _background_greys(x, y)[background]  # [..., H, W]
    image = jnp.broadcast_to(grey[..., None], grey.shape + (3,))

    cx = (region % 3 + 0.5) * CELL + offset[..., 0]
    cy = (region // 3 + 0.5) * CELL + offset[..., 1]
    half = jnp.asarray(DIAMETERS, jnp.float32)[jnp.clip(size, 0)] / 2
    sdfs = shape_sdfs(x - cx[..., None, None], y - cy[..., None, None], half[..., None, None])  # each [..., K, H, W]
    sdf = jnp.full_like(sdfs[0], jnp.inf)  # absent objects (shape -1) stay transparent
    for i, s in enumerate(sdfs):
        sdf = jnp.where(shape[..., None, None] == i, s, sdf)
    alpha = jnp.clip(0.5 - sdf * scale, 0.0, 1.0)
    rgb = jnp.asarray(PALETTE)[jnp.clip(colour, 0)]  # [..., K, 3]
    for k in range(shape.shape[-1]):
        a = alpha[..., k, :, :, None]
        image = image * (1 - a) + a * rgb[..., k, None, None, :]
    return image


_render_jit = jax.jit(render, static_argnames="image_size")


def render_in_chunks(render_jit, scenes, *, image_size: int, batch_size: int) -> np.ndarray:
    """A world's jitted ``render`` over a scene batch, ``batch_size`` scenes at a time: float32 numpy images
    [N, image_size, image_size, 3]."""
    chunks = [np.asarray(render_jit(**scenes[i:i + batch_size].arrays(), image_size=image_size))
              for i in range(0, len(scenes), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, image_size, image_size, 3), np.float32)


def render_scenes(scenes: SceneBatch, *, image_size: int = IMAGE_SIZE, batch_size: int = 1024) -> np.ndarray:
    """Render a SceneBatch to float32 numpy images [N, image_size, image_size, 3], ``batch_size`` at a time."""
    return render_in_chunks(_render_jit, scenes, image_size=image_size, batch_size=batch_size)


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] to uint8 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(images, np.float32) * 255), 0, 255).astype(np.uint8)
