"""Multiple-choice knapsack by dynamic programming over quantised bits: a cross-check for
the ILP on small problems.

Each group's option costs `bits - min bits of the group` (so the cheapest option is free),
measured in units of `resolution` bits and rounded *up*, against a capacity of
floor((cap_bits - min_bits) / resolution) cells. Rounding up keeps every DP choice within
the true cap. The resolution is the gcd of all costs whenever that needs at most
`max_cells` cells -- then every cost is an exact multiple and the DP is exact (optimal=True)
-- otherwise ceil(room / max_cells) bits, which may miss the optimum by a little.
Time O(groups x options x cells); memory groups x cells bytes for the back-pointers
(52 MB at 800 groups and the default 65536 cells).
"""

from __future__ import annotations

import math
import time
from functools import reduce as fold

import numpy as np

from mixq.allocate.problem import Problem
from mixq.allocate.reduce import bit_cap, make_solution, reduce_problem
from mixq.allocate.solution import Solution

DEFAULT_MAX_CELLS = 1 << 16


def solve_dp(
    problem: Problem,
    budget_bpw: float | None,
    max_bytes: int | None = None,
    fixed_bits: int = 0,
    *,
    max_cells: int = DEFAULT_MAX_CELLS,
) -> Solution:
    """Least total error under the cap by DP (see module docstring for the resolution).
    BudgetError when the budget is below the minimum achievable."""
    t0 = time.perf_counter()
    red = reduce_problem(problem)
    cap = bit_cap(red, budget_bpw, max_bytes, fixed_bits)
    if cap >= red.useful_bits:
        return make_solution(red, red.useful_picks(), "dp", True, "unconstrained", t0)
    room = cap - red.min_bits
    costs = [b - b[0] for b in red.bits]  # per group, int64, first is 0
    gcd = fold(math.gcd, (int(c) for cs in costs for c in cs), 0) or 1
    resolution = gcd if room // gcd <= max_cells else -(-room // max_cells)
    exact = all(int(c) % resolution == 0 for cs in costs for c in cs)
    cells = room // resolution
    weights = [-(-cs // resolution) for cs in costs]  # ceil: never exceed the true cap
    picks = _knapsack(weights, [e - e[-1] for e in red.error], cells)
    return make_solution(red, picks, "dp", exact, f"dp resolution={resolution} bits", t0)


def _knapsack(weights: list[np.ndarray], errors: list[np.ndarray], cells: int) -> list[int]:
    """One option per group minimising summed error with summed weight <= cells.
    best[c] is the least error of the groups so far using at most c cells."""
    best = np.zeros(cells + 1)
    n_options = max(len(w) for w in weights)
    back = np.zeros((len(weights), cells + 1), dtype=np.uint8 if n_options <= 256 else np.int32)
    for g, (w, e) in enumerate(zip(weights, errors)):
        new = np.full(cells + 1, np.inf)
        for o in range(len(w)):
            k = int(w[o])
            if k > cells:
                break  # weights ascend
            cand = best[: cells + 1 - k] + e[o]
            better = cand < new[k:]  # strict: the earlier (cheaper) option wins ties
            new[k:][better] = cand[better]
            back[g, k:][better] = o
        best = new
    picks = [0] * len(weights)
    c = cells
    for g in range(len(weights) - 1, -1, -1):
        o = int(back[g, c])
        picks[g] = o
        c -= int(weights[g][o])
    return picks
