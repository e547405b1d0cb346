"""Attention methods a plan can give a head, by name, and their head windows.

A head window (int32) is the kernel's encoding of a method (see :mod:`pallas_kernels.schedule`): -1 full,
0 cached, w > 0 arrow with an image band of half-width w tokens, -2 full in FP8 (:mod:`pallas_kernels.fp8`).
Candidate methods are named ``"cached"``, ``"arrow_K"`` and ``"fp8"``: arrow_K's half-width is
``max(1, n_img // (2*K))`` image tokens (DiTFastAttnV2). An FP8 head computes every FLOP of a full head, faster
where the FP8 kernel pays: its saving is a measured time, not FLOPs (`ditfa_jax.cost_model.Fp8HeadTime`).

The band of an arrow head is aligned to a granularity, ``band = (query, key)`` tokens: the sequence is cut into
query and key blocks of those sizes, and a query block sees every key block that its window touches. The band is
part of what a plan computes (a plan records it), independent of the tiles a kernel backend runs.

Step methods (one per step, :data:`STEP_KINDS`, int8 codes in that order) say whether the transformer runs at a
step: "compute" runs it; "reuse" returns the last computed velocity; "taylor1" / "taylor2" extrapolate the velocity
in sigma, linearly from the last two / quadratically from the last three computed steps (TaylorSeer-like). A kind
needs :data:`STEP_HISTORY` computed steps before it.
"""

from __future__ import annotations

import re

import numpy as np

from pallas_kernels.cost import plan_cost
from pallas_kernels.fp8 import FP8_WINDOW

__all__ = [
    "DEFAULT_CANDIDATES",
    "FULL_WINDOW",
    "CACHED_WINDOW",
    "FP8_WINDOW",
    "method_window",
    "check_candidates",
    "check_band",
    "candidate_windows",
    "candidate_savings",
    "windows_from_choice",
    "flop_windows",
    "STEP_KINDS",
    "STEP_COMPUTE",
    "STEP_HISTORY",
    "step_kind_codes",
    "step_kind_names",
]

DEFAULT_CANDIDATES = ("cached", "arrow_8", "arrow_16", "arrow_32")
FULL_WINDOW = -1
CACHED_WINDOW = 0

# Step methods: names in code order (int8 code = index), and how many computed steps each needs before it.
STEP_KINDS = ("compute", "reuse", "taylor1", "taylor2")
STEP_COMPUTE = 0
STEP_HISTORY = (0, 1, 2, 3)

_ARROW = re.compile(r"arrow_([1-9][0-9]*)")


def _arrow_k(name) -> int | None:
    m = _ARROW.fullmatch(name) if isinstance(name, str) else None
    return int(m.group(1)) if m else None


def method_window(name: str, n_img: int) -> int:
    """Head window of a method for ``n_img`` image tokens: "full" -> -1, "cached" -> 0, "fp8" -> -2,
    "arrow_K" -> max(1, n_img // (2*K))."""
    if isinstance(n_img, bool) or not isinstance(n_img, (int, np.integer)) or n_img < 1:
        raise ValueError(f"n_img: expected a positive number of image tokens, got {n_img!r}")
    if name == "full":
        return FULL_WINDOW
    if name == "cached":
        return CACHED_WINDOW
    if name == "fp8":
        return FP8_WINDOW
    k = _arrow_k(name)
    if k is None:
        raise ValueError(f"method name {name!r}: expected 'full', 'cached', 'fp8' or 'arrow_K' with an integer K >= 1")
    return max(1, int(n_img) // (2 * k))


def check_candidates(candidates) -> tuple[str, ...]:
    """The candidate names as a tuple, or ValueError: a non-empty list of distinct "cached"/"arrow_K"/"fp8" names."""
    if isinstance(candidates, str) or not isinstance(candidates, (tuple, list)) or not candidates:
        raise ValueError(f"candidates: expected a non-empty tuple of method names, got {candidates!r}")
    for name in candidates:
        if name not in ("cached", "fp8") and _arrow_k(name) is None:
            raise ValueError(f"candidates: {name!r} is not a candidate method; expected 'cached', 'fp8' or 'arrow_K'")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"candidates: names must be distinct, got {tuple(candidates)}")
    return tuple(candidates)


