"""Public entry point of head-wise attention and the registry of its backends.

Every backend computes the same function (:mod:`pallas_kernels.schedule`,
fixed by ``band``); they differ in where they run and how fast.  A backend
is an object with

* ``name`` and ``config_type`` (a frozen dataclass of launch options, which
  never change the result);
* ``default_config(q_shape, dtype, band)``: the tuned configuration;
* ``supports(q_shape, dtype, band, platform)``: None when it runs there,
  otherwise the reason; ``platform`` is ``jax.default_backend()`` for the
  automatic choice and None when the caller names the backend (it may then run
  emulated, e.g. Triton's interpret mode on a CPU);
* ``__call__(q, k, v, head_window, cache, *, text_len, text_first, band,
  config, padding)`` on validated arguments, ``text_len`` as the schedule
  takes it (:func:`pallas_kernels.schedule.padded_text_len`) and the last
  ``padding`` keys masked;
* ``skips_query_tiles`` (optional, default False): True when ``__call__`` also
  takes ``query_tiles`` and computes only those tiles; for the others
  :func:`headwise_attention` computes every tile and keeps the selected rows;
* ``runs_fp8`` (optional, default False): True when ``__call__`` also takes
  ``fp8`` and runs heads of window ``-2`` in FP8 (:mod:`pallas_kernels.fp8`).

:data:`BACKENDS` lists them in order of preference; ``backend=None`` takes the
first that supports the call on the default platform ("mosaic_gpu" only for the
head sizes and lengths of :data:`MOSAIC_GPU_AUTOMATIC`).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from pallas_kernels import schedule
from pallas_kernels._validate import validate
from pallas_kernels.mosaic_backend import MosaicBackend
from pallas_kernels.reference import XlaBackend
from pallas_kernels.triton_backend import TritonBackend

__all__ = [
    "Backend", "BACKENDS", "MOSAIC_GPU_AUTOMATIC", "get_backend", "headwise_attention", "reference_headwise_attention",
]

# Where the automatic choice may take "mosaic_gpu" (first in the preference order; on Hopper GPUs only, its
# `supports` says): head_dim -> the token counts, multiples of this (1: any). Measured on an H100 (2026-12-07,
# benchmarks/RESULTS.md): at head_dim 128 (FLUX) it beats the Triton backend 1.17-1.46x on every plan; at head_dim
# 64 (SD3-1K) it beats Triton 1.03-1.18x on every plan when the length is carried padded to a multiple of 8, as the
# SD3 model does, and loses on arrow plans (0.77-0.87x) when it must copy q, k, v and the cache to pad them.
# Naming a backend always works.
MOSAIC_GPU_AUTOMATIC = {128: 1, 64: 8}


class Backend(Protocol):
    """What :func:`headwise_attention` needs of a backend (see the module docstring)."""

    name: str
    config_type: type

    def default_config(self, q_shape: tuple[int, ...], dtype, band: tuple[int, int]) -> Any: ...

    def supports(self, q_shape: tuple[int, ...], dtype, band: tuple[int, int], platform: str | None) -> str | None: ...

    def __call__(self, q, k, v, head_window, cache, *, text_len, text_first, band, config, padding=0) -> jax.Array:
        ...


# In order of preference for the automatic choice.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        MosaicBackend(),
        TritonBackend(),
        XlaBackend(),
    )
}


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; ValueError naming the registered ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is unknown; registered backends: {list(BACKENDS)}")
    return BACKENDS[name]


def _automatic(b: Backend, q_shape) -> bool:
    multiple = MOSAIC_GPU_AUTOMATIC.get(q_shape[-1])
    return b.name != "mosaic_gpu" or (multiple is not None and q_shape[1] % multiple == 0)


def _runs_fp8(b: Backend) -> bool:
    return getattr(b, "runs_fp8", False)


def _select(backend, config, q_shape, dtype, band, fp8=False) -> Backend:
    if backend is None and config is not None:
        # A config names its backend.
        backend = next((b.name for b in BACKENDS.values() if isinstance(config, b.config_type)), None)
        if backend is None:
            raise ValueError(f"config: {type(config).__name__} belongs to no registered backend {list(BACKENDS)}")
    if backend is not None:
        chosen = get_backend(backend)
        if fp8 and not _runs_fp8(chosen):
            raise ValueError(f"backend {backend!r} cannot run FP8 heads (head window -2); backends that can: "
                             f"{[b.name for b in BACKENDS.values() if _runs_fp8(b)]}")
        reason = chosen.supports(q_shape, dtype, band, None)
        if reason is not None:
            supported = [b.name for b in BACKENDS.values() if b.supports(q_shape, dtype, band, None) is None]
            raise ValueError(
                f"backend {backend!r} does not support q {q_shape} {dtype} with band {band}: {reason}; "
                f"backends supporting it: {supported}"
            )
        return chosen
    platform = jax.default_backend()
    # FP8 heads: the backends that run them, Mosaic GPU at every head size; on a GPU not the XLA reference, which
    # emulates them in dense attention (every score in memory): named, it still runs
    candidates = [b for b in BACKENDS.values()
                  if ((_runs_fp8(b) and not (platform == "gpu" and b.name == "xla")) if fp8
                      else _automatic(b, q_shape))]
    for b in candidates:
        if b.supports(q_shape, dtype, band, platform) is None:
            return b
    reasons = "; ".join(f"{b.name}: {b.supports(q_shape, dtype, band, platform)}" for b in candidates)
    what = "no backend runs FP8 heads (head window -2) for" if fp8 else "no backend supports"
    raise ValueError(f"{what}: q {q_shape} {dtype} with band {band} on {platform!r} ({reasons})"
                     + ("; a plan with FP8 heads runs on Hopper GPUs (backend 'xla' emulates them)" if fp8 else ""))


def headwise_attention(
    q,
    k,
    v,
    head_window,
    cache=None,
    *,
    text_len: int,
    text_first: bool,
    band: tuple[int, int] | None = None,
    backend: str | None = None,
    config=None,
    query_tiles=None,
    fp8: bool = False,
    padding: int = 0,
) -> jax.Array:
    """Joint attention where each head is full, arrow or cached.

    Args:
      q, k, v: ``[batch, tokens, heads, head_dim]``, bfloat16/float16/float32,
        same shape and dtype; ``head_dim`` in {16, 32, 64, 128, 256}.
      head_window: int32 ``[heads]`` data (may be traced; changing it does not
        recompile): -1 full, 0 cached, w > 0 arrow with image-band half-width w
        tokens (band defined at ``band`` granularity, see
        :mod:`pallas_kernels.schedule`).
      cache: ``[batch, tokens, heads, head_dim]`` in q's dtype, the previous
        output; required when any head is cached.  Heads with window 0 return
        ``cache[:, :, h, :]`` bit for bit and are not computed.  If ``cache`` is
        None, a concrete ``head_window`` containing 0 raises ValueError; a
        traced one cannot be checked and its zeros compute as full attention.
        With ``fp8``, -2 is a full head computed in FP8 (:mod:`pallas_kernels.fp8`).
        Give the call a donatable cache (dead afterwards) to avoid a copy.
      text_len: number of text tokens (static).
      text_first: True for [text, image] (FLUX), False for [image, text] (SD3).
      band: ``(band_q, band_k)``, powers of two >= 16, the granularity of the
        arrow band (part of the function); default
        :func:`pallas_kernels.default_band` ``(head_dim)``.
      backend: a name in :data:`BACKENDS`; None picks the first that supports
        the call on ``jax.default_backend()`` (or the one ``config`` belongs to).
      config: the backend's launch configuration (its ``config_type``); None
        takes its ``default_config``.
      query_tiles: optional bool ``[ceil(tokens / band_q)]`` data: compute only
        the band query tiles marked True; the other rows of the output are the
        cache's (zeros when ``cache`` is None).  For estimates on a sample of the
        queries (the plan search); backends that cannot skip tiles compute all.
      fp8: (static) heads of window -2 run in FP8, on a backend that can
        (``runs_fp8``: "mosaic_gpu", "xla"); without it a concrete -2 raises
        ValueError and a traced one computes as full.
      padding: (static) the last ``padding`` tokens (fewer than 8, of a
        multiple of 8) are padding: no query attends to them, and they extend
        the region they end (:mod:`pallas_kernels.schedule`).  A caller that
        carries its sequence padded so saves the Mosaic GPU backend a copy of
        q, k, v and the cache at a length TMA cannot tile (SD3's 4096 + 333).
        ``text_len`` counts the real text tokens only.

    Returns:
      ``[batch, tokens, heads, head_dim]`` in q's dtype; softmax scale
      ``1/sqrt(head_dim)``.
    """
    hw, band = validate(q, k, v, head_window, cache, text_len=text_len, text_first=text_first, band=band,
                        query_tiles=query_tiles, fp8=fp8, padding=padding)
    chosen = _select(backend, config, tuple(q.shape), q.dtype, band, fp8=bool(fp8))
    if config is None:
        config = chosen.default_config(tuple(q.shape), q.dtype, band)
    elif not isinstance(config, chosen.config_type):
        raise ValueError(
            f"config: backend {chosen.name!r} takes a {chosen.config_type.__name__}, got {type(config).__name__}"
        )
    kw = dict(text_len=schedule.padded_text_len(int(text_len), bool(text_first), int(padding)),
              text_first=text_first, band=band, config=config)
    if padding:
        kw["padding"] = int(padding)
    if fp8:
        kw["fp8"] = True
    if query_tiles is None:
        return chosen(q, k, v, hw, cache, **kw)
    if getattr(chosen, "skips_query_tiles", False):
        return chosen(q, k, v, hw, cache, query_tiles=query_tiles, **kw)
    rows = schedule.query_rows(query_tiles, tokens=q.shape[1], band_q=band[0], xp=jnp)
    base = jnp.zeros_like(q) if cache is None else cache
    return jnp.where(rows[None, :, None, None], chosen(q, k, v, hw, cache, **kw), base)


def reference_headwise_attention(
    q, k, v, head_window, cache=None, *, text_len: int, text_first: bool, band: tuple[int, int] | None = None,
    fp8: bool = False, padding: int = 0,
) -> jax.Array:
    """:func:`headwise_attention` on backend "xla" (dense, any platform)."""
    return headwise_attention(q, k, v, head_window, cache, text_len=text_len, text_first=text_first, band=band,
                              backend="xla", fp8=fp8, padding=padding)
