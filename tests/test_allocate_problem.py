"""mixq.allocate: problem validation, constraints (ties, pins, bit window, bytes) and the
BudgetError contract."""

from __future__ import annotations

import math
import re

import pytest

from mixq.allocate import (
    SOLVERS,
    Choice,
    Problem,
    ProblemError,
    UnitChoices,
    problem_from_rows,
    solve,
    solve_greedy,
    solve_ilp,
)
from mixq.errors import BudgetError, MixqError

FORMATS = ("int2", "int4", "int8", "fp16")
BPW = {"int2": 2, "int4": 4, "int8": 8, "fp16": 16}


def unit(name: str, n_params: int, errors: dict[str, float], extra_bits: int = 0) -> UnitChoices:
    """A unit whose options cost exactly bpw * n_params (+ extra_bits for scales)."""
    return UnitChoices(name, n_params, [Choice(f, BPW[f] * n_params + extra_bits, errors[f]) for f in errors])


def two_units(**kw) -> Problem:
    # a: 100 params, b: 300 params. Least error: a int8 (fp16 has equal error, more bits),
    # b fp16. Min bits: both int2 -> 2 bpw. Max useful: (800 + 4800) / 400 = 14 bpw.
    a = unit("a", 100, {"int2": 5.0, "int4": 1.0, "int8": 0.0, "fp16": 0.0})
    b = unit("b", 300, {"int2": 3.0, "int4": 0.5, "int8": 0.1, "fp16": 0.0})
    return Problem([a, b], **kw)


# ---- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits, error, match",
    [
        (-1, 0.0, "bits must be >= 0"),
        (4.5, 0.0, "bits must be an integer"),
        (True, 0.0, "bits must be an integer"),
        (4, math.nan, "finite"),
        (4, math.inf, "finite"),
        (4, -0.1, ">= 0"),
        (4, "x", "number"),
    ],
)
def test_bad_option_values(bits, error, match):
    with pytest.raises(ProblemError, match=match):
        Choice("int4", bits, error)


def test_errors_are_typed():
    assert issubclass(ProblemError, MixqError) and issubclass(ProblemError, ValueError)
    assert issubclass(BudgetError, MixqError)


def test_nan_error_from_rows_names_the_unit():
    with pytest.raises(ProblemError, match=r"unit 'blk.0.q'.*'int4'.*finite"):
        problem_from_rows([("blk.0.q", "int4", 400, math.nan)], {"blk.0.q": 100})


def test_duplicate_units_and_options():
    a = unit("a", 10, {"int2": 1.0})
    with pytest.raises(ProblemError, match=r"duplicate units: \['a'\]"):
        Problem([a, unit("a", 10, {"int4": 1.0})])
    with pytest.raises(ProblemError, match=r"unit 'a': option 'int2' listed twice"):
        UnitChoices("a", 10, [Choice("int2", 20, 1.0), Choice("int2", 20, 2.0)])


def test_bad_units():
    with pytest.raises(ProblemError, match="n_params"):
        UnitChoices("a", 0, [Choice("int2", 0, 1.0)])
    with pytest.raises(ProblemError, match="no options"):
        UnitChoices("a", 10, [])
    with pytest.raises(ProblemError, match="no units"):
        Problem([])


def test_unknown_units_in_ties_and_pins_are_named():
    with pytest.raises(ProblemError, match=r"unknown units: \['ghost', 'nope'\]"):
        two_units(ties=[["a", "ghost"]], pins={"nope": "int4"})


def test_tie_with_different_option_names():
    a = unit("a", 100, {"int2": 5.0, "int4": 1.0})
    b = unit("b", 100, {"int2": 5.0, "int8": 1.0})
    with pytest.raises(ProblemError, match=r"tied units 'a' and 'b' offer different options.*\['int4'\].*\['int8'\]"):
        Problem([a, b], ties=[["a", "b"]])


def test_pin_to_unknown_option():
    with pytest.raises(ProblemError, match=r"unit 'a' has no option 'int3'"):
        two_units(pins={"a": "int3"})


