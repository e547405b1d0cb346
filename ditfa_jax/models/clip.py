"""CLIP text encoder (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`) in Flax NNX.

FLUX.1 uses CLIP-L for its pooled vector; SD3/SD3.5 use CLIP-L and OpenCLIP bigG, both with projection, for pooled
vectors and their penultimate hidden states. Parameter names mirror transformers (`self_attn.q_proj`, `mlp.fc1`,
`layer_norm1`, ...) so conversion is a rename; layers are stacked (`nnx.vmap`) and run with `lax.scan`. Attention
is causal (CLIP's text transformer is), with learned absolute position embeddings. LayerNorm and softmax compute
in float32; the residual stream keeps the parameter dtype.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ditfa_jax.configs import CheckedConfig, read_json, setting
from ditfa_jax.models.layers import create_stack, linear, scan_stack

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP-L
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP bigG
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(CheckedConfig):
    """The fields of transformers' CLIPTextConfig that shape the text encoder (the sizes are required in a file;
    the rest default as transformers does)."""

    vocab_size: int = setting(min=1)
    hidden_size: int = setting(min=1)
    intermediate_size: int = setting(min=1)
    num_hidden_layers: int = setting(min=1)
    num_attention_heads: int = setting(min=1)
    max_position_embeddings: int = setting(min=1)
    eos_token_id: int = setting(min=0)
    hidden_act: str = setting("quick_gelu", choices=tuple(ACTIVATIONS))
    layer_norm_eps: float = setting(1e-5, above=0)
    projection_dim: int | None = setting(None, min=1)  # set: CLIPTextModelWithProjection

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> CLIPTextConfig:
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        if model_type != "clip_text_model":
            hint = " (a full CLIPModel config: pass the text encoder's own folder)" if model_type == "clip" else ""
            raise ValueError(f"{source}: expected a CLIP text encoder config (model_type 'clip_text_model'), got "
                             f"model_type={model_type!r}{hint}")
        architectures = raw.get("architectures") or []
        architectures = architectures if isinstance(architectures, list) else [architectures]
        known = [a for a in architectures if a in ARCHITECTURES]
        if len(known) != 1:
            raise ValueError(f"{source}: 'architectures' must name one of {list(ARCHITECTURES)}; got {architectures}")
        projection = known[0] == "CLIPTextModelWithProjection"
        if projection and raw.get("projection_dim") is None:
            raise ValueError(f"{source}: missing required field(s) ['projection_dim'] (a CLIPTextModelWithProjection)")
        fields = cls.fields_from({k: v for k, v in raw.items() if projection or k != "projection_dim"}, source)
        config = cls(**fields)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> CLIPTextConfig:
        return cls.from_dict(read_json(path, "config.json"), source=str(path))

    def validate(self, source: str = "config") -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{source}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")


class CLIPOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, L, D], after final_layer_norm
    penultimate_hidden_state: jax.Array  # [B, L, D], output of the second-to-last layer (hidden_states[-2])
    pooled: jax.Array  # [B, D], final-normed state at the EOS position
    text_embeds: jax.Array | None  # [B, projection_dim] with projection, else None


class Embedding(nnx.Module):
    """A lookup table [num, dim] named `weight`, as torch's nn.Embedding."""

    def __init__(self, num: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num, dim), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class LayerNorm(nnx.Module):
    """torch's LayerNorm with affine `weight`/`bias`, computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = nnx.Param(1.0 + 0.1 * jax.random.normal(rngs.params(), (dim,), dtype))
        self.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        dim = config.hidden_size
        self.head_dim = config.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (linear(dim, dim, dtype=dtype, rngs=rngs)
                                                                for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, _ = x.shape
        q, k, v = (p(x).reshape(b, length, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype,
                                            rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextModel(nnx.Module):
    """CLIP text transformer; with `config.projection_dim` set it is CLIPTextModelWithProjection.

    `__call__(input_ids [B, L] int)` -> `CLIPOutput`. No attention mask: diffusers' SD3/FLUX pipelines pass none
    (padding is handled by the causal mask and the EOS pooling).
    """

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.embeddings = CLIPEmbeddings(config, dtype=dtype, rngs=rngs)
        self.layers = create_stack(lambda r: CLIPEncoderLayer(config, dtype=dtype, rngs=r),
                                   config.num_hidden_layers, rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.text_projection = (None if config.projection_dim is None else
                                linear(config.hidden_size, config.projection_dim, dtype=dtype, rngs=rngs, bias=False))

    def eos_positions(self, input_ids: jax.Array) -> jax.Array:
        """Where each row's pooled state is read, by transformers' rule.

        eos_token_id == 2 is the legacy config (before transformers PR #24773): the position of the largest id
        (the EOS token has the highest id in CLIP's vocabulary). Otherwise the first position holding eos_token_id.
        """
        if self.config.eos_token_id == 2:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)

    def __call__(self, input_ids: jax.Array) -> CLIPOutput:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids have {input_ids.shape[1]} tokens; this CLIP has "
                             f"{self.config.max_position_embeddings} positions")
        x = self.embeddings(input_ids)

        def body(layer, carry, _):
            h, _ = carry
            return (layer(h), h), None

        (x, penultimate), _ = scan_stack(self.layers, (x, x), None, body)
        last = self.final_layer_norm(x)
        pooled = last[jnp.arange(last.shape[0]), self.eos_positions(input_ids)]
        text_embeds = None if self.text_projection is None else self.text_projection(pooled)
        return CLIPOutput(last, penultimate, pooled, text_embeds)
