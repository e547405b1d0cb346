"""Plan search and the caching sampler on tiny checkpoints (CPU; the kernel runs in interpret mode)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels

from ditfa_jax import load_transformer, sample
from ditfa_jax.attention import AttentionSettings
from ditfa_jax.calibrate import calibrate, head_rse, step_budgets
from ditfa_jax.cli import main as cli_main
from ditfa_jax.methods import candidate_windows, method_window
from ditfa_jax.milp import solve_global
from ditfa_jax.models.flux import rope_tables
from ditfa_jax.plan import CompressionPlan
from ditfa_jax.sampler import scheduler_for

FIXTURES = Path(__file__).parent / "fixtures"
STEPS = 4


def test_head_rse_matches_definition():
    rng = np.random.default_rng(0)
    y_full = rng.normal(size=(2, 7, 3, 5)).astype(np.float32)
    cands = (y_full[None] + rng.normal(scale=[[[[[0.1]]]], [[[[0.5]]]]], size=(2, 2, 7, 3, 5))).astype(np.float32)
    got = np.asarray(head_rse(jnp.asarray(cands), jnp.asarray(y_full)))
    for h in range(3):
        for m in range(2):
            want = np.mean((cands[m, :, :, h] - y_full[:, :, h]) ** 2) / np.var(y_full[:, :, h])
            assert got[h, m] == pytest.approx(want, rel=1e-5)


def test_worst_prompt_rse_matches_definition():
    rng = np.random.default_rng(1)
    y_full = rng.normal(size=(3, 7, 2, 5)).astype(np.float32) * np.array([1.0, 3.0, 0.5])[:, None, None, None]
    cands = (y_full[None] + rng.normal(scale=0.2, size=(2, 3, 7, 2, 5))).astype(np.float32)
    got = np.asarray(head_rse(jnp.asarray(cands), jnp.asarray(y_full), "max"))
    pooled = np.asarray(head_rse(jnp.asarray(cands), jnp.asarray(y_full), "mean"))
    for h in range(2):
        for m in range(2):
            per_row = [np.mean((cands[m, b, :, h] - y_full[b, :, h]) ** 2) / np.var(y_full[b, :, h]) for b in range(3)]
            assert got[h, m] == pytest.approx(max(per_row), rel=1e-5)
    assert (got >= pooled).all()  # the worst row's RSE bounds the pooled one from above
    with pytest.raises(ValueError, match="over_prompts"):
        head_rse(jnp.asarray(cands), jnp.asarray(y_full), "median")


def test_step_budgets():
    np.testing.assert_array_equal(step_budgets(0.3, 5), [0.0, 0.3, 0.3, 0.3, 0.3])
    ramp = step_budgets(0.3, 5, "ramp")
    assert ramp[0] == 0.0 and np.all(np.diff(ramp[1:]) > 0)
    assert ramp[1:].mean() == pytest.approx(0.3)  # the same total budget as "constant"
    with pytest.raises(ValueError, match="budget schedule"):
        step_budgets(0.3, 5, "cosine")


@pytest.fixture(scope="module")
def sd3_setup():
    name = "sd35_medium"
    model = load_transformer(FIXTURES / name, progress=False)
    ref = dict(np.load(FIXTURES / name / "reference.npz"))
    common = dict(height=int(ref["sample_height"]), width=int(ref["sample_width"]), num_steps=STEPS,
                  guidance_scale=7.0, scheduler=scheduler_for(FIXTURES / name, model),
                  negative_prompt_embeds=ref["sample_negative_prompt_embeds"],
                  negative_pooled_prompt_embeds=ref["sample_negative_pooled"])
    return model, ref, common


@pytest.fixture(scope="module")
def searched(sd3_setup):
    """Plans and RSE tables for a grid of delta values (one calibration each)."""
    model, ref, common = sd3_setup
    out = {}
    for delta in (0.0, 0.1, 0.5, 2.0):
        result = calibrate(model, ref["sample_prompt_embeds"], ref["sample_pooled"], delta=delta, progress=False,
                           **common)
        out[delta] = (result.plan, result)
    return out


def test_delta_zero_is_all_full_and_samples_like_dense(sd3_setup, searched):
    """delta 0 keeps every head full; the sampler then gives the dense latents, through the dense program (bit for
    bit) and through the head-wise kernel itself (shortcuts off: every layer runs the plan path)."""
    model, ref, common = sd3_setup
    plan = searched[0.0][0]
    assert (plan.head_window == -1).all() and plan.flops_kept_fraction() == 1.0
    args = (model, ref["sample_latents_init"], ref["sample_prompt_embeds"], ref["sample_pooled"])
    dense = np.asarray(sample(*args, **common))
    np.testing.assert_array_equal(np.asarray(sample(*args, plan=plan, **common)), dense)
    through_kernel = np.asarray(sample(*args, plan=plan, attention=AttentionSettings(shortcuts=False), **common))
    assert not np.array_equal(through_kernel, dense)  # a different program ran ...
    np.testing.assert_allclose(through_kernel, dense, rtol=1e-5, atol=1e-5)  # ... computing the same function


def test_the_padded_joint_sequence_changes_no_result(sd3_setup, searched, monkeypatch):
    """SD3 carries its joint attention padded to a multiple of 8 tokens (43 -> 48 here): the search, with the
    padding rows left out of the RSE, and the sampler give what they give on the unpadded sequence."""
    from ditfa_jax.models import sd3

    model, ref, common = sd3_setup
    args = (model, ref["sample_latents_init"], ref["sample_prompt_embeds"], ref["sample_pooled"])
    plan, result = searched[2.0]
    assert 0 < plan.flops_kept_fraction() < 1
    padded = np.asarray(sample(*args, plan=plan, attention=AttentionSettings(shortcuts=False), **common))
    monkeypatch.setattr(sd3, "JOINT_TOKEN_MULTIPLE", 1)
    unpadded = calibrate(model, ref["sample_prompt_embeds"], ref["sample_pooled"], delta=2.0, progress=False,
                         **common)
    np.testing.assert_array_equal(unpadded.plan.head_window, plan.head_window)
    np.testing.assert_allclose(unpadded.rse, result.rse, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(sample(*args, plan=plan, attention=AttentionSettings(shortcuts=False), **common)), padded,
        rtol=1e-5, atol=1e-5)


def test_flops_kept_falls_as_delta_grows(searched):
    kept = [searched[d][0].flops_kept_fraction() for d in sorted(searched)]
    assert kept[0] == 1.0 and kept[-1] < 0.8, kept
    assert all(a >= b for a, b in zip(kept, kept[1:])), kept


def test_filter_and_budget_hold_on_every_step_and_layer(searched):
    for delta, (plan, result) in searched.items():
        rse, heads = result.rse, plan.num_heads
        windows = {int(w): m for m, w in enumerate(candidate_windows(plan.candidates, plan.image_tokens))}
        assert (plan.head_window[0] == -1).all()
        for s in range(1, plan.num_steps):
            for layer in range(plan.num_layers):
                hw = plan.head_window[s, layer]
                chosen = [(h, windows[int(w)]) for h, w in enumerate(hw) if w != -1]
                used = sum(rse[s, layer, h, m] for h, m in chosen)
                assert used <= delta + 1e-9
                for h, m in chosen:
                    assert rse[s, layer, h, m] < plan.c * delta / heads


def test_worst_prompt_ramp_search_holds_its_per_step_budgets(sd3_setup, searched):
    model, ref, common = sd3_setup
    delta = 2.0
    result = calibrate(model, ref["sample_prompt_embeds"], ref["sample_pooled"], delta=delta, progress=False,
                       rse_over_prompts="max", budget_schedule="ramp", **common)
    plan, record = result.plan, {"rse": result.rse}
    assert plan.notes["rse_over_prompts"] == "max" and plan.notes["budget_schedule"] == "ramp"
    # step 1 sees the same (uncompressed) inputs in both searches: worst-prompt RSE >= pooled RSE
    assert (record["rse"][1] >= searched[delta][1].rse[1] - 1e-6).all()
    budgets = step_budgets(delta, STEPS, "ramp")
    windows = {int(w): m for m, w in enumerate(candidate_windows(plan.candidates, plan.image_tokens))}
    assert (plan.head_window[0] == -1).all() and plan.flops_kept_fraction() < 1.0
    for s in range(1, STEPS):
        for layer in range(plan.num_layers):
            chosen = [(h, windows[int(w)]) for h, w in enumerate(plan.head_window[s, layer]) if w != -1]
            assert sum(record["rse"][s, layer, h, m] for h, m in chosen) <= budgets[s] + 1e-9
            assert all(record["rse"][s, layer, h, m] < plan.c * budgets[s] / plan.num_heads for h, m in chosen)


def test_plan_settings_and_round_trip(searched, sd3_setup, tmp_path):
    model, ref, common = sd3_setup
    plan = searched[0.5][0]
    assert plan.delta == 0.5 and plan.c == 1.5 and plan.num_steps == STEPS
    assert plan.num_layers == model.config.total_layers and plan.notes["prompts"] == 2
    reloaded = CompressionPlan.load(plan.save(tmp_path / "plan.json"))
    assert reloaded == plan
    with pytest.raises(ValueError, match="num_steps"):
        sample(model, ref["sample_latents_init"], ref["sample_prompt_embeds"], ref["sample_pooled"],
               plan=plan, **{**common, "num_steps": STEPS + 1})


def test_global_variant_on_recorded_table(searched):
    """One budget over all steps and layers, solved on the progressive pass's RSE table."""
    plan, result = searched[0.5]
    rse = result.rse[1:]
    saving = np.broadcast_to(result.saving, rse.shape)
    total = 0.5 * rse.shape[0] * rse.shape[1]  # the same total budget as per-layer delta 0.5
    choice = solve_global(rse, saving, total, c=1.5)
    picked = np.take_along_axis(rse, np.maximum(choice, 0)[..., None], -1)[..., 0]
    assert picked[choice >= 0].sum() <= total + 1e-9
    assert (picked[choice >= 0] < 1.5 * total / choice.size).all()


