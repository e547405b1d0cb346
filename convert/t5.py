"""transformers T5 encoder folder (`config.json` + safetensors, often sharded) -> `ditfa_jax.models.t5.T5Encoder`.

Key mapping: `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}` -> `block.attention.*` (layer N of the stack),
`layer.0.layer_norm` -> `attention_norm`, `layer.1.DenseReluDense.{wi_0,wi_1,wo}` -> `ffn.*`, `layer.1.layer_norm`
-> `ffn_norm`; block 0's `relative_attention_bias` is the model's single shared table. The token embedding is
`shared.weight`; checkpoints may also hold its tied copy `encoder.embed_tokens.weight` (checked equal) or only that.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from convert.checkpoint import TensorSource
from convert.streaming import stream_into_state
from ditfa_jax.models.t5 import T5Config, T5Encoder

SHARED, EMBED_TOKENS = "shared.weight", "encoder.embed_tokens.weight"
BLOCK_PARTS = {"attention": "layer.0.SelfAttention", "attention_norm": "layer.0.layer_norm",
               "ffn": "layer.1.DenseReluDense", "ffn_norm": "layer.1.layer_norm"}


def load_t5(folder: str | Path, *, dtype=jnp.float32) -> T5Encoder:
    """Load a T5 encoder component folder (e.g. `<pipeline>/text_encoder_3`) as a `T5Encoder`. dtype: parameters."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = T5Config.from_file(config_path)
    source = TensorSource(folder, prefix="model", what="T5 encoder weights")
    embedding = SHARED if SHARED in source or EMBED_TOKENS not in source else EMBED_TOKENS
    aliases = {EMBED_TOKENS: SHARED} if embedding == SHARED and EMBED_TOKENS in source else {}

    def torch_key(path: tuple, index: int | None) -> str:
        parts = ["weight" if p == "kernel" else str(p) for p in path]
        if parts[0] == "shared":
            return embedding
        if parts[0] == "relative_attention_bias":
            return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        if parts[0] == "block":
            return ".".join(["encoder.block", str(index), BLOCK_PARTS[parts[1]], *parts[2:]])
        return "encoder." + ".".join(parts)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: T5Encoder(config, dtype=dtype, rngs=nnx.Rngs(0))))
    state = stream_into_state(source, abstract, torch_key, expected_by=f"the model in {config_path}",
                              stacked=("block",), aliases=aliases)
    return nnx.merge(graphdef, state)
