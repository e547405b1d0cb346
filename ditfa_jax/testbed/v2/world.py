"""Testbed v2 world: up to five textured, possibly overlapping objects on textured grey backgrounds, partly captioned.

A scene holds 1 to ``MAX_OBJECTS`` objects, each a (shape, colour, size, texture) at a continuous centre anywhere the
object fits, on one of ``BACKGROUNDS`` (neutral greys; the textured ones have a random angle, phases and frequency
per scene). Objects are stored (and drawn, and captioned) largest first, so a smaller object lies on top of a larger
one and stays fully visible. Overlaps are allowed but bounded: any two centres are at least
``OVERLAP * (r1 + r2)`` apart, and two objects of one colour never touch (at least ``r1 + r2 + SAME_COLOUR_GAP``),
so a detector can separate them. Object textures alternate the colour with a darker shade of it (RGB times
``DARK``, the same hue): "striped" (random angle and phase) or "dotted" (random lattice angle and phase); the
angles and phases are never in the caption. Tiny objects are always plain: at 6 px a texture period of 4 px is too
coarse to be told apart reliably (their captions may still say "plain").

Captions specify only part of a scene, so one caption has many valid images: each object phrase is
``a [size] [texture] [colour] <shape | object> [region]`` where each bracketed attribute (and the shape; the noun is
"object" when it is left out) is mentioned independently with probability ``MENTION_P``, and the background phrase
``on a <bg> background`` with probability ``BACKGROUND_P``; the positions inside a region, the texture phases and the
background's phases are never mentioned. ``mention="all"`` gives fully specified captions. A :class:`SceneBatch`
stores the truth and what its caption mentions, so :func:`captions` is a function of the batch.

Captions are split, not scenes: a caption is held out when ``crc32(caption) % 10 == 0`` (:func:`is_heldout`).
:func:`render` is pure JAX (signed distances, ~1 px anti-aliased edges, textures as smooth functions), jittable,
any leading batch shape, so a training step can render its batch on the accelerator.

``python -m ditfa_jax.testbed.v2.world`` rewrites the shipped ``tokenizer.json`` from :func:`vocabulary`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ditfa_jax.testbed.world import (COLOUR_NAMES, COLOURS, PALETTE, REGIONS, SHAPES, SceneArrays, is_heldout,
                                     render_in_chunks, shape_sdfs, to_uint8)

__all__ = [
    "IMAGE_SIZE", "MAX_OBJECTS", "SHAPES", "COLOURS", "COLOUR_NAMES", "PALETTE", "SIZES", "DIAMETERS", "TEXTURES",
    "REGIONS", "BACKGROUNDS", "BACKGROUND_GREYS", "CELL", "DARK", "ATTRIBUTES", "MENTION_P", "BACKGROUND_P",
    "LABEL_NAMES", "MAX_LENGTH", "SHIPPED_TOKENIZER",
    "SceneBatch", "CaptionSpec", "sample_scenes", "captions", "parse_caption", "is_heldout", "region_of",
    "render", "render_scenes", "to_uint8", "vocabulary", "attribute_labels",
]

IMAGE_SIZE = 64
MAX_OBJECTS = 5
SIZES = ("tiny", "small", "large")
DIAMETERS = (6.0, 11.0, 18.0)  # px at IMAGE_SIZE: every shape fits a DIAMETER x DIAMETER box
TEXTURES = ("plain", "striped", "dotted")
DARK = 0.55  # the darker shade of an object's texture: its RGB times DARK (same hue, chroma >= 0.31)
STRIPE_PERIOD = 4.0  # px, object stripes (half dark)
DOT_PERIOD = 4.0  # px, square lattice of dark dots (~1/5 of the object dark)
# Neutral backgrounds (R = G = B everywhere, so the detector's chroma test ignores them): three plain greys, then
# textures of moderate contrast (about +-0.12 around 0.5) whose angle, phases and frequency are random per scene.
BACKGROUNDS = ("grey", "light", "dark", "striped", "checked", "wavy", "grainy")
BACKGROUND_GREYS = (0.5, 0.75, 0.25)  # the plain ones; every textured one has mean ~0.5
NUM_BACKGROUND_PARAMS = 5  # (angle, phase1, phase2, phase3, frequency in [0, 1))
ATTRIBUTES = ("size", "texture", "colour", "shape", "region")  # order of SceneBatch.mentioned's last axis
MENTION_P = (0.6, 0.5, 0.8, 0.8, 0.6)  # probability that a caption mentions each of ATTRIBUTES
BACKGROUND_P = 0.6  # ... and the background

CELL = IMAGE_SIZE / 3  # side of a region cell, px
OVERLAP = 0.75  # any two centres at least OVERLAP * (r1 + r2) apart
SAME_COLOUR_GAP = 2.0  # px between the outlines (r1 + r2 + gap) of two objects of one colour
_MARGIN = 1.0  # px between an object's box and the image border
_CELL_GAP = 1.0  # px: no centre within this of a cell border (so the region of every object is unambiguous)
_HALF = np.asarray(DIAMETERS, np.float32) / 2

_FIELDS = ("shape", "colour", "size", "texture", "centre", "texture_phase", "background", "background_params")
_ALL_FIELDS = _FIELDS + ("mentioned", "background_mentioned")
_BG_PHRASES = tuple(f"on a {b} background" for b in BACKGROUNDS)

SHIPPED_TOKENIZER = Path(__file__).parent / "tokenizer.json"


# ----------------------------------------------------------------------------------------------------------------
# Scenes


def region_of(centre) -> np.ndarray:
    """3x3 grid cell (reading order, index into REGIONS) of centres [..., 2] in IMAGE_SIZE px."""
    cell = np.clip(np.floor(np.asarray(centre, np.float64) / CELL).astype(np.int32), 0, 2)
    return 3 * cell[..., 1] + cell[..., 0]


@dataclasses.dataclass(frozen=True, eq=False)
class SceneBatch(SceneArrays):
    """N scenes: the truth (what is drawn) and what each caption mentions; absent objects are -1 (zeros for the
    float arrays, False for ``mentioned``) and come after the present ones, which are in drawing order."""

    shape: np.ndarray  # int32 [N, K], index into SHAPES
    colour: np.ndarray  # int32 [N, K], index into COLOURS
    size: np.ndarray  # int32 [N, K], index into SIZES (non-increasing along K: largest drawn first)
    texture: np.ndarray  # int32 [N, K], index into TEXTURES
    centre: np.ndarray  # float32 [N, K, 2], (x, y) in IMAGE_SIZE px from the top-left corner
    texture_phase: np.ndarray  # float32 [N, K, 2], (angle in rad, phase in rad) of the stripes / dot lattice
    background: np.ndarray  # int32 [N], index into BACKGROUNDS
    background_params: np.ndarray  # float32 [N, 5], (angle, phase1, phase2, phase3, frequency in [0, 1))
    mentioned: np.ndarray  # bool [N, K, 5], which of ATTRIBUTES the caption names, per object
    background_mentioned: np.ndarray  # bool [N]

    def __post_init__(self):
        for name in _ALL_FIELDS:
            dtype = (np.float32 if name in ("centre", "texture_phase", "background_params")
                     else bool if name.endswith("mentioned") else np.int32)
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype))
        n = self.background.shape
        expected = {"centre": (MAX_OBJECTS, 2), "texture_phase": (MAX_OBJECTS, 2),
                    "background_params": (NUM_BACKGROUND_PARAMS,), "mentioned": (MAX_OBJECTS, len(ATTRIBUTES)),
                    "background_mentioned": ()}
        for name in _ALL_FIELDS[:-1]:
            want = n + expected.get(name, (MAX_OBJECTS,) if name != "background" else ())
            if getattr(self, name).shape != want:
                raise ValueError(f"SceneBatch.{name}: expected shape {want}, got {getattr(self, name).shape}")
        if self.background_mentioned.shape != n:
            raise ValueError(f"SceneBatch.background_mentioned: expected shape {n}, "
                             f"got {self.background_mentioned.shape}")

    @property
    def region(self) -> np.ndarray:
        """int32 [N, K]: the region (3x3 cell, index into REGIONS) of each object's centre, -1 for absent ones."""
        return np.where(self.shape >= 0, region_of(self.centre), -1).astype(np.int32)

    def arrays(self) -> dict[str, np.ndarray]:
        """The truth arrays by name, in :func:`render`'s argument order: ``render(**scenes.arrays())``."""
        return {name: getattr(self, name) for name in _FIELDS}


