"""How the programs that run the transformer are compiled: XLA options chosen by measurement on the H200.

`model_jit` is `jax.jit` with these options, for every program that evaluates the transformer (the sampler, the
model's forward, the plan search's layer runners). The options apply to those programs only, not to the user's own
computations in the same process, and the CPU compiler ignores them.

Triton GEMM fusions are off: XLA's autotuner otherwise compiles some of the transformer's linear layers as Triton
GEMM fusions, and the cuBLAS GEMMs it uses instead make a FLUX.1-dev-sized step faster on the H200 (1024^2: 144.5
to 137.8 ms; 2048^2: 714 to 700 ms; SD3 with CFG: 43.5 to 41.5 ms; compile time unchanged; benchmarks/RESULTS.md,
"Dense step"). Set DITFA_XLA_TRITON_GEMM=1 before importing ditfa_jax to keep XLA's default, for instance to
compare on another GPU.
"""

from __future__ import annotations

import functools
import os

import jax

MODEL_COMPILER_OPTIONS: dict[str, bool] = (
    {} if os.environ.get("DITFA_XLA_TRITON_GEMM") == "1" else {"xla_gpu_enable_triton_gemm": False})


def model_jit(fun=None, **jit_kwargs):
    """`jax.jit(fun, **jit_kwargs)` compiled with `MODEL_COMPILER_OPTIONS`; usable as a bare or called decorator."""
    if fun is None:
        return functools.partial(model_jit, **jit_kwargs)
    return jax.jit(fun, compiler_options=MODEL_COMPILER_OPTIONS or None, **jit_kwargs)
