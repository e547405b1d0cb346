"""The model-family interface: both families implement one protocol, geometry lives there, and no code outside a
family's own file branches on which family it is."""

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from ditfa_jax.configs import FluxConfig, SD3Config
from ditfa_jax.family import ModelFamily, TokenLayout, families, family_of, layout_for

FLUX = FluxConfig(guidance_embeds=True)
SD3 = SD3Config()
PACKAGE = Path(__file__).parent.parent


def _protocol_methods():
    return [n for n, v in vars(ModelFamily).items() if callable(v) and not n.startswith("_")]


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_each_family_implements_the_protocol_with_its_signatures(name):
    family = families()[name]
    for method in _protocol_methods():
        want = inspect.signature(getattr(ModelFamily, method))
        got = inspect.signature(getattr(type(family), method))
        assert list(got.parameters) == list(want.parameters), (name, method)
    for attr in ("name", "config_class", "module_class", "text_first", "latent_layout", "default_guidance_scale"):
        assert hasattr(family, attr), (name, attr)
    module = family.module_class
    assert list(inspect.signature(module.unembed).parameters) == ["self", "carry", "temb", "layout", "image_order"]
    assert list(inspect.signature(module.embed).parameters)[:6] == [
        "self", "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"]


def test_registry_and_lookup():
    assert family_of(FLUX).name == "flux" and family_of(SD3).name == "sd3"
    assert family_of(FLUX).text_first and not family_of(SD3).text_first
    with pytest.raises(ValueError, match="no model family"):
        family_of(object())


def test_layout_counts_latent_tokens():
    assert layout_for(FLUX, height=1024, width=1024, text_len=512, vae_scale_factor=8) == TokenLayout(
        (64, 64), 512, True)
    assert layout_for(FLUX, height=2048, width=1024, text_len=0, vae_scale_factor=8).image_tokens == 8192
    assert layout_for(SD3, height=1024, width=768, text_len=333, vae_scale_factor=8).tokens == 64 * 48 + 333
    sd3_1k = layout_for(SD3, height=1024, width=1024, text_len=333, vae_scale_factor=8)
    assert (sd3_1k.tokens, sd3_1k.padding, sd3_1k.attention_tokens) == (4429, 3, 4432)  # a multiple of 8 for TMA
    assert layout_for(FLUX, height=1008, width=1008, text_len=512, vae_scale_factor=8).padding == 0  # 3969 + 512
    assert layout_for(FLUX, height=64, width=64, text_len=32, vae_scale_factor=1).grid == (32, 32)  # pixel space
    with pytest.raises(ValueError, match="height: flux at vae_scale_factor 8 needs a positive multiple of 16"):
        layout_for(FLUX, height=1000, width=1024, text_len=0, vae_scale_factor=8)
    with pytest.raises(ValueError, match="width: sd3 .* got 0"):
        layout_for(SD3, height=64, width=0, text_len=0, vae_scale_factor=8)


@pytest.mark.parametrize("config", [FLUX, SD3])
def test_latents_round_trip_between_the_vae_and_the_sampler(config):
    family = family_of(config)
    grid = (3, 5)
    shape = family.latent_shape(config, grid)
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    vae_space = family.unpack_latents(config, x, grid)
    assert vae_space.shape[2:] == (grid[0] * family.latent_multiple(config), grid[1] * family.latent_multiple(config))
    np.testing.assert_array_equal(np.asarray(family.pack_latents(config, vae_space)), x)


def test_no_family_branches_outside_the_families():
    """Family-specific decisions are the family's: nothing else compares family names or config classes."""
    pattern = re.compile(r"isinstance\([^)]*(FluxConfig|SD3Config)|family ?== ?|\.family\.upper|== ?\"(flux|sd3)\"")
    allowed = {PACKAGE / "ditfa_jax" / "models" / "flux.py", PACKAGE / "ditfa_jax" / "models" / "sd3.py"}
    offenders = []
    for folder in ("ditfa_jax", "convert"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            if path in allowed:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
