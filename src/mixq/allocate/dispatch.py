"""The solver dispatcher: one explicit dict from solver name to function."""

from __future__ import annotations

from typing import Callable

from mixq.allocate.dp import solve_dp
from mixq.allocate.greedy import solve_greedy
from mixq.allocate.ilp import solve_ilp
from mixq.allocate.problem import Problem, ProblemError
from mixq.allocate.solution import Solution

# solver(problem, budget_bpw, max_bytes=None, fixed_bits=0, **options) -> Solution
SolverFn = Callable[..., Solution]

SOLVERS: dict[str, SolverFn] = {
    "ilp": solve_ilp,
    "greedy": solve_greedy,
    "dp": solve_dp,
}


def solver_fn(solver: str) -> SolverFn:
    """The function behind a solver name; ProblemError listing the known names otherwise."""
    try:
        return SOLVERS[solver]
    except KeyError:
        raise ProblemError(f"unknown solver {solver!r}; known: {sorted(SOLVERS)}") from None


def solve(
    problem: Problem,
    budget_bpw: float | None,
    solver: str = "ilp",
    max_bytes: int | None = None,
    fixed_bits: int = 0,
    **options: object,
) -> Solution:
    """Allocate with the named solver ("ilp" exact, "greedy" baseline, "dp" cross-check);
    `options` go to the solver (e.g. time_limit_s for ilp, max_cells for dp)."""
    return solver_fn(solver)(problem, budget_bpw, max_bytes=max_bytes, fixed_bits=fixed_bits, **options)
