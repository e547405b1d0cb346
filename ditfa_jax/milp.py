"""Head-wise method selection as a small MILP (DiTFastAttnV2 plan search).

For one (step, layer) every head ``h`` may take at most one candidate method
``m`` (binary ``x[h, m]``; no method = full attention).  The chosen pairs must
keep the summed relative squared error within the budget,
``sum x * rse <= delta``, and a pair is only eligible when its own error is
small, ``rse[h, m] < c * delta / H``, so one bad head cannot eat the whole
budget.  The solver maximises the summed saving ``sum x * saving``.

Among the assignments with the best saving the one with the smallest summed
error is returned (a second, lexicographic solve), so equal savings -- e.g.
many heads that may be cached but only some fit the budget -- are resolved by
quality and the answer does not depend on the solver's path.

``solve_global`` is the same problem with one budget over all steps, layers
and heads (it needs every RSE up front, which the progressive calibration
does not have; it exists to compare the two on a recorded RSE table).  At run
size branch and bound is too slow, so it rounds the LP relaxation instead
(within one pair's saving of the optimum).

``solve_unified`` chooses every method at once from a recorded calibration:
per step, compute it, skip it (reuse / extrapolate: each step kind) or run
only its first F blocks; per computed (step, block, head), a head method.  It
maximises the time saved (from a measured cost model) under two budgets, the
summed head RSE and the summed velocity RSE of the step choices, so heads and
steps compete for time, not FLOPs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
import tempfile
import warnings

import numpy as np
from scipy import optimize, sparse

__all__ = ["solve_layer", "solve_global", "solve_unified", "UnifiedChoice", "brute_force_layer", "brute_force_global",
           "objective"]

FULL = -1  # "no method": the head runs full attention

# Relative slack on the best saving when the second solve minimises the error.
_TIE_RTOL = 1e-9


def _check_tables(rse, saving, lead: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate rse [..., M] / saving [..., M] (or [M]) and return float64 copies of equal shape."""
    rse = np.asarray(rse, dtype=np.float64)
    saving = np.asarray(saving, dtype=np.float64)
    want = "[" + ", ".join(["S", "L", "H"][3 - lead:]) + ", M]"
    if rse.ndim != lead + 1 or rse.shape[-1] < 1 or 0 in rse.shape:
        raise ValueError(f"rse: expected a non-empty array {want}, got shape {rse.shape}")
    if saving.ndim == 1:
        saving = np.broadcast_to(saving, rse.shape)
    if saving.shape != rse.shape:
        raise ValueError(f"saving: expected shape {rse.shape} (like rse) or [{rse.shape[-1]}], got {saving.shape}")
    if np.isnan(rse).any():
        raise ValueError(f"rse: contains NaN at index {tuple(int(i) for i in np.argwhere(np.isnan(rse))[0])}")
    if (rse < 0).any():
        raise ValueError(f"rse: relative squared errors must be >= 0 (+inf allowed = never eligible), "
                         f"got min {rse.min()}")
    if not np.isfinite(saving).all():
        raise ValueError("saving: must be finite (no NaN/inf)")
    return rse, np.array(saving)


def _check_scalars(delta, c, name: str) -> tuple[float, float]:
    delta = float(delta)
    c = float(c)
    if not np.isfinite(delta) or delta < 0:
        raise ValueError(f"{name}: expected a finite value >= 0, got {delta}")
    if not np.isfinite(c) or c <= 0:
        raise ValueError(f"c: expected a finite value > 0, got {c}")
    return delta, c


def objective(choice, rse, saving) -> tuple[float, float]:
    """(summed saving, summed rse) of an assignment ``choice`` [...] (method index or -1) over rse/saving [..., M]."""
    choice = np.asarray(choice)
    rse = np.asarray(rse, dtype=np.float64)
    saving = np.broadcast_to(np.asarray(saving, dtype=np.float64), rse.shape)
    on = choice >= 0
    idx = np.where(on, choice, 0)[..., None]
    s = np.take_along_axis(saving, idx, -1)[..., 0]
    e = np.take_along_axis(rse, idx, -1)[..., 0]
    return float(np.sum(s[on])), float(np.sum(e[on]))


