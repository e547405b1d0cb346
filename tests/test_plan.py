"""Compression plans: validation, JSON round trip, compatibility checks, FLOP accounting, summary (CPU)."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import pallas_kernels as pk
from ditfa_jax.configs import FluxConfig, SD3Config
from ditfa_jax.methods import DEFAULT_CANDIDATES, windows_from_choice
from ditfa_jax.plan import SCHEMA_VERSION, V1_BAND, CompressionPlan, sparkline
from pallas_kernels import default_band

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


# --- construction and validation -----------------------------------------------------------------------------------

def test_full_plan():
    p = CompressionPlan.full(FLUX, height=1024, width=768, text_len=512, num_steps=28)
    assert p.shape == (28, 57, 24) and p.head_window.dtype == np.int32 and (p.head_window == -1).all()
    assert (p.family, p.model_class, p.image_tokens, p.text_first) == ("flux", "FluxTransformer2DModel", 3072, True)
    assert p.delta is None and p.c is None and SCHEMA_VERSION == 2
    assert p.token_grid == (64, 48) and p.band == (128, 128) == V1_BAND[128]  # rows x cols; head_dim 128
    assert not p.head_window.flags.writeable
    s = CompressionPlan.full(SD3, height=1024, width=1024, text_len=333, num_steps=28)
    assert (s.family, s.text_first, s.shape) == ("sd3", False, (28, 24, 24))
    assert s.token_grid == (64, 64) and s.band == (128, 64) == default_band(64)
    assert CompressionPlan.full(SD3, height=1024, width=1024, text_len=333, num_steps=2, band=(64, 32)).band == (64, 32)


def test_schema_1_band_is_the_kernels_default_today():
    """New plans take the kernel's default band; schema-1 files keep V1_BAND whatever that default becomes."""
    assert {d: default_band(d) for d in V1_BAND} == dict(V1_BAND)


