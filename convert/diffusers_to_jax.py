"""diffusers transformer weights -> the NNX models' parameter state.

The NNX modules use diffusers' names, so a key maps by rule: `to_out.0` -> `to_out_0`, `net.0`/`net.2` ->
`net_0`/`net_2`, a Linear `weight` -> `kernel` (transposed), the SD3 patch conv to HWIO, and block `N` of a
stack -> index N of that stack's leading layer axis (SD3: of the segment holding layer N). Conversion streams one
tensor at a time into preallocated host buffers of the target dtype, checks every source key is used and every
target is filled with the right shape, and only then builds the model: a failure leaves nothing half-made.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from convert.streaming import ConversionError
from ditfa_jax.configs import FluxConfig, SD3Config
from ditfa_jax.models.flux import FluxTransformer
from ditfa_jax.models.sd3 import SD3Transformer, layer_segments


def build_abstract(config, dtype):
    """The model's graph and parameter shapes, without allocating any parameter."""
    model_cls = FluxTransformer if isinstance(config, FluxConfig) else SD3Transformer
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def target_of(key: str, config) -> tuple[tuple, int | None]:
    """diffusers key -> (path in the NNX state, layer index within its stack or None)."""
    name = key.replace(".to_out.0.", ".to_out_0.").replace(".net.0.", ".net_0.").replace(".net.2.", ".net_2.")
    module, _, param = name.rpartition(".")
    if param == "weight" and not re.search(r"norm_(q|k|added_q|added_k)$", module):
        param = "kernel"
    if name == "pos_embed.pos_embed":
        module, param = "pos_embed", "pos_embed"
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if m is None:
        return (*module.split("."), param), None
    stack, index, rest = m.group(1), int(m.group(2)), m.group(3).split(".")
    if isinstance(config, SD3Config):
        for seg, (start, n, _, _) in enumerate(layer_segments(config)):
            if start <= index < start + n:
                return ("segments", seg, *rest, param), index - start
        return ("segments", "?", *rest, param), index
    return (stack, *rest, param), index


def to_target_layout(array: np.ndarray, path: tuple) -> np.ndarray:
    """torch layout -> flax layout for one tensor."""
    if path[-1] != "kernel":
        return array
    if array.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
        return array.transpose(2, 3, 1, 0)
    return array.T  # linear [out, in] -> [in, out]


def torch_shape(flax_shape: tuple, path: tuple) -> tuple:
    """The torch-layout shape of a tensor whose flax layout is `flax_shape` (inverse of `to_target_layout`)."""
    if path[-1] != "kernel":
        return tuple(flax_shape)
    if len(flax_shape) == 4:
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    return tuple(flax_shape[::-1])


def source_name(path: tuple, index: int | None, config) -> str:
    """Inverse of `target_of`, for error messages: the diffusers key a target slot expects."""
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    if parts[0] == "pos_embed" and parts[-1] == "pos_embed":
        return "pos_embed.pos_embed"
    if parts[0] == "segments":
        start = layer_segments(config)[int(parts[1])][0]
        parts = ["transformer_blocks", str(start + index), *parts[2:]]
    elif index is not None:
        parts = [parts[0], str(index), *parts[1:]]
    name = ".".join(parts)
    return name.replace(".to_out_0.", ".to_out.0.").replace(".net_0.", ".net.0.").replace(".net_2.", ".net.2.")


def convert_state(source, config, dtype=None, progress: bool = True):
    """Convert a diffusers-keyed tensor source into (graphdef, state) of the matching NNX model.

    `dtype` is the parameter dtype (None: the checkpoint's own floating dtype). The SD3 position table stays fp32.
    """
    keys = source.keys()
    if not keys:
        raise ConversionError(f"{source.describe()}: checkpoint holds no tensors")
    if dtype is None:
        dtype = _checkpoint_dtype(source, keys)
    dtype = jnp.dtype(dtype)
    graphdef, abstract = build_abstract(config, dtype)
    targets = {path: var for path, var in nnx.to_flat_state(abstract)}
    buffers = {path: np.empty(var.get_value().shape, var.get_value().dtype) for path, var in targets.items()}
    filled = {path: np.zeros(buf.shape[0] if _is_stacked(path) else 1, bool) for path, buf in buffers.items()}

    unexpected = []
    for key in tqdm(keys, desc="converting", unit="tensor", disable=not progress, leave=False):
        path, index = target_of(key, config)
        if path not in targets:
            unexpected.append(key)
            continue
        want = buffers[path].shape[1:] if index is not None else buffers[path].shape
        if index is not None and index >= buffers[path].shape[0]:
            unexpected.append(key)
            continue
        array = to_target_layout(source.get(key), path)
        if array.shape != want:
            raise ConversionError(f"{source.describe()}: tensor {key!r} has shape {tuple(source.shape(key))}; the "
                                  f"config expects {torch_shape(want, path)}")
        if index is None:
            buffers[path][...] = array
            filled[path][0] = True
        else:
            buffers[path][index] = array
            filled[path][index] = True
    if unexpected:
        raise ConversionError(f"{source.describe()}: {len(unexpected)} tensor(s) the {type(config).__name__} "
                              f"does not use (wrong config or model type?): {sorted(unexpected)[:20]}")
    missing = [source_name(path, (i if _is_stacked(path) else None), config)
               for path, done in filled.items() for i in np.flatnonzero(~done)]
    if missing:
        raise ConversionError(f"{source.describe()}: {len(missing)} tensor(s) missing (partial download or "
                              f"wrong config?): {sorted(missing)[:20]}")

    for path, var in targets.items():
        var.set_value(jax.device_put(buffers.pop(path)))
    return graphdef, abstract


def _is_stacked(path: tuple) -> bool:
    return path[0] in ("transformer_blocks", "single_transformer_blocks", "segments")


def _checkpoint_dtype(source, keys) -> np.dtype:
    """The dtype of the checkpoint's weights (read off one projection, without loading it)."""
    weights = [k for k in keys if k.endswith(".weight") and "norm" not in k]
    return source.dtype(weights[0] if weights else keys[0])
