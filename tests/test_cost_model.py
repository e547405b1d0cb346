"""The measured step-cost models that put every method on one cost axis (`ditfa_jax.cost_model`)."""

import dataclasses

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


def test_heads_are_priced_at_the_models_layout():
    """A plan's head methods cost what they would keep at the measured size: at its own layout that is the plan's
    own FLOP count; a small model's arrow_8 head, which keeps most of its FLOPs, costs a FLUX-2K arrow_8 head."""
    import pallas_kernels
    from ditfa_jax.configs import FluxConfig
    from ditfa_jax.cost_model import attention_kept
    from ditfa_jax.methods import method_window

    model = get_cost_model("h200-flux-dev-2048")
    flux = CompressionPlan.full(FluxConfig(), height=2048, width=2048, text_len=512, num_steps=3)
    rng = np.random.default_rng(0)
    arrow = method_window("arrow_8", flux.image_tokens)
    windows = rng.choice([-1, 0, arrow, arrow // 3], size=flux.head_window.shape).astype(np.int32)
    windows[0] = -1  # step 0 computes every head
    flux = flux.replace(head_window=windows)  # arrow // 3: a window no method names
    np.testing.assert_allclose(attention_kept(flux, model), flux.flops_kept_per_step_layer(), atol=1e-12)
    small = CompressionPlan.full(TRANSFORMER_CONFIG, height=64, width=64, text_len=32, num_steps=2,
                                 vae_scale_factor=1, candidates=("cached", "arrow_8"))
    windows = np.asarray(small.head_window).copy()
    windows[1] = method_window("arrow_8", small.image_tokens)
    small = small.replace(head_window=windows)
    at_2k = pallas_kernels.plan_cost(np.array([arrow]), batch=1, tokens=flux.image_tokens + 512, text_len=512,
                                     text_first=True, head_dim=128, band=flux.band)
    kept = attention_kept(small, model)
    np.testing.assert_allclose(kept[1], float(at_2k.flops[0]) / at_2k.dense_flops)
    assert kept[1].max() < 0.2 < small.flops_kept_per_step_layer()[1].min()  # 18 % at 2K, most of it here
    assert plan_cost(small, model) < plan_cost(small, dataclasses.replace(model, layout=None))


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


def test_fp8_heads_are_priced_by_their_measured_time():
    """FP8 heads cost their measured time share plus the layer's overhead once, at the layout that prices them;
    interpolated in log(tokens) between measured sizes, held at the nearest outside them."""
    from ditfa_jax.configs import FluxConfig
    from ditfa_jax.cost_model import FP8_HEAD_TIMES, attention_kept, fp8_head_time

    one_k, two_k, four_k = (FP8_HEAD_TIMES[128][n] for n in (4608, 16896, 512 + 65536))
    assert fp8_head_time(16896, 128) == two_k and fp8_head_time(512 + 65536, 128) == four_k
    assert fp8_head_time(10 ** 6, 128) == four_k and fp8_head_time(100, 128) == one_k  # held outside
    mid = fp8_head_time(int(np.sqrt(4608 * 16896)), 128)  # halfway in log(tokens)
    assert mid.head_ratio == pytest.approx((one_k.head_ratio + two_k.head_ratio) / 2, rel=1e-3)
    with pytest.raises(ValueError, match="no measured time at head_dim 32"):
        fp8_head_time(1000, 32)
    model = get_cost_model("h200-flux-dev-2048")
    plan = CompressionPlan.full(FluxConfig(), height=2048, width=2048, text_len=512, num_steps=3)
    windows = np.asarray(plan.head_window).copy()
    windows[1] = -2  # every head FP8
    windows[2, :, :6] = -2  # a quarter of them
    plan = plan.replace(head_window=windows)
    assert plan.flops_kept_fraction() == 1.0  # FP8 computes every FLOP ...
    kept = attention_kept(plan, model)  # ... in less time
    np.testing.assert_allclose(kept[1], two_k.head_ratio + two_k.layer_overhead)
    np.testing.assert_allclose(kept[2], 0.75 + 0.25 * two_k.head_ratio + two_k.layer_overhead)
    assert plan_cost(plan, model) < 1.0
    small = CompressionPlan.full(TRANSFORMER_CONFIG, height=64, width=64, text_len=32, num_steps=2,
                                 vae_scale_factor=1)
    small = small.replace(head_window=np.where(np.arange(2)[:, None, None] == 1, -2, -1).astype(np.int32)
                          * np.ones_like(small.head_window))
    np.testing.assert_allclose(attention_kept(small, model)[1], two_k.head_ratio + two_k.layer_overhead)
    at_1k = get_cost_model("h200-flux-dev-1024")  # FP8 costs more than it saves there: priced above dense
    assert attention_kept(small, at_1k)[1].min() > 1.0 and plan_cost(small, at_1k) > 1.0


def test_cached_mlp_branches_save_the_mlp_share_of_the_rest():
    """A block that runs with its MLP branch cached saves ``mlp_share`` of its time outside attention; a model
    without an MLP share refuses such a plan by name."""
    model = get_cost_model("h200-flux-dev-1024")
    assert 0 < model.mlp_share < 1 and "estimated" in model.mlp_source
    full = CompressionPlan.full(TRANSFORMER_CONFIG, height=64, width=64, text_len=32, num_steps=10,
                                vae_scale_factor=1)
    layers = full.num_layers
    mlp = np.ones((10, layers), bool)
    mlp[1:, : layers // 2 + 1] = False  # more than half of the blocks, every step after the first
    share = (layers // 2 + 1) / layers
    expected = (model.dense_ms + 9 * (model.dense_ms - model.mlp_share * share * model.step_ms[0])) / (
        10 * model.dense_ms)
    assert plan_cost(full.replace(mlp_compute=mlp), model) == pytest.approx(expected)
    more = mlp.copy()
    more[1:] = False
    assert plan_cost(full.replace(mlp_compute=more), model) < plan_cost(full.replace(mlp_compute=mlp), model) < 1.0
    skipped = full.replace(step_kind=[0, 1] * 5, mlp_compute=np.where(np.arange(10)[:, None] % 2 == 1, True, mlp))
    assert plan_cost(skipped, model) < plan_cost(full.replace(step_kind=[0, 1] * 5), model)
    unknown = dataclasses.replace(model, mlp_share=None)
    with pytest.raises(ValueError, match="has no MLP share"):
        plan_cost(full.replace(mlp_compute=mlp), unknown)
    assert plan_cost(full, unknown) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mlp_share must lie in"):
        dataclasses.replace(model, mlp_share=1.0)
