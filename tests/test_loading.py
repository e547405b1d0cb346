"""Checkpoint loading: layouts, converted-params round trip, and clear errors for bad input."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert import ConversionError
from ditfa_jax import load_transformer, sample, save_converted
from ditfa_jax.cli import main as cli_main

FIXTURES = Path(__file__).parent / "fixtures"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def params(model):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(model.state)}


@pytest.fixture
def sd3_copy(tmp_path):
    dst = tmp_path / "sd3"
    shutil.copytree(FIXTURES / "sd3", dst)
    return dst


def rewrite_weights(folder: Path, edit):
    path = folder / "transformer" / WEIGHTS
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_pipeline_folder_transformer_folder_and_sharded_load_alike():
    a = load_transformer(FIXTURES / "sd3", progress=False)
    b = load_transformer(FIXTURES / "sd3" / "transformer", progress=False)
    assert a.config == b.config
    for key, value in params(a).items():
        np.testing.assert_array_equal(value, params(b)[key])
    sharded = load_transformer(FIXTURES / "flux_schnell", progress=False)
    assert sharded.config.num_layers == 2 and not sharded.config.guidance_embeds


def test_dtype_is_kept_or_cast():
    assert load_transformer(FIXTURES / "sd3", progress=False).dtype == jnp.float32
    bf16 = load_transformer(FIXTURES / "sd3", dtype=jnp.bfloat16, progress=False)
    leaves = params(bf16)
    assert leaves[("context_embedder", "kernel")].dtype == jnp.bfloat16
    assert leaves[("pos_embed", "pos_embed")].dtype == np.float32  # the position table stays fp32


def test_converted_params_round_trip(tmp_path):
    model = load_transformer(FIXTURES / "sd35_medium", progress=False)
    out = save_converted(model, tmp_path / "converted")
    reloaded = load_transformer(out)
    assert reloaded.config == model.config
    for key, value in params(model).items():
        np.testing.assert_array_equal(value, params(reloaded)[key])
    with pytest.raises(FileExistsError):
        save_converted(model, out)


def test_cli_convert_writes_nothing_on_failure(tmp_path, sd3_copy, capsys):
    rewrite_weights(sd3_copy, lambda t: t.pop("proj_out.bias"))
    out = tmp_path / "out"
    assert cli_main(["convert", str(sd3_copy), str(out)]) == 2
    assert "proj_out.bias" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["sd3"]
    assert cli_main(["convert", str(FIXTURES / "sd3"), str(out)]) == 0
    assert (out / "params.safetensors").is_file()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        load_transformer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_transformer(tmp_path / "missing")


def test_missing_key_is_named(sd3_copy):
    rewrite_weights(sd3_copy, lambda t: t.pop("transformer_blocks.1.attn.to_k.weight"))
    with pytest.raises(ConversionError, match=r"missing.*transformer_blocks\.1\.attn\.to_k\.weight"):
        load_transformer(sd3_copy, progress=False)


def test_extra_key_is_named(sd3_copy):
    rewrite_weights(sd3_copy, lambda t: t.__setitem__("transformer_blocks.0.attn.bogus.weight",
                                                      np.ones((2, 2), np.float32)))
    with pytest.raises(ConversionError, match=r"does not use.*bogus"):
        load_transformer(sd3_copy, progress=False)


def test_extra_layer_is_named(sd3_copy):
    def add_layer(t):
        t["transformer_blocks.7.ff.net.2.bias"] = np.ones((32,), np.float32)
    rewrite_weights(sd3_copy, add_layer)
    with pytest.raises(ConversionError, match=r"transformer_blocks\.7\.ff\.net\.2\.bias"):
        load_transformer(sd3_copy, progress=False)


def test_wrong_shape_is_named(sd3_copy):
    def shrink(t):
        t["context_embedder.weight"] = t["context_embedder.weight"][:, :16].copy()
    rewrite_weights(sd3_copy, shrink)
    with pytest.raises(ConversionError, match=r"context_embedder\.weight.*\(32, 16\).*\(32, 32\)"):
        load_transformer(sd3_copy, progress=False)


def test_unknown_model_type(sd3_copy):
    cfg_path = sd3_copy / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown model type.*UNet2DConditionModel"):
        load_transformer(sd3_copy, progress=False)


def test_missing_shard_is_named(tmp_path):
    dst = tmp_path / "schnell"
    shutil.copytree(FIXTURES / "flux_schnell", dst)
    (dst / "transformer" / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00003.*partial download"):
        load_transformer(dst, progress=False)


@pytest.fixture(scope="module")
def flux_model():
    return load_transformer(FIXTURES / "flux_dev", progress=False)


@pytest.fixture(scope="module")
def sd3_model():
    return load_transformer(FIXTURES / "sd3", progress=False)


def test_resolution_must_be_multiple_of_16(flux_model, sd3_model):
    lat = np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32)
    text, pooled = np.ones((1, 5, 32), np.float32), np.ones((1, 24), np.float32)
    with pytest.raises(ValueError, match="height: flux .* multiple of 16 pixels, got 72"):
        sample(flux_model, lat, text, pooled, height=72, width=64, num_steps=2, guidance_scale=3.5)
    with pytest.raises(ValueError, match=r"width: sd3 .* multiple of 16 pixels, got 40"):
        sample(sd3_model, np.ones((1, 4, 8, 5), np.float32), text, pooled, height=64, width=40, num_steps=2,
               guidance_scale=1.0)


def test_latent_shape_must_match_resolution(flux_model):
    text, pooled = np.ones((1, 5, 32), np.float32), np.ones((1, 24), np.float32)
    with pytest.raises(ValueError, match=r"packed \[B, 16, 16\]"):
        sample(flux_model, np.ones((1, 12, 16), np.float32), text, pooled, height=64, width=64, num_steps=2,
               guidance_scale=3.5)


def test_batch_mismatch_is_named(flux_model, sd3_model):
    lat = np.ones((2, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"batch mismatch.*prompt_embeds has shape \(3, 5, 32\)"):
        sample(flux_model, lat, np.ones((3, 5, 32), np.float32), np.ones((2, 24), np.float32), height=64, width=64,
               num_steps=2, guidance_scale=3.5)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        sample(sd3_model, np.ones((1, 4, 8, 8), np.float32), np.ones((1, 5, 32), np.float32),
               np.ones((1, 24), np.float32), height=64, width=64, num_steps=2, guidance_scale=7.0)
    with pytest.raises(ValueError, match="batch mismatch"):
        flux_model(lat, np.ones((1, 5, 32), np.float32), np.ones((2, 24), np.float32), np.ones(2),
                   img_ids=np.zeros((16, 3)), txt_ids=np.zeros((5, 3)), guidance=np.ones(2))


def test_cli_sample_runs_and_writes_latents(tmp_path, capsys):
    out = tmp_path / "latents.npy"
    assert cli_main(["sample", str(FIXTURES / "sd35_medium"), "--steps", "2", "--height", "64", "--width", "64",
                     "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "SD3Config" and np.load(out).shape == (1, 4, 8, 8)
    assert np.isfinite(np.load(out)).all()


def test_conversion_streams_tensors_within_twice_the_checkpoint_size():
    """Host allocations while converting stay under 2x the checkpoint (one tensor at a time into final buffers).

    tracemalloc sees numpy/Python allocations; the converted arrays handed to JAX afterwards are not counted.
    """
    import os
    import tracemalloc

    from convert.checkpoint import checkpoint_files

    folder = FIXTURES / "sd35_medium"
    size = sum(os.path.getsize(f) for f in checkpoint_files(folder / "transformer"))
    load_transformer(folder, progress=False)  # imports and traces out of the measurement
    tracemalloc.start()
    try:
        load_transformer(folder, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * size, (peak, size)


def test_checkpoint_files_prefer_canonical_names_and_refuse_lfs_pointers(tmp_path):
    """A folder with precision variants beside the canonical weights reads the canonical ones; a git-lfs pointer
    (a clone without git-lfs) is refused by every loader, not only by the pipeline's folder check."""
    from convert.checkpoint import checkpoint_files
    from convert.vae import load_vae

    vae = tmp_path / "vae"
    shutil.copytree(FIXTURES / "vae" / "flux", vae)
    shutil.copyfile(vae / "diffusion_pytorch_model.safetensors", vae / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(ValueError, match="several safetensors files"):
        checkpoint_files(vae)  # without a prefix the variants are ambiguous
    assert checkpoint_files(vae, prefix="diffusion_pytorch_model") == [vae / "diffusion_pytorch_model.safetensors"]
    assert load_vae(vae).config.latent_channels == 16
    (vae / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match="git-lfs pointer file"):
        load_vae(vae)



def test_model_programs_compile_with_the_measured_xla_options(flux_model, monkeypatch):
    """The sampler's and the forward's programs carry `MODEL_COMPILER_OPTIONS` (Triton GEMM fusions off), which
    the CPU compiler accepts; the user's own jitted code keeps XLA's defaults."""
    import jax

    from ditfa_jax import sampler
    from ditfa_jax.xla_options import MODEL_COMPILER_OPTIONS

    def options(lowered):
        return lowered._lowering._compiler_options_kvs  # private: jax 0.11.2 has no public accessor

    assert MODEL_COMPILER_OPTIONS == {"xla_gpu_enable_triton_gemm": False}
    expected = tuple(MODEL_COMPILER_OPTIONS.items())
    lat = np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32)
    text, pooled = np.ones((1, 5, 32), np.float32), np.ones((1, 24), np.float32)
    seen, real_run = [], sampler._run

    class RecordingRun:
        def lower(self, *args, **kwargs):
            lowered = real_run.lower(*args, **kwargs)
            seen.append(options(lowered))
            return lowered

    monkeypatch.setattr(sampler, "_run", RecordingRun())
    sample(flux_model, lat, text, pooled, height=64, width=64, num_steps=2, guidance_scale=3.5, memory=True)
    assert seen == [expected]
    forward_args = {}
    model = load_transformer(FIXTURES / "flux_dev", progress=False)
    real_apply = model._apply
    model.__dict__["_apply"] = lambda state, kwargs: forward_args.update(state=state, kwargs=kwargs)
    model(lat, text, pooled, np.ones(1), img_ids=np.zeros((16, 3)), txt_ids=np.zeros((5, 3)), guidance=np.ones(1))
    assert options(real_apply.lower(forward_args["state"], forward_args["kwargs"])) == expected
    assert options(jax.jit(lambda x: x + 1).lower(1.0)) == ()
