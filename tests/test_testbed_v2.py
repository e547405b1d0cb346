"""Testbed v2 end to end on a CPU: training (caption dropout), the CFG pipeline on the SD3 code path, the shipped
Fréchet feature network, the attention-structure probe (issue: testbed v2).

The model's quality is measured on the H200 (`benchmarks/bench_testbed.py --testbed v2`, benchmarks/RESULTS.md);
here a model trained for a few steps must run every path: it is the code, not the weights, under test.
"""

import json

import numpy as np
import pytest
from scipy import ndimage

from ditfa_jax.loading import Transformer
from ditfa_jax.testbed.features import embed_images, frechet_distance, load_feature_net
from ditfa_jax.testbed.pipeline import TestbedPipeline, save_pipeline
from ditfa_jax.testbed.quality import attention_structure, heldout_scenes
from ditfa_jax.testbed.testbeds import get_testbed
from ditfa_jax.testbed.tokenizer import WordTokenizer
from ditfa_jax.testbed.train import BatchSource, TrainConfig, _batch, _draw_numbered, _start_worker, train


def _trained_weights(model):
    import jax
    from flax import nnx

    return [np.array(p) for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def two_steps():
    """(model, record, its weights as numpy) of a v2 model trained 2 steps, one step per call, in fp32."""
    model, record = train(TrainConfig(testbed="v2", steps=2, batch_size=2, log_every=1, compute_dtype="float32",
                                      warmup_steps=1), progress=False)
    return model, record, _trained_weights(model)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, two_steps):
    """The 2-step v2 model, its weights then jittered (adaLN-zero leaves a 2-step model blind to the caption, and CFG
    a no-op), saved and loaded back as a testbed folder."""
    import jax
    from flax import nnx

    testbed = get_testbed("v2")
    model, record, _ = two_steps
    assert record["recipe"]["caption_dropout"] == testbed.model.CAPTION_DROPOUT and record["steps_done"] == 2
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree_util.tree_unflatten(
        tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))
    folder = tmp_path_factory.mktemp("v2") / "testbed"
    save_pipeline(folder, Transformer(testbed.model.TRANSFORMER_CONFIG, *nnx.split(model.transformer)),
                  model.text_encoder, scheduler=testbed.model.SCHEDULER, tokenizer_file=testbed.tokenizer_file,
                  training=record, testbed="v2", guidance_scale=testbed.model.GUIDANCE_SCALE, image_size=64)
    return TestbedPipeline.from_pretrained(folder)


def test_folder_records_testbed_and_guidance(pipe):
    index = json.loads((pipe.folder / "model_index.json").read_text())
    assert (index["testbed"], index["guidance_scale"], index["transformer"][1]) == ("v2", 4.0, "SD3Transformer")
    assert pipe.testbed.name == "v2" and pipe.guidance_scale == 4.0 and pipe.text_len == 56


def test_cfg_sampling_and_search_run(pipe):
    captions = ["a red circle", "a tiny striped blue square at the top left on a wavy background"]
    images = pipe(captions, seeds=0, num_steps=2)
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    unguided = pipe(captions, seeds=0, num_steps=2, guidance_scale=1.0)
    assert np.abs(images - unguided).max() > 1e-4  # the CFG path ran: guidance changes the images
    result = pipe.calibrate(captions[:1], delta=0.5, num_steps=2, progress=False)
    assert result.plan.shape == (2, 5, 6) and 0.0 < result.plan.flops_kept_fraction() <= 1.0
    compressed = pipe(captions, seeds=0, num_steps=2, plan=result.plan)
    assert np.isfinite(compressed).all()