def check_band(band) -> tuple[int, int]:
    """The band granularity as a tuple, or ValueError: (query, key) tokens, two powers of two >= 16."""
    ok = isinstance(band, (tuple, list)) and len(band) == 2 and all(
        not isinstance(b, bool) and isinstance(b, (int, np.integer)) and b >= 16 and b & (b - 1) == 0 for b in band)
    if not ok:
        raise ValueError(f"band: expected (query, key) tokens, two powers of two >= 16, got {band!r}")
    return int(band[0]), int(band[1])


def candidate_windows(candidates, n_img: int) -> np.ndarray:
    """int32 [M]: the head window of each candidate method."""
    return np.array([method_window(n, n_img) for n in check_candidates(candidates)], dtype=np.int32)


def candidate_savings(candidates, *, image_tokens: int, text_len: int, text_first: bool, head_dim: int,
                      band: tuple[int, int], fp8_head_ratio: float | None = None) -> np.ndarray:
    """float64 [M]: fraction of one head's attention each candidate removes (cached: 1.0): FLOPs for arrow bands of
    granularity ``band``, from :func:`pallas_kernels.plan_cost`; for "fp8", ``1 - fp8_head_ratio`` (the measured time
    of an FP8 head over a full one; negative where FP8 is slower). This is the MILP's ``saving``."""
    candidates = check_candidates(candidates)
    windows = candidate_windows(candidates, image_tokens)
    cost = plan_cost(flop_windows(windows), batch=1, tokens=image_tokens + text_len, text_len=text_len,
                     text_first=text_first, head_dim=head_dim, band=check_band(band))
    saving = np.asarray(cost.saving, dtype=np.float64)
    if "fp8" in candidates:
        if fp8_head_ratio is None or not np.isfinite(fp8_head_ratio) or fp8_head_ratio <= 0:
            raise ValueError(f"candidate 'fp8': its saving is a measured time; expected fp8_head_ratio > 0 "
                             f"(`ditfa_jax.cost_model.fp8_head_time`), got {fp8_head_ratio!r}")
        saving[candidates.index("fp8")] = 1.0 - float(fp8_head_ratio)
    return saving


def flop_windows(windows) -> np.ndarray:
    """Head windows as the tile schedule counts their FLOPs (:func:`pallas_kernels.plan_cost`): an FP8 head
    computes every tile of a full head."""
    return np.maximum(np.asarray(windows), FULL_WINDOW)


def windows_from_choice(choice, candidates, n_img: int) -> np.ndarray:
    """Solver output (candidate index per head, -1 = full; any shape) -> int32 head windows of the same shape."""
    windows = candidate_windows(candidates, n_img)
    choice = np.asarray(choice)
    if not np.issubdtype(choice.dtype, np.integer):
        raise ValueError(f"choice: expected integer method indices, got dtype {choice.dtype}")
    if choice.size and (choice.min() < -1 or choice.max() >= len(windows)):
        raise ValueError(f"choice: indices must lie in [-1, {len(windows) - 1}] for candidates {tuple(candidates)}, "
                         f"got range [{choice.min()}, {choice.max()}]")
    return np.where(choice < 0, FULL_WINDOW, windows[np.maximum(choice, 0)]).astype(np.int32)


def step_kind_codes(names, name: str = "step_kind") -> np.ndarray:
    """int8 [steps]: the code of each step method name in :data:`STEP_KINDS` (ValueError naming the step)."""
    if isinstance(names, str) or not isinstance(names, (tuple, list)):
        raise ValueError(f"{name}: expected a list of step method names {list(STEP_KINDS)}, got {names!r}")
    for step, n in enumerate(names):
        if n not in STEP_KINDS:
            raise ValueError(f"{name}: step {step} is {n!r}; expected one of {list(STEP_KINDS)}")
    return np.array([STEP_KINDS.index(n) for n in names], dtype=np.int8)


def step_kind_names(codes) -> tuple[str, ...]:
    """The names of int step method codes (ValueError naming the step of a code outside 0..len(STEP_KINDS)-1)."""
    codes = np.asarray(codes).reshape(-1)
    for step, c in enumerate(codes.tolist()):
        if not isinstance(c, int) or not 0 <= c < len(STEP_KINDS):
            raise ValueError(f"step_kind: step {step} has code {c!r}; expected 0..{len(STEP_KINDS) - 1} "
                             f"for {list(STEP_KINDS)}")
    return tuple(STEP_KINDS[c] for c in codes.tolist())
