"""Results of the solvers: one Solution per budget, FrontierPoints along the curve."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Solution:
    """One option per unit, with exact totals over the allocated units.

    total_bits:      sum of the chosen options' bits (integer, all-in).
    bits_per_weight: total_bits / n_params (fixed_bits overhead not included).
    optimal:         True when the solver proved the choice optimal for the budget.
    status:          the solver's word on how it finished (e.g. "optimal", "unconstrained",
                     "greedy", "dp resolution=64 bits").
    wall_s:          seconds spent; the only field that differs between identical calls.
    """

    choice: dict[str, str]
    total_bits: int
    total_error: float
    bits_per_weight: float
    n_params: int
    solver: str
    optimal: bool
    status: str
    wall_s: float


@dataclass(frozen=True)
class FrontierPoint:
    """One point of the error-vs-bits curve: the budget asked for and what it bought."""

    budget_bpw: float
    bits_per_weight: float
    total_bits: int
    total_error: float
    choice: dict[str, str]
