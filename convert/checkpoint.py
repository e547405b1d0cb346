"""Reading safetensors checkpoints tensor by tensor (single file or sharded with `*.index.json`).

Tensors are read one at a time from memory-mapped files, so converting a 12B-parameter FLUX needs little more host
memory than the converted parameters themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy bfloat16)
import numpy as np
from safetensors import safe_open

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


LFS_POINTER = b"version https://git-lfs"


def checkpoint_files(path: str | Path, prefix: str | None = None) -> list[Path]:
    """The safetensors files of a checkpoint: a file, a folder holding one file, or a folder with an index.

    In a folder, ``prefix`` names the canonical weights (``model`` for transformers text encoders,
    ``diffusion_pytorch_model`` for diffusers models): ``<prefix>.safetensors.index.json`` or
    ``<prefix>.safetensors`` is read when present, so precision variants beside it (``model.fp16.safetensors``) are
    ignored. Git-lfs pointer files (a clone without git-lfs) are refused with a clear error.
    """
    files = _weight_files(Path(path), prefix)
    for f in files:
        with open(f, "rb") as fh:
            if fh.read(len(LFS_POINTER)) == LFS_POINTER:
                raise ValueError(f"{f} is a git-lfs pointer file, not the weights (the repository was cloned without "
                                 "git-lfs): run `git lfs pull` in it or download it with huggingface-cli")
    return files


def _weight_files(path: Path, prefix: str | None) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if prefix:
        index, single = path / f"{prefix}.safetensors.index.json", path / f"{prefix}.safetensors"
        if index.is_file():
            return _shards(index)
        if single.is_file():
            return [single]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        return _shards(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        expected = f"; expected {prefix}.safetensors or {prefix}.safetensors.index.json" if prefix else ""
        raise FileNotFoundError(f"{path}: no *.safetensors weights (and no *.safetensors.index.json){expected}")
    if len(files) > 1:
        raise ValueError(f"{path}: several safetensors files {[f.name for f in files]} but no index.json; "
                         "cannot tell which belong to the model")
    return files


def _shards(index: Path) -> list[Path]:
    """The shard files a safetensors index names, all of which must be present."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shards that are not in {index.parent}: {missing} (partial download? "
                                "download the folder again)")
    return files


class TensorSource:
    """Name -> tensor access over a checkpoint's safetensors files, without loading them whole."""

    def __init__(self, path: str | Path, prefix: str | None = None):
        self.files = checkpoint_files(path, prefix)
        self._handles = [safe_open(str(f), framework="np") for f in self.files]
        self._where: dict[str, int] = {}
        for i, handle in enumerate(self._handles):
            for key in handle.keys():
                if key in self._where:
                    raise ValueError(f"tensor {key!r} appears in both {self.files[self._where[key]].name} and "
                                     f"{self.files[i].name}")
                self._where[key] = i

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(SAFETENSORS_DTYPES[self._handles[self._where[key]].get_slice(key).get_dtype()])

    def get(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"tensor {key!r} not found in {[f.name for f in self.files]}")
        return self._handles[self._where[key]].get_tensor(key)

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.files)
