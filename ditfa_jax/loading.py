"""Loading a transformer from a checkpoint, and the callable model that mirrors the diffusers `forward`.

`load_transformer(path)` accepts a diffusers pipeline folder (with `transformer/`), a transformer folder
(`config.json` + safetensors, single or sharded), an original BFL single-file FLUX checkpoint, or a folder written
by `save_converted` (fast reload, no conversion); each may also be a Hugging Face repo id ("org/name", see
`ditfa_jax.hub`), whose transformer files are fetched into the local Hugging Face cache.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert.bfl_flux import BFLFluxSource, infer_flux_config, is_bfl_flux
from convert.checkpoint import TensorSource
from convert.diffusers_to_jax import build_abstract, convert_state
from ditfa_jax.configs import FluxConfig, SD3Config, config_from_dict, config_to_dict, read_config
from ditfa_jax.files import atomic_folder
from ditfa_jax.family import family_of
from ditfa_jax.hub import CONFIGS, TRANSFORMER, resolve, snapshot_check

CONVERTED_MARKER = "ditfa_jax_converted"
CONVERTED_WEIGHTS = "params.safetensors"


class Transformer:
    """A loaded MMDiT: its config plus NNX (graphdef, state); calling it runs one jitted denoiser evaluation.

    Inputs and outputs mirror the diffusers model's `forward` (arrays instead of tensors). `module()` gives the NNX
    module, and `graphdef`/`state` the pure-function form used inside samplers.
    """

    def __init__(self, config: FluxConfig | SD3Config, graphdef, state):
        self.config, self.graphdef, self.state = config, graphdef, state

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def dtype(self):
        return jax.tree_util.tree_leaves(self.state)[0].dtype

    def module(self):
        return nnx.merge(self.graphdef, self.state)

    @cached_property
    def _apply(self):
        graphdef = self.graphdef

        @jax.jit
        def apply(state, kwargs):
            return nnx.merge(graphdef, state)(**kwargs)

        return apply

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids=None,
                 txt_ids=None, guidance=None):
        hidden_states = jnp.asarray(hidden_states)
        encoder_hidden_states = jnp.asarray(encoder_hidden_states)
        batch = hidden_states.shape[0]
        for name, arr in (("encoder_hidden_states", encoder_hidden_states),
                          ("pooled_projections", pooled_projections)):
            if np.shape(arr)[0] != batch:
                raise ValueError(f"batch mismatch: hidden_states has batch {batch} but {name} has shape "
                                 f"{np.shape(arr)}")
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
        kwargs = dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                      pooled_projections=jnp.asarray(pooled_projections), timestep=timestep)
        kwargs.update(family_of(self.config).forward_inputs(
            self.config, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, img_ids=img_ids,
            txt_ids=txt_ids, guidance=guidance))
        return self._apply(self.state, kwargs)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(weights location, config.json or None) for the accepted checkpoint layouts, or a clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return path, None
    for folder in (path / "transformer", path):
        if (folder / "config.json").is_file():
            return folder, folder / "config.json"
    raise FileNotFoundError(
        f"{path} is not a checkpoint: expected transformer/config.json (diffusers pipeline folder), config.json "
        "with safetensors weights (transformer folder), a BFL single .safetensors file, or a folder written by "
        "save_converted")


def load_transformer(path: str | Path, *, dtype=None, config: str | Path | None = None, progress: bool = True,
                     revision: str | None = None) -> Transformer:
    """Load a FLUX.1 or SD3/SD3.5 transformer as a `Transformer` from a checkpoint path or a repo id.

    dtype: parameter dtype (default: the checkpoint's). config: a diffusers config.json for a single-file checkpoint
    whose architecture cannot be read off its shapes (e.g. a non-standard RoPE split). revision: of a repo id.
    """
    folder = resolve(path, TRANSFORMER, revision=revision)
    with snapshot_check(path, folder):
        weights, config_path = resolve_checkpoint(folder)
        if config_path is not None and json.loads(config_path.read_text()).get(CONVERTED_MARKER):
            return load_converted(weights, dtype=dtype)
        cfg, source = _config_and_source(weights, config_path, config)
    graphdef, state = convert_state(source, cfg, dtype=dtype, progress=progress)
    return Transformer(cfg, graphdef, state)


def transformer_config(path: str | Path, *, config: str | Path | None = None,
                       revision: str | None = None) -> FluxConfig | SD3Config:
    """The config of the transformer `load_transformer(path)` would load, read without loading any weight (a
    single BFL file's architecture is read off its header; of a repo id only the json files are fetched), so that a
    run's settings can be checked first."""
    folder = resolve(path, CONFIGS, revision=revision)
    with snapshot_check(path, folder):
        weights, config_path = resolve_checkpoint(folder)
        if config_path is not None and config is None:
            return read_config(config_path)
        return _config_and_source(weights, config_path, config)[0]


def _config_and_source(weights: Path, config_path: Path | None, config: str | Path | None):
    source = TensorSource(weights, prefix="diffusion_pytorch_model")
    if is_bfl_flux(source.keys()):
        source = BFLFluxSource(source)
        cfg = read_config(config) if config is not None else infer_flux_config(source)
    elif config_path is not None or config is not None:
        cfg = read_config(config if config is not None else config_path)
    else:
        raise ValueError(f"{weights}: a diffusers-layout single file needs its config.json (pass config=...)")
    return cfg, source


def save_converted(model: Transformer, out_dir: str | Path) -> Path:
    """Write converted params (safetensors, flax layout) + config for fast reloads; atomic (temp dir + rename)."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        tensors = {"/".join(map(str, path)): np.asarray(var.get_value())
                   for path, var in nnx.to_flat_state(model.state)}
        save_file(tensors, str(tmp / CONVERTED_WEIGHTS))
        (tmp / "config.json").write_text(json.dumps({**config_to_dict(model.config), CONVERTED_MARKER: 1},
                                                    indent=2))
    return out_dir


def load_converted(folder: Path, dtype=None) -> Transformer:
    raw = json.loads((folder / "config.json").read_text())
    cfg = config_from_dict(raw, source=str(folder / "config.json"))
    tensors = load_file(str(folder / CONVERTED_WEIGHTS))
    first = next(v for k, v in tensors.items() if not k.endswith("pos_embed"))
    dtype = jnp.dtype(dtype or first.dtype)
    graphdef, state = build_abstract(cfg, dtype)
    for p, var in nnx.to_flat_state(state):
        key = "/".join(map(str, p))
        if key not in tensors:
            raise ValueError(f"{folder / CONVERTED_WEIGHTS}: missing {key!r}")
        var.set_value(jnp.asarray(tensors.pop(key), var.get_value().dtype))
    if tensors:
        raise ValueError(f"{folder / CONVERTED_WEIGHTS}: unexpected tensors {sorted(tensors)[:10]}")
    return Transformer(cfg, graphdef, state)
