"""Hugging Face repo ids: loaded offline from a fake cache in the hub's real layout (tools/make_hub_fixture.py) through
the API and the CLI; the hub's failures (gated, unknown repo or revision, partial download, no extra) through a
stubbed hub client; the files each component fetches."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import numpy as np
import pytest
from flax import nnx
from huggingface_hub import constants
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects, hf_raise_for_status

import ditfa_jax.hub as hub
from ditfa_jax import load_transformer
from ditfa_jax.cli import main as cli_main
from ditfa_jax.configs import FluxConfig, SD3Config
from ditfa_jax.hub import HubError
from ditfa_jax.loading import transformer_config
from ditfa_jax.pipelines import FluxPipeline, SD3Pipeline, load_pipeline, vae_scale_factor_of
from ditfa_jax.sampler import scheduler_for
from ditfa_jax.testbed.pipeline import SHIPPED_CHECKPOINT, TestbedPipeline
from tools.make_hub_fixture import TINY_REPOS, make_hub_cache

ROOT = Path(__file__).resolve().parents[1]
FLUX_TINY = ROOT / "tests/fixtures/pipelines/flux_tiny"
FLUX, SD3, TESTBED = "ditfa-test/flux-tiny", "ditfa-test/sd3-tiny", "ditfa-test/testbed"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The two tiny pipelines as cached repos; flux-tiny's `sd3` branch holds the SD3 folder (a second revision);
    a partial download; the testbed (1 pixel per latent cell) with a scheduler shift of its own."""
    root = tmp_path_factory.mktemp("hf_cache")
    for repo_id, folder in TINY_REPOS.items():
        make_hub_cache(root, repo_id, folder)
    make_hub_cache(root, FLUX, TINY_REPOS[SD3], revisions=("sd3",))
    make_hub_cache(root, "ditfa-test/flux-partial", FLUX_TINY, skip=("vae/diffusion_pytorch_model.safetensors",))
    testbed = shutil.copytree(SHIPPED_CHECKPOINT, tmp_path_factory.mktemp("testbed") / "checkpoint")
    scheduler = testbed / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "shift": 2.5}))
    make_hub_cache(root, TESTBED, testbed)
    return root


@pytest.fixture
def offline(cache, monkeypatch):
    """HF_HUB_OFFLINE=1 with the cache at the fixture's, for this process (huggingface_hub read its environment at
    import, so its constants are set too) and for subprocesses."""
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(cache)), ("HF_HOME", str(cache.parent))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def params(model):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(model.state)}


# ---- loading by repo id, offline, from the cache -------------------------------------------------------------


def test_pipeline_and_transformer_load_by_repo_id(offline):
    pipe = FluxPipeline.from_pretrained(FLUX, progress=False)
    assert pipe.folder.is_relative_to(offline / "models--ditfa-test--flux-tiny" / "snapshots")
    local = FluxPipeline.from_pretrained(FLUX_TINY, progress=False)
    for key, value in params(local.transformer).items():
        np.testing.assert_array_equal(params(pipe.transformer)[key], value)
    assert isinstance(load_pipeline(SD3, progress=False), SD3Pipeline)
    assert load_transformer(FLUX, progress=False).config == local.config


def test_revision_as_argument_or_in_the_id(offline):
    assert isinstance(transformer_config(FLUX), FluxConfig)
    assert isinstance(transformer_config(FLUX, revision="sd3"), SD3Config)
    assert isinstance(transformer_config(f"{FLUX}@sd3"), SD3Config)
    with pytest.raises(ValueError, match="differ"):
        transformer_config(f"{FLUX}@sd3", revision="main")
    with pytest.raises(HubError, match=r"ditfa-test/flux-tiny@v9 is not in the local Hugging Face cache"):
        transformer_config(FLUX, revision="v9")


def test_offline_cache_miss_says_what_to_do(offline):
    with pytest.raises(HubError) as err:
        load_pipeline("ditfa-test/never-downloaded")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message and str(offline) in message
    assert "HF_HUB_OFFLINE" in message and "no local folder ditfa-test/never-downloaded" in message


