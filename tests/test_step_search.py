"""The plan search over step methods (reuse / Taylor), in the same pass as the head search (issue 17; tiny
checkpoints, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_runs import tiny_run

from ditfa_jax import sample
from ditfa_jax.calibrate import calibrate

STEPS = 6


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


def test_cli_step_method_names_are_the_plans():
    from ditfa_jax.cli import STEP_METHOD_CHOICES
    from ditfa_jax.methods import STEP_KINDS

    assert STEP_METHOD_CHOICES == STEP_KINDS[1:]
