"""Hugging Face Hub repo ids wherever a checkpoint folder is taken: `resolve(path_or_repo_id, what)` -> local folder.

An existing local path is returned as it is, and so is a string that is not a repo id (the caller then says "no such
folder"). A repo id, "org/name" or "org/name@revision", is fetched with `huggingface_hub.snapshot_download` (the
optional extra: pip install 'ditfa-jax[hub]'): files live in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE)
and are downloaded once; under HF_HUB_OFFLINE=1 only that cache is read. Only the files `what` needs are fetched:
configs, tokenizer files and each component's canonical safetensors weights (single file or shards with their
index), no precision variants (`*.fp16.safetensors`), no .bin / .onnx / .gguf, no single-file checkpoints kept beside
the diffusers folders. The hub's errors become `HubError`s that say what to do.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

__all__ = ["CONFIGS", "HubError", "PATTERNS", "PIPELINE", "TRANSFORMER", "is_repo_id", "resolve", "snapshot_check"]

PIPELINE, TRANSFORMER, CONFIGS = "pipeline", "transformer", "configs"
INSTALL_HINT = "pip install 'ditfa-jax[hub]'"
LOGIN_HINT = ("log in with `huggingface-cli login` (or `hf auth login`), or set HF_TOKEN (on Colab: add HF_TOKEN "
              "under Secrets, the key icon, and allow the notebook access)")


def _weights(folder: str, prefix: str) -> list[str]:
    """A component's canonical weights: one file, or shards (`<prefix>-00001-of-00003.safetensors`) and their index;
    precision variants (`<prefix>.fp16.safetensors`, `<prefix>.fp16-00001-of-...`) do not match."""
    return [f"{folder}{prefix}.safetensors", f"{folder}{prefix}-*-of-*.safetensors",
            f"{folder}{prefix}.safetensors.index.json"]


_CONFIGS = ["model_index.json", "config.json", "*/config.json", "scheduler/scheduler_config.json", "training.json"]
_CONVERTED = ["params.safetensors", "transformer/params.safetensors"]  # ditfa convert / the testbed
PATTERNS = {
    CONFIGS: _CONFIGS,  # what the settings of a run are checked against before any weight
    TRANSFORMER: [*_CONFIGS, *_weights("transformer/", "diffusion_pytorch_model"),
                  *_weights("", "diffusion_pytorch_model"), *_CONVERTED],  # pipeline or transformer-only repos
    PIPELINE: [*_CONFIGS, *_CONVERTED, *_weights("transformer/", "diffusion_pytorch_model"),
               *_weights("vae/", "diffusion_pytorch_model"), *_weights("text_encoder*/", "model"),
               "tokenizer*/*.json", "tokenizer*/merges.txt"],
}

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"({_NAME})/({_NAME})(?:@([^\s@]+))?")


class HubError(FileNotFoundError):
    """A repo id whose files could not be had (gated, unknown, not cached offline, incomplete); says what to do."""


def is_repo_id(text: str) -> bool:
    """Whether `text` has the form of a Hugging Face model id, "org/name" or "org/name@revision"."""
    match = _REPO_ID.fullmatch(text)
    return bool(match) and not any("--" in n or ".." in n for n in match.groups()[:2])


def _split(spec: str, revision: str | None) -> tuple[str, str | None]:
    repo_id, _, at = spec.partition("@")
    if at and revision is not None and at != revision:
        raise ValueError(f"{spec}: revision {at!r} in the id and revision={revision!r} differ; give one")
    return repo_id, at or revision


def _from_hub(path) -> bool:
    """Whether `resolve(path)` goes to the hub (a repo id that is no local path)."""
    return isinstance(path, str) and is_repo_id(path) and not Path(path).exists()


def snapshot_download(repo_id: str, **kwargs) -> str:
    """huggingface_hub.snapshot_download, imported when first needed (tests replace this function)."""
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(f"{repo_id} is not a local folder and looks like a Hugging Face repo id; reading it needs "
                       f"huggingface_hub: {INSTALL_HINT}") from None
    return huggingface_hub.snapshot_download(repo_id, **kwargs)


def resolve(path: str | Path, what: str = PIPELINE, *, revision: str | None = None) -> Path:
    """The local folder for a folder or a repo id; `what` (PIPELINE, TRANSFORMER, CONFIGS) picks the files fetched.

    A Path, an existing path, or a string that is no repo id comes back as a Path unchanged, so that the caller's
    own "no such folder" error applies; `revision` (branch, tag or commit; or "org/name@revision") is for repo ids.
    """
    if not _from_hub(path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for Hugging Face repo ids; {path} is a local path")
        return Path(path)
    repo_id, revision = _split(path, revision)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS[what]))
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001 (only the hub's own errors are translated; others propagate)
        message = _explain(e, repo_id, revision, path)
        if message is None:
            raise
        raise HubError(message) from e


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE)


def _said(e: Exception) -> str:
    """The hub's own message on one line, shortened."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _explain(e: Exception, repo_id: str, revision: str | None, spec: str) -> str | None:
    """What to do about one of huggingface_hub's errors, or None for an error that is not one of them."""
    try:
        from huggingface_hub import constants, errors
    except ImportError:
        return None
    page = f"https://huggingface.co/{repo_id}"
    not_local = f"(and there is no local folder {spec} either)"
    if isinstance(e, errors.GatedRepoError):
        return (f"{repo_id} is a gated model: accept its licence at {page} (logged in there with the account you "
                f"use here), then {LOGIN_HINT} (the hub said: {_said(e)})")
    if isinstance(e, errors.RevisionNotFoundError):
        return (f"{repo_id} has no revision {revision!r}: give a branch, tag or commit listed at {page}/tree/main "
                "(or no revision for main)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return (f"{repo_id}: no such model repository on the Hugging Face Hub, or a private one you are not allowed "
                f"to read {not_local}: check the id at {page}; for a private repository {LOGIN_HINT}")
    incomplete = getattr(errors, "IncompleteSnapshotError", None)
    if incomplete is not None and isinstance(e, incomplete):
        return (f"{repo_id}: the copy in the Hugging Face cache is incomplete and the hub cannot be reached to "
                f"finish it ({_said(e)}): run again with network access (unset HF_HUB_OFFLINE) to fetch the missing "
                "files")
    if isinstance(e, errors.LocalEntryNotFoundError):
        cache = getattr(constants, "HF_HUB_CACHE", "the Hugging Face cache")
        if _offline():
            return (f"{repo_id}{'@' + revision if revision else ''} is not in the local Hugging Face cache ({cache}) "
                    "and HF_HUB_OFFLINE=1 forbids downloading it: download it once with network access (unset "
                    "HF_HUB_OFFLINE), or point HF_HUB_CACHE / HF_HOME at the cache that holds it, or pass a local "
                    f"folder {not_local}")
        return (f"{repo_id}: the Hugging Face Hub could not be reached and the model is not in the local cache "
                f"({cache}) {not_local}: check the network connection and try again ({_said(e)})")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.HfHubHTTPError) and status in (401, 403):
        return (f"{repo_id}: the hub refused access ({_said(e)}): {LOGIN_HINT}; for a gated model accept its licence "
                f"at {page}")
    return None


@contextlib.contextmanager
def snapshot_check(path, folder: Path):
    """Around the check of a folder that `resolve(path)` gave: when it came from the hub, a missing or partial file
    becomes a HubError naming the repo and how to fetch the rest (others pass unchanged)."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, HubError) or not _from_hub(path):
            raise
        repo_id = _split(path, None)[0]
        if _offline():
            todo = ("It was only partly downloaded: run again with network access (unset HF_HUB_OFFLINE) to fetch "
                    "the missing files")
        else:
            todo = (f"The repository does not provide them: is https://huggingface.co/{repo_id} a diffusers-format "
                    "FLUX.1 / SD3 model (a folder per component)?")
        problem = str(e).replace(f"{folder}/", "").rstrip(".")  # paths inside the snapshot, relative to it
        raise HubError(f"{path}: its copy in the Hugging Face cache ({folder}) is incomplete: {problem}. {todo}") from e
