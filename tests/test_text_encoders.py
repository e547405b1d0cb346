"""CLIP and T5 text encoders: parity with transformers (fp32) on tiny random checkpoints, bf16, and bad folders.

Fixtures come from `tools/make_text_encoder_fixtures.py`; see tests/fixtures/text_encoders/README.md.
"""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.clip import load_clip
from convert.diffusers_to_jax import ConversionError
from convert.t5 import load_t5
from ditfa_jax.models.clip import CLIPTextConfig
from ditfa_jax.models.t5 import T5Config, relative_position_buckets

FIXTURES = Path(__file__).parent / "fixtures" / "text_encoders"
CLIP_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state", "pooled", "text_embeds")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def reference(name):
    return dict(np.load(FIXTURES / name / "reference.npz"))


def copy_component(name, tmp_path):
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_tensors(path, edit):
    """Rewrite one safetensors file with `edit(dict of tensors)` applied."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def clip_models():
    return {name: load_clip(FIXTURES / name) for name in ("clip_l", "clip_g")}


@pytest.fixture(scope="module")
def t5_model():
    return load_t5(FIXTURES / "t5")


@pytest.mark.parametrize("name", ["clip_l", "clip_g"])
def test_clip_matches_transformers(clip_models, name):
    ref = reference(name)
    out = clip_models[name](ref["input_ids"])
    for field in CLIP_OUTPUTS:
        got = getattr(out, field)
        if field not in ref:
            assert got is None, f"{name}: {field} should be None (no projection)"
            continue
        assert got.shape == ref[field].shape, field
        assert rel_err(got, ref[field]) <= 1e-4, field


def test_clip_pooling_rules(clip_models):
    # clip_l: legacy eos_token_id 2 -> largest id (EOS 999, padded with EOS: the first one);
    # clip_g: first position equal to eos_token_id 997, although each row holds a larger id (999) before it.
    np.testing.assert_array_equal(clip_models["clip_l"].eos_positions(reference("clip_l")["input_ids"]), [5, 11, 15])
    np.testing.assert_array_equal(clip_models["clip_g"].eos_positions(reference("clip_g")["input_ids"]), [4, 9, 15])


def test_t5_matches_transformers(t5_model):
    ref = reference("t5")
    out = t5_model(ref["input_ids"])
    assert out.shape == ref["last_hidden_state"].shape
    assert rel_err(out, ref["last_hidden_state"]) <= 1e-4


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 20)])
def test_t5_relative_position_buckets_match_transformers(buckets, distance):
    ref = reference("t5")
    span = (len(ref["relative_positions"]) - 1) // 2
    table = relative_position_buckets(span + 1, buckets, distance)  # row 0: key - query = 0..span; last: -span..0
    np.testing.assert_array_equal(np.concatenate([table[-1, :-1], table[0]]), ref[f"buckets_{buckets}_{distance}"])


def test_t5_bf16_is_finite_and_close():
    # On this fixture transformers' own bf16 forward is 2.3% off its fp32 one (bf16 weight rounding alone: 1.6%).
    ref = reference("t5")
    out = load_t5(FIXTURES / "t5", dtype=jnp.bfloat16)(ref["input_ids"])
    assert out.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert rel_err(out, ref["last_hidden_state"]) < 3e-2


def test_clip_bf16_is_finite_and_close():
    ref = reference("clip_g")
    out = load_clip(FIXTURES / "clip_g", dtype=jnp.bfloat16)(ref["input_ids"])
    for field in CLIP_OUTPUTS:
        got = np.asarray(getattr(out, field), np.float32)
        assert np.all(np.isfinite(got)), field
        assert rel_err(got, ref[field]) < 3e-2, field


def test_clip_keys_without_text_model_prefix(tmp_path, clip_models):
    """transformers 5 saves a plain CLIPTextModel without `text_model.` (and without the position_ids buffer)."""
    folder = copy_component("clip_l", tmp_path)

    def strip(tensors):
        del tensors["text_model.embeddings.position_ids"]
        for key in list(tensors):
            tensors[key.removeprefix("text_model.")] = tensors.pop(key)

    edit_tensors(folder / "model.safetensors", strip)
    ids = reference("clip_l")["input_ids"]
    np.testing.assert_array_equal(load_clip(folder)(ids).pooled, clip_models["clip_l"](ids).pooled)


def rewrite_t5_embedding(folder, edit):
    """Apply `edit` to the shard holding shared.weight and keep the index's weight_map in step."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["shared.weight"]
    edit_tensors(folder / shard, edit)
    keys = load_file(folder / shard).keys()
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard} | {k: shard for k in keys}
    index_path.write_text(json.dumps(index))


def test_t5_tied_embedding_copies(tmp_path, t5_model):
    ids = reference("t5")["input_ids"]
    expected = t5_model(ids)
    both = copy_component("t5", tmp_path / "both")
    rewrite_t5_embedding(both, lambda t: t.update({"encoder.embed_tokens.weight": t["shared.weight"].copy()}))
    np.testing.assert_array_equal(load_t5(both)(ids), expected)

    only_encoder = copy_component("t5", tmp_path / "only_encoder")
    rewrite_t5_embedding(only_encoder, lambda t: t.update({"encoder.embed_tokens.weight": t.pop("shared.weight")}))
    np.testing.assert_array_equal(load_t5(only_encoder)(ids), expected)

    differ = copy_component("t5", tmp_path / "differ")
    rewrite_t5_embedding(differ, lambda t: t.update({"encoder.embed_tokens.weight": t["shared.weight"] + 1}))
    with pytest.raises(ConversionError, match="tied tensors 'encoder.embed_tokens.weight' and 'shared.weight'"):
        load_t5(differ)


