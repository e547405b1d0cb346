"""Pictures of a compression plan (Pillow only): a steps x layers map of the FLOPs kept, or per-head methods."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from ditfa_jax.files import atomic_write
from ditfa_jax.methods import FP8_WINDOW
from ditfa_jax.plan import CompressionPlan

__all__ = ["save_heatmap"]

# viridis at 0, 0.1, ..., 1 (matplotlib's values, rounded to 8 bits); linear in between.
_VIRIDIS = np.array([(68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142), (33, 145, 140),
                     (34, 168, 132), (68, 191, 112), (122, 209, 81), (189, 223, 38), (253, 231, 37)], np.float64)
_METHOD_COLOURS = {"full": (215, 215, 215), "cached": (68, 1, 84), "fp8": (40, 40, 40)}  # fp8: a full head, darker
_ARROW_COLOURS = [(33, 145, 140), (94, 201, 98), (253, 231, 37), (59, 82, 139), (230, 120, 40), (200, 80, 160)]
_OTHER_COLOUR = (220, 50, 50)
# Rows of steps that do not run the transformer (by step kind name), and the hatch of a cached block: colours
# outside viridis, so neither reads as a FLOPs-kept value.
_STEP_COLOURS = {"reuse": (200, 200, 200), "taylor1": (250, 175, 205), "taylor2": (205, 150, 230)}
_HATCH = ((255, 225, 215), (190, 30, 30))  # background, stripes
_FP8_MARK = _METHOD_COLOURS["fp8"]  # a square in the middle of a (step, layer) cell that has FP8 heads
_MLP_MARK = (255, 140, 0)  # a bar along the bottom of a (step, layer) cell whose block reuses its MLP branch
_LEGEND_H = 20


def _hatched(mask) -> np.ndarray:
    """uint8 [h, w, 3]: diagonal stripes (pixel x + y) of the cached-block hatch, for a bool mask's shape."""
    yy, xx = np.indices(np.shape(mask))
    return np.where(((xx + yy) % 6 < 2)[..., None], np.uint8(_HATCH[1]), np.uint8(_HATCH[0])).astype(np.uint8)


