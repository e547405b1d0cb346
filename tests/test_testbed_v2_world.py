"""Testbed v2 world (captions with partial mentions, splits, overlaps, rendering), its detector and tokenizer: CPU."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ditfa_jax.testbed.tokenizer import WordTokenizer, build_tokenizer
from ditfa_jax.testbed.v2 import detector, world

ATOL = 1e-5  # eager, jit and differently batched renders differ by float32 rounding


@pytest.fixture(scope="module")
def scenes() -> world.SceneBatch:
    """300 random scenes (random mentions), every background equally often."""
    s = world.sample_scenes(np.random.default_rng(0), 300, split="any")
    arrays = {name: getattr(s, name) for name in world._ALL_FIELDS}
    arrays["background"] = np.arange(len(s)) % len(world.BACKGROUNDS)
    return world.SceneBatch(**arrays)


@pytest.fixture(scope="module")
def images(scenes) -> np.ndarray:
    return world.render_scenes(scenes)


def _blank(n: int, rng) -> world.SceneBatch:
    """N scenes without objects, cycling through the backgrounds, random background parameters."""
    none = np.full((n, world.MAX_OBJECTS), -1, np.int32)
    zeros = np.zeros((n, world.MAX_OBJECTS, 2), np.float32)
    params = world._sample_raw(rng, n, 1, 1, "all").background_params
    return world.SceneBatch(shape=none, colour=none, size=none, texture=none, centre=zeros, texture_phase=zeros,
                            background=np.arange(n) % len(world.BACKGROUNDS), background_params=params,
                            mentioned=np.zeros((n, world.MAX_OBJECTS, 5), bool),
                            background_mentioned=np.ones(n, bool))


# ----------------------------------------------------------------------------------------------------------------
# Scenes and captions


def test_scene_batch_basics(scenes):
    assert len(scenes) == 300 and len(scenes[3]) == 1
    assert set(scenes[3].arrays()) == {"shape", "colour", "size", "texture", "centre", "texture_phase",
                                       "background", "background_params"}
    both = world.SceneBatch.concatenate([scenes[:5], scenes[5:9]])
    assert len(both) == 9 and world.captions(both) == world.captions(scenes[:9])
    present = scenes.shape >= 0
    assert (present == (np.arange(world.MAX_OBJECTS) < scenes.num_objects[:, None])).all()
    assert scenes.num_objects.min() == 1 and scenes.num_objects.max() == world.MAX_OBJECTS
    for name in ("colour", "size", "texture"):
        assert ((getattr(scenes, name) >= 0) == present).all()
    assert (scenes.texture[scenes.size == 0] == 0).all()  # tiny objects are plain
    assert set(np.unique(scenes.texture[scenes.size > 0])) == {0, 1, 2}
    assert (np.diff(np.where(present, scenes.size, -1), axis=1) <= 0).all()  # largest first
    region = scenes.region
    assert ((region >= 0) == present).all()
    np.testing.assert_array_equal(region[present], world.region_of(scenes.centre[present]))
    with pytest.raises(ValueError, match="centre"):
        world.SceneBatch(**{**{n: getattr(scenes, n) for n in world._ALL_FIELDS}, "centre": scenes.centre[:, :3]})


def test_captions_round_trip(scenes):
    texts = world.captions(scenes)
    assert len(set(texts)) > 250
    region = scenes.region
    for i, text in enumerate(texts):
        spec = world.parse_caption(text)
        assert spec.num_objects == scenes.num_objects[i]
        for a, name in enumerate(world.ATTRIBUTES):
            truth = region[i] if name == "region" else getattr(scenes, name)[i]
            expected = np.where(scenes.mentioned[i, :, a], truth, -1)
            np.testing.assert_array_equal(spec.attribute(name), expected, err_msg=f"{name}: {text}")
        assert spec.background == (scenes.background[i] if scenes.background_mentioned[i] else -1)
        assert world.parse_caption(text.upper()).colour.tolist() == spec.colour.tolist()


def test_mentions_random_and_all(scenes):
    present = scenes.shape >= 0
    rates = scenes.mentioned[present].mean(0)
    for a, p in enumerate(world.MENTION_P):  # every attribute sometimes mentioned, sometimes not
        assert abs(rates[a] - p) < 0.06, (world.ATTRIBUTES[a], rates[a])
    assert not scenes.mentioned[~present].any()
    assert 0.5 < scenes.background_mentioned.mean() < 0.7
    texts = world.captions(scenes)
    assert any(" object" in t for t in texts) and any(not t.endswith("background") for t in texts)
    full = world.sample_scenes(np.random.default_rng(1), 200, mention="all")
    assert (full.mentioned == (full.shape >= 0)[..., None]).all() and full.background_mentioned.all()
    for text, n in zip(world.captions(full), full.num_objects):
        spec = world.parse_caption(text)
        assert spec.background >= 0
        assert all((spec.attribute(a)[:n] >= 0).all() for a in world.ATTRIBUTES)


@pytest.mark.parametrize("bad, word", [
    ("a small red circle at the middle", "at the middle"),
    ("a red small circle", "small"),  # wrong order
    ("a huge red circle", "huge"),
    ("the red circle", "the"),
    ("a red circle on a blue background", "blue"),
    ("a red", "no noun"),
    ("a red circle and", "empty"),
    ("a red circle at the top on a background", "on a <background> background"),
    (" and ".join(["a circle"] * 6), "6 objects"),
])
def test_parse_caption_rejects(bad, word):
    with pytest.raises(ValueError, match="caption") as err:
        world.parse_caption(bad)
    assert word in str(err.value) and repr(bad) in str(err.value)


def test_split_disjoint_and_heldout_fraction():
    rng = np.random.default_rng(2)
    train = set(world.captions(world.sample_scenes(rng, 2000, split="train")))
    heldout = set(world.captions(world.sample_scenes(rng, 500, split="heldout")))
    assert train and heldout and not train & heldout
    assert not any(world.is_heldout(c) for c in train) and all(world.is_heldout(c) for c in heldout)
    many = world.captions(world.sample_scenes(rng, 20000, split="any"))
    fraction = np.mean([world.is_heldout(c) for c in many])
    assert 0.09 < fraction < 0.11, fraction
    multi = world.sample_scenes(rng, 200, split="heldout", min_objects=3, mention="all")
    assert (multi.num_objects >= 3).all() and all(world.is_heldout(c) for c in world.captions(multi))
    with pytest.raises(ValueError, match="mention"):
        world.sample_scenes(rng, 2, mention="some")


def test_overlaps_bounded_and_same_colours_apart():
    s = world.sample_scenes(np.random.default_rng(3), 2000, split="any", min_objects=4)
    half = np.asarray(world.DIAMETERS)[np.clip(s.size, 0, None)] / 2
    present = s.shape >= 0
    assert ((s.centre - half[..., None] >= 1.0) | ~present[..., None]).all()  # fits in the image
    assert ((s.centre + half[..., None] <= world.IMAGE_SIZE - 1.0) | ~present[..., None]).all()
    d = np.linalg.norm(s.centre[:, :, None] - s.centre[:, None, :], axis=-1)
    rr = half[:, :, None] + half[:, None, :]
    pair = present[:, :, None] & present[:, None, :] & ~np.eye(world.MAX_OBJECTS, dtype=bool)
    assert (d[pair] >= world.OVERLAP * rr[pair] - 1e-4).all()
    same = pair & (s.colour[:, :, None] == s.colour[:, None, :])
    assert same.any() and (d[same] >= rr[same] + world.SAME_COLOUR_GAP - 1e-4).all()
    assert (d[pair] < rr[pair]).mean() > 0.02  # overlaps do happen
    to_border = np.abs((s.centre + world.CELL / 2) % world.CELL - world.CELL / 2)
    assert (to_border[present] >= 1.0 - 1e-4).all()  # regions unambiguous


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def test_render_shape_range_and_jit(scenes, images):
    assert images.shape == (len(scenes), world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    small = scenes[:8]
    # (eager render is slow on CPU, ~9 s of op-by-op dispatch: compare two jitted batch shapes instead)
    np.testing.assert_allclose(world.render_scenes(small, batch_size=4), images[:8], atol=ATOL)
    assert world.render_scenes(small, image_size=32).shape == (8, 32, 32, 3)
    grey = images[..., 0] == images[..., 1]
    assert grey.mean() > 0.5  # backgrounds are neutral


def test_render_batch_agnostic(scenes, images):
    arrays = scenes[:6].arrays()
    jitted = jax.jit(world.render)
    single = jitted(**{k: v[2] for k, v in arrays.items()})
    assert single.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    np.testing.assert_allclose(single, images[2], atol=ATOL)
    grid = jitted(**{k: v.reshape((2, 3) + v.shape[1:]) for k, v in arrays.items()})
    np.testing.assert_allclose(np.asarray(grid).reshape(images[:6].shape), images[:6], atol=ATOL)
    mapped = jax.jit(jax.vmap(world.render))(*(jnp.asarray(arrays[k]) for k in arrays))
    np.testing.assert_allclose(mapped, images[:6], atol=ATOL)


def test_random_phases_change_pixels(scenes, images):
    """Texture and background phases are not in the caption but change the image: one caption, many images."""
    arrays = {name: getattr(scenes, name) for name in world._ALL_FIELDS}
    arrays["texture_phase"] = arrays["texture_phase"] + 1.0
    arrays["background_params"] = arrays["background_params"] + np.array([1.0, 1.0, 1.0, 1.0, 0.0], np.float32)
    moved = world.SceneBatch(**arrays)
    assert world.captions(moved) == world.captions(scenes)
    diff = np.abs(world.render_scenes(moved) - images).max(axis=(1, 2, 3))  # same batch shape: no recompile
    textured = (scenes.background >= 3) | (scenes.texture > 0).any(axis=1)
    assert (diff[textured] > 0.05).all() and (diff[~textured] < 1e-5).all()


# ----------------------------------------------------------------------------------------------------------------
# Detector


def test_detector_on_ground_truth_fully_specified():
    s = world.sample_scenes(np.random.default_rng(4), 200, split="any", mention="all")
    result = detector.score(world.render_scenes(s), s)
    assert result["object"] >= 0.97 and result["count"] >= 0.95, result
    for key in world.ATTRIBUTES + ("background",):
        assert result[key] >= 0.97, (key, result)


def test_detector_on_ground_truth_random_mentions(scenes, images):
    for batch, targets in ((images[:200], scenes[:200]), (world.to_uint8(images[200:]), scenes[200:])):
        result = detector.score(batch, targets)
        assert result["object"] >= 0.98 and result["count"] >= 0.95, result
        assert result["background"] >= 0.97 and result["extra_objects"] <= 0.05, result
    found = detector.detect(images[0])
    assert len(found) == scenes.num_objects[0]


def test_detector_blank_backgrounds():
    blank = _blank(4 * len(world.BACKGROUNDS), np.random.default_rng(5))
    renders = world.render_scenes(blank)
    for image, bg in zip(renders, blank.background):
        assert detector.detect(image) == []
        assert detector.classify_background(image) == bg, world.BACKGROUNDS[bg]
    with pytest.raises(ValueError, match="shape"):
        detector.detect(renders)  # a batch, not one image


def test_attribute_labels(scenes, images):
    labels = world.attribute_labels(scenes)
    assert labels.shape == (len(scenes), len(world.LABEL_NAMES)) == (len(scenes), 117) and labels.dtype == np.float32
    nc, ns, nr = len(world.COLOURS), len(world.SHAPES), len(world.REGIONS)
    blocks = np.split(labels, np.cumsum([nc * ns, nc * nr, 3, 3]), axis=1)
    np.testing.assert_array_equal(blocks[-1].sum(1), 1)  # one background
    np.testing.assert_array_equal(blocks[-1].argmax(1), scenes.background)
    for block in blocks[:4]:
        assert (block.sum(1) >= 1).all() and (block.sum(1) <= scenes.num_objects).all()
    # the labels of what the detector reads from the ground-truth render agree with the truth's
    agree = 0
    for i in range(60):
        found = detector.detect(images[i])
        got = np.zeros(labels.shape[1], np.float32)
        for d in found:
            got[[d.colour * ns + d.shape, nc * ns + d.colour * nr + d.region, nc * (ns + nr) + d.size,
                 nc * (ns + nr) + 3 + d.texture]] = 1
        got[nc * (ns + nr) + 6 + detector.classify_background(images[i])] = 1
        agree += (got == labels[i]).all()
    assert agree >= 57, agree


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_vocabulary_and_shipped_tokenizer():
    words = world.vocabulary()
    assert words[:2] == ["<pad>", "<unk>"] and len(set(words)) == len(words)
    grammar = {w for p in (*world.SIZES, *world.TEXTURES, *world.COLOUR_NAMES, *world.SHAPES, *world.REGIONS,
                           *world.BACKGROUNDS, "a and on background object") for w in p.split()}
    assert set(words[2:]) == grammar
    shipped = json.loads(world.SHIPPED_TOKENIZER.read_text())
    assert shipped == json.loads(build_tokenizer(words).to_str()), "run: python -m ditfa_jax.testbed.v2.world"
    with pytest.raises(ValueError, match="pad"):
        build_tokenizer(["a", "b"])


def test_longest_caption_fits():
    tok = WordTokenizer.from_file(world.SHIPPED_TOKENIZER)
    assert tok.vocab_size == len(world.vocabulary())
    n = world.MAX_OBJECTS
    full = world.sample_scenes(np.random.default_rng(6), n, mention="all", min_objects=n)
    arrays = {name: getattr(full, name)[:1] for name in world._ALL_FIELDS}
    arrays["centre"] = np.full((1, n, 2), 3.0, np.float32)  # all at the top left: the longest region phrase
    arrays["size"] = np.full((1, n), 1, np.int32)
    longest = world.captions(world.SceneBatch(**arrays))[0]
    assert len(longest.split()) == n * 9 + (n - 1) + 4 == 53 and world.MAX_LENGTH == 56
    ids, mask = tok.encode(longest, max_length=world.MAX_LENGTH)
    assert mask.sum() == 53 and tok.decode(ids) == [longest]
    texts = world.captions(world.sample_scenes(np.random.default_rng(7), 500, mention="all"))
    ids, mask = tok.encode(texts, max_length=world.MAX_LENGTH)
    assert tok.decode(ids) == texts
