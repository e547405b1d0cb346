"""A diffusers `vae/` folder (config.json + safetensors) -> `ditfa_jax.models.vae.AutoencoderKL`.

The NNX modules use diffusers' names, so a key maps by rule: `to_out.0` -> `to_out_0`, a list index -> an int path
entry, a conv/linear `weight` -> `kernel` (OIHW -> HWIO, [out, in] -> [in, out]); GroupNorm keeps `weight`/`bias`.
Tensors are streamed one at a time (shape checked before reading, cast, put on the device); every checkpoint key
must be used and every parameter filled before the model is assembled, so a failure leaves nothing half-made.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.checkpoint import TensorSource
from convert.streaming import ConversionError, to_nnx_layout, torch_shape
from ditfa_jax.models.vae import AutoencoderKL, VAEConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
NORMS = ("norm1", "norm2", "group_norm", "conv_norm_out")


def target_of(key: str) -> tuple:
    """diffusers key -> path in the NNX state."""
    path = [int(p) if p.isdigit() else p for p in key.replace(".to_out.0.", ".to_out_0.").split(".")]
    if path[-1] == "weight" and path[-2] not in NORMS:
        path[-1] = "kernel"
    return tuple(path)


def source_name(path: tuple) -> str:
    """Inverse of `target_of`, for error messages: the diffusers key a parameter expects."""
    name = ".".join(str(p) for p in path[:-1]) + "." + ("weight" if path[-1] == "kernel" else path[-1])
    return name.replace(".to_out_0.", ".to_out.0.")


def resolve_vae_folder(folder: str | Path) -> Path:
    """The folder holding the VAE's config.json: `folder` itself (a `vae/` folder) or a pipeline's `folder/vae`."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    for candidate in (folder, folder / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{folder}: no VAE here; expected config.json with {WEIGHTS_NAME} (a pipeline's vae/ "
                            "folder) or a pipeline folder holding vae/config.json")


def convert_vae_state(source: TensorSource, config: VAEConfig, dtype=jnp.float32, *,
                      config_path: str = "config") -> AutoencoderKL:
    """Build the `AutoencoderKL` that `config` describes from a diffusers-keyed tensor source."""
    dtype = jnp.dtype(dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0))))
    targets = dict(nnx.to_flat_state(state))
    values, unexpected = {}, []
    for key in source.keys():
        path = target_of(key)
        if path not in targets:
            unexpected.append(key)
            continue
        want = torch_shape(targets[path].get_value().shape, path)
        if source.shape(key) != want:
            raise ConversionError(f"{source.describe()}: tensor {key!r} has shape {source.shape(key)}; "
                                  f"{config_path} expects {want}")
        values[path] = jax.device_put(np.ascontiguousarray(to_nnx_layout(source.get(key), path).astype(dtype)))
    if unexpected:
        raise ConversionError(f"{source.describe()}: {len(unexpected)} tensor(s) that the AutoencoderKL of "
                              f"{config_path} does not have (wrong config?): {sorted(unexpected)[:20]}")
    missing = sorted(source_name(path) for path in targets if path not in values)
    if missing:
        raise ConversionError(f"{source.describe()}: {len(missing)} tensor(s) missing that {config_path} needs "
                              f"(partial download or wrong config?): {missing[:20]}")
    for path, var in targets.items():
        var.set_value(values.pop(path))
    return nnx.merge(graphdef, state)


def load_vae(folder: str | Path, *, dtype=jnp.float32) -> AutoencoderKL:
    """Load diffusers' AutoencoderKL from `folder` (a pipeline's `vae/`, or the pipeline folder) in `dtype`."""
    folder = resolve_vae_folder(folder)
    config_path = folder / "config.json"
    config = VAEConfig.from_file(config_path)
    # Prefer the canonical file where a folder also holds variants (e.g. diffusion_pytorch_model.fp16.safetensors).
    weights = folder / WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else folder
    return convert_vae_state(TensorSource(weights), config, dtype, config_path=str(config_path))
