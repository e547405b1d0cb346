"""The testbed v2 model: the project's SD3 MMDiT (image tokens first) in pixel space, sampled with CFG.

64x64 RGB pixels patchified 4x4 in the model into 16x16 = 256 image tokens, 6 heads of 32 with RMS-normed q and k
(SD3.5's choice), 5 joint blocks, then 56 text tokens from the testbed text encoder
(`ditfa_jax.testbed.model.TextEncoder`), so 312 tokens per attention. 4x4 patches rather than 2x2: a quarter of the
tokens lets the 15-minute training budget see about four times the scenes (2x2 patches drew blobs after 8 minutes,
`benchmarks/RESULTS.md`). Trained with caption dropout and sampled with classifier-free guidance (the SD3 code path:
a doubled batch [uncond, cond], the uncond half the empty caption). CFG rather than FLUX-style guidance distillation
because it needs one training run (distillation needs a CFG teacher first) and because it exercises the image-first
token order and the CFG batch, the half of the library the v1 testbed (FLUX, text first, no guidance) leaves out.
Together about 6.9M parameters (13.8 MB in bf16).
"""

from __future__ import annotations

from ditfa_jax.configs import SD3Config
from ditfa_jax.scheduler import SchedulerConfig
from ditfa_jax.testbed.v2.world import MAX_LENGTH as TEXT_LENGTH  # text tokens per caption

__all__ = ["TRANSFORMER_CONFIG", "SCHEDULER", "DEFAULT_STEPS", "TEXT_LENGTH", "GUIDANCE_SCALE", "CAPTION_DROPOUT"]

TRANSFORMER_CONFIG = SD3Config(
    sample_size=64, patch_size=4, in_channels=3, out_channels=3, num_layers=5, attention_head_dim=32,
    num_attention_heads=6, joint_attention_dim=128, caption_projection_dim=192, pooled_projection_dim=128,
    pos_embed_max_size=16, qk_norm="rms_norm",
)
SCHEDULER = SchedulerConfig(shift=1.0)  # sigmas linspace(1, 1/n, n), unshifted: matches the logit-normal training
DEFAULT_STEPS = 20
GUIDANCE_SCALE = 4.0  # the CFG scale the pipeline samples with by default (recorded in model_index.json)
CAPTION_DROPOUT = 0.1  # share of training captions replaced by the empty caption (the uncond branch)