def test_negative_is_the_dropped_caption(pipe):
    """CFG's uncond branch is what caption dropout trains: the empty caption (all padding)."""
    testbed = get_testbed("v2")
    tok = WordTokenizer.from_file(testbed.tokenizer_file)
    _, ids, mask = _batch(np.random.default_rng(0), testbed, tok, 64, caption_dropout=0.5)
    dropped = ~mask.any(1)
    assert 10 < dropped.sum() < 54 and (ids[dropped] == 0).all()
    empty_ids, empty_mask = tok.encode([""], max_length=testbed.model.TEXT_LENGTH)
    assert (empty_ids == 0).all() and not empty_mask.any()
    neg = pipe.negative(2)
    text, pooled = pipe.encode([""] * 2)
    np.testing.assert_array_equal(neg["negative_prompt_embeds"], text)
    np.testing.assert_array_equal(neg["negative_pooled_prompt_embeds"], pooled)


def test_worker_batches_do_not_depend_on_who_draws_them():
    """With data workers, batch i comes from the stream (seed, i): a worker process gives what this process gives,
    in order, and consecutive batches differ."""
    testbed = get_testbed("v2")
    cfg = TrainConfig(testbed="v2", batch_size=3, seed=5, data_workers=1)
    source = BatchSource(testbed, WordTokenizer.from_file(testbed.tokenizer_file), cfg, caption_dropout=0.5)
    try:
        drawn = [source.next() for _ in range(3)]
    finally:
        source.close()
    _start_worker("v2")
    for index, (scenes, ids, mask) in enumerate(drawn):
        want_scenes, want_ids, want_mask = _draw_numbered(5, index, 3, 0.5)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
        assert scenes.keys() == want_scenes.keys()
        for name in scenes:
            np.testing.assert_array_equal(scenes[name], want_scenes[name])
    assert not np.array_equal(drawn[0][1], drawn[1][1])
    with pytest.raises(ValueError, match="data_workers -1"):
        BatchSource(testbed, None, TrainConfig(data_workers=-1), caption_dropout=0.0)


def test_shipped_feature_net_sees_degradation():
    testbed = get_testbed("v2")
    net = load_feature_net(testbed.feature_net)
    renders = testbed.world.render_scenes(heldout_scenes(192, seed=3, objects=None, testbed="v2"))
    base = embed_images(net, renders)
    assert np.isfinite(base).all()
    distances = [frechet_distance(base, embed_images(net, ndimage.gaussian_filter(renders, (0, s, s, 0))))
                 for s in (0.5, 1.0, 2.0)]
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_attention_structure_probe():
    pipe = TestbedPipeline.from_pretrained()  # v1: its probe runs the FLUX order and RoPE
    out = attention_structure(pipe, ["a small red circle at the top left on a grey background"], num_steps=3)
    assert out["band_mass"].shape == (3, 10, 6) and out["step_similarity"].shape == (2, 10, 6)
    assert np.all((out["band_mass"] > 0) & (out["band_mass"] <= 1 + 1e-5))
    assert np.all(np.abs(out["step_similarity"]) <= 1 + 1e-5)
    wide = attention_structure(pipe, ["a small red circle at the top left on a grey background"], num_steps=1,
                               arrow=1)
    assert np.all(wide["band_mass"] >= out["band_mass"][:1] - 1e-6)  # a wider band keeps at least as much


def test_shipped_v2_model_draws_what_it_is_told():
    """The shipped weights (trained on the H200, benchmarks/RESULTS.md) on 8 held-out single-object captions."""
    from ditfa_jax.testbed.quality import prompt_fidelity

    pipe = TestbedPipeline.from_pretrained("v2")
    assert pipe.testbed.name == "v2" and pipe.guidance_scale == 4.0
    score, images = prompt_fidelity(pipe, heldout_scenes(8, seed=99, objects=1, testbed="v2"), seeds=0)
    assert images.shape == (8, 64, 64, 3) and score["object"] >= 0.6 and score["colour"] >= 0.9, score


def test_missing_weights_say_how_to_get_them(monkeypatch, tmp_path):
    import dataclasses

    from ditfa_jax.testbed import pipeline

    absent = dataclasses.replace(get_testbed("v2"), checkpoint=tmp_path / "absent")
    monkeypatch.setattr(pipeline, "get_testbed", lambda name: absent)
    with pytest.raises(FileNotFoundError, match="testbed.train --testbed v2"):
        TestbedPipeline.from_pretrained("v2")


