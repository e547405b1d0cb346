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
    assert (cfg.block_k, cfg.num_stages, cfg.prefetch_q) == (128, 4, True)  # 128-key tiles over a 64-key band
    assert backend.default_config((1, 64, 2, 64), jnp.float16, (256, 256)).block_k == 128


# ------------------------------------------- Mosaic GPU lowering (no GPU needed)


def _lower_for_cuda(shape, has_cache, *, text_len, text_first, config, padding=0):
    sds = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    hw = jax.ShapeDtypeStruct(shape[2:3], jnp.int32)
    f = functools.partial(pk.headwise_attention, text_len=text_len, text_first=text_first, backend="mosaic_gpu",
                          config=config, padding=padding)
    cache = sds if has_cache else None
    return jax.jit(f).trace(sds, sds, sds, hw, cache).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "shape,text_len,text_first,config,padding",
    [
        ((1, 4608, 24, 128), 512, True, pk.MosaicConfig(), 0),  # FLUX-1K
        ((1, 16896, 24, 128), 512, True, pk.MosaicConfig(block_k=64, pingpong=False), 0),  # FLUX-2K
        ((2, 4429, 24, 64), 333, False, pk.MosaicConfig(), 0),  # SD3-1K: 4429 is not a multiple of 8 or 64
        ((2, 4432, 24, 64), 333, False, pk.MosaicConfig(), 3),  # SD3-1K as the SD3 model carries it
        ((1, 4608, 24, 128), 512, True, pk.MosaicConfig(persistent=False), 0),  # one program per work item
        ((1, 16896, 24, 128), 512, True,
         pk.MosaicConfig(pingpong_per_item=True, prefetch_q_in_loop=True, schedule_ahead=True), 0),
    ],
    ids=["FLUX-1K", "FLUX-2K", "SD3-1K", "SD3-1K-carried", "FLUX-1K-grid", "FLUX-2K-candidates"],
)
@pytest.mark.parametrize("cache", [True, False])
def test_lowers_to_mosaic_gpu(shape, text_len, text_first, config, padding, cache):
    """The compiled (not interpreted) kernel lowers for CUDA on a CPU-only jaxlib (stops before ptxas); a
    length that is not a multiple of 8 is padded by a copy, one carried padded is not."""
    txt = _lower_for_cuda(shape, cache, text_len=text_len, text_first=text_first, padding=padding,
                          config=pk.MosaicConfig(**{**config.__dict__, "interpret": False}))
    assert "custom_call @mosaic_gpu" in txt
    assert "callback" not in txt  # not interpret mode
    assert ("stablehlo.pad" in txt) == (shape[1] % 8 != 0)
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
    (batch, head, query) order), after the class counts."""
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
    n_full, n_arrow = work[:2]
    order = work[2:]
    assert sorted(order.tolist()) == list(range(batch * heads * n_prog))
    assert (n_full, n_arrow) == ((cls == 0).sum(), (cls == 1).sum())
    assert n_full + n_arrow == batch * 3 * n_prog
    assert np.all(np.diff(cls[order]) >= 0)
    for c in range(3):
        assert np.all(np.diff(order[cls[order] == c]) > 0)  # each class in (batch, head, query) order
    assert set(order[n_full + n_arrow:] // n_prog % heads) == {1}  # the cached head, never run
    assert n_full > batch * n_prog  # the full head and the arrow heads' text rows


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
    run = every[2:2 + every[0] + every[1]]
    n_run = some[0] + some[1]
    assert n_run == item_selected[run].sum() == batch * 2 * selected.sum()
    assert some[2:2 + n_run].tolist() == [i for i in run if item_selected[i]]
    assert sorted(some[2:].tolist()) == list(range(batch * heads * n_prog))


@pytest.mark.parametrize("num_programs,n_full,n_arrow", [(5, 7, 30), (5, 10, 9), (4, 0, 13), (7, 3, 2), (132, 96, 3072),
                                                         (3, 5, 0)])
def test_programs_deal_every_item_once(num_programs, n_full, n_arrow):
    """Across the programs, the dealt positions are every item of the list once; each program runs its full rows
    (round robin), then its arrow rows (snake order: the direction alternates per round)."""
    from pallas_kernels import mosaic_backend as mb

    seen = []
    for program in range(num_programs):
        rounds, position = mb._program_items(jnp.int32(program), num_programs, jnp.int32(n_full), jnp.int32(n_arrow))
        mine = [int(position(jnp.int32(r))) for r in range(int(rounds))]
        full = [j for j in mine if j < n_full]
        assert full == list(range(program, n_full, num_programs)) and mine[:len(full)] == full
        arrow = [j - n_full for j in mine[len(full):]]
        assert all(j // num_programs == t for t, j in enumerate(arrow))  # one per round
        assert all(j % num_programs == (program if t % 2 == 0 else num_programs - 1 - program)
                   for t, j in enumerate(arrow))
        seen += mine
    assert sorted(seen) == list(range(n_full + n_arrow))


@pytest.mark.parametrize("tokens,text_len,text_first", [
    (4429, 333, False), (4032 + 77, 77, False), (64 + 300, 64, True), (192 + 40, 40, False), (700, 0, True)])
def test_coarse_key_tiles_visit_exactly_the_band(tokens, text_len, text_first):
    """128-key tiles over a band of 64 keys: the columns each item attends to (its tiles, masked by lo / hi) are
    exactly the band's keys, for full, arrow and cached heads; among them image ends that are not 128-aligned
    (4032 image tokens: the band's last tile and the first text tile share a 128-key tile)."""
    from pallas_kernels import mosaic_backend as mb

    band = (128, 64)
    n_img = tokens - text_len
    hw = np.array([-1, 0, 1, 40, n_img // 16, n_img // 64 + 1, 3 * n_img], np.int32)
    n_prog = -(-tokens // 128)
    want = pk.schedule.dense_mask(hw, tokens=tokens, text_len=text_len, text_first=text_first, band=band)
    tiles = mb.item_tiles(jnp.arange(n_prog)[None, :], jnp.asarray(hw)[:, None], tokens=tokens, text_len=text_len,
                          text_first=text_first, band=band, block_k=128)
    t = [np.asarray(x) for x in tiles]
    keys = np.arange(tokens)
    for h in range(len(hw)):
        for p in range(n_prog):
            got = np.zeros(tokens, bool)
            for start, count, lo, hi in ((t[0], t[1], t[2], t[3]), (t[4], t[5], t[6], t[7])):
                first, n, lo, hi = start[h, p], count[h, p], lo[h, p], hi[h, p]
                for i in range(n):
                    a = (first + i) * 128 + (lo if i == 0 else 0)
                    b = (first + i) * 128 + (hi if i == n - 1 else 128)
                    assert not got[a:b].any()  # no key twice
                    got[a:min(b, tokens)] = True
                    assert b <= tokens or i == n - 1
            np.testing.assert_array_equal(got, want[h, p * 128], err_msg=f"head {h} pair {p}")
            assert keys[got].size == want[h, p * 128].sum()


def test_persistent_programs_compute_the_same_bits_as_one_program_per_item():
    """Persistent programs each walking several items (three in interpret mode) give the bits of one program per
    item, with the compute warpgroups' alternation set up once per program or at every item, the next item's
    queries loaded before or inside the item's key loop, and its schedule read at its start or ahead, on a mixed
    plan with a cached head, CFG batch 2 and a ragged length (text last)."""
    rng = np.random.default_rng(3)
    shape = (2, 4 * 128 + 45, 4, 64)
    q, k, v, cache = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(4))
    hw = jnp.asarray([70, -1, 0, 200], jnp.int32)
    kw = dict(text_len=45, text_first=False, band=(128, 64), backend="mosaic_gpu")
    outs = [pk.headwise_attention(q, k, v, hw, cache, config=cfg, **kw)
            for cfg in (pk.MosaicConfig(persistent=False), pk.MosaicConfig(), pk.MosaicConfig(pingpong_per_item=True),
                        pk.MosaicConfig(prefetch_q_in_loop=True), pk.MosaicConfig(schedule_ahead=True))]
    bits = [np.asarray(jax.lax.bitcast_convert_type(o, jnp.uint16)) for o in outs]
    for b in bits[1:]:
        np.testing.assert_array_equal(b, bits[0])
    cache_bits = np.asarray(jax.lax.bitcast_convert_type(cache, jnp.uint16))
    np.testing.assert_array_equal(bits[0][:, :, 2], cache_bits[:, :, 2])
    ref = pk.headwise_attention(q, k, v, hw, cache, **{**kw, "backend": "xla"})
    err = np.abs(np.asarray(outs[0], np.float32) - np.asarray(ref, np.float32)).max()
    assert err < 2e-2


@pytest.mark.parametrize("text_first", [True, False])
def test_coarse_key_tiles_compute_the_band_function(text_first):
    """The kernel with 128-key tiles over a band of 64 keys (the default at head_dim 64) against the reference and
    against 64-key tiles, on a plan whose key ranges start and end mid-tile (checked on the schedule first)."""
    from pallas_kernels import mosaic_backend as mb

    rng = np.random.default_rng(11)
    tokens, text_len, band = 5 * 128 + 29, 77, (128, 64)
    shape = (1, tokens, 4, 64)
    q, k, v, cache = (jnp.asarray(rng.standard_normal(shape), jnp.float16) for _ in range(4))
    hw = np.array([70, 0, 150, -1], np.int32)
    tiles = mb.item_tiles(jnp.arange(6)[None, :], jnp.asarray(hw)[:, None], tokens=tokens, text_len=text_len,
                          text_first=text_first, band=band, block_k=128)
    lo = np.concatenate([np.asarray(tiles.lo_a)[tiles.n_a > 0], np.asarray(tiles.lo_c)[tiles.n_c > 0]])
    hi = np.concatenate([np.asarray(tiles.hi_a)[tiles.n_a > 0], np.asarray(tiles.hi_c)[tiles.n_c > 0]])
    assert (lo == 64).any() and (hi == 64).any()  # ranges starting and ending mid-tile
    cache = jnp.where(jnp.asarray(hw != 0)[None, None, :, None], jnp.nan, cache)
    kw = dict(text_len=text_len, text_first=text_first, band=band)
    coarse, fine = (pk.headwise_attention(q, k, v, hw, cache, backend="mosaic_gpu", config=pk.MosaicConfig(block_k=b),
                                          **kw) for b in (128, 64))
    ref = pk.headwise_attention(q, k, v, hw, cache, backend="xla", **kw)
    computed = hw != 0
    for out in (coarse, fine):
        got = np.asarray(out, np.float32)
        assert np.isfinite(got[:, :, computed]).all()
        assert np.abs(got - np.asarray(ref, np.float32))[:, :, computed].max() < 1e-2
        np.testing.assert_array_equal(np.asarray(out[:, :, 1]).view(np.uint16),
                                      np.asarray(cache[:, :, 1]).view(np.uint16))  # the cached head, bit for bit


# ------------------------------------------- FP8 heads (window -2)


def _fp8_inputs(shape, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, cache = (jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in ks)
    return q, k + 0.5, v, cache  # K with an offset the smoothing removes


def _rel(x, ref):
    x, ref = (jnp.asarray(a, jnp.float32) for a in (x, ref))
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def test_fp8_operands_round_trip_within_e4m3_error():
    """quantize -> dequantize: every element within e4m3's half-ulp (2^-4 relative; 2^-10 of the scale among the
    subnormals) of the original (K: of the smoothed K); the largest magnitude per (batch, head) maps to 448; V comes
    transposed."""
    from pallas_kernels import fp8

    q, k, v, _ = _fp8_inputs((2, 100, 3, 64))
    ops = fp8.quantize(q, k, v)
    assert ops.q8.dtype == fp8.FP8_DTYPE and ops.v8t.shape == (2, 3, 64, 100) and ops.scales.shape == (2, 3, 3)
    k_smooth = k.astype(jnp.float32) - k.astype(jnp.float32).mean(axis=1, keepdims=True)
    for x, x8, s in ((q, ops.q8, ops.scales[..., 0]), (k_smooth, ops.k8, ops.scales[..., 1]),
                     (v, ops.v8t.transpose(0, 3, 1, 2), ops.scales[..., 2])):
        x = np.asarray(x, np.float32)
        back = np.asarray(x8.astype(jnp.float32)) * np.asarray(s)[:, None, :, None]
        bound = np.maximum(np.abs(x) * 2.0 ** -4, np.asarray(s)[:, None, :, None] * 2.0 ** -10)
        assert np.all(np.abs(back - x) <= bound * 1.001)
        assert np.allclose(np.abs(np.asarray(x8.astype(jnp.float32))).max(axis=(1, 3)), 448.0)


@pytest.mark.parametrize("text_first,shape,text_len,padding",
                         [(True, (1, 300, 4, 128), 40, 0), (False, (2, 250, 4, 64), 37, 0),
                          (False, (1, 256, 4, 64), 37, 5)])
def test_fp8_heads_in_interpret_mode(text_first, shape, text_len, padding):
    """FP8 heads beside full, arrow and cached ones, into a cache poisoned with NaN on the computed heads: FP8
    heads within 8 % of exact attention and 3 % of the FP8 reference (the kernel rounds P against a running
    maximum), the other heads as without FP8 (bf16 error), cached heads bit-exact."""
    q, k, v, base = _fp8_inputs(shape)
    hw = np.array([-2, -1, 30, 0], np.int32)
    computed = hw != 0
    cache = jnp.where(jnp.asarray(computed)[None, None, :, None], jnp.nan, base)
    kw = dict(text_len=text_len, text_first=text_first, padding=padding)
    out = pk.headwise_attention(q, k, v, hw, cache, backend="mosaic_gpu", fp8=True,
                                config=pk.MosaicConfig(interpret=True), **kw)
    exact = pk.headwise_attention(q, k, v, np.where(hw == -2, -1, hw), base, backend="xla", **kw)
    ref8 = pk.headwise_attention(q, k, v, hw, base, backend="xla", fp8=True, **kw)
    assert bool(jnp.all(jnp.isfinite(out[:, :, computed])))
    assert 0.02 < _rel(out[:, :, 0], exact[:, :, 0]) < 0.08  # FP8 error: present, and bounded
    assert _rel(ref8[:, :, 0], exact[:, :, 0]) < 0.08
    assert _rel(out[:, :, 0], ref8[:, :, 0]) < 0.03
    for h in (1, 2):
        assert _rel(out[:, :, h], exact[:, :, h]) < 1e-2
    assert bool(jnp.all(jax.lax.bitcast_convert_type(out[:, :, 3], jnp.uint16)
                        == jax.lax.bitcast_convert_type(base[:, :, 3], jnp.uint16)))


def test_fp8_heads_need_the_flag_and_a_backend_that_runs_them():
    q, k, v, cache = _fp8_inputs((1, 64, 2, 64))
    kw = dict(text_len=8, text_first=True)
    hw = np.array([-2, -1], np.int32)
    with pytest.raises(ValueError, match=r"-2, an FP8 head, needs fp8=True"):
        pk.headwise_attention(q, k, v, hw, cache, backend="xla", **kw)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run FP8 heads .*\['mosaic_gpu', 'xla'\]"):
        pk.headwise_attention(q, k, v, hw, cache, backend="triton", fp8=True, **kw)
    # With the flag and no FP8 head the call is the plain one.
    plain = pk.headwise_attention(q, k, v, np.array([-1, 5], np.int32), cache, backend="xla", **kw)
    flagged = pk.headwise_attention(q, k, v, np.array([-1, 5], np.int32), cache, backend="xla", fp8=True, **kw)
    assert bool(jnp.all(plain == flagged))


def test_fp8_heads_on_a_gpu_that_is_not_hopper_are_refused(monkeypatch):
    """The automatic choice on a GPU without Mosaic GPU support does not fall back to the XLA reference (dense
    attention, every score in memory): it names what runs FP8 heads."""
    import pallas_kernels.api as api

    q, k, v, cache = _fp8_inputs((1, 64, 2, 64))
    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match=r"no backend runs FP8 heads .*on 'gpu' \(mosaic_gpu: needs compute "
                                         r"capability 9.x.*runs on Hopper GPUs"):
        pk.headwise_attention(q, k, v, np.array([-2, -1], np.int32), cache, text_len=8, text_first=True, fp8=True)


@pytest.mark.parametrize("shape,text_len,text_first", [((1, 4608, 24, 128), 512, True), ((2, 4429, 24, 64), 333, False)],
                         ids=["FLUX-1K", "SD3-1K"])
def test_fp8_heads_lower_to_mosaic_gpu(shape, text_len, text_first):
    """Both launches (bf16 heads, FP8 heads) lower for CUDA on a CPU-only jaxlib."""
    sds = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    f = functools.partial(pk.headwise_attention, text_len=text_len, text_first=text_first, backend="mosaic_gpu",
                          config=pk.MosaicConfig(interpret=False), fp8=True)
    txt = jax.jit(f).trace(sds, sds, sds, jax.ShapeDtypeStruct(shape[2:3], jnp.int32), sds).lower(
        lowering_platforms=("cuda",)).as_text()
    assert txt.count("custom_call @mosaic_gpu") == 2 and "callback" not in txt