def test_partial_snapshot_names_the_missing_file(offline):
    with pytest.raises(HubError) as err:
        FluxPipeline.from_pretrained("ditfa-test/flux-partial", progress=False)
    message = str(err.value)
    assert "is incomplete: vae: no *.safetensors" in message
    assert "expected diffusion_pytorch_model.safetensors" in message
    assert "unset HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("text", ["no/such/folder", "no_such_folder", "./rel/x"])
def test_neither_a_folder_nor_a_repo_id_keeps_the_folder_error(offline, text):
    with pytest.raises(FileNotFoundError, match="no such folder") as err:
        FluxPipeline.from_pretrained(text)
    assert not isinstance(err.value, HubError)


def test_a_local_folder_wins_over_a_repo_id_of_the_same_name(offline, tmp_path, monkeypatch):
    (tmp_path / "ditfa-test").mkdir()
    (tmp_path / "ditfa-test" / "flux-tiny").symlink_to(FLUX_TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: pytest.fail("went to the hub"))
    assert hub.resolve(FLUX) == Path(FLUX)
    assert isinstance(transformer_config(FLUX), FluxConfig)


def test_scheduler_and_vae_scale_are_read_from_the_repo(offline):
    pipe = TestbedPipeline.from_pretrained(TESTBED)
    assert pipe.folder.is_relative_to(offline)
    assert scheduler_for(TESTBED, pipe.transformer).shift == 2.5  # the repo's, not the family default (1.0)
    assert vae_scale_factor_of(TESTBED) == 1 and vae_scale_factor_of(FLUX) == 8


# ---- the CLI, offline ----------------------------------------------------------------------------------------


def test_cli_generate_by_repo_id(offline, tmp_path):
    out = tmp_path / "images"
    assert cli_main(["generate", FLUX, "--prompt", "a fox", "--steps", "2", "--height", "32", "--width", "32",
                     "--max-sequence-length", "8", "--out", str(out)]) == 0
    from PIL import Image

    png = Image.open(out / "image_000.png")
    assert png.size == (32, 32) and png.text["model"] == FLUX