def test_sweep_searches_step_methods_alone_and_unified(pipe):
    """The sweep's step-level searches keep every head full; the unified one compresses heads and steps."""
    from ditfa_jax.testbed.quality import quality_sweep, search_options

    alone = search_options("block-cache", 0.1, num_layers=5)
    assert alone["delta"] == 0.0 and alone["step_kinds"] == () and alone["block_candidates"] == (1, 2, 3, 4)
    mixed = search_options("taylor+heads", 0.1, num_layers=5, head_delta=0.02)  # a head budget of its own
    assert (mixed["delta"], mixed["step_delta"], mixed["step_kinds"]) == (0.02, 0.1, ("taylor1", "taylor2"))
    assert search_options("taylor", 0.1, num_layers=5, head_delta=0.02)["delta"] == 0.0  # no heads to budget
    scenes = heldout_scenes(2, seed=5, objects=None, testbed="v2")
    rows, images = quality_sweep(pipe, scenes[np.arange(1)], ["a red circle"], [0.5], num_steps=3,
                                 include_global=False, searches=("unified", "taylor"), gates=[(1, 1e9)],
                                 fewer_steps=(2,), choose_at=(1.0,), timed=False, progress=False)
    fewer, gate, unified, taylor, chosen, by_median = rows[1:]
    assert gate["search"] == "gate F=1" and gate["cost"] == pytest.approx((1 + 2 * 0.2) / 3, abs=1e-4)  # all after 0
    assert gate["blocks_cached"] == 0.8
    assert unified["search"] == "unified" and unified["steps_skipped"] > 0  # a loose budget skips steps
    assert unified["cost"] < 1.0 and 0.0 <= unified["blocks_cached"] <= 1.0
    # the least-error row reports the held-out row of the plan closest to dense on the calibration caption
    assert chosen["search"] == "least error over methods" and chosen["max_cost"] == 1.0
    options = {"unified delta=0.5": unified, "taylor delta=0.5": taylor, "dense 2 steps": fewer}  # the baseline too
    picked = options[chosen["chosen"]]
    assert {k: chosen[k] for k in picked if k != "search"} == {k: v for k, v in picked.items() if k != "search"}
    assert chosen["calibration_error"] == min(r["calibration_error"] for r in options.values())
    assert fewer["calibration_error"] > 0 and gate.get("calibration_error") is None  # the gate is not a candidate
    assert images["least error over methods, cost <= 1"] is images[chosen["chosen"]]
    # the same choice by the median over the calibration images (one image here: the median is the mean)
    assert by_median["search"] == "least error over methods (median)" and by_median["chosen"] == chosen["chosen"]
    assert all(r["calibration_error_median"] == r["calibration_error"] for r in options.values())


