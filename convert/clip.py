"""transformers CLIP text encoder folder (`config.json` + safetensors) -> `ditfa_jax.models.clip.CLIPTextModel`.

Also home of `stream_into_module`, the streaming loader that `convert/t5.py` shares: the checkpoint key of every
parameter slot is derived from the module itself (so nothing can be left unfilled), every checkpoint key must be
used (or be a known harmless buffer), every shape is checked from the file headers before any tensor is read, and
tensors are then read one at a time into preallocated host buffers of the target dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.checkpoint import TensorSource
from convert.diffusers_to_jax import ConversionError
from ditfa_jax.models.clip import CLIPTextConfig, CLIPTextModel

PREFIX = "text_model."  # hub checkpoints (and CLIPTextModelWithProjection) prefix the transformer's keys with it


def stream_into_module(source: TensorSource, build: Callable[[], nnx.Module], torch_key: Callable, *,
                       stacked: tuple[str, ...], config_path: Path, ignored: frozenset[str] = frozenset(),
                       aliases: dict[str, str] | None = None) -> nnx.Module:
    """Fill the module `build()` describes with the tensors of `source`, without ever creating it at random.

    torch_key(path, index) names the checkpoint key of a parameter slot: `path` is the NNX state path and `index`
    the layer of a stacked parameter (leading layer axis; the stacks are the top-level modules named in `stacked`)
    or None. Linear kernels are stored transposed in torch ([out, in]). `aliases` maps a tied duplicate key to the
    key it must equal (checked, then dropped); `ignored` keys are buffers that carry no parameter.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    targets = dict(nnx.to_flat_state(abstract))
    expected = {}  # checkpoint key -> (state path, layer index or None)
    for path, var in targets.items():
        layers = var.get_value().shape[0] if path[0] in stacked else None
        for index in (range(layers) if layers is not None else [None]):
            expected[torch_key(path, index)] = (path, index)
    aliases = aliases or {}
    where = source.describe()

    unexpected = sorted(k for k in source.keys() if k not in expected and k not in ignored and k not in aliases)
    if unexpected:
        raise ConversionError(f"{where}: {len(unexpected)} tensor(s) that the model in {config_path} does not use "
                              f"(wrong folder or config?): {unexpected[:20]}")
    missing = sorted(k for k in expected if k not in source)
    if missing:
        raise ConversionError(f"{where}: {len(missing)} tensor(s) missing that {config_path} requires (partial "
                              f"download or wrong config?): {missing[:20]}")
    for key, (path, index) in [*expected.items(), *((a, expected[k]) for a, k in aliases.items())]:
        shape = targets[path].get_value().shape[1 if index is not None else 0:]
        want = tuple(shape[::-1]) if path[-1] == "kernel" else tuple(shape)
        if source.shape(key) != want:
            raise ConversionError(f"{where}: tensor {key!r} has shape {source.shape(key)}; {config_path} expects "
                                  f"{want}")

    buffers = {path: np.empty(var.get_value().shape, var.get_value().dtype) for path, var in targets.items()}
    for key, (path, index) in expected.items():
        array = source.get(key)
        slot = buffers[path] if index is None else buffers[path][index]
        slot[...] = array.T if path[-1] == "kernel" else array
    for alias, key in aliases.items():
        path, index = expected[key]
        slot = buffers[path] if index is None else buffers[path][index]
        if not np.array_equal(slot, source.get(alias).astype(slot.dtype)):
            raise ConversionError(f"{where}: tied tensors {alias!r} and {key!r} differ; expected equal copies")
    for path, var in targets.items():
        var.set_value(jax.device_put(buffers.pop(path)))
    return nnx.merge(graphdef, abstract)


def load_clip(folder: str | Path, *, dtype=jnp.float32) -> CLIPTextModel:
    """Load a CLIP text encoder component folder (e.g. `<pipeline>/text_encoder`) as a `CLIPTextModel`.

    `architectures` in config.json picks CLIPTextModel or CLIPTextModelWithProjection. Keys may carry the hub's
    `text_model.` prefix or not (transformers 5 writes a plain CLIPTextModel without it). dtype: parameter dtype.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = CLIPTextConfig.from_file(config_path)
    source = TensorSource(folder)
    prefix = PREFIX if any(k.startswith(PREFIX) for k in source.keys()) else ""

    def torch_key(path: tuple, index: int | None) -> str:
        parts = ["weight" if p == "kernel" else str(p) for p in path]
        if parts[0] == "text_projection":
            return "text_projection.weight"
        if parts[0] == "layers":
            parts = ["encoder", "layers", str(index), *parts[1:]]
        return prefix + ".".join(parts)

    def build():
        return CLIPTextModel(config, dtype=dtype, rngs=nnx.Rngs(0))

    return stream_into_module(source, build, torch_key, stacked=("layers",), config_path=config_path,
                              ignored=frozenset({prefix + "embeddings.position_ids"}))
