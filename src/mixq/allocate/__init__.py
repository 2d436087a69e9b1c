"""mixq.allocate: choose one option (format) per unit to minimise total estimated error under
a bit budget, with ties, pins and a bits-per-weight window. numpy/scipy only, no torch.

    problem = Problem([UnitChoices("w1", 4096, [Choice("int4:g64", 18432, 0.3), ...]), ...])
    sol = solve(problem, budget_bpw=4.25)              # exact ILP (HiGHS)
    curve = frontier(problem)                          # the whole error-vs-bits curve
"""

from mixq.allocate.dp import solve_dp
from mixq.allocate.frontier import frontier, pareto_set
from mixq.allocate.greedy import solve_greedy
from mixq.allocate.ilp import solve_ilp
from mixq.allocate.problem import Choice, Problem, ProblemError, UnitChoices, problem_from_rows
from mixq.allocate.solution import FrontierPoint, Solution
from mixq.allocate.dispatch import SOLVERS, solve, solver_fn

__all__ = [
    "SOLVERS",
    "FrontierPoint",
    "Choice",
    "Problem",
    "ProblemError",
    "Solution",
    "UnitChoices",
    "frontier",
    "pareto_set",
    "problem_from_rows",
    "solve",
    "solve_dp",
    "solve_greedy",
    "solve_ilp",
    "solver_fn",
]
