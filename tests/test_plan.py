"""Compression plans: validation, JSON round trip, compatibility checks, FLOP accounting, heat maps (CPU)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import pallas_kernels as pk
from ditfa_jax.configs import FluxConfig, SD3Config
from ditfa_jax.plan import (DEFAULT_CANDIDATES, CompressionPlan, candidate_savings, candidate_windows,
                            image_tokens_for, method_window, save_heatmap, windows_from_choice)

FLUX = FluxConfig(guidance_embeds=True)          # FLUX.1-dev shape: 19 + 38 layers, 24 heads, head_dim 128
SD3 = SD3Config(num_layers=24, num_attention_heads=24, caption_projection_dim=1536)  # SD3-medium shape
SD35M = SD3Config(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, qk_norm="rms_norm",
                  dual_attention_layers=tuple(range(13)))


def flux_plan(steps=50, height=1024, width=1024, seed=0, **kw):
    """A FLUX plan with random methods after step 0."""
    full = CompressionPlan.full(FLUX, height=height, width=width, text_len=512, num_steps=steps)
    rng = np.random.default_rng(seed)
    choice = rng.integers(-1, len(DEFAULT_CANDIDATES), size=full.shape)
    choice[0] = -1
    hw = windows_from_choice(choice, DEFAULT_CANDIDATES, full.image_tokens)
    return full.replace(head_window=hw, delta=0.2, c=1.5, **kw)


# --- methods ------------------------------------------------------------------------------------------------------

def test_method_window():
    assert method_window("full", 4096) == -1
    assert method_window("cached", 4096) == 0
    assert method_window("arrow_8", 4096) == 256
    assert method_window("arrow_16", 4096) == 128
    assert method_window("arrow_32", 16384) == 256
    assert method_window("arrow_32", 16) == 1          # never below 1 (0 would mean cached)
    assert candidate_windows(DEFAULT_CANDIDATES, 4096).tolist() == [0, 256, 128, 64]
    for bad in ("arrow_0", "arrow_x", "arrow", "Arrow_8", "dense", 8):
        with pytest.raises(ValueError, match="method name"):
            method_window(bad, 4096)
    with pytest.raises(ValueError, match="n_img"):
        method_window("arrow_8", 0)


def test_candidate_savings_match_plan_cost():
    sav = candidate_savings(DEFAULT_CANDIDATES, image_tokens=4096, text_len=512, text_first=True, head_dim=128)
    want = pk.plan_cost(np.array([0, 256, 128, 64]), batch=1, tokens=4608, text_len=512, text_first=True,
                        head_dim=128).saving
    np.testing.assert_allclose(sav, want)
    assert sav[0] == 1.0 and (0 < sav[1:]).all() and (sav[1:] < 1).all()


def test_windows_from_choice():
    hw = windows_from_choice(np.array([[-1, 0, 1, 3]]), DEFAULT_CANDIDATES, 4096)
    assert hw.dtype == np.int32 and hw.tolist() == [[-1, 0, 256, 64]]
    with pytest.raises(ValueError, match=r"choice: indices must lie in \[-1, 3\]"):
        windows_from_choice(np.array([4]), DEFAULT_CANDIDATES, 4096)


def test_image_tokens_for():
    assert image_tokens_for(FLUX, 1024, 1024) == 4096
    assert image_tokens_for(FLUX, 2048, 2048) == 16384
    assert image_tokens_for(SD3, 1024, 1024) == 4096
    with pytest.raises(ValueError, match="height: expected a positive multiple of 16"):
        image_tokens_for(FLUX, 1000, 1024)


# --- construction and validation -----------------------------------------------------------------------------------

def test_full_plan():
    p = CompressionPlan.full(FLUX, height=1024, width=768, text_len=512, num_steps=28)
    assert p.shape == (28, 57, 24) and p.head_window.dtype == np.int32 and (p.head_window == -1).all()
    assert (p.family, p.model_class, p.image_tokens, p.text_first) == ("flux", "FluxTransformer2DModel", 3072, True)
    assert p.delta is None and p.c is None and p.schema_version == 1
    assert not p.head_window.flags.writeable
    s = CompressionPlan.full(SD3, height=1024, width=1024, text_len=333, num_steps=28)
    assert (s.family, s.text_first, s.shape) == ("sd3", False, (28, 24, 24))


@pytest.mark.parametrize("change, match", [
    (lambda hw: hw[:, :-1], r"head_window: expected shape \[steps, layers, heads\] = \[4, 57, 24\].*\[4, 56, 24\]"),
    (lambda hw: hw.astype(np.float32), r"head_window: expected an integer array, got dtype float32"),
    (lambda hw: np.where(hw == 0, -2, hw), r"head_window: values must lie in \[-1"),
    (lambda hw: np.concatenate([np.zeros_like(hw[:1]), hw[1:]]), r"head_window: step 0 must be all full"),
])
def test_bad_head_window(change, match):
    p = flux_plan(steps=4)
    with pytest.raises(ValueError, match=match):
        p.replace(head_window=change(np.array(p.head_window)))


@pytest.mark.parametrize("field, value, match", [
    ("family", "sd3", r"family: FluxTransformer2DModel is family 'flux', got 'sd3'"),
    ("model_class", "UNet", r"model_class: expected one of"),
    ("text_first", False, r"text_first: flux puts text first"),
    ("num_heads", 0, r"num_heads: expected an integer >= 1, got 0"),
    ("text_len", -1, r"text_len: expected an integer >= 0"),
    ("candidates", ("cached", "arrow_8", "cached"), r"candidates: names must be distinct"),
    ("candidates", ("full",), r"candidates: 'full' is not a candidate method"),
    ("delta", -0.1, r"delta: expected a finite value >= 0"),
    ("c", 0.0, r"c: expected a finite value > 0"),
    ("schema_version", 2, r"schema_version: this ditfa-jax reads schema 1, got 2"),
])
def test_bad_metadata(field, value, match):
    with pytest.raises(ValueError, match=match):
        flux_plan(steps=2).replace(**{field: value})


# --- files ---------------------------------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    p = flux_plan(notes={"calibration_s": 812.5, "prompts": 8})
    path = p.save(tmp_path / "plans" / "flux.json")      # creates the folder
    q = CompressionPlan.load(path)
    assert q == p and q.digest() == p.digest()
    assert q.notes == {"calibration_s": 812.5, "prompts": 8} and q.candidates == DEFAULT_CANDIDATES
    assert q.model_config == p.model_config and q.model_config["_class_name"] == "FluxTransformer2DModel"
    assert q != p.replace(delta=0.6) and q.digest() != p.replace(delta=0.6).digest()
    raw = json.loads(path.read_text())                   # plain, readable JSON
    assert raw["candidate_windows"] == {"cached": 0, "arrow_8": 256, "arrow_16": 128, "arrow_32": 64}
    assert len(raw["head_window"]) == 50 and len(raw["head_window"][1][2]) == 24
    s = CompressionPlan.full(SD3, height=512, width=512, text_len=333, num_steps=3)
    assert CompressionPlan.load(s.save(tmp_path / "sd3.json")) == s


def test_file_is_small(tmp_path):
    path = flux_plan(height=2048, width=2048).save(tmp_path / "p.json")  # 4-digit windows
    assert os.path.getsize(path) < 400_000


def test_atomic_save_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        flux_plan(steps=3).save(path)
    assert list(tmp_path.iterdir()) == []                # neither the plan nor a temp file
    monkeypatch.undo()

    old = flux_plan(steps=3, seed=1)
    old.save(path)
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        flux_plan(steps=3, seed=2).save(path)
    monkeypatch.undo()
    assert [f.name for f in tmp_path.iterdir()] == ["plan.json"] and CompressionPlan.load(path) == old

    with pytest.raises(TypeError):                       # unserialisable notes: fails before any file exists
        flux_plan(steps=2, notes={"x": object()}).save(tmp_path / "other.json")
    assert [f.name for f in tmp_path.iterdir()] == ["plan.json"]


def _edited(tmp_path, edit, name="bad.json"):
    raw = json.loads(flux_plan(steps=3).to_json())
    edit(raw)
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.pop("num_heads"), r"missing field\(s\) \['num_heads'\]"),
    (lambda r: r.pop("schema_version"), r"missing field 'schema_version'"),
    (lambda r: r.update(schema_version=2), r"field 'schema_version' is 2; this ditfa-jax reads schema 1"),
    (lambda r: r.update(head_window=[row[:-1] for row in r["head_window"]]),
     r"head_window: expected shape \[steps, layers, heads\] = \[3, 57, 24\].*got \[3, 56, 24\]"),
    (lambda r: r["head_window"][1][0].pop(), r"field 'head_window' must be integer lists.*ragged"),
    (lambda r: r["head_window"][1][0].__setitem__(0, 1.5), r"field 'head_window' must be integer lists.*float"),
    (lambda r: r["head_window"][0][3].__setitem__(5, 0), r"head_window: step 0 must be all full.*layer 3, head 5"),
    (lambda r: r.update(num_steps=4), r"head_window: expected shape .*\[4, 57, 24\]"),
    (lambda r: r.update(text_first="yes"), r"field 'text_first' must be a bool"),
    (lambda r: r.update(candidates="cached"), r"field 'candidates' must be a list"),
    (lambda r: r.update(extra=1), r"unknown field\(s\) \['extra'\]"),
])
def test_bad_files(tmp_path, edit, match):
    path = _edited(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as e:
        CompressionPlan.load(path)
    assert str(path) in str(e.value)


def test_not_a_plan_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"x\.json: not a compression plan: not valid JSON"):
        CompressionPlan.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"x\.json: expected a JSON object at the top level, got list"):
        CompressionPlan.load(bad)
    with pytest.raises(FileNotFoundError, match="no compression plan at"):
        CompressionPlan.load(tmp_path / "missing.json")


# --- compatibility -------------------------------------------------------------------------------------------------

def test_check_compatible_accepts_its_run():
    flux_plan(steps=5).check_compatible(FLUX, height=1024, width=1024, text_len=512, num_steps=5)


@pytest.mark.parametrize("config, kw, field, have, want", [
    (SD3, {}, "model_class", "'FluxTransformer2DModel'", "'SD3Transformer2DModel'"),
    (FluxConfig(guidance_embeds=True, num_single_layers=20), {}, "num_layers", "57", "39"),
    (FluxConfig(guidance_embeds=True, num_attention_heads=16, attention_head_dim=128), {}, "num_heads", "24", "16"),
    (FluxConfig(guidance_embeds=True, num_attention_heads=12, attention_head_dim=256,
                axes_dims_rope=(32, 112, 112)), {}, "head_dim", "128", "256"),
    (FLUX, {"height": 2048}, "height", "1024", "2048"),
    (FLUX, {"width": 768}, "image_tokens", "4096", "3072"),
    (FLUX, {"text_len": 256}, "text_len", "512", "256"),
    (FLUX, {"num_steps": 28}, "num_steps", "5", "28"),
    (FluxConfig(guidance_embeds=False), {}, "model_config.guidance_embeds", "True", "False"),  # dev vs schnell
])
def test_check_compatible_refuses(config, kw, field, have, want):
    run = dict(height=1024, width=1024, text_len=512, num_steps=5) | kw
    with pytest.raises(ValueError, match="does not match") as e:
        flux_plan(steps=5).check_compatible(config, **run)
    assert f"{field}: plan has {have}, requested {want}" in str(e.value)


def test_check_compatible_tells_sd3_variants_apart():
    p = CompressionPlan.full(SD3, height=1024, width=1024, text_len=333, num_steps=4)
    p.check_compatible(SD3, height=1024, width=1024, text_len=333, num_steps=4)
    with pytest.raises(ValueError, match=r"model_config\.qk_norm: plan has None, requested 'rms_norm'"):
        p.check_compatible(SD35M, height=1024, width=1024, text_len=333, num_steps=4)
    bare = p.replace(model_config=None)                  # hand-made plans without a config: shape checks only
    bare.check_compatible(SD35M, height=1024, width=1024, text_len=333, num_steps=4)


# --- accounting ----------------------------------------------------------------------------------------------------

def test_full_plan_keeps_everything():
    p = CompressionPlan.full(FLUX, height=1024, width=1024, text_len=512, num_steps=6)
    assert p.flops_kept_fraction() == 1.0
    assert (p.flops_kept_per_step() == 1.0).all() and p.flops_kept_per_step_layer().shape == (6, 57)
    assert p.method_counts()["full"].tolist() == [57 * 24] * 6


def test_all_cached_keeps_one_step():
    full = CompressionPlan.full(SD3, height=1024, width=1024, text_len=333, num_steps=10)
    hw = np.zeros(full.shape, np.int32)
    hw[0] = -1
    p = full.replace(head_window=hw)
    assert p.flops_kept_fraction() == pytest.approx(1 / 10, abs=1e-12)
    assert p.flops_kept_per_step().tolist() == [1.0] + [0.0] * 9
    assert p.method_counts()["cached"].tolist() == [0] + [24 * 24] * 9


def test_arrow_plan_matches_plan_cost():
    p = flux_plan(steps=8, height=2048, width=1024)
    want = pk.plan_cost(p.head_window, batch=2, tokens=p.image_tokens + 512, text_len=512, text_first=True,
                        head_dim=128)
    got = p.cost(batch=2)
    np.testing.assert_array_equal(got.flops, want.flops)
    np.testing.assert_array_equal(got.tiles, want.tiles)
    assert got.dense_flops == want.dense_flops
    assert p.flops_kept_fraction() == pytest.approx(want.flops.sum() / (want.dense_flops * want.flops.size))
    np.testing.assert_allclose(p.flops_kept_per_step_layer(), want.flop_fraction)
    np.testing.assert_allclose(p.flops_kept_per_step(), want.flops.sum((1, 2)) / (want.dense_flops * 57 * 24))
    assert 0 < p.flops_kept_fraction() < 1


def test_method_counts_and_summary():
    p = flux_plan(steps=6)
    counts = p.method_counts()
    assert list(counts) == ["full", "cached", "arrow_8", "arrow_16", "arrow_32"]
    assert (sum(counts.values()) == 57 * 24).all()
    assert counts["full"][0] == 57 * 24
    hw = np.array(p.head_window)
    hw[1, 0, 0] = 77                                      # a window no candidate produces
    counts = p.replace(head_window=hw).method_counts()
    assert counts["arrow(w=77)"].tolist() == [0, 1, 0, 0, 0, 0]
    text = p.summary()
    assert "attention FLOPs kept" in text and "delta=0.2" in text and "arrow_16" in text
    assert f"{p.flops_kept_fraction():.1%}" in text


# --- heat maps -----------------------------------------------------------------------------------------------------

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
    with pytest.raises(ValueError, match="plan: expected a CompressionPlan"):
        save_heatmap(p.head_window, tmp_path / "x.png")


def test_sparkline_levels_and_summary_curve():
    from ditfa_jax.plan import sparkline

    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([-1.0, 2.0]) == "▁█"  # clipped to [0, 1]


def _grid_positions(order, cols):
    return np.stack(np.divmod(np.asarray(order), cols), axis=-1)


def test_image_token_order_curves():
    from ditfa_jax.cli import TOKEN_ORDER_CHOICES
    from ditfa_jax.plan import TOKEN_ORDERS, image_token_order

    assert set(TOKEN_ORDER_CHOICES) == set(TOKEN_ORDERS)
    assert image_token_order("raster", 4, 6) is None
    for rows, cols in ((16, 16), (6, 10), (64, 96), (1, 5)):
        for name in ("hilbert", "morton"):
            order = image_token_order(name, rows, cols)
            assert order.dtype == np.int32 and sorted(order.tolist()) == list(range(rows * cols)), (name, rows, cols)
    steps = np.abs(np.diff(_grid_positions(image_token_order("hilbert", 16, 16), 16), axis=0)).sum(-1)
    assert (steps == 1).all()  # the Hilbert curve moves to a grid neighbour at every step
    z = _grid_positions(image_token_order("morton", 8, 8), 8)
    for start in range(0, 64, 4):  # every aligned run of 4 Z-order tokens is a 2x2 square
        block = z[start:start + 4]
        assert np.ptp(block[:, 0]) == 1 and np.ptp(block[:, 1]) == 1
    with pytest.raises(ValueError, match="token_order 'snake'"):
        image_token_order("snake", 4, 4)


def test_arrow_band_along_a_curve_is_a_2d_neighbourhood():
    """The keys an image query of an arrow head sees, in image coordinates: a strip of whole rows in raster order, a
    compact region along the Hilbert curve (same count of tiles, so the same cost)."""
    from ditfa_jax.plan import image_token_order

    rows = cols = 32
    n_img, text_len, block = rows * cols, 64, 64  # text fills whole tiles: no image key rides in a text tile
    from pallas_kernels.schedule import dense_mask

    mask = dense_mask(np.array([64]), tokens=n_img + text_len, text_len=text_len, text_first=True,
                      band=(block, block))[0]
    img_mask = mask[text_len:, text_len:]
    query = n_img // 2 + cols // 2  # an image token near the centre, by sequence position
    raster_seen = np.flatnonzero(img_mask[query])
    order = image_token_order("hilbert", rows, cols)
    hilbert_seen = order[img_mask[query]]  # sequence positions -> raster indices
    assert len(hilbert_seen) == len(raster_seen)
    width = lambda idx: np.ptp(idx % cols) + 1  # noqa: E731
    height = lambda idx: np.ptp(idx // cols) + 1  # noqa: E731
    assert width(raster_seen) == cols and height(raster_seen) <= len(raster_seen) // cols + 1
    assert width(hilbert_seen) < cols and height(hilbert_seen) < rows
    # here: 192 keys in a 6 x 32 strip (raster) vs a 16 x 16 box (Hilbert); the query's grid neighbours are inside
    q = order[query]
    neighbours = [q - 1, q + 1, q - cols, q + cols]
    assert np.isin(neighbours, hilbert_seen).sum() >= 3


def test_token_order_in_plan_files(tmp_path):
    plan = flux_plan(steps=3).replace(token_order="hilbert")
    assert CompressionPlan.load(plan.save(tmp_path / "p.json")) == plan
    assert plan.digest() != plan.replace(token_order="raster").digest()
    raw = json.loads(plan.replace(token_order="raster").to_json())
    del raw["token_order"]  # files written before the field existed read as raster
    assert CompressionPlan.from_dict(raw).token_order == "raster"
    raw["token_order"] = "zigzag"
    with pytest.raises(ValueError, match="token_order: expected one of"):
        CompressionPlan.from_dict(raw)
