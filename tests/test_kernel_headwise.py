"""Backend "triton" specifics: tiles it visits, its config, its lowering (semantics: test_kernel_backends.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import schedule
from pallas_kernels.triton_backend import headwise_attention_with_tile_counts

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def qkvc(b, t, h, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, t, h, d)).astype(np.float32), dtype) for _ in range(4)]


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize(
    "band,tiles,single_loop,sort_heads",
    [
        ((32, 16), (32, 16), True, False),
        ((32, 16), (32, 16), False, True),  # other loop structure and grid order
        ((64, 32), (32, 16), True, False),  # execution tiles finer than the band
        ((64, 64), (16, 32), False, False),
    ],
)
@pytest.mark.parametrize("text_first,text_len", [(True, 37), (False, 37), (False, 0)])
def test_kernel_visits_exactly_the_scheduled_tiles(band, tiles, single_loop, sort_heads, text_first, text_len):
    b, t, h, d = 2, 181, 5, 16
    q, k, v, cache = qkvc(b, t, h, d, jnp.float32, seed=11)
    hw = np.array([3, -1, 0, 40, 17], np.int32)
    kw = dict(text_len=text_len, text_first=text_first, band=band)
    config = pk.TritonConfig(block_q=tiles[0], block_k=tiles[1], single_loop=single_loop, sort_heads=sort_heads)
    out, cnt = headwise_attention_with_tile_counts(q, k, v, hw, cache, config=config, **kw)
    ref = pk.headwise_attention(q, k, v, hw, cache, backend="xla", **kw)
    assert rel_err(out, ref) <= 1e-5
    # Every (batch, head, query tile) ran exactly the key tiles of the schedule, in execution tiles.
    vis = schedule.tile_visit_matrix(hw, tokens=t, block_q=tiles[0], block_k=tiles[1], **kw)
    np.testing.assert_array_equal(np.asarray(cnt), np.broadcast_to(vis.sum(-1), (b, h, vis.shape[1])))
    cost = pk.plan_cost(hw, batch=b, tokens=t, head_dim=d, block_q=tiles[0], block_k=tiles[1], **kw)
    np.testing.assert_array_equal(np.asarray(cnt).sum((0, 2)), cost.tiles)


def test_all_cached_visits_nothing():
    q, k, v, cache = qkvc(2, 77, 3, 32, jnp.float32, seed=7)
    hw = np.zeros((3,), np.int32)
    out, cnt = headwise_attention_with_tile_counts(q, k, v, hw, cache, text_len=10, text_first=True, band=(16, 16))
    assert int(np.asarray(cnt).sum()) == 0
    assert np.array_equal(np.asarray(out), np.asarray(cache))


def test_config_checks():
    for bad in (dict(block_q=24), dict(block_k=8), dict(num_warps=0), dict(num_stages=1.5)):
        with pytest.raises(ValueError, match=f"TritonConfig.{next(iter(bad))}"):
            pk.TritonConfig(**bad)
    q, k, v, _ = qkvc(1, 64, 2, 16, jnp.float32)
    # Execution tiles must divide the band.
    for tiles in ((64, 32), (32, 64)):
        with pytest.raises(ValueError, match=r"must divide the band"):
            pk.headwise_attention(q, k, v, np.array([-1, 3], np.int32), text_len=8, text_first=True, band=(32, 32),
                                  config=pk.TritonConfig(block_q=tiles[0], block_k=tiles[1]))
    cfg = pk.get_backend("triton").default_config((1, 64, 2, 128), jnp.float32, (128, 128))
    assert (cfg.block_q, cfg.block_k, cfg.num_stages) == (128, 128, 1)  # fp32: no multi-buffering


# --------------------------------------------- Triton lowering (no GPU needed)


def _lower_for_cuda(shape, dtype, has_cache, *, text_len, text_first, band, config):
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:
        pytest.skip("jax internals moved")
    orig = gpu_info.get_gpu_info
    gpu_info.get_gpu_info = lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    try:
        sds = jax.ShapeDtypeStruct(shape, dtype)
        hw = jax.ShapeDtypeStruct(shape[2:3], jnp.int32)
        f = functools.partial(pk.headwise_attention, text_len=text_len, text_first=text_first, band=band,
                              backend="triton", config=config)
        lowered = jax.jit(f).trace(sds, sds, sds, hw, sds if has_cache else None).lower(lowering_platforms=("cuda",))
        return lowered.as_text()
    finally:
        gpu_info.get_gpu_info = orig


@pytest.mark.parametrize(
    "shape,text_len,text_first,band,tiles,cache",
    [
        ((1, 4608, 24, 128), 512, True, None, (128, 128), True),
        ((2, 4429, 24, 64), 333, False, None, (64, 64), False),
    ],
)
def test_lowers_to_triton(shape, text_len, text_first, band, tiles, cache):
    config = pk.TritonConfig(block_q=tiles[0], block_k=tiles[1], num_warps=8, num_stages=3, sort_heads=True,
                             interpret=False)
    txt = _lower_for_cuda(shape, jnp.bfloat16, cache, text_len=text_len, text_first=text_first, band=band,
                          config=config)
    assert "__gpu$xla.gpu.triton" in txt
    if cache:
        assert "output_operand_alias" in txt
