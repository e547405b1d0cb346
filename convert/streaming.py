"""Streaming a torch-layout checkpoint into an abstract NNX state: the one mechanism behind every loader.

A loader supplies the model-specific part, `key_of(path, index)`: the checkpoint key of each parameter slot (`path`
in the NNX state; `index` the layer of a stacked parameter, or None). Everything else happens here, once: every
checkpoint key must name a slot (or be a known tied copy or harmless buffer), every slot must be in the checkpoint,
every shape and dtype is checked from the file headers before any tensor is read (and the parameters' size
against the machine's memory), and tensors are then read one at a time into preallocated host buffers of the
target dtype (torch -> NNX layout on the way) before the state is filled. NaN or infinite weights are found on
the device (one reduction per parameter) and named. A failure therefore leaves nothing half-made, and host memory
stays near one copy of the parameters.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ditfa_jax.memory import check_parameters

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


class ConversionError(ValueError):
    """A checkpoint does not match the model its config describes."""


def to_nnx_layout(array: np.ndarray, path: tuple) -> np.ndarray:
    """torch layout -> NNX layout: a `kernel` is a conv OIHW -> HWIO or a linear [out, in] -> [in, out]."""
    if path[-1] != "kernel":
        return array
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T


def torch_shape(nnx_shape: tuple, path: tuple) -> tuple:
    """The torch-layout shape of a tensor whose NNX layout is `nnx_shape` (inverse of `to_nnx_layout`)."""
    if path[-1] != "kernel":
        return tuple(nnx_shape)
    if len(nnx_shape) == 4:
        kh, kw, cin, cout = nnx_shape
        return (cout, cin, kh, kw)
    return tuple(nnx_shape[::-1])


def torch_index(index: tuple, path: tuple) -> tuple:
    """An element's index in the torch layout from its index in the NNX layout (the inverse of `to_nnx_layout`)."""
    if path[-1] != "kernel":
        return index
    if len(index) == 4:
        kh, kw, cin, cout = index
        return (cout, cin, kh, kw)
    return index[::-1]


def stream_into_state(source, state: nnx.State, key_of: Callable[[tuple, int | None], str], *, expected_by: str,
                      stacked: tuple[str, ...] = (), aliases: dict[str, str] | None = None,
                      ignored: frozenset[str] = frozenset(), progress: bool = False) -> nnx.State:
    """Fill the abstract `state` (from `nnx.eval_shape`) with the tensors of `source`; returns it.

    source: a TensorSource-like object (keys, __contains__, shape, get, describe). Stacked parameters are those under
    the top-level modules named in `stacked`, with a leading layer axis. `aliases` maps a tied duplicate key to the
    key it must equal (checked, then dropped); `ignored` keys carry no parameter. `expected_by` names the model in
    error messages (e.g. "the model in <folder>/config.json").
    """
    targets = dict(nnx.to_flat_state(state))
    check_parameters(state, expected_by)  # before the per-layer loops below: a config can claim 10^9 layers
    expected = {}  # checkpoint key -> (state path, layer index or None)
    for path, var in targets.items():
        for index in (range(var.get_value().shape[0]) if path[0] in stacked else [None]):
            key = key_of(path, index)
            assert key not in expected, f"key_of names {key!r} for two parameter slots"
            expected[key] = (path, index)
    aliases = aliases or {}
    where = source.describe()

    unexpected = sorted(k for k in source.keys() if k not in expected and k not in ignored and k not in aliases)
    if unexpected:
        raise ConversionError(f"{where}: {len(unexpected)} tensor(s) that {expected_by} does not use: it does not "
                              f"have those parameters (wrong folder, config or model type?): {unexpected[:20]}")
    missing = sorted(k for k in expected if k not in source)
    if missing:
        raise ConversionError(f"{where}: {len(missing)} tensor(s) missing that {expected_by} needs (partial "
                              f"download or wrong config?): {missing[:20]}")
    for key, (path, index) in [*expected.items(), *((a, expected[k]) for a, k in aliases.items())]:
        want = torch_shape(targets[path].get_value().shape[0 if index is None else 1:], path)
        if source.shape(key) != want:
            raise ConversionError(f"{where}: tensor {key!r} has shape {source.shape(key)}; {expected_by} expects "
                                  f"{want}")
        if str(source.dtype(key)) not in FLOAT_DTYPES:
            raise ConversionError(f"{where}: tensor {key!r} is {source.dtype(key)}; {expected_by} expects floating-"
                                  "point weights (F32, F16, BF16 or F64): quantised checkpoints are not supported")

    buffers = {path: np.empty(var.get_value().shape, var.get_value().dtype) for path, var in targets.items()}

    def slot(key):
        path, index = expected[key]
        return path, (buffers[path] if index is None else buffers[path][index])

    for key in tqdm(source.keys(), desc="converting", unit="tensor", disable=not progress, leave=False):
        if key in expected:
            path, buffer = slot(key)
            buffer[...] = to_nnx_layout(source.get(key), path)
    for alias, key in aliases.items():
        path, buffer = slot(key)
        if not np.array_equal(buffer, to_nnx_layout(source.get(alias), path).astype(buffer.dtype)):
            raise ConversionError(f"{where}: tied tensors {alias!r} and {key!r} differ; expected equal copies")
    for path, var in targets.items():
        var.set_value(jax.device_put(buffers.pop(path)))
    check_finite(targets, key_of, where, stacked=stacked, index_of=torch_index)
    return state


@jax.jit
def _finite_flags(values):
    """One flag per array: its float32 sum is finite (any NaN/Inf makes it so; an overflowing sum of finite values
    is a false alarm that `check_finite` clears on the host)."""
    return jnp.stack([jnp.isfinite(jnp.sum(v, dtype=jnp.float32)) for v in values])


def check_finite(targets: dict, name_of: Callable[[tuple, int | None], str], where: str, *,
                 stacked: tuple[str, ...] = (), index_of: Callable[[tuple, tuple], tuple] = lambda i, p: i) -> None:
    """Refuse NaN/Inf in the filled variables `targets` (path -> variable), naming the first bad tensor:
    `name_of(path, layer)` is its checkpoint name (layer: the index along the leading axis of a parameter under
    the modules in `stacked`, else None) and `index_of(index, path)` an element's index in the checkpoint."""
    paths = list(targets)
    flags = jax.device_get(_finite_flags([targets[p].get_value() for p in paths])) if paths else []
    for path, ok in zip(paths, flags):
        if ok:
            continue
        value = np.asarray(targets[path].get_value())
        layers = range(value.shape[0]) if path[0] in stacked else [None]
        for index in layers:
            part = value if index is None else value[index]
            bad = ~np.isfinite(part)
            if bad.any():
                first = index_of(tuple(int(i) for i in np.argwhere(bad)[0]), path)
                raise ConversionError(f"{where}: tensor {name_of(path, index)!r} holds {int(bad.sum())} NaN/Inf "
                                      f"value(s) (first at index {first}); the checkpoint is corrupt (download it "
                                      "again) or was saved from a diverged run")
