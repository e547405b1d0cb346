"""Model configurations, read from a diffusers `transformer/config.json` (diffusers field names).

`FluxConfig` covers FLUX.1 dev (guidance embedding) and schnell (none); `SD3Config` covers SD3-medium, SD3.5-large
(qk RMSNorm) and SD3.5-medium (MMDiT-X dual attention in the first layers).

Every config dataclass of the package (these, the VAE's, the text encoders', the scheduler's) declares its fields
with `setting(...)` and derives from `CheckedConfig`, so one helper checks them all: types (a bool is not an int,
"false" is not a bool, NaN and infinity are not numbers), ranges and choices, and the fields a config file must
give. A field is `required` when every published config writes it and a default would silently build another
model (the architecture sizes: diffusers' defaults are FLUX.1's or SD3's own, so a missing `num_attention_heads`
would quietly mean 24); fields diffusers added later (`axes_dims_rope`, `qk_norm`, ...) keep diffusers' default,
as older config files legitimately omit them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path
from typing import ClassVar

import numpy as np


def setting(default=dataclasses.MISSING, *, required: bool = False, min=None, above=None, max=None, choices=None):
    """A config field with the values it accepts: `min`/`max` bound a number inclusively, `above` exclusively
    (each entry of a tuple), `choices` lists the allowed values; `required` fields must be in a config file (the
    default serves direct construction)."""
    return dataclasses.field(default=default, metadata={"required": required, "min": min, "above": above, "max": max,
                                                         "choices": choices})


def _describe(hint) -> str:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        entry = typing.get_args(hint)[0]
        return "a list of " + {int: "integers", float: "finite numbers", str: "strings"}.get(entry, str(entry))
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))


def _convert(value, hint):
    """`value` as the type `hint` says (JSON lists -> tuples, ints -> floats), or raise TypeError."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        for alternative in typing.get_args(hint):
            try:
                return _convert(value, alternative)
            except TypeError:
                pass
        raise TypeError
    if hint is type(None):
        if value is None:
            return None
        raise TypeError
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return tuple(_convert(v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise TypeError
    if isinstance(value, (bool, np.bool_)):  # True is an int to Python, not to a config
        raise TypeError
    if hint is int and isinstance(value, (int, np.integer)):
        return int(value)
    if hint is float and isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise TypeError


def check_value(cls, field: dataclasses.Field, value, source: str):
    """One field's value, converted to its declared type and checked against its range; ValueError otherwise."""
    hint = _hints(cls)[field.name]
    meta = field.metadata
    try:
        value = _convert(value, hint)
    except TypeError:
        raise ValueError(f"{source}: {field.name}={value!r} ({type(value).__name__}); expected {_describe(hint)}"
                         ) from None
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ValueError(f"{source}: {field.name}={value!r} is not supported; expected one of "
                         f"{list(meta['choices'])}")
    lo, above, hi = meta.get("min"), meta.get("above"), meta.get("max")
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, (int, float)) and ((lo is not None and v < lo) or (above is not None and v <= above)
                                            or (hi is not None and v > hi)):
            bounds = " and ".join(s for s in (lo is not None and f">= {lo}", above is not None and f"> {above}",
                                              hi is not None and f"<= {hi}") if s)
            what = "every entry" if isinstance(value, tuple) else "a value"
            raise ValueError(f"{source}: {field.name}={value!r}; expected {what} {bounds}")
    return value


class CheckedConfig:
    """Base of the config dataclasses: values are checked on construction, and `fields_from` reads a config
    dict with the file named in every error."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_value(type(self), f, getattr(self, f.name), type(self).__name__))

    @classmethod
    def fields_from(cls, raw, source: str, defaults: dict | None = None) -> dict:
        """The constructor arguments a config dict gives: each known field checked, required ones present (null
        counts as absent unless the field accepts it), `defaults` for absent fields whose file default differs
        from the dataclass's; other keys (bookkeeping) are ignored."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object of config fields, got {type(raw).__name__}")
        kwargs, missing = {}, []
        for f in dataclasses.fields(cls):
            value = raw.get(f.name)
            if value is None and not (f.name in raw and _accepts_none(cls, f)):
                if f.metadata.get("required") or (f.default is dataclasses.MISSING and f.name not in (defaults or {})):
                    missing.append(f.name)
                elif f.name in (defaults or {}):
                    kwargs[f.name] = defaults[f.name]
                continue
            kwargs[f.name] = check_value(cls, f, value, source)
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}: a {cls.__name__} config must give "
                             "them (no default is assumed)")
        return kwargs


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _accepts_none(cls, field: dataclasses.Field) -> bool:
    hint = _hints(cls)[field.name]
    return typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in typing.get_args(hint)


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
class FluxConfig(_HeadsMixin, CheckedConfig):
    """diffusers' FluxTransformer2DModel fields; defaults are diffusers' (FLUX.1's sizes)."""

    patch_size: int = setting(1, min=1)
    in_channels: int = setting(64, required=True, min=1)
    out_channels: int | None = setting(None, min=1)
    num_layers: int = setting(19, required=True, min=1)
    num_single_layers: int = setting(38, required=True, min=1)
    attention_head_dim: int = setting(128, required=True, min=1)
    num_attention_heads: int = setting(24, required=True, min=1)
    joint_attention_dim: int = setting(4096, required=True, min=1)
    pooled_projection_dim: int = setting(768, required=True, min=1)
    guidance_embeds: bool = setting(False)
    axes_dims_rope: tuple[int, ...] = setting((16, 56, 56), min=1)

    family: ClassVar[str] = "flux"  # key of `ditfa_jax.family.families()`
    model_class: ClassVar[str] = "FluxTransformer2DModel"  # diffusers' _class_name

    @property
    def total_layers(self) -> int:
        """Attention layers in run order: the double-stream blocks, then the single-stream blocks."""
        return self.num_layers + self.num_single_layers

    def validate(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope}: every axis must be even (RoPE rotates pairs)")


