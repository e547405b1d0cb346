"""diffusers transformer weights -> the NNX models' parameter state.

The NNX modules use diffusers' names, so a parameter's key follows by rule: `to_out_0` -> `to_out.0`, `net_0`/`net_2`
-> `net.0`/`net.2`, a `kernel` -> a Linear `weight` (transposed) or the SD3 patch conv's (HWIO -> OIHW), and index N
of a stack's leading layer axis -> block `N` (SD3: block `start + N` of the segment starting at `start`). The
checks and the streaming are `convert.streaming.stream_into_state`'s.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.streaming import FLOAT_DTYPES, ConversionError, stream_into_state
from ditfa_jax.family import family_of
from ditfa_jax.models.sd3 import layer_segments

STACKS = ("transformer_blocks", "single_transformer_blocks", "segments")


def build_abstract(config, dtype):
    """The model's graph and parameter shapes, without allocating any parameter."""
    model_cls = family_of(config).module_class
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def source_name(path: tuple, index: int | None, config) -> str:
    """The diffusers key of a parameter slot: `path` in the NNX state, `index` its layer in a stack (or None)."""
    parts = ["weight" if p == "kernel" else str(p) for p in path]
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
    graphdef, abstract = build_abstract(config, jnp.dtype(dtype))
    state = stream_into_state(source, abstract, lambda path, index: source_name(path, index, config),
                              expected_by=f"the {type(config).__name__}", stacked=STACKS, progress=progress)
    return graphdef, state


def _checkpoint_dtype(source, keys) -> np.dtype:
    """The dtype of the checkpoint's weights (read off one projection, without loading it)."""
    weights = [k for k in keys if k.endswith(".weight") and "norm" not in k]
    key = weights[0] if weights else keys[0]
    dtype = source.dtype(key)
    if str(dtype) not in FLOAT_DTYPES:
        raise ConversionError(f"{source.describe()}: tensor {key!r} is {dtype}; expected floating-point weights (F32, "
                              "F16, BF16 or F64): quantised checkpoints are not supported")
    return dtype