def _placement_ok(centre, size, colour, present) -> np.ndarray:
    """bool [N]: every pair far enough apart and no centre near a cell border."""
    r = np.where(present, _HALF[np.clip(size, 0, None)], 0.0)
    d = np.linalg.norm(centre[:, :, None] - centre[:, None, :], axis=-1)  # [N, K, K]
    rr = r[:, :, None] + r[:, None, :]
    need = np.where(colour[:, :, None] == colour[:, None, :], rr + SAME_COLOUR_GAP, OVERLAP * rr)
    pair = present[:, :, None] & present[:, None, :] & ~np.eye(MAX_OBJECTS, dtype=bool)
    far = ~(pair & (d < need)).any(axis=(1, 2))
    to_border = np.abs((centre + CELL / 2) % CELL - CELL / 2)  # distance to the nearest cell border (or 0 / 64)
    inner = (to_border >= _CELL_GAP) | ~present[..., None]
    return far & inner.all(axis=(1, 2))


def _sample_raw(rng: np.random.Generator, n: int, min_objects: int, max_objects: int, mention: str) -> SceneBatch:
    count = rng.integers(min_objects, max_objects + 1, size=n)
    present = np.arange(MAX_OBJECTS) < count[:, None]
    size = np.where(present, rng.integers(0, len(SIZES), (n, MAX_OBJECTS)), -1)
    size = -np.sort(-size, axis=1)  # largest first; absent (-1) last
    colour = np.where(present, rng.integers(0, len(COLOURS), (n, MAX_OBJECTS)), -1)
    half = np.where(present, _HALF[np.clip(size, 0, None)], 0.0)[..., None]
    lo, hi = half + _MARGIN, IMAGE_SIZE - half - _MARGIN

    centre = lo + rng.random((n, MAX_OBJECTS, 2)) * (hi - lo)
    bad = np.flatnonzero(~_placement_ok(centre, size, colour, present))
    # rejection sampling of the centres of the scenes that fail (~half of the 5-object scenes at first), 16
    # candidate placements per failing scene and round, the first valid one kept; a scene still failing after 8
    # rounds (e.g. five large objects of one colour) gets new colours too
    tries = 16
    for round_ in range(200):
        if not bad.size:
            break
        if round_ % 8 == 7:
            colour[bad] = np.where(present[bad], rng.integers(0, len(COLOURS), (bad.size, MAX_OBJECTS)), -1)
        rep = np.repeat(bad, tries)
        cand = lo[rep] + rng.random((rep.size, MAX_OBJECTS, 2)) * (hi[rep] - lo[rep])
        ok = _placement_ok(cand, size[rep], colour[rep], present[rep]).reshape(bad.size, tries)
        done = ok.any(axis=1)
        first = np.argmax(ok, axis=1)
        centre[bad[done]] = cand.reshape(bad.size, tries, MAX_OBJECTS, 2)[np.flatnonzero(done), first[done]]
        bad = bad[~done]
    else:
        raise RuntimeError("sample_scenes: could not place the objects")

    if mention == "all":
        mentioned = np.broadcast_to(present[..., None], (n, MAX_OBJECTS, len(ATTRIBUTES))).copy()
        background_mentioned = np.ones(n, bool)
    else:
        mentioned = (rng.random((n, MAX_OBJECTS, len(ATTRIBUTES))) < np.asarray(MENTION_P)) & present[..., None]
        background_mentioned = rng.random(n) < BACKGROUND_P
    phase = np.stack([rng.uniform(0, np.pi, (n, MAX_OBJECTS)), rng.uniform(0, 2 * np.pi, (n, MAX_OBJECTS))], -1)
    params = np.concatenate([rng.uniform(0, np.pi, (n, 1)), rng.uniform(0, 2 * np.pi, (n, 3)), rng.random((n, 1))],
                            axis=1)
    return SceneBatch(
        shape=np.where(present, rng.integers(0, len(SHAPES), (n, MAX_OBJECTS)), -1),
        colour=colour,
        size=size,
        texture=np.where(present & (size > 0), rng.integers(0, len(TEXTURES), (n, MAX_OBJECTS)),
                         np.where(present, 0, -1)),  # tiny objects are plain
        centre=np.where(present[..., None], centre, 0.0),
        texture_phase=np.where(present[..., None], phase, 0.0),
        background=rng.integers(0, len(BACKGROUNDS), n),
        background_params=params,
        mentioned=mentioned,
        background_mentioned=background_mentioned,
    )


