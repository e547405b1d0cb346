"""Image quality metrics (PSNR, SSIM) against a reference, an image grid for eyeballing, and PNG writing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from scipy import ndimage

from ditfa_jax.files import atomic_write

__all__ = ["psnr", "ssim", "image_grid", "save_png"]


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two image batches [N, H, W, 3] of one shape, got {a.shape} and {b.shape}")
    return a, b


def psnr(a, b, max_value: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image [N] (inf where the images are identical)."""
    a, b = _pair(a, b)
    mse = np.mean(np.square(a - b), axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(max_value ** 2 / mse)


def relative_squared_error(images: np.ndarray, reference: np.ndarray, reduction: str = "mean") -> float:
    """||images - reference||^2 / ||reference||^2 (pixels) per image, reduced over images by "mean" or "median"
    (the median is not moved by the one image in a few that settles on another valid sample)."""
    if reduction not in ("mean", "median"):
        raise ValueError(f"reduction {reduction!r}: expected 'mean' or 'median'")
    axes = tuple(range(1, images.ndim))
    diff = np.sum(np.square(np.asarray(images, np.float64) - reference), axes)
    per_image = diff / np.maximum(np.sum(np.square(np.asarray(reference, np.float64)), axes), 1e-12)
    return float(np.mean(per_image) if reduction == "mean" else np.median(per_image))


def ssim(a, b, max_value: float = 1.0) -> np.ndarray:
    """Structural similarity per image [N] (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03.

    Local statistics per channel over the valid window positions (no padding), averaged over positions and channels.
    """
    a, b = _pair(a, b)
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    sigma, radius = 1.5, 5  # 11 taps
    if min(a.shape[1:3]) <= 2 * radius:
        raise ValueError(f"ssim: images of {a.shape[1]}x{a.shape[2]} px, expected at least {2 * radius + 1}x"
                         f"{2 * radius + 1} (the Gaussian window)")

    def blur(x):  # Gaussian over H and W only, then crop to the positions where the window fits
        y = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), truncate=radius / sigma, mode="constant")
        return y[:, radius:-radius, radius:-radius]

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(1, 2, 3))


def _to_uint8(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round(images.astype(np.float32) * 255), 0, 255).astype(np.uint8)


def image_grid(rows, labels=None, pad: int = 2, scale: int = 1, *, label_width: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3]: each row's images [N, h, w, 3] side by side (upscaled ``scale``x), an optional label left."""
    rows = [_to_uint8(r) for r in rows]
    if not rows or any(r.ndim != 4 or r.shape[1:] != rows[0].shape[1:] for r in rows):
        raise ValueError(f"image_grid: expected rows of images [N, h, w, 3] of one size, got "
                         f"{[np.shape(r) for r in rows]}")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"image_grid: {len(labels)} labels for {len(rows)} rows")
    if pad < 0 or scale < 1:
        raise ValueError(f"image_grid: expected pad >= 0 and scale >= 1, got pad={pad}, scale={scale}")
    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    cols = max(len(r) for r in rows)
    label_w = 0 if labels is None else (label_width or 8 + 6 * max(len(str(t)) for t in labels))
    grid = np.full((pad + len(rows) * (h + pad), label_w + pad + cols * (w + pad), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = pad + i * (h + pad), label_w + pad + j * (w + pad)
            grid[y:y + h, x:x + w] = image.repeat(scale, 0).repeat(scale, 1)
    if labels is not None:
        from PIL import Image, ImageDraw

        img = Image.fromarray(grid)
        draw = ImageDraw.Draw(img)
        for i, text in enumerate(labels):
            draw.text((4, pad + i * (h + pad) + h // 2 - 6), str(text), fill=(0, 0, 0))
        grid = np.asarray(img)
    return grid


def save_png(path, image, metadata: dict | None = None) -> Path:
    """Write an image (float in [0, 1] or uint8, [H, W, 3]) as PNG with text metadata; atomic (temp + rename)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    pixels = _to_uint8(image)
    if not (pixels.ndim == 3 and pixels.shape[-1] in (3, 4) or pixels.ndim == 2):
        raise ValueError(f"save_png: expected one image [H, W, 3], [H, W, 4] or [H, W], got shape {pixels.shape}")
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return atomic_write(path, buf.getvalue())
