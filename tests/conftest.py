"""Test-session setup shared by every test module."""

import os

# XLA CPU's concurrency-optimised scheduler may move a warpgroup's blocking barrier wait ahead of its own arrivals
# in the Mosaic GPU interpreter, which then deadlocks (seen on 2 cores with the mosaic_gpu backend). Set before
# any jax backend starts.
os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS"), "--xla_cpu_enable_concurrency_optimized_scheduler=false"])
)