# Measured on 2 shared CPU cores (numpy, load ~4): 5.1 ms per 128 scenes of 1-5 objects with split="train"
# (captions, hashes and redraws included), 3.6 ms with split="any"; split="heldout" redraws ~90 % (~100 ms).
def sample_scenes(rng: np.random.Generator, n: int, *, split: str = "train", min_objects: int = 1,
                  max_objects: int = MAX_OBJECTS, mention: str = "random") -> SceneBatch:
    """N random scenes whose captions are in ``split`` ("train", "heldout" or "any"); rejected scenes are redrawn.

    ``mention="random"`` mentions each attribute with probability MENTION_P (the background with BACKGROUND_P);
    ``mention="all"`` mentions every attribute of every object and the background.
    """
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split: expected 'train', 'heldout' or 'any', got {split!r}")
    if mention not in ("random", "all"):
        raise ValueError(f"mention: expected 'random' or 'all', got {mention!r}")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"min_objects={min_objects}, max_objects={max_objects}: "
                         f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}")
    scenes = _sample_raw(rng, n, min_objects, max_objects, mention)
    if split == "any":
        return scenes
    want = split == "heldout"
    arrays = {name: getattr(scenes, name).copy() for name in _ALL_FIELDS}
    redraw = np.flatnonzero([is_heldout(c) != want for c in captions(scenes)])
    while redraw.size:
        fresh = _sample_raw(rng, redraw.size, min_objects, max_objects, mention)
        for name in _ALL_FIELDS:
            arrays[name][redraw] = getattr(fresh, name)
        redraw = redraw[[is_heldout(c) != want for c in captions(fresh)]]
    return SceneBatch(**arrays)


