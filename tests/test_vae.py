"""AutoencoderKL (SD3 / FLUX VAE): parity with diffusers (fp32), bf16 decode, pipeline scaling, clear errors.

The fixtures (tiny random VAEs in the real `vae/` layout + diffusers references, NHWC) come from
`tools/make_vae_fixtures.py`; see tests/fixtures/vae/README.md.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import ConversionError
from convert.vae import WEIGHTS_NAME, load_vae
from ditfa_jax.models.vae import single_head_attention

FIXTURES = Path(__file__).parent / "fixtures" / "vae"
VARIANTS = ["flux", "sd3_no_mid_attention", "quant_conv"]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    name = request.param
    return name, load_vae(FIXTURES / name), dict(np.load(FIXTURES / name / "reference.npz"))


def test_encode_matches_diffusers(variant):
    _, vae, ref = variant
    mean, logvar = vae.encode(ref["images"])
    assert mean.shape == logvar.shape == ref["mean"].shape
    assert rel_err(mean, ref["mean"]) <= 1e-4
    assert rel_err(logvar, ref["logvar"]) <= 1e-4


def test_decode_matches_diffusers(variant):
    _, vae, ref = variant
    images = vae.decode(ref["latents"])
    assert images.shape == ref["decoded"].shape == (*ref["images"].shape[:3], 3)
    assert rel_err(images, ref["decoded"]) <= 1e-4


def test_bf16_decode_is_finite_and_close(variant):
    name, _, ref = variant
    vae = load_vae(FIXTURES / name, dtype=jnp.bfloat16)
    images = vae.decode(ref["latents"])
    assert images.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(images)))
    assert rel_err(images.astype(jnp.float32), ref["decoded"]) < 3e-2


def test_scaling_matches_diffusers_pipelines(variant):
    _, vae, ref = variant
    np.testing.assert_allclose(vae.latents_to_model(ref["mean"]), ref["model_latents"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vae.latents_from_model(ref["latents"]), ref["vae_latents"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vae.latents_from_model(vae.latents_to_model(ref["latents"])), ref["latents"],
                               rtol=1e-5, atol=1e-5)


def test_config_is_read_from_the_folder():
    flux = load_vae(FIXTURES / "flux").config
    assert (flux.latent_channels, flux.use_quant_conv, flux.use_post_quant_conv) == (16, False, False)
    assert (flux.scaling_factor, flux.shift_factor, flux.downsample_factor) == (0.3611, 0.1159, 8)
    classic = load_vae(FIXTURES / "quant_conv").config
    assert classic.use_quant_conv and classic.use_post_quant_conv and classic.shift_factor is None
    assert not load_vae(FIXTURES / "sd3_no_mid_attention").config.mid_block_add_attention


def test_pipeline_folder_is_accepted(tmp_path):
    shutil.copytree(FIXTURES / "quant_conv", tmp_path / "vae")
    assert load_vae(tmp_path).config == load_vae(FIXTURES / "quant_conv").config


def test_chunked_attention_equals_one_shot():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 100, 1, 8))
    one_shot = single_head_attention(q, k, v, query_chunk=100)
    chunked = single_head_attention(q, k, v, query_chunk=32)  # 4 chunks, the last one padded
    np.testing.assert_allclose(chunked, one_shot, rtol=1e-6, atol=1e-6)


# --- bad inputs -------------------------------------------------------------------------------------------------


@pytest.fixture
def vae_copy(tmp_path):
    dst = tmp_path / "vae"
    shutil.copytree(FIXTURES / "flux", dst)
    return dst


def edit_weights(folder: Path, edit):
    tensors = load_file(str(folder / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS_NAME))


def test_missing_weights_file(vae_copy):
    (vae_copy / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        load_vae(vae_copy)


def test_not_a_vae_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no VAE here"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ValueError, match="expected 'AutoencoderKL'"):
        load_vae(tmp_path)


def test_missing_key(vae_copy):
    edit_weights(vae_copy, lambda t: t.pop("decoder.mid_block.attentions.0.to_out.0.weight"))
    with pytest.raises(ConversionError, match=r"missing.*decoder\.mid_block\.attentions\.0\.to_out\.0\.weight"):
        load_vae(vae_copy)


def test_unexpected_key(vae_copy):
    edit_weights(vae_copy, lambda t: t.update({"encoder.down_blocks.9.resnets.0.conv1.weight": np.ones((2, 2))}))
    with pytest.raises(ConversionError, match=r"does not have.*encoder\.down_blocks\.9\.resnets\.0\.conv1\.weight"):
        load_vae(vae_copy)


def test_wrong_shape(vae_copy):
    edit_weights(vae_copy, lambda t: t.update({"encoder.conv_in.weight": np.ones((16, 4, 3, 3), np.float32)}))
    with pytest.raises(ConversionError, match=r"diffusion_pytorch_model\.safetensors: tensor 'encoder\.conv_in\."
                                              r"weight' has shape \(16, 4, 3, 3\); .*config\.json expects "
                                              r"\(16, 3, 3, 3\)"):
        load_vae(vae_copy)


def test_bad_image_and_latent_shapes():
    vae = load_vae(FIXTURES / "flux")
    images = jax.random.uniform(jax.random.key(1), (1, 60, 48, 3), minval=-1, maxval=1)
    with pytest.raises(ValueError, match="multiples of 8.*60x48"):
        vae.encode(images)
    with pytest.raises(ValueError, match="looks NCHW"):
        vae.encode(jnp.transpose(images[:, :48], (0, 3, 1, 2)))
    with pytest.raises(ValueError, match="NHWC"):
        vae.encode(images[0])
    latents = jax.random.normal(jax.random.key(2), (1, 8, 6, 4))
    with pytest.raises(ValueError, match="16 channels.*\\(1, 8, 6, 4\\)"):
        vae.decode(latents)
