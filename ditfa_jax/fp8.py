"""FP8 (e4m3) linear layers for the transformer blocks: quantised weights, dynamically scaled activations.

Weights are quantised once (`quantize_transformer`) with one scale per output channel; activations are quantised on
the device at every call with one scale per token (the row of the matmul), both as ``amax / 448`` (e4m3's largest
finite value), so nothing saturates and nothing becomes inf or NaN. The matmul takes both FP8 operands and
accumulates in float32 (`lax.dot_general` with ``preferred_element_type``: Hopper's FP8 tensor cores through XLA;
on CPUs the same numbers, slowly), then applies the two scales to the float32 result. Quantised kernels are stored
transposed, [out, in] (torch's layout): Hopper's FP8 GEMM reads both operands with the contracted axis minor, and a
kernel kept [in, out] made XLA transpose every layer's weights at every step (11 ms of a 1024^2 FLUX.1-dev step,
benchmarks/RESULTS.md).

Which layers: every `ditfa_jax.models.layers.Linear` inside the block stacks except the adaLN modulations
(``norm*.linear``, one row per image: no matmul time to win); embedders and the output projection stay as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["E4M3", "E4M3_MAX", "quantize", "dequantize", "quantize_kernel", "fp8_matmul", "quantize_transformer",
           "fp8_layers", "layer_roles", "quantized_layers", "select_layers", "check_plan_layers"]

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448


def quantize(x: jax.Array, axis) -> tuple[jax.Array, jax.Array]:
    """(e4m3 values, float32 scales) with ``x ~= values * scales``; one scale per slice along ``axis`` (kept as
    size-1 axes), ``amax / 448`` (1 for an all-zero slice); values are clipped to +-448, never inf."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    return jnp.clip(x32 / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3), scale


def dequantize(values: jax.Array, scales: jax.Array, dtype=jnp.float32) -> jax.Array:
    return (values.astype(jnp.float32) * scales).astype(dtype)