def _map_pixels(plan: CompressionPlan, data, cell: int) -> np.ndarray:
    """uint8 [steps*cell, layers*cell, 3]: viridis of ``data``, rows of skipped steps in their kind's colour, cached
    blocks hatched, FP8 heads and cached MLP branches marked."""
    rgb = _viridis(data)
    for name, colour in _STEP_COLOURS.items():
        rgb[np.array(plan.step_kind_names()) == name] = colour
    big = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    cached = np.repeat(np.repeat(~plan.block_compute, cell, axis=0), cell, axis=1)
    big[cached] = _hatched(cached)[cached]
    lo, hi = cell // 3, cell - cell // 3
    for step, layer in np.argwhere((plan.head_window == FP8_WINDOW).any(axis=2)):
        big[step * cell + lo:step * cell + hi, layer * cell + lo:layer * cell + hi] = _FP8_MARK
    bar = max(1, cell // 4)
    for step, layer in np.argwhere(plan.cached_mlps()):
        big[(step + 1) * cell - bar:(step + 1) * cell, layer * cell:(layer + 1) * cell] = _MLP_MARK
    return big


def _legend_items(plan: CompressionPlan) -> list[tuple[str, tuple | None]]:
    """(label, colour; None: the hatch) for each step kind other than compute, cached blocks, cached MLP branches and
    FP8 heads (the marks in their cells), when used."""
    names = plan.step_kind_names()
    items = [(f"{k}: {names.count(k)} step{'s' * (names.count(k) != 1)} skipped", c)
             for k, c in _STEP_COLOURS.items() if k in names]
    n = int((~plan.block_compute).sum())
    if n:
        items.append((f"cached block: {n} of {plan.computed_steps.size * plan.num_layers} on computed steps", None))
    mlp = plan.cached_mlps()
    if mlp.any():
        runs = int((plan.work_per_step_layer() > 0).sum())
        items.append((f"cached MLP: {int(mlp.sum())} of {runs} blocks that run", _MLP_MARK))
    fp8 = plan.head_window == FP8_WINDOW
    if fp8.any():
        items.append((f"FP8 heads: {int(fp8.sum())} in {int(fp8.any(axis=2).sum())} (step, layer)s", _FP8_MARK))
    return items


def _viridis(x) -> np.ndarray:
    """uint8 [..., 3] colours for values in [0, 1] (clipped)."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_VIRIDIS) - 2)
    t = (x - i)[..., None]
    return np.round(_VIRIDIS[i] * (1 - t) + _VIRIDIS[i + 1] * t).astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw, text, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _tick_step(n: int, cell: int, min_px: int) -> int:
    for k in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000):
        if k * cell >= min_px or k >= n:
            return k
    return max(1, n // 10)


def _vertical_text(img, xy, text, font, fill=(0, 0, 0)) -> None:
    """Paste ``text`` rotated 90 degrees (reading bottom to top) with its top-left corner at ``xy``."""
    from PIL import Image, ImageDraw
    probe = ImageDraw.Draw(img)
    w, h = _text_size(probe, text, font)
    tile = Image.new("RGBA", (w + 4, h + 6), (255, 255, 255, 0))
    ImageDraw.Draw(tile).text((2, 0), text, font=font, fill=fill + (255,))
    tile = tile.rotate(90, expand=True)
    img.paste(tile, xy, tile)


def _render_kept(plan: CompressionPlan, cell: int | None):
    from PIL import Image, ImageDraw
    data = plan.flops_kept_per_step_layer()                      # [S, L]
    s, n_layers = data.shape
    cell = cell or max(6, min(40, 900 // max(s, n_layers)))
    font, small = _font(14), _font(11)
    legend = _legend_items(plan)
    left, top, right, bottom = 64, 64 + (_LEGEND_H if legend else 0), 110, 56
    mw, mh = n_layers * cell, s * cell
    kept = plan.flops_kept_fraction()
    search = "hand-made plan" if plan.delta is None else f"delta={plan.delta:g}"
    title = f"attention FLOPs kept {kept:.1%}, {search}"
    subtitle = (f"{plan.model_class} {plan.height}x{plan.width}, {s} steps x {n_layers} layers x "
                f"{plan.num_heads} heads" + ("" if plan.fp8_layers is None else
                                             f", FP8 linears in {len(plan.fp8_layers)} block-stack layers"))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(_text_size(measure, title, font)[0], _text_size(measure, subtitle, small)[0],
                 sum(30 + _text_size(measure, label, small)[0] for label, _ in legend))
    img = Image.new("RGB", (max(left + mw + right, left + text_w + 16), top + max(mh, 100) + bottom),
                    (255, 255, 255))  # wide enough for the titles, tall enough for the colour bar's label
    draw = ImageDraw.Draw(img)
    if legend:  # skipped steps and cached blocks drawn over the map, a swatch per kind
        img.paste(Image.fromarray(_map_pixels(plan, data, cell)), (left, top))
        x = left
        for label, colour in legend:
            if colour is None:
                img.paste(Image.fromarray(_hatched(np.ones((12, 12), bool))), (x, 50))
            else:
                draw.rectangle((x, 50, x + 12, 62), fill=colour)
            draw.rectangle((x, 50, x + 12, 62), outline=(0, 0, 0))
            draw.text((x + 16, 49), label, font=small, fill=(0, 0, 0))
            x += 30 + _text_size(draw, label, small)[0]
    else:
        cells = Image.fromarray(_viridis(data)).resize((mw, mh), Image.NEAREST)
        img.paste(cells, (left, top))
    draw.rectangle((left - 1, top - 1, left + mw, top + mh), outline=(0, 0, 0))

    draw.text((left, 8), title, font=font, fill=(0, 0, 0))
    draw.text((left, 28), subtitle, font=small, fill=(60, 60, 60))
    # layer ticks (x) and step ticks (y); step 0 at the top
    kx = _tick_step(n_layers, cell, 26)
    for layer in range(0, n_layers, kx):
        x = left + layer * cell + cell // 2
        draw.line((x, top + mh, x, top + mh + 4), fill=(0, 0, 0))
        w, _ = _text_size(draw, str(layer), small)
        draw.text((x - w // 2, top + mh + 6), str(layer), font=small, fill=(0, 0, 0))
    ky = _tick_step(s, cell, 16)
    for step in range(0, s, ky):
        y = top + step * cell + cell // 2
        draw.line((left - 5, y, left - 1, y), fill=(0, 0, 0))
        w, h = _text_size(draw, str(step), small)
        draw.text((left - 8 - w, y - h // 2 - 2), str(step), font=small, fill=(0, 0, 0))
    w, _ = _text_size(draw, "layer", font)
    draw.text((left + mw // 2 - w // 2, top + mh + 26), "layer", font=font, fill=(0, 0, 0))
    _vertical_text(img, (8, top + mh // 2 - 20), "step", font)
    # colour bar: 1 at the top, 0 at the bottom
    bx, bw = left + mw + 24, 16
    ramp = _viridis(np.linspace(1.0, 0.0, mh))[:, None, :].repeat(bw, axis=1)
    img.paste(Image.fromarray(ramp), (bx, top))
    draw.rectangle((bx - 1, top - 1, bx + bw, top + mh), outline=(0, 0, 0))
    for label, y in (("1", top), ("0.5", top + mh // 2), ("0", top + mh)):
        _, h = _text_size(draw, label, small)
        draw.line((bx + bw, y, bx + bw + 4, y), fill=(0, 0, 0))
        draw.text((bx + bw + 7, y - h // 2 - 2), label, font=small, fill=(0, 0, 0))
    _vertical_text(img, (bx + bw + 34, top + mh // 2 - 40), "FLOPs kept", small)
    return img


def _render_heads(plan: CompressionPlan, cell: int | None):
    from PIL import Image, ImageDraw
    s, n_layers, n_heads = plan.shape
    cell = cell or 4
    names = plan.method_names()
    palette = []
    arrow_i = 0
    for n in names:
        if n in _METHOD_COLOURS:
            palette.append(_METHOD_COLOURS[n])
        elif n.startswith("arrow_"):
            palette.append(_ARROW_COLOURS[arrow_i % len(_ARROW_COLOURS)])
            arrow_i += 1
        else:
            palette.append(_OTHER_COLOUR)
    palette = np.array(palette, np.uint8)
    code = plan.method_codes()
    counts = plan.method_counts()

    font, small = _font(14), _font(11)
    pw, ph = n_heads * cell, s * cell
    gap_x, gap_y, label_h = 8, 6, 14
    ncols = max(1, min(n_layers, math.ceil(math.sqrt(n_layers * (ph + gap_y + label_h) / (pw + gap_x)))))
    nrows = math.ceil(n_layers / ncols)
    left, top = 12, 88
    width = max(left + ncols * (pw + gap_x) + 12, 560)
    img = Image.new("RGB", (width, top + nrows * (ph + gap_y + label_h) + 24), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    kept = plan.flops_kept_fraction()
    search = "hand-made plan" if plan.delta is None else f"delta={plan.delta:g}"
    draw.text((left, 6), f"methods per head: attention FLOPs kept {kept:.1%}, {search}", font=font, fill=(0, 0, 0))
    draw.text((left, 26), f"one panel per layer: step 0..{s - 1} top to bottom, head 0..{n_heads - 1} left to right",
              font=small, fill=(60, 60, 60))
    x = left
    for i, n in enumerate(names):  # legend with each method's share of heads
        label = f"{n} {int(counts[n].sum()) / code.size:.0%}"
        draw.rectangle((x, 50, x + 12, 62), fill=tuple(int(v) for v in palette[i]), outline=(0, 0, 0))
        draw.text((x + 16, 49), label, font=small, fill=(0, 0, 0))
        x += 16 + _text_size(draw, label, small)[0] + 14
    for layer in range(n_layers):
        r, col = divmod(layer, ncols)
        x0 = left + col * (pw + gap_x)
        y0 = top + r * (ph + gap_y + label_h)
        draw.text((x0, y0), f"layer {layer}", font=small, fill=(0, 0, 0))
        panel = Image.fromarray(palette[code[:, layer, :]]).resize((pw, ph), Image.NEAREST)
        img.paste(panel, (x0, y0 + label_h))
    return img


def save_heatmap(plan: CompressionPlan, path, per_head: bool = False, *, cell: int | None = None,
                 overwrite: bool = True) -> Path:
    """Write a PNG of the plan (atomically; an existing file is replaced unless overwrite=False).

    Default: steps (rows, step 0 on top) x layers (columns), colour = fraction of the attention FLOPs kept in that
    (step, layer), viridis 0..1 with a colour bar; a plan with step methods or block caching also shows each step
    that does not run the transformer as a row in its kind's colour (reuse grey, taylor1 pink, taylor2 lilac) and
    each cached (step, layer) block hatched red, and a dark square in each (step, layer) with FP8 heads (which keep
    every FLOP), with a legend line. ``per_head=True``: one [steps x heads] panel per layer with a colour per method
    (full / cached / fp8 / each arrow) and a legend. ``cell``: pixels per cell (default 6..16 for the
    map, 4 for the per-head panels).
    """
    if not isinstance(plan, CompressionPlan):
        raise ValueError(f"plan: expected a CompressionPlan, got {type(plan).__name__}")
    if cell is not None and (isinstance(cell, bool) or not isinstance(cell, int) or cell < 1):
        raise ValueError(f"cell: expected a positive number of pixels, got {cell!r}")
    img = _render_heads(plan, cell) if per_head else _render_kept(plan, cell)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = Path(path)
    atomic_write(path, buf.getvalue(), overwrite=overwrite)
    return path
