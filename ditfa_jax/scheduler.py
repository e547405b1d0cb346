"""Flow-matching Euler schedules, exactly as diffusers' `FlowMatchEulerDiscreteScheduler` + the pipelines set them.

Computed on the host in float64 and returned as float32 arrays: `sigmas` has `num_steps + 1` entries (ending in 0)
and `timesteps = sigmas[:-1] * num_train_timesteps`. FLUX pipelines pass `sigmas = linspace(1, 1/n, n)` and a
resolution-dependent `mu` (dynamic shifting, dev) or a fixed shift (schnell: 1.0); SD3 pipelines let the scheduler
space timesteps evenly between its shifted sigma_max and sigma_min (shift 3.0).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from ditfa_jax.configs import CheckedConfig, read_json, setting

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(CheckedConfig):
    """diffusers' FlowMatchEulerDiscreteScheduler fields; every one has diffusers' default."""

    num_train_timesteps: int = setting(1000, min=1, max=1_000_000)
    shift: float = setting(1.0, above=0)
    use_dynamic_shifting: bool = setting(False)
    base_shift: float = setting(0.5)
    max_shift: float = setting(1.15)
    base_image_seq_len: int = setting(256, min=1)
    max_image_seq_len: int = setting(4096, min=1)
    time_shift_type: str = setting("exponential", choices=("exponential", "linear"))

    UNSUPPORTED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                   "use_beta_sigmas", "stochastic_sampling")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "scheduler config") -> "SchedulerConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object of scheduler fields, got {type(raw).__name__}")
        if raw.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
            raise ValueError(f"{source}: _class_name={raw['_class_name']!r}; only {SCHEDULER_CLASS!r} is supported")
        used = [k for k in cls.UNSUPPORTED if raw.get(k) not in (None, False)]
        if used:
            raise ValueError(f"{source}: scheduler options {used} are not supported (plain flow-match Euler only)")
        config = cls(**cls.fields_from(raw, source))
        if config.use_dynamic_shifting and config.max_image_seq_len == config.base_image_seq_len:
            raise ValueError(f"{source}: max_image_seq_len and base_image_seq_len are both "
                             f"{config.base_image_seq_len}; dynamic shifting interpolates between two lengths")
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "SchedulerConfig":
        return cls.from_dict(read_json(path, "scheduler config"), source=str(path))


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
