"""The measured step-cost models that put every method on one cost axis (`ditfa_jax.cost_model`)."""

import numpy as np
import pytest

from ditfa_jax.cost_model import COST_MODELS, StepCostModel, get_cost_model, plan_cost, steps_cost
from ditfa_jax.plan import CompressionPlan
from ditfa_jax.testbed.model import TRANSFORMER_CONFIG


@pytest.mark.parametrize("name", sorted(COST_MODELS))
def test_models_are_monotone_and_end_at_dense(name):
    model = COST_MODELS[name]
    times = model.step_time(np.linspace(0, 1, 21))
    assert np.all(np.diff(times) > 0) and times[-1] == model.dense_ms
    assert 0.1 < model.attention_share < 0.5  # attention: 17 % of a 1K step, 45 % of a 2K step
    assert "H200" in model.source and "bench_plan.py" in model.source


def test_plan_cost_between_bounds():
    model = get_cost_model("h200-flux-dev-2048")
    full = CompressionPlan.full(TRANSFORMER_CONFIG, height=64, width=64, text_len=32, num_steps=10,
                                vae_scale_factor=1)
    assert plan_cost(full, model) == pytest.approx(1.0)
    windows = np.asarray(full.head_window).copy()
    windows[1:] = 0  # every head cached after step 0: only the step without attention is paid
    cached = full.replace(head_window=windows)
    expected = (model.dense_ms + 9 * model.step_ms[0]) / (10 * model.dense_ms)
    assert plan_cost(cached, model) == pytest.approx(expected)
    assert steps_cost(5, 10) == 0.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="cost model 'nope'"):
        get_cost_model("nope")
    with pytest.raises(ValueError, match="kept must rise"):
        StepCostModel("x", "x", (0.0, 0.5), (1.0, 2.0), "src")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        get_cost_model("h200-flux-dev-1024").step_time(1.5)
    with pytest.raises(ValueError, match="steps 0"):
        steps_cost(0, 10)


def test_gated_cost():
    from ditfa_jax.cost_model import gated_cost

    assert gated_cost([False] * 4, 1, 5) == pytest.approx((1 + 3 * 1.2) / 4)  # no step gated: the first block runs twice
    assert gated_cost([False, True, True, False], 2, 4) == pytest.approx((1 + 0.5 + 0.5 + 1.5) / 4)
    with pytest.raises(ValueError, match="step 0 computed"):
        gated_cost([True, False], 1, 4)
