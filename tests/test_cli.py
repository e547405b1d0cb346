"""The CLI as a new user runs it: a plan carries its settings from `calibrate` to `sample` / `generate` / `bench`,
conflicting overrides are errors naming both values, sizes are checked before any model loads, help shows defaults.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from ditfa_jax.cli import build_parser, main as cli_main
from ditfa_jax.plan import CompressionPlan

FIXTURES = Path(__file__).parent / "fixtures"
FLUX_TINY = FIXTURES / "pipelines" / "flux_tiny"


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    """`ditfa calibrate FOLDER --out plan.json` with nothing but a size and step count (random embeddings)."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert cli_main(["calibrate", str(FLUX_TINY), "--out", str(out), "--height", "64", "--width", "96",
                     "--steps", "3", "--prompts", "2", "--text-len", "8", "--delta", "1.0"]) == 0
    return out


def test_readme_sequence_calibrate_then_bench(plan_file, capsys, tmp_path):
    """The README's sequence: the plan's settings (64x96, 3 steps, 8 text tokens) reach bench unasked."""
    capsys.readouterr()
    rows = tmp_path / "rows.jsonl"
    assert cli_main(["bench", str(FLUX_TINY), "--plan", str(plan_file), "--repeat", "1", "--out", str(rows)]) == 0
    got = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["run"] for r in got] == ["dense", "plan"]
    assert all((r["height"], r["width"], r["steps"]) == (64, 96, 3) for r in got)


def test_sample_and_generate_take_the_plans_settings(plan_file, capsys, tmp_path):
    capsys.readouterr()
    assert cli_main(["sample", str(FLUX_TINY), "--plan", str(plan_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["height"], report["width"], report["steps"], report["text_len"]) == (64, 96, 3, 8)
    out = tmp_path / "images"
    assert cli_main(["generate", str(FLUX_TINY), "--prompt", "a fox", "--plan", str(plan_file),
                     "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["image_000.png"]


@pytest.mark.parametrize("flag,value,field", [("--height", "128", "height"), ("--steps", "5", "steps"),
                                              ("--text-len", "16", "text-len")])
def test_conflicting_override_names_both_values(plan_file, capsys, flag, value, field):
    assert cli_main(["sample", str(FLUX_TINY), "--plan", str(plan_file), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value} conflicts with the plan" in err and str(plan_file) in err
    plan = CompressionPlan.load(plan_file)
    assert f"made for {dict(height=plan.height, steps=plan.num_steps, **{'text-len': plan.text_len})[field]}" in err


def test_agreeing_override_is_accepted(plan_file):
    assert cli_main(["sample", str(FLUX_TINY), "--plan", str(plan_file), "--steps", "3", "--height", "64"]) == 0


def test_generate_max_sequence_length_conflict(plan_file, capsys, tmp_path):
    out = tmp_path / "images"
    assert cli_main(["generate", str(FLUX_TINY), "--prompt", "a", "--plan", str(plan_file),
                     "--max-sequence-length", "16", "--out", str(out)]) == 2
    assert "--max-sequence-length 16 conflicts with the plan" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", [["sample", str(FIXTURES / "flux_dev")],
                                     ["calibrate", str(FIXTURES / "flux_dev"), "--out", "x.json"],
                                     ["generate", str(FLUX_TINY), "--prompt", "a"],
                                     ["bench", str(FLUX_TINY)]])
def test_bad_size_is_refused_before_loading(command, capsys, monkeypatch):
    """A size the model cannot take is an error before any weight loads (loading would fail the test)."""
    import ditfa_jax.loading as loading
    import ditfa_jax.pipelines as pipelines

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the size was checked")

    monkeypatch.setattr(loading, "load_transformer", no_loading)
    monkeypatch.setattr(pipelines, "load_pipeline", no_loading)
    assert cli_main(command + ["--height", "72"]) == 2
    assert "height: flux at vae_scale_factor 8 needs a positive multiple of 16 pixels, got 72" in capsys.readouterr().err


def test_help_shows_defaults_and_explains_the_seed():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name in ("sample", "calibrate", "generate", "demo"):
        text = sub[name].format_help()
        assert "--seed" in text and "(default: 0)" in text and "noise" in text, name
    assert "(default: 0.2)" in sub["calibrate"].format_help()
    assert "default: the plan's" in sub["generate"].format_help()


def test_devices(plan_file, capsys, tmp_path):
    """--devices: a one-device mesh runs and is reported (the same latents as without it); more devices than
    this process has, or a malformed value, is a one-line error (the multi-device runs: test_multi_device.py)."""
    capsys.readouterr()
    runs = {}
    for extra in ([], ["--devices", "1"]):
        out = tmp_path / f"latents{len(extra)}.npy"
        assert cli_main(["sample", str(FLUX_TINY), "--plan", str(plan_file), "--out", str(out), *extra]) == 0
        runs[len(extra)] = (json.loads(capsys.readouterr().out), np.load(out))
    assert runs[2][0]["mesh"] == {"data": 1, "heads": 1} and "mesh" not in runs[0][0]
    np.testing.assert_array_equal(runs[2][1], runs[0][1])
    assert cli_main(["sample", str(FLUX_TINY), "--plan", str(plan_file), "--devices", "2x2"]) == 2
    assert "a mesh of data 2 x heads 2 needs 4 devices; 1 are available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["calibrate", str(FLUX_TINY), "--out", str(tmp_path / "p.json"), "--devices", "2x"])
    assert "expected N (devices on the head axis) or DxH" in capsys.readouterr().err
