"""Reading safetensors checkpoints tensor by tensor (single file or sharded with `*.index.json`).

Tensors are read one at a time from memory-mapped files, so converting a 12B-parameter FLUX needs little more host
memory than the converted parameters themselves. Each file's header is checked first (its length, JSON, every
tensor's dtype, shape and byte range within the file), so a truncated, empty or garbage file is an error that names
the file and what was expected rather than a crash inside the reader; an index may only name shards beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy bfloat16)
import numpy as np
from safetensors import safe_open

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# bytes per element of every dtype the format defines (the header check needs them; the float ones load)
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                        "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 2 ** 20  # the safetensors library's own limit
LAYOUT = "a safetensors file (8-byte header length, JSON header, tensor data)"


LFS_POINTER = b"version https://git-lfs"


def checkpoint_files(path: str | Path, prefix: str | None = None, what: str = "weights") -> list[Path]:
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
        read_header(f, what)
    return files


def read_header(path: Path, what: str = "weights") -> dict:
    """The JSON header of a safetensors file, checked against the file: every tensor's dtype is known, its byte
    range matches its shape and lies inside the file. ValueError naming the file, `what` it holds and the fault."""
    where = f"{path} ({what})"
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{where}: {size} bytes, too short for {LAYOUT} (empty or interrupted download?)")
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{where}: claims a {length:,}-byte header in a {size:,}-byte file; expected {LAYOUT} "
                             "(a truncated or corrupt download, or not a safetensors file)")
        text = fh.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: the header is not a JSON object; expected {LAYOUT} (corrupt download, or not a "
                         "safetensors file)")
    data = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
        if (not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_ITEMSIZE
                or not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]):
            raise ValueError(f"{where}: tensor {key!r} has a malformed header entry {str(entry)[:200]}; expected "
                             f"dtype (one of {sorted(SAFETENSORS_ITEMSIZE)}), shape and data_offsets [begin, end]")
        nbytes = math.prod(shape) * SAFETENSORS_ITEMSIZE[entry["dtype"]]
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{where}: tensor {key!r} is {entry['dtype']} {shape} ({nbytes:,} bytes) but its data "
                             f"spans {offsets[1] - offsets[0]:,} bytes; the header is corrupt")
        if offsets[1] > data:
            raise ValueError(f"{where}: tensor {key!r} ends at byte {offsets[1]:,} of the data but the file holds "
                             f"{data:,} bytes of data: the file is truncated (interrupted download? download it "
                             "again)")
    return header


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _weight_files(path: Path, prefix: str | None) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if prefix:
        index, single = path / f"{prefix}.safetensors.index.json", path / f"{prefix}.safetensors"
        if index.is_file() and single.is_file():
            raise ValueError(f"{path}: both {single.name} (single file) and {index.name} (sharded) are here, so it is "
                             "unclear which is the model (a new download over an old one?); remove one of them")
        if index.is_file():
            return _shards(index)
        if single.is_file():
            return [single]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{path}: several safetensors indexes {[i.name for i in indexes]}; cannot tell which is "
                         "the model")
    if indexes:
        single = path / indexes[0].name.removesuffix(".index.json")
        if single.is_file():
            raise ValueError(f"{path}: both {single.name} (single file) and {indexes[0].name} (sharded) are here, so "
                             "it is unclear which is the model; remove one of them")
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
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file name")
    bad = sorted({str(name) for name in weight_map.values()
                  if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")})
    if bad:
        raise ValueError(f"{index}: weight_map names shards {bad[:5]} outside {index.parent}; expected plain file "
                         "names of shards beside the index")
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shards that are not in {index.parent}: {missing} (partial download? "
                                "download the folder again)")
    return files


class TensorSource:
    """Name -> tensor access over a checkpoint's safetensors files, without loading them whole."""

    def __init__(self, path: str | Path, prefix: str | None = None, what: str = "weights"):
        self.what = what
        self.files = checkpoint_files(path, prefix, what)
        self._handles = []
        for f in self.files:
            try:
                self._handles.append(safe_open(str(f), framework="np"))
            except Exception as e:  # the library's SafetensorError and OS errors alike
                raise ValueError(f"{f} ({what}): cannot be read as {LAYOUT}: {e}") from None
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

    def dtype(self, key: str) -> np.dtype | str:
        """The tensor's numpy dtype, or the safetensors name of one numpy cannot load (I8, F8_E4M3, ...)."""
        name = self._handles[self._where[key]].get_slice(key).get_dtype()
        return np.dtype(SAFETENSORS_DTYPES[name]) if name in SAFETENSORS_DTYPES else name

    def get(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"tensor {key!r} not found in {[f.name for f in self.files]}")
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except Exception as e:
            raise ValueError(f"{self.files[self._where[key]]} ({self.what}): cannot read tensor {key!r}: {e}") from None

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.files)
