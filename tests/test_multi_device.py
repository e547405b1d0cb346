"""Sampling and calibration over a (data, heads) mesh of CPU devices against one device (issue 19).

Needs 4 or more devices: `test_sharding.py` runs this file in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (meshes over 8 and over 4 of them); in a one-device process it
is skipped. Models: tiny FLUX-dev and SD3.5 configs with 8 heads (random fp32 weights), the fixtures' prompt
embeddings.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tiny_runs import FIXTURES, tiny_run

from ditfa_jax import sample, sharding
from ditfa_jax.attention import AttentionSettings
from ditfa_jax.calibrate import calibrate
from ditfa_jax.configs import config_from_dict
from ditfa_jax.denoise import prepare_run
from ditfa_jax.family import family_of
from ditfa_jax.loading import Transformer
from ditfa_jax.plan import CompressionPlan

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs XLA_FLAGS=--xla_force_host_platform_device_"
                                                              "count=4 or more (test_sharding.py runs it so)")
STEPS = 4
HEADS = 8


def eight_head_model(name: str) -> Transformer:
    """The fixture's architecture with 8 heads (of its 16 channels), random fp32 weights."""
    raw = json.loads((FIXTURES / name / "transformer" / "config.json").read_text())
    raw["num_attention_heads"] = HEADS
    if "caption_projection_dim" in raw:
        raw["caption_projection_dim"] = HEADS * raw["attention_head_dim"]
    config = config_from_dict(raw, name)
    module = family_of(config).module_class(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    state = jax.tree_util.tree_map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape, a.dtype)
                                   if a.ndim >= 1 else a, state)  # no zero-initialised layer left
    return Transformer(config, graphdef, state)


@pytest.fixture(scope="module", params=["flux_dev", "sd35_medium"])
def run(request):
    _, text, common = tiny_run(request.param, STEPS)
    model = eight_head_model(request.param)
    setup = prepare_run(model.config, *text, vae_scale_factor=8, **common)
    noise = jax.random.normal(jax.random.key(5), (text[0].shape[0], *setup.latent_shape), jnp.float32)
    full = CompressionPlan.full(model.config, height=common["height"], width=common["width"],
                                text_len=text[0].shape[1], num_steps=STEPS, vae_scale_factor=8)
    windows = np.asarray(full.head_window).copy()
    windows[1:] = np.random.default_rng(0).choice([-1, 0, 1, 2], size=windows[1:].shape)
    mlp = np.ones((STEPS, model.config.total_layers), bool)
    mlp[2:, ::2] = False  # cached MLP branches ride in the carry, split like the blocks' activations
    return model, text, common, noise, full.replace(head_window=windows, mlp_compute=mlp), setup.batch


