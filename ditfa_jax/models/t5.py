"""T5 v1.1 encoder (transformers' `T5EncoderModel`, gated-GELU) in Flax NNX: the text encoder of FLUX.1 and SD3.

What T5 does differently from a textbook transformer, all mirrored here: RMSNorm without mean subtraction or bias
(`T5LayerNorm`, computed in float32), no 1/sqrt(d) scaling of q.k (folded into the initialisation), a relative
position bias computed once from layer 0's table and added in every layer (bidirectional log buckets), a gated FFN
`wo(act(wi_0 x) * wi_1 x)` with act = gelu_new (tanh approximation) for v1.1, and no biases anywhere. Attention
spans all tokens: diffusers' pipelines pass no attention mask to T5. Scores, softmax and norms are float32, so a
bf16 model runs without overflow.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ditfa_jax.configs import CheckedConfig, read_json, setting
from ditfa_jax.models.clip import ACTIVATIONS, Embedding
from ditfa_jax.models.layers import create_stack, linear, scan_stack


@dataclasses.dataclass(frozen=True)
class T5Config(CheckedConfig):
    """The fields of transformers' T5Config that shape the encoder (gated FFN only: T5 v1.1, the one SD3/FLUX use).

    The sizes are required in a file; the rest default as transformers does (`feed_forward_proj`: "relu" in a
    file, as transformers reads it; "gated-gelu" when constructed here)."""

    vocab_size: int = setting(min=1)
    d_model: int = setting(min=1)
    d_kv: int = setting(min=1)
    d_ff: int = setting(min=1)
    num_layers: int = setting(min=1)
    num_heads: int = setting(min=1)
    relative_attention_num_buckets: int = setting(32, min=2)
    relative_attention_max_distance: int = setting(128, min=1)
    layer_norm_epsilon: float = setting(1e-6, above=0)
    feed_forward_proj: str = setting("gated-gelu")

    @property
    def dense_act_fn(self) -> str:
        """transformers' rule: the part after "gated-"; "gated-gelu" means gelu_new (tanh approximation)."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> T5Config:
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        if model_type != "t5":
            raise ValueError(f"{source}: expected a T5 encoder config (model_type 't5'), got model_type={model_type!r}")
        config = cls(**cls.fields_from(raw, source, defaults={"feed_forward_proj": "relu"}))  # transformers'
        config.validate(source)
        stored = raw.get("dense_act_fn")
        if stored is not None and stored != config.dense_act_fn:
            raise ValueError(f"{source}: dense_act_fn={stored!r} contradicts feed_forward_proj="
                             f"{config.feed_forward_proj!r} (which means {config.dense_act_fn!r})")
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> T5Config:
        return cls.from_dict(read_json(path, "config.json"), source=str(path))

    def validate(self, source: str = "config") -> None:
        if not self.feed_forward_proj.startswith("gated-"):
            raise ValueError(f"{source}: feed_forward_proj={self.feed_forward_proj!r} is not supported; only the "
                             "gated FFN of T5 v1.1 ('gated-gelu', as in FLUX/SD3) is")
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"{source}: feed_forward_proj={self.feed_forward_proj!r}: activation "
                             f"{self.dense_act_fn!r} is not supported; expected one of {sorted(ACTIVATIONS)}")


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket [query, key] of each relative position key - query for bidirectional attention (host, int32).

    Half the buckets per direction; within one, exact buckets for distances below num_buckets/4 and log-spaced ones
    up to max_distance. The float steps are float32 in torch's order, so bucket edges match transformers exactly.
    """
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    num_buckets //= 2
    buckets = (relative > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(distance.astype(np.float32) / max_exact) / np.float32(math.log(max_distance / max_exact))
                  * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class T5LayerNorm(nnx.Module):
    """RMSNorm with a scale named `weight`: no mean subtraction, no bias, float32 statistics."""

    def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = nnx.Param(1.0 + 0.1 * jax.random.normal(rngs.params(), (dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(self.weight.dtype)


class T5Attention(nnx.Module):
    def __init__(self, config: T5Config, *, dtype, rngs: nnx.Rngs):
        inner = config.num_heads * config.d_kv
        self.d_kv = config.d_kv
        self.q, self.k, self.v = (linear(config.d_model, inner, dtype=dtype, rngs=rngs, bias=False)
                                  for _ in range(3))
        self.o = linear(inner, config.d_model, dtype=dtype, rngs=rngs, bias=False)

    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        """x [B, L, d_model]; position_bias [H, L, L] float32."""
        b, length, _ = x.shape
        q, k, v = (p(x).reshape(b, length, -1, self.d_kv) for p in (self.q, self.k, self.v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + position_bias[None]
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.o(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, -1))


class T5GatedFFN(nnx.Module):
    """transformers' T5DenseGatedActDense: wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, config: T5Config, *, dtype, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[config.dense_act_fn]
        self.wi_0 = linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs, bias=False)
        self.wi_1 = linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs, bias=False)
        self.wo = linear(config.d_ff, config.d_model, dtype=dtype, rngs=rngs, bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5Block(nnx.Module):
    """One encoder block (transformers' `block.N`: layer.0 = self-attention, layer.1 = FFN, both pre-norm)."""

    def __init__(self, config: T5Config, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_epsilon
        self.attention_norm = T5LayerNorm(config.d_model, eps=eps, dtype=dtype, rngs=rngs)
        self.attention = T5Attention(config, dtype=dtype, rngs=rngs)
        self.ffn_norm = T5LayerNorm(config.d_model, eps=eps, dtype=dtype, rngs=rngs)
        self.ffn = T5GatedFFN(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), position_bias)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nnx.Module):
    """T5 encoder stack. `__call__(input_ids [B, L] int)` -> last_hidden_state [B, L, d_model] (final-normed)."""

    def __init__(self, config: T5Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
        self.relative_attention_bias = Embedding(config.relative_attention_num_buckets, config.num_heads,
                                                 dtype=dtype, rngs=rngs)
        self.block = create_stack(lambda r: T5Block(config, dtype=dtype, rngs=r), config.num_layers, rngs)
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype, rngs=rngs)

    def position_bias(self, length: int) -> jax.Array:
        """[H, L, L] float32 relative position bias (layer 0's table, shared by every layer)."""
        buckets = relative_position_buckets(length, self.config.relative_attention_num_buckets,
                                            self.config.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).astype(jnp.float32).transpose(2, 0, 1)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}")
        bias = self.position_bias(input_ids.shape[1])
        x, _ = scan_stack(self.block, self.shared(input_ids), None, lambda layer, h, _: (layer(h, bias), None))
        return self.final_layer_norm(x)
