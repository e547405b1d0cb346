"""The model-family interface: what the denoising core, the plan search, plans and pipelines need to know about an
MMDiT family, declared once here and implemented beside each model (`ditfa_jax.models.flux`, `.sd3`).

A family answers questions about geometry (latent cells -> image-token grid, the latent a sampler carries),
conditioning (guidance kind, timestep scaling, positional tables) and schedule; its NNX module exposes the pieces
every denoiser evaluation is made of, with the same signatures in every family:

    module.embed(latents, prompt_embeds, pooled, timestep, guidance, image_order) -> (carry, temb)
    module.stacks() -> [(stack, first_layer, count), ...]    scanned block stacks in run order
    module.enter_stack(index, carry) -> carry                  hand-over between stacks
    module.unembed(carry, temb, layout, image_order) -> velocity in the latent layout

Code outside a family's own file asks the family (`family_of(config)`) instead of branching on its name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import numpy as np

from ditfa_jax.scheduler import SchedulerConfig

GUIDANCE_KINDS = ("none", "distilled", "cfg")  # no guidance; a guidance embedding (FLUX-dev); classifier-free


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where a run's tokens sit in the joint sequence: the image-token grid (rows, cols), the text length, and
    the padding tokens the family appends to the joint sequence for attention (`ModelFamily.token_padding`).

    Static under jit (a hashable dataclass): every shape of a run follows from it and the model config."""
    grid: tuple[int, int]
    text_len: int
    text_first: bool
    padding: int = 0

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> int:
        """Real tokens: image and text."""
        return self.image_tokens + self.text_len

    @property
    def attention_tokens(self) -> int:
        """Rows of q, k, v and of the attention cache: the real tokens and the padding."""
        return self.tokens + self.padding


class ModelFamily(Protocol):
    """One MMDiT family (FLUX.1, SD3/SD3.5): implemented once per family, registered in `FAMILIES`."""

    name: str            # "flux", "sd3": the config's `family`, used in plans and messages
    config_class: type   # its config dataclass (carries the diffusers `model_class`)
    module_class: type   # its NNX transformer module
    text_first: bool     # token order of the joint sequence: [text, image] or [image, text]
    latent_layout: str   # how `sample` takes latents, for messages: "packed" ([B, S, C]), "NCHW"
    default_guidance_scale: float  # the diffusers pipeline's default

    def native_size(self, config, vae_scale_factor: int) -> int:
        """The pixel size (both sides) the family's diffusers pipeline generates by default."""

    def guidance(self, config) -> str:
        """One of GUIDANCE_KINDS for this config."""

    def token_grid(self, config, latent_height: int, latent_width: int) -> tuple[int, int]:
        """Image-token grid (rows, cols) for a latent of that many cells; ValueError if the size does not fit."""

    def latent_multiple(self, config) -> int:
        """Latent cells per image token along each side (a latent size must be a multiple of it)."""

    def token_padding(self, tokens: int) -> int:
        """Padding tokens the module appends to a joint sequence of `tokens` real ones for attention (masked as
        keys; SD3 rounds up to a multiple of 8 so that the Mosaic GPU kernel needs no copy), 0 for none."""

    def latent_shape(self, config, grid: tuple[int, int]) -> tuple[int, ...]:
        """One sample's latent as the sampler carries it (without the batch axis)."""

    def pack_latents(self, config, latents):
        """VAE-space latents [B, C, H, W] -> the latents the sampler carries (`latent_shape`)."""

    def unpack_latents(self, config, latents, grid: tuple[int, int]):
        """The sampler's latents for a token grid -> VAE-space latents [B, C, H, W]."""

    def default_scheduler(self, config) -> SchedulerConfig:
        """The scheduler diffusers' pipeline uses when a folder has none."""

    def schedule(self, scheduler: SchedulerConfig, num_steps: int, image_tokens: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas [n+1], timesteps [n]) exactly as the family's diffusers pipeline sets them."""

    def model_timestep(self, timestep):
        """The scheduler's timestep as the module's `embed` takes it."""

    def positions(self, config, layout: TokenLayout, image_order: np.ndarray | None):
        """Positional tables the blocks take (FLUX: RoPE cos/sin [tokens, head_dim]), or None."""

    def forward_inputs(self, config, *, hidden_states, encoder_hidden_states, img_ids, txt_ids, guidance) -> dict:
        """Extra keyword arguments of the module's diffusers-style `__call__` (`loading.Transformer.__call__`)."""


@functools.cache
def families() -> dict[str, ModelFamily]:
    """Every registered family by name (built on first use: the model modules import this one)."""
    from ditfa_jax.models.flux import FAMILY as FLUX
    from ditfa_jax.models.sd3 import FAMILY as SD3

    return {f.name: f for f in (FLUX, SD3)}


def family_of(config) -> ModelFamily:
    """The family a model config belongs to."""
    found = families().get(getattr(config, "family", None))
    if found is None or not isinstance(config, found.config_class):
        raise ValueError(f"no model family for config {type(config).__name__}; known: {sorted(families())}")
    return found


def layout_for(config, *, height: int, width: int, text_len: int, vae_scale_factor: int) -> TokenLayout:
    """The token layout of a run at height x width pixels (`vae_scale_factor` pixels per latent cell)."""
    fam = family_of(config)
    step = vae_scale_factor * fam.latent_multiple(config)
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % step:
            raise ValueError(f"{name}: {fam.name} at vae_scale_factor {vae_scale_factor} needs a positive multiple "
                             f"of {step} pixels, got {v!r}")
    grid = fam.token_grid(config, height // vae_scale_factor, width // vae_scale_factor)
    return TokenLayout(grid=grid, text_len=int(text_len), text_first=fam.text_first,
                       padding=fam.token_padding(grid[0] * grid[1] + int(text_len)))
