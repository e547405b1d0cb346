"""Tile schedule and plan cost of the head-wise attention kernel (numpy only)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pallas_kernels as pk
from pallas_kernels import schedule


def brute_force_visits(hw, tokens, text_len, text_first, bq, bk):
    """Independent statement of the tile band: [H, nq, nk] bool.

    A query tile visits key tile kt iff the head is not cached and
    (the head is full, or the query tile holds a text query, or kt holds a text
    key, or some image query of the tile and some image key of kt are within
    the window).
    """
    nq, nk = -(-tokens // bq), -(-tokens // bk)
    is_text = np.zeros(tokens, bool)
    if text_first:
        is_text[:text_len] = True
    else:
        is_text[tokens - text_len :] = True
    out = np.zeros((len(hw), nq, nk), bool)
    pos = np.arange(tokens)
    for h, w in enumerate(hw):
        for qt in range(nq):
            rows = pos[qt * bq : (qt + 1) * bq]
            for kt in range(nk):
                cols = pos[kt * bk : (kt + 1) * bk]
                if w == 0:
                    v = False
                elif w < 0 or is_text[rows].any() or is_text[cols].any():
                    v = True
                else:
                    r, c = rows[~is_text[rows]], cols[~is_text[cols]]
                    v = bool((np.abs(r[:, None] - c[None, :]) <= w).any())
                out[h, qt, kt] = v
    return out


def nominal_mask(hw, tokens, text_len, text_first):
    """The method's arrow mask at token granularity: [H, T, T]."""
    is_text = np.zeros(tokens, bool)
    if text_first:
        is_text[:text_len] = True
    else:
        is_text[tokens - text_len :] = True
    pos = np.arange(tokens)
    m = []
    for w in hw:
        if w < 0:
            m.append(np.ones((tokens, tokens), bool))
        elif w == 0:
            m.append(np.zeros((tokens, tokens), bool))
        else:
            band = np.abs(pos[:, None] - pos[None, :]) <= w
            m.append(is_text[:, None] | is_text[None, :] | band)
    return np.stack(m)


geometry = st.tuples(
    st.integers(1, 200),  # tokens
    st.sampled_from([16, 32, 64]),  # block_q
    st.sampled_from([16, 32, 64]),  # block_k
    st.booleans(),  # text_first
).flatmap(
    lambda g: st.tuples(
        st.just(g),
        st.integers(0, g[0]),  # text_len
        st.lists(st.one_of(st.just(-1), st.just(0), st.integers(1, g[0] + 20)), min_size=1, max_size=5),
        st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4])),  # band / execution tiles
    )
)