def test_cached_chain_reuses_the_last_computed_value():
    """A head cached over several steps keeps returning what it computed last (FLUX model call, per step)."""
    model = load_transformer(FIXTURES / "flux_dev", progress=False)
    ref = dict(np.load(FIXTURES / "flux_dev" / "reference.npz"))
    module = model.module()
    cfg = model.config
    rope = rope_tables(np.concatenate([ref["txt_ids"], ref["img_ids"]]), cfg.axes_dims_rope)
    layers, heads = cfg.total_layers, cfg.num_attention_heads
    tokens = ref["hidden_states"].shape[1] + ref["encoder_hidden_states"].shape[1]
    cache = jnp.zeros((layers, 2, tokens, heads, cfg.attention_head_dim), model.dtype)
    x = jnp.asarray(ref["hidden_states"])
    history = []
    windows = [np.full((layers, heads), -1), np.full((layers, heads), -1), np.full((layers, heads), -1)]
    windows[1][:, 0] = 0
    windows[2][:, 0] = 0
    windows[2][1, :] = 0  # a whole layer cached: projections skipped, cache passed through
    for step, hw in enumerate(windows):
        t = jnp.full((2,), 0.9 - 0.2 * step)
        out, cache = module(x, ref["encoder_hidden_states"], ref["pooled_projections"], t, rope,
                            guidance=ref["guidance"], plan=(jnp.asarray(hw, jnp.int32), cache))
        history.append(np.asarray(cache))
        x = x + 0.1 * out
    np.testing.assert_array_equal(history[1][:, :, :, 0], history[0][:, :, :, 0])
    np.testing.assert_array_equal(history[2][:, :, :, 0], history[0][:, :, :, 0])
    np.testing.assert_array_equal(history[2][1], history[1][1])
    assert not np.allclose(history[1][:, :, :, 1], history[0][:, :, :, 1])  # computed heads move on


