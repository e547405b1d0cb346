"""The plan search over step methods (reuse / Taylor), in the same pass as the head search (issue 17; tiny
checkpoints, CPU)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_runs import tiny_run

from ditfa_jax import sample
from ditfa_jax.calibrate import calibrate

STEPS = 6
FLUX_TINY = Path(__file__).parent / "fixtures" / "pipelines" / "flux_tiny"


@pytest.fixture(scope="module", params=["flux_dev", "sd35_medium"])
def setup(request):
    return tiny_run(request.param, STEPS)


@pytest.mark.parametrize("setup", ["flux_dev"], indirect=True)  # one family each keeps CI short
def test_step_search_samples_as_the_plan_runs(setup):
    """Steps whose velocity a step method predicts within step_delta are skipped; the pass's final latents equal
    `sample(plan)` from the same noise, so the search followed the trajectory the plan runs."""
    model, text, common = setup
    scored = calibrate(model, *text, delta=0.3, step_delta=1e-12, progress=False, seed=2, **common)
    assert not scored.plan.uses_step_methods  # nothing is that good, but every allowed method was scored
    assert np.isfinite(scored.step_rse[1:, 1]).all() and np.isnan(scored.step_rse[:, 0]).all()
    assert np.isnan(scored.step_rse[:3, 3]).all() and np.isfinite(scored.step_rse[3:, 3]).all()
    threshold = float(np.median(np.nanmin(scored.step_rse[1:, 1:], axis=1)))
    result = calibrate(model, *text, delta=0.3, step_delta=threshold, progress=False, seed=2, **common)
    plan = result.plan
    assert plan.uses_step_methods and plan.step_kind[0] == 0
    assert 0 < (plan.step_kind != 0).sum() < STEPS - 1, plan.step_kind
    assert plan.notes["step_delta"] == threshold
    noise = jax.random.normal(jax.random.key(2), result.final_latents.shape, jnp.float32)
    sampled = np.asarray(sample(model, noise, *text, plan=plan, **common))
    np.testing.assert_allclose(np.asarray(result.final_latents), sampled, rtol=1e-4, atol=1e-4)
    heads_only = np.asarray(sample(model, noise, *text, plan=plan.replace(step_kind=None), **common))
    assert np.abs(sampled - heads_only).max() > 1e-3  # the skipped steps changed the result


@pytest.mark.parametrize("setup", ["flux_dev"], indirect=True)
def test_no_step_delta_is_the_head_search(setup):
    model, text, common = setup
    plain = calibrate(model, *text, delta=0.3, progress=False, **common)
    assert not plain.plan.uses_step_methods and np.isnan(plain.step_rse).all()
    with pytest.raises(ValueError, match="step_delta"):
        calibrate(model, *text, delta=0.3, step_delta=-1.0, progress=False, **common)
    with pytest.raises(ValueError, match="step_kinds"):
        calibrate(model, *text, delta=0.3, step_delta=0.1, step_kinds=("taylor3",), progress=False, **common)


@pytest.mark.parametrize("setup", ["sd35_medium"], indirect=True)  # CFG and several block stacks
def test_block_search_samples_as_the_plan_runs(setup):
    """Block-residual caching in the same menu: steps where the first F blocks suffice cache the others, and the
    pass's final latents equal `sample(plan)` (the sampler reuses the same residuals and leaves the caches of the
    blocks that did not run alone)."""
    model, text, common = setup
    layers = model.config.total_layers
    candidates = (1, layers // 2)
    result = calibrate(model, *text, delta=0.3, step_delta=1e9, step_kinds=(), block_candidates=candidates,
                       progress=False, seed=4, **common)
    plan = result.plan
    assert not plan.uses_step_methods and plan.uses_block_caching
    assert plan.block_compute[0].all() and not plan.block_compute[1:, 1:].any()  # F = 1 is within any budget
    noise = jax.random.normal(jax.random.key(4), result.final_latents.shape, jnp.float32)
    sampled = np.asarray(sample(model, noise, *text, plan=plan, **common))
    np.testing.assert_allclose(np.asarray(result.final_latents), sampled, rtol=1e-4, atol=1e-4)
    mixed = calibrate(model, *text, delta=0.3, step_delta=float(np.nanmedian(result.step_rse)) if
                      np.isfinite(result.step_rse).any() else 0.5, block_candidates=candidates, progress=False,
                      seed=4, **common)
    sampled = np.asarray(sample(model, noise, *text, plan=mixed.plan, **common))
    np.testing.assert_allclose(np.asarray(mixed.final_latents), sampled, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="block_candidates"):
        calibrate(model, *text, delta=0.3, step_delta=0.1, block_candidates=(layers,), progress=False, **common)


@pytest.mark.parametrize("setup, options", [("flux_dev", dict(delta=0.3, step_delta=1e-3)),  # both FLUX block kinds
                                            ("sd35_medium", dict(delta=0.0))], indirect=["setup"])  # CFG
def test_mlp_search_samples_as_the_plan_runs(setup, options):
    """MLP branches whose cached output is within mlp_delta reuse it; the pass's final latents equal `sample(plan)`
    from the same noise (the sampler carries the same values), with heads and steps searched too (FLUX)."""
    model, text, common = setup
    scored = calibrate(model, *text, delta=0.0, mlp_delta=1e-12, progress=False, seed=3, **common)
    assert not scored.plan.uses_mlp_caching  # nothing is that close, but every MLP branch was scored
    assert np.isnan(scored.mlp_rse[0]).all() and np.isfinite(scored.mlp_rse[1:]).all()
    threshold = float(np.median(scored.mlp_rse[1:]))
    noise = jax.random.normal(jax.random.key(3), scored.final_latents.shape, jnp.float32)
    result = calibrate(model, *text, mlp_delta=threshold, progress=False, seed=3, **options, **common)
    plan = result.plan
    assert plan.uses_mlp_caching and plan.mlp_compute[0].all() and plan.notes["mlp_delta"] == threshold
    computed = plan.step_kind[1:] == 0
    reused = ~plan.mlp_compute[1:][computed]
    assert 0 < reused.mean() < 1, reused.mean()
    np.testing.assert_array_equal(reused, result.mlp_rse[1:][computed] <= threshold)
    sampled = np.asarray(sample(model, noise, *text, plan=plan, **common))
    np.testing.assert_allclose(np.asarray(result.final_latents), sampled, rtol=1e-4, atol=1e-4)
    unreused = np.asarray(sample(model, noise, *text, plan=plan.replace(mlp_compute=None), **common))
    assert np.abs(sampled - unreused).max() > 1e-3  # the cached MLP branches changed the result
    with pytest.raises(ValueError, match="mlp_delta"):
        calibrate(model, *text, delta=0.3, mlp_delta=-1.0, progress=False, **common)


def _dense_velocities(model, text, common, seed: int, steps: int):
    """The dense velocities of every prompt at steps 0..steps-1 from the calibration noise of `seed`, computed
    directly with the whole model (the reference for step methods scored on a subset of the prompts)."""
    from ditfa_jax.attention import AttentionSettings
    from ditfa_jax.denoise import euler_step, prepare_run, velocity

    run = prepare_run(model.config, *text, dtype=model.dtype, **common)
    x = jax.random.normal(jax.random.key(seed), (len(text[0]), *run.latent_shape), jnp.float32)
    out = []
    for step in range(steps):
        v = velocity(model.module(), run.family, run.cond, run.layout, AttentionSettings(), x, run.timesteps[step])[0]
        out.append(v)
        x = euler_step(x, v, run.sigmas[step], run.sigmas[step + 1])
    return out


@pytest.mark.parametrize("setup", ["flux_dev", "sd35_medium"], indirect=True)  # SD3: CFG's [uncond, cond] rows
def test_steps_scored_on_the_first_prompts_use_their_dense_velocity(setup):
    """step_prompts k: a step method's RSE is that of its prediction for the first k prompts against their dense
    velocity, before the step runs (here the reuse of step 0's velocity at step 1, computed directly)."""
    from ditfa_jax.calibrate import prediction_rse

    model, text, common = setup
    v0, v1 = _dense_velocities(model, text, common, seed=3, steps=2)
    for k in (1, 2):
        result = calibrate(model, *text, delta=0.3, step_delta=1e-12, step_kinds=("reuse",), step_prompts=k,
                           progress=False, seed=3, **common)
        assert result.plan.notes["step_prompts"] == k and not result.plan.uses_step_methods
        expected = float(prediction_rse(v0[:k], v1[:k]))
        assert expected > 1e-3  # the rows differ enough that the wrong ones would not match
        np.testing.assert_allclose(result.step_rse[1, 1], expected, rtol=2e-4)
    other = float(prediction_rse(v0[1:], v1[1:]))
    assert abs(other - float(prediction_rse(v0[:1], v1[:1]))) > 1e-3 * other  # prompt 0 alone is told apart


@pytest.mark.parametrize("setup", ["flux_dev"], indirect=True)
def test_steps_skipped_by_the_first_prompts_never_run_and_sample_as_the_plan(setup):
    """A step that the first prompts skip runs no layer (no head is scored there); the pass's final latents equal
    `sample(plan)` from the same noise."""
    model, text, common = setup
    scored = calibrate(model, *text, delta=0.3, step_delta=1e-12, step_prompts=1, progress=False, seed=2, **common)
    threshold = float(np.median(np.nanmin(scored.step_rse[1:, 1:], axis=1)))
    result = calibrate(model, *text, delta=0.3, step_delta=threshold, step_prompts=1, progress=False, seed=2,
                       **common)
    plan = result.plan
    skipped = plan.step_kind != 0
    assert 0 < skipped.sum() < STEPS - 1, plan.step_kind
    assert np.isnan(result.rse[skipped]).all() and np.isfinite(result.rse[1:][~skipped[1:]]).all()
    noise = jax.random.normal(jax.random.key(2), result.final_latents.shape, jnp.float32)
    sampled = np.asarray(sample(model, noise, *text, plan=plan, **common))
    np.testing.assert_allclose(np.asarray(result.final_latents), sampled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setup", ["sd35_medium"], indirect=True)  # CFG, several block stacks
def test_steps_scored_on_the_first_prompts_with_block_caching_sample_as_the_plan(setup):
    """Steps skipped before they run beside steps that cache blocks after they run: the residuals and attention
    caches carry over the skipped steps as the sampler's do (final latents equal `sample(plan)`)."""
    model, text, common = setup
    layers = model.config.total_layers
    scored = calibrate(model, *text, delta=0.3, step_delta=1e-12, step_prompts=1, progress=False, seed=4, **common)
    threshold = float(np.nanmin(scored.step_rse[1:, 1:], axis=1)[2]) * 1.01  # step 3's best method fits
    result = calibrate(model, *text, delta=0.3, step_delta=threshold, step_prompts=1,
                       block_candidates=(1, layers // 2), progress=False, seed=4, **common)
    plan = result.plan
    skipped = plan.step_kind != 0
    assert skipped.any() and not plan.block_compute[~skipped].all(), (plan.step_kind, plan.block_compute)
    assert np.isnan(result.block_rse[skipped]).all()
    noise = jax.random.normal(jax.random.key(4), result.final_latents.shape, jnp.float32)
    sampled = np.asarray(sample(model, noise, *text, plan=plan, **common))
    np.testing.assert_allclose(np.asarray(result.final_latents), sampled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setup", ["flux_dev"], indirect=True)
@pytest.mark.parametrize("options, match", [(dict(step_delta=0.1, step_prompts=0), "1..2"),
                                            (dict(step_delta=0.1, step_prompts=3), "1..2"),
                                            (dict(step_delta=0.1, step_prompts=True), "1..2"),
                                            (dict(step_prompts=1), "step_delta > 0")])
def test_step_prompts_refused_by_value(setup, options, match):
    model, text, common = setup
    with pytest.raises(ValueError, match=match):
        calibrate(model, *text, delta=0.3, progress=False, **options, **common)


def test_cli_step_method_names_are_the_plans():
    from ditfa_jax.cli import STEP_METHOD_CHOICES
    from ditfa_jax.methods import STEP_KINDS

    assert STEP_METHOD_CHOICES == STEP_KINDS[1:]


def _fake_search(num_steps, calls):
    """run(scale) for calibrate_for_speedup: a plan skipping floor(4 * scale) steps (at most all but step 0)."""
    from ditfa_jax.calibrate import CalibrationResult
    from ditfa_jax.plan import CompressionPlan
    from ditfa_jax.testbed.v2.model import TRANSFORMER_CONFIG

    def run(scale):
        calls.append(scale)
        skipped = min(num_steps - 1, int(4 * scale))
        kinds = ["compute"] * (num_steps - skipped) + ["reuse"] * skipped
        plan = CompressionPlan.full(TRANSFORMER_CONFIG, height=64, width=64, text_len=56, num_steps=num_steps)
        return CalibrationResult(plan=plan.replace(step_kind=kinds), rse=None, saving=None, final_latents=None)

    return run


def test_target_speedup_finds_the_smallest_budget():
    from ditfa_jax.calibrate import calibrate_for_speedup
    from ditfa_jax.cost_model import get_cost_model, plan_cost

    model, calls = get_cost_model("h200-flux-dev-1024"), []
    result = calibrate_for_speedup(_fake_search(10, calls), 2.0, model, num_steps=10, iterations=8)
    assert 1 / plan_cost(result.plan, model) >= 2.0 and int((result.plan.step_kind != 0).sum()) == 5
    notes = result.plan.notes
    assert notes["target_speedup"] == 2.0 and 1.25 <= notes["budget_scale"] < 1.25 * 1.1  # 5 skipped from 1.25 on
    assert len(notes["speedup_passes"]) == len(calls) == 10
    with pytest.raises(ValueError, match=r"target speed-up 20: expected a number in \(1, 10\]"):
        calibrate_for_speedup(_fake_search(10, []), 20, model, num_steps=10)
    with pytest.raises(ValueError, match=r"8x is out of reach: the loosest budget tried \(scale 1\) gives 1.667x"):
        calibrate_for_speedup(_fake_search(10, []), 8, model, num_steps=10, scales=(0.1, 1.0))


def test_least_error_plan_is_the_best_within_the_cost():
    from ditfa_jax.calibrate import least_error_plan
    from ditfa_jax.cost_model import get_cost_model

    model, plans = get_cost_model("h200-flux-dev-1024"), {}
    for skipped in (2, 5, 8):
        plans[f"skip {skipped}"] = _fake_search(10, [])(skipped / 4).plan  # costs 0.8, 0.5, 0.2 of dense
    errors = {"skip 2": 0.3, "skip 5": 0.1, "skip 8": 0.2}  # measured end to end: not monotone in the cost
    assert least_error_plan(plans, errors, model, max_cost=1.0) == "skip 5"
    assert least_error_plan(plans, errors, model, max_cost=0.4) == "skip 8"
    kinds = ["compute"] * 20
    for step in (2, 3, 5, 11, 14):
        kinds[step] = "reuse"
    rounded = _fake_search(20, [])(0).plan.replace(step_kind=kinds)  # 15 of 20 steps: plan_cost 0.7500000000000001
    assert least_error_plan({"15 of 20": rounded}, {"15 of 20": 0.1}, model, max_cost=0.75) == "15 of 20"
    with_fewer = {**plans, "dense 4 of 10 steps": 0.4}  # a candidate that is not a plan comes with its cost
    fewer_errors = {**errors, "dense 4 of 10 steps": 0.15}
    assert least_error_plan(with_fewer, fewer_errors, model, max_cost=0.5) == "skip 5"
    assert least_error_plan(with_fewer, fewer_errors, model, max_cost=0.45) == "dense 4 of 10 steps"
    assert least_error_plan(plans, {**errors, "skip 8": 0.1}, model, max_cost=1.0) == "skip 8"  # a tie: cheaper
    with pytest.raises(ValueError, match=r"cost 0.1 is out of reach: the cheapest candidate, 'skip 8', costs 0.200"):
        least_error_plan(plans, errors, model, max_cost=0.1)
    with pytest.raises(ValueError, match=r"no measured error for \['skip 8'\]"):
        least_error_plan(plans, {"skip 2": 0.3, "skip 5": 0.1}, model, max_cost=1.0)


def test_target_speedup_on_a_real_search_and_from_the_cli(tmp_path, capsys):
    from ditfa_jax.calibrate import calibrate_for_speedup
    from ditfa_jax.cli import main as cli_main
    from ditfa_jax.cost_model import get_cost_model

    model, text, common = tiny_run("flux_dev", 3)
    cost = get_cost_model("h200-flux-dev-1024")
    result = calibrate_for_speedup(
        lambda scale: calibrate(model, *text, delta=0.3 * scale, step_delta=0.05 * scale, progress=False, **common),
        1.4, cost, num_steps=3, iterations=1)
    assert result.plan.notes["target_speedup"] == 1.4 and len(result.plan.notes["speedup_passes"]) == 3
    assert result.plan.uses_step_methods  # 1.4x at 3 steps needs a skipped step
    args = ["calibrate", str(FLUX_TINY), "--out", str(tmp_path / "plan.json"), "--height", "64", "--width", "64",
            "--steps", "3", "--prompts", "1", "--target-speedup", "2.5"]
    assert cli_main(args) == 2  # heads alone (no --step-delta) cannot reach it: one pass, then a clear error
    assert "target speed-up 2.5x is out of reach" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()
    with pytest.raises(SystemExit):  # refused while parsing: a speed-up must exceed 1
        cli_main(args[:-1] + ["1"])
    assert "expected a finite number > 1.0" in capsys.readouterr().err


def test_least_error_over_methods_from_the_cli(tmp_path, capsys):
    """`--target-speedup --methods`: each method searches its plan at the speed and the least end-to-end error wins
    (`least_error_plan`, tested above); a method that cannot reach the speed (heads alone, at 1.4x) is left out and
    recorded. fewer-steps (dense with the most steps that reach the speed) is scored alike; when it wins, the plan
    written is a dense plan for that many steps (what `generate --plan` then runs). `--base-steps 2`: reuse on 2
    steps, which 2 dense steps already make 1.5x, is left out as fewer-steps; misuse of it is refused early."""
    from ditfa_jax.calibrate import FEWER_STEPS, METHOD_FAMILIES
    from ditfa_jax.cli import METHOD_CHOICES, METHOD_FAMILY_NAMES
    from ditfa_jax.cli import main as cli_main
    from ditfa_jax.plan import CompressionPlan

    assert METHOD_FAMILY_NAMES == tuple(METHOD_FAMILIES)
    assert METHOD_CHOICES == METHOD_FAMILY_NAMES + (FEWER_STEPS,)
    out = tmp_path / "plan.json"
    args = ["calibrate", str(FLUX_TINY), "--out", str(out), "--height", "64", "--width", "64", "--steps", "3",
            "--prompts", "1", "--target-speedup", "1.4", "--step-delta", "0.05", "--methods", "heads,reuse,fewer-steps"]
    assert cli_main(args + ["--base-steps", "2"]) == 0
    notes = CompressionPlan.load(out).notes
    errors = notes["method_errors"]
    assert notes["methods_out_of_reach"] == ["heads", "heads on 2 steps", "reuse on 2 steps"]
    assert set(errors) == {"reuse", "fewer-steps"}
    assert all(e > 0 for e in errors.values()) and notes["method"] == min(errors, key=errors.get)
    assert f"chosen: {notes['method']}" in capsys.readouterr().out
    assert cli_main(args[:-1] + ["fewer-steps", "--overwrite"]) == 0
    plan = CompressionPlan.load(out)
    assert plan.num_steps == 2 and plan.notes["method"] == "fewer-steps"  # floor(3 / 1.4)
    assert (plan.head_window == -1).all() and (plan.step_kind == 0).all() and plan.block_compute.all()
    assert "dense with 2 of 3 steps" in capsys.readouterr().out
    bad = [(["--methods", "taylor"], "give --target-speedup too"),
           (["--methods", "taylor", "--target-speedup", "2"], "which is 0; give it a starting budget"),
           (["--base-steps", "2"], "give --methods"),
           (["--methods", "taylor+mlp", "--target-speedup", "2", "--step-delta", "0.1"],
            "--methods taylor+mlp search --mlp-delta, which is 0"),
           (["--methods", "taylor", "--target-speedup", "2", "--step-delta", "0.1", "--base-steps", "3"],
            "--base-steps 3: expected fewer than --steps 3")]
    for extra, message in bad:
        assert cli_main(args[:2] + args[4:12] + ["--out", str(tmp_path / "no.json")] + extra) == 2
        assert message in capsys.readouterr().err
    for extra in (["taylor,fast"], ["taylor", "--base-steps", "0"]):
        with pytest.raises(SystemExit):
            cli_main(args[:-1] + extra)


def test_cli_mlp_delta_writes_a_plan_with_cached_mlp_branches(tmp_path, capsys):
    """`ditfa calibrate --mlp-delta`: the plan file holds methods.mlp, the summary and heatmap say so."""
    from ditfa_jax.cli import main as cli_main
    from ditfa_jax.plan import CompressionPlan

    out = tmp_path / "plan.json"
    args = ["calibrate", str(FLUX_TINY), "--out", str(out), "--height", "64", "--width", "64", "--steps", "3",
            "--prompts", "1", "--delta", "0", "--mlp-delta", "1e9"]
    assert cli_main(args) == 0
    plan = CompressionPlan.load(out)
    assert plan.uses_mlp_caching and not plan.mlp_compute[1:].any() and plan.notes["mlp_delta"] == 1e9
    assert "MLP branches:" in capsys.readouterr().out and out.with_suffix(".png").is_file()
    with pytest.raises(SystemExit):
        cli_main(args[:-1] + ["-1"])
    assert "--mlp-delta" in capsys.readouterr().err


def test_cli_step_prompts_scores_steps_on_the_first_prompts(tmp_path, capsys):
    """`ditfa calibrate --step-prompts K`: the plan records K; without --step-delta, or K above the prompts, a
    one-line error and nothing written."""
    from ditfa_jax.calibrate import CalibrationResult, unified_plan
    from ditfa_jax.cli import main as cli_main
    from ditfa_jax.cost_model import get_cost_model
    from ditfa_jax.plan import CompressionPlan

    out = tmp_path / "plan.json"
    args = ["calibrate", str(FLUX_TINY), "--out", str(out), "--height", "64", "--width", "64", "--steps", "4",
            "--prompts", "2", "--delta", "0.1", "--step-delta", "1e9", "--step-prompts", "1"]
    assert cli_main(args) == 0
    plan = CompressionPlan.load(out)
    assert plan.notes["step_prompts"] == 1 and (plan.step_kind[1:] != 0).all()
    result = CalibrationResult(plan=plan, rse=None, saving=None, final_latents=None, step_rse=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="step_prompts"):
        unified_plan(result, get_cost_model("h200-flux-dev-1024"))
    capsys.readouterr()
    for extra, expected in ((["--step-prompts", "3"], "at most the 2 calibration prompts"),
                            (["--step-delta", "0"], "give --step-delta")):
        fresh = tmp_path / "other.json"
        assert cli_main([*args[:3], str(fresh), *args[4:], *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not fresh.exists() and not fresh.with_suffix(".png").exists()


def test_fewer_steps_counts_steps_without_rounding_down_and_refuses_less_than_one():
    from ditfa_jax.calibrate import CalibrationResult, least_error_for_speedup
    from ditfa_jax.cost_model import get_cost_model
    from ditfa_jax.plan import CompressionPlan
    from ditfa_jax.testbed.v2.model import TRANSFORMER_CONFIG

    asked = []

    def search(scale, method=None, num_steps=None):
        asked.append(num_steps)
        plan = CompressionPlan.full(TRANSFORMER_CONFIG, height=64, width=64, text_len=56, num_steps=num_steps)
        return CalibrationResult(plan=plan, rse=None, saving=None, final_latents=np.ones(3))

    result = least_error_for_speedup(search, 1.12, get_cost_model("h200-flux-dev-1024"), num_steps=28,
                                     methods=("fewer-steps",), dense_latents=np.full(3, 1.5))
    assert asked == [25]  # 28 / 1.12 in floating point is 24.999999999999996
    assert result.plan.notes["method_errors"] == {"fewer-steps": 0.11111111}
    with pytest.raises(ValueError, match="fewer-steps: 30x would leave less than one of 20 steps"):
        least_error_for_speedup(search, 30, get_cost_model("h200-flux-dev-1024"), num_steps=20,
                                methods=("fewer-steps",), dense_latents=np.ones(3))


def test_methods_on_fewer_base_steps_are_priced_against_all_steps():
    """`base_steps`: each method also searches on fewer steps, at the speed-up that is left once the steps are
    fewer, priced and scored against dense with all steps; a base that reaches the speed by itself is fewer-steps
    (left out, said why); a base that is not fewer than the run's steps is refused before any pass."""
    from ditfa_jax.calibrate import CalibrationResult, least_error_for_speedup
    from ditfa_jax.cost_model import get_cost_model
    from ditfa_jax.plan import CompressionPlan
    from ditfa_jax.testbed.v2.model import TRANSFORMER_CONFIG

    asked = []

    def search(scale, method=None, num_steps=None):
        """Reuse every step after the first three whose index is odd; the error is smaller on fewer steps."""
        asked.append((method, num_steps))
        plan = CompressionPlan.full(TRANSFORMER_CONFIG, height=64, width=64, text_len=56, num_steps=num_steps)
        kinds = np.where((np.arange(num_steps) > 2) & (np.arange(num_steps) % 2 == 1) & (scale > 1), 1, 0)
        return CalibrationResult(plan=plan.replace(step_kind=kinds.astype(np.int8)), rse=None, saving=None,
                                 final_latents=np.full(3, 1.0 + num_steps / 100))

    cost = get_cost_model("h200-flux-dev-1024")
    result = least_error_for_speedup(search, 2.0, cost, num_steps=20, methods=("reuse",), base_steps=(14, 10, 8),
                                     dense_latents=np.ones(3))
    notes = result.plan.notes
    assert {n for m, n in asked} == {20, 14}  # 10 and 8 dense steps reach 2x alone: no pass
    assert set(notes["method_errors"]) == {"reuse on 14 steps"}  # 20 steps: 9 of 19 skippable, under 2x
    assert notes["methods_out_of_reach"] == ["reuse", "reuse on 10 steps", "reuse on 8 steps"]
    assert notes["method"] == "reuse on 14 steps" and result.plan.num_steps == 14
    assert notes["against_dense_steps"] == 20
    with pytest.raises(ValueError, match=r"base steps \[20\]: expected step counts in 1..19"):
        least_error_for_speedup(search, 2.0, cost, num_steps=20, methods=("reuse",), base_steps=(20,),
                                dense_latents=np.ones(3))



def test_median_relative_error_is_not_dominated_by_one_prompt():
    """The least-error choice scores a plan by the median over prompts: one prompt whose image moved a lot (a valid
    other layout) does not outweigh a plan that is worse on every other prompt."""
    from ditfa_jax.calibrate import median_relative_error

    rng = np.random.default_rng(0)
    dense = rng.normal(size=(5, 4, 8))
    uniform = dense * 1.1                                  # 1 % error on every prompt
    outlier = dense.copy()
    outlier[0] = -dense[0]                                 # exact but for one prompt, reversed (error 4)
    assert median_relative_error(uniform, dense) == pytest.approx(0.01)
    assert median_relative_error(outlier, dense) == 0.0
    pooled = lambda x: np.sum((x - dense) ** 2) / np.sum(dense ** 2)  # noqa: E731
    assert pooled(outlier) > pooled(uniform)              # what a pooled error would have chosen instead
