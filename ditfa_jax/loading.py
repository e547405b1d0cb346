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
from safetensors.numpy import save_file

from convert.bfl_flux import BFLFluxSource, infer_flux_config, is_bfl_flux
from convert.checkpoint import TensorSource
from convert.diffusers_to_jax import STACKS, build_abstract, convert_state
from convert.streaming import FLOAT_DTYPES, ConversionError, check_finite
from ditfa_jax.configs import FluxConfig, SD3Config, config_from_dict, config_to_dict, read_config, read_json
from ditfa_jax.files import atomic_folder
from ditfa_jax.family import family_of
from ditfa_jax.hub import CONFIGS, TRANSFORMER, resolve, snapshot_check
from ditfa_jax.memory import check_parameters
from ditfa_jax.xla_options import model_jit

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
        """The compute dtype: that of the parameters (an FP8 model's e4m3 kernels aside)."""
        return next(a.dtype for a in jax.tree_util.tree_leaves(self.state) if a.dtype != jnp.float8_e4m3fn)

    def module(self):
        return nnx.merge(self.graphdef, self.state)

    def place_on(self, mesh, shard: bool | None = None) -> "Transformer":
        """Put the weights on every device of `mesh` (a `jax.sharding.Mesh`), once, so that sampling on that mesh
        does not copy them per call; returns self. Replicated, or split over the devices (`shard=True`; None: when
        they would take more than half of one device's memory)."""
        from ditfa_jax import sharding
        from ditfa_jax.memory import device_bytes, state_bytes

        if shard is None:
            have = device_bytes()
            shard = have is not None and state_bytes(self.state) > 0.5 * have
        self.state = (sharding.shard_weights if shard else sharding.replicate)(self.state, mesh)
        return self

    @cached_property
    def _apply(self):
        graphdef = self.graphdef

        @model_jit
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
        if config_path is not None and read_json(config_path, "transformer config").get(CONVERTED_MARKER):
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
    source = TensorSource(weights, prefix="diffusion_pytorch_model", what="transformer weights")
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
    """A folder written by `save_converted`, with the checks of a conversion: names, shapes, dtypes, memory, NaN."""
    config_path = folder / "config.json"
    cfg = config_from_dict(read_json(config_path, "transformer config"), source=str(config_path))
    source = TensorSource(folder / CONVERTED_WEIGHTS, what="converted transformer params")
    where = str(folder / CONVERTED_WEIGHTS)
    keys = [k for k in source.keys() if not k.endswith("pos_embed")]
    if not keys:
        raise ConversionError(f"{where}: holds no parameters")
    checkpoint_dtype = source.dtype(keys[0])
    if str(checkpoint_dtype) not in FLOAT_DTYPES:
        raise ConversionError(f"{where}: tensor {keys[0]!r} is {checkpoint_dtype}; expected floating-point params")
    graphdef, state = build_abstract(cfg, jnp.dtype(dtype or checkpoint_dtype))
    check_parameters(state, f"the {type(cfg).__name__} of {config_path}")
    targets = dict(nnx.to_flat_state(state))
    names = {"/".join(map(str, p)): p for p in targets}
    missing = sorted(set(names) - set(source.keys()))
    unexpected = sorted(set(source.keys()) - set(names))
    if missing or unexpected:
        raise ConversionError(f"{where}: does not match {config_path}: missing {missing[:10]}, unexpected "
                              f"{unexpected[:10]} (written for another config?)")
    for key, p in names.items():
        want = targets[p].get_value().shape
        if source.shape(key) != tuple(want) or str(source.dtype(key)) not in FLOAT_DTYPES:
            raise ConversionError(f"{where}: tensor {key!r} is {source.dtype(key)} {source.shape(key)}; "
                                  f"{config_path} expects floating-point {tuple(want)}")
    for key, p in names.items():
        targets[p].set_value(jnp.asarray(source.get(key), targets[p].get_value().dtype))
    check_finite(targets, lambda p, index: "/".join(map(str, p)) + ("" if index is None else f" (layer {index})"),
                 where, stacked=STACKS)
    return Transformer(cfg, graphdef, state)