# ----------------------------------------------------------------------------------------------------------------
# Captions


def _words(names, fmt: str) -> np.ndarray:
    return np.array([""] + [fmt.format(n) for n in names], dtype=object)


_SIZE_W, _TEXTURE_W, _COLOUR_W = _words(SIZES, "{} "), _words(TEXTURES, "{} "), _words(COLOUR_NAMES, "{} ")
_NOUN_W = np.array(["object", *SHAPES], dtype=object)
_REGION_W = _words(REGIONS, " {}")
_BG_W = _words(_BG_PHRASES, " {}")


def captions(scenes: SceneBatch) -> list[str]:
    """One caption per scene: the mentioned attributes of each object in stored order, then maybe the background."""
    m = scenes.mentioned

    def pick(words, index, a):  # the attribute's word where mentioned, else "" ("object" for the shape)
        return words[np.where(m[..., a], index + 1, 0)]

    phrases = ("a " + pick(_SIZE_W, scenes.size, 0) + pick(_TEXTURE_W, scenes.texture, 1)
               + pick(_COLOUR_W, scenes.colour, 2) + pick(_NOUN_W, scenes.shape, 3)
               + pick(_REGION_W, scenes.region, 4))
    background = _BG_W[np.where(scenes.background_mentioned, scenes.background + 1, 0)]
    return [" and ".join(row[:n]) + bg
            for row, n, bg in zip(phrases.tolist(), scenes.num_objects.tolist(), background.tolist())]