@settings(max_examples=60, deadline=None)
@given(geometry)
def test_schedule_matches_brute_force_and_covers_nominal(case):
    (tokens, bq, bk, text_first), text_len, hw, (rq, rk) = case
    hw = np.array(hw, np.int32)
    band = (bq * rq, bk * rk)
    kw = dict(tokens=tokens, text_len=text_len, text_first=text_first)
    # At band granularity the schedule is the brute-force statement ...
    vis = schedule.tile_visit_matrix(hw, block_q=band[0], block_k=band[1], **kw)
    np.testing.assert_array_equal(vis, brute_force_visits(hw, tokens, text_len, text_first, *band))
    mask = schedule.dense_mask(hw, band=band, **kw)
    nom = nominal_mask(hw, tokens, text_len, text_first)
    assert not np.any(nom & ~mask), "tile band must contain the nominal band"
    # ... and execution tiles dividing the band visit exactly the band's tokens.
    fine = schedule.tile_visit_matrix(hw, block_q=bq, block_k=bk, band=band, **kw)
    pos = np.arange(tokens)
    np.testing.assert_array_equal(fine[:, pos // bq][:, :, pos // bk], mask)
    # Two disjoint ranges of execution tiles, each within [0, nk).
    nq, nk = fine.shape[1:]
    t0, t1, b0, b1 = schedule.kv_tile_ranges(np.arange(nq)[None], hw[:, None], block_q=bq, block_k=bk, band=band, **kw)
    assert np.all((0 <= t0) & (t0 <= t1) & (t1 <= nk))
    assert np.all((0 <= b0) & (b0 <= b1) & (b1 <= nk))
    assert np.all((b1 <= t0) | (t1 <= b0) | (b0 == b1) | (t0 == t1))


def test_band_must_be_divisible_by_the_execution_tiles():
    kw = dict(tokens=100, text_len=10, text_first=True)
    for tiles, band in (((64, 16), (32, 64)), ((32, 48), (64, 64)), ((32, 32), (48, 64))):
        with pytest.raises(ValueError, match="must divide the band"):
            schedule.kv_tile_ranges(0, 3, block_q=tiles[0], block_k=tiles[1], band=band, **kw)
    # band=None is the execution tiles.
    a = schedule.tile_visit_matrix(np.array([5, -1, 0]), block_q=32, block_k=16, **kw)
    b = schedule.tile_visit_matrix(np.array([5, -1, 0]), block_q=32, block_k=16, band=(32, 16), **kw)
    np.testing.assert_array_equal(a, b)


def test_default_band_table():
    assert dict(schedule.DEFAULT_BAND) == {16: (128, 64), 32: (128, 64), 64: (128, 64), 128: (128, 128),
                                           256: (64, 64)}
    assert pk.default_band(128) == (128, 128)
    with pytest.raises(TypeError):
        schedule.DEFAULT_BAND[64] = (64, 64)
    with pytest.raises(ValueError, match="head_dim=48"):
        pk.default_band(48)


def test_flux_arrow8_band_matches_reference_kernel_formula():
    # FLUX 1K: 512 text + 4096 image, w = 4096 // 16 = 256, 128x128 tiles:
    # an image query tile j visits floor((j*BM - w)/BN)..ceil(((j+1)*BM+w)/BN)
    # (image coordinates) = 2 + 1 + 2 = 5 band tiles (640 keys) + 4 text tiles.
    kw = dict(tokens=4608, text_len=512, text_first=True, block_q=128, block_k=128)
    t0, t1, b0, b1 = schedule.kv_tile_ranges(np.arange(36), np.int32(256), **kw)
    assert np.all(t0[4:] == 0) and np.all(t1[4:] == 4)
    mid = slice(6, 34)
    assert np.all(b1[mid] - b0[mid] == 5)
    for j in range(32):  # image tile j = query tile j + 4
        lo = max((j * 128 - 256) // 128, 0) + 4
        hi = min(-(-((j + 1) * 128 + 256) // 128), 32) + 4
        assert (b0[j + 4], b1[j + 4]) == (lo, hi)
    # Text query tiles run full.
    assert np.all(t1[:4] == 36) and np.all(b1[:4] == b0[:4])


def test_sd3_order_text_last():
    kw = dict(tokens=4429, text_len=333, text_first=False, block_q=128, block_k=64)
    nk = 70
    tt = schedule.text_key_tile_range(4429, 333, False, 64)
    assert tt == (64, 70)
    t0, t1, b0, b1 = schedule.kv_tile_ranges(np.arange(35), np.int32(128), **kw)
    assert np.all(t1[32:] == nk) and np.all(t0[32:] == 0)  # text query tiles
    assert np.all(t0[:32] == 64) and np.all(t1[:32] == 70)
    assert b0[0] == 0 and b1[0] == 4  # rows 0..127, keys 0..255
    assert b1[31] == 64  # clipped at the text tiles
    assert schedule.rotate_text_tiles_first(4429, 333, False, 128) == 32


@settings(max_examples=40, deadline=None)
@given(geometry, st.integers(1, 3), st.sampled_from([16, 64, 128]))
def test_plan_cost_counts_tiles_and_mask(case, batch, head_dim):
    (tokens, bq, bk, text_first), text_len, hw, (rq, rk) = case
    hw = np.array(hw, np.int32)
    band = (bq * rq, bk * rk)
    kw = dict(tokens=tokens, text_len=text_len, text_first=text_first)
    cost = pk.plan_cost(hw, batch=batch, head_dim=head_dim, band=band, block_q=bq, block_k=bk, **kw)
    vis = schedule.tile_visit_matrix(hw, block_q=bq, block_k=bk, band=band, **kw)
    mask = schedule.dense_mask(hw, band=band, **kw)
    assert (cost.band, cost.block_q, cost.block_k) == (band, bq, bk)
    np.testing.assert_array_equal(cost.tiles, batch * vis.sum((1, 2)))
    np.testing.assert_array_equal(cost.programs, batch * vis.any(-1).sum(-1))
    np.testing.assert_allclose(cost.time_estimate(2.0, 3.0), (2.0 * cost.tiles + 3.0 * cost.programs).sum())
    np.testing.assert_array_equal(cost.flops, 4 * head_dim * batch * mask.sum((1, 2)))
    np.testing.assert_array_equal(cost.tile_flops, 4 * head_dim * bq * bk * cost.tiles)
    nq, nk = -(-tokens // bq), -(-tokens // bk)
    assert cost.dense_tiles == batch * nq * nk
    assert cost.dense_flops == 4 * head_dim * batch * tokens * tokens
    np.testing.assert_array_equal(cost.saved_flops, cost.dense_flops - cost.flops)
    assert cost.total_flops == cost.flops.sum()
    assert np.all(cost.flops[hw == 0] == 0)
    assert np.all(cost.flops[hw == -1] == cost.dense_flops)
    # FLOPs are the band's: the same with execution tiles equal to the band.
    at_band = pk.plan_cost(hw, batch=batch, head_dim=head_dim, band=band, **kw)
    assert (at_band.block_q, at_band.block_k) == band
    np.testing.assert_array_equal(at_band.flops, cost.flops)


def test_plan_cost_defaults_and_leading_axes():
    plans = np.array([[-1, -1, -1], [0, 0, 0], [-1, 0, 256]], np.int32)
    cost = pk.plan_cost(plans, batch=1, tokens=4608, text_len=512, text_first=True, head_dim=128)
    assert cost.band == (cost.block_q, cost.block_k) == pk.default_band(128)
    assert cost.tiles.shape == (3, 3)
    np.testing.assert_allclose(cost.flop_fraction[:2], [1.0, 0.0])
    np.testing.assert_allclose(cost.saving[0], 0.0)
    np.testing.assert_allclose(cost.saving[1], 1.0)
    # arrow_8 on FLUX 1K: 4 text tiles full (36 each) + 32 image tiles with
    # 4 text + <= 5 band tiles.
    single = pk.plan_cost(np.array([256]), batch=1, tokens=4608, text_len=512, text_first=True, head_dim=128)
    assert single.tiles[0] == 4 * 36 + 32 * 4 + (3 + 4 + 28 * 5 + 4 + 3)
    assert cost.tiles[2, 2] == single.tiles[0]


def test_plan_cost_bad_input():
    with pytest.raises(ValueError, match="head_window"):
        pk.plan_cost(np.array([-2]), batch=1, tokens=64, text_len=8, text_first=True, head_dim=64)
    with pytest.raises(ValueError, match="head_window"):
        pk.plan_cost(np.array([0.5]), batch=1, tokens=64, text_len=8, text_first=True, head_dim=64)
    with pytest.raises(ValueError, match="text_len"):
        pk.plan_cost(np.array([1]), batch=1, tokens=64, text_len=65, text_first=True, head_dim=64)
    with pytest.raises(ValueError, match="band"):
        pk.plan_cost(np.array([1]), batch=1, tokens=64, text_len=8, text_first=True, head_dim=64, band=(48, 64))
    with pytest.raises(ValueError, match="must divide the band"):
        pk.plan_cost(np.array([1]), batch=1, tokens=64, text_len=8, text_first=True, head_dim=64, block_q=256)
