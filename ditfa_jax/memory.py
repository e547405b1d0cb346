"""Memory estimates checked before anything is allocated: a model or run that cannot fit is refused up front.

Parameters are counted from the abstract state (`nnx.eval_shape`: shapes only, nothing allocated) and must fit
both the host (loading streams them into one host copy) and the device; a sampling run adds a lower bound of its
activations. The limits are the machine's: physical memory (or a smaller cgroup limit) for the host, JAX's
`bytes_limit` for an accelerator. Only what certainly cannot fit is refused; fitting is not promised.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np


class InsufficientMemoryError(ValueError):
    """A model or run needs more memory than the machine has."""


def state_bytes(state) -> int:
    """Bytes of a (possibly abstract) NNX state or pytree of arrays."""
    return sum(int(np.prod(x.shape, dtype=np.float64)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(state))


def host_bytes() -> int:
    """Physical memory of the host, or the cgroup's memory limit when smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")
    try:
        text = limit.read_text().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    return total


def device_bytes() -> int | None:
    """Memory of the first accelerator (JAX's bytes_limit), or None on a CPU-only machine."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    return (device.memory_stats() or {}).get("bytes_limit")


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


def check_fits(need: int, what: str, *, host: bool = True) -> None:
    """Refuse `need` bytes for `what` when they exceed the device's memory (and the host's, with `host`)."""
    limits = [("host memory", host_bytes())] if host else []
    device = device_bytes()
    if device is not None:
        limits.append((f"{jax.devices()[0].platform} device memory", device))
    elif not host:
        limits.append(("host memory (the CPU is the device)", host_bytes()))
    for name, limit in limits:
        if need > limit:
            raise InsufficientMemoryError(f"{what} cannot fit: it needs at least {_gib(need)} and the {name} is "
                                          f"{_gib(limit)} (check the config's sizes and the run's, or the dtype)")


def check_parameters(state, what: str) -> None:
    """Refuse loading `state` (abstract) when its parameters cannot fit the host and the device."""
    check_fits(state_bytes(state), f"the parameters of {what}")
