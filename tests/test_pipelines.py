"""End-to-end pipelines against diffusers on the tiny folders of tools/make_pipeline_fixtures.py, and bad input."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditfa_jax import load_transformer, sample
from ditfa_jax.cli import main as cli_main
from ditfa_jax.pipelines import FluxPipeline, SD3Pipeline, check_pipeline_folder, load_pipeline
from ditfa_jax.plan import CompressionPlan
from ditfa_jax.sampler import scheduler_for
from ditfa_jax.tokenization import load_tokenizer

PIPES = Path(__file__).parent / "fixtures" / "pipelines"
TOKENIZERS = [("flux_tiny", "tokenizer", "clip", 77, "ids_tokenizer"),
              ("flux_tiny", "tokenizer_2", "t5", 32, "ids_tokenizer_2"),
              ("flux_tiny", "tokenizer_2", "t5", 512, "ids_tokenizer_2_512"),
              ("sd3_tiny", "tokenizer", "clip", 77, "ids_tokenizer"),
              ("sd3_tiny", "tokenizer_2", "clip", 77, "ids_tokenizer_2"),  # pads with "!", a special token
              ("sd3_tiny", "tokenizer_3", "t5", 32, "ids_tokenizer_3")]


def ref(name):
    return np.load(PIPES / name / "reference.npz")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def flux():
    return FluxPipeline.from_pretrained(PIPES / "flux_tiny", progress=False)


@pytest.fixture(scope="module")
def sd3():
    return SD3Pipeline.from_pretrained(PIPES / "sd3_tiny", progress=False)


def copy_of(tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(PIPES / name, dst)
    return dst


# ---- tokenizers (no model needed) ----

@pytest.mark.parametrize("folder,sub,kind,length,key", TOKENIZERS)
def test_tokenizer_ids_equal_transformers(folder, sub, kind, length, key):
    data = ref(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = load_tokenizer(PIPES / folder / sub, kind)(list(data["prompts"]), length)
    np.testing.assert_array_equal(ids, data[key])
    cut = [str(w.message) for w in caught]
    if length < 512:  # prompts[1] is longer than every tokenizer's limit but 512
        assert len(cut) == 1 and "prompt 1" in cut[0] and "token(s) cut" in cut[0]
        assert cut[0].endswith(" ... forest at dawn'") and len(cut[0]) < 200  # the cut's ends, not all of it
    else:
        assert not cut


def test_t5_tokenizer_needs_tokenizer_json(tmp_path):
    folder = tmp_path / "tokenizer_2"
    shutil.copytree(PIPES / "flux_tiny" / "tokenizer_2", folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="spiece.model.*tokenizer.json is required"):
        load_tokenizer(folder, "t5")


# ---- folder checks (before any model is loaded) ----

def test_missing_component_is_named(tmp_path):
    folder = copy_of(tmp_path, "flux_tiny")
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match=r"component 'vae' is missing.*vae/config.json"):
        FluxPipeline.from_pretrained(folder, progress=False)
    folder = copy_of(tmp_path, "sd3_tiny")
    (folder / "tokenizer_3" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_3.*tokenizer.json is required"):
        SD3Pipeline.from_pretrained(folder, progress=False)


def test_partial_downloads(tmp_path):
    folder = copy_of(tmp_path, "flux_tiny")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match="git-lfs pointer"):
        load_pipeline(folder, progress=False)
    folder = copy_of(tmp_path, "sd3_tiny")
    weights = folder / "text_encoder" / "model.safetensors"
    weights.rename(folder / "text_encoder" / "model-00001-of-00002.safetensors")
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_pipeline(folder, progress=False)
    (folder / "text_encoder" / "model.safetensors.index.json").unlink()
    weights.parent.joinpath("model-00001-of-00002.safetensors").rename(weights)
    (folder / "vae" / "diffusion_pytorch_model.safetensors.incomplete").write_bytes(b"")
    with pytest.raises(ValueError, match="unfinished download"):
        load_pipeline(folder, progress=False)


def test_gated_folder_and_wrong_class(tmp_path):
    (tmp_path / "gated").mkdir()
    for name in ("README.md", "LICENSE.md", ".gitattributes"):
        (tmp_path / "gated" / name).write_text("x")
    with pytest.raises(FileNotFoundError, match="gated model"):
        load_pipeline(tmp_path / "gated")
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline.*load it with SD3Pipeline"):
        FluxPipeline.from_pretrained(PIPES / "sd3_tiny", progress=False)


def test_absent_t5_is_allowed_when_model_index_says_so(tmp_path):
    folder = copy_of(tmp_path, "sd3_tiny")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder_3")
    shutil.rmtree(folder / "tokenizer_3")
    assert check_pipeline_folder(folder, SD3Pipeline._components())["text_encoder_3"] == [None, None]


# ---- parity with diffusers ----

def test_flux_prompt_embeddings(flux):
    data = ref("flux_tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flux.encode(list(data["prompts"]), max_sequence_length=int(data["max_sequence_length"]))
    assert rel_err(out["prompt_embeds"], data["prompt_embeds"]) < 1e-4
    assert rel_err(out["pooled_prompt_embeds"], data["pooled_prompt_embeds"]) < 1e-4


def test_sd3_prompt_embeddings_with_negative_and_without_t5(sd3):
    data = ref("sd3_tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sd3.encode(list(data["prompts"]), str(data["negative_prompt"]),
                         max_sequence_length=int(data["max_sequence_length"]), guidance_scale=7.0)
        no_t5 = SD3Pipeline.from_pretrained(PIPES / "sd3_tiny", text_encoder_3=None, progress=False)
        plain = no_t5.encode(list(data["prompts"]), max_sequence_length=int(data["max_sequence_length"]),
                             guidance_scale=1.0)
    for key in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"):
        assert rel_err(out[key], data[key]) < 1e-4, key
    assert rel_err(plain["prompt_embeds"], data["no_t5_prompt_embeds"]) < 1e-4
    assert set(plain) == {"prompt_embeds", "pooled_prompt_embeds"}


@pytest.mark.parametrize("name", ["flux_tiny", "sd3_tiny"])
def test_scan_from_the_pipelines_embeddings_matches_diffusers(name):
    """The denoising half alone (diffusers' own prompt embeddings), so it holds whatever the text encoders do."""
    data = ref(name)
    model = load_transformer(PIPES / name / "transformer", progress=False)
    negative = {k: data[f"run_{k}"] for k in ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
                if f"run_{k}" in data}
    final = sample(model, data["noise"], data["run_prompt_embeds"], data["run_pooled_prompt_embeds"],
                   height=int(data["run_height"]), width=int(data["run_width"]), num_steps=int(data["run_steps"]),
                   guidance_scale=float(data["run_guidance_scale"]), scheduler=scheduler_for(PIPES / name, model),
                   **negative)
    assert rel_err(final, data["run_latents"]) < 1e-4


@pytest.mark.parametrize("name", ["flux_tiny", "sd3_tiny"])
def test_latents_and_images_match_diffusers(name, flux, sd3):
    pipe, data = (flux if name == "flux_tiny" else sd3), ref(name)
    kwargs = dict(height=int(data["run_height"]), width=int(data["run_width"]),
                  num_inference_steps=int(data["run_steps"]), guidance_scale=float(data["run_guidance_scale"]),
                  max_sequence_length=int(data["max_sequence_length"]), latents=data["noise"])
    if name == "sd3_tiny":
        kwargs["negative_prompt"] = str(data["negative_prompt"])
    prompts = list(data["run_prompts"])
    latents = pipe(prompts, output_type="latent", **kwargs)
    assert rel_err(latents, data["run_latents"]) < 1e-4
    images = pipe(prompts, output_type="np", **kwargs)
    assert images.shape == data["run_images"].shape
    np.testing.assert_allclose(images, data["run_images"], atol=2e-4)


def test_seeded_noise_is_deterministic_and_per_image(flux):
    kwargs = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="np")
    a = flux(["a red fox", "a blue bird"], seed=7, **kwargs)
    b = flux(["a red fox", "a blue bird"], seed=7, **kwargs)
    np.testing.assert_array_equal(a, b)
    alone = flux("a red fox", seed=7, **kwargs)
    np.testing.assert_allclose(alone[0], a[0], atol=1e-5)  # image 0 does not depend on the rest of the batch
    two = flux("a red fox", seed=7, num_images=2, **kwargs)
    assert np.abs(two[0] - two[1]).max() > 1e-3
    assert isinstance(flux("a red fox", height=64, width=64, num_inference_steps=1, max_sequence_length=16)[0],
                      Image.Image)


