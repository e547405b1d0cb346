"""The testbed world (captions, splits, rendering), its detector, tokenizer and image metrics: CPU, a few seconds."""

from __future__ import annotations

import itertools
import json
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ditfa_jax.testbed import detector, world
from ditfa_jax.testbed.metrics import image_grid, psnr, relative_squared_error, save_png, ssim
from ditfa_jax.testbed.tokenizer import MAX_LENGTH, SHIPPED_TOKENIZER, WordTokenizer, build_tokenizer, vocabulary

ATOL = 1e-5  # eager, jit and differently batched renders differ by float32 rounding (XLA fuses differently), ~2e-6


@pytest.fixture(scope="module")
def scenes() -> world.SceneBatch:
    """300 random scenes of 1-3 objects, every background equally often."""
    s = world.sample_scenes(np.random.default_rng(0), 300, split="any")
    arrays = s.arrays()
    arrays["background"] = np.arange(len(s)) % len(world.BACKGROUNDS)
    return world.SceneBatch(**arrays)


@pytest.fixture(scope="module")
def images(scenes) -> np.ndarray:
    return world.render_scenes(scenes)


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    return WordTokenizer.from_file()


def _blank(n: int) -> world.SceneBatch:
    """N scenes without objects, cycling through the backgrounds."""
    none = np.full((n, world.MAX_OBJECTS), -1, np.int32)
    return world.SceneBatch(shape=none, colour=none, size=none, region=none,
                            offset=np.zeros((n, world.MAX_OBJECTS, 2), np.float32),
                            background=np.arange(n) % len(world.BACKGROUNDS))


# ----------------------------------------------------------------------------------------------------------------
# Captions and splits


def test_captions_round_trip(scenes):
    texts = world.captions(scenes)
    assert len(set(texts)) > 250
    for i, text in enumerate(texts):
        parsed = world.parse_caption(text)
        for name in ("shape", "colour", "size", "region", "background"):
            np.testing.assert_array_equal(getattr(parsed, name)[0], getattr(scenes, name)[i], err_msg=text)
        assert world.captions(parsed) == [text]
        assert world.parse_caption(text.upper()).region.tolist() == parsed.region.tolist()


@pytest.mark.parametrize("bad", [
    "a small red circle at the top left",  # no background
    "a small red circle at the top left on a blue background",
    "a tiny red circle at the top left on a grey background",
    "a small red circle at the middle on a grey background",
    "a small red circle at the top and a large blue square at the top on a grey background",
    " and ".join(["a small red circle at the top"] * 4) + " on a grey background",
])
def test_parse_caption_rejects(bad):
    with pytest.raises(ValueError, match="caption"):
        world.parse_caption(bad)