def test_cli_calibrate_writes_plan_and_heatmap(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["calibrate", str(FIXTURES / "flux_dev"), "--out", str(out), "--delta", "1.0", "--steps", "3",
            "--prompts", "2", "--text-len", "4", "--height", "32", "--width", "48"]
    assert cli_main(args) == 0
    assert "calibration took" in capsys.readouterr().out
    plan = CompressionPlan.load(out)
    assert plan.num_steps == 3 and plan.width == 48 and out.with_suffix(".png").stat().st_size > 1000
    assert plan.notes["rse_over_prompts"] == "mean" and plan.notes["budget_schedule"] == "constant"
    assert cli_main(args) == 2  # refuses to overwrite
    worst = tmp_path / "worst.json"
    options = ["--rse-over-prompts", "max", "--budget-schedule", "ramp", "--rse-query-stride", "2"]
    assert cli_main(args[:2] + ["--out", str(worst)] + args[4:] + options) == 0
    assert CompressionPlan.load(worst).notes["budget_schedule"] == "ramp"
    assert CompressionPlan.load(worst).notes["rse_query_stride"] == 2
    steps = tmp_path / "steps.json"
    assert cli_main(args[:2] + ["--out", str(steps)] + args[4:] + ["--step-delta", "1e9"]) == 0
    assert CompressionPlan.load(steps).step_kind.tolist() == [0, 1, 1]  # only reuse has the history it needs
    assert "skipped at steps 1-2" in capsys.readouterr().out
    blocks = tmp_path / "blocks.json"
    assert cli_main(args[:2] + ["--out", str(blocks)] + args[4:] + ["--step-delta", "1e9", "--step-kinds", "none",
                                                                      "--block-candidates", "1"]) == 0
    assert CompressionPlan.load(blocks).uses_block_caching and not CompressionPlan.load(blocks).uses_step_methods
    with pytest.raises(SystemExit) as refused:
        cli_main(args[:2] + ["--out", str(tmp_path / "x.json")] + args[4:] + ["--step-delta", "-1"])
    assert refused.value.code == 2 and "--step-delta" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        cli_main(args[:2] + ["--out", str(tmp_path / "x.json")] + args[4:] + ["--rse-query-stride", "0"])
    assert refused.value.code == 2 and "--rse-query-stride" in capsys.readouterr().err
    assert cli_main(["sample", str(FIXTURES / "flux_dev"), "--plan", str(out), "--steps", "3", "--height", "32",
                     "--width", "48", "--text-len", "4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    assert report["plan"] == str(out) and report["attention_flops_kept"] == round(plan.flops_kept_fraction(), 4)


def test_all_full_plan_is_the_dense_sampler_for_flux():
    """FLUX: an all-full plan gives the dense sampler's latents bit for bit (it runs the dense program), and the
    same latents through the head-wise kernel path (shortcuts off; the Pallas kernel in interpret mode)."""
    model = load_transformer(FIXTURES / "flux_dev", progress=False)
    ref = dict(np.load(FIXTURES / "flux_dev" / "reference.npz"))
    height, width = int(ref["sample_height"]), int(ref["sample_width"])
    common = dict(height=height, width=width, num_steps=STEPS, guidance_scale=3.5,
                  scheduler=scheduler_for(FIXTURES / "flux_dev", model))
    args = (model, ref["sample_latents_init"], ref["sample_prompt_embeds"], ref["sample_pooled"])
    plan = CompressionPlan.full(model.config, height=height, width=width,
                                text_len=ref["sample_prompt_embeds"].shape[1], num_steps=STEPS)
    dense, planned = np.asarray(sample(*args, **common)), np.asarray(sample(*args, plan=plan, **common))
    np.testing.assert_array_equal(planned, dense)
    kernel = AttentionSettings(backend="triton", shortcuts=False)
    through_kernel = np.asarray(sample(*args, plan=plan, attention=kernel, **common))
    assert not np.array_equal(through_kernel, dense)  # the kernel ran, not the dense program
    np.testing.assert_allclose(through_kernel, dense, rtol=1e-5, atol=1e-5)


def test_host_cache_gives_the_same_plan():
    """Keeping the per-layer cache in host memory (for many prompts at 2K) changes where it lives, not the result."""
    model = load_transformer(FIXTURES / "flux_dev", progress=False)
    ref = dict(np.load(FIXTURES / "flux_dev" / "reference.npz"))
    kwargs = dict(height=32, width=48, num_steps=3, guidance_scale=3.5, delta=1.0, progress=False)
    on_device = calibrate(model, ref["sample_prompt_embeds"], ref["sample_pooled"], cache_on_host=False,
                          **kwargs).plan
    on_host = calibrate(model, ref["sample_prompt_embeds"], ref["sample_pooled"], cache_on_host=True, **kwargs).plan
    assert on_device.flops_kept_fraction() < 1.0  # something was compressed, cached heads included
    np.testing.assert_array_equal(on_host.head_window, on_device.head_window)


@pytest.mark.parametrize("search", [dict(step_delta=1e-9), dict(step_delta=1e9, step_kinds=("taylor2",))],
                         ids=["every step kept", "steps 3.. skipped"])
def test_host_cache_with_a_step_search_gives_the_same_search(search):
    """With a step search a step's outputs are stored after the step, and stay on the device until the next step
    fetches them: a copy of layer 0 fetched ahead during the step must not be served at the next one, and a
    skipped step must leave the values the step before it read (every RSE, including the cached candidate's, the
    same as with the cache on the device)."""
    model = load_transformer(FIXTURES / "flux_dev", progress=False)
    ref = dict(np.load(FIXTURES / "flux_dev" / "reference.npz"))
    kwargs = dict(height=32, width=48, num_steps=6, guidance_scale=3.5, delta=1.0, progress=False, **search)
    runs = [calibrate(model, ref["sample_prompt_embeds"], ref["sample_pooled"], cache_on_host=on_host, **kwargs)
            for on_host in (False, True)]
    skipped = runs[0].plan.step_kind != 0
    assert skipped.any() == (search["step_delta"] > 1) and not skipped[:3].any()
    np.testing.assert_array_equal(runs[1].rse, runs[0].rse)
    np.testing.assert_array_equal(np.asarray(runs[1].final_latents), np.asarray(runs[0].final_latents))


def test_caching_sampler_holds_one_copy_of_the_cache():
    """The plan's extra memory is about one attention cache: the cache rides in the scan carry and each layer
    overwrites its own slot in place, and the zero cache is made inside the program. (Slicing it per stack, stacking
    the layers' outputs and concatenating measured 2.0 copies here; with the cache also passed in as an input, 3.6;
    2.6 on the H100 at 2K.) A deep, wide-headed model on few tokens makes the cache dominate. 1.30 copies with XLA
    CPU's concurrency-optimised scheduler off (tests/conftest.py), under 1.25 with it on."""
    from flax import nnx

    from ditfa_jax.configs import FluxConfig
    from ditfa_jax.loading import Transformer
    from ditfa_jax.models.flux import FluxTransformer
    from ditfa_jax.sampler import cache_bytes

    cfg = FluxConfig(num_layers=2, num_single_layers=30, attention_head_dim=128, num_attention_heads=2,
                     joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                     axes_dims_rope=(32, 48, 48))
    model = Transformer(cfg, *nnx.split(FluxTransformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    px, steps, text_len = 256, 3, 64
    rng = np.random.default_rng(0)
    windows = rng.choice([-1, 0, 4], size=(steps, cfg.total_layers, cfg.num_attention_heads)).astype(np.int32)
    windows[0] = -1
    plan = CompressionPlan.from_config(cfg, windows, height=px, width=px, text_len=text_len)
    inputs = (model, rng.standard_normal((1, (px // 16) ** 2, 64), np.float32),
              rng.standard_normal((1, text_len, 64), np.float32).astype(jnp.bfloat16),
              rng.standard_normal((1, 32), np.float32).astype(jnp.bfloat16))
    common = dict(height=px, width=px, num_steps=steps, guidance_scale=3.5, memory=True)
    dense, planned = sample(*inputs, **common), sample(*inputs, plan=plan, **common)
    extra = (planned.temp_size_in_bytes + planned.argument_size_in_bytes
             - dense.temp_size_in_bytes - dense.argument_size_in_bytes)
    cache = cache_bytes(cfg, 1, (px // 16) ** 2 + text_len)
    assert cache <= extra < 1.4 * cache, (extra / cache)


@pytest.mark.parametrize("name", ["flux_dev", "sd35_medium"])
def test_token_order_changes_only_what_arrow_heads_see(name):
    """Plans along a space-filling curve: with full and cached heads only, the sampler's result does not depend on
    the token order (the model is equivariant to it: positions travel with the tokens); with arrow heads it does,
    since the band then holds other tokens."""
    from ditfa_jax.denoise import prepare_run

    model = load_transformer(FIXTURES / name, progress=False)
    ref = dict(np.load(FIXTURES / name / "reference.npz"))
    flux = name.startswith("flux")
    cfg = model.config
    side = 16 * 8 * (2 if flux else cfg.patch_size)  # 16 x 16 image tokens: several key tiles
    common = dict(height=side, width=side, num_steps=STEPS, guidance_scale=3.5 if flux else 7.0,
                  scheduler=scheduler_for(FIXTURES / name, model))
    if not flux:
        common.update(negative_prompt_embeds=ref["sample_negative_prompt_embeds"],
                      negative_pooled_prompt_embeds=ref["sample_negative_pooled"])
    rng = np.random.default_rng(0)
    text = (ref["sample_prompt_embeds"], ref["sample_pooled"])
    shape = prepare_run(model.config, *text, **{k: v for k, v in common.items() if k != "num_steps"},
                        num_steps=STEPS).latent_shape
    args = (model, rng.standard_normal((2, *shape)).astype(np.float32), *text)
    shape = (STEPS, cfg.total_layers, cfg.num_attention_heads)
    full_or_cached = np.where(rng.random(shape) < 0.4, 0, -1).astype(np.int32)
    full_or_cached[0] = -1
    with_arrows = np.where(rng.random(shape) < 0.5, 2, full_or_cached).astype(np.int32)
    with_arrows[0] = -1
    text_len = ref["sample_prompt_embeds"].shape[1]

    def run(windows, order):
        plan = CompressionPlan.from_config(cfg, windows, height=common["height"], width=common["width"],
                                           text_len=text_len, token_order=order)
        return np.asarray(sample(*args, plan=plan, **common))

    raster = run(full_or_cached, "raster")
    for order in ("hilbert", "morton"):
        np.testing.assert_allclose(run(full_or_cached, order), raster, rtol=1e-5, atol=1e-5)
    assert np.abs(run(with_arrows, "hilbert") - run(with_arrows, "raster")).max() > 1e-3


def test_calibrate_with_token_order(tmp_path):
    """A search along the Hilbert curve records its order in the plan, and the sampler follows it."""
    model = load_transformer(FIXTURES / "flux_dev", progress=False)
    ref = dict(np.load(FIXTURES / "flux_dev" / "reference.npz"))
    side = 16 * 8 * 2  # 16 x 16 image tokens: arrow bands skip key tiles
    common = dict(height=side, width=side, num_steps=STEPS, guidance_scale=3.5,
                  scheduler=scheduler_for(FIXTURES / "flux_dev", model))
    plan = calibrate(model, ref["sample_prompt_embeds"], ref["sample_pooled"], delta=2.0, progress=False,
                     token_order="hilbert", candidates=("arrow_8", "arrow_16"), **common).plan
    assert plan.token_order == "hilbert" and "hilbert token order" in plan.summary()
    assert (plan.head_window > 0).any(), "the search picked no arrow head: the order would not matter"
    assert CompressionPlan.load(plan.save(tmp_path / "plan.json")) == plan
    latents = np.random.default_rng(1).standard_normal((2, 256, model.config.in_channels)).astype(np.float32)
    args = (model, latents, ref["sample_prompt_embeds"], ref["sample_pooled"])
    out = np.asarray(sample(*args, plan=plan, **common))
    assert np.isfinite(out).all()
    assert np.abs(out - np.asarray(sample(*args, plan=plan.replace(token_order="raster"), **common))).max() > 1e-3


@pytest.mark.parametrize("name", ["flux_dev", "sd35_medium"])
def test_calibration_pass_samples_as_sample_does(name):
    """The search's own pass is the sampler's loop: its final latents equal `sample(plan=the plan found)` from the
    same noise (both run `ditfa_jax.denoise`; the search layer by layer, the sampler in one scan)."""
    import jax

    from tiny_runs import tiny_run

    model, text, common = tiny_run(name, STEPS)
    result = calibrate(model, *text, delta=0.5, progress=False, seed=3, **common)
    plan = result.plan
    assert ((plan.head_window > 0).any() and (plan.head_window == 0).any() and (plan.head_window == -1).any()), \
        "the plan should mix full (step 0), cached and arrow heads"
    noise = jax.random.normal(jax.random.key(3), result.final_latents.shape, jnp.float32)
    sampled = np.asarray(sample(model, noise, *text, plan=plan, **common))
    np.testing.assert_allclose(np.asarray(result.final_latents), sampled, rtol=1e-4, atol=1e-4)
    dense = np.asarray(sample(model, noise, *text, **common))
    assert np.abs(sampled - dense).max() > 1e-2  # the plan changed the result: the comparison is not trivial


@pytest.mark.parametrize("name", ["flux_dev", "sd35_medium"])
def test_sampler_through_the_pallas_kernel_matches_the_reference_path(name):
    """End to end through the Pallas kernel (Triton lowering, interpret mode on the CPU) with a mixed plan: the
    same final latents as the dense masked reference backend (XLA), shortcuts off so every layer runs the kernel."""
    model = load_transformer(FIXTURES / name, progress=False)
    ref = dict(np.load(FIXTURES / name / "reference.npz"))
    flux = name.startswith("flux")
    cfg = model.config
    side = 8 * 8 * (2 if flux else cfg.patch_size)  # 8 x 8 image tokens: a short but ragged sequence
    common = dict(height=side, width=side, num_steps=3, guidance_scale=3.5 if flux else 7.0,
                  scheduler=scheduler_for(FIXTURES / name, model))
    if not flux:
        common.update(negative_prompt_embeds=ref["sample_negative_prompt_embeds"],
                      negative_pooled_prompt_embeds=ref["sample_negative_pooled"])
    rng = np.random.default_rng(5)
    text_len = ref["sample_prompt_embeds"].shape[1]
    windows = rng.choice([-1, 0, 3, 9], size=(3, cfg.total_layers, cfg.num_attention_heads)).astype(np.int32)
    windows[0] = -1
    plan = CompressionPlan.from_config(cfg, windows, height=side, width=side, text_len=text_len, band=(16, 16))
    from ditfa_jax.denoise import prepare_run

    shape = prepare_run(cfg, ref["sample_prompt_embeds"], ref["sample_pooled"],
                        **{k: v for k, v in common.items()}).latent_shape
    args = (model, rng.standard_normal((2, *shape)).astype(np.float32), ref["sample_prompt_embeds"],
            ref["sample_pooled"])
    kernel = np.asarray(sample(*args, plan=plan, attention=AttentionSettings(backend="triton", shortcuts=False),
                               **common))
    reference = np.asarray(sample(*args, plan=plan, attention=AttentionSettings(backend="xla", shortcuts=False),
                                  **common))
    assert np.isfinite(kernel).all()
    np.testing.assert_allclose(kernel, reference, rtol=1e-4, atol=1e-4)
    dense = np.asarray(sample(*args, **common))
    assert np.abs(reference - dense).max() > 1e-3  # the plan's arrow and cached heads changed the result


def test_sampled_queries_rse_is_the_rse_of_those_queries(monkeypatch):
    """With ``rse_query_stride`` 2 every probe of a real pass (all steps, layers, heads, candidates) gives the RSE
    that the full probe's outputs give on the sampled query tiles; the pass still samples as `sample(plan=...)`
    does, from the same noise (the chosen methods run once over all queries)."""
    import jax

    import ditfa_jax.calibrate as cal
    from tiny_runs import tiny_run

    model, text, common = tiny_run("flux_dev", STEPS)
    checked = []
    Runner = cal._LayerRunner

    class Checked(Runner):
        def __init__(self, stack, *, query_stride=1, **kw):
            super().__init__(stack, query_stride=query_stride, **kw)
            twin = Runner(stack, **kw)  # every query
            tokens, band_q = kw["layout"].tokens, kw["settings"].band[0]
            tiles = cal.sampled_query_tiles(kw["layout"], band_q, query_stride)
            assert tiles.sum() < tiles.size  # some query tiles are left out
            rows = np.repeat(tiles, band_q)[:tokens]
            sampled_probe = self.probe

            def probe(state, index, carry, temb, rope, prev_out, rse_over_prompts):
                rse, probed = sampled_probe(state, index, carry, temb, rope, prev_out,
                                            rse_over_prompts=rse_over_prompts)
                all_rse, (_, outs) = twin.probe(state, index, carry, temb, rope, prev_out,
                                                rse_over_prompts=rse_over_prompts)
                want = head_rse(outs[1:, :, rows], outs[0][:, rows], rse_over_prompts)
                np.testing.assert_allclose(np.asarray(rse), np.asarray(want), rtol=2e-4, atol=1e-7)
                checked.append(float(np.abs(np.asarray(rse) - np.asarray(all_rse)).max()))
                return rse, probed

            self.probe = probe

    monkeypatch.setattr(cal, "_LayerRunner", Checked)
    result = calibrate(model, *text, delta=0.5, progress=False, seed=3, rse_query_stride=2, **common)
    layers = model.config.total_layers
    assert len(checked) == (STEPS - 1) * layers and max(checked) > 1e-4  # a sample, not every query
    plan = result.plan
    assert plan.notes["rse_query_stride"] == 2
    assert (plan.head_window > 0).any() and (plan.head_window == 0).any()
    noise = jax.random.normal(jax.random.key(3), result.final_latents.shape, jnp.float32)
    sampled = np.asarray(sample(model, noise, *text, plan=plan, **common))
    np.testing.assert_allclose(np.asarray(result.final_latents), sampled, rtol=1e-4, atol=1e-4)


def test_sampled_query_tiles_are_image_tiles_at_the_stride():
    """Every stride-th query tile holding only image tokens, for both token orders; all tiles as the pool when no
    tile is image only."""
    from ditfa_jax.calibrate import sampled_query_tiles
    from ditfa_jax.family import TokenLayout

    flux = sampled_query_tiles(TokenLayout((128, 128), 512, True), 128, 16)  # tiles 0-3 text, 4..131 image
    assert flux.size == 132 and np.flatnonzero(flux).tolist() == list(range(4, 132, 16))
    sd3 = sampled_query_tiles(TokenLayout((64, 64), 333, False), 128, 8)  # 4096 image tokens, then 333 text
    assert sd3.size == 35 and np.flatnonzero(sd3).tolist() == list(range(0, 32, 8))
    ragged = sampled_query_tiles(TokenLayout((10, 10), 20, True), 16, 2)  # tokens 0..119, text 0..19: tile 1 is mixed
    assert np.flatnonzero(ragged).tolist() == [2, 4, 6]  # of the image tiles 2..7 (7 is partial)
    tiny = sampled_query_tiles(TokenLayout((2, 4), 8, True), 16, 2)  # 16 tokens, one mixed tile
    assert tiny.tolist() == [True]


def test_rse_query_stride_must_be_a_positive_int(sd3_setup):
    model, ref, common = sd3_setup
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="rse_query_stride"):
            calibrate(model, ref["sample_prompt_embeds"], ref["sample_pooled"], delta=0.1, progress=False,
                      rse_query_stride=bad, **common)


def test_fp8_heads_are_searched_with_the_other_methods_and_run_by_the_sampler(monkeypatch):
    """The candidate fp8 in the search: chosen for heads where its measured time pays (here a made-up cheap FP8 at a
    made-up measured size, the tiny head size having no measurement), never when the layer's overhead eats the
    saving; the sampler runs the plan's FP8 heads in FP8 (its final latents are the search pass's, and differ from
    the same plan in bf16)."""
    import jax

    from ditfa_jax import cost_model
    from ditfa_jax.cost_model import AttentionLayout, Fp8HeadTime
    from tiny_runs import tiny_run

    model, text, common = tiny_run("flux_dev", STEPS)
    candidates = ("cached", "arrow_8", "fp8")
    with pytest.raises(ValueError, match="no measured time at head_dim"):
        calibrate(model, *text, delta=0.5, progress=False, candidates=candidates, **common)
    at = AttentionLayout(image_tokens=4096, text_len=512, head_dim=128, band=(128, 128))
    monkeypatch.setitem(cost_model.FP8_HEAD_TIMES, 128, {4608: Fp8HeadTime(head_ratio=0.2, layer_overhead=0.0)})
    cheap = calibrate(model, *text, delta=0.5, progress=False, seed=3, candidates=candidates, price_at=at, **common)
    plan = cheap.plan
    assert plan.uses_fp8_heads and (plan.head_window == 0).any() and plan.notes["fp8_time"]["head_ratio"] == 0.2
    arrow_at = pallas_kernels.plan_cost(np.array([method_window("arrow_8", 4096)]), batch=1, tokens=4608, text_len=512,
                                        text_first=True, head_dim=128, band=(128, 128))
    np.testing.assert_allclose(cheap.saving[0], [1.0, 1 - float(arrow_at.flop_fraction), 0.8])  # priced at `at`
    assert plan.notes["priced_at"]["image_tokens"] == 4096
    windows = {int(w): m for m, w in enumerate(candidate_windows(candidates, plan.image_tokens))}
    for s in range(1, STEPS):
        for layer in range(plan.num_layers):
            chosen = [(h, windows[int(w)]) for h, w in enumerate(plan.head_window[s, layer]) if w != -1]
            assert sum(cheap.rse[s, layer, h, m] for h, m in chosen) <= 0.5 + 1e-9
    noise = jax.random.normal(jax.random.key(3), cheap.final_latents.shape, jnp.float32)
    searched = np.asarray(cheap.final_latents)
    sampled = np.asarray(sample(model, noise, *text, plan=plan, **common))
    in_bf16 = np.asarray(sample(model, noise, *text, plan=plan.replace(head_window=np.maximum(plan.head_window, -1)),
                                **common))
    # Two compiled programs round a few values to different e4m3 neighbours: equal up to those, and far closer to
    # each other than to the same plan without FP8
    assert np.abs(searched - sampled).max() < 5e-3
    assert np.abs(searched - sampled).mean() < 0.05 * np.abs(searched - in_bf16).mean()
    with pytest.raises(ValueError, match="backend 'triton' cannot run FP8 heads"):
        sample(model, noise, *text, plan=plan, attention=AttentionSettings(backend="triton"), **common)
    monkeypatch.setitem(cost_model.FP8_HEAD_TIMES, 128, {4608: Fp8HeadTime(head_ratio=0.2, layer_overhead=10.0)})
    costly = calibrate(model, *text, delta=0.5, progress=False, seed=3, candidates=candidates, price_at=at, **common)
    assert not costly.plan.uses_fp8_heads and (costly.plan.head_window == 0).any()