def test_conflicting_pins_in_a_tie_group():
    with pytest.raises(ProblemError, match="pinned to different options"):
        two_units(ties=[["a", "b"]], pins={"a": "int4", "b": "int8"})


def test_window_that_empties_a_unit_names_it():
    a = unit("a", 100, {"int2": 5.0, "int4": 1.0})
    b = unit("b", 100, {"int8": 1.0, "fp16": 0.0})
    with pytest.raises(ProblemError, match=r"unit 'a' has no option left within \[6, inf\].*int2=2.*int4=4"):
        Problem([a, b], min_bits_per_weight=6)
    with pytest.raises(ProblemError, match="exceeds"):
        Problem([a, b], min_bits_per_weight=6, max_bits_per_weight=4)


def test_pin_outside_window():
    with pytest.raises(ProblemError, match=r"pinned to 'int2'.*outside the allowed window"):
        two_units(pins={"a": "int2"}, min_bits_per_weight=3)


def test_unknown_solver():
    with pytest.raises(ProblemError, match=r"unknown solver 'magic'.*\['dp', 'greedy', 'ilp'\]"):
        solve(two_units(), 4.0, solver="magic")
    assert set(SOLVERS) == {"ilp", "greedy", "dp"}


def test_needs_some_budget():
    with pytest.raises(ProblemError, match="budget_bpw, max_bytes"):
        solve_ilp(two_units(), None)


# ---- budget errors ----------------------------------------------------------------------


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_infeasible_budget_gives_achievable_range(solver):
    with pytest.raises(BudgetError) as info:
        solve(two_units(), 1.5, solver=solver)
    msg = str(info.value)
    assert "achievable range under these constraints is 2 to 14 bits per weight" in msg
    assert info.value.min_bits_per_weight == 2.0
    assert info.value.max_bits_per_weight == 14.0


def test_achievable_range_reflects_constraints():
    # a pinned to int8 (8 bpw on 100 params), b at least int4 (4 bpw on 300): min (800+1200)/400 = 5.
    # Max useful: a int8 + b fp16 = (800 + 4800)/400 = 14.
    p = two_units(pins={"a": "int8"}, min_bits_per_weight=4)
    with pytest.raises(BudgetError, match=r"is 5 to 14 bits per weight"):
        solve_ilp(p, 4.99)
    assert solve_ilp(p, 5.0).choice == {"a": "int8", "b": "int4"}


def test_range_printed_rounded_up_is_feasible():
    # min bpw = 1000 / 3 = 333.33...: printed as 333.3334, which must itself be feasible.
    p = Problem([UnitChoices("a", 3, [Choice("lo", 1000, 1.0), Choice("hi", 2000, 0.0)])])
    with pytest.raises(BudgetError) as info:
        solve_ilp(p, 300.0)
    lo = float(re.search(r"is ([0-9.]+) to", str(info.value)).group(1))
    assert lo == 333.3334
    assert solve_ilp(p, lo).choice == {"a": "lo"}


def test_max_bytes_and_fixed_bits():
    p = two_units()
    # both int4: 1600 bits; with 400 fixed bits that is exactly 250 bytes.
    sol = solve_ilp(p, None, max_bytes=250, fixed_bits=400)
    assert sol.total_bits + 400 <= 250 * 8
    assert sol.choice == {"a": "int4", "b": "int4"}
    with pytest.raises(BudgetError, match=r"is 2 to 14 bits per weight.*150 to 750 bytes including fixed_bits"):
        solve_ilp(p, None, max_bytes=149, fixed_bits=400)
    # both limits: the tighter one binds.
    assert solve_ilp(p, 4.0, max_bytes=10_000).total_bits <= 1600
    assert solve_greedy(p, 16.0, max_bytes=250, fixed_bits=400).total_bits + 400 <= 2000


