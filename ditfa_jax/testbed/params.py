"""Small NNX modules' parameters as one flat safetensors file, keyed by their '/'-joined NNX paths (the testbed's
text encoder, the Fréchet feature network)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

__all__ = ["flat_params", "fill_params"]


def flat_params(module: nnx.Module, dtype=None) -> dict[str, np.ndarray]:
    """The module's parameters by flat NNX path (cast to ``dtype`` when given)."""
    return {"/".join(map(str, path)): np.asarray(var.get_value() if dtype is None else
                                                 jnp.asarray(var.get_value(), dtype))
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def fill_params(state, weights: Path, dtype):
    """Set every parameter of ``state`` (an NNX state) from ``weights`` in ``dtype``; errors name the file and the
    missing, misshapen or unexpected tensor. Returns ``state``."""
    tensors = load_file(str(weights))
    for path, var in nnx.to_flat_state(state):
        key = "/".join(map(str, path))
        if key not in tensors:
            raise ValueError(f"{weights}: missing tensor {key!r}")
        value = tensors.pop(key)
        if value.shape != var.get_value().shape:
            raise ValueError(f"{weights}: tensor {key!r} has shape {value.shape}, expected {var.get_value().shape}")
        var.set_value(jnp.asarray(value, dtype))
    if tensors:
        raise ValueError(f"{weights}: unexpected tensors {sorted(tensors)[:10]}")
    return state
