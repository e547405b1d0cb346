"""Read objects back from pixels to score how faithfully an image follows its caption.

The world's backgrounds are grey and its objects saturated, so: a pixel is an object pixel when its chroma is high;
its colour is the palette colour of nearest hue (hue is unchanged by blending with grey, so anti-aliased rims keep
their colour); each colour's connected components are objects, tiny ones (noise) dropped. An object's shape is the
template of :func:`world.shape_sdfs`, stretched over the object's bounding box, that overlaps it best (IoU); its
size is small or large by bounding-box extent; its region is the grid cell of its centroid.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from ditfa_jax.testbed.world import (CELL, COLOUR_NAMES, DIAMETERS, IMAGE_SIZE, MAX_OBJECTS, PALETTE, REGIONS,
                                     SHAPES, SIZES, SceneBatch, shape_sdfs)

__all__ = ["DetectedObject", "detect", "score"]

MIN_CHROMA = 0.25  # object pixels: chroma above this (palette colours have 0.56-0.80, greys 0)
MIN_AREA = 12  # px; smaller components are noise (the smallest object, a small triangle, covers ~50 px)
SIZE_SPLIT = sum(DIAMETERS) / 2  # bounding-box extent between the small and the large diameter


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue (degrees) and chroma of RGB values [..., 3], from the opponent axes (2R - G - B, sqrt(3) (G - B))."""
    r, g, b = np.moveaxis(np.asarray(rgb, np.float64), -1, 0)
    a, c = 2 * r - g - b, math.sqrt(3) * (g - b)
    return np.degrees(np.arctan2(c, a)) % 360, np.hypot(a, c) / 2


_PALETTE_HUES = _hue_chroma(PALETTE)[0]


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """One object found in an image; colour, shape, size, region are indices as in :class:`world.SceneBatch`."""

    colour: int
    shape: int
    size: int
    region: int
    area: int  # px
    centroid: tuple[float, float]  # (x, y) in px from the image's top-left corner

    @property
    def phrase(self) -> str:
        return f"a {SIZES[self.size]} {COLOUR_NAMES[self.colour]} {SHAPES[self.shape]} {REGIONS[self.region]}"


def _classify_shape(mask: np.ndarray) -> int:
    """Index of the shape template, stretched over the mask's box, with the highest IoU with the mask."""
    h, w = mask.shape
    u = (np.arange(w) + 0.5) / w * 2 - 1
    v = (np.arange(h) + 0.5) / h * 2 - 1
    ious = [(mask & (t < 0)).sum() / (mask | (t < 0)).sum() for t in shape_sdfs(u[None, :], v[:, None], 1.0, xp=np)]
    return int(np.argmax(ious))


def detect(image, *, min_area: int = MIN_AREA) -> list[DetectedObject]:
    """Objects in one image [H, W, 3] (float in [0, 1] or uint8), in colour order then scan order."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"detect: expected one image [H, W, 3], got shape {image.shape}")
    rgb = image / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    cell = CELL * image.shape[1] / IMAGE_SIZE
    split = SIZE_SPLIT * image.shape[1] / IMAGE_SIZE
    hue, chroma = _hue_chroma(rgb)
    nearest = np.argmin(np.abs((hue[..., None] - _PALETTE_HUES + 180) % 360 - 180), axis=-1)
    found = []
    for colour in range(len(PALETTE)):
        labels, _ = ndimage.label((chroma > MIN_CHROMA) & (nearest == colour))
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            mask = labels[box] == label
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean() + box[1].start + 0.5, ys.mean() + box[0].start + 0.5
            row, col = (min(max(int(c // cell), 0), 2) for c in (cy, cx))
            found.append(DetectedObject(colour=colour, shape=_classify_shape(mask), size=int(max(mask.shape) > split),
                                        region=3 * row + col, area=area, centroid=(float(cx), float(cy))))
    return found


def score(images, scenes: SceneBatch) -> dict[str, float]:
    """Prompt fidelity of images [N, H, W, 3] generated for ``scenes``, as fractions over all target objects.

    A target object (one asked for by a caption) counts for ``colour`` / ``shape`` when some detection in its region
    has its colour / shape, for ``object`` (alias ``region``) when one detection there has both, for ``size`` when
    one has colour, shape and size, and for ``present`` when its colour and shape are detected anywhere in the
    image. ``extra_objects`` is the mean number per image of detections not asked for: all detections minus the
    number of target regions holding at least one. ``count`` is the fraction of images with exactly as many
    detections as targets.
    """
    images = np.asarray(images)
    if len(images) != len(scenes):
        raise ValueError(f"score: {len(images)} images for {len(scenes)} scenes")
    hits = dict.fromkeys(("colour", "shape", "object", "size", "present"), 0)
    extra, count = [], []
    for i, image in enumerate(images):
        found = detect(image)
        targets = [k for k in range(MAX_OBJECTS) if scenes.shape[i, k] >= 0]
        for k in targets:
            colour, shape, size = scenes.colour[i, k], scenes.shape[i, k], scenes.size[i, k]
            here = [d for d in found if d.region == scenes.region[i, k]]
            hits["colour"] += any(d.colour == colour for d in here)
            hits["shape"] += any(d.shape == shape for d in here)
            hits["object"] += any(d.colour == colour and d.shape == shape for d in here)
            hits["size"] += any(d.colour == colour and d.shape == shape and d.size == size for d in here)
            hits["present"] += any(d.colour == colour and d.shape == shape for d in found)
        target_regions = {int(scenes.region[i, k]) for k in targets}
        extra.append(len(found) - len(target_regions & {d.region for d in found}))
        count.append(len(found) == len(targets))
    n = max(int(scenes.num_objects.sum()), 1)
    out = {key: value / n for key, value in hits.items()}
    out["region"] = out["object"]
    out["extra_objects"] = float(np.mean(extra)) if extra else 0.0
    out["count"] = float(np.mean(count)) if count else 0.0
    return out
