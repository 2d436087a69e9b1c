"""The classic greedy baseline: start every group at its least-error option (the highest-bit
option that is not dominated) and repeatedly take the downgrade that costs the least error
per bit saved, until the bit cap is met.

Downgrades follow each group's *lower convex hull* of (bits, error) points, not the plain
marginal ratio to the next option: on the hull the per-group slopes increase monotonically,
so one heap of "next step per group" gives the globally cheapest step each time (this is the
greedy that solves the LP relaxation of the multiple-choice knapsack). Points strictly
above the hull are never chosen; collinear points are kept so steps stay small. The
cheapest-bits option of each group is on the hull, so the greedy path ends at the minimum
bits and finds a feasible choice whenever one exists. It may overshoot the cap by part of
its last step; it is not optimal in general (the ILP is).
Ties between equal slopes go to the earlier group, so the result is deterministic.
"""

from __future__ import annotations

import heapq
import time

import numpy as np

from mixq.allocate.problem import Problem
from mixq.allocate.reduce import Reduced, bit_cap, make_solution, reduce_problem
from mixq.allocate.solution import Solution


def solve_greedy(
    problem: Problem,
    budget_bpw: float | None,
    max_bytes: int | None = None,
    fixed_bits: int = 0,
) -> Solution:
    """Greedy downgrades along convex hulls until sum(bits) <= the cap; BudgetError when the
    budget is below the minimum achievable. `optimal` is True only when no downgrade was needed."""
    t0 = time.perf_counter()
    red = reduce_problem(problem)
    cap = bit_cap(red, budget_bpw, max_bytes, fixed_bits)
    picks, _ = hull_greedy(red, cap)
    unconstrained = cap >= red.useful_bits
    return make_solution(red, picks, "greedy", unconstrained, "unconstrained" if unconstrained else "greedy", t0)


def hull_greedy(red: Reduced, cap: int) -> tuple[list[int], float]:
    """Greedy picks (indices into the reduced options) meeting `cap` (>= red.min_bits), and
    the slope of the last downgrade taken: the LP relaxation's bit price (0 if none)."""
    hulls = [lower_hull(b, e) for b, e in zip(red.bits, red.error)]
    pos = [len(h) - 1 for h in hulls]  # position on each hull, starting at its most bits
    total = red.useful_bits
    heap: list[tuple[float, int]] = []
    for g, h in enumerate(hulls):
        if len(h) > 1:
            heap.append((_slope(red.bits[g], red.error[g], h[-1], h[-2]), g))
    heapq.heapify(heap)
    price = 0.0
    while total > cap:
        price, g = heapq.heappop(heap)  # never empty: all groups at min bits means total <= cap
        h, i = hulls[g], pos[g]
        total -= int(red.bits[g][h[i]] - red.bits[g][h[i - 1]])
        pos[g] = i - 1
        if i - 1 > 0:
            heapq.heappush(heap, (_slope(red.bits[g], red.error[g], h[i - 1], h[i - 2]), g))
    return [h[i] for h, i in zip(hulls, pos)], price


def lower_hull(bits: np.ndarray, error: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points (bits[i], error[i]), bits ascending and
    error descending (as the reduced problem gives them), collinear points kept."""
    hull: list[int] = []
    for i in range(len(bits)):
        while len(hull) >= 2 and _cross(bits, error, hull[-2], hull[-1], i) < 0:
            hull.pop()
        hull.append(i)
    return hull


def _cross(b: np.ndarray, e: np.ndarray, i: int, j: int, k: int) -> float:
    # z of (p_j - p_i) x (p_k - p_i); < 0 means p_j lies above segment p_i -> p_k.
    return float(b[j] - b[i]) * float(e[k] - e[i]) - float(e[j] - e[i]) * float(b[k] - b[i])


def _slope(b: np.ndarray, e: np.ndarray, hi: int, lo: int) -> float:
    """Error added per bit saved by stepping from option `hi` down to option `lo`."""
    return float(e[lo] - e[hi]) / float(b[hi] - b[lo])
