"""The testbeds, by name: each a captioned world (scenes, captions, renderer, detector) and the model trained on it.

``v1`` (`ditfa_jax.testbed.world`): fully specified captions of up to three shapes in a 3x3 grid; a FLUX-style
MMDiT without guidance. Its flow is nearly straight (half the steps costs almost nothing), so it tells head-wise
plans apart but not step-level methods. ``v2`` (`ditfa_jax.testbed.v2`): partly specified captions of up to five
overlapping, textured objects on fine-textured backgrounds, so a caption leaves real choices to the model; an
SD3-style MMDiT (image tokens first) with classifier-free guidance. Fewer steps cost quality there, as on real models.

A testbed's checkpoint folder records its name in ``model_index.json`` (``"testbed"``), and its CFG scale.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp

from ditfa_jax.family import family_of

__all__ = ["Testbed", "TESTBEDS", "get_testbed", "images_to_latents", "latents_to_images"]

_HERE = Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class Testbed:
    """Where a testbed's pieces live (modules by name, imported on use) and its sampling recipe."""

    name: str
    world_module: str  # sample_scenes, captions, render, render_scenes, IMAGE_SIZE
    detector_module: str  # detect, score
    model_module: str  # TRANSFORMER_CONFIG, SCHEDULER, DEFAULT_STEPS, TEXT_LENGTH, GUIDANCE_SCALE, CAPTION_DROPOUT
    tokenizer_file: Path
    checkpoint: Path  # the shipped weights (may be absent in a source tree that has not trained them)
    feature_net: Path | None = None  # the shipped Fréchet feature network (`ditfa_jax.testbed.features`), if any

    @property
    def world(self) -> ModuleType:
        return importlib.import_module(self.world_module)

    @property
    def detector(self) -> ModuleType:
        return importlib.import_module(self.detector_module)

    @property
    def model(self) -> ModuleType:
        return importlib.import_module(self.model_module)



TESTBEDS = {
    "v1": Testbed("v1", "ditfa_jax.testbed.world", "ditfa_jax.testbed.detector", "ditfa_jax.testbed.model",
                  _HERE / "tokenizer.json", _HERE / "checkpoint"),
    "v2": Testbed("v2", "ditfa_jax.testbed.v2.world", "ditfa_jax.testbed.v2.detector", "ditfa_jax.testbed.v2.model",
                  _HERE / "v2" / "tokenizer.json", _HERE / "v2" / "checkpoint", _HERE / "v2" / "features"),
}


def get_testbed(name: str) -> Testbed:
    if name not in TESTBEDS:
        raise ValueError(f"testbed {name!r}: expected one of {sorted(TESTBEDS)}")
    return TESTBEDS[name]


def images_to_latents(config, images: jax.Array) -> jax.Array:
    """Images [N, S, S, 3] in [0, 1] -> the latents a pixel-space transformer of ``config`` samples, in [-1, 1]."""
    family = family_of(config)
    return family.pack_latents(config, jnp.transpose(2 * images - 1, (0, 3, 1, 2)))


def latents_to_images(config, latents: jax.Array, image_size: int) -> jax.Array:
    """The sampler's final latents -> images [N, S, S, 3] in [0, 1] (clipped)."""
    family = family_of(config)
    grid = family.token_grid(config, image_size, image_size)
    pixels = family.unpack_latents(config, latents, grid)
    return jnp.clip((jnp.transpose(pixels, (0, 2, 3, 1)) + 1) / 2, 0, 1)
