"""Flow-matching Euler schedules, exactly as diffusers' `FlowMatchEulerDiscreteScheduler` + the pipelines set them.

Computed on the host in float64 and returned as float32 arrays: `sigmas` has `num_steps + 1` entries (ending in 0)
and `timesteps = sigmas[:-1] * num_train_timesteps`. FLUX pipelines pass `sigmas = linspace(1, 1/n, n)` and a
resolution-dependent `mu` (dynamic shifting, dev) or a fixed shift (schnell: 1.0); SD3 pipelines let the scheduler
space timesteps evenly between its shifted sigma_max and sigma_min (shift 3.0).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    UNSUPPORTED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                   "use_beta_sigmas", "stochastic_sampling")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "scheduler config") -> "SchedulerConfig":
        used = [k for k in cls.UNSUPPORTED if raw.get(k)]
        if used:
            raise ValueError(f"{source}: scheduler options {used} are not supported (plain flow-match Euler only)")
        if raw.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise ValueError(f"{source}: time_shift_type must be 'exponential' or 'linear'")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields and v is not None})

    @classmethod
    def from_file(cls, path: str | Path) -> "SchedulerConfig":
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), source=str(path))


FLUX_DEV_SCHEDULER = SchedulerConfig(shift=3.0, use_dynamic_shifting=True)
FLUX_SCHNELL_SCHEDULER = SchedulerConfig(shift=1.0)
SD3_SCHEDULER = SchedulerConfig(shift=3.0)


def calculate_shift(image_seq_len: int, config: SchedulerConfig) -> float:
    """FLUX's mu: linear in the number of image tokens between (base_seq_len, base_shift) and (max, max_shift)."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return image_seq_len * m + config.base_shift - m * config.base_image_seq_len


def _shift(sigmas: np.ndarray, config: SchedulerConfig, mu: float | None) -> np.ndarray:
    if config.use_dynamic_shifting:
        if mu is None:
            raise ValueError("this scheduler uses dynamic shifting: mu (from the image token count) is required")
        if config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return mu / (mu + (1 / sigmas - 1))
    return config.shift * sigmas / (1 + (config.shift - 1) * sigmas)


def flow_match_schedule(config: SchedulerConfig, num_steps: int, *, sigmas: np.ndarray | None = None,
                        mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [n+1], timesteps [n]) as `scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)` makes them."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n_train = config.num_train_timesteps
    if sigmas is None:
        train_sigmas = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
        if not config.use_dynamic_shifting:
            train_sigmas = _shift(train_sigmas.astype(np.float32), config, None).astype(np.float32)
        sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
        sigmas = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    else:
        sigmas = np.asarray(sigmas, np.float32).astype(np.float64)
        if len(sigmas) != num_steps:
            raise ValueError(f"{len(sigmas)} sigmas given for {num_steps} steps")
    shifted = _shift(sigmas, config, mu).astype(np.float32)
    timesteps = shifted * np.float32(n_train)
    return np.concatenate([shifted, np.zeros(1, np.float32)]), timesteps


def flux_schedule(config: SchedulerConfig, num_steps: int, image_seq_len: int):
    """The FLUX pipeline's schedule: sigmas linspace(1, 1/n, n), mu from the packed image token count."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    return flow_match_schedule(config, num_steps, sigmas=sigmas, mu=calculate_shift(image_seq_len, config))


def sd3_schedule(config: SchedulerConfig, num_steps: int, image_seq_len: int):
    """The SD3 pipeline's schedule (mu only if the scheduler config asks for dynamic shifting)."""
    mu = calculate_shift(image_seq_len, config) if config.use_dynamic_shifting else None
    return flow_match_schedule(config, num_steps, mu=mu)