@dataclasses.dataclass(frozen=True, eq=False)
class CaptionSpec:
    """What one caption asks for: per object the mentioned attribute indices (-1: not mentioned, or no object)."""

    num_objects: int
    size: np.ndarray  # int32 [MAX_OBJECTS]
    texture: np.ndarray
    colour: np.ndarray
    shape: np.ndarray
    region: np.ndarray
    background: int  # index into BACKGROUNDS, -1 when not mentioned

    def attribute(self, name: str) -> np.ndarray:
        return getattr(self, name)


def _bad(text: str, word: str, what: str):
    raise ValueError(f"caption {text!r}: unexpected word {word!r} ({what})")


def parse_caption(text: str) -> CaptionSpec:
    """What a caption of this world's grammar asks for; a ValueError names the caption and the offending word."""
    words = text.lower().split()
    background = -1
    if words and words[-1] == "background":
        if len(words) < 4 or words[-4:-2] != ["on", "a"]:
            raise ValueError(f"caption {text!r}: expected it to end with 'on a <background> background', "
                             f"got {' '.join(words[-4:])!r}")
        if words[-2] not in BACKGROUNDS:
            _bad(text, words[-2], f"expected a background, one of {list(BACKGROUNDS)}")
        background = BACKGROUNDS.index(words[-2])
        words = words[:-4]
    chunks = [[]]
    for word in words:
        if word == "and":
            chunks.append([])
        else:
            chunks[-1].append(word)
    if len(chunks) > MAX_OBJECTS:
        raise ValueError(f"caption {text!r}: {len(chunks)} objects, at most {MAX_OBJECTS} allowed")
    fields = {name: np.full(MAX_OBJECTS, -1, np.int32) for name in ATTRIBUTES}
    nouns = set(SHAPES) | {"object"}
    for k, chunk in enumerate(chunks):
        if not chunk:
            raise ValueError(f"caption {text!r}: empty object phrase (object {k + 1})")
        if chunk[0] != "a":
            _bad(text, chunk[0], "an object phrase starts with 'a'")
        pos = 1
        for name, names in (("size", SIZES), ("texture", TEXTURES), ("colour", COLOUR_NAMES)):
            if pos < len(chunk) and chunk[pos] in names:
                fields[name][k] = names.index(chunk[pos])
                pos += 1
        if pos >= len(chunk):
            raise ValueError(f"caption {text!r}: object phrase {' '.join(chunk)!r} has no noun "
                             f"(a shape or 'object')")
        if chunk[pos] not in nouns:
            _bad(text, chunk[pos], f"expected a size, texture or colour in that order, then a shape or 'object'")
        if chunk[pos] != "object":
            fields["shape"][k] = SHAPES.index(chunk[pos])
        rest = chunk[pos + 1:]
        if rest:
            phrase = " ".join(rest)
            if phrase not in REGIONS:
                _bad(text, phrase, f"expected a region, one of {list(REGIONS)}")
            fields["region"][k] = REGIONS.index(phrase)
    return CaptionSpec(num_objects=len(chunks), background=background, **fields)


def vocabulary() -> list[str]:
    """``<pad>``, ``<unk>``, then every word the grammar can produce, in a fixed first-seen order."""
    words = ["<pad>", "<unk>", "a", "and", "on", "background", "object"]
    for group in (SIZES, TEXTURES, COLOUR_NAMES, SHAPES, BACKGROUNDS, *(r.split() for r in REGIONS)):
        words += [w for w in group if w not in words]
    return words