def test_split_disjoint_and_heldout_fraction():
    rng = np.random.default_rng(1)
    train = set(world.captions(world.sample_scenes(rng, 2000, split="train")))
    heldout = set(world.captions(world.sample_scenes(rng, 500, split="heldout")))
    assert train and heldout and not train & heldout
    assert not any(world.is_heldout(c) for c in train) and all(world.is_heldout(c) for c in heldout)
    many = world.captions(world.sample_scenes(rng, 20000, split="any"))
    fraction = np.mean([world.is_heldout(c) for c in many])
    assert 0.09 < fraction < 0.11, fraction
    one = world.sample_scenes(rng, 500, split="heldout", min_objects=1, max_objects=1)
    assert (one.num_objects == 1).all()


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def test_render_shape_range_and_jit(scenes, images):
    assert images.shape == (len(scenes), world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    small = scenes[:8]
    eager = np.asarray(world.render(**small.arrays()))
    np.testing.assert_allclose(eager, images[:8], atol=ATOL)
    assert world.render_scenes(small, image_size=32).shape == (8, 32, 32, 3)


def test_render_batch_agnostic(scenes, images):
    small = scenes[:6]
    arrays = small.arrays()
    jitted = jax.jit(world.render)
    # one scene without a batch axis, a [2, 3] batch, and vmap over single scenes all give the [6] batch's pixels
    single = jitted(**{k: v[2] for k, v in arrays.items()})
    assert single.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    np.testing.assert_allclose(single, images[2], atol=ATOL)
    grid = jitted(**{k: v.reshape((2, 3) + v.shape[1:]) for k, v in arrays.items()})
    np.testing.assert_allclose(np.asarray(grid).reshape(images[:6].shape), images[:6], atol=ATOL)
    mapped = jax.vmap(world.render)(*(jnp.asarray(arrays[k]) for k in arrays))
    np.testing.assert_allclose(mapped, images[:6], atol=ATOL)


def test_objects_do_not_overlap():
    """Each object's footprint (pixels it changes when drawn alone) stays inside its own cell, at extreme jitter."""
    rng = np.random.default_rng(2)
    s = world.sample_scenes(rng, 64, split="any", min_objects=3)
    reach = np.asarray(world.MAX_OFFSET, np.float32)[s.size]
    arrays = s.arrays()
    arrays["offset"] = rng.choice([-1.0, 1.0], size=arrays["offset"].shape) * reach[..., None]  # corners of the jitter
    background = np.asarray(world.render(**_blank(len(s)).arrays() | {"background": arrays["background"]}))
    footprints = []
    for k in range(world.MAX_OBJECTS):
        alone = {name: a.copy() for name, a in arrays.items()}
        for name in ("shape", "colour", "size", "region"):
            alone[name][:, np.arange(world.MAX_OBJECTS) != k] = -1
        footprints.append(np.abs(np.asarray(world.render(**alone)) - background).max(-1) > 0)
    footprints = np.stack(footprints, 1)  # [N, K, H, W]
    assert footprints.sum(axis=(2, 3)).min() > 40  # every object drew something
    assert footprints.sum(1).max() == 1  # no pixel touched by two objects
    idx = (np.arange(world.IMAGE_SIZE) // world.CELL).astype(int)
    cell = 3 * idx[:, None] + idx[None, :]  # [H, W] region of each pixel
    assert (~footprints | (cell == s.region[..., None, None])).all()


# ----------------------------------------------------------------------------------------------------------------
# Detector


def test_detector_on_ground_truth(scenes, images):
    for batch in (images, world.to_uint8(images)):
        result = detector.score(batch, scenes)
        for key in ("object", "size", "present", "colour", "shape"):
            assert result[key] >= 0.99, (key, result)
        assert result["extra_objects"] <= 0.01 and result["count"] >= 0.99, result
    found = detector.detect(images[0])
    assert sorted(d.phrase for d in found) == sorted(world.captions(scenes[0])[0].split(" on a ")[0].split(" and "))


def test_detector_blank_backgrounds(scenes):
    blank = world.render_scenes(_blank(len(world.BACKGROUNDS)))
    for image in blank:
        assert detector.detect(image) == []
    targets = scenes[:len(world.BACKGROUNDS)]
    result = detector.score(blank, targets)
    assert result["object"] == result["present"] == result["count"] == 0.0 and result["extra_objects"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        detector.detect(blank)  # a batch, not one image


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def _grammar_words() -> set[str]:
    phrases = [*world.SIZES, *world.COLOUR_NAMES, *world.SHAPES, *world.REGIONS, *world.BACKGROUNDS,
               "a and on background"]
    return {w for p in phrases for w in p.split()}


def test_vocabulary_and_shipped_file(tok):
    words = vocabulary()
    assert words[:2] == ["<pad>", "<unk>"] and len(set(words)) == len(words)
    assert set(words[2:]) == _grammar_words()
    assert tok.vocab_size == len(words)
    shipped = json.loads(SHIPPED_TOKENIZER.read_text())
    assert shipped == json.loads(build_tokenizer().to_str()), "run: python -m ditfa_jax.testbed.tokenizer"


def test_tokenizer_round_trip_and_padding(tok, scenes):
    texts = world.captions(scenes[:50])
    ids, mask = tok.encode(texts)
    assert ids.shape == mask.shape == (50, MAX_LENGTH) and ids.dtype == np.int32 and mask.dtype == bool
    lengths = np.array([len(t.split()) for t in texts])
    np.testing.assert_array_equal(mask.sum(1), lengths)
    assert (mask == (np.arange(MAX_LENGTH) < lengths[:, None])).all()  # words first, then padding
    assert (ids[~mask] == 0).all() and (ids[mask] >= 2).all()
    assert tok.decode(ids) == texts
    one_ids, one_mask = tok.encode(texts[0], max_length=40)
    assert one_ids.shape == (1, 40) and one_mask.sum() == lengths[0]
    np.testing.assert_array_equal(one_ids[0, :MAX_LENGTH], ids[0])
    assert tok.decode(one_ids[0]) == [texts[0]]
    upper, _ = tok.encode(texts[0].upper())
    np.testing.assert_array_equal(upper[0], ids[0])


def test_longest_caption_fits(tok):
    regions = sorted(range(len(world.REGIONS)), key=lambda r: -len(world.REGIONS[r].split()))[:world.MAX_OBJECTS]
    n = len(regions)
    longest = world.SceneBatch(shape=[[0] * n], colour=[[0] * n], size=[[0] * n], region=[sorted(regions)],
                               offset=np.zeros((1, n, 2)), background=[0])
    text = world.captions(longest)[0]
    _, mask = tok.encode(text)
    assert mask.sum() == len(text.split()) == 30 and MAX_LENGTH == 32
    # exhaustively over region triples: no caption is longer
    assert max(sum(len(world.REGIONS[r].split()) for r in c)
               for c in itertools.combinations(range(len(world.REGIONS)), world.MAX_OBJECTS)) + 3 * 4 + 2 + 4 == 30


def test_tokenizer_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="'huge'"):
        tok.encode(["a small red circle at the top on a grey background", "a huge red circle on a grey background"])
    ids, _ = tok.encode("a huge red circle on a grey background", allow_unknown=True)
    assert ids[0, 1] == tok.unk_id == 1
    text = "a small red circle at the top on a grey background"
    with pytest.raises(ValueError, match="11 words, more than max_length=8"):
        tok.encode(text, max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(text, max_length=0)
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        WordTokenizer.from_file(missing)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        WordTokenizer.from_file(garbage)
    from tokenizers import Tokenizer, models
    bpe = tmp_path / "bpe.json"
    Tokenizer(models.BPE()).save(str(bpe))
    with pytest.raises(ValueError, match="bpe.json.*WordLevel"):
        WordTokenizer.from_file(bpe)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two images [H, W, C] straight from Wang et al.: a loop over valid 11x11 windows and channels."""
    t = np.arange(11) - 5.0
    g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for c in range(a.shape[2]):
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                x, y = a[i:i + 11, j:j + 11, c], b[i:i + 11, j:j + 11, c]
                mx, my = (w * x).sum(), (w * y).sum()
                vx, vy, cxy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum(), (w * (x - mx) * (y - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_psnr_ssim_identical_and_noisy(images):
    ref = images[:4]
    assert np.isinf(psnr(ref, ref)).all() and psnr(ref, ref).dtype == np.float64
    np.testing.assert_allclose(ssim(ref, ref), 1.0, atol=1e-12)
    noisy = np.clip(ref + np.random.default_rng(3).normal(0, 0.05, ref.shape), 0, 1)
    s = ssim(ref, noisy)
    assert s.shape == (4,) and (s < 0.99).all() and (s > 0).all()
    assert (ssim(ref, np.clip(ref + np.random.default_rng(3).normal(0, 0.2, ref.shape), 0, 1)) < s).all()


def test_psnr_matches_formula():
    rng = np.random.default_rng(4)
    a, b = rng.random((3, 9, 7, 3)), rng.random((3, 9, 7, 3))
    expected = [10 * np.log10(1.0 / np.mean((a[i] - b[i]) ** 2)) for i in range(3)]
    np.testing.assert_allclose(psnr(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(psnr(a * 255, b * 255, max_value=255.0), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="same|one shape"):
        psnr(a, b[:2])


def test_ssim_matches_direct_loop():
    rng = np.random.default_rng(5)
    a = rng.random((2, 16, 19, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    got = ssim(a, b)
    for i in range(2):
        assert abs(got[i] - _ssim_reference(a[i], b[i])) < 1e-6
    with pytest.raises(ValueError, match="11x11"):
        ssim(a[:, :10], b[:, :10])


def test_image_grid_shapes():
    rng = np.random.default_rng(6)
    rows = [rng.random((3, 8, 8, 3)), (rng.random((2, 8, 8, 3)) * 255).astype(np.uint8)]
    grid = image_grid(rows, pad=2, scale=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 + 2 * (16 + 2), 2 + 3 * (16 + 2), 3)
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()  # padding is white
    np.testing.assert_array_equal(grid[2:18:2, 2:18:2], world.to_uint8(rows[0][0]))  # nearest-neighbour upscale
    np.testing.assert_array_equal(grid[20:36, 20:36], rows[1][1].repeat(2, 0).repeat(2, 1))
    labelled = image_grid(rows, labels=["dense", "plan"], pad=1)
    assert labelled.shape[0] == 1 + 2 * (8 + 1) and labelled.shape[1] > 1 + 3 * (8 + 1)
    with pytest.raises(ValueError, match="labels"):
        image_grid(rows, labels=["one"])
    with pytest.raises(ValueError, match="one size"):
        image_grid([rows[0], rng.random((2, 4, 4, 3))])


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def test_save_png_round_trip(images, tmp_path):
    from PIL import Image

    meta = {"caption": world.captions(world.sample_scenes(np.random.default_rng(7), 1))[0], "seed": 7}
    path = save_png(tmp_path / "sample.png", images[0], meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.png"]  # no temp file left behind
    chunks = _png_chunks(path.read_bytes())
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    texts = dict(body.split(b"\0", 1) for kind, body in chunks if kind == b"tEXt")
    assert texts == {b"caption": meta["caption"].encode(), b"seed": b"7"}
    with Image.open(path) as img:
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), world.to_uint8(images[0]))
        assert img.text == {"caption": meta["caption"], "seed": "7"}
    save_png(path, np.zeros((4, 5, 3), np.uint8))  # overwrite in place
    with Image.open(path) as img:
        assert img.size == (5, 4) and not img.text
    with pytest.raises(ValueError, match="one image"):
        save_png(tmp_path / "batch.png", images[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.png"]


def test_relative_squared_error_by_mean_and_median():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.1, 1.0, (5, 8, 8, 3))
    noise = rng.normal(size=ref.shape) * np.array([0.01, 0.02, 0.03, 0.04, 1.0])[:, None, None, None]  # one outlier
    per_image = np.sum(noise ** 2, (1, 2, 3)) / np.sum(ref ** 2, (1, 2, 3))
    assert relative_squared_error(ref + noise, ref) == pytest.approx(per_image.mean(), rel=1e-12)
    assert relative_squared_error(ref + noise, ref, "median") == pytest.approx(np.median(per_image), rel=1e-12)
    assert relative_squared_error(ref + noise, ref, "median") < relative_squared_error(ref + noise, ref) / 10
    with pytest.raises(ValueError, match="reduction 'max'"):
        relative_squared_error(ref, ref, "max")