def test_scanned_training_calls_equal_single_steps(two_steps):
    """Two optimizer steps in one jitted call (a scan) train the same weights as one step per call (fp32)."""
    _, single_record, single = two_steps
    model, record = train(TrainConfig(testbed="v2", steps=2, batch_size=2, log_every=2, compute_dtype="float32",
                                      warmup_steps=1, steps_per_call=2), progress=False)
    for a, b in zip(single, _trained_weights(model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    single_mean = np.mean([loss for _, loss in single_record["loss_curve"]])
    assert record["loss_curve"][0][0] == 2 and abs(record["loss_curve"][0][1] - single_mean) < 1e-4
    with pytest.raises(ValueError, match="steps_per_call 3"):
        train(TrainConfig(testbed="v2", steps=4, batch_size=2, steps_per_call=3), progress=False)


def test_sweep_runs_each_search_on_fewer_base_steps_too(pipe):
    """`base_steps`: a row per search on fewer steps, priced against dense with all steps and a candidate of the
    least-error rows; a base that is not fewer than the steps is refused. `head_deltas`: Taylor with heads gets a
    row per head budget, which compresses the heads of the steps it computes."""
    from ditfa_jax.testbed.quality import quality_sweep

    scenes = heldout_scenes(1, seed=5, objects=None, testbed="v2")
    rows, images = quality_sweep(pipe, scenes, ["a red circle"], [0.5], num_steps=3, include_global=False,
                                 searches=("taylor", "taylor+heads"), base_steps=(2,), head_deltas=(1e9,),
                                 choose_at=(1.0,), timed=False, progress=False)
    on_fewer = next(r for r in rows if r["search"] == "taylor on 2 steps")
    assert on_fewer["steps"] == 2 and on_fewer["cost"] <= 2 / 3 + 1e-4 and on_fewer["psnr_db"] < np.inf
    assert "taylor on 2 steps delta=0.5" in images and on_fewer["calibration_error"] > 0
    taylor = next(r for r in rows if r["search"] == "taylor")
    mixed = next(r for r in rows if r["search"] == "taylor+heads heads 1e+09")
    assert mixed["head_delta"] == 1e9 and "head_delta" not in taylor
    assert mixed["steps_skipped"] == taylor["steps_skipped"]  # the same step choices: heads cost no step error
    computed = 1 - mixed["steps_skipped"] / 3  # attention kept on the computed steps, less than all of it
    assert mixed["flops_kept"] < computed - 0.05 and mixed["cost"] < taylor["cost"]
    assert taylor["attention_kept_priced"] == 1.0 and mixed["attention_kept_priced"] < 1.0  # where blocks run
    assert "taylor+heads heads 1e+09 on 2 steps" in {r["search"] for r in rows}
    with pytest.raises(ValueError, match=r"base_steps \[3\]"):
        quality_sweep(pipe, scenes, ["a red circle"], [0.5], num_steps=3, base_steps=(3,), progress=False)


def test_sweep_searches_fp8_heads_priced_at_the_cost_model(pipe):
    """The search "per-layer+fp8" prices every candidate at the cost model's layout (FP8's time is measured at real
    sizes only: at the testbed's own head size the search would be refused); at FLUX-2K prices and a small budget
    it takes FP8 heads, and the row reports their share."""
    from ditfa_jax.testbed.quality import quality_sweep

    scenes = heldout_scenes(1, seed=5, objects=None, testbed="v2")
    rows, _ = quality_sweep(pipe, scenes, ["a red circle"], [0.1], num_steps=3, include_global=False,
                            searches=("per-layer+fp8",), cost_model="h200-flux-dev-2048", timed=False,
                            progress=False)
    fp8 = rows[-1]
    assert fp8["search"] == "per-layer+fp8" and 0.0 < fp8["fp8_heads"] < 1.0 and fp8["cost"] < 1.0
    assert rows[0]["fp8_heads"] == 0.0  # dense


def test_sweep_caches_mlp_branches_alone_and_with_taylor(pipe):
    """The MLP-branch searches: alone (every step computes; run), and under Taylor with a budget of their own."""
    from ditfa_jax.testbed.quality import quality_sweep, search_options

    alone = search_options("mlp-cache", 0.1, num_layers=5)
    assert (alone["delta"], alone["step_delta"], alone["mlp_delta"]) == (0.0, 0.0, 0.1)
    mixed = search_options("taylor+mlp", 0.1, num_layers=5, head_delta=0.02)  # the MLP budget set apart
    assert (mixed["delta"], mixed["step_delta"], mixed["mlp_delta"]) == (0.0, 0.1, 0.02)
    assert "mlp_delta" not in search_options("unified", 0.1, num_layers=5) or \
        search_options("unified", 0.1, num_layers=5)["mlp_delta"] == 0.0  # the unified search as it was
    scenes = heldout_scenes(2, seed=5, objects=None, testbed="v2")
    rows, _ = quality_sweep(pipe, scenes[np.arange(1)], ["a red circle"], [10.0], num_steps=3, include_global=False,
                            searches=("mlp-cache",), timed=False, progress=False)
    mlp = rows[1]
    assert mlp["search"] == "mlp-cache" and mlp["steps_skipped"] == 0
    assert mlp["mlp_cached"] == pytest.approx(2 / 3, abs=1e-4) and mlp["cost"] < 1.0  # all but step 0's
