"""A diffusers `vae/` folder (config.json + safetensors) -> `ditfa_jax.models.vae.AutoencoderKL`.

The NNX modules use diffusers' names, so a parameter's key follows by rule: `to_out_0` -> `to_out.0`, an int path
entry -> a list index, a `kernel` -> a conv/linear `weight` (HWIO -> OIHW, [in, out] -> [out, in]); GroupNorm keeps
`weight`/`bias`. The checks and the streaming are `convert.streaming.stream_into_state`'s.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from convert.checkpoint import TensorSource
from convert.streaming import stream_into_state
from ditfa_jax.models.vae import AutoencoderKL, VAEConfig

WEIGHTS_PREFIX = "diffusion_pytorch_model"  # <prefix>.safetensors, or sharded: <prefix>.safetensors.index.json
WEIGHTS_NAME = f"{WEIGHTS_PREFIX}.safetensors"


def source_name(path: tuple) -> str:
    """The diffusers key of the parameter at `path` in the NNX state."""
    name = ".".join("weight" if p == "kernel" else str(p) for p in path)
    return name.replace(".to_out_0.", ".to_out.0.")


def resolve_vae_folder(folder: str | Path) -> Path:
    """The folder holding the VAE's config.json: `folder` itself (a `vae/` folder) or a pipeline's `folder/vae`."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    for candidate in (folder, folder / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{folder}: no VAE here; expected config.json with {WEIGHTS_NAME} (a "
                            "pipeline's vae/ folder) or a pipeline folder holding vae/config.json")


def load_vae(folder: str | Path, *, dtype=jnp.float32) -> AutoencoderKL:
    """Load diffusers' AutoencoderKL from `folder` (a pipeline's `vae/`, or the pipeline folder) in `dtype`."""
    folder = resolve_vae_folder(folder)
    config_path = folder / "config.json"
    config = VAEConfig.from_file(config_path)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0))))
    source = TensorSource(folder, prefix=WEIGHTS_PREFIX, what="VAE weights")
    state = stream_into_state(source, abstract, lambda path, _: source_name(path),
                              expected_by=f"the AutoencoderKL of {config_path}")
    return nnx.merge(graphdef, state)
