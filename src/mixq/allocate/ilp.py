"""Exact allocation as a 0/1 integer program, solved by HiGHS through scipy.optimize.milp.

Each tie group is one super-unit whose option bits/errors are sums over its units (exact,
and fewer variables than equality constraints between tied units). Variables x[g, o] are
binary; the model is

    minimise   sum_{g,o} (error[g,o] - min_o error[g,o]) * x[g,o]
    subject to sum_o x[g,o] = 1                              for each group g
               sum_{g,o} (bits[g,o] - bits[g,0]) * x[g,o] <= cap_bits - min_bits

HiGHS never sees the whole model; it is shrunk exactly by Lagrangian reduced-cost fixing:
- the convex-hull greedy gives the LP relaxation's bit price `lam` and a feasible choice,
  improved by upgrades that fit the slack;
- a *core* model (each group's reduced-cost-0 options, the incumbent's, and the CORE_EXTRA
  cheapest other options overall) is solved by HiGHS; its optimum is a feasible choice and,
  usually, the global optimum. The better of the two is the incumbent, error UB;
- for any choice x, error(x) >= L(lam) + sum_g [v(g, x_g) - min_o v(g, o)] with
  v(g, o) = error[g,o] + lam * bits[g,o] and L(lam) the Lagrangian dual bound, so an option
  whose own term alone lifts the bound above UB cannot be in a better choice and is dropped.
  If every surviving option was in the core, the core optimum is optimal; otherwise HiGHS
  solves the model of the survivors (typically tens of groups, not hundreds).

Only non-dominated options are ever considered (reduce.py). The bits row is divided by the
gcd of its coefficients (exact for integers), the objective is scaled so the largest
per-group error range is OBJECTIVE_SCALE (keeping HiGHS's absolute gap tolerance, 1e-6,
negligible) and mip_rel_gap is 0. The chosen x is rounded and its bit total re-checked in
exact integers; if solver tolerances let it overshoot, the cap is tightened by the excess and
the model re-solved. HiGHS is deterministic, so the same problem gives the same choice.

Known upstream wart: the HiGHS inside scipy 1.17 may write a stray debug line
("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();") to the C-level
stdout even with disp=False (ERGO-Code/HiGHS#2783). It does not affect the result; each
solve runs with the process's stdout file descriptor pointed at /dev/null.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from functools import reduce as fold

import numpy as np
from scipy.optimize import LinearConstraint, milp
from scipy.sparse import csr_array

from mixq.allocate.greedy import hull_greedy
from mixq.allocate.problem import Problem
from mixq.allocate.reduce import Reduced, bit_cap, make_solution, reduce_problem
from mixq.allocate.solution import Solution
from mixq.errors import MixqError

log = logging.getLogger(__name__)

# Objective scale: the largest per-group error range maps to this many units.
OBJECTIVE_SCALE = 1e3
# Relative slack on the bound test, so float rounding never drops an optimal option.
FIXING_RTOL = 1e-9
# Options beyond the LP solution in the core model solved first for a strong incumbent.
CORE_EXTRA = 32
_MAX_RESOLVES = 3


def solve_ilp(
    problem: Problem,
    budget_bpw: float | None,
    max_bytes: int | None = None,
    fixed_bits: int = 0,
    *,
    time_limit_s: float | None = None,
) -> Solution:
    """Least total error with sum(bits) <= the cap set by `budget_bpw` and/or `max_bytes`
    (see mixq.allocate.reduce for the exact cap). Optimal unless `time_limit_s` (per HiGHS
    call) cuts HiGHS short, in which case the best choice found is returned, optimal=False.
    Raises BudgetError when the budget is below the minimum achievable."""
    t0 = time.perf_counter()
    red = reduce_problem(problem)
    cap = bit_cap(red, budget_bpw, max_bytes, fixed_bits)
    if cap >= red.useful_bits:
        return make_solution(red, red.useful_picks(), "ilp", True, "unconstrained", t0)
    incumbent, price = hull_greedy(red, cap)
    incumbent = _fill_slack(red, incumbent, cap)
    reduced_cost, bound = _lagrangian(red, cap, price)
    core = _core(reduced_cost, incumbent, CORE_EXTRA)
    core_optimal = True
    if any(len(a) > 1 for a in core):
        picks, core_optimal, _ = _solve_milp(red, core, cap, time_limit_s, incumbent)
        if _error(red, picks) < _error(red, incumbent):
            incumbent = picks
    allowed = _fixing(red, reduced_cost, bound, incumbent)
    if core_optimal and all(np.isin(a, c).all() for a, c in zip(allowed, core)):
        # every option that could beat the core's optimum was in the core: it is optimal
        return make_solution(red, incumbent, "ilp", True, "optimal", t0)
    picks, optimal, status = _solve_milp(red, allowed, cap, time_limit_s, incumbent)
    return make_solution(red, picks, "ilp", optimal, status, t0)


def _fill_slack(red: Reduced, picks: list[int], cap: int) -> list[int]:
    """Improve a feasible choice: while some single upgrade fits the unused bits, take the
    one that lowers the error most (first in group order on ties)."""
    group = np.repeat(np.arange(len(red.bits)), [len(b) for b in red.bits])  # (n_options,)
    first = np.concatenate([[0], np.cumsum([len(b) for b in red.bits])[:-1]])
    flat_bits = np.concatenate(red.bits)
    flat_err = np.concatenate(red.error)
    at = first + np.asarray(picks)  # flat index of each group's pick
    slack = cap - int(flat_bits[at].sum())
    for _ in range(len(picks)):
        gain = flat_err[at][group] - flat_err  # (n_options,)
        fits = flat_bits - flat_bits[at][group] <= slack
        gain[~fits] = 0.0
        i = int(np.argmax(gain))
        if gain[i] <= 0:
            break
        g = int(group[i])
        slack -= int(flat_bits[i] - flat_bits[at[g]])
        at[g] = i
    return [int(i - f) for i, f in zip(at, first)]


def _lagrangian(red: Reduced, cap: int, price: float) -> tuple[list[np.ndarray], float]:
    """Reduced costs v(g, o) - min_o v(g, o) per group and the dual bound L(price)."""
    lagr = [e + price * (b - b[0]) for b, e in zip(red.bits, red.error)]  # v(g, o), shifted
    mins = [float(v.min()) for v in lagr]
    bound = math.fsum(mins) - price * (cap - red.min_bits)  # L(price), same shift
    return [v - m for v, m in zip(lagr, mins)], bound


def _core(reduced_cost: list[np.ndarray], incumbent: list[int], n_extra: int) -> list[np.ndarray]:
    """Per group, the options of reduced cost 0 (the LP solution), the incumbent's, and the
    `n_extra` cheapest others overall: a small model whose optimum is usually the optimum."""
    flat = np.concatenate(reduced_cost)
    positive = np.sort(flat[flat > 0])
    delta = positive[min(n_extra, len(positive)) - 1] if len(positive) and n_extra > 0 else 0.0
    return [np.union1d(np.flatnonzero(rc <= delta), [p]) for rc, p in zip(reduced_cost, incumbent)]


def _fixing(red: Reduced, reduced_cost: list[np.ndarray], bound: float, incumbent: list[int]) -> list[np.ndarray]:
    """Per group, the indices of options that may still be in an optimum (see module doc)."""
    upper = _error(red, incumbent)
    scale = math.fsum(float(e[0]) for e in red.error) + abs(bound)
    limit = upper + FIXING_RTOL * scale
    return [np.union1d(np.flatnonzero(bound + rc <= limit), [p]) for rc, p in zip(reduced_cost, incumbent)]


def _error(red: Reduced, picks: list[int]) -> float:
    return math.fsum(float(e[p]) for e, p in zip(red.error, picks))


@contextlib.contextmanager
def _quiet_stdout():
    """Silence C-level writes to stdout (the HiGHS debug line) for the duration of a solve,
    so that a command printing JSON or a table to stdout is not corrupted."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced (pytest capture, notebooks)
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _solve_milp(
    red: Reduced, allowed: list[np.ndarray], cap: int, time_limit_s: float | None, fallback: list[int]
) -> tuple[list[int], bool, str]:
    """HiGHS on the options in `allowed`; `fallback` (feasible) if it stops with nothing."""
    picks = [int(a[0]) for a in allowed]
    free = [g for g, a in enumerate(allowed) if len(a) > 1]
    base_bits = sum(int(b[a[0]]) for b, a in zip(red.bits, allowed))  # cheapest allowed everywhere
    sizes = np.array([len(allowed[g]) for g in free])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    extra_bits = np.concatenate([red.bits[g][allowed[g]] - red.bits[g][allowed[g][0]] for g in free])  # (n_vars,)
    extra_err = np.concatenate([red.error[g][allowed[g]] - red.error[g][allowed[g][-1]] for g in free])  # >= 0
    err_range = max(float(extra_err.max()), np.finfo(float).tiny)
    c = extra_err * (OBJECTIVE_SCALE / err_range)
    gcd = fold(math.gcd, (int(b) for b in extra_bits), 0) or 1
    row = (extra_bits // gcd).astype(np.float64)[None, :]
    n_vars = len(c)
    one_hot = csr_array((np.ones(n_vars), np.arange(n_vars), np.concatenate([starts, [n_vars]])), shape=(len(free), n_vars))
    options: dict[str, object] = {"disp": False, "mip_rel_gap": 0.0}
    if time_limit_s is not None:
        options["time_limit"] = float(time_limit_s)
    room = cap - base_bits  # bits the free groups may add above their cheapest allowed options
    target = room
    for attempt in range(_MAX_RESOLVES + 1):
        constraints = [LinearConstraint(one_hot, 1, 1), LinearConstraint(csr_array(row), -np.inf, target // gcd)]
        with _quiet_stdout():
            res = milp(c, integrality=np.ones(n_vars), bounds=(0, 1), constraints=constraints, options=options)
        if res.x is None and res.status == 1:  # time or node limit before any solution
            return list(fallback), False, f"stopped: {res.message}"
        if res.x is None:
            raise MixqError(f"HiGHS found no allocation (status {res.status}: {res.message})")
        chosen = [int(np.argmax(res.x[s : s + k])) for s, k in zip(starts, sizes)]
        used = sum(int(extra_bits[s + o]) for s, o in zip(starts, chosen))
        if used <= room:
            break
        # Tolerances let the rounded point overshoot: tighten by the excess and re-solve.
        log.debug("ILP rounding overshot by %d bits (attempt %d); re-solving", used - room, attempt)
        target -= used - room
    else:
        raise MixqError("HiGHS kept returning allocations over the bit cap after rounding")
    for g, o in zip(free, chosen):
        picks[g] = int(allowed[g][o])
    optimal = res.status == 0
    return picks, optimal, "optimal" if optimal else f"stopped: {res.message}"