def meshes(batch: int, planned: bool):
    """(data, heads) shapes over all the devices (heads only, and a data axis of 2: the model's batch is 2 or 4),
    and with a plan also over half of them (heads only)."""
    n = jax.device_count()
    shapes = [(1, n), (2, n // 2)] + ([(1, n // 2)] if planned else [])
    return [s for s in shapes if batch % s[0] == 0 and HEADS % s[1] == 0]


@pytest.mark.parametrize("planned", [False, True], ids=["dense", "mixed plan"])
def test_sharded_sampler_equals_one_device(run, planned):
    model, text, common, noise, plan, batch = run
    plan = plan if planned else None
    want = np.asarray(sample(model, noise, *text, plan=plan, **common))
    for data, heads in meshes(batch, planned):
        mesh = sharding.make_mesh(data, heads)
        got = np.asarray(sample(model, noise, *text, plan=plan, mesh=mesh, **common))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"mesh {data}x{heads}")
    if planned:  # on the last mesh, also without balancing and with the weights split over the devices
        unbalanced = np.asarray(sample(model, noise, *text, plan=plan, mesh=mesh, balance=False, **common))
        np.testing.assert_allclose(unbalanced, want, rtol=1e-5, atol=1e-5)
        split = Transformer(model.config, model.graphdef, model.state).place_on(mesh, shard=True)
        assert any(not a.sharding.is_fully_replicated for a in jax.tree_util.tree_leaves(split.state))
        np.testing.assert_allclose(np.asarray(sample(split, noise, *text, plan=plan, mesh=mesh, **common)), want,
                                   rtol=1e-5, atol=1e-5, err_msg="weights split over the devices")
    if planned:  # the plan changed the result by far more than the tolerance: the comparison is not trivial
        assert np.abs(want - np.asarray(sample(model, noise, *text, **common))).max() > 3e-4


@pytest.mark.parametrize("run", ["flux_dev"], indirect=True)  # one family: the path is shared
def test_head_parallel_attention_goes_through_all_to_all(run):
    """The partitioned program exchanges tokens for heads (Ulysses) instead of gathering whole activations."""
    model, text, common, noise, plan, batch = run
    mesh = sharding.make_mesh(1, jax.device_count())
    settings = AttentionSettings(mesh=mesh)
    from ditfa_jax.denoise import velocity

    setup = prepare_run(model.config, *text, vae_scale_factor=8, **common)

    @jax.jit
    def one_step(state, x):
        module = nnx.merge(model.graphdef, state)
        return velocity(module, setup.family, setup.cond, setup.layout, settings, x, setup.timesteps[0])[0]

    hlo = one_step.lower(*sharding.replicate((model.state, noise), mesh)).compile().as_text()
    assert "all-to-all" in hlo
    np.testing.assert_allclose(np.asarray(one_step(*sharding.replicate((model.state, noise), mesh))),
                               np.asarray(jax.jit(lambda s, x: velocity(
                                   nnx.merge(model.graphdef, s), setup.family, setup.cond, setup.layout,
                                   AttentionSettings(), x, setup.timesteps[0])[0])(model.state, noise)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("run", ["flux_dev"], indirect=True)  # one family: the path is shared
def test_calibration_over_the_data_axis_finds_the_same_plan(run):
    model, text, common, noise, plan, batch = run
    kwargs = dict(common, delta=0.3, mlp_delta=1e-12, progress=False)  # MLP branches scored (their values carried)
    one = calibrate(model, *text, **kwargs)
    split = calibrate(model, *text, mesh=sharding.make_mesh(2, 1), **kwargs)
    assert 0 < (one.plan.head_window != -1).mean() < 1  # a plan with choices in it
    np.testing.assert_array_equal(split.plan.head_window, one.plan.head_window)
    np.testing.assert_allclose(split.rse, one.rse, rtol=1e-4, atol=1e-6)
    assert np.isfinite(one.mlp_rse[1:]).all()
    np.testing.assert_allclose(split.mlp_rse, one.mlp_rse, rtol=1e-4, atol=1e-6)


def test_balancing_lowers_the_predicted_imbalance(run):
    model, text, common, noise, plan, batch = run
    setup = prepare_run(model.config, *text, vae_scale_factor=8, **common)
    costs = sharding.plan_head_costs(plan, setup.layout, model.config.attention_head_dim)
    assert (sharding.balance_heads(costs, 4) != np.arange(HEADS)).any()  # the sampler tests' permutation is real
    for shards in (2, 4, 8):
        report = sharding.balance_report(costs, shards)
        assert 1.0 <= report["predicted_imbalance_balanced"] <= report["predicted_imbalance"]
    assert sharding.balance_report(costs, 4)["predicted_imbalance_balanced"] < \
        sharding.balance_report(costs, 4)["predicted_imbalance"]


def test_meshes_the_run_cannot_use_are_refused(run):
    model, text, common, noise, plan, batch = run
    with pytest.raises(ValueError, match=r"head axis 3: the model has 8 attention heads.*\[1, 2, 4, 8\]"):
        sample(model, noise, *text, mesh=sharding.make_mesh(1, 3), **common)
    with pytest.raises(ValueError, match=rf"data axis {batch * 2}: the model sees a batch of {batch}"):
        sample(model, noise, *text, mesh=sharding.make_mesh(batch * 2, 1), **common)
    with pytest.raises(ValueError, match="splits its prompts over the data axis only"):
        calibrate(model, *text, mesh=sharding.make_mesh(1, 2), delta=0.3, progress=False, **common)


def test_cli_calibrates_and_samples_over_devices(tmp_path, capsys):
    """`ditfa calibrate --devices 2` (prompts over 2 devices) writes a plan; `ditfa sample --devices 2` with it gives
    the one-device latents and reports the predicted imbalance; `ditfa generate --devices 2` the one-device image."""
    from ditfa_jax.cli import main as cli_main

    folder = str(FIXTURES / "pipelines" / "flux_tiny")
    common = ["--height", "64", "--width", "96", "--steps", "3", "--prompts", "2", "--text-len", "8", "--delta", "1"]
    assert cli_main(["calibrate", folder, "--out", str(tmp_path / "one.json"), *common, "--devices", "2"]) == 0
    plan = CompressionPlan.load(tmp_path / "one.json")  # the same plan as on one device: test_calibration_...
    assert 0 < (plan.head_window != -1).mean() < 1
    capsys.readouterr()
    for name, extra in (("one", []), ("two", ["--devices", "2"])):
        assert cli_main(["sample", folder, "--plan", str(tmp_path / "one.json"), "--out",
                         str(tmp_path / f"{name}.npy"), *extra]) == 0
    report = json.loads(capsys.readouterr().out.split("\n}\n")[1] + "\n}")
    assert report["mesh"] == {"data": 1, "heads": 2} and report["predicted_imbalance_balanced"] >= 1.0
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"), rtol=1e-5, atol=1e-5)
    for name, extra in (("one", []), ("two", ["--devices", "2"])):  # the pipeline: prompt -> PNG
        assert cli_main(["generate", folder, "--prompt", "a fox", "--plan", str(tmp_path / "one.json"), "--out",
                         str(tmp_path / f"images_{name}"), *extra]) == 0
    one, two = (np.asarray(Image.open(tmp_path / f"images_{n}" / "image_000.png"), np.int16) for n in ("one", "two"))
    assert np.abs(two - one).max() <= 1  # pixels of 8 bits, from latents equal within 1e-5
