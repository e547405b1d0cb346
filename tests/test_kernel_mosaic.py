"""Backend "mosaic_gpu" specifics: its config and its lowering (semantics: test_kernel_backends.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_config_checks():
    for bad in (dict(block_k=32), dict(block_k=256), dict(num_stages=1), dict(num_stages=2.0), dict(num_programs=0),
                dict(num_programs=True)):
        with pytest.raises(ValueError, match=f"MosaicConfig.{next(iter(bad))}"):
            pk.MosaicConfig(**bad)
    backend = pk.get_backend("mosaic_gpu")
    cfg = backend.default_config((1, 64, 2, 128), jnp.bfloat16, (128, 128))
    assert (cfg.block_k, cfg.num_stages, cfg.pingpong) == (128, 2, True)
    cfg = backend.default_config((1, 64, 2, 64), jnp.float16, (128, 64))
    assert (cfg.block_k, cfg.num_stages) == (64, 4)
    assert backend.default_config((1, 64, 2, 64), jnp.float16, (256, 256)).block_k == 128
    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="must divide the band"):
        pk.headwise_attention(q, q, q, np.array([-1, 3], np.int32), text_len=8, text_first=True, band=(128, 64),
                              config=pk.MosaicConfig(block_k=128))


# ------------------------------------------- Mosaic GPU lowering (no GPU needed)


def _lower_for_cuda(shape, has_cache, *, text_len, text_first, config):
    sds = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    hw = jax.ShapeDtypeStruct(shape[2:3], jnp.int32)
    f = functools.partial(pk.headwise_attention, text_len=text_len, text_first=text_first, backend="mosaic_gpu",
                          config=config)
    cache = sds if has_cache else None
    return jax.jit(f).trace(sds, sds, sds, hw, cache).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "shape,text_len,text_first,config",
    [
        ((1, 4608, 24, 128), 512, True, pk.MosaicConfig()),  # FLUX-1K
        ((1, 16896, 24, 128), 512, True, pk.MosaicConfig(block_k=64, pingpong=False)),  # FLUX-2K
        ((2, 4429, 24, 64), 333, False, pk.MosaicConfig()),  # SD3-1K: 4429 is not a multiple of 8 or 64
        ((1, 4608, 24, 128), 512, True, pk.MosaicConfig(persistent=False)),  # one program per work item
    ],
    ids=["FLUX-1K", "FLUX-2K", "SD3-1K", "FLUX-1K-grid"],
)
@pytest.mark.parametrize("cache", [True, False])
def test_lowers_to_mosaic_gpu(shape, text_len, text_first, config, cache):
    """The compiled (not interpreted) kernel lowers for CUDA on a CPU-only jaxlib (stops before ptxas)."""
    txt = _lower_for_cuda(shape, cache, text_len=text_len, text_first=text_first,
                          config=pk.MosaicConfig(**{**config.__dict__, "interpret": False}))
    assert "custom_call @mosaic_gpu" in txt
    assert "callback" not in txt  # not interpret mode
    if cache:
        assert "output_operand_alias" in txt


@pytest.mark.parametrize("config", [pk.MosaicConfig(), pk.MosaicConfig(persistent=False)], ids=["persistent", "grid"])
def test_lowers_with_query_tiles(config):
    """A call computing only some query tiles (the plan search's samples) lowers for CUDA at FLUX-2K."""
    shape = (1, 16896, 24, 128)
    sds = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    f = functools.partial(pk.headwise_attention, text_len=512, text_first=True, backend="mosaic_gpu",
                          config=pk.MosaicConfig(**{**config.__dict__, "interpret": False}))
    tiles = jax.ShapeDtypeStruct((shape[1] // 128,), jnp.bool_)
    lowered = jax.jit(lambda q, k, v, hw, t: f(q, k, v, hw, query_tiles=t)).trace(
        sds, sds, sds, jax.ShapeDtypeStruct((24,), jnp.int32), tiles).lower(lowering_platforms=("cuda",))
    assert "custom_call @mosaic_gpu" in lowered.as_text()


# ------------------------------------------- the work list and the persistent grid


def test_work_list_runs_full_rows_then_arrow_rows():
    """Every (batch, head, query pair) once: full rows first, then arrow rows, cached heads last (each class in
    (batch, head, query) order); the count of items that visit anything first."""
    from pallas_kernels import mosaic_backend as mb

    batch, tokens, text_len, heads = 2, 1000, 100, 4
    hw = np.array([70, 0, -1, 300], np.int32)
    work = np.asarray(mb.work_list(jnp.asarray(hw), batch=batch, tokens=tokens, text_len=text_len,
                                   text_first=False, band=(128, 64), block_k=64))
    n_prog = -(-tokens // 128)
    vis = pk.schedule.tile_visit_matrix(hw, tokens=tokens, text_len=text_len, text_first=False, block_q=128,
                                        block_k=64, band=(128, 64))
    cost = np.broadcast_to(vis.sum(-1)[None], (batch, heads, n_prog)).reshape(-1)
    cls = np.where(cost == 0, 2, np.where(cost == vis.shape[-1], 0, 1))
    order = work[1:]
    assert sorted(order.tolist()) == list(range(batch * heads * n_prog))
    assert work[0] == (cost > 0).sum() == batch * 3 * n_prog
    assert np.all(np.diff(cls[order]) >= 0)
    for c in range(3):
        assert np.all(np.diff(order[cls[order] == c]) > 0)  # each class in (batch, head, query) order
    assert set(order[work[0]:] // n_prog % heads) == {1}  # the cached head, never run
    assert (cls == 0).sum() > batch * n_prog  # the full head and the arrow heads' text rows


def test_work_list_leaves_out_unselected_query_tiles():
    """With ``query_tiles`` the items of the other band query tiles visit nothing: they come after every item
    that runs and are not counted; the selected ones keep their order."""
    from pallas_kernels import mosaic_backend as mb

    batch, tokens, text_len, heads, band = 2, 1000, 100, 3, (256, 64)
    hw = jnp.asarray(np.array([70, -1, 0], np.int32))
    tiles = np.array([True, False, False, True])  # band query tiles of 256 tokens = 2 pairs of 64-row tiles each
    kw = dict(batch=batch, tokens=tokens, text_len=text_len, text_first=False, band=band, block_k=64)
    every, some = (np.asarray(mb.work_list(hw, **kw, query_tiles=t)) for t in (None, jnp.asarray(tiles)))
    n_prog = -(-tokens // 128)
    selected = np.repeat(tiles, 2)[:n_prog]
    item_selected = np.broadcast_to(selected, (batch, heads, n_prog)).reshape(-1)
    run = every[1:every[0] + 1]
    assert some[0] == item_selected[run].sum() == batch * 2 * selected.sum()
    assert some[1:some[0] + 1].tolist() == [i for i in run if item_selected[i]]
    assert sorted(some[1:].tolist()) == list(range(batch * heads * n_prog))


def test_snake_visits_every_slot_once():
    from pallas_kernels import mosaic_backend as mb

    g, rounds = 5, 4
    slots = [int(mb._snake(jnp.int32(r), jnp.int32(p), g)) for r in range(rounds) for p in range(g)]
    assert sorted(slots) == list(range(g * rounds))
    assert [int(mb._snake(jnp.int32(1), jnp.int32(p), g)) for p in range(g)] == [9, 8, 7, 6, 5]


def test_persistent_programs_compute_the_same_bits_as_one_program_per_item():
    """Persistent programs each walking several items (three in interpret mode) give the bits of one program per
    item, on a mixed plan with a cached head, CFG batch 2 and a ragged length (text last)."""
    rng = np.random.default_rng(3)
    shape = (2, 4 * 128 + 45, 4, 64)
    q, k, v, cache = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(4))
    hw = jnp.asarray([70, -1, 0, 200], jnp.int32)
    kw = dict(text_len=45, text_first=False, band=(128, 64), backend="mosaic_gpu")
    outs = [pk.headwise_attention(q, k, v, hw, cache, config=cfg, **kw)
            for cfg in (pk.MosaicConfig(persistent=False), pk.MosaicConfig())]
    bits = [np.asarray(jax.lax.bitcast_convert_type(o, jnp.uint16)) for o in outs]
    for b in bits[1:]:
        np.testing.assert_array_equal(b, bits[0])
    cache_bits = np.asarray(jax.lax.bitcast_convert_type(cache, jnp.uint16))
    np.testing.assert_array_equal(bits[0][:, :, 2], cache_bits[:, :, 2])
    ref = pk.headwise_attention(q, k, v, hw, cache, **{**kw, "backend": "xla"})
    err = np.abs(np.asarray(outs[0], np.float32) - np.asarray(ref, np.float32)).max()
    assert err < 2e-2