def test_cli_reads_the_pixels_per_latent_cell_from_the_repo(offline, capsys):
    """36 pixels fit the testbed (1 pixel per latent cell, in its model_index.json, read by id), not a VAE of 8."""
    capsys.readouterr()
    assert cli_main(["sample", TESTBED, "--steps", "1", "--text-len", "4", "--height", "36", "--width", "36"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["height"], report["checkpoint"]) == (36, TESTBED)


def test_cli_subprocess_with_the_real_environment(offline, tmp_path):
    """A fresh process reads HF_HUB_OFFLINE / HF_HUB_CACHE as a user sets them."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "ditfa_jax.cli", "sample", f"{FLUX}@main", "--steps", "1",
                          "--height", "32", "--width", "32", "--text-len", "4"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["checkpoint"] == f"{FLUX}@main" and report["model"] == "FluxConfig"
    missing = subprocess.run([sys.executable, "-m", "ditfa_jax.cli", "convert", "ditfa-test/absent",
                              str(tmp_path / "out")], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "not in the local Hugging Face cache" in missing.stderr


def test_cli_checks_the_size_on_json_files_before_any_weight(offline, monkeypatch, capsys):
    asked = []
    real = hub.snapshot_download
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: asked.append(kw["allow_patterns"]) or
                        real(repo_id, **kw))
    assert cli_main(["generate", FLUX, "--prompt", "a", "--height", "33"]) == 2
    assert "33" in capsys.readouterr().err
    assert asked and all(patterns == hub.PATTERNS[hub.CONFIGS] for patterns in asked)


# ---- the hub's failures, through a stubbed client ------------------------------------------------------------


def http_error(status: int, code: str):
    """The error huggingface_hub raises for a hub reply with this status and X-Error-Code."""
    url = "https://huggingface.co/api/models/org/model/revision/main"
    try:
        hf_raise_for_status(httpx2.Response(status, headers={"X-Error-Code": code},
                                            request=httpx2.Request("GET", url)))
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("no error raised")


FAILURES = {
    "gated": (lambda: http_error(401, "GatedRepo"),
              ["org/model is a gated model", "accept its licence at https://huggingface.co/org/model",
               "huggingface-cli login", "HF_TOKEN"]),
    "unknown repo": (lambda: http_error(404, "RepoNotFound"),
                     ["no such model repository", "https://huggingface.co/org/model", "huggingface-cli login"]),
    "unknown revision": (lambda: http_error(404, "RevisionNotFound"),
                         ["org/model has no revision 'v9'", "https://huggingface.co/org/model/tree/main"]),
    "incomplete": (lambda: IncompleteSnapshotError("The cached snapshot for 'org/model' is incomplete: 1 file(s) "
                                                   "are missing (vae/diffusion_pytorch_model.safetensors).", "/x"),
                   ["incomplete", "vae/diffusion_pytorch_model.safetensors", "network access"]),
    "offline miss": (lambda: LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"),
                     ["not in the local Hugging Face cache", "HF_HUB_OFFLINE"]),
}


@pytest.mark.parametrize("case", FAILURES)
def test_hub_failures_say_what_to_do(case, monkeypatch, capsys, tmp_path):
    make, expected = FAILURES[case]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", case == "offline miss")

    def fail(repo_id, **kwargs):
        raise make()

    monkeypatch.setattr(hub, "snapshot_download", fail)
    with pytest.raises(HubError) as err:
        FluxPipeline.from_pretrained("org/model", revision="v9")
    for phrase in expected:
        assert phrase in str(err.value), (phrase, str(err.value))
    assert cli_main(["generate", "org/model@v9", "--prompt", "a", "--out", str(tmp_path)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("ditfa generate: error: ") and all(phrase in stderr for phrase in expected)


def test_other_errors_are_not_disguised(monkeypatch):
    def fail(repo_id, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(hub, "snapshot_download", fail)
    with pytest.raises(KeyError):
        hub.resolve("org/model")


def test_without_huggingface_hub_the_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(HubError, match=r"pip install 'ditfa-jax\[hub\]'"):
        load_transformer("org/model")


# ---- which files each component fetches ----------------------------------------------------------------------

FLUX_DEV_FILES = [  # FLUX.1-dev's repository (diffusers folders + the BFL single files), plus decoy variants
    ".gitattributes", "LICENSE.md", "README.md", "ae.safetensors", "dev_grid.jpg", "flux1-dev.safetensors",
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    # decoys: precision variants, other formats, single files
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/model.onnx",
    "transformer/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.fp16.safetensors.index.json", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin", "flux1-dev-Q4_0.gguf", "text_encoders/t5xxl_fp16.safetensors",
]
CONFIG_FILES = {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "transformer/config.json", "vae/config.json"}
TRANSFORMER_FILES = CONFIG_FILES | {f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors"
                                    for i in (1, 2, 3)} | {"transformer/diffusion_pytorch_model.safetensors.index.json"}
PIPELINE_FILES = TRANSFORMER_FILES | {
    "text_encoder/model.safetensors", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json", "vae/diffusion_pytorch_model.safetensors"}


@pytest.mark.parametrize("what,expected", [(hub.CONFIGS, CONFIG_FILES), (hub.TRANSFORMER, TRANSFORMER_FILES),
                                           (hub.PIPELINE, PIPELINE_FILES)])
def test_each_component_fetches_only_what_it_needs(what, expected):
    assert set(filter_repo_objects(FLUX_DEV_FILES, allow_patterns=hub.PATTERNS[what])) == expected


def test_from_pretrained_reads_the_index_then_fetches_the_pipeline(offline, monkeypatch):
    asked = []
    real = hub.snapshot_download
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: asked.append(
        (repo_id, kw["revision"], kw["allow_patterns"])) or real(repo_id, **kw))
    load_pipeline(f"{FLUX}@main", progress=False)
    assert asked[:2] == [(FLUX, "main", hub.PATTERNS[hub.CONFIGS]), (FLUX, "main", hub.PATTERNS[hub.PIPELINE])]