def test_bad_requests(flux, sd3):
    with pytest.raises(ValueError, match="multiple of 16"):
        flux("a", height=72, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="multiple of 16"):
        sd3("a", height=64, width=40, num_inference_steps=1)
    with pytest.raises(ValueError, match="seed is a list of 3 seeds but 2 prompt"):
        flux(["a", "b"], seed=[1, 2, 3], height=64, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but prompt has 2"):
        sd3(["a", "b"], negative_prompt=["c"], height=64, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="num_images"):
        flux("a", num_images=0, height=64, width=64)
    with pytest.raises(ValueError, match="no negative prompt"):
        flux("a", negative_prompt="b", height=64, width=64)


def test_plan_for_other_settings_is_refused(flux):
    plan = CompressionPlan.full(flux.config, height=64, width=64, text_len=16, num_steps=2)
    with pytest.raises(ValueError, match="num_steps: plan has 2, requested 3"):
        flux("a", height=64, width=64, num_inference_steps=3, max_sequence_length=16, plan=plan)
    dense = flux("a", height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="latent")
    full = flux("a", height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="latent",
                plan=plan)
    np.testing.assert_array_equal(dense, full)


# ---- CLI ----

def test_cli_generate_writes_pngs_with_metadata_and_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "imgs"
    args = ["generate", str(PIPES / "sd3_tiny"), "--prompt", "a red fox", "--prompt", "a bird", "--num-images", "2",
            "--negative-prompt", "blurry", "--steps", "2", "--seed", "3", "--max-sequence-length", "16",
            "--out", str(out)]
    assert cli_main(args) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"image_{k:03d}.png" for k in range(4)]
    meta = Image.open(out / "image_002.png").text
    assert meta["prompt"] == "a bird" and meta["negative_prompt"] == "blurry" and meta["seed"] == "3"
    assert meta["steps"] == "2" and meta["pipeline"] == "SD3Pipeline" and "sd3_tiny" in meta["model"]
    assert json.loads(meta["parameters"])["fp8"] is None  # bf16/fp32 linears unless --fp8 (tests/test_fp8.py)
    before = (out / "image_000.png").read_bytes()
    assert cli_main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "image_000.png").read_bytes() == before


def test_cli_generate_plan_mismatch_writes_nothing(tmp_path, flux, capsys):
    plan = CompressionPlan.full(flux.config, height=64, width=64, text_len=16, num_steps=2).save(tmp_path / "p.json")
    out = tmp_path / "imgs"
    assert cli_main(["generate", str(PIPES / "flux_tiny"), "--prompt", "a", "--height", "64", "--width", "64",
                     "--steps", "3", "--max-sequence-length", "16", "--plan", str(plan), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--steps 3 conflicts with the plan" in err and "made for 2" in err
    assert not out.exists() or not any(out.iterdir())
