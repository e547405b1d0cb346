"""Test-session setup shared by every test module."""

import os

# XLA CPU's concurrency-optimised scheduler may move a warpgroup's blocking barrier wait ahead of its own arrivals
# in the Mosaic GPU interpreter, which then deadlocks (seen on 2 cores with the mosaic_gpu backend). Set before
# any jax backend starts.
os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS"), "--xla_cpu_enable_concurrency_optimized_scheduler=false"])
)
# The interpreter runs each warpgroup's program from its own Python thread and blocks inside it on barriers. With
# async dispatch, XLA CPU runs every program on its client's thread pool (as many threads as cores), so on 2 cores
# the blocked warpgroups can hold every pool thread while the one that would release them waits for one: a hang
# (seen in a fresh-clone CI run). Inline execution runs each program on its caller's thread.
# Even inline, XLA CPU runs a program's callbacks on its intra-op thread pool (one thread per core). The interpreter's
# outer callback and the warpgroups' barrier waits each hold a pool thread while they wait, so on 2 cores the pool
# can still run dry (a hang seen again after the change above, in test_persistent_programs_...). PJRT_NPROC sizes
# that pool (XLA's knob for CI CPU reservations): 16 threads leave room for every thread the interpreter can block.
os.environ.setdefault("PJRT_NPROC", "16")
import jax  # noqa: E402 (after XLA_FLAGS: the backend reads them when it starts, not at import)

jax.config.update("jax_cpu_enable_async_dispatch", False)
