"""Model configurations, read from a diffusers `transformer/config.json` (diffusers field names).

`FluxConfig` covers FLUX.1 dev (guidance embedding) and schnell (none); `SD3Config` covers SD3-medium, SD3.5-large
(qk RMSNorm) and SD3.5-medium (MMDiT-X dual attention in the first layers).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar


class _HeadsMixin:
    """Derived sizes shared by both families."""

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


VAE_SCALE_FACTOR = 8  # pixels per latent cell: both the FLUX.1 and the SD3 VAE downsample 8x (the pipeline's)


@dataclasses.dataclass(frozen=True)
class FluxConfig(_HeadsMixin):
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    family: ClassVar[str] = "flux"  # key of `ditfa_jax.family.FAMILIES`
    model_class: ClassVar[str] = "FluxTransformer2DModel"  # diffusers' _class_name

    @property
    def total_layers(self) -> int:
        """Attention layers in run order: the double-stream blocks, then the single-stream blocks."""
        return self.num_layers + self.num_single_layers

    def validate(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")


@dataclasses.dataclass(frozen=True)
class SD3Config(_HeadsMixin):
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    family: ClassVar[str] = "sd3"
    model_class: ClassVar[str] = "SD3Transformer2DModel"

    @property
    def total_layers(self) -> int:
        return self.num_layers

    def validate(self) -> None:
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; expected None or 'rms_norm'")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim {self.caption_projection_dim} must equal heads*head_dim "
                             f"{self.inner_dim} for joint attention")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} lie outside [0, num_layers={self.num_layers})")


MODEL_CLASSES = {cls.model_class: cls for cls in (FluxConfig, SD3Config)}


def config_from_dict(raw: dict, source: str = "config") -> FluxConfig | SD3Config:
    """Build a config from a diffusers config dict; unknown fields (diffusers bookkeeping) are ignored."""
    class_name = raw.get("_class_name")
    if class_name not in MODEL_CLASSES:
        raise ValueError(f"{source}: unknown model type _class_name={class_name!r}; supported: "
                         f"{sorted(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[class_name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in fields}
    config = cls(**kwargs)
    config.validate()
    return config


def config_to_dict(config: FluxConfig | SD3Config) -> dict:
    return {"_class_name": config.model_class, **dataclasses.asdict(config)}


def read_json(path: str | Path, what: str = "config") -> dict:
    """A JSON file (a component's config.json, model_index.json, ...) as a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_config(path: str | Path) -> FluxConfig | SD3Config:
    return config_from_dict(read_json(path, "transformer config"), source=str(path))
