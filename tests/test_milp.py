"""Head-wise method selection (MILP) against exhaustive enumeration, plus its invariants (CPU, numpy/scipy)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ditfa_jax import milp


def random_instance(rng, h, m, *, ties=False, scale=0.1):
    """rse [H, M] around ``scale`` with some exact zeros and +inf; saving [H, M] (continuous or with ties)."""
    rse = scale * rng.uniform(0.4, 1.2, size=(h, m))
    rse[rng.random((h, m)) < 0.1] = 0.0
    rse[rng.random((h, m)) < 0.1] = np.inf
    if ties:
        saving = np.broadcast_to(rng.choice([0.0, 0.5, 1.0], size=m), (h, m)).copy()
    else:
        saving = rng.uniform(-0.1, 1.0, size=(h, m))
    return rse, saving


def check_solution(choice, rse, saving, budget, threshold):
    """Eligibility filter, budget and shape hold."""
    assert choice.dtype.kind == "i" and choice.shape == rse.shape[:-1]
    assert ((choice >= -1) & (choice < rse.shape[-1])).all()
    on = choice >= 0
    idx = np.where(on, choice, 0)[..., None]
    picked = np.take_along_axis(rse, idx, -1)[..., 0][on]
    assert (picked < threshold).all()
    assert picked.sum() <= budget
    assert (np.take_along_axis(np.broadcast_to(saving, rse.shape), idx, -1)[..., 0][on] > 0).all()


def assert_same_objective(got, want, rse, saving):
    s_got, e_got = milp.objective(got, rse, saving)
    s_want, e_want = milp.objective(want, rse, saving)
    assert s_got == pytest.approx(s_want, abs=1e-7)
    assert e_got == pytest.approx(e_want, abs=1e-9)  # ties in saving go to the least error


@pytest.mark.parametrize("ties", [False, True])
def test_layer_matches_brute_force(ties, monkeypatch):
    calls = []
    real = milp._milp
    monkeypatch.setattr(milp, "_milp", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(1 + ties)
    for _ in range(250):
        h, m = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        delta = float(rng.choice([0.0, 0.01, 0.05, 0.1, 0.3, 1.0]))
        c = float(rng.choice([1.0, 1.5, 3.0]))
        # errors around the eligibility threshold, so that the budget often binds
        rse, saving = random_instance(rng, h, m, ties=ties, scale=float(rng.choice([0.1, c * max(delta, 0.01) / h])))
        got = milp.solve_layer(rse, saving, delta, c)
        want = milp.brute_force_layer(rse, saving, delta, c)
        check_solution(got, rse, saving, delta, c * delta / h)
        assert_same_objective(got, want, rse, saving)
    assert len(calls) > 20  # the budget binds often enough that HiGHS (not only the fast path) is exercised


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**32 - 1),
       st.floats(0.0, 0.5), st.sampled_from([1.0, 1.5, 2.5]))
def test_layer_matches_brute_force_hypothesis(h, m, seed, delta, c):
    rse, saving = random_instance(np.random.default_rng(seed), h, m, ties=seed % 2 == 0, scale=c * delta / h + 1e-3)
    got = milp.solve_layer(rse, saving, delta, c)
    check_solution(got, rse, saving, delta, c * delta / h)
    assert_same_objective(got, milp.brute_force_layer(rse, saving, delta, c), rse, saving)


def test_budget_binds_and_tie_goes_to_least_error():
    # Four heads may be cached (saving 1 each), the budget fits two: the two smallest errors win.
    rse = np.array([[0.04], [0.01], [0.03], [0.02]])
    got = milp.solve_layer(rse, np.array([1.0]), delta=0.035, c=10.0)
    assert got.tolist() == [-1, 0, -1, 0]


def test_eligibility_filter():
    # Head 1's error alone fits the budget but exceeds c*delta/H, so it stays full.
    rse = np.array([[0.01], [0.2]])
    got = milp.solve_layer(rse, [1.0], delta=0.25, c=1.5)  # threshold 0.1875
    assert got.tolist() == [0, -1]


def test_delta_zero_and_nothing_eligible_give_all_full():
    rse = np.zeros((4, 3))
    assert milp.solve_layer(rse, np.ones(3), 0.0).tolist() == [-1] * 4
    assert milp.solve_layer(np.full((4, 3), np.inf), np.ones(3), 1.0).tolist() == [-1] * 4
    assert milp.solve_layer(np.full((4, 3), 0.01), -np.ones(3), 1.0).tolist() == [-1] * 4  # no saving


def test_monotonic_in_delta():
    rng = np.random.default_rng(7)
    deltas = [0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 3.0]
    for _ in range(20):
        rse, saving = random_instance(rng, 24, 4)
        best = [milp.objective(milp.solve_layer(rse, saving, d), rse, saving)[0] for d in deltas]
        assert all(b >= a - 1e-9 for a, b in zip(best, best[1:])), best


def test_deterministic_and_realistic_size():
    rng = np.random.default_rng(3)
    saving = np.array([1.0, 0.67, 0.72, 0.72])  # FLUX 1K: arrow_16 and arrow_32 remove the same tiles
    for _ in range(30):
        rse = rng.exponential(0.02, size=(24, 4)) * np.array([2.0, 0.5, 1.0, 1.5])
        a = milp.solve_layer(rse, saving, 0.2)
        check_solution(a, rse, saving, 0.2, 1.5 * 0.2 / 24)
        assert np.array_equal(a, milp.solve_layer(rse.copy(), saving.copy(), 0.2))
        # equal savings: never the costlier of arrow_16 / arrow_32
        worse = np.where(rse[:, 2] <= rse[:, 3], 3, 2)
        assert not (a == worse).any()


def test_global_matches_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(40):
        s, l, h, m = int(rng.integers(1, 3)), int(rng.integers(1, 3)), int(rng.integers(1, 3)), int(rng.integers(1, 3))
        delta = float(rng.choice([0.0, 0.05, 0.2, 0.6]))
        rse, saving = random_instance(rng, s * l * h, m, ties=bool(rng.integers(2)),
                                      scale=1.5 * max(delta, 0.05) / (s * l * h))
        rse, saving = rse.reshape(s, l, h, m), saving.reshape(s, l, h, m)
        got = milp.solve_global(rse, saving, delta, 1.5)
        assert got.shape == (s, l, h)
        check_solution(got, rse, saving, delta, 1.5 * delta / (s * l * h))
        want = milp.brute_force_global(rse, saving, delta, 1.5)
        assert milp.objective(got, rse, saving)[0] == pytest.approx(milp.objective(want, rse, saving)[0], rel=1e-6)


def test_global_at_least_as_good_as_per_layer_with_same_total():
    # Per-layer budgets delta each sum to S*L*delta; the global optimum under that total (and the looser of the
    # two filters) can only do as well or better when its filter is not stricter.
    rng = np.random.default_rng(5)
    rse = rng.exponential(0.02, size=(3, 4, 6, 3))
    saving = np.array([1.0, 0.6, 0.8])
    per_layer = np.stack([np.stack([milp.solve_layer(rse[s, l], saving, 0.1, c=1.5) for l in range(4)])
                          for s in range(3)])
    glob = milp.solve_global(rse, saving, 0.1 * 12, c=1.5)  # same threshold: c*delta_total/(S*L*H) = c*delta/H
    assert milp.objective(glob, rse, saving)[0] >= milp.objective(per_layer, rse, saving)[0] - 1e-9


@pytest.mark.parametrize("args, match", [
    ((np.zeros(3), np.ones(3), 0.1), r"rse: expected .*\[H, M\].*shape \(3,\)"),
    ((np.zeros((3, 2)), np.ones((3, 3)), 0.1), r"saving: expected shape \(3, 2\)"),
    ((np.full((2, 2), np.nan), np.ones(2), 0.1), r"rse: contains NaN"),
    ((-np.ones((2, 2)), np.ones(2), 0.1), r"rse: .* >= 0"),
    ((np.zeros((2, 2)), np.array([1.0, np.nan]), 0.1), r"saving: must be finite"),
    ((np.zeros((2, 2)), np.ones(2), -0.1), r"delta: expected a finite value >= 0"),
    ((np.zeros((2, 2)), np.ones(2), np.nan), r"delta: expected a finite value >= 0"),
])
def test_layer_validation(args, match):
    with pytest.raises(ValueError, match=match):
        milp.solve_layer(*args)


def test_validation_c_and_global_shape():
    with pytest.raises(ValueError, match=r"c: expected a finite value > 0"):
        milp.solve_layer(np.zeros((2, 2)), np.ones(2), 0.1, c=0.0)
    with pytest.raises(ValueError, match=r"rse: expected .*\[S, L, H, M\]"):
        milp.solve_global(np.zeros((2, 2)), np.ones(2), 0.1)


def test_global_lp_rounding_is_near_optimal():
    rng = np.random.default_rng(13)
    for _ in range(40):
        s, l, h, m = 2, int(rng.integers(1, 3)), int(rng.integers(1, 3)), int(rng.integers(1, 4))
        delta = float(rng.choice([0.05, 0.2, 0.6]))
        rse, saving = random_instance(rng, s * l * h, m, scale=1.5 * delta / (s * l * h))
        rse, saving = rse.reshape(s, l, h, m), saving.reshape(s, l, h, m)
        got, bound = milp.solve_global(rse, saving, delta, 1.5, method="lp", return_bound=True)
        check_solution(got, rse, saving, delta, 1.5 * delta / (s * l * h))
        best = milp.objective(milp.brute_force_global(rse, saving, delta, 1.5), rse, saving)[0]
        assert best - saving.max() - 1e-9 <= milp.objective(got, rse, saving)[0] <= best + 1e-9
        assert bound >= best - 1e-7
    with pytest.raises(ValueError, match=r"method: expected one of"):
        milp.solve_global(rse, saving, 0.1, method="greedy")


def _unified_brute(head_rse, head_saving, hb, step_rse, step_saving, history, block_rse, block_first, block_saving,
                   sb, c, cap):
    """Best saving over every assignment of a tiny unified instance (the same eligibility and constraints)."""
    import itertools

    steps, layers, heads, m = head_rse.shape
    scored_heads = np.isfinite(head_rse).any(-1).sum()
    scored_steps = (np.isfinite(step_rse).any(1) | np.isfinite(block_rse).any(1)).sum()
    head_ok = head_rse < c * hb / scored_heads
    kind_ok, block_ok = step_rse < c * sb / scored_steps, block_rse < c * sb / scored_steps
    options = [("compute", None)] + [("kind", k) for k in range(step_rse.shape[1])] + \
              [("block", j) for j in range(block_rse.shape[1])]
    best = 0.0
    for per_step in itertools.product(options, repeat=steps - 1):
        plan = [("compute", None)] + list(per_step)
        saved = err = 0.0
        ok, skipped, skips_in_row = True, 0, 0
        running = []
        for s, (what, i) in enumerate(plan):
            if what == "kind":
                ok &= bool(kind_ok[s, i]) and s - skipped >= history[i]
                saved, err, skipped, skips_in_row = saved + step_saving, err + step_rse[s, i], skipped + 1, \
                    skips_in_row + 1
                ok &= cap is None or skips_in_row <= cap
                running.append(0)
                continue
            skips_in_row = 0
            if what == "block":
                ok &= bool(block_ok[s, i])
                saved, err = saved + block_saving[i], err + block_rse[s, i]
            running.append(layers if what == "compute" else block_first[i])
        if not ok or err > sb:
            continue
        pairs = [(s, l, h) for s in range(steps) for l in range(running[s]) for h in range(heads)]
        for heads_choice in itertools.product(range(-1, m), repeat=len(pairs)):
            hs = he = 0.0
            good = True
            for (s, l, h), q in zip(pairs, heads_choice):
                if q >= 0:
                    good &= bool(head_ok[s, l, h, q])
                    hs, he = hs + head_saving[q], he + head_rse[s, l, h, q]
            if good and he <= hb:
                best = max(best, saved + hs)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_unified_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    steps, layers, heads = 4, 2, 1
    head_rse = rng.uniform(0.0, 0.3, (steps, layers, heads, 1))
    head_rse[0] = np.inf
    step_rse = rng.uniform(0.0, 0.2, (steps, 2))
    step_rse[0] = np.nan
    block_rse = rng.uniform(0.0, 0.2, (steps, 1))
    block_rse[0] = np.nan
    args = (head_rse, np.array([1.0]), 0.4, step_rse, 3.0, [1, 2], block_rse, [1], [1.5], 0.3)
    cap = 1 if seed % 2 else None
    got = milp.solve_unified(*args, c=2.0, max_skips_in_a_row=cap)
    assert got.saved == pytest.approx(_unified_brute(*args, 2.0, cap), abs=1e-9)
    assert got.head_error <= 0.4 and got.step_error <= 0.3 and got.step_kind[0] == 0
    skipped = got.step_kind != 0
    assert (got.head[skipped] == -1).all() and (got.first_run[skipped] == layers).all()
    for s in range(steps):
        assert (got.head[s, got.first_run[s]:] == -1).all()  # no head method where the block does not run
        if got.step_kind[s] == 2:  # the second kind needs 2 computed steps before it
            assert s - skipped[:s].sum() >= 2


def test_unified_zero_budgets_compute_everything():
    head_rse = np.full((3, 2, 2, 1), 0.01)
    head_rse[0] = np.inf
    got = milp.solve_unified(head_rse, [1.0], 0.0, np.full((3, 1), 0.01), 5.0, [1], np.full((3, 0), 0.0), [], [], 0.0)
    assert (got.head == -1).all() and (got.step_kind == 0).all() and got.saved == 0.0


def test_layer_with_a_shared_cost_matches_brute_force():
    """A candidate that costs once per layer when used (FP8 heads' quantisation and launch): the best of all
    assignments by saving minus that cost, found by enumeration."""
    import itertools

    rng = np.random.default_rng(7)
    used = 0
    for _ in range(120):
        h, m = int(rng.integers(1, 5)), int(rng.integers(2, 4))
        delta, c = float(rng.choice([0.05, 0.3, 1.0])), 1.5
        rse, saving = random_instance(rng, h, m, ties=False, scale=c * delta / h)
        saving[:, -1] = rng.uniform(0.05, 0.5)  # the shared-cost candidate: a small saving per head
        cost = float(rng.uniform(0.0, 1.0))
        got = milp.solve_layer(rse, saving, delta, c, shared_cost=(m - 1, cost))
        check_solution(got, rse, saving, delta, c * delta / h)

        def value(choice):
            return milp.objective(choice, rse, saving)[0] - cost * (np.asarray(choice) == m - 1).any()

        best = max(value(ch) for ch in itertools.product(range(-1, m), repeat=h)
                   if np.all([rse[i, j] < c * delta / h for i, j in enumerate(ch) if j >= 0])
                   and milp.objective(ch, rse, saving)[1] <= delta)
        assert value(got) == pytest.approx(best, abs=1e-9)
        used += bool((got == m - 1).any())
    assert used > 5  # the shared-cost candidate is sometimes worth its cost
    with pytest.raises(ValueError, match="shared_cost"):
        milp.solve_layer(rse, saving, delta, c, shared_cost=(m, 0.1))
