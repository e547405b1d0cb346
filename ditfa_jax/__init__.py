"""ditfa-jax: head-wise attention compression (DiTFastAttnV2-style) for MMDiT diffusion transformers in JAX.

Public names are imported lazily (PEP 562), so `convert` (which builds on `ditfa_jax.configs` and the models) and
`ditfa_jax.loading` (which builds on `convert`) can import each other's modules in either order.
"""

import importlib

_EXPORTS = {
    "joint_attention": "ditfa_jax.attention",
    "FluxConfig": "ditfa_jax.configs",
    "SD3Config": "ditfa_jax.configs",
    "Transformer": "ditfa_jax.loading",
    "load_transformer": "ditfa_jax.loading",
    "save_converted": "ditfa_jax.loading",
    "family_of": "ditfa_jax.family",
    "flux_image_ids": "ditfa_jax.models.flux",
    "pack_latents": "ditfa_jax.models.flux",
    "sample": "ditfa_jax.sampler",
    "DynamicGate": "ditfa_jax.denoise",
    "CompressionPlan": "ditfa_jax.plan",
    "unpack_latents": "ditfa_jax.models.flux",
    "SchedulerConfig": "ditfa_jax.scheduler",
    "flow_match_schedule": "ditfa_jax.scheduler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ditfa_jax' has no attribute {name!r}")