# A debugging line that HiGHS (as bundled with scipy 1.18) prints to the C stdout after some MIP solves.
_HIGHS_NOISE = b"HighsMipSolverData::transformNewIntegerFeasibleSolution"


@contextlib.contextmanager
def _drop_highs_noise():
    """Capture the C-level stdout (fd 1) during a solve and pass everything but HiGHS' debug line through."""
    try:
        saved = os.dup(1)
    except OSError:                            # no stdout at all: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        try:
            sys.stdout.flush()
        except (AttributeError, ValueError, OSError):
            pass
        os.dup2(tmp.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            kept = b"".join(line for line in tmp.read().splitlines(keepends=True) if _HIGHS_NOISE not in line)
            if kept:
                os.write(1, kept)


def _milp(cost, rows, cols, n_groups, rse_vals, budget, *, extra=None, time_limit=None, mip_rel_gap=0.0):
    """Solve min cost@x, one-per-group, rse@x <= budget (+ optional row extra[0]@x >= extra[1]); x in {0, 1}."""
    n = cost.size
    group = sparse.csr_array((np.ones(n), (rows, cols)), shape=(n_groups, n))
    constraints = [optimize.LinearConstraint(group, -np.inf, 1.0),
                   optimize.LinearConstraint(rse_vals[None, :], -np.inf, budget)]
    if extra is not None:
        constraints.append(optimize.LinearConstraint(extra[0][None, :], extra[1], np.inf))
    # Presolve off: it gains nothing on these problems and takes minutes (ignoring time_limit) on run-sized ones.
    options = {"mip_rel_gap": mip_rel_gap, "presolve": False}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    with _drop_highs_noise():
        res = optimize.milp(cost, constraints=constraints, integrality=np.ones(n),
                            bounds=optimize.Bounds(0.0, 1.0), options=options)
    if res.status == 1 and res.x is not None:
        warnings.warn(f"MILP solver (HiGHS) stopped at a limit ({res.message}); using its best assignment, "
                      f"which may not be optimal", RuntimeWarning, stacklevel=4)
    elif res.x is None or res.status != 0:
        raise RuntimeError(f"MILP solver (HiGHS) failed: status {res.status}: {res.message}")
    return res.x > 0.5


def _lp_round(s, e, rows, n_groups, budget) -> tuple[np.ndarray, float]:
    """LP relaxation (HiGHS interior point + crossover: a vertex, so at most two fractional pairs, in one group)
    rounded down, then filled greedily by saving. Returns (x, LP upper bound on the saving)."""
    n = s.size
    a = sparse.vstack([sparse.csr_array((np.ones(n), (rows, np.arange(n))), shape=(n_groups, n)),
                       sparse.csr_array(e[None, :])]).tocsr()
    res = optimize.linprog(-s, A_ub=a, b_ub=np.r_[np.ones(n_groups), budget], bounds=(0.0, 1.0),
                           method="highs-ipm")
    if res.status != 0:
        raise RuntimeError(f"LP solver (HiGHS) failed: status {res.status}: {res.message}")
    x = res.x > 1.0 - 1e-7
    # Feasibility exactly (the LP honours the budget only up to its tolerance): drop the least efficient picks.
    order = np.argsort(s / np.maximum(e, 1e-300), kind="stable")
    used = float(e[x].sum())
    for i in order:
        if used <= budget:
            break
        if x[i]:
            x[i] = False
            used = float(e[x].sum())
    taken = np.zeros(n_groups, bool)
    taken[rows[x]] = True
    rest = budget - used
    for i in np.lexsort((e, -s)):              # fill: largest saving first, then smallest error
        if not taken[rows[i]] and e[i] <= rest:
            x[i] = True
            taken[rows[i]] = True
            rest -= e[i]
    return x, -float(res.fun)


def _solve(rse: np.ndarray, saving: np.ndarray, budget: float, threshold: float, *, time_limit=None,
           mip_rel_gap: float = 0.0, tie_break: bool = True, method: str = "milp") -> tuple[np.ndarray, float]:
    """Core: rse/saving [N, M] -> (choice [N] (index or -1), upper bound on the saving).

    ``method="milp"`` maximises the saving (then minimises the error when ``tie_break``); ``"lp"`` rounds the LP
    relaxation, which is within one pair's saving of the optimum."""
    n_heads, _ = rse.shape
    choice = np.full(n_heads, FULL, dtype=np.int64)
    eligible = (rse < threshold) & (rse <= budget) & (saving > 0)
    if budget <= 0 or not eligible.any():
        return choice, 0.0

    # Fast path: every head takes its best eligible method (max saving, then min rse). If that fits the
    # budget it reaches the per-head upper bound, so it is the (lexicographic) optimum.
    key_s = np.where(eligible, saving, -np.inf)
    best_s = key_s.max(axis=1, keepdims=True)
    key_e = np.where(eligible & (saving == best_s), rse, np.inf)
    greedy = np.where(eligible.any(axis=1), np.argmin(key_e, axis=1), FULL)
    best_total, used = objective(greedy, rse, saving)
    if used <= budget:
        return greedy, best_total

    rows, cols = np.nonzero(eligible)          # variables = eligible pairs, row-major (deterministic order)
    s = saving[rows, cols]
    e = rse[rows, cols]
    if method == "lp":
        x, bound = _lp_round(s, e, rows, n_heads, budget)
        choice[rows[x]] = cols[x]
        return choice, bound

    var = np.arange(rows.size)
    rhs = budget
    for _ in range(4):                         # re-solve with a tighter rhs if HiGHS' tolerance overshoots
        x = _milp(-s, rows, var, n_heads, e, rhs, time_limit=time_limit, mip_rel_gap=mip_rel_gap)
        best = float(s[x].sum())
        if tie_break and best > 0:
            floor = best - _TIE_RTOL * max(1.0, abs(best))
            x2 = _milp(e, rows, var, n_heads, e, rhs, extra=(s, floor), time_limit=time_limit,
                       mip_rel_gap=mip_rel_gap)
            if float(s[x2].sum()) >= floor and float(e[x2].sum()) <= float(e[x].sum()):
                x = x2
        used = float(e[x].sum())
        if used <= budget:
            choice[rows[x]] = cols[x]
            return choice, best * (1.0 + mip_rel_gap) + 1e-9
        rhs -= (used - budget) + 1e-12 * max(1.0, budget)
    raise RuntimeError(f"MILP solver (HiGHS) kept returning assignments over the budget {budget} "
                       f"(last summed rse {used})")


def solve_layer(rse, saving, delta: float, c: float = 1.5, *, time_limit: float | None = None,
                shared_cost: tuple[int, float] | None = None) -> np.ndarray:
    """Methods for the heads of one (step, layer): int64 [H], a candidate index or -1 (full).

    ``rse``: [H, M] relative squared error of each candidate on each head (+inf = never eligible);
    ``saving``: [H, M] or [M] value of each candidate (e.g. the fraction of attention FLOPs removed);
    ``delta``: error budget of the layer; ``c``: eligibility factor (``rse < c*delta/H``).
    Maximises the summed saving; ties go to the smallest summed error. Pairs with saving <= 0 are never chosen.
    ``shared_cost = (m, cost)``: candidate m costs ``cost`` (in saving units) once when any head takes it (FP8
    heads: the layer's quantisation and second launch); the best choice with m is kept only when its saving less
    that cost beats the best choice without m, which makes the answer exact.
    """
    rse, saving = _check_tables(rse, saving, 1)
    delta, c = _check_scalars(delta, c, "delta")
    threshold = c * delta / rse.shape[0]
    choice = _solve(rse, saving, delta, threshold, time_limit=time_limit)[0]
    if shared_cost is None:
        return choice
    m, cost = shared_cost
    if not (isinstance(m, (int, np.integer)) and 0 <= m < rse.shape[1]) or not np.isfinite(cost) or cost < 0:
        raise ValueError(f"shared_cost: expected (candidate index in 0..{rse.shape[1] - 1}, cost >= 0), "
                         f"got {shared_cost!r}")
    if not (choice == m).any():
        return choice
    without = rse.copy()
    without[:, m] = np.inf
    other = _solve(without, saving, delta, threshold, time_limit=time_limit)[0]
    return choice if objective(choice, rse, saving)[0] - cost > objective(other, rse, saving)[0] else other


GLOBAL_METHODS = ("auto", "milp", "lp")


def solve_global(rse, saving, delta_total: float, c: float = 1.5, *, method: str = "auto",
                 exact_limit: int = 20_000, mip_rel_gap: float = 1e-6, time_limit: float | None = 300.0,
                 return_bound: bool = False):
    """One budget over the whole run: rse/saving [S, L, H, M] (saving may be [M]) -> int64 [S, L, H].

    Eligibility ``rse < c*delta_total/(S*L*H)``, one constraint ``sum x*rse <= delta_total``. Step 0 is not
    forced full here; set ``rse[0] = inf`` for the plan's step-0 rule. ``method``: "milp" (HiGHS branch and
    bound, relative gap ``mip_rel_gap``), "lp" (LP relaxation rounded down and filled greedily: at most one pair's
    saving below the optimum, seconds even for 50 x 57 x 24 x 4 pairs, where branch and bound can take hours) or
    "auto" (milp up to ``exact_limit`` eligible pairs, else lp). ``return_bound``: also return an upper bound on
    the optimal summed saving (LP bound or the MILP gap), to report how far the answer can be from optimal.
    """
    rse, saving = _check_tables(rse, saving, 3)
    delta_total, c = _check_scalars(delta_total, c, "delta_total")
    if method not in GLOBAL_METHODS:
        raise ValueError(f"method: expected one of {GLOBAL_METHODS}, got {method!r}")
    shape = rse.shape[:3]
    n = int(np.prod(shape))
    m = rse.shape[-1]
    threshold = c * delta_total / n
    if method == "auto":
        pairs = int(((rse < threshold) & (saving > 0)).sum())
        method = "milp" if pairs <= exact_limit else "lp"
    out, bound = _solve(rse.reshape(n, m), saving.reshape(n, m), delta_total, threshold, time_limit=time_limit,
                        mip_rel_gap=mip_rel_gap, tie_break=False, method=method)
    out = out.reshape(shape)
    return (out, bound) if return_bound else out


def _brute(rse: np.ndarray, saving: np.ndarray, budget: float, threshold: float) -> np.ndarray:
    """Enumerate every assignment of rse/saving [N, M]; best saving, then least rse."""
    n, m = rse.shape
    eligible = (rse < threshold) & (saving > 0)
    best_key, best = None, np.full(n, FULL, dtype=np.int64)
    for combo in itertools.product(range(-1, m), repeat=n):
        ch = np.array(combo)
        on = ch >= 0
        if not all(eligible[i, ch[i]] for i in np.nonzero(on)[0]):
            continue
        s, e = objective(ch, rse, saving)
        if e > budget:
            continue
        if best_key is None or s > best_key[0] + 1e-12 or (abs(s - best_key[0]) <= 1e-12 and e < best_key[1]):
            best_key, best = (s, e), ch
    return best


def brute_force_layer(rse, saving, delta: float, c: float = 1.5) -> np.ndarray:
    """Reference for tests: enumerate all (M+1)^H assignments of one layer (small H, M only)."""
    rse, saving = _check_tables(rse, saving, 1)
    delta, c = _check_scalars(delta, c, "delta")
    if (rse.shape[1] + 1) ** rse.shape[0] > 1_000_000:
        raise ValueError(f"rse: shape {rse.shape} too large to enumerate")
    if delta <= 0:
        return np.full(rse.shape[0], FULL, dtype=np.int64)
    return _brute(rse, saving, delta, c * delta / rse.shape[0])


def brute_force_global(rse, saving, delta_total: float, c: float = 1.5) -> np.ndarray:
    """Reference for tests: enumerate all assignments of a tiny [S, L, H, M] table under one budget."""
    rse, saving = _check_tables(rse, saving, 3)
    delta_total, c = _check_scalars(delta_total, c, "delta_total")
    shape = rse.shape[:3]
    n, m = int(np.prod(shape)), rse.shape[-1]
    if (m + 1) ** n > 1_000_000:
        raise ValueError(f"rse: shape {rse.shape} too large to enumerate")
    if delta_total <= 0:
        return np.full(shape, FULL, dtype=np.int64)
    return _brute(rse.reshape(n, m), saving.reshape(n, m), delta_total, c * delta_total / n).reshape(shape)


def _nan_to_inf(table) -> np.ndarray:
    """float64 copy with NaN (not measured) as +inf (never eligible)."""
    table = np.array(table, np.float64)
    table[np.isnan(table)] = np.inf
    return table


@dataclasses.dataclass(frozen=True)
class UnifiedChoice:
    """`solve_unified`'s answer: ``head`` int64 [S, L, H] (candidate index or -1), ``step_kind`` int64 [S] (0
    compute, k > 0 the k-th step kind), ``first_run`` int64 [S] (blocks 0..first_run-1 run; L: all), ``saved``
    (the summed saving of the choice), ``head_error`` and ``step_error`` (the summed RSE spent of each budget)."""
    head: np.ndarray
    step_kind: np.ndarray
    first_run: np.ndarray
    saved: float
    head_error: float
    step_error: float


def solve_unified(head_rse, head_saving, head_budget: float, step_rse, step_saving: float, step_history,
                  block_rse, block_first, block_saving, step_budget: float, *, c: float = 1.5,
                  max_skips_in_a_row: int | None = None, time_limit: float | None = 300.0,
                  mip_rel_gap: float = 1e-6) -> UnifiedChoice:
    """Every method of a run at once (module docstring), as one MILP.

    ``head_rse`` [S, L, H, M] with ``head_saving`` [H, M] or [M] (the saving of each head candidate), under
    ``head_budget`` (summed RSE); ``step_rse`` [S, K] (K step kinds; a skipped step saves ``step_saving``; kind k
    needs ``step_history[k]`` computed steps before it) and ``block_rse`` [S, J] (running only the first
    ``block_first[j]`` blocks, increasing, saves ``block_saving[j]``), under ``step_budget``. NaN or inf entries are
    never chosen; set them at step 0 to keep it computed and full. A pair is eligible only when its error is below
    ``c`` times its budget's share per (step, layer, head), respectively per step. ``max_skips_in_a_row`` caps
    consecutive skipped steps. A skipped step runs no head method; a block that does not run neither.
    """
    head_rse = _nan_to_inf(head_rse)
    head_rse, head_saving = _check_tables(head_rse, np.broadcast_to(head_saving, head_rse.shape), 3)
    step_rse = _nan_to_inf(step_rse).reshape(head_rse.shape[0], -1)
    block_rse = _nan_to_inf(block_rse).reshape(head_rse.shape[0], -1)
    block_first = np.asarray(block_first, np.int64).reshape(-1)
    block_saving = np.asarray(block_saving, np.float64).reshape(-1)
    step_history = np.asarray(step_history, np.int64).reshape(-1)
    steps, layers, heads, _ = head_rse.shape
    if step_history.shape != (step_rse.shape[1],):
        raise ValueError(f"step_history: expected one count per step kind ({step_rse.shape[1]}), got "
                         f"{step_history.tolist()}")
    if block_first.shape != (block_rse.shape[1],) or block_saving.shape != block_first.shape:
        raise ValueError(f"block_first / block_saving: expected {block_rse.shape[1]} values (block_rse's columns)")
    if (np.diff(block_first) <= 0).any() or not ((block_first >= 1) & (block_first < layers)).all():
        raise ValueError(f"block_first {block_first.tolist()}: expected increasing numbers in 1..{layers - 1}")
    head_budget, c = _check_scalars(head_budget, c, "head_budget")
    step_budget, _ = _check_scalars(step_budget, c, "step_budget")
    if max_skips_in_a_row is not None and max_skips_in_a_row < 0:
        raise ValueError(f"max_skips_in_a_row: expected a number >= 0 or None, got {max_skips_in_a_row}")

    scored = np.isfinite(head_rse).any(-1)
    head_ok = (head_rse < c * head_budget / max(int(scored.sum()), 1)) & (head_saving > 0) & (head_budget > 0)
    step_share = c * step_budget / max(int((np.isfinite(step_rse).any(1) | np.isfinite(block_rse).any(1)).sum()), 1)
    kind_ok = (step_rse < step_share) & (step_budget > 0)
    block_ok = (block_rse < step_share) & (step_budget > 0)

    hs, hl, hh, hm = np.nonzero(head_ok)
    ks, kk = np.nonzero(kind_ok)
    bs, bj = np.nonzero(block_ok)
    n_head, n_kind = hs.size, ks.size
    n = n_head + n_kind + bs.size
    kind_var = n_head + np.arange(n_kind)
    block_var = n_head + n_kind + np.arange(bs.size)
    saving = np.concatenate([head_saving[hs, hl, hh, hm], np.full(n_kind, float(step_saving)), block_saving[bj]])
    head_err = np.zeros(n)
    head_err[:n_head] = head_rse[hs, hl, hh, hm]
    step_err = np.zeros(n)
    step_err[kind_var] = step_rse[ks, kk]
    step_err[block_var] = block_rse[bs, bj]
    rows, cols, vals, upper = [], [], [], []

    def row(var, coef, bound):
        rows.extend([len(upper)] * len(var))
        cols.extend(var)
        vals.extend(coef)
        upper.append(bound)

    # one method per (step, layer, head), none where the step is skipped or the block does not run
    group = {}
    for i, key in enumerate(zip(hs, hl, hh)):
        group.setdefault(key, []).append(i)
    for (s_, l_, _), var in group.items():
        var = var + kind_var[ks == s_].tolist() + block_var[(bs == s_) & (block_first[bj] <= l_)].tolist()
        row(var, [1.0] * len(var), 1.0)
    for s_ in range(steps):  # one step option per step
        var = kind_var[ks == s_].tolist() + block_var[bs == s_].tolist()
        if len(var) > 1:
            row(var, [1.0] * len(var), 1.0)
    for i, s_, k_ in zip(kind_var, ks, kk):  # the history a step kind needs: computed steps before s = s - skipped
        before = kind_var[ks < s_].tolist()
        row([i] + before, [float(step_history[k_])] + [1.0] * len(before), float(s_))
    if max_skips_in_a_row is not None:
        for start in range(steps - max_skips_in_a_row):
            var = kind_var[(ks >= start) & (ks <= start + max_skips_in_a_row)].tolist()
            if len(var) > max_skips_in_a_row:
                row(var, [1.0] * len(var), float(max_skips_in_a_row))
    choice_head = np.full((steps, layers, heads), FULL, np.int64)
    step_kind = np.zeros(steps, np.int64)
    first_run = np.full(steps, layers, np.int64)
    if n == 0:
        return UnifiedChoice(choice_head, step_kind, first_run, 0.0, 0.0, 0.0)
    structure = sparse.csr_array((vals, (rows, cols)), shape=(len(upper), n))
    budgets = [head_budget, step_budget]
    for _ in range(4):  # re-solve with tighter budgets if HiGHS' tolerance overshoots one
        constraints = [optimize.LinearConstraint(structure, -np.inf, np.asarray(upper)),
                       optimize.LinearConstraint(np.vstack([head_err, step_err]), -np.inf, np.asarray(budgets))]
        with _drop_highs_noise():
            res = optimize.milp(-saving, constraints=constraints, integrality=np.ones(n),
                                bounds=optimize.Bounds(0.0, 1.0),
                                options={"mip_rel_gap": mip_rel_gap, "presolve": True,
                                         **({} if time_limit is None else {"time_limit": float(time_limit)})})
        if res.x is None or res.status not in (0, 1):
            raise RuntimeError(f"MILP solver (HiGHS) failed: status {res.status}: {res.message}")
        if res.status == 1:
            warnings.warn(f"MILP solver (HiGHS) stopped at a limit ({res.message}); using its best assignment",
                          RuntimeWarning, stacklevel=2)
        x = res.x > 0.5
        used = (float(head_err @ x), float(step_err @ x))
        if used[0] <= head_budget and used[1] <= step_budget:
            break
        budgets = [b - max(u - t, 0) - 1e-12 * max(1.0, t) for b, u, t in zip(budgets, used,
                                                                              (head_budget, step_budget))]
    else:
        raise RuntimeError(f"MILP solver (HiGHS) kept returning choices over the budgets {head_budget}, "
                           f"{step_budget} (last {used})")
    on = x[:n_head]
    choice_head[hs[on], hl[on], hh[on]] = hm[on]
    step_kind[ks[x[kind_var]]] = kk[x[kind_var]] + 1
    first_run[bs[x[block_var]]] = block_first[bj[x[block_var]]]
    return UnifiedChoice(choice_head, step_kind, first_run, float(saving @ x), used[0], used[1])
