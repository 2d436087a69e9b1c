"""What every solver shares: the problem reduced to independent groups of non-dominated
options, the integer bit cap a budget allows, the BudgetError for an impossible budget, and
the assembly of a Solution from one option index per group.

Budget semantics (all solvers):
    cap_bits = min(floor(budget_bpw * n_params),      # float64 product, as Python computes it
                   8 * max_bytes - fixed_bits)          # when max_bytes is given
    a choice is feasible iff sum(bits of chosen options) <= cap_bits.
`fixed_bits` is overhead stored beside the allocated units (embeddings, head, metadata) that
counts against `max_bytes` but not against bits per weight.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from mixq.allocate.problem import Group, Problem, ProblemError
from mixq.allocate.solution import Solution
from mixq.errors import BudgetError


@dataclass(frozen=True)
class Reduced:
    """The problem as groups of Pareto-optimal options.

    Per group g, `bits[g]` (int64) ascends strictly and `error[g]` (float64) descends strictly;
    `keep[g][i]` indexes the option in `groups[g].names`. An option is dropped when another
    of the group has no more bits and no more error (exact: an optimum never needs it); of
    identical (bits, error) options the first in option order is kept.
    """

    unit_order: tuple[str, ...]
    groups: tuple[Group, ...]
    keep: tuple[np.ndarray, ...]
    bits: tuple[np.ndarray, ...]
    error: tuple[np.ndarray, ...]
    n_params: int

    @property
    def min_bits(self) -> int:
        """Fewest bits any feasible choice uses."""
        return sum(int(b[0]) for b in self.bits)

    @property
    def useful_bits(self) -> int:
        """Bits of the least-error choice that uses the fewest bits: more never helps."""
        return sum(int(b[-1]) for b in self.bits)

    def useful_picks(self) -> list[int]:
        return [len(b) - 1 for b in self.bits]


def reduce_problem(problem: Problem) -> Reduced:
    """Validate `problem` and reduce it to groups of non-dominated options."""
    groups = problem.groups()
    keep, bits, error = [], [], []
    for g in groups:
        b = np.asarray(g.bits, dtype=np.int64)
        e = np.asarray(g.error, dtype=np.float64)
        order = np.lexsort((np.arange(len(b)), e, b))  # by bits, then error, then option order
        kept: list[int] = []
        for i in order:
            if not kept or e[i] < e[kept[-1]]:
                kept.append(int(i))
        idx = np.asarray(kept, dtype=np.int64)
        keep.append(idx)
        bits.append(b[idx])
        error.append(e[idx])
    return Reduced(
        unit_order=tuple(u.unit for u in problem.units),
        groups=tuple(groups),
        keep=tuple(keep),
        bits=tuple(bits),
        error=tuple(error),
        n_params=problem.n_params,
    )


def bit_cap(red: Reduced, budget_bpw: float | None, max_bytes: int | None = None, fixed_bits: int = 0) -> int:
    """The most bits the allocated units may use; BudgetError if below the minimum."""
    if budget_bpw is None and max_bytes is None:
        raise ProblemError("give budget_bpw, max_bytes or both")
    if budget_bpw is not None and not (isinstance(budget_bpw, (int, float)) and math.isfinite(budget_bpw)):
        raise ProblemError(f"budget_bpw must be a finite number, got {budget_bpw!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer))):
        raise ProblemError(f"max_bytes must be an integer, got {max_bytes!r}")
    if isinstance(fixed_bits, bool) or not isinstance(fixed_bits, (int, np.integer)) or fixed_bits < 0:
        raise ProblemError(f"fixed_bits must be an integer >= 0, got {fixed_bits!r}")
    caps = []
    if budget_bpw is not None:
        caps.append(math.floor(budget_bpw * red.n_params))
    if max_bytes is not None:
        caps.append(8 * int(max_bytes) - int(fixed_bits))
    cap = min(caps)
    if cap < red.min_bits:
        raise budget_error(red, budget_bpw, max_bytes, fixed_bits)
    return cap


def budget_error(red: Reduced, budget_bpw: float | None, max_bytes: int | None, fixed_bits: int) -> BudgetError:
    """BudgetError whose message (and attributes `min_bits_per_weight`, `max_bits_per_weight`)
    give the achievable range: the fewest bits per weight any choice uses, and the most that
    still lowers the error. Printed values are the least 4-decimal budgets reaching them, so a
    budget equal to the printed minimum is feasible."""
    lo_bpw = red.min_bits / red.n_params
    hi_bpw = red.useful_bits / red.n_params
    asked = []
    if budget_bpw is not None:
        asked.append(f"{budget_bpw:g} bits per weight over {red.n_params} parameters")
    if max_bytes is not None:
        asked.append(f"max_bytes={max_bytes} with fixed_bits={fixed_bits}")
    msg = (
        f"budget of {' and '.join(asked)} cannot be met: achievable range under these constraints is "
        f"{_shown_budget(red.min_bits, red.n_params)} to {_shown_budget(red.useful_bits, red.n_params)} "
        "bits per weight (minimum possible to maximum useful)"
    )
    if max_bytes is not None:
        lo_bytes = -(-(red.min_bits + fixed_bits) // 8)
        hi_bytes = -(-(red.useful_bits + fixed_bits) // 8)
        msg += f", i.e. {lo_bytes} to {hi_bytes} bytes including fixed_bits"
    err = BudgetError(msg)
    err.min_bits_per_weight = lo_bpw  # type: ignore[attr-defined]
    err.max_bits_per_weight = hi_bpw  # type: ignore[attr-defined]
    return err


def budget_for_bits(bits: int, n_params: int) -> float:
    """The smallest float budget_bpw whose cap (floor(budget_bpw * n_params)) reaches `bits`."""
    b = bits / n_params
    while math.floor(b * n_params) < bits:
        b = math.nextafter(b, math.inf)
    return b


def make_solution(red: Reduced, picks: list[int], solver: str, optimal: bool, status: str, t0: float) -> Solution:
    """Expand one pick per group (index into the reduced arrays) into a Solution."""
    by_unit: dict[str, str] = {}
    total_bits = 0
    errors = []
    for g, group in enumerate(red.groups):
        p = int(picks[g])
        name = group.names[int(red.keep[g][p])]
        for unit in group.units:
            by_unit[unit] = name
        total_bits += int(red.bits[g][p])
        errors.append(float(red.error[g][p]))
    return Solution(
        choice={u: by_unit[u] for u in red.unit_order},
        total_bits=total_bits,
        total_error=math.fsum(errors),
        bits_per_weight=total_bits / red.n_params,
        n_params=red.n_params,
        solver=solver,
        optimal=optimal,
        status=status,
        wall_s=time.perf_counter() - t0,
    )


def _shown_budget(bits: int, n_params: int) -> str:
    """The smallest 4-decimal budget_bpw whose cap reaches `bits`, trailing zeros dropped."""
    ticks = math.ceil(bits / n_params * 1e4)
    while ticks > 0 and math.floor((ticks - 1) / 1e4 * n_params) >= bits:
        ticks -= 1  # float fuzz rounded up a tick too many
    while math.floor(ticks / 1e4 * n_params) < bits:
        ticks += 1
    return f"{ticks / 1e4:.4f}".rstrip("0").rstrip(".")
