"""Method vocabulary: names -> head windows, candidate savings, solver choices -> windows, step kinds (CPU)."""

import numpy as np
import pytest

import pallas_kernels as pk
from ditfa_jax.methods import (DEFAULT_CANDIDATES, STEP_HISTORY, STEP_KINDS, candidate_savings, candidate_windows,
                               check_band, check_candidates, method_window, step_kind_codes, step_kind_names,
                               windows_from_choice)


def test_method_window():
    assert method_window("full", 4096) == -1
    assert method_window("cached", 4096) == 0
    assert method_window("arrow_8", 4096) == 256
    assert method_window("arrow_16", 4096) == 128
    assert method_window("arrow_32", 16384) == 256
    assert method_window("arrow_32", 16) == 1          # never below 1 (0 would mean cached)
    assert candidate_windows(DEFAULT_CANDIDATES, 4096).tolist() == [0, 256, 128, 64]
    for bad in ("arrow_0", "arrow_x", "arrow", "Arrow_8", "dense", 8):
        with pytest.raises(ValueError, match="method name"):
            method_window(bad, 4096)
    with pytest.raises(ValueError, match="n_img"):
        method_window("arrow_8", 0)


def test_candidate_savings_match_plan_cost():
    kw = dict(image_tokens=4096, text_len=512, text_first=True, head_dim=128)
    sav = candidate_savings(DEFAULT_CANDIDATES, band=(128, 128), **kw)
    want = pk.plan_cost(np.array([0, 256, 128, 64]), batch=1, tokens=4608, text_len=512, text_first=True,
                        head_dim=128).saving
    np.testing.assert_allclose(sav, want)
    assert sav[0] == 1.0 and (0 < sav[1:]).all() and (sav[1:] < 1).all()
    fine = candidate_savings(DEFAULT_CANDIDATES, band=(32, 16), **kw)  # the band, not the default tiles, counts
    np.testing.assert_allclose(fine, pk.plan_cost(np.array([0, 256, 128, 64]), batch=1, tokens=4608, text_len=512,
                                                  text_first=True, head_dim=128, band=(32, 16)).saving)
    assert fine[0] == 1.0 and (fine[1:] > sav[1:]).all()
    with pytest.raises(ValueError, match="band: expected"):
        candidate_savings(DEFAULT_CANDIDATES, band=(128, 100), **kw)


def test_check_band():
    assert check_band([128, 64]) == (128, 64) and check_band((16, 16)) == (16, 16)
    for bad in ((128, 48), (8, 16), (0, 64), (128,), (128, 64, 64), "128", (128.0, 64), (True, 64), None):
        with pytest.raises(ValueError, match=r"band: expected \(query, key\) tokens, two powers of two >= 16"):
            check_band(bad)


def test_windows_from_choice():
    hw = windows_from_choice(np.array([[-1, 0, 1, 3]]), DEFAULT_CANDIDATES, 4096)
    assert hw.dtype == np.int32 and hw.tolist() == [[-1, 0, 256, 64]]
    with pytest.raises(ValueError, match=r"choice: indices must lie in \[-1, 3\]"):
        windows_from_choice(np.array([4]), DEFAULT_CANDIDATES, 4096)


def test_step_kinds():
    assert STEP_KINDS == ("compute", "reuse", "taylor1", "taylor2") and STEP_HISTORY == (0, 1, 2, 3)
    codes = step_kind_codes(["compute", "reuse", "taylor1", "taylor2"])
    assert codes.dtype == np.int8 and codes.tolist() == [0, 1, 2, 3]
    assert step_kind_names(codes) == STEP_KINDS and step_kind_names([]) == ()
    with pytest.raises(ValueError, match=r"step_kind: step 1 is 'taylor3'; expected one of \['compute', 'reuse'"):
        step_kind_codes(["compute", "taylor3"])
    with pytest.raises(ValueError, match=r"where: expected a list of step method names"):
        step_kind_codes("compute", name="where")
    with pytest.raises(ValueError, match=r"step_kind: step 2 has code 4; expected 0\.\.3"):
        step_kind_names([0, 1, 4])


def test_fp8_method_is_a_full_head_priced_by_its_time():
    assert method_window("fp8", 4096) == -2
    assert check_candidates(("cached", "fp8")) == ("cached", "fp8")
    where = dict(image_tokens=4096, text_len=512, text_first=True, head_dim=128, band=(128, 128))
    saving = candidate_savings(("cached", "arrow_8", "fp8"), fp8_head_ratio=0.9, **where)
    np.testing.assert_allclose(saving[[0, 2]], [1.0, 0.1])
    np.testing.assert_allclose(saving[1], candidate_savings(("arrow_8",), **where)[0])
    assert candidate_savings(("fp8",), fp8_head_ratio=1.3, **where)[0] == pytest.approx(-0.3)  # slower: never chosen
    with pytest.raises(ValueError, match="fp8_head_ratio"):
        candidate_savings(("cached", "fp8"), **where)
    np.testing.assert_array_equal(windows_from_choice(np.array([-1, 1, 0]), ("cached", "fp8"), 4096), [-1, -2, 0])