def test_t5_loading_streams_tensors_within_twice_the_checkpoint_size():
    """Host allocations while loading stay under 2x the checkpoint (one tensor at a time into final buffers).

    tracemalloc sees numpy/Python allocations; the arrays handed to JAX afterwards are not counted.
    """
    import os
    import tracemalloc

    from convert.checkpoint import checkpoint_files

    size = sum(os.path.getsize(f) for f in checkpoint_files(FIXTURES / "t5"))
    load_t5(FIXTURES / "t5")  # imports and traces out of the measurement
    tracemalloc.start()
    try:
        load_t5(FIXTURES / "t5")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * size, (peak, size)


# ---- bad folders: each error names the file, key or field, and what was expected ----

def test_missing_weights_file(tmp_path):
    folder = copy_component("clip_g", tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder}.*no \\*.safetensors weights"):
        load_clip(folder)


def test_missing_shard(tmp_path):
    folder = copy_component("t5", tmp_path)
    (folder / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json lists shards.*model-00002-of-00004"):
        load_t5(folder)


def test_missing_config(tmp_path):
    folder = copy_component("t5", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"no config.json at {folder / 'config.json'}"):
        load_t5(folder)


def test_missing_key(tmp_path):
    folder = copy_component("clip_l", tmp_path)
    edit_tensors(folder / "model.safetensors", lambda t: t.pop("text_model.encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(ConversionError, match=r"model.safetensors: 1 tensor\(s\) missing.*"
                                              r"'text_model.encoder.layers.1.mlp.fc2.bias'"):
        load_clip(folder)


def test_missing_projection(tmp_path):
    folder = copy_component("clip_g", tmp_path)
    edit_tensors(folder / "model.safetensors", lambda t: t.pop("text_projection.weight"))
    with pytest.raises(ConversionError, match="missing.*'text_projection.weight'"):
        load_clip(folder)


def test_unexpected_key(tmp_path):
    folder = copy_component("clip_l", tmp_path)
    extra = "text_model.encoder.layers.3.mlp.fc1.bias"  # a fourth layer the config does not have
    edit_tensors(folder / "model.safetensors", lambda t: t.update({extra: np.ones(192, np.float32)}))
    with pytest.raises(ConversionError, match=f"model.safetensors: 1 tensor\\(s\\) that the model in "
                                              f".*config.json does not use.*'{extra}'"):
        load_clip(folder)


def test_wrong_shape(tmp_path):
    folder = copy_component("t5", tmp_path)
    key = "encoder.block.1.layer.0.SelfAttention.k.weight"
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
    edit_tensors(folder / shard, lambda t: t.update({key: t[key][:, :60].copy()}))
    with pytest.raises(ConversionError, match=f"{shard}.*tensor '{key}' has shape \\(64, 60\\); .*config.json "
                                              "expects \\(64, 64\\)"):
        load_t5(folder)


def test_wrong_component_folder():
    with pytest.raises(ValueError, match="clip_l/config.json: expected a T5 encoder config \\(model_type 't5'\\), got "
                                         "model_type='clip_text_model'"):
        load_t5(FIXTURES / "clip_l")
    with pytest.raises(ValueError, match="t5/config.json: expected a CLIP text encoder config.*model_type='t5'"):
        load_clip(FIXTURES / "t5")


def test_config_errors():
    clip = json.loads((FIXTURES / "clip_g" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"cfg.json: missing required field\(s\) \['projection_dim'\]"):
        CLIPTextConfig.from_dict({k: v for k, v in clip.items() if k != "projection_dim"}, source="cfg.json")
    with pytest.raises(ValueError, match="'architectures' must name one of"):
        CLIPTextConfig.from_dict({**clip, "architectures": ["CLIPVisionModel"]})
    with pytest.raises(ValueError, match="hidden_act='swiglu' is not supported"):
        CLIPTextConfig.from_dict({**clip, "hidden_act": "swiglu"})
    t5 = json.loads((FIXTURES / "t5" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['d_kv'\]"):
        T5Config.from_dict({k: v for k, v in t5.items() if k != "d_kv"})
    with pytest.raises(ValueError, match="feed_forward_proj='relu' is not supported"):
        T5Config.from_dict({**t5, "feed_forward_proj": "relu", "dense_act_fn": "relu"})
    with pytest.raises(ValueError, match="dense_act_fn='gelu' contradicts feed_forward_proj='gated-gelu'"):
        T5Config.from_dict({**t5, "dense_act_fn": "gelu"})


def test_bad_inputs(clip_models, t5_model):
    with pytest.raises(ValueError, match="has 24 positions"):
        clip_models["clip_l"](np.ones((1, 25), np.int32))
    with pytest.raises(ValueError, match="must be \\[batch, length\\]"):
        t5_model(np.ones(7, np.int32))
