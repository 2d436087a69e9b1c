"""The error-vs-bits curve: one solve per budget (`frontier`), or the exact Pareto set by
merging groups' Pareto sets (`pareto_set`, for small problems)."""

from __future__ import annotations

import time

import numpy as np

from mixq.allocate.problem import Problem
from mixq.allocate.reduce import budget_error, budget_for_bits, make_solution, reduce_problem
from mixq.allocate.solution import FrontierPoint, Solution
from mixq.allocate.dispatch import solver_fn
from mixq.errors import BudgetError, MixqError
from mixq.progress import Progress, track

DEFAULT_POINTS = 41


def frontier(
    problem: Problem,
    budgets: list[float] | None = None,
    n_points: int = DEFAULT_POINTS,
    solver: str = "ilp",
    *,
    progress: Progress | None = None,
    **solver_options: object,
) -> list[FrontierPoint]:
    """Solve at each budget (bits per weight) and return the non-dominated points, bits
    ascending and error strictly descending (more bits never more error).

    By default the budgets are `n_points` evenly spaced from the minimum achievable to the
    maximum useful bits per weight. Given budgets below the minimum are skipped; if none is
    achievable, BudgetError. Of points with equal bits or where a cheaper point has no more
    error, the cheaper (then the earlier-budget) point is kept.
    """
    fn = solver_fn(solver)
    red = reduce_problem(problem)
    if budgets is None:
        if n_points < 1:
            raise MixqError(f"n_points must be >= 1, got {n_points}")
        lo, hi = red.min_bits, red.useful_bits
        grid = np.linspace(lo, hi, n_points) if n_points > 1 else np.array([hi])
        budgets = [budget_for_bits(int(round(b)), red.n_params) for b in grid]
    solutions: list[tuple[float, Solution]] = []
    for budget in track(budgets, f"frontier ({solver})", len(budgets), progress):
        try:
            solutions.append((float(budget), fn(problem, budget, **solver_options)))
        except BudgetError:
            continue
    if not solutions and budgets:
        raise budget_error(red, min(budgets), None, 0)
    return _non_dominated(solutions)


def pareto_set(problem: Problem, max_points: int = 100_000) -> list[FrontierPoint]:
    """Every Pareto-optimal choice (no other choice has fewer-or-equal bits and less error,
    or fewer bits and equal error), bits ascending. Exact, by folding in one group at a time
    and pruning dominated partial sums; MixqError if more than `max_points` partial points
    survive (use `frontier` then). `budget_bpw` of each point is the least budget buying it."""
    red = reduce_problem(problem)
    bits = np.zeros(1, dtype=np.int64)
    err = np.zeros(1)
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    for g_bits, g_err in zip(red.bits, red.error):
        k = len(g_bits)
        cand_bits = (bits[:, None] + g_bits[None, :]).ravel()  # (points * k,)
        cand_err = (err[:, None] + g_err[None, :]).ravel()
        order = np.lexsort((np.arange(len(cand_bits)), cand_err, cand_bits))
        sorted_err = cand_err[order]
        # keep a point iff its error is below every point with fewer (or equal, earlier) bits
        prev_min = np.minimum.accumulate(np.concatenate([[np.inf], sorted_err[:-1]]))
        keep = order[sorted_err < prev_min]
        if len(keep) > max_points:
            raise MixqError(f"Pareto set exceeds max_points={max_points}; use frontier() instead")
        bits, err = cand_bits[keep], cand_err[keep]
        parents.append(keep // k)
        options.append(keep % k)
    points = []
    t0 = time.perf_counter()
    for i in range(len(bits)):
        picks, j = [0] * len(red.bits), i
        for g in range(len(red.bits) - 1, -1, -1):
            picks[g] = int(options[g][j])
            j = int(parents[g][j])
        sol = make_solution(red, picks, "pareto", True, "pareto", t0)
        points.append(_point(budget_for_bits(sol.total_bits, red.n_params), sol))
    return points


def _non_dominated(solutions: list[tuple[float, Solution]]) -> list[FrontierPoint]:
    ordered = sorted(enumerate(solutions), key=lambda t: (t[1][1].total_bits, t[1][1].total_error, t[0]))
    points: list[FrontierPoint] = []
    for _, (budget, sol) in ordered:
        if not points or sol.total_error < points[-1].total_error:
            points.append(_point(budget, sol))
    return points


def _point(budget: float, sol: Solution) -> FrontierPoint:
    return FrontierPoint(
        budget_bpw=budget,
        bits_per_weight=sol.bits_per_weight,
        total_bits=sol.total_bits,
        total_error=sol.total_error,
        choice=sol.choice,
    )
