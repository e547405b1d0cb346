"""Head-wise attention kernel (Pallas, interpret mode on CPU) vs references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pallas_kernels as pk
from pallas_kernels import schedule
from pallas_kernels.headwise import _headwise_jit

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def rand(shape, dtype, seed):
    """Random normal data (never zeros)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x, dtype)


def qkvc(b, t, h, d, dtype, seed=0):
    return [rand((b, t, h, d), dtype, seed + i) for i in range(4)]


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def numpy_attention(q, k, v):
    """Plain full attention in float64 numpy: [B, T, H, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def same_bits(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


# ---------------------------------------------------------------- random plans

cases = st.fixed_dictionaries(
    dict(
        batch=st.integers(1, 2),
        tokens=st.integers(8, 300),
        heads=st.integers(1, 4),
        head_dim=st.sampled_from([16, 32, 64]),
        block_q=st.sampled_from([16, 32, 64]),
        block_k=st.sampled_from([16, 32, 64]),
        text_first=st.booleans(),
        text_frac=st.floats(0.0, 1.0),
        seed=st.integers(0, 2**16),
    )
).flatmap(
    lambda c: st.tuples(
        st.just(c),
        st.lists(
            st.one_of(st.just(-1), st.just(0), st.integers(1, c["tokens"] + 16)),
            min_size=c["heads"],
            max_size=c["heads"],
        ),
    )
)


@settings(max_examples=25, deadline=None)
@given(cases)
def test_random_plans_match_reference_fp32(case):
    c, hw = case
    text_len = int(round(c["text_frac"] * c["tokens"]))
    q, k, v, cache = qkvc(c["batch"], c["tokens"], c["heads"], c["head_dim"], jnp.float32, c["seed"])
    hw = np.array(hw, np.int32)
    kw = dict(text_len=text_len, text_first=c["text_first"], block_q=c["block_q"], block_k=c["block_k"])
    out = pk.headwise_attention(q, k, v, hw, cache, **kw)
    ref = pk.reference_headwise_attention(q, k, v, hw, cache, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out)))
    computed = hw != 0
    if computed.any():
        assert rel_err(out[:, :, computed], ref[:, :, computed]) <= 1e-5
    assert same_bits(out[:, :, ~computed], cache[:, :, ~computed])


@settings(max_examples=10, deadline=None)
@given(cases)
def test_random_plans_match_reference_bf16(case):
    c, hw = case
    text_len = int(round(c["text_frac"] * c["tokens"]))
    q, k, v, cache = qkvc(c["batch"], c["tokens"], c["heads"], c["head_dim"], jnp.bfloat16, c["seed"])
    hw = np.array(hw, np.int32)
    kw = dict(text_len=text_len, text_first=c["text_first"], block_q=c["block_q"], block_k=c["block_k"])
    out = pk.headwise_attention(q, k, v, hw, cache, **kw)
    ref = pk.reference_headwise_attention(q, k, v, hw, cache, **kw)
    assert out.dtype == jnp.bfloat16
    computed = hw != 0
    if computed.any():
        assert rel_err(out[:, :, computed], ref[:, :, computed]) <= 1e-2
    assert same_bits(out[:, :, ~computed], cache[:, :, ~computed])


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_plan_both_orders_padded(text_first, dtype):
    # 4 heads: full, cached, arrow 5, arrow wider than the image; T = 173 is not
    # a multiple of the tiles.
    b, t, h, d, text_len = 2, 173, 4, 32, 45
    q, k, v, cache = qkvc(b, t, h, d, dtype, seed=1)
    hw = np.array([-1, 0, 5, 1000], np.int32)
    kw = dict(text_len=text_len, text_first=text_first, block_q=32, block_k=16)
    out = pk.headwise_attention(q, k, v, hw, cache, **kw)
    ref = pk.reference_headwise_attention(q, k, v, hw, cache, **kw)
    sel = [0, 2, 3]
    assert rel_err(out[:, :, sel], ref[:, :, sel]) <= TOL[dtype]
    assert same_bits(out[:, :, 1], cache[:, :, 1])
    # Full head and an arrow wider than the image are plain full attention.
    full = numpy_attention(q, k, v)
    assert rel_err(out[:, :, 0], full[:, :, 0]) <= TOL[dtype]
    assert rel_err(out[:, :, 3], full[:, :, 3]) <= TOL[dtype]
    # The narrow arrow head is not (the test would be vacuous otherwise).
    assert rel_err(out[:, :, 2], full[:, :, 2]) > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens,text_len,text_first", [(128, 32, True), (150, 40, False), (97, 0, True)])
def test_all_full_equals_full_attention(dtype, tokens, text_len, text_first):
    b, h, d = 2, 3, 64
    q, k, v, _ = qkvc(b, tokens, h, d, dtype, seed=tokens)
    hw = np.full((h,), -1, np.int32)
    out = pk.headwise_attention(q, k, v, hw, text_len=text_len, text_first=text_first, block_q=32, block_k=32)
    ref = numpy_attention(q, k, v)
    assert rel_err(out, ref) <= TOL[dtype]
    xla = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    assert rel_err(out, xla) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_all_cached_is_cache_bit_for_bit(dtype):
    b, t, h, d = 2, 77, 3, 32
    q, k, v, cache = qkvc(b, t, h, d, dtype, seed=7)
    cache = cache.at[0, 0, 0, 0].set(jnp.nan)  # must pass through untouched
    hw = np.zeros((h,), np.int32)
    out = pk.headwise_attention(q, k, v, hw, cache, text_len=10, text_first=True, block_q=16, block_k=16)
    assert same_bits(out, cache)
    _, cnt = _run_counting(q, k, v, hw, cache, text_len=10, text_first=True, block_q=16, block_k=16)
    assert int(np.asarray(cnt).sum()) == 0


def test_every_computed_element_written():
    # Poison: a NaN cache aliased into the output must be fully overwritten
    # when no head is cached.
    b, t, h, d = 1, 90, 2, 16
    q, k, v, _ = qkvc(b, t, h, d, jnp.float32, seed=3)
    poison = jnp.full(q.shape, jnp.nan, q.dtype)
    hw = np.array([-1, 7], np.int32)
    out = pk.headwise_attention(q, k, v, hw, poison, text_len=20, text_first=False, block_q=32, block_k=16)
    assert np.all(np.isfinite(np.asarray(out)))


def _run_counting(q, k, v, hw, cache, *, text_len, text_first, block_q, block_k, single_loop=True, sort_heads=True):
    return _headwise_jit(
        q,
        k,
        v,
        jnp.asarray(hw, jnp.int32),
        cache,
        text_len=text_len,
        text_first=text_first,
        block_q=block_q,
        block_k=block_k,
        interpret=True,
        num_warps=4,
        num_stages=1,
        sort_heads=sort_heads,
        count_tiles=True,
        single_loop=single_loop,
    )


@pytest.mark.parametrize("single_loop", [True, False])
@pytest.mark.parametrize("text_first,text_len", [(True, 37), (False, 37), (False, 0), (True, 0)])
def test_kernel_visits_exactly_the_scheduled_tiles(text_first, text_len, single_loop):
    b, t, h, d = 2, 181, 5, 16
    q, k, v, cache = qkvc(b, t, h, d, jnp.float32, seed=11)
    hw = np.array([3, -1, 0, 40, 17], np.int32)
    kw = dict(text_len=text_len, text_first=text_first, block_q=32, block_k=16)
    # Both loop structures, and both grid orders (head ranking in the kernel
    # with single_loop=False): every (batch, head, tile) exactly once.
    out, cnt = _run_counting(q, k, v, hw, cache, single_loop=single_loop, sort_heads=not single_loop, **kw)
    ref = pk.reference_headwise_attention(q, k, v, hw, cache, **kw)
    assert rel_err(out, ref) <= 1e-5
    vis = schedule.tile_visit_matrix(hw, tokens=t, **kw)
    np.testing.assert_array_equal(np.asarray(cnt), np.broadcast_to(vis.sum(-1), (b, h, vis.shape[1])))
    cost = pk.plan_cost(hw, batch=b, tokens=t, head_dim=d, **kw)
    np.testing.assert_array_equal(np.asarray(cnt).sum((0, 2)), cost.tiles)


def test_plan_changes_inside_scan_without_recompiling():
    b, t, h, d = 1, 120, 4, 32
    q, k, v, _ = qkvc(b, t, h, d, jnp.float32, seed=5)
    kw = dict(text_len=24, text_first=True, block_q=32, block_k=32)
    plans = jnp.array([[-1, -1, -1, -1], [0, 3, -1, 9], [0, 0, 20, -1], [5, 0, 0, 0]], jnp.int32)

    @jax.jit
    def denoise(q, k, v, plans):
        def step(prev, hw):
            out = pk.headwise_attention(q, k, v, hw, prev, **kw)
            return out, out

        init = jnp.zeros_like(q)
        return jax.lax.scan(step, init, plans)[1]

    outs = denoise(q, k, v, plans)
    prev = jnp.zeros_like(q)
    for s in range(plans.shape[0]):
        ref = pk.reference_headwise_attention(q, k, v, plans[s], prev, **kw)
        assert rel_err(outs[s], ref) <= 1e-5
        hw = np.asarray(plans[s])
        assert same_bits(outs[s][:, :, hw == 0], outs[s - 1][:, :, hw == 0] if s else prev[:, :, hw == 0])
        prev = outs[s]

    @jax.jit
    def one(q, k, v, hw, cache):
        return pk.headwise_attention(q, k, v, hw, cache, **kw)

    for s in range(plans.shape[0]):
        one(q, k, v, plans[s], outs[0]).block_until_ready()
    assert one._cache_size() == 1


def test_traced_zero_without_cache_computes_full():
    b, t, h, d = 1, 64, 2, 16
    q, k, v, _ = qkvc(b, t, h, d, jnp.float32, seed=9)
    kw = dict(text_len=16, text_first=True, block_q=16, block_k=16)
    f = jax.jit(lambda q, k, v, hw: pk.headwise_attention(q, k, v, hw, **kw))
    out = f(q, k, v, jnp.array([0, 4], jnp.int32))
    full = numpy_attention(q, k, v)
    assert rel_err(out[:, :, 0], full[:, :, 0]) <= 1e-5
    ref = pk.reference_headwise_attention(q, k, v, np.array([-1, 4], np.int32), **kw)
    assert rel_err(out, ref) <= 1e-5


def test_default_blocks_flux_like_shape():
    # Default blocks (128 for D=128) on a short FLUX-like sequence; FLUX's
    # arrow(k) window w = n_img // (2k).
    b, t, h, d, text_len = 1, 300, 3, 128, 44
    q, k, v, cache = qkvc(b, t, h, d, jnp.bfloat16, seed=4)
    w8 = (t - text_len) // 16
    hw = np.array([w8, -1, 0], np.int32)
    out = pk.headwise_attention(q, k, v, hw, cache, text_len=text_len, text_first=True)
    ref = pk.reference_headwise_attention(q, k, v, hw, cache, text_len=text_len, text_first=True)
    assert rel_err(out[:, :, :2], ref[:, :, :2]) <= 1e-2
    assert same_bits(out[:, :, 2], cache[:, :, 2])


# ------------------------------------------------------------------ bad input


def _bad(**over):
    q, k, v, cache = qkvc(1, 40, 3, 16, jnp.float32, seed=0)
    args = dict(q=q, k=k, v=v, head_window=np.array([-1, 2, 0], np.int32), cache=cache)
    kw = dict(text_len=8, text_first=True, block_q=16, block_k=16)
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
    ("block_q", dict(block_q=24), "power of two"),
    ("block_k", dict(block_k=8), "power of two"),
]


@pytest.mark.parametrize("fn", [pk.headwise_attention, pk.reference_headwise_attention])
@pytest.mark.parametrize("name,over,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_value_error(fn, name, over, msg):
    args, kw = _bad(**over)
    with pytest.raises(ValueError, match=name) as e:
        fn(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("head_window"), args.pop("cache"), **kw)
    assert e.match(msg)


def test_bad_head_dim():
    q = jnp.ones((1, 8, 1, 24), jnp.float32)
    with pytest.raises(ValueError, match="head_dim"):
        pk.headwise_attention(q, q, q, np.array([-1], np.int32), text_len=0, text_first=True)


# --------------------------------------------- Triton lowering (no GPU needed)


def _lower_for_cuda(shape, dtype, hw_has_cache, **kw):
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:
        pytest.skip("jax internals moved")
    orig = gpu_info.get_gpu_info
    gpu_info.get_gpu_info = lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    try:
        sds = jax.ShapeDtypeStruct(shape, dtype)
        hw = jax.ShapeDtypeStruct(shape[2:3], jnp.int32)
        f = functools.partial(
            _headwise_jit, interpret=False, num_warps=8, num_stages=3, sort_heads=True, count_tiles=False, **kw
        )
        lowered = jax.jit(f).trace(sds, sds, sds, hw, sds if hw_has_cache else None).lower(lowering_platforms=("cuda",))
        return lowered.as_text()
    finally:
        gpu_info.get_gpu_info = orig


@pytest.mark.parametrize(
    "shape,text_len,text_first,bq,bk,cache",
    [
        ((1, 4608, 24, 128), 512, True, 128, 128, True),
        ((2, 4429, 24, 64), 333, False, 128, 64, False),
    ],
)
def test_lowers_to_triton(shape, text_len, text_first, bq, bk, cache):
    txt = _lower_for_cuda(shape, jnp.bfloat16, cache, text_len=text_len, text_first=text_first, block_q=bq, block_k=bk)
    assert "__gpu$xla.gpu.triton" in txt
    if cache:
        assert "output_operand_alias" in txt