@pytest.mark.parametrize("change, match", [
    (lambda hw: hw[:, :-1], r"head_window: expected shape \[steps, layers, heads\] = \[4, 57, 24\].*\[4, 56, 24\]"),
    (lambda hw: hw.astype(np.float32), r"head_window: expected an integer array, got dtype float32"),
    (lambda hw: np.where(hw == 0, -3, hw), r"head_window: values must lie in \[-2"),
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
    ("band", (128, 48), r"band: expected \(query, key\) tokens, two powers of two >= 16, got \(128, 48\)"),
    ("band", (8, 8), r"band: expected .* powers of two >= 16"),
    ("band", (128,), r"band: expected"),
    ("band", "128x128", r"band: expected"),
    ("band", (128.0, 128), r"band: expected"),
    ("token_grid", (64, 32), r"token_grid: 64 x 32 = 2048 tokens, but image_tokens is 4096"),
    ("token_grid", (32, 128), r"token_grid: 32 x 128 tokens do not cut 1024x1024 pixels into equal square tokens"),
    ("token_grid", (64,), r"token_grid: expected \(rows, cols\), two integers >= 1"),
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
    head = raw["methods"]["head"]
    assert head["candidate_windows"] == {"cached": 0, "arrow_8": 256, "arrow_16": 128, "arrow_32": 64}
    assert len(head["head_window"]) == 50 and len(head["head_window"][1][2]) == 24
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


def _head(raw):
    return raw["methods"]["head"]


def _fp8(raw, **linear):
    raw["methods"]["linear"] = {"format": "e4m3", "fp8_layers": ["stack0/attn/to_q"], **linear}


def test_fp8_layers_round_trip_digest_and_summary(tmp_path):
    plan = flux_plan(steps=3)
    fp8 = plan.replace(fp8_layers=["stack1/attn/to_q", "stack0/ff/net_2"])
    assert fp8.fp8_layers == ("stack0/ff/net_2", "stack1/attn/to_q")  # sorted: one plan, one digest
    assert fp8.digest() != plan.digest() and fp8 != plan
    assert "linear" not in json.loads(plan.to_json())["methods"]      # files without FP8 are what they were
    assert json.loads(fp8.to_json())["methods"]["linear"] == {"format": "e4m3",
                                                              "fp8_layers": list(fp8.fp8_layers)}
    assert CompressionPlan.load(fp8.save(tmp_path / "fp8.json")) == fp8
    assert "linear layers in FP8 (e4m3): 2 of" in fp8.summary() and "FP8" not in plan.summary()


@pytest.mark.parametrize("edit, match", [
    (lambda r: r["model"].pop("num_heads"), r"missing model\.num_heads"),
    (lambda r: r["run"].pop("text_len"), r"missing run\.text_len"),
    (lambda r: r.pop("schema_version"), r"missing field 'schema_version'"),
    (lambda r: r.update(schema_version=3), r"field 'schema_version' is 3; this ditfa-jax reads schemas 1 and 2"),
    (lambda r: r.update(schema_version=True), r"field 'schema_version' is True"),
    (lambda r: _head(r).update(head_window=[row[:-1] for row in _head(r)["head_window"]]),
     r"methods\.head\.head_window: expected shape \[steps, layers, heads\] = \[3, 57, 24\].*got \[3, 56, 24\]"),
    (lambda r: _head(r)["head_window"][1][0].pop(), r"methods\.head\.head_window: expected integer lists.*ragged"),
    (lambda r: _head(r)["head_window"][1][0].__setitem__(0, 1.5),
     r"methods\.head\.head_window: expected integer lists.*float"),
    (lambda r: _head(r)["head_window"][0][3].__setitem__(5, 0),
     r"methods\.head\.head_window: step 0 must be all full.*layer 3, head 5"),
    (lambda r: r["run"].update(num_steps=4), r"methods\.head\.head_window: expected shape .*\[4, 57, 24\]"),
    (lambda r: r["model"].update(text_first="yes"), r"model\.text_first: expected a bool, got 'yes'"),
    (lambda r: r["search"].update(candidates="cached"), r"search\.candidates: expected a list of method names"),
    (lambda r: r["search"].update(candidates=["cached", "dense"]), r"search\.candidates: 'dense' is not a candidate"),
    (lambda r: r["run"].update(text_len="512"), r"run\.text_len: expected an integer >= 0, got '512'"),
    (lambda r: r["run"].update(height=1024.0), r"run\.height: expected an integer >= 1, got 1024\.0"),
    (lambda r: r["model"].update(family=5), r"model\.family: expected a str, got 5"),
    (lambda r: r["model"].update(config=[1]), r"model\.config: expected a dict or None, got list"),
    (lambda r: r.update(notes=[]), r"notes: expected a dict, got list"),
    (lambda r: r["search"].update(delta=-1), r"search\.delta: expected a finite value >= 0"),
    (lambda r: r["run"].update(token_order="zigzag"), r"run\.token_order: expected one of"),
    (lambda r: r.update(extra=1), r"unknown top-level key\(s\) \['extra'\]"),
    (lambda r: r["run"].update(extra=1), r"unknown key\(s\) \['run\.extra'\]; run holds"),
    (lambda r: r.pop("notes"), r"missing top-level key\(s\) \['notes'\]"),
    (lambda r: r.update(format="something else"), r"format: expected 'ditfa-jax compression plan'"),
    (lambda r: r.update(run=[]), r"run: expected a JSON object, got list"),
    # the methods section: one entry per kind of method; "head" is required, "step" and "block" optional
    (lambda r: r["methods"].update(branch={}), r"methods: unknown kind\(s\) of method \['branch'\]; this "
                                               r"ditfa-jax knows \['head', 'step', 'block', 'mlp', 'linear'\]"),
    (lambda r: r["methods"].pop("head"), r"missing methods\.head"),
    (lambda r: r.update(methods=[]), r"methods: expected a JSON object, got list"),
    (lambda r: _head(r).pop("band"), r"missing methods\.head\.band"),
    (lambda r: _head(r).update(extra=1), r"unknown key\(s\) \['methods\.head\.extra'\]"),
    (lambda r: _head(r).update(band=[128, 96]), r"methods\.head\.band: expected \(query, key\) tokens, two powers "
                                                r"of two >= 16, got \(128, 96\)"),
    (lambda r: _head(r).update(band=[8, 8]), r"methods\.head\.band: expected"),
    (lambda r: _head(r).update(band=128), r"methods\.head\.band: expected .* got 128"),
    (lambda r: _head(r).update(band=[128, 64, 64]), r"methods\.head\.band: expected"),
    (lambda r: _head(r).update(band=[128.0, 128]), r"methods\.head\.band: expected"),
    (lambda r: _head(r)["candidate_windows"].update(arrow_8=100),
     r"methods\.head\.candidate_windows: .* is not what search\.candidates gives"),
    # the token grid must hold the image tokens and cut the image into square tokens
    (lambda r: r["run"].update(token_grid=[64, 32]), r"run\.token_grid: 64 x 32 = 2048 tokens, but image_tokens is "
                                                     r"4096"),
    (lambda r: r["run"].update(token_grid=[32, 128]), r"run\.token_grid: 32 x 128 tokens do not cut 1024x1024"),
    (lambda r: r["run"].update(token_grid="64x64"), r"run\.token_grid: expected \(rows, cols\)"),
    (lambda r: r["run"].update(token_grid=[64, 64.0]), r"run\.token_grid: expected \(rows, cols\)"),
    (lambda r: r["run"].update(image_tokens=4095), r"run\.token_grid: 64 x 64 = 4096 tokens, but image_tokens is "
                                                   r"4095"),
    # methods.linear: the FP8 layers a plan was calibrated with
    (lambda r: _fp8(r, fp8_layers="stack0/attn/to_q"), r"methods\.linear\.fp8_layers: expected a list of layer paths"),
    (lambda r: _fp8(r, fp8_layers=[]), r"methods\.linear\.fp8_layers: an empty list"),
    (lambda r: _fp8(r, fp8_layers=["a", "a"]), r"methods\.linear\.fp8_layers: \['a'\] listed twice"),
    (lambda r: _fp8(r, fp8_layers=["a", 3]), r"methods\.linear\.fp8_layers: expected a list of layer paths"),
    (lambda r: _fp8(r, format="e5m2"), r"methods\.linear\.format: 'e5m2' is not known to this ditfa-jax; it runs "
                                       r"'e4m3'"),
    (lambda r: r["methods"].update(linear={"format": "e4m3"}), r"missing methods\.linear\.fp8_layers"),
])
def test_bad_files(tmp_path, edit, match):
    path = _edited(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as e:
        CompressionPlan.load(path)
    assert str(path) in str(e.value)


def test_file_layout(tmp_path):
    plan = flux_plan(steps=3, notes={"prompts": 8}).replace(token_order="hilbert")
    text = plan.to_json()
    raw = json.loads(text)
    assert list(raw) == ["format", "schema_version", "model", "run", "search", "methods", "notes"]
    assert (raw["format"], raw["schema_version"]) == ("ditfa-jax compression plan", 2)
    assert list(raw["model"]) == ["family", "model_class", "num_layers", "num_heads", "head_dim", "text_first",
                                  "config"]
    assert raw["model"]["config"] == plan.model_config and "vae_scale_factor" not in plan.model_config
    assert raw["run"] == {"height": 1024, "width": 1024, "token_grid": [64, 64], "image_tokens": 4096,
                          "text_len": 512, "num_steps": 3, "token_order": "hilbert"}
    assert raw["search"] == {"candidates": list(DEFAULT_CANDIDATES), "delta": 0.2, "c": 1.5}
    assert list(raw["methods"]) == ["head"]
    assert list(raw["methods"]["head"]) == ["band", "legend", "candidate_windows", "head_window"]
    assert raw["methods"]["head"]["band"] == [128, 128] and raw["notes"] == {"prompts": 8}
    assert raw["methods"]["head"]["head_window"] == plan.head_window.tolist()
    rows = [line.strip() for line in text.splitlines() if re.fullmatch(r"\[-?[0-9][-0-9,]*\],?", line.strip())]
    assert len(rows) == 3 * 57 and rows[0] == "[" + ",".join(["-1"] * 24) + "],"  # one line per (step, layer)
    assert CompressionPlan.from_dict(raw) == plan
    del raw["methods"]["head"]["legend"], raw["methods"]["head"]["candidate_windows"]  # derived, may be left out
    assert CompressionPlan.from_dict(raw) == plan


def test_band_in_files_cost_and_digest(tmp_path):
    plan = flux_plan(steps=4, height=1024, width=512)
    fine = plan.replace(band=(64, 32))
    again = CompressionPlan.load(fine.save(tmp_path / "fine.json"))
    assert again == fine and again.band == (64, 32) and again != plan
    assert fine.digest() != plan.digest() and again.digest() == fine.digest()
    assert fine.replace(band=(128, 128)).digest() == plan.digest()
    want = pk.plan_cost(plan.head_window, batch=1, tokens=2048 + 512, text_len=512, text_first=True, head_dim=128,
                        band=(64, 32))
    np.testing.assert_array_equal(fine.cost().flops, want.flops)
    assert (fine.cost().block_q, fine.cost().block_k) == (64, 32)
    assert fine.flops_kept_fraction() < plan.flops_kept_fraction()  # a finer band drops more of the keys
    assert "band 64x32" in fine.summary() and "band 128x128" in plan.summary()


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
    (FLUX, {"width": 768}, "token_grid", "(64, 64)", "(64, 48)"),
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


def test_sparkline_levels_and_summary_curve():
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([-1.0, 2.0]) == "▁█"  # clipped to [0, 1]


# --- schema-1 files ------------------------------------------------------------------------------------------------

V1_PLANS = Path(__file__).parent / "fixtures" / "plans"
# What the schema-1 code (commit b932bc9) computed for each fixture: digest, flops_kept_fraction(), cost band.
V1_MEANING = {
    "flux_v1.json": ("56b8cff37b2f8708", 0.7925170068027212, (128, 128), (16, 24), 2931818496),
    "sd3_hilbert_v1.json": ("32a80cdac4f02593", 0.8086540616800496, (128, 64), (24, 16), 565224192),
    "testbed_v1.json": ("89aededef6c7070e", 0.6345168860320375, (128, 64), (32, 32), 16302473216),
}
V1_CONFIGS = {
    "flux_v1.json": FluxConfig(num_layers=2, num_single_layers=1, num_attention_heads=3, guidance_embeds=True),
    "sd3_hilbert_v1.json": SD3Config(num_layers=2, num_attention_heads=2, attention_head_dim=64,
                                     caption_projection_dim=128),
}


def _v1_raw(name="flux_v1.json"):
    return json.loads((V1_PLANS / name).read_text())


@pytest.mark.parametrize("name", sorted(V1_MEANING))
def test_v1_file_loads_with_its_old_meaning(name, tmp_path):
    raw = _v1_raw(name)
    assert raw["schema_version"] == 1
    plan = CompressionPlan.load(V1_PLANS / name)
    digest, kept, band, grid, flops = V1_MEANING[name]
    assert plan.head_window.tolist() == raw["head_window"]
    assert plan.band == band == V1_BAND[raw["head_dim"]] and plan.token_grid == grid
    assert (plan.cost().block_q, plan.cost().block_k) == band and int(plan.cost().flops.sum()) == flops
    assert plan.flops_kept_fraction() == kept and plan.digest() == digest
    assert (plan.delta, plan.c, plan.token_order, plan.notes) == (raw["delta"], raw["c"], raw["token_order"],
                                                                raw["notes"])
    assert "vae_scale_factor" in raw["model_config"] and "vae_scale_factor" not in plan.model_config
    assert plan.model_config == {k: v for k, v in raw["model_config"].items() if k != "vae_scale_factor"}
    resaved = plan.save(tmp_path / name)
    assert json.loads(resaved.read_text())["schema_version"] == 2
    again = CompressionPlan.load(resaved)
    assert again == plan and again.digest() == digest and again.flops_kept_fraction() == kept


def test_v1_file_is_compatible_with_its_model():
    from ditfa_jax.testbed.model import TRANSFORMER_CONFIG  # sampled at vae_scale_factor 1

    for name, config, vae in [(n, c, 8) for n, c in V1_CONFIGS.items()] + [("testbed_v1.json", TRANSFORMER_CONFIG, 1)]:
        plan = CompressionPlan.load(V1_PLANS / name)
        plan.check_compatible(config, height=plan.height, width=plan.width, text_len=plan.text_len,
                              num_steps=plan.num_steps, vae_scale_factor=vae)
        with pytest.raises(ValueError, match="token_grid"):
            plan.check_compatible(config, height=plan.height, width=plan.width, text_len=plan.text_len,
                                  num_steps=plan.num_steps, vae_scale_factor=2 * vae)


def test_v1_file_without_vae_scale_factor_reads_8():
    raw = _v1_raw()
    del raw["model_config"]["vae_scale_factor"]
    assert CompressionPlan.from_dict(raw) == CompressionPlan.load(V1_PLANS / "flux_v1.json")
    bare = _v1_raw("sd3_hilbert_v1.json")
    del bare["model_config"]  # hand-made: no config at all
    plan = CompressionPlan.from_dict(bare)
    assert plan.model_config is None and plan.token_grid == (24, 16)
    raw = _v1_raw("testbed_v1.json")  # 64x64 pixels at 16 pixels per token are not 1024 tokens
    del raw["model_config"]["vae_scale_factor"]
    with pytest.raises(ValueError, match=r"plan: image_tokens: 1024 does not match 64x64 pixels at 16 pixels per "
                                         r"token \(vae_scale_factor 8 x patch 2\)"):
        CompressionPlan.from_dict(raw)


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.pop("num_heads"), r"missing field\(s\) \['num_heads'\]"),
    (lambda r: r.update(extra=1), r"unknown field\(s\) \['extra'\]"),
    (lambda r: r.update(band=[64, 64]), r"unknown field\(s\) \['band'\]"),  # schema 1 has no band
    (lambda r: r["head_window"][1][0].pop(), r"head_window: expected integer lists.*ragged"),
    (lambda r: r["head_window"][0][1].__setitem__(2, 0), r"head_window: step 0 must be all full.*layer 1, head 2"),
    (lambda r: r.update(num_steps=5), r"head_window: expected shape .*\[5, 3, 3\]"),
    (lambda r: r.update(text_first="yes"), r"text_first: expected a bool, got 'yes'"),
    (lambda r: r.update(candidates="cached"), r"candidates: expected a list of method names"),
    (lambda r: r.update(text_len=-1), r"text_len: expected an integer >= 0"),
    (lambda r: r.update(token_order="zigzag"), r"token_order: expected one of"),
    (lambda r: r.update(image_tokens=385), r"image_tokens: 385 does not match 256x384 pixels at 16 pixels"),
    (lambda r: r["model_config"].update(vae_scale_factor=16), r"image_tokens: 384 does not match 256x384 pixels at "
                                                              r"32 pixels per token \(vae_scale_factor 16"),
    (lambda r: r["model_config"].update(vae_scale_factor="8"), r"model_config\.vae_scale_factor: expected an "
                                                               r"integer >= 1"),
    (lambda r: r.update(head_dim=48), r"head_dim: 48 has no schema-1 band"),
    (lambda r: r.update(head_dim=0), r"head_dim: expected an integer >= 1, got 0"),
    (lambda r: r.update(height="256"), r"height: expected an integer >= 1, got '256'"),
])
def test_bad_v1_files(tmp_path, edit, match):
    raw = _v1_raw()
    edit(raw)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match) as e:
        CompressionPlan.load(path)
    assert str(path) in str(e.value)


