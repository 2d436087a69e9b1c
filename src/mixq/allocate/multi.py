"""Allocation under several budgets at once: one option per group, least total error, every
resource's total within its limit (weight bits, bytes of weights plus KV cache at a context
length, bit operations, ...). numpy/scipy only: resources are integer columns of a table.

    groups = [MultiGroup(("w1",), ("int4", "int8"), {"bits": [4096, 8192], "bops": [..]}, [0.3, 0.01]), ...]
    sol = solve_multi(groups, {"bits": 50_000, "bops": 10**9})

Exact 0/1 program solved by HiGHS (scipy.optimize.milp):

    minimise   Σ error[g, o] x[g, o]
    subject to Σ_o x[g, o] = 1                     for every group g
               Σ cost_r[g, o] x[g, o] <= limit_r   for every resource r

An option is dropped first when another of its group costs no more in every constrained
resource and errs no more (an optimum never needs it; of equal ones the first is kept). Each
resource row is divided by the gcd of its coefficients (exact), the objective shifted by each
group's least error and scaled so the largest range is OBJECTIVE_SCALE; the rounded choice is
re-checked in exact integers, and a row that tolerances let overshoot is tightened by the
excess and the program solved again. Unlike the single-budget ILP (`ilp.py`) no Lagrangian
reduction is done: a few thousand binaries solve in seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import reduce as fold

import numpy as np
from scipy.optimize import LinearConstraint, milp
from scipy.sparse import csr_array

from mixq.allocate.ilp import OBJECTIVE_SCALE, _quiet_stdout
from mixq.allocate.problem import ProblemError
from mixq.errors import BudgetError, MixqError

_MAX_RESOLVES = 5


@dataclass(frozen=True)
class MultiGroup:
    """Units that take one option together, their option names, per resource the cost of
    each option (integers), and each option's error."""

    units: tuple[str, ...]
    names: tuple[str, ...]
    costs: dict[str, tuple[int, ...]]
    error: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        if n == 0:
            raise ProblemError(f"group {self.units}: no options")
        if len(self.error) != n or any(len(c) != n for c in self.costs.values()):
            raise ProblemError(f"group {self.units}: options, costs and errors differ in length")
        for e in self.error:
            if not (math.isfinite(e) and e >= 0):
                raise ProblemError(f"group {self.units}: error {e!r} is not finite and >= 0")
        for r, c in self.costs.items():
            if any(int(v) != v or v < 0 for v in c):
                raise ProblemError(f"group {self.units}: {r} costs must be integers >= 0, got {c}")


@dataclass(frozen=True)
class MultiSolution:
    """One option per unit; `totals` per resource (exact integers); `optimal` when HiGHS
    proved it."""

    choice: dict[str, str]
    totals: dict[str, int]
    total_error: float
    optimal: bool
    status: str
    wall_s: float


def _pareto(group: MultiGroup, resources: list[str]) -> list[int]:
    """Indices of the group's options no other option dominates in (costs, error)."""
    cost = np.array([[group.costs[r][i] for r in resources] for i in range(len(group.names))], dtype=np.int64)
    err = np.asarray(group.error)
    keep = []
    for i in range(len(err)):
        no_worse = (cost <= cost[i]).all(axis=1) & (err <= err[i])
        better = (cost < cost[i]).any(axis=1) | (err < err[i])
        dominated = (no_worse & better).any() or (no_worse[:i] & ~better[:i]).any()  # strictly better, or equal and earlier
        if not dominated:
            keep.append(i)
    return keep


def solve_multi(groups: list[MultiGroup], limits: dict[str, int], *, time_limit_s: float | None = None) -> MultiSolution:
    """The least-error choice within every limit (see the module docstring). Raises
    BudgetError naming the resources whose limit no choice meets, with the least achievable."""
    t0 = time.perf_counter()
    if not groups:
        raise ProblemError("no groups to allocate")
    resources = sorted(limits)
    for g in groups:
        missing = [r for r in resources if r not in g.costs]
        if missing:
            raise ProblemError(f"group {g.units}: no cost for resource(s) {missing}")
    kept = [_pareto(g, resources) for g in groups]
    minimum = {r: sum(min(g.costs[r][i] for i in k) for g, k in zip(groups, kept)) for r in resources}
    short = {r: (minimum[r], limits[r]) for r in resources if minimum[r] > limits[r]}
    if short:
        err = BudgetError("budget cannot be met: " + "; ".join(
            f"{r} needs at least {lo} (limit {hi})" for r, (lo, hi) in short.items()))
        err.minimum = minimum  # type: ignore[attr-defined]  # per resource, for the caller's message
        err.short = short  # type: ignore[attr-defined]
        raise err
    sizes = np.array([len(k) for k in kept])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_vars = int(sizes.sum())
    err = np.concatenate([np.asarray(g.error)[k] - min(np.asarray(g.error)[k]) for g, k in zip(groups, kept)])
    rng = max(float(err.max()), np.finfo(float).tiny)
    c = err * (OBJECTIVE_SCALE / rng)
    one_hot = csr_array((np.ones(n_vars), np.arange(n_vars), np.concatenate([starts, [n_vars]])),
                        shape=(len(groups), n_vars))
    rows, gcds = {}, {}
    for r in resources:
        col = np.concatenate([np.asarray(g.costs[r], dtype=np.int64)[k] for g, k in zip(groups, kept)])
        gcds[r] = fold(math.gcd, (int(v) for v in col), 0) or 1
        rows[r] = col
    targets = dict(limits)
    options: dict[str, object] = {"disp": False, "mip_rel_gap": 0.0}
    if time_limit_s is not None:
        options["time_limit"] = float(time_limit_s)
    for _ in range(_MAX_RESOLVES + 1):
        cons = [LinearConstraint(one_hot, 1, 1)]
        for r in resources:
            cons.append(LinearConstraint(csr_array((rows[r] // gcds[r]).astype(np.float64)[None, :]), -np.inf,
                                         targets[r] // gcds[r]))
        with _quiet_stdout():
            res = milp(c, integrality=np.ones(n_vars), bounds=(0, 1), constraints=cons, options=options)
        if res.x is None:
            raise MixqError(f"HiGHS found no allocation (status {res.status}: {res.message})")
        picks = [int(np.argmax(res.x[s:s + k])) for s, k in zip(starts, sizes)]
        flat = [s + p for s, p in zip(starts, picks)]
        totals = {r: int(rows[r][flat].sum()) for r in resources}
        over = {r: totals[r] - limits[r] for r in resources if totals[r] > limits[r]}
        if not over:
            break
        for r, excess in over.items():
            targets[r] -= excess
    else:
        raise MixqError("HiGHS kept returning allocations over a limit after rounding")
    choice: dict[str, str] = {}
    total_error = 0.0
    all_totals = {r: 0 for g in groups for r in g.costs}
    for g, k, p in zip(groups, kept, picks):
        i = k[p]
        for u in g.units:
            choice[u] = g.names[i]
        total_error += g.error[i]
        for r in g.costs:
            all_totals[r] += int(g.costs[r][i])
    optimal = res.status == 0
    return MultiSolution(choice, all_totals, total_error, optimal, "optimal" if optimal else f"stopped: {res.message}",
                         time.perf_counter() - t0)


__all__ = ["MultiGroup", "MultiSolution", "solve_multi"]
