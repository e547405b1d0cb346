"""The trained testbed model shipped in the package: loading, prompt fidelity, compression, demo (issue: testbed).

CPU-sized settings: a few captions and steps. The fidelity figures of record come from `benchmarks/bench_testbed.py`
on a GPU (benchmarks/RESULTS.md); here the shipped weights must still draw what a caption asks for.
"""

import json
import shutil

import numpy as np
import pytest

from ditfa_jax.cli import main as cli_main
from ditfa_jax.testbed import detector
from ditfa_jax.testbed.pipeline import SHIPPED_CHECKPOINT, TestbedPipeline
from ditfa_jax.testbed.quality import heldout_scenes, quality_sweep
from ditfa_jax.testbed.world import captions, sample_scenes

STEPS = 8  # fewer than the default 20: enough for clean shapes on this model, quick on a CPU


@pytest.fixture(scope="module")
def pipe():
    return TestbedPipeline.from_pretrained()


def test_shipped_weights_load_and_follow_captions(pipe):
    training = json.loads((SHIPPED_CHECKPOINT / "training.json").read_text())
    assert training["steps_done"] > 1000 and training["loss_curve"][-1][1] < training["loss_curve"][0][1] / 2
    assert pipe.transformer.config.num_attention_heads == 6 and pipe.text_len == 32
    scenes = heldout_scenes(6, seed=5, objects=1)
    images = pipe(captions(scenes), seeds=0, num_steps=STEPS)
    assert images.shape == (6, 64, 64, 3) and np.isfinite(images).all()
    assert detector.score(images, scenes)["object"] >= 5 / 6  # held-out captions: right colour, shape, region


def test_same_seed_same_image_and_seeds_differ(pipe):
    text = captions(heldout_scenes(1, seed=6))
    a = pipe(text * 2, seeds=[3, 4], num_steps=4)
    np.testing.assert_array_equal(a, pipe(text * 2, seeds=[3, 4], num_steps=4))  # deterministic
    b = pipe(text, seeds=[3], num_steps=4)  # another batch size compiles another program: fp32 rounding only
    np.testing.assert_allclose(a[:1], b, atol=1e-5)
    assert np.abs(a[0] - a[1]).mean() > 1e-3


def test_delta_zero_gives_identical_images(pipe):
    """delta 0 keeps every head full: the plan's images equal the dense ones, bit for bit through the dense program
    the sampler routes an all-full plan to, and to fp32 rounding through the head-wise kernel path itself."""
    from ditfa_jax.attention import AttentionSettings

    calibration = captions(sample_scenes(np.random.default_rng(0), 2, split="train"))
    plan = pipe.calibrate(calibration, delta=0.0, num_steps=4, progress=False).plan
    assert (plan.head_window == -1).all()
    text = captions(heldout_scenes(2, seed=8))
    dense = pipe(text, num_steps=4)
    np.testing.assert_array_equal(pipe(text, num_steps=4, plan=plan), dense)
    through_kernel = pipe(text, num_steps=4, plan=plan, attention=AttentionSettings(shortcuts=False))
    assert not np.array_equal(through_kernel, dense)  # another program ran ...
    np.testing.assert_allclose(through_kernel, dense, atol=1e-4)  # ... computing the same images


def test_tiny_quality_sweep(pipe):
    scenes = heldout_scenes(2, seed=9, objects=None)
    calibration = captions(sample_scenes(np.random.default_rng(1), 2, split="train"))
    rows, images = quality_sweep(pipe, scenes, calibration, [0.5], num_steps=4, searches=("per-layer",),
                                 fewer_steps=(2, 3), progress=False)
    assert [(r["search"], r["steps"]) for r in rows] == [("dense", 4), ("fewer steps", 3), ("fewer steps", 2),
                                                         ("per-layer", 4), ("global", 4)]
    assert set(images) == {"dense", "dense 3 steps", "dense 2 steps", "per-layer delta=0.5", "global delta=0.5"}
    assert [r["cost"] for r in rows[:3]] == [1.0, 0.75, 0.5]  # the plain baseline: fewer dense steps
    for row in rows[1:]:
        assert np.isfinite(row["psnr_db"]) and 0.0 < row["ssim"] < 1.0 and 0.0 <= row["fidelity"] <= 1.0, row
        assert row["frechet"] is None  # no feature network given
    for row in rows[3:]:
        assert 0.0 < row["flops_kept"] < 1.0 and 0.8 < row["cost"] < 1.0, row  # attention ~17 % of a 1K step
    with pytest.raises(ValueError, match="unknown searches"):
        quality_sweep(pipe, scenes, calibration, [0.5], searches=("greedy",), progress=False)
    with pytest.raises(ValueError, match="fewer_steps"):
        quality_sweep(pipe, scenes, calibration, [0.5], num_steps=4, fewer_steps=(4,), progress=False)


def test_demo_command_end_to_end(tmp_path, capsys):
    """The README's main job (`ditfa demo`) with short settings."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "4", "--prompts", "2", "--calibration-prompts", "1",
            "--delta", "0.5"]
    assert cli_main(args) == 0
    assert "attention FLOPs kept" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and len(report["captions"]) == 2 and 0.0 < report["attention_flops_kept"] < 1.0
    assert report["testbed"] == "v2" and report["guidance_scale"] == 4.0  # the default testbed
    for name in ("plan.json", "plan.png", "comparison.png", "report.md", "images/00_dense.png",
                 "images/01_compressed.png"):
        assert (out / name).stat().st_size > 0, name
    assert cli_main(args) == 2  # refuses to overwrite without --overwrite
    assert not list(tmp_path.glob("demo.partial-*"))


def test_bad_testbed_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        TestbedPipeline.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(SHIPPED_CHECKPOINT, broken)
    (broken / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="component 'tokenizer' is missing"):
        TestbedPipeline.from_pretrained(broken)
    (broken / "tokenizer" / "tokenizer.json").write_text((SHIPPED_CHECKPOINT / "tokenizer/tokenizer.json").read_text())
    (broken / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="text encoder weights missing"):
        TestbedPipeline.from_pretrained(broken)
