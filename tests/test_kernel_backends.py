"""Semantics every head-wise attention backend must meet (mosaic_gpu and triton in interpret mode on CPU, xla).

A backend runs the cases it supports (``supports(..., platform=None)``) and skips the others; the
"Hopper tiles" section holds cases every backend supports (bf16/fp16, head_dim 64/128, band >= 128x64).

The oracle is brute-force float64 numpy built from the method's definition (full / cached / arrow with a band of
half-width w at band-tile granularity), not from pallas_kernels.schedule or any backend.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pallas_kernels as pk
from pallas_kernels import api

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BACKEND_NAMES = list(pk.BACKENDS)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}

# Backend configs whose execution tiles are finer than the band (backends without execution tiles: none).
FINE_TILE_CONFIGS = {
    "triton": lambda band: [pk.TritonConfig(block_q=band[0] // 2, block_k=band[1] // 2),
                            pk.TritonConfig(block_q=band[0] // 4, block_k=band[1], single_loop=False)],
    "mosaic_gpu": lambda band: [pk.MosaicConfig(block_k=64, pingpong=False, num_stages=3)] if band[1] >= 128 else [],
}


def need(backend, shape, dtype, band):
    """Skips the test where ``backend`` does not support the call (it raises ValueError there instead)."""
    reason = pk.get_backend(backend).supports(tuple(shape), jnp.dtype(dtype), tuple(band), None)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


# ------------------------------------------------------------------ oracle


def is_text(tokens, text_len, text_first):
    pos = np.arange(tokens)
    return pos < text_len if text_first else pos >= tokens - text_len


def oracle_mask(hw, tokens, text_len, text_first, band):
    """[H, T, T] bool from the definition: query i attends key j iff the head is full, or it is an arrow and the
    band tiles of i and j (band_q, band_k tokens) hold a text query, a text key, or an image pair within w."""
    bq, bk = band
    pos = np.arange(tokens)
    text = is_text(tokens, text_len, text_first)
    tq, tk = pos // bq, pos // bk
    out = []
    for w in hw:
        if w < 0:
            out.append(np.ones((tokens, tokens), bool))
        elif w == 0:
            out.append(np.zeros((tokens, tokens), bool))
        else:
            near = ~text[:, None] & ~text[None, :] & (np.abs(pos[:, None] - pos[None, :]) <= w)
            vis = np.zeros((tq[-1] + 1, tk[-1] + 1), bool)
            np.logical_or.at(vis, (tq[:, None], tk[None, :]), near)
            vis[tq[text], :] = True
            vis[:, tk[text]] = True
            out.append(vis[tq][:, tk])
    return np.stack(out)


def oracle(q, k, v, hw, *, text_len, text_first, band):
    """float64 [B, T, H, D]; rows of cached heads are NaN (compare those with the cache)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    mask = oracle_mask(hw, q.shape[1], text_len, text_first, band)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = np.where(mask[None], s, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def rand(shape, dtype, seed):
    """Random normal data (never zeros)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dtype)


def qkvc(b, t, h, d, dtype, seed=0):
    return [rand((b, t, h, d), dtype, seed + i) for i in range(4)]


def poisoned(cache, hw):
    """The cache with NaN on the computed heads: a backend that writes the output into the cache buffer (Triton
    aliases it) must overwrite every element of those heads."""
    return jnp.where(jnp.asarray(hw != 0)[None, None, :, None], jnp.nan, cache)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def same_bits(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint8), y.view(np.uint8))


def check(out, q, k, v, hw, cache, *, text_len, text_first, band, tol):
    """Computed heads match the oracle and are finite; cached heads are the cache bit for bit."""
    hw = np.asarray(hw)
    assert out.shape == q.shape and out.dtype == q.dtype
    computed = hw != 0
    if computed.any():
        got = np.asarray(out[:, :, computed], np.float64)
        assert np.all(np.isfinite(got))
        want = oracle(q, k, v, hw, text_len=text_len, text_first=text_first, band=band)[:, :, computed]
        assert rel_err(got, want) <= tol
    if cache is not None:
        assert same_bits(out[:, :, ~computed], cache[:, :, ~computed])


# ------------------------------------------------------------ random plans

def plan_cases(*, tokens, heads, head_dims, band_q, band_k, max_text_frac):
    """Random shapes and plans (one method per head: mixed, all full or all cached) within these ranges."""
    shapes = st.fixed_dictionaries(
        dict(
            batch=st.integers(1, 2),
            tokens=st.integers(*tokens),
            heads=st.integers(1, heads),
            head_dim=st.sampled_from(head_dims),
            band=st.tuples(st.sampled_from(band_q), st.sampled_from(band_k)),
            text_first=st.booleans(),
            text_frac=st.floats(0.0, max_text_frac),
            kind=st.sampled_from(["mixed", "mixed", "full", "cached"]),
            seed=st.integers(0, 2**16),
        )
    )
    windows = lambda c: {  # noqa: E731
        "mixed": st.one_of(st.just(-1), st.just(0), st.integers(1, c["tokens"] + 16)),
        "full": st.just(-1),
        "cached": st.just(0),
    }[c["kind"]]
    return shapes.flatmap(
        lambda c: st.tuples(st.just(c), st.lists(windows(c), min_size=c["heads"], max_size=c["heads"]))
    )


cases = plan_cases(tokens=(8, 300), heads=4, head_dims=[16, 32, 64], band_q=[16, 32, 64], band_k=[16, 32, 64],
                   max_text_frac=1.0)


def run_random_case(backend, case, dtype):
    c, hw = case
    need(backend, (c["batch"], c["tokens"], c["heads"], c["head_dim"]), dtype, c["band"])
    text_len = int(round(c["text_frac"] * c["tokens"]))
    q, k, v, cache = qkvc(c["batch"], c["tokens"], c["heads"], c["head_dim"], dtype, c["seed"])
    hw = np.array(hw, np.int32)
    cache = poisoned(cache, hw)
    kw = dict(text_len=text_len, text_first=c["text_first"], band=c["band"])
    out = pk.headwise_attention(q, k, v, hw, cache, backend=backend, **kw)
    check(out, q, k, v, hw, cache, tol=TOL[dtype], **kw)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=20, deadline=None)
@given(case=cases)
def test_random_plans_fp32(backend, case):
    run_random_case(backend, case, jnp.float32)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=8, deadline=None)
@given(case=cases)
def test_random_plans_bf16(backend, case):
    run_random_case(backend, case, jnp.bfloat16)


# ------------------------------------------------------------ fixed plans


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("text_first", [True, False])
def test_mixed_plan_both_orders_padded(backend, text_first, dtype):
    # full, cached, arrow 5, arrow wider than the image; T = 173 is not a multiple of the band tiles.
    b, t, h, d, text_len, band = 2, 173, 4, 32, 45, (32, 16)
    need(backend, (b, t, h, d), dtype, band)
    q, k, v, cache = qkvc(b, t, h, d, dtype, seed=1)
    hw = np.array([-1, 0, 5, 1000], np.int32)
    cache = poisoned(cache, hw)
    kw = dict(text_len=text_len, text_first=text_first, band=band)
    out = pk.headwise_attention(q, k, v, hw, cache, backend=backend, **kw)
    check(out, q, k, v, hw, cache, tol=TOL[dtype], **kw)
    # The full head and the arrow wider than the image are plain attention; the narrow arrow is not.
    full = oracle(q, k, v, np.full(h, -1), text_len=text_len, text_first=text_first, band=band)
    assert rel_err(out[:, :, 3], full[:, :, 3]) <= TOL[dtype]
    assert rel_err(out[:, :, 2], full[:, :, 2]) > 1e-3


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize(
    "tokens,text_len,text_first,dtype",
    [(128, 32, True, jnp.float32), (150, 40, False, jnp.bfloat16), (97, 0, True, jnp.float32)],
)
def test_all_full_is_full_attention(backend, tokens, text_len, text_first, dtype):
    b, h, d = 2, 3, 64
    need(backend, (b, tokens, h, d), dtype, (32, 32))
    q, k, v, _ = qkvc(b, tokens, h, d, dtype, seed=tokens)
    hw = np.full((h,), -1, np.int32)
    out = pk.headwise_attention(q, k, v, hw, text_len=text_len, text_first=text_first, band=(32, 32), backend=backend)
    xla = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    assert rel_err(out, xla) <= TOL[dtype]
    check(out, q, k, v, hw, None, text_len=text_len, text_first=text_first, band=(32, 32), tol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_all_cached_is_cache_bit_for_bit(backend, dtype):
    b, t, h, d = 2, 77, 3, 32
    need(backend, (b, t, h, d), dtype, (16, 16))
    q, k, v, cache = qkvc(b, t, h, d, dtype, seed=7)
    cache = cache.at[0, 0, 0, 0].set(jnp.nan)  # must pass through untouched
    hw = np.zeros((h,), np.int32)
    out = pk.headwise_attention(q, k, v, hw, cache, text_len=10, text_first=True, band=(16, 16), backend=backend)
    assert same_bits(out, cache)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_default_band_flux_like_shape(backend):
    # Default band (128x128 for D=128) on a short FLUX-like sequence; FLUX's arrow_8 window w = n_img // 16.
    b, t, h, d, text_len = 1, 300, 3, 128, 44
    need(backend, (b, t, h, d), jnp.bfloat16, pk.default_band(d))
    q, k, v, cache = qkvc(b, t, h, d, jnp.bfloat16, seed=4)
    hw = np.array([(t - text_len) // 16, -1, 0], np.int32)
    cache = poisoned(cache, hw)
    out = pk.headwise_attention(q, k, v, hw, cache, text_len=text_len, text_first=True, backend=backend)
    check(out, q, k, v, hw, cache, text_len=text_len, text_first=True, band=pk.default_band(d), tol=1e-2)


# -------------------------------------------------- band vs execution tiles


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("text_first", [True, False])
def test_band_coarser_than_execution_tiles(backend, text_first):
    """The band fixes the function: execution tiles finer than the band give the result of tiles equal to it."""
    b, t, h, d, text_len, band = 1, 203, 4, 16, 37, (64, 64)
    need(backend, (b, t, h, d), jnp.float32, band)
    q, k, v, cache = qkvc(b, t, h, d, jnp.float32, seed=21)
    hw = np.array([3, 0, 40, -1], np.int32)
    cache = poisoned(cache, hw)
    kw = dict(text_len=text_len, text_first=text_first, band=band)
    coarse = pk.headwise_attention(q, k, v, hw, cache, backend=backend, **kw)
    check(coarse, q, k, v, hw, cache, tol=1e-5, **kw)
    for config in FINE_TILE_CONFIGS.get(backend, lambda band: [])(band):
        fine = pk.headwise_attention(q, k, v, hw, cache, backend=backend, config=config, **kw)
        assert rel_err(fine, coarse) <= 1e-6, config
        assert same_bits(fine[:, :, 1], cache[:, :, 1])
    # The band is part of the function: the finer band computes something else.
    finer_band = pk.headwise_attention(q, k, v, hw, cache, backend=backend, **dict(kw, band=(16, 16)))
    assert rel_err(finer_band[:, :, 0], coarse[:, :, 0]) > 1e-3


# ---------------------------------------------------------- traced plans


def check_plans_in_scan(backend, q, k, v, plans, *, recompile_steps, tol, **kw):
    """Per-step plans scanned as data: each step right (its cached heads the previous output), and one compile
    serves every plan."""

    @jax.jit
    def denoise(q, k, v, plans):
        def step(prev, hw):
            out = pk.headwise_attention(q, k, v, hw, prev, backend=backend, **kw)
            return out, out

        return jax.lax.scan(step, jnp.full_like(q, jnp.nan), plans)[1]

    outs = denoise(q, k, v, plans)
    prev = jnp.full_like(q, jnp.nan)
    for s in range(plans.shape[0]):
        check(outs[s], q, k, v, plans[s], prev, tol=tol, **kw)
        prev = outs[s]

    @jax.jit
    def one(q, k, v, hw, cache):
        return pk.headwise_attention(q, k, v, hw, cache, backend=backend, **kw)

    for s in recompile_steps:
        one(q, k, v, plans[s], outs[0]).block_until_ready()
    assert one._cache_size() == 1


def check_traced_zero_without_cache(backend, q, k, v, *, tol, **kw):
    """A traced 0 (cached) with no cache to read computes as full."""
    f = jax.jit(lambda q, k, v, hw: pk.headwise_attention(q, k, v, hw, backend=backend, **kw))
    out = f(q, k, v, jnp.array([0, 4], jnp.int32))
    check(out, q, k, v, np.array([-1, 4]), None, tol=tol, **kw)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_plan_changes_inside_scan_without_recompiling(backend):
    b, t, h, d = 1, 120, 4, 32
    need(backend, (b, t, h, d), jnp.float32, (32, 32))
    q, k, v, _ = qkvc(b, t, h, d, jnp.float32, seed=5)
    plans = jnp.array([[-1, -1, -1, -1], [0, 3, -1, 9], [0, 0, 20, -1], [5, 0, 0, 0]], jnp.int32)
    check_plans_in_scan(backend, q, k, v, plans, recompile_steps=range(4), tol=1e-5, text_len=24, text_first=True,
                        band=(32, 32))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_traced_zero_without_cache_computes_full(backend):
    b, t, h, d = 1, 64, 2, 16
    need(backend, (b, t, h, d), jnp.float32, (16, 16))
    q, k, v, _ = qkvc(b, t, h, d, jnp.float32, seed=9)
    check_traced_zero_without_cache(backend, q, k, v, tol=1e-5, text_len=16, text_first=True, band=(16, 16))


# ----------------------------------------------------------- Hopper tiles
# bf16/fp16, head_dim 64/128, bands >= 128x64: cases every backend runs (mosaic_gpu needs them). Small
# token counts keep mosaic_gpu's interpret mode (seconds per call) cheap.


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("text_first,dtype", [(True, jnp.bfloat16), (False, jnp.float16)])
def test_hopper_tiles_mixed_plan_padded(backend, text_first, dtype):
    # T = 261: not a multiple of 8, of the key tile or of the query tile.
    b, t, h, d, text_len, band = 1, 261, 3, 64, 45, (128, 64)
    q, k, v, cache = qkvc(b, t, h, d, dtype, seed=31)
    hw = np.array([9, -1, 0], np.int32)
    cache = poisoned(cache, hw)
    kw = dict(text_len=text_len, text_first=text_first, band=band)
    out = pk.headwise_attention(q, k, v, hw, cache, backend=backend, **kw)
    check(out, q, k, v, hw, cache, tol=TOL[dtype], **kw)
    if text_first:  # the arrow skips key tiles here
        full = oracle(q, k, v, np.full(h, -1), **kw)
        assert rel_err(out[:, :, 0], full[:, :, 0]) > 1e-3


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("text_first,dtype", [(True, jnp.float16), (False, jnp.bfloat16)])
def test_hopper_tiles_carried_padding_is_the_unpadded_call(backend, text_first, dtype):
    # 261 real tokens carried as 264 (padding 3, as SD3's 4429 -> 4432). The padding rows hold random q, k, v: a
    # backend that let a query attend to them would differ from the oracle of the real tokens.
    b, t, pad, h, d, text_len, band = 1, 261, 3, 3, 64, 45, (128, 64)
    q, k, v, cache = qkvc(b, t + pad, h, d, dtype, seed=38)
    hw = np.array([9, -1, 0], np.int32)
    cache = poisoned(cache, hw)
    kw = dict(text_len=text_len, text_first=text_first, band=band)
    out = pk.headwise_attention(q, k, v, hw, cache, backend=backend, padding=pad, **kw)
    assert out.shape == q.shape
    real = (slice(None), slice(0, t))
    check(out[real], q[real], k[real], v[real], hw, cache[real], tol=TOL[dtype], **kw)
    assert np.all(np.isfinite(np.asarray(out[:, t:, hw != 0], np.float32)))  # padding rows computed
    assert same_bits(out[:, t:, hw == 0], cache[:, t:, hw == 0])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_hopper_tiles_d128_default_band_and_finer_tiles(backend):
    b, t, h, d, text_len = 1, 200, 3, 128, 30
    q, k, v, cache = qkvc(b, t, h, d, jnp.bfloat16, seed=32)
    hw = np.array([(t - text_len) // 16, -1, 0], np.int32)
    cache = poisoned(cache, hw)
    kw = dict(text_len=text_len, text_first=True, band=pk.default_band(d))
    for config in [None] + FINE_TILE_CONFIGS.get(backend, lambda band: [])(kw["band"])[:1]:
        out = pk.headwise_attention(q, k, v, hw, cache, backend=backend, config=config, **kw)
        check(out, q, k, v, hw, cache, tol=TOL[jnp.bfloat16], **kw)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_hopper_tiles_all_full_is_full_attention(backend):
    b, t, h, d, text_len, band = 2, 150, 2, 64, 40, (128, 64)
    q, k, v, _ = qkvc(b, t, h, d, jnp.float16, seed=33)
    hw = np.full((h,), -1, np.int32)
    out = pk.headwise_attention(q, k, v, hw, text_len=text_len, text_first=False, band=band, backend=backend)
    xla = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    assert rel_err(out, xla) <= TOL[jnp.float16]
    check(out, q, k, v, hw, None, text_len=text_len, text_first=False, band=band, tol=TOL[jnp.float16])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_hopper_tiles_all_cached_is_cache_bit_for_bit(backend):
    b, t, h, d = 2, 77, 3, 64
    _, _, _, cache = qkvc(b, t, h, d, jnp.bfloat16, seed=34)
    q, k, v = (jnp.full_like(cache, jnp.nan) for _ in range(3))  # never read
    cache = cache.at[0, 0, 0, 0].set(jnp.nan)
    hw = np.zeros((h,), np.int32)
    out = pk.headwise_attention(q, k, v, hw, cache, text_len=10, text_first=True, band=(128, 64), backend=backend)
    assert same_bits(out, cache)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_hopper_tiles_plan_changes_inside_scan_without_recompiling(backend):
    q, k, v, _ = qkvc(1, 140, 3, 64, jnp.bfloat16, seed=35)
    plans = jnp.array([[-1, -1, -1], [0, 3, -1], [5, 0, 0]], jnp.int32)
    check_plans_in_scan(backend, q, k, v, plans, recompile_steps=(1, 2), tol=TOL[jnp.bfloat16], text_len=24,
                        text_first=True, band=(128, 64))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_hopper_tiles_traced_zero_without_cache_computes_full(backend):
    q, k, v, _ = qkvc(1, 130, 2, 64, jnp.bfloat16, seed=36)
    check_traced_zero_without_cache(backend, q, k, v, tol=TOL[jnp.bfloat16], text_len=16, text_first=True,
                                    band=(128, 64))


hopper_cases = plan_cases(tokens=(40, 280), heads=3, head_dims=[64, 128], band_q=[128, 256], band_k=[64, 128],
                          max_text_frac=0.5)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=4, deadline=None)  # few: mosaic_gpu's interpret mode takes seconds per example
@given(case=hopper_cases, dtype=st.sampled_from([jnp.bfloat16, jnp.float16]))
def test_hopper_tiles_random_plans(backend, case, dtype):
    run_random_case(backend, case, dtype)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("with_cache", [True, False])
def test_hopper_tiles_query_tiles_compute_only_those_rows(backend, with_cache):
    # 3 band query tiles of 128 (the last partial: T = 300); tiles 0 and 2 computed, the middle one left out.
    b, t, h, d, text_len, band = 1, 300, 3, 64, 40, (128, 64)
    q, k, v, cache = qkvc(b, t, h, d, jnp.bfloat16, seed=37)
    hw = np.array([7, -1, 0], np.int32) if with_cache else np.array([7, -1, -1], np.int32)
    cache = poisoned(cache, hw) if with_cache else None
    tiles = np.array([True, False, True])
    kw = dict(text_len=text_len, text_first=True, band=band)
    out = pk.headwise_attention(q, k, v, hw, cache, backend=backend, query_tiles=jnp.asarray(tiles), **kw)
    rows = np.repeat(tiles, 128)[:t]
    base = np.zeros(q.shape, np.float32) if cache is None else np.asarray(cache, np.float32)
    assert same_bits(out[:, ~rows], jnp.asarray(base, q.dtype)[:, ~rows])  # the cache's (NaN-poisoned) rows
    full = pk.headwise_attention(q, k, v, hw, cache, backend=backend, **kw)
    assert same_bits(out[:, rows], full[:, rows])
    check(full, q, k, v, hw, cache, tol=TOL[jnp.bfloat16], **kw)


# --------------------------------------------------------------- bad input


def _bad(**over):
    q, k, v, cache = qkvc(1, 40, 3, 16, jnp.float32, seed=0)
    args = dict(q=q, k=k, v=v, head_window=np.array([-1, 2, 0], np.int32), cache=cache)
    kw = dict(text_len=8, text_first=True, band=(16, 16))
    for key, val in over.items():
        (args if key in args else kw)[key] = val
    return args, kw


BAD = [
    ("head_window", dict(head_window=np.array([-1, 2], np.int32)), r"\(3,\)"),
    ("head_window", dict(head_window=np.array([-1, 2, 1.5], np.float32)), "integer"),
    ("head_window", dict(head_window=np.array([-1, -2, 3], np.int32)), "-1 \\(full\\)"),
    ("cache", dict(cache=None), "cached"),
    ("cache", dict(cache=jnp.ones((1, 40, 3, 8), jnp.float32)), "shape"),
    ("cache", dict(cache=jnp.ones((1, 40, 3, 16), jnp.bfloat16)), "dtype"),
    ("k", dict(k=jnp.ones((1, 41, 3, 16), jnp.float32)), "shape"),
    ("v", dict(v=jnp.ones((1, 40, 3, 16), jnp.bfloat16)), "dtype"),
    ("q", dict(q=jnp.ones((40, 3, 16), jnp.float32)), "shape"),
    ("q", dict(q=jnp.ones((1, 40, 3, 16), jnp.int32)), "dtype"),
    ("text_len", dict(text_len=41), "tokens=40"),
    ("text_len", dict(text_len=-1), "text_len"),
    ("band", dict(band=(24, 16)), "power of two"),
    ("band", dict(band=(16, 8)), "power of two"),
    ("band", dict(band=64), "pair"),
    ("query_tiles", dict(query_tiles=np.ones(2, bool)), r"\(3,\)"),
    ("query_tiles", dict(query_tiles=np.ones(3, np.int32)), "bool"),
    ("padding", dict(padding=8), r"\[0, 8\)"),
    ("padding", dict(padding=-1), r"\[0, 8\)"),
    ("padding", dict(padding=3, **{n: jnp.ones((1, 42, 3, 16), jnp.float32) for n in "q k v cache".split()}),
     "multiple of 8"),
    ("padding", dict(padding=3, text_len=38), "text_len=38"),
]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("name,over,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_value_error(backend, name, over, msg):
    args, kw = _bad(**over)
    with pytest.raises(ValueError, match=name) as e:
        pk.headwise_attention(*args.values(), backend=backend, **kw)
    assert e.match(msg)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_bad_head_dim(backend):
    q = jnp.ones((1, 8, 1, 24), jnp.float32)
    with pytest.raises(ValueError, match="head_dim"):
        pk.headwise_attention(q, q, q, np.array([-1], np.int32), text_len=0, text_first=True, backend=backend)


# ------------------------------------------------------- registry, dispatch


class Spy:
    """A registered backend that records the calls it serves."""

    def __init__(self, backend, calls, reason=None):
        self.inner, self.calls, self.reason = backend, calls, reason
        self.name, self.config_type = backend.name, backend.config_type

    def default_config(self, *a):
        return self.inner.default_config(*a)

    def supports(self, *a):
        return self.reason or self.inner.supports(*a)

    def __call__(self, *a, **kw):
        self.calls.append(self.name)
        return self.inner(*a, **kw)


@pytest.fixture
def calls(monkeypatch):
    """Registered backends wrapped in spies; yields the names of the backends that ran."""
    calls = []
    monkeypatch.setattr(api, "BACKENDS", {n: Spy(b, calls) for n, b in api.BACKENDS.items()})
    return calls


def test_registry():
    assert BACKEND_NAMES[-1] == "xla" and "triton" in BACKEND_NAMES
    assert BACKEND_NAMES[0] == "mosaic_gpu" and api.MOSAIC_GPU_AUTOMATIC == {128: 1, 64: 8}
    mosaic = pk.get_backend("mosaic_gpu")
    assert mosaic.supports((1, 64, 2, 64), jnp.bfloat16, (128, 64), None) is None
    assert mosaic.supports((1, 64, 2, 128), jnp.float16, (256, 128), None) is None
    assert mosaic.supports((1, 64, 2, 64), jnp.bfloat16, (128, 64), "cpu")
    for args in (((1, 64, 2, 64), jnp.float32, (128, 64)), ((1, 64, 2, 32), jnp.bfloat16, (128, 64)),
                 ((1, 64, 2, 64), jnp.bfloat16, (64, 64)), ((1, 64, 2, 64), jnp.bfloat16, (128, 32))):
        assert mosaic.supports(*args, None)
    if jax.default_backend() != "gpu":
        assert mosaic.supports((1, 64, 2, 64), jnp.bfloat16, (128, 64), "gpu")  # no Hopper device here
    for name, b in pk.BACKENDS.items():
        assert b.name == name and pk.get_backend(name) is b
        cfg = b.default_config((1, 64, 2, 64), jnp.bfloat16, (128, 64))
        assert isinstance(cfg, b.config_type)
    assert pk.BACKENDS["xla"].supports((1, 64, 2, 64), jnp.bfloat16, (128, 64), "cpu") is None
    assert pk.BACKENDS["triton"].supports((1, 64, 2, 64), jnp.bfloat16, (128, 64), "cpu")
    assert pk.BACKENDS["triton"].supports((1, 64, 2, 64), jnp.bfloat16, (128, 64), "gpu") is None
    assert pk.get_backend("triton").default_config((1, 64, 2, 64), jnp.bfloat16, (128, 64)) == pk.TritonConfig(
        block_q=128, block_k=64, num_warps=8, num_stages=3, interpret=jax.default_backend() != "gpu")
    with pytest.raises(ValueError, match="'cuda'.*" + re.escape(str(BACKEND_NAMES))):
        pk.get_backend("cuda")


def _call(**kw):
    q, k, v, cache = qkvc(1, 40, 2, 16, jnp.float32, seed=0)
    return pk.headwise_attention(q, k, v, np.array([-1, 3], np.int32), cache, text_len=8, text_first=True,
                                 band=(16, 16), **kw)


def test_automatic_choice_takes_first_supported(calls):
    _call()
    if jax.default_backend() == "gpu":
        assert calls[0] != "xla"
    else:
        assert calls == ["xla"]  # the compiled kernels need a GPU
    # A config names its backend (here run in interpret mode off a GPU).
    _call(config=pk.TritonConfig())
    assert calls[-1] == "triton"


class Fake:
    """A backend that supports everything and computes nothing."""

    def __init__(self, name):
        self.name, self.config_type = name, type(name, (), {})

    def default_config(self, *a):
        return self.config_type()

    def supports(self, *a):
        return None

    def __call__(self, *a, **kw):
        return self.name


def test_mosaic_gpu_is_automatic_only_at_its_head_sizes_and_lengths(monkeypatch):
    """The automatic choice takes mosaic_gpu (when it supports the device) only at the head sizes and lengths where
    it was measured faster than Triton (head_dim 64: a multiple of 8 tokens, as SD3 carries it); naming it always
    works."""
    monkeypatch.setattr(api, "BACKENDS", {n: Fake(n) for n in ("mosaic_gpu", "triton", "xla")})
    hw = np.array([-1, 3], np.int32)

    def run(head_dim, tokens=40, **kw):
        q = jnp.ones((1, tokens, 2, head_dim), jnp.float32)
        return pk.headwise_attention(q, q, q, hw, text_len=8, text_first=True, band=(16, 16), **kw)

    assert run(128) == run(128, tokens=41) == "mosaic_gpu"
    assert run(64) == "mosaic_gpu" and run(64, tokens=41) == "triton" and run(32) == "triton"
    assert run(64, tokens=41, backend="mosaic_gpu") == "mosaic_gpu"
    monkeypatch.setattr(api, "MOSAIC_GPU_AUTOMATIC", {})
    assert run(128) == "triton"


def test_automatic_choice_on_this_cpu_is_the_reference():
    """On a CPU neither Pallas backend is taken automatically (mosaic_gpu needs a Hopper GPU, triton a GPU)."""
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 2, 128)), jnp.bfloat16)
    hw = np.array([-1, 3], np.int32)
    out = pk.headwise_attention(q, q, q, hw, text_len=8, text_first=True)
    ref = pk.headwise_attention(q, q, q, hw, text_len=8, text_first=True, backend="xla")
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_unknown_or_unsupported_backend(calls, monkeypatch):
    with pytest.raises(ValueError, match="'mosaic'.*" + re.escape(str(BACKEND_NAMES))):
        _call(backend="mosaic")
    monkeypatch.setitem(api.BACKENDS, "triton", Spy(pk.BACKENDS["triton"], calls, reason="no such GPU"))
    with pytest.raises(ValueError, match=r"'triton'.*no such GPU.*supporting it: \[.*'xla'\]") as e:
        _call(backend="triton")
    assert "'triton'" not in str(e.value).split("supporting it")[1]
    _call(backend="xla")
    assert calls == ["xla"]
    with pytest.raises(ValueError, match=r"config.*'xla'.*TritonConfig"):
        _call(backend="xla", config=pk.TritonConfig())
    with pytest.raises(ValueError, match="config"):
        _call(config=object())


def test_reference_name_is_backend_xla(calls):
    q, k, v, cache = qkvc(1, 40, 2, 16, jnp.float32, seed=0)
    kw = dict(text_len=8, text_first=True, band=(16, 32))
    out = pk.reference_headwise_attention(q, k, v, np.array([0, 3], np.int32), cache, **kw)
    assert calls == ["xla"]
    assert same_bits(out, pk.headwise_attention(q, k, v, np.array([0, 3], np.int32), cache, backend="xla", **kw))
