"""The Fréchet quality score (ditfa_jax.testbed.features): the distance itself, its response to degraded renders,
the feature net's folder and seeded training. CPU, a tiny net trained for a few dozen steps on v1 renders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy import ndimage

from ditfa_jax.testbed import features as F
from ditfa_jax.testbed import world

N = 256  # renders per set
FIXTURE_STEPS = 30


def _params(net) -> dict[str, np.ndarray]:
    from ditfa_jax.testbed.params import flat_params

    return flat_params(net)


@pytest.fixture(scope="module")
def net() -> F.FeatureNet:
    draw = F.world_draw_batch(world, F.v1_attribute_labels)
    trained, record = F.train_feature_net(draw, num_labels=110, steps=FIXTURE_STEPS, batch_size=32, progress=False,
                                          heldout_size=64, log_every=10)
    assert record["loss_curve"][-1][1] < record["loss_curve"][0][1]
    return trained


@pytest.fixture(scope="module")
def renders():
    """Renders of N scenes, the same captions with every object's position jitter redrawn (v1's only free choice)
    and N independent scenes."""
    scenes = world.sample_scenes(np.random.default_rng(10), N, split="any")
    arrays = scenes.arrays()
    reach = np.asarray(world.MAX_OFFSET, np.float32)[np.maximum(scenes.size, 0)]
    offset = np.random.default_rng(11).uniform(-1, 1, scenes.offset.shape) * reach[..., None]
    arrays["offset"] = np.where((scenes.shape >= 0)[..., None], offset, 0).astype(np.float32)
    recaptioned = world.SceneBatch(**arrays)
    assert world.captions(recaptioned) == world.captions(scenes)
    other = world.sample_scenes(np.random.default_rng(12), N, split="any")
    return {"base": world.render_scenes(scenes), "same_captions": world.render_scenes(recaptioned),
            "independent": world.render_scenes(other)}


# ---- the distance ------------------------------------------------------------------------------------------------


def test_frechet_distance_zero_symmetric_and_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 6))
    assert F.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = rng.standard_normal((400, 6)) * 2 + 1
    assert F.frechet_distance(a, b) == pytest.approx(F.frechet_distance(b, a), rel=1e-8)
    # Samples whose sample mean and covariance are exactly mu and diag(var): the closed form for diagonal Gaussians,
    # ||mu_a - mu_b||^2 + sum (sqrt(var_a) - sqrt(var_b))^2, holds to rounding.
    def exact(n, mu, var):
        z = rng.standard_normal((n, 2))
        z -= z.mean(0)
        z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance I
        return z * np.sqrt(var) + mu

    mu_x, var_x, mu_y, var_y = np.array([0.5, -1.0]), np.array([1.0, 9.0]), np.array([0.0, 0.2]), np.array([4.0, 0.25])
    x, y = exact(300, mu_x, var_x), exact(200, mu_y, var_y)
    closed = np.sum((mu_x - mu_y) ** 2) + np.sum((np.sqrt(var_x) - np.sqrt(var_y)) ** 2)
    assert F.frechet_distance(x, y) == pytest.approx(closed, rel=1e-9)
    assert F.frechet_distance(x, y) == pytest.approx(F.frechet_distance(y, x), rel=1e-9)


def test_frechet_distance_singular_covariance():
    rng = np.random.default_rng(1)
    a = np.zeros((50, 3))
    a[:, 0] = rng.standard_normal(50)  # rank 1
    b = rng.standard_normal((50, 3))
    assert np.isfinite(F.frechet_distance(a, b))
    assert F.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("a, b, match", [
    (np.zeros((1, 4)), np.zeros((5, 4)), "at least 2 samples"),
    (np.zeros((5, 4)), np.zeros((5, 3)), r"\[N, D\] and \[M, D\]"),
    (np.zeros((5,)), np.zeros((5, 1)), r"\[N, D\] and \[M, D\]"),
    (np.full((5, 2), np.nan), np.zeros((5, 2)), "NaN"),
])
def test_frechet_distance_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        F.frechet_distance(a, b)


# ---- the score on renders --------------------------------------------------------------------------------------


def test_score_near_zero_for_same_captions_and_grows_with_degradation(net, renders):
    base = F.embed_images(net, renders["base"])
    fd = lambda images: F.frechet_distance(base, F.embed_images(net, images))  # noqa: E731
    blur = {s: fd(ndimage.gaussian_filter(renders["base"], (0, s, s, 0))) for s in (0.5, 1.0, 2.0)}
    rng = np.random.default_rng(5)
    noise = {s: fd(np.clip(renders["base"] + s * rng.standard_normal(renders["base"].shape, np.float32), 0, 1))
             for s in (0.02, 0.05, 0.1)}
    same = fd(renders["same_captions"])
    independent = fd(renders["independent"])
    print(json.dumps({"N": N, "same_captions": same, "independent_scenes": independent,
                      "blur": blur, "noise": noise}))
    assert same < 0.1 * blur[1.0]
    assert blur[0.5] < blur[1.0] < blur[2.0]
    assert noise[0.02] < noise[0.05] < noise[0.1]
    score = F.frechet_score(net, renders["base"][:100], renders["same_captions"][:60])
    assert score.distance == pytest.approx(F.frechet_distance(base[:100], F.embed_images(
        net, renders["same_captions"][:60])), rel=1e-6)
    assert (score.num_images, score.num_reference, score.feature_dim) == (100, 60, net.config.feature_dim)


def test_embed_images_uint8_batching_and_bad_shape(net, renders):
    images = renders["base"][:37]
    full = F.embed_images(net, images)
    assert full.shape == (37, net.config.feature_dim) and full.dtype == np.float64
    np.testing.assert_allclose(F.embed_images(net, images, batch_size=16), full, rtol=1e-5, atol=1e-6)
    as_uint8 = world.to_uint8(images)
    np.testing.assert_allclose(F.embed_images(net, as_uint8), F.embed_images(net, as_uint8 / 255.0), atol=1e-5)
    with pytest.raises(ValueError, match=r"expected images \[N, 64, 64, 3\], got shape \(2, 32, 32, 3\)"):
        F.embed_images(net, np.zeros((2, 32, 32, 3), np.float32))


# ---- saving and loading ----------------------------------------------------------------------------------------


def test_save_load_round_trip_and_missing_tensor(net, renders, tmp_path):
    folder = F.save_feature_net(net, tmp_path / "features", record={"note": "test"})
    loaded = F.load_feature_net(folder)
    assert loaded.config == net.config
    np.testing.assert_array_equal(F.embed_images(loaded, renders["base"][:64]),
                                  F.embed_images(net, renders["base"][:64]))
    with pytest.raises(FileExistsError):
        F.save_feature_net(net, folder)

    weights = folder / F.WEIGHTS_FILE
    tensors = load_file(str(weights))
    key = "down/1/kernel"
    assert key in tensors
    save_file({k: v for k, v in tensors.items() if k != key}, str(weights))
    with pytest.raises(ValueError, match=f"model.safetensors: missing tensor '{key}'"):
        F.load_feature_net(folder)
    save_file({**tensors, key: tensors[key][:, :, :, :3]}, str(weights))
    with pytest.raises(ValueError, match=f"tensor '{key}' has shape"):
        F.load_feature_net(folder)
    (folder / F.CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        F.load_feature_net(folder)


# ---- training --------------------------------------------------------------------------------------------------


def test_training_is_seeded():
    draw = F.world_draw_batch(world, F.v1_attribute_labels)
    small = F.FeatureNetConfig(num_labels=110, channels=(8, 8, 8, 8), feature_dim=8)
    run = lambda seed: F.train_feature_net(draw, num_labels=110, steps=3, batch_size=8, seed=seed,  # noqa: E731
                                           progress=False, config=small, heldout_size=8)
    (a, record), (b, _), (c, _) = run(0), run(0), run(1)
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert not all(np.array_equal(pa[k], pc[k]) for k in pa)
    assert record["parameters"] == sum(v.size for v in pa.values())
    assert set(record["heldout"]) >= {"label_accuracy", "size"} and len(record["loss_curve"]) == 1


def test_labels_and_bad_batches():
    scenes = world.sample_scenes(np.random.default_rng(3), 20, split="any")
    labels = F.v1_attribute_labels(scenes)
    assert labels.shape == (20, 110)
    np.testing.assert_array_equal(labels[:, -6:].sum(1), 1)  # one background
    np.testing.assert_array_equal(labels[:, :32].sum(1) <= scenes.num_objects, True)
    np.testing.assert_array_equal(labels[:, 32:104].sum(1), scenes.num_objects)  # regions are distinct
    bad = lambda rng, n: (np.zeros((n, 64, 64, 3), np.float32), np.zeros((n, 7), np.float32))  # noqa: E731
    with pytest.raises(ValueError, match=r"expected labels \[4, 110\], got shape \(4, 7\)"):
        F.train_feature_net(bad, num_labels=110, steps=1, batch_size=4, progress=False)
