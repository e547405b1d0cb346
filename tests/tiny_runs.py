"""Sampling settings for the tiny FLUX-dev and SD3.5-medium checkpoints, shared by the tests of the sampler's plan
paths: a 16x16 token grid, FLUX's distilled guidance 3.5, SD3's CFG 7.0 with the fixture's negative embeddings."""

from pathlib import Path

import numpy as np

from ditfa_jax import load_transformer
from ditfa_jax.sampler import scheduler_for

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_run(name: str, steps: int, dtype=None):
    """(model, (prompt embeds, pooled), sample/calibrate keyword arguments) for fixture `name`."""
    model = load_transformer(FIXTURES / name, progress=False, **({} if dtype is None else {"dtype": dtype}))
    ref = dict(np.load(FIXTURES / name / "reference.npz"))
    flux = name.startswith("flux")
    side = 16 * 8 * (2 if flux else model.config.patch_size)
    common = dict(height=side, width=side, num_steps=steps, guidance_scale=3.5 if flux else 7.0,
                  scheduler=scheduler_for(FIXTURES / name, model))
    if not flux:
        common.update(negative_prompt_embeds=ref["sample_negative_prompt_embeds"],
                      negative_pooled_prompt_embeds=ref["sample_negative_pooled"])
    return model, (ref["sample_prompt_embeds"], ref["sample_pooled"]), common
