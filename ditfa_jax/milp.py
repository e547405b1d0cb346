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
does not have; it exists to compare the two on a recorded RSE table).
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from scipy import optimize, sparse

__all__ = ["solve_layer", "solve_global", "brute_force_layer", "brute_force_global", "objective"]

FULL = -1  # "no method": the head runs full attention

# Relative slack on the best saving when the second solve minimises the error.
_TIE_RTOL = 1e-9


def _check_tables(rse, saving, lead: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate rse [..., M] / saving [..., M] (or [M]) and return float64 copies of equal shape."""
    rse = np.asarray(rse, dtype=np.float64)
    saving = np.asarray(saving, dtype=np.float64)
    want = "[" + ", ".join(["S", "L", "H"][3 - lead:]) + ", M]"
    if rse.ndim != lead + 1 or rse.shape[-1] < 1 or 0 in rse.shape:
        raise ValueError(f"rse: expected a non-empty array {what} {want}, got shape {rse.shape}")
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


def _milp(cost, rows, cols, n_groups, rse_vals, budget, *, extra=None, time_limit=None, mip_rel_gap=0.0,
          presolve=False):
    """Solve min cost@x, one-per-group, rse@x <= budget (+ optional extra row); return x (0/1)."""
    n = cost.size
    group = sparse.csr_array((np.ones(n), (rows, cols)), shape=(n_groups, n))
    constraints = [optimize.LinearConstraint(group, -np.inf, 1.0),
                   optimize.LinearConstraint(rse_vals[None, :], -np.inf, budget)]
    if extra is not None:
        constraints.append(optimize.LinearConstraint(extra[0][None, :], extra[1], np.inf))
    # presolve off for the tiny per-layer problems: it gains nothing there and HiGHS 1.x prints a stray debug line
    # ("transformNewIntegerFeasibleSolution") to stdout from some presolved solves.
    options = {"mip_rel_gap": mip_rel_gap, "presolve": presolve}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = optimize.milp(cost, constraints=constraints, integrality=np.ones(n),
                        bounds=optimize.Bounds(0.0, 1.0), options=options)
    if res.status == 1 and res.x is not None:
        warnings.warn(f"MILP solver (HiGHS) stopped at a limit ({res.message}); using its best assignment, "
                      f"which may not be optimal", RuntimeWarning, stacklevel=3)
    elif res.x is None or res.status != 0:
        raise RuntimeError(f"MILP solver (HiGHS) failed: status {res.status}: {res.message}")
    return res.x > 0.5


def _solve(rse: np.ndarray, saving: np.ndarray, budget: float, threshold: float, *, time_limit=None,
           mip_rel_gap: float = 0.0, presolve: bool = False, tie_break: bool = True) -> np.ndarray:
    """Core: rse/saving [N, M] -> choice [N] (index or -1) maximising saving then minimising rse."""
    n_heads, _ = rse.shape
    choice = np.full(n_heads, FULL, dtype=np.int64)
    eligible = (rse < threshold) & (rse <= budget) & (saving > 0)
    if budget <= 0 or not eligible.any():
        return choice

    # Fast path: every head takes its best eligible method (max saving, then min rse). If that fits the
    # budget it reaches the per-head upper bound, so it is the (lexicographic) optimum.
    key_s = np.where(eligible, saving, -np.inf)
    best_s = key_s.max(axis=1, keepdims=True)
    key_e = np.where(eligible & (saving == best_s), rse, np.inf)
    greedy = np.where(eligible.any(axis=1), np.argmin(key_e, axis=1), FULL)
    if objective(greedy, rse, saving)[1] <= budget:
        return greedy

    rows, cols = np.nonzero(eligible)          # variables = eligible pairs, row-major (deterministic order)
    s = saving[rows, cols]
    e = rse[rows, cols]
    var = np.arange(rows.size)
    rhs = budget
    for _ in range(4):                         # re-solve with a tighter rhs if HiGHS' tolerance overshoots
        x = _milp(-s, rows, var, n_heads, e, rhs, time_limit=time_limit, mip_rel_gap=mip_rel_gap,
                  presolve=presolve)
        best = float(s[x].sum())
        if tie_break and best > 0:
            floor = best - _TIE_RTOL * max(1.0, abs(best))
            x2 = _milp(e, rows, var, n_heads, e, rhs, extra=(s, floor), time_limit=time_limit,
                       mip_rel_gap=mip_rel_gap, presolve=presolve)
            if float(s[x2].sum()) >= floor and float(e[x2].sum()) <= float(e[x].sum()):
                x = x2
        used = float(e[x].sum())
        if used <= budget:
            choice[:] = FULL
            choice[rows[x]] = cols[x]
            return choice
        rhs -= (used - budget) + 1e-12 * max(1.0, budget)
    raise RuntimeError(f"MILP solver (HiGHS) kept returning assignments over the budget {budget} "
                       f"(last summed rse {used})")


def solve_layer(rse, saving, delta: float, c: float = 1.5, *, time_limit: float | None = None) -> np.ndarray:
    """Methods for the heads of one (step, layer): int64 [H], a candidate index or -1 (full).

    ``rse``: [H, M] relative squared error of each candidate on each head (+inf = never eligible);
    ``saving``: [H, M] or [M] value of each candidate (e.g. the fraction of attention FLOPs removed);
    ``delta``: error budget of the layer; ``c``: eligibility factor (``rse < c*delta/H``).
    Maximises the summed saving; ties go to the smallest summed error. Pairs with saving <= 0 are never chosen.
    """
    rse, saving = _check_tables(rse, saving, 1, "[H, M]")
    delta, c = _check_scalars(delta, c, "delta")
    return _solve(rse, saving, delta, c * delta / rse.shape[0], time_limit=time_limit)


def solve_global(rse, saving, delta_total: float, c: float = 1.5, *, mip_rel_gap: float = 1e-6,
                 time_limit: float | None = 600.0, tie_break: bool = False) -> np.ndarray:
    """One budget over the whole run: rse/saving [S, L, H, M] (saving may be [M]) -> int64 [S, L, H].

    Eligibility ``rse < c*delta_total/(S*L*H)``, one constraint ``sum x*rse <= delta_total``. Step 0 is not
    forced full here; the caller sets ``rse[0] = inf`` if it wants the plan's step-0 rule. A full-size problem
    (50 x 57 x 24 x 4 pairs) is slow to prove optimal, hence the default relative gap 1e-6 and no tie-break
    solve; on a time limit HiGHS' best assignment is returned with a RuntimeWarning.
    """
    rse, saving = _check_tables(rse, saving, 3, "[S, L, H, M]")
    delta_total, c = _check_scalars(delta_total, c, "delta_total")
    shape = rse.shape[:3]
    n = int(np.prod(shape))
    m = rse.shape[-1]
    out = _solve(rse.reshape(n, m), saving.reshape(n, m), delta_total, c * delta_total / n,
                 time_limit=time_limit, mip_rel_gap=mip_rel_gap, presolve=True, tie_break=tie_break)
    return out.reshape(shape)


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
    rse, saving = _check_tables(rse, saving, 1, "[H, M]")
    delta, c = _check_scalars(delta, c, "delta")
    if (rse.shape[1] + 1) ** rse.shape[0] > 1_000_000:
        raise ValueError(f"rse: shape {rse.shape} too large to enumerate")
    if delta <= 0:
        return np.full(rse.shape[0], FULL, dtype=np.int64)
    return _brute(rse, saving, delta, c * delta / rse.shape[0])


def brute_force_global(rse, saving, delta_total: float, c: float = 1.5) -> np.ndarray:
    """Reference for tests: enumerate all assignments of a tiny [S, L, H, M] table under one budget."""
    rse, saving = _check_tables(rse, saving, 3, "[S, L, H, M]")
    delta_total, c = _check_scalars(delta_total, c, "delta_total")
    shape = rse.shape[:3]
    n, m = int(np.prod(shape)), rse.shape[-1]
    if (m + 1) ** n > 1_000_000:
        raise ValueError(f"rse: shape {rse.shape} too large to enumerate")
    if delta_total <= 0:
        return np.full(shape, FULL, dtype=np.int64)
    return _brute(rse.reshape(n, m), saving.reshape(n, m), delta_total, c * delta_total / n).reshape(shape)
