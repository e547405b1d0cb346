"""Whether a model fits the accelerator JAX runs on: a one-line report, or a refusal that says what to do.

Used by the notebooks before they download or load anything: a preset states the memory it needs, and a device
with less is refused with the presets that do fit.
"""

from __future__ import annotations

import os

import jax


def memory_gb(device=None) -> float | None:
    """GB that JAX may allocate on the device (`bytes_limit`: on a GPU, XLA_PYTHON_CLIENT_MEM_FRACTION of the card,
    75 % unless set before jax is imported); None where the device does not report it (the CPU)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() or {}
    return stats["bytes_limit"] / 1e9 if "bytes_limit" in stats else None


def check_fits(need_gb: float, what: str, *, alternatives: dict[str, float] | None = None, device=None) -> str:
    """A report of the device and what `what` needs; RuntimeError when it needs `need_gb` GB of accelerator memory
    and the device has less (or is a CPU). `alternatives`: name -> GB of the other choices, to name those that fit."""
    device = device or jax.devices()[0]
    have = memory_gb(device)
    name = f"{device.device_kind} ({device.platform})"
    if need_gb <= 0:
        return f"{name}: {what} is small enough for any device"
    if device.platform == "cpu":
        problem = "this runtime has only a CPU"
    elif have is None:
        return f"{name} does not report its memory; {what} needs about {need_gb:g} GB: trying"
    elif have < need_gb:
        fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75 (JAX's default)")
        problem = (f"{name} lets JAX allocate {have:.1f} GB (XLA_PYTHON_CLIENT_MEM_FRACTION={fraction}, set before "
                   "jax is imported)")
    else:
        return f"{name}: {have:.1f} GB for JAX; {what} needs about {need_gb:g} GB: it fits"
    fits = [k for k, gb in (alternatives or {}).items() if k != what and (gb <= 0 or (have or 0) >= gb)]
    raise RuntimeError(f"{what} needs an accelerator with about {need_gb:g} GB of memory, but {problem}. Choose a "
                       "larger GPU (Colab: Runtime > Change runtime type)"
                       + (f", or a preset that fits here: {', '.join(fits)}" if fits else "") + ".")