def _longest_caption() -> int:
    """Words in the longest caption: MAX_OBJECTS fully specified objects, 'and's, the background phrase."""
    phrase = 5 + max(len(r.split()) for r in REGIONS)  # a <size> <texture> <colour> <shape> <region words>
    return MAX_OBJECTS * phrase + (MAX_OBJECTS - 1) + 4


MAX_LENGTH = 8 * -(-_longest_caption() // 8)  # 56: the longest caption (5 objects at one corner) has 53 words


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _backgrounds(x, y, params) -> jax.Array:
    """Grey level [..., H, W] of every background [len(BACKGROUNDS), ..., H, W] at pixel centres (x, y)."""
    p = params[..., None, None, :]  # [..., 1, 1, P]
    angle, ph1, ph2, ph3, freq = (p[..., i] for i in range(NUM_BACKGROUND_PARAMS))
    c, s = jnp.cos(angle), jnp.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    two_pi = 2 * jnp.pi
    flat = jnp.ones_like(u)
    stripe_period = 4.0 + 2.0 * freq  # 4-6 px
    striped = jnp.tanh(2 * jnp.sin(two_pi * u / stripe_period + ph1)) / math.tanh(2)
    check_period = 6.0 + 4.0 * freq  # 6-10 px
    checked = jnp.tanh(3 * jnp.sin(two_pi * u / check_period + ph1) * jnp.sin(two_pi * v / check_period + ph2))
    checked = checked / math.tanh(3)

    def waves(period, turn):  # sum of three sinusoids at angles angle + k * turn, periods period * (1, 0.83, 0.69)
        total = 0.0
        for k, (ph, stretch) in enumerate(((ph1, 1.0), (ph2, 0.83), (ph3, 0.69))):
            a = angle + k * turn
            total = total + jnp.sin(two_pi * (jnp.cos(a) * x + jnp.sin(a) * y) / (period * stretch) + ph)
        return total / 3

    wavy = waves(12.0 + 8.0 * freq, 2 * math.pi / 3)  # 8-20 px
    grainy = waves(2.6 + 0.8 * freq, math.pi / 3 + 0.4)  # ~1.8-3.4 px
    return jnp.stack([BACKGROUND_GREYS[0] * flat, BACKGROUND_GREYS[1] * flat, BACKGROUND_GREYS[2] * flat,
                      0.5 + 0.12 * striped, 0.5 + 0.12 * checked, 0.5 + 0.18 * wavy, 0.5 + 0.18 * grainy])


def _texture_darkness(dx, dy, texture, phase) -> jax.Array:
    """How dark [..., K, H, W] (0: the colour, 1: DARK times it) each object's texture is at offsets (dx, dy)."""
    angle, ph = phase[..., 0, None, None], phase[..., 1, None, None]
    c, s = jnp.cos(angle), jnp.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    two_pi = 2 * jnp.pi
    stripes = 0.5 + 0.5 * jnp.tanh(3 * jnp.sin(two_pi * u / STRIPE_PERIOD + ph))
    lattice = jnp.cos(two_pi * u / DOT_PERIOD + ph) + jnp.cos(two_pi * v / DOT_PERIOD + 2.4 * ph)
    dots = jax.nn.sigmoid(8 * (lattice - 1.0))
    t = texture[..., None, None]
    return jnp.where(t == 1, stripes, jnp.where(t == 2, dots, 0.0))


def render(shape, colour, size, texture, centre, texture_phase, background, background_params, *,
           image_size: int = IMAGE_SIZE) -> jax.Array:
    """Images float32 [..., image_size, image_size, 3] in [0, 1] of scenes given as SceneBatch arrays.

    Pure JAX: jittable, and any leading batch shape works. Geometry is in IMAGE_SIZE px and scales with
    ``image_size``; edges are anti-aliased over one output pixel. Objects are composited in stored order.
    """
    shape, colour, size, texture = (jnp.asarray(a, jnp.int32) for a in (shape, colour, size, texture))
    centre = jnp.asarray(centre, jnp.float32)
    texture_phase = jnp.asarray(texture_phase, jnp.float32)
    background = jnp.asarray(background, jnp.int32)
    background_params = jnp.asarray(background_params, jnp.float32)
    scale = image_size / IMAGE_SIZE
    coords = (jnp.arange(image_size, dtype=jnp.float32) + 0.5) / scale
    x, y = coords[None, :], coords[:, None]
    greys = _backgrounds(x, y, background_params)  # [B, ..., H, W]
    grey = sum(jnp.where(background[..., None, None] == b, greys[b], 0.0) for b in range(len(BACKGROUNDS)))
    image = jnp.broadcast_to(grey[..., None], grey.shape + (3,))

    dx = x - centre[..., 0, None, None]  # [..., K, H, W]
    dy = y - centre[..., 1, None, None]
    half = jnp.asarray(_HALF)[jnp.clip(size, 0)][..., None, None]
    sdfs = shape_sdfs(dx, dy, half)
    sdf = jnp.full_like(sdfs[0], jnp.inf)  # absent objects (shape -1) stay transparent
    for i, s in enumerate(sdfs):
        sdf = jnp.where(shape[..., None, None] == i, s, sdf)
    alpha = jnp.clip(0.5 - sdf * scale, 0.0, 1.0)
    shade = 1.0 - (1.0 - DARK) * _texture_darkness(dx, dy, texture, texture_phase)  # [..., K, H, W]
    rgb = jnp.asarray(PALETTE)[jnp.clip(colour, 0)]  # [..., K, 3]
    for k in range(shape.shape[-1]):
        a = alpha[..., k, :, :, None]
        image = image * (1 - a) + a * (shade[..., k, :, :, None] * rgb[..., k, None, None, :])
    return jnp.clip(image, 0.0, 1.0)


_render_jit = jax.jit(render, static_argnames="image_size")


def render_scenes(scenes: SceneBatch, *, image_size: int = IMAGE_SIZE, batch_size: int = 1024) -> np.ndarray:
    """Render a SceneBatch to float32 numpy images [N, image_size, image_size, 3], ``batch_size`` at a time."""
    return render_in_chunks(_render_jit, scenes, image_size=image_size, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Labels for a feature network

# L = 8 * 4 (colour, shape) + 8 * 9 (colour, region) + 3 sizes + 3 textures + 7 backgrounds = 117 labels
LABEL_NAMES = (tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES)
               + tuple(f"{c} {r}" for c in COLOUR_NAMES for r in REGIONS)
               + tuple(f"{z} object" for z in SIZES) + tuple(f"{t} object" for t in TEXTURES)
               + tuple(f"{b} background" for b in BACKGROUNDS))


def attribute_labels(scenes: SceneBatch) -> np.ndarray:
    """Multi-hot float32 [N, len(LABEL_NAMES)] of what a render shows (the truth, every object is visible), in
    LABEL_NAMES order: per (colour, shape) and per (colour, region) whether such an object is present, per size
    and per texture whether some object has it, and the background one-hot."""
    n = len(scenes)
    nc, ns, nr = len(COLOURS), len(SHAPES), len(REGIONS)
    blocks = [(nc * ns, scenes.colour * ns + scenes.shape), (nc * nr, scenes.colour * nr + scenes.region),
              (len(SIZES), scenes.size), (len(TEXTURES), scenes.texture)]
    out = np.zeros((n, len(LABEL_NAMES)), np.float32)
    rows = np.repeat(np.arange(n), MAX_OBJECTS).reshape(n, MAX_OBJECTS)
    present = scenes.shape >= 0
    start = 0
    for width, index in blocks:
        out[rows[present], start + index[present]] = 1.0
        start += width
    out[np.arange(n), start + scenes.background] = 1.0
    return out


if __name__ == "__main__":
    from ditfa_jax.testbed.tokenizer import build_tokenizer

    build_tokenizer(vocabulary()).save(str(SHIPPED_TOKENIZER), pretty=True)
    print(f"wrote {SHIPPED_TOKENIZER} ({len(vocabulary())} words, MAX_LENGTH {MAX_LENGTH})")