def quantize_kernel(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A [..., in, out] kernel as (e4m3 [..., out, in], float32 scales [..., out]): one scale per output channel,
    stored transposed for the FP8 GEMM (module docstring)."""
    values, scale = quantize(jnp.swapaxes(kernel, -1, -2), axis=-1)
    return values, jnp.squeeze(scale, -1)


def fp8_matmul(x: jax.Array, kernel_t: jax.Array, kernel_scale: jax.Array, gemm_dtype=jnp.float32) -> jax.Array:
    """``x [..., in] @ dequantize(kernel_t [out, in], kernel_scale [out]).T`` with ``x`` quantised per row, FP8 x
    FP8 products accumulated in float32; returns float32 [..., out]. ``gemm_dtype``: what the GEMM writes before
    the scales are applied (bfloat16 halves that traffic at bf16 precision; not yet timed on a GPU)."""
    xq, x_scale = quantize(x, axis=-1)
    y = jax.lax.dot_general(xq, kernel_t, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=gemm_dtype)
    return y.astype(jnp.float32) * x_scale * kernel_scale.astype(jnp.float32)


def _block_linears(module):
    """(path in its stack, Linear) of every Linear inside the model's block stacks (`module.stacks()`) but the
    adaLN modulations (``norm*``)."""
    from ditfa_jax.models.layers import Linear

    for index, (stack, _, _) in enumerate(module.stacks()):
        for path, m in nnx.iter_modules(stack):
            if isinstance(m, Linear) and not any(str(p).startswith("norm") for p in path):
                yield (f"stack{index}",) + tuple(path), m


def fp8_layers(module) -> list[str]:
    """Paths ('stack0/attn/to_q', ...) of the Linear layers `quantize_transformer` quantises in this module."""
    return ["/".join(map(str, path)) for path, _ in _block_linears(module)]


def layer_roles(module) -> dict[str, list[str]]:
    """The `fp8_layers` paths grouped by role, a path without its stack: {'attn/to_q': ['stack0/attn/to_q', ...]}."""
    roles = {}
    for name in fp8_layers(module):
        roles.setdefault(name.split("/", 1)[1], []).append(name)
    return roles


def quantized_layers(module) -> list[str]:
    """Paths of the block-stack Linear layers of ``module`` that hold FP8 kernels (`quantize_transformer`)."""
    return ["/".join(map(str, path)) for path, m in _block_linears(module) if m.kernel.get_value().dtype == E4M3]


def select_layers(module, spec: str) -> list[str]:
    """The layer paths a user's ``spec`` names: "all", or comma-separated paths from `fp8_layers`
    ('stack0/attn/to_q') or roles, a path without its stack ('attn/to_q': that layer in every stack that has it).
    ValueError naming an unknown entry and the roles there are."""
    names = fp8_layers(module)
    if spec.strip() == "all":
        return names
    roles = layer_roles(module)
    chosen = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        found = [entry] if entry in names else roles.get(entry)
        if not found:
            raise ValueError(f"FP8 layers {spec!r}: {entry!r} is not a layer of this model; expected 'all', or "
                             f"roles from {sorted(roles)}, or paths such as {names[0]!r}")
        chosen += [n for n in found if n not in chosen]
    if not chosen:
        raise ValueError(f"FP8 layers {spec!r}: no layer named; expected 'all' or comma-separated roles/paths")
    return chosen


def check_plan_layers(model, plan) -> None:
    """ValueError unless ``model`` holds FP8 kernels in exactly the layers ``plan`` was calibrated with
    (``plan.fp8_layers``; a plan without them accepts any model), saying how to quantise it."""
    if plan is None or plan.fp8_layers is None:
        return
    have = set(quantized_layers(model.module()))
    if have != set(plan.fp8_layers):
        missing, extra = sorted(set(plan.fp8_layers) - have), sorted(have - set(plan.fp8_layers))
        differs = ([f"{len(missing)} of them not FP8 in the model (e.g. {missing[0]!r})"] if missing else []) + (
            [f"{len(extra)} FP8 layers the plan does not name (e.g. {extra[0]!r})"] if extra else [])
        raise ValueError(
            f"the plan was calibrated with FP8 in {len(plan.fp8_layers)} layers (methods.linear.fp8_layers): "
            f"{'; '.join(differs)}; quantise the model as the plan says, "
            "ditfa_jax.fp8.quantize_transformer(model, plan.fp8_layers) (the CLI does this from the plan)")


def quantize_transformer(model, layers=None):
    """A copy of a `ditfa_jax.loading.Transformer` whose block-stack Linear layers (module docstring) hold e4m3
    kernels with per-output-channel scales (`quantize_kernel`). ``layers``: names from `fp8_layers` to quantise
    (None: all); a stack's blocks share their parameter arrays, so a name covers that layer in every block of its
    stack. ValueError for
    an unknown name or a model quantised already."""
    from ditfa_jax.loading import Transformer

    module = model.module()
    found = list(_block_linears(module))
    if not found:
        raise ValueError("quantize_transformer: the model has no block-stack Linear layers to quantise")
    names = {"/".join(map(str, path)) for path, _ in found}
    wanted = names if layers is None else set(layers)
    unknown = sorted(wanted - names)
    if unknown:
        raise ValueError(f"quantize_transformer: unknown layers {unknown[:3]}; expected names from fp8_layers(), "
                         f"e.g. {sorted(names)[:3]}")
    for path, m in found:
        if "/".join(map(str, path)) not in wanted:
            continue
        kernel = m.kernel.get_value()
        if kernel.dtype == E4M3:
            raise ValueError(f"quantize_transformer: {'/'.join(map(str, path))} is FP8 already")
        values, scale = quantize_kernel(kernel)  # stacked [layers, in, out] -> [layers, out, in], [layers, out]
        m.kernel = nnx.Param(values)
        m.kernel_scale = nnx.Param(scale)
    graphdef, state = nnx.split(module)
    return Transformer(model.config, graphdef, state)
