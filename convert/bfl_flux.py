"""The original Black Forest Labs single-file FLUX layout (`double_blocks.N.*`, `single_blocks.N.*`).

`BFLFluxSource` presents such a file under diffusers' key names, splitting fused tensors (qkv; the single blocks'
qkv+MLP `linear1`) lazily and swapping the final layer's (shift, scale) halves to diffusers' (scale, shift), so the
ordinary diffusers converter consumes it. `infer_flux_config` reads the architecture off the tensor shapes.
"""

from __future__ import annotations

import re

import numpy as np

from convert.checkpoint import TensorSource
from ditfa_jax.configs import FluxConfig

PREFIXES = ("model.diffusion_model.",)

# BFL module -> diffusers module, outside the blocks.
TOP_LEVEL = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}

# Inside double_blocks.N: one-to-one renames (suffix -> suffix).
DOUBLE_RENAMES = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
}
# Fused projections: BFL module -> the diffusers modules its rows split into, in order.
DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_RENAMES = {
    "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2": "proj_out",
}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def is_bfl_flux(keys) -> bool:
    return any(_strip(k).startswith(("double_blocks.", "single_blocks.")) for k in keys)


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


class BFLFluxSource:
    """A TensorSource-like view of a BFL FLUX checkpoint under diffusers key names."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.inner_dim = source.shape(self._bfl_name("img_in.weight"))[0]
        # diffusers key -> (BFL key, row slice, swap shift/scale halves)
        self._plan: dict[str, tuple[str, slice, bool]] = {}
        for key in source.keys():
            self._add(key)
        self._cached: tuple[str, np.ndarray] | None = None

    def _bfl_name(self, stripped: str) -> str:
        for key in self.source.keys():
            if _strip(key) == stripped:
                return key
        raise KeyError(f"{self.source.describe()}: no tensor {stripped!r}; not a BFL FLUX checkpoint?")

    def _add(self, key: str) -> None:
        name = _strip(key)
        module, _, param = name.rpartition(".")
        full = slice(None)
        if module == "final_layer.adaLN_modulation.1":
            self._plan[f"norm_out.linear.{param}"] = (key, full, True)
            return
        if module in TOP_LEVEL:
            self._plan[f"{TOP_LEVEL[module]}.{param}"] = (key, full, False)
            return
        m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", name)
        if m is None:
            self._plan[name] = (key, full, False)  # unknown: surfaces as an unexpected key downstream
            return
        kind, index, rest = m.groups()
        prefix = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{index}."
        renames, fused = (DOUBLE_RENAMES, DOUBLE_FUSED) if kind == "double" else (SINGLE_RENAMES, SINGLE_FUSED)
        if rest in renames:  # a parameter named in full (norm scales)
            self._plan[prefix + renames[rest]] = (key, full, False)
            return
        sub, _, param = rest.rpartition(".")
        if sub in renames:
            self._plan[f"{prefix}{renames[sub]}.{param}"] = (key, full, False)
        elif sub in fused:
            d = self.inner_dim
            sizes = [d] * 3 + ([4 * d] if len(fused[sub]) == 4 else [])
            start = 0
            for target, size in zip(fused[sub], sizes):
                self._plan[f"{prefix}{target}.{param}"] = (key, slice(start, start + size), False)
                start += size
        else:
            self._plan[prefix + rest] = (key, full, False)

    def keys(self) -> list[str]:
        return list(self._plan)

    def __contains__(self, key: str) -> bool:
        return key in self._plan

    def shape(self, key: str) -> tuple[int, ...]:
        bfl_key, rows, _ = self._plan[key]
        shape = self.source.shape(bfl_key)
        n = len(range(*rows.indices(shape[0])))
        return (n, *shape[1:])

    def dtype(self, key: str) -> np.dtype:
        return self.source.dtype(self._plan[key][0])

    def get(self, key: str) -> np.ndarray:
        bfl_key, rows, swap = self._plan[key]
        if self._cached is None or self._cached[0] != bfl_key:  # fused tensors are read once for all their parts
            self._cached = (bfl_key, self.source.get(bfl_key))
        tensor = self._cached[1][rows]
        if swap:
            shift, scale = np.split(tensor, 2, axis=0)
            tensor = np.concatenate([scale, shift], axis=0)
        return tensor

    def describe(self) -> str:
        return f"BFL single file {self.source.describe()}"


def infer_flux_config(source: BFLFluxSource, axes_dims_rope: tuple[int, ...] | None = None) -> FluxConfig:
    """Read a FLUX architecture off a BFL checkpoint's tensor shapes (the file carries no config)."""
    keys = source.keys()
    dim, in_channels = source.shape("x_embedder.weight")
    head_dim = source.shape("transformer_blocks.0.attn.norm_q.weight")[0]
    if axes_dims_rope is None:
        if head_dim != 128:
            raise ValueError(f"{source.describe()}: head_dim {head_dim} is not FLUX.1's 128; pass axes_dims_rope "
                             "(or a diffusers config.json) to say how RoPE splits the head")
        axes_dims_rope = (16, 56, 56)
    count = lambda prefix: len({k.split(".")[1] for k in keys if k.startswith(prefix)})  # noqa: E731
    out = source.shape("proj_out.weight")[0]
    return FluxConfig(
        in_channels=in_channels, out_channels=out, num_layers=count("transformer_blocks."),
        num_single_layers=count("single_transformer_blocks."), attention_head_dim=head_dim,
        num_attention_heads=dim // head_dim, joint_attention_dim=source.shape("context_embedder.weight")[1],
        pooled_projection_dim=source.shape("time_text_embed.text_embedder.linear_1.weight")[1],
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in source,
        axes_dims_rope=tuple(axes_dims_rope))
