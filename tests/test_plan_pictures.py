"""Plan pictures: the FLOPs-kept heat map and the per-head method panels (CPU, Pillow)."""

import numpy as np
import pytest
from PIL import Image

from ditfa_jax.configs import FluxConfig
from ditfa_jax.methods import DEFAULT_CANDIDATES, windows_from_choice
from ditfa_jax.plan import CompressionPlan
from ditfa_jax.plan_pictures import save_heatmap

FLUX = FluxConfig(guidance_embeds=True)  # FLUX.1-dev shape: 19 + 38 layers, 24 heads, head_dim 128


def flux_plan(steps):
    """A 1024 px FLUX plan with random methods after step 0."""
    full = CompressionPlan.full(FLUX, height=1024, width=1024, text_len=512, num_steps=steps)
    choice = np.random.default_rng(0).integers(-1, len(DEFAULT_CANDIDATES), size=full.shape)
    choice[0] = -1
    return full.replace(head_window=windows_from_choice(choice, DEFAULT_CANDIDATES, full.image_tokens), delta=0.2)


def n_colours(rgb):
    rgb = rgb.astype(np.int64)
    return len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]))


def test_heatmap(tmp_path):
    p = flux_plan(steps=50)
    path = save_heatmap(p, tmp_path / "map.png")
    img = Image.open(path)
    assert img.format == "PNG" and 600 <= img.width <= 1600 and 500 <= img.height <= 1400
    assert n_colours(np.asarray(img.convert("RGB"))[100:400, 100:400]) > 10   # not uniform
    small = save_heatmap(flux_plan(steps=4), tmp_path / "small.png")
    assert Image.open(small).height >= 4 * 6              # cells of >= 6 px
    per_head = Image.open(save_heatmap(p, tmp_path / "heads.png", per_head=True))
    assert per_head.format == "PNG" and per_head.width >= 57 and per_head.height >= 50
    assert n_colours(np.asarray(per_head.convert("RGB"))) >= 5  # full, cached, three arrows (plus text)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["heads.png", "map.png", "small.png"]
    fp8 = np.asarray(Image.open(save_heatmap(p.replace(fp8_layers=["stack0/attn/to_q"]), tmp_path / "fp8.png")))
    plain = np.asarray(img)
    width = min(fp8.shape[1], plain.shape[1])
    assert fp8.shape[0] == plain.shape[0] and not np.array_equal(fp8[:48, :width], plain[:48, :width])  # subtitle
    assert np.array_equal(fp8[100:, 64:400], plain[100:, 64:400])  # the same cells
    (tmp_path / "fp8.png").unlink()
    with pytest.raises(ValueError, match="plan: expected a CompressionPlan"):
        save_heatmap(p.head_window, tmp_path / "x.png")


def test_heatmap_of_step_methods_and_cached_blocks(tmp_path):
    """Skipped steps are rows in their kind's colour, cached blocks are hatched, and a legend line is added."""
    p = flux_plan(steps=8)
    plain = Image.open(save_heatmap(p, tmp_path / "plain.png", cell=10))
    block_compute = np.ones((8, 57), bool)
    block_compute[3, 17:] = False
    q = p.replace(step_kind=["compute", "compute", "reuse", "compute", "taylor1", "compute", "taylor2", "reuse"],
                  block_compute=block_compute)
    img = Image.open(save_heatmap(q, tmp_path / "steps.png", cell=10))
    assert img.format == "PNG" and img.height == plain.height + 20 == 64 + 20 + max(8 * 10, 100) + 56
    assert img.width >= 64 + 57 * 10 + 110
    rgb = np.asarray(img.convert("RGB"))
    top, left = 84, 64
    row = lambda step: rgb[top + step * 10 + 1:top + step * 10 + 9, left:left + 570].reshape(-1, 3)  # noqa: E731
    assert {tuple(c) for c in row(2)} == {(200, 200, 200)}                  # reuse
    assert {tuple(c) for c in row(4)} == {(250, 175, 205)}                  # taylor1
    assert {tuple(c) for c in row(6)} == {(205, 150, 230)}                  # taylor2
    cached = rgb[top + 31:top + 39, left + 171:left + 569].reshape(-1, 3)
    assert {tuple(c) for c in cached} == {(255, 225, 215), (190, 30, 30)}  # hatched
    assert n_colours(rgb[top + 31:top + 39, left:left + 169]) > 2           # the blocks that run: viridis
    blocks_only = Image.open(save_heatmap(p.replace(block_compute=block_compute), tmp_path / "blocks.png", cell=10))
    assert blocks_only.height == img.height


def test_fp8_heads_are_marked(tmp_path):
    """A (step, layer) with FP8 heads (which keep every FLOP) gets a dark square in its cell, listed in the legend;
    the per-head panels give FP8 its own colour."""
    p = flux_plan(steps=8)
    hw = np.array(p.head_window)
    hw[2, 5, :3] = -2
    q = p.replace(head_window=hw)
    img = np.asarray(Image.open(save_heatmap(q, tmp_path / "fp8.png", cell=12)).convert("RGB"))
    top, left = 84, 64  # one legend line
    centre = img[top + 2 * 12 + 4:top + 2 * 12 + 8, left + 5 * 12 + 4:left + 5 * 12 + 8].reshape(-1, 3)
    assert {tuple(c) for c in centre} == {(40, 40, 40)}
    corner = img[top + 2 * 12 + 1, left + 5 * 12 + 1]
    assert tuple(corner) != (40, 40, 40)  # the cell's FLOPs-kept colour around the mark
    assert (img[top + 12 * 3 + 4, left + 5 * 12 + 4] != (40, 40, 40)).any()  # only that cell
    heads = np.asarray(Image.open(save_heatmap(q, tmp_path / "heads.png", per_head=True)).convert("RGB"))
    assert ((heads == (40, 40, 40)).all(axis=-1)).sum() >= 3 * 16  # three FP8 heads of 4 x 4 pixels


def test_cached_mlp_branches_are_marked(tmp_path):
    """A block that runs with its MLP branch cached gets an orange bar along the bottom of its cell and a legend
    line; the cells above the bar keep their FLOPs-kept colour."""
    p = flux_plan(steps=8)
    plain = np.asarray(Image.open(save_heatmap(p, tmp_path / "plain.png", cell=12)).convert("RGB"))
    mlp = np.ones((8, 57), bool)
    mlp[3, 10:20] = False
    img = Image.open(save_heatmap(p.replace(mlp_compute=mlp), tmp_path / "mlp.png", cell=12))
    rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape[0] == plain.shape[0] + 20  # the legend line
    top, left = 84, 64
    bar = rgb[top + 4 * 12 - 3:top + 4 * 12, left + 10 * 12:left + 20 * 12].reshape(-1, 3)
    assert {tuple(c) for c in bar} == {(255, 140, 0)}
    np.testing.assert_array_equal(rgb[top + 3 * 12:top + 4 * 12 - 3, left + 10 * 12:left + 20 * 12],
                                  plain[top - 20 + 3 * 12:top - 20 + 4 * 12 - 3, left + 10 * 12:left + 20 * 12])
    assert not (rgb[top + 5 * 12 - 3:top + 5 * 12, left:left + 57 * 12] == (255, 140, 0)).all(axis=-1).any()
