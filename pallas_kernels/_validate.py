"""Argument checks shared by the public entry points (every backend, and the cost)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.schedule import default_band

_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _shape_dtype(x, name):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name}: expected an array, got {type(x).__name__}")
    return tuple(x.shape), jnp.dtype(x.dtype)


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def check_block(name: str, b) -> int:
    """A tile size: a Python int, power of two >= 16."""
    if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or not _pow2(int(b)) or b < 16:
        raise ValueError(f"{name}: expected a power of two >= 16, got {b!r}")
    return int(b)


def resolve_band(band, head_dim: int) -> tuple[int, int]:
    """``band`` as a pair of ints; None gives :func:`default_band` ``(head_dim)``."""
    if band is None:
        return default_band(head_dim)
    if not isinstance(band, (tuple, list)) or len(band) != 2:
        raise ValueError(f"band: expected a pair (band_q, band_k) of powers of two >= 16, got {band!r}")
    return check_block("band (band_q)", band[0]), check_block("band (band_k)", band[1])


def validate(q, k, v, head_window, cache, *, text_len, text_first, band, query_tiles=None, fp8=False, padding=0):
    """Checks the arguments; returns ``(head_window_int32, band)``, ``band``
    resolved to its default when None.

    Raises ValueError naming the argument, what it got and what was expected.
    Values of ``head_window`` are checked only when it is concrete (not traced
    under jit/scan).
    """
    q_shape, q_dtype = _shape_dtype(q, "q")
    if len(q_shape) != 4:
        raise ValueError(f"q: expected shape [batch, tokens, heads, head_dim], got {q_shape}")
    if q_dtype not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise ValueError(f"q: expected dtype bfloat16, float16 or float32, got {q_dtype}")
    for name, x in (("k", k), ("v", v)):
        shape, dtype = _shape_dtype(x, name)
        if shape != q_shape:
            raise ValueError(f"{name}: expected the shape of q {q_shape}, got {shape}")
        if dtype != q_dtype:
            raise ValueError(f"{name}: expected the dtype of q ({q_dtype}), got {dtype}")
    batch, tokens, heads, head_dim = q_shape
    if tokens < 1 or heads < 1 or batch < 1:
        raise ValueError(f"q: expected non-empty batch, tokens and heads, got {q_shape}")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(
            f"q: head_dim (last axis of shape {q_shape}) must be one of 16, 32, 64, 128, 256, got {head_dim}"
        )
    if not isinstance(text_len, (int, np.integer)) or isinstance(text_len, bool):
        raise ValueError(f"text_len: expected a static Python int, got {type(text_len).__name__}")
    if not 0 <= int(text_len) <= tokens:
        raise ValueError(f"text_len={text_len}: expected 0 <= text_len <= tokens={tokens} (q shape {q_shape})")
    if not isinstance(text_first, (bool, np.bool_)):
        raise ValueError(f"text_first: expected a static bool, got {type(text_first).__name__}")

    if not isinstance(padding, (int, np.integer)) or isinstance(padding, bool) or not 0 <= padding < 8:
        raise ValueError(f"padding: expected a static int in [0, 8) (a length rounded up to a multiple of 8), "
                         f"got {padding!r}")
    if padding and (tokens % 8 or int(text_len) + padding > tokens or padding >= tokens):
        raise ValueError(f"padding={padding}: q {q_shape} must carry a multiple of 8 tokens that holds "
                         f"text_len={text_len} real text tokens and at least one real token besides the padding")

    band = resolve_band(band, head_dim)

    hw_shape, hw_dtype = _shape_dtype(head_window, "head_window")
    if hw_shape != (heads,):
        raise ValueError(f"head_window: expected shape ({heads},) (one window per head of q {q_shape}), got {hw_shape}")
    if not jnp.issubdtype(hw_dtype, jnp.signedinteger):
        raise ValueError(f"head_window: expected a signed integer dtype (int32), got {hw_dtype}")
    concrete = None
    if not _is_tracer(head_window):
        concrete = np.asarray(head_window)
        lowest = -2 if fp8 else -1
        if concrete.size and concrete.min() < lowest:
            fp8_note = " or -2 (full, FP8)" if fp8 else " (-2, an FP8 head, needs fp8=True)"
            raise ValueError(
                f"head_window: expected values -1 (full), 0 (cached), w > 0 (arrow){fp8_note}, got "
                f"{concrete.tolist()}"
            )
        if concrete.size and concrete.max() > np.iinfo(np.int32).max:
            raise ValueError(f"head_window: values must fit int32, got max {concrete.max()}")

    if cache is not None:
        c_shape, c_dtype = _shape_dtype(cache, "cache")
        if c_shape != q_shape:
            raise ValueError(f"cache: expected the shape of q {q_shape}, got {c_shape}")
        if c_dtype != q_dtype:
            raise ValueError(f"cache: expected the dtype of q ({q_dtype}), got {c_dtype}")
    elif concrete is not None and np.any(concrete == 0):
        raise ValueError(
            f"cache: head_window {concrete.tolist()} marks heads "
            f"{np.flatnonzero(concrete == 0).tolist()} as cached (0) but cache is "
            f"None; pass cache=[batch, tokens, heads, head_dim] = {q_shape}"
        )

    if query_tiles is not None:
        n_tiles = -(-tokens // band[0])
        qt_shape, qt_dtype = _shape_dtype(query_tiles, "query_tiles")
        if qt_shape != (n_tiles,) or qt_dtype != jnp.bool_:
            raise ValueError(
                f"query_tiles: expected a bool array of shape ({n_tiles},) (one per band query tile of "
                f"{band[0]} tokens of q {q_shape}), got {qt_dtype} {qt_shape}"
            )

    hw = jnp.asarray(head_window)
    if hw.dtype != jnp.int32:
        hw = hw.astype(jnp.int32)
    return hw, band