def test_token_order_in_plan_files(tmp_path):
    plan = flux_plan(steps=3).replace(token_order="hilbert")
    assert CompressionPlan.load(plan.save(tmp_path / "p.json")) == plan
    assert plan.digest() != plan.replace(token_order="raster").digest()
    raw = _v1_raw()
    del raw["token_order"]  # schema-1 files written before the field existed read as raster
    assert CompressionPlan.from_dict(raw).token_order == "raster"
    raw["token_order"] = "zigzag"
    with pytest.raises(ValueError, match="token_order: expected one of"):
        CompressionPlan.from_dict(raw)


def test_fp8_heads_round_trip_and_count_as_full_flops(tmp_path):
    """A plan whose heads include FP8 ones (window -2): saved and loaded unchanged, named "fp8", its FLOPs a full
    head's; refused at step 0 like any method."""
    cfg = FluxConfig(num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=16)
    plan = CompressionPlan.full(cfg, height=256, width=256, text_len=16, num_steps=3)
    hw = np.array(plan.head_window)
    hw[1:, :, :2] = -2
    hw[2, 0, 3] = 0
    fp8 = plan.replace(head_window=hw, candidates=("cached", "fp8"))
    assert fp8.uses_fp8_heads and not plan.uses_fp8_heads
    loaded = CompressionPlan.load(fp8.save(tmp_path / "fp8.json"))
    assert loaded == fp8 and loaded.digest() == fp8.digest() != plan.digest()
    assert fp8.method_names() == ["full", "cached", "fp8"]
    np.testing.assert_array_equal(fp8.method_counts()["fp8"], [0, 8, 8])
    assert "fp8 50.0%" not in fp8.summary() and "fp8 33.3%" in fp8.summary()
    np.testing.assert_allclose(fp8.flops_kept_per_step(), [1.0, 1.0, 1 - 1 / 16])
    assert plan.replace(head_window=hw).method_names()[-1] == "fp8"  # used, not a candidate: named all the same
    with pytest.raises(ValueError, match="step 0 must be all full"):
        plan.replace(head_window=np.full_like(hw, -2))