# ---- constraints honoured ---------------------------------------------------------------


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_ties_share_option_names_across_shapes(solver):
    # q is 4x larger than k and v: same name, different bits.
    q = unit("blk.q", 256, {"int2": 9.0, "int4": 2.0, "int8": 0.5}, extra_bits=32)
    k = unit("blk.k", 64, {"int2": 1.0, "int4": 0.2, "int8": 0.0}, extra_bits=8)
    v = unit("blk.v", 64, {"int2": 8.0, "int4": 0.1, "int8": 0.0}, extra_bits=8)
    o = unit("blk.o", 256, {"int2": 0.1, "int4": 0.05, "int8": 0.0}, extra_bits=32)
    p = Problem([q, k, v, o], ties=[["blk.v", "blk.q"], ["blk.k", "blk.q"]])
    sol = solve(p, 4.2, solver=solver)
    assert sol.choice["blk.q"] == sol.choice["blk.k"] == sol.choice["blk.v"]
    assert sol.total_bits <= 4.2 * p.n_params
    bits = {u.unit: u.option(sol.choice[u.unit]).bits for u in p.units}
    assert sol.total_bits == sum(bits.values())


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_pins_and_window_honoured(solver):
    units = [unit(f"u{i}", 64 * (i + 1), {"int2": 4.0 * i + 1, "int4": 1.0, "int8": 0.2, "fp16": 0.0}) for i in range(6)]
    with pytest.raises(ProblemError, match="pinned to 'int2'"):
        Problem(units, pins={"u5": "int2"}, min_bits_per_weight=3, max_bits_per_weight=8)
    with pytest.raises(ProblemError, match="pinned to 'fp16'"):
        Problem(units, pins={"u0": "fp16"}, min_bits_per_weight=3, max_bits_per_weight=8)
    p = Problem(units, pins={"u5": "int4", "u1": "int8"}, min_bits_per_weight=3, max_bits_per_weight=8)
    sol = solve(p, 5.0, solver=solver)
    assert sol.choice["u5"] == "int4" and sol.choice["u1"] == "int8"
    for u in units:
        assert 3 <= u.option(sol.choice[u.unit]).bits / u.n_params <= 8
    assert sol.total_bits <= 5.0 * p.n_params


def test_budget_at_minimum_and_above_useful():
    p = two_units()
    low = solve_ilp(p, 2.0)
    assert low.choice == {"a": "int2", "b": "int2"} and low.bits_per_weight == 2.0
    high = solve_ilp(p, 100.0)
    assert high.choice == {"a": "int8", "b": "fp16"}  # fp16 on a buys nothing: not taken
    assert high.optimal and high.total_error == 0.0 and high.bits_per_weight == 14.0


def test_solution_fields():
    sol = solve_ilp(two_units(), 6.0)
    assert list(sol.choice) == ["a", "b"]  # problem unit order
    assert sol.n_params == 400 and sol.solver == "ilp" and sol.optimal
    assert sol.bits_per_weight == sol.total_bits / 400 and sol.wall_s >= 0


def test_problem_from_rows_and_tie_order_independence():
    rows = [("x", f, BPW[f] * 50, e) for f, e in zip(FORMATS, (4.0, 1.0, 0.3, 0.0))]
    rows += [("y", f, BPW[f] * 70 + 16, e) for f, e in zip(FORMATS, (2.0, 1.5, 0.1, 0.0))]
    rows += [("z", f, BPW[f] * 30, e) for f, e in zip(FORMATS, (7.0, 0.2, 0.1, 0.0))]
    n = {"x": 50, "y": 70, "z": 30}
    p1 = problem_from_rows(rows, n, ties=[["x", "z"]])
    p2 = problem_from_rows(rows, n, ties=[["z", "x"]])
    assert [u.unit for u in p1.units] == ["x", "y", "z"]
    s1, s2 = solve_ilp(p1, 5.0), solve_ilp(p2, 5.0)
    assert s1.choice == s2.choice and s1.choice["x"] == s1.choice["z"]
    with pytest.raises(ProblemError, match=r"n_params missing for units: \['z'\]"):
        problem_from_rows(rows, {"x": 50, "y": 70})