@dataclasses.dataclass(frozen=True)
class SD3Config(_HeadsMixin, CheckedConfig):
    """diffusers' SD3Transformer2DModel fields; defaults are diffusers' (SD3's sizes)."""

    sample_size: int = setting(128, min=1)
    patch_size: int = setting(2, min=1)
    in_channels: int = setting(16, required=True, min=1)
    num_layers: int = setting(18, required=True, min=1)
    attention_head_dim: int = setting(64, required=True, min=1)
    num_attention_heads: int = setting(18, required=True, min=1)
    joint_attention_dim: int = setting(4096, required=True, min=1)
    caption_projection_dim: int = setting(1152, required=True, min=1)
    pooled_projection_dim: int = setting(2048, required=True, min=1)
    out_channels: int = setting(16, min=1)
    pos_embed_max_size: int = setting(96, min=1)
    dual_attention_layers: tuple[int, ...] = setting((), min=0)
    qk_norm: str | None = setting(None, choices=(None, "rms_norm"))

    family: ClassVar[str] = "sd3"
    model_class: ClassVar[str] = "SD3Transformer2DModel"

    @property
    def total_layers(self) -> int:
        return self.num_layers

    def validate(self) -> None:
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim {self.caption_projection_dim} must equal heads*head_dim "
                             f"{self.inner_dim} for joint attention")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} lie outside [0, num_layers={self.num_layers})")


MODEL_CLASSES = {cls.model_class: cls for cls in (FluxConfig, SD3Config)}


def config_from_dict(raw: dict, source: str = "config") -> FluxConfig | SD3Config:
    """Build a config from a diffusers config dict; unknown fields (diffusers bookkeeping) are ignored."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object (a diffusers config), got {type(raw).__name__}")
    class_name = raw.get("_class_name")
    if class_name not in MODEL_CLASSES:
        raise ValueError(f"{source}: unknown model type _class_name={class_name!r}; supported: "
                         f"{sorted(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[class_name]
    config = cls(**cls.fields_from(raw, source))
    try:
        config.validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return config


def config_to_dict(config: FluxConfig | SD3Config) -> dict:
    return {"_class_name": config.model_class, **dataclasses.asdict(config)}


def read_json(path: str | Path, what: str = "config") -> dict:
    """A JSON file (a component's config.json, model_index.json, ...) as a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object ({{...}}) as the {what}, got {type(raw).__name__}")
    return raw


def read_config(path: str | Path) -> FluxConfig | SD3Config:
    return config_from_dict(read_json(path, "transformer config"), source=str(path))
