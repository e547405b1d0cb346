"""transformers CLIP text encoder folder (`config.json` + safetensors) -> `ditfa_jax.models.clip.CLIPTextModel`.

Key mapping: layer N of the `layers` stack <- `text_model.encoder.layers.N.*`, other parameters <- `text_model.*`
(Linear `weight` transposed into `kernel`), the projection <- `text_projection.weight`; the checks and the streaming
are `convert.streaming.stream_into_state`'s.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from convert.checkpoint import TensorSource
from convert.streaming import stream_into_state
from ditfa_jax.models.clip import CLIPTextConfig, CLIPTextModel

PREFIX = "text_model."  # hub checkpoints (and CLIPTextModelWithProjection) prefix the transformer's keys with it


def load_clip(folder: str | Path, *, dtype=jnp.float32) -> CLIPTextModel:
    """Load a CLIP text encoder component folder (e.g. `<pipeline>/text_encoder`) as a `CLIPTextModel`.

    `architectures` in config.json picks CLIPTextModel or CLIPTextModelWithProjection. Keys may carry the hub's
    `text_model.` prefix or not (transformers 5 writes a plain CLIPTextModel without it). dtype: parameter dtype.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = CLIPTextConfig.from_file(config_path)
    source = TensorSource(folder, prefix="model", what="CLIP text encoder weights")
    prefix = PREFIX if any(k.startswith(PREFIX) for k in source.keys()) else ""

    def torch_key(path: tuple, index: int | None) -> str:
        parts = ["weight" if p == "kernel" else str(p) for p in path]
        if parts[0] == "text_projection":
            return "text_projection.weight"
        if parts[0] == "layers":
            parts = ["encoder", "layers", str(index), *parts[1:]]
        return prefix + ".".join(parts)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CLIPTextModel(config, dtype=dtype, rngs=nnx.Rngs(0))))
    state = stream_into_state(source, abstract, torch_key, expected_by=f"the model in {config_path}",
                              stacked=("layers",), ignored=frozenset({prefix + "embeddings.position_ids"}))
    return nnx.merge(graphdef, state)
