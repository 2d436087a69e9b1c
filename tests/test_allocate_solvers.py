"""mixq.allocate solvers: the ILP equals brute force on tiny problems, is never worse than
greedy or DP, budgets are respected exactly, and the frontier is monotone and exact."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.allocate import (
    Choice,
    Problem,
    ProblemError,
    UnitChoices,
    frontier,
    pareto_set,
    solve_dp,
    solve_greedy,
    solve_ilp,
)
from mixq.errors import BudgetError

NAMES = ("int2", "int3", "int4", "int5", "int6", "int8")


def random_problem(rng: np.random.Generator, n_units: int, n_options: int, constrained: bool = True) -> Problem:
    """Random units sharing option names (so any of them can be tied); option bits are
    n_params * bpw + a scale overhead, errors are random (not always monotone in bits, with
    occasional exact duplicates). With `constrained`, random ties, a pin and a bit window."""
    names = list(rng.choice(NAMES, size=n_options, replace=False))
    while True:
        units = []
        for i in range(n_units):
            n_params = int(rng.choice([16, 32, 48, 64]))
            bpw = rng.choice(np.arange(1, 9), size=n_options, replace=False)
            errors = rng.uniform(0, 10, size=n_options) * (rng.random(n_options) < 0.9)
            if rng.random() < 0.2:
                errors[-1] = errors[0]
            opts = [Choice(str(nm), int(b * n_params + rng.integers(0, 3) * 8), float(e)) for nm, b, e in zip(names, bpw, errors)]
            units.append(UnitChoices(f"blk.{i}", n_params, opts))
        if not constrained:
            return Problem(units)
        unit_names = [u.unit for u in units]
        ties = []
        if n_units >= 2 and rng.random() < 0.6:
            k = int(rng.integers(2, min(n_units, 3) + 1))
            ties.append([str(x) for x in rng.choice(unit_names, size=k, replace=False)])
        if n_units >= 4 and rng.random() < 0.3:
            ties.append([str(x) for x in rng.choice(unit_names, size=2, replace=False)])
        pins = {}
        if rng.random() < 0.3:
            pins[str(rng.choice(unit_names))] = str(rng.choice(names))
        lo = float(rng.choice([0, 0, 2, 3])) or None
        hi = float(rng.choice([0, 0, 6, 7])) or None
        try:
            return Problem(units, ties, pins, lo, hi)
        except ProblemError:
            continue  # the window or a pin emptied a group: draw again


def brute_force(problem: Problem, cap: int) -> tuple[float, int] | None:
    """(least error, its bits) over every assignment meeting all constraints, or None."""
    best = None
    for combo in itertools.product(*[u.options for u in problem.units]):
        if not respects(problem, dict(zip([u.unit for u in problem.units], [o.name for o in combo]))):
            continue
        bits = sum(o.bits for o in combo)
        if bits > cap:
            continue
        if not all(in_window(problem, u, o) for u, o in zip(problem.units, combo)):
            continue
        err = math.fsum(o.error for o in combo)
        if best is None or err < best[0] - 1e-12 or (abs(err - best[0]) <= 1e-12 and bits < best[1]):
            best = (err, bits)
    return best


def in_window(problem: Problem, unit: UnitChoices, option: Choice) -> bool:
    lo, hi = problem.min_bits_per_weight, problem.max_bits_per_weight
    bpw = option.bits / unit.n_params
    return (lo is None or bpw >= lo) and (hi is None or bpw <= hi)


def respects(problem: Problem, choice: dict[str, str]) -> bool:
    """Ties (transitively, via each tie list) and pins."""
    for tie in problem.ties:
        if len({choice[u] for u in tie}) > 1:
            return False
    return all(choice[u] == name for u, name in problem.pins.items())


def check(problem: Problem, sol, cap: int) -> None:
    """The solution is a valid assignment, under the cap, with consistent totals."""
    by_unit = {u.unit: u for u in problem.units}
    assert set(sol.choice) == set(by_unit)
    assert respects(problem, sol.choice)
    opts = [by_unit[u].option(name) for u, name in sol.choice.items()]
    assert sol.total_bits == sum(o.bits for o in opts) <= cap
    assert sol.total_error == pytest.approx(math.fsum(o.error for o in opts), rel=1e-12, abs=1e-12)
    for u, name in sol.choice.items():
        assert in_window(problem, by_unit[u], by_unit[u].option(name))


def budgets_around(problem: Problem, rng: np.random.Generator, k: int) -> list[float]:
    n = problem.n_params
    lo = sum(min(o.bits for o in u.options) for u in problem.units) / n  # ignores constraints
    return [float(rng.uniform(0.5, 9.0)) for _ in range(k)] + [lo]


@pytest.mark.parametrize("constrained", [False, True])
def test_ilp_equals_brute_force(constrained):
    rng = np.random.default_rng(1234 + constrained)
    n_checked = n_infeasible = 0
    for _ in range(150):
        problem = random_problem(rng, int(rng.integers(1, 7)), int(rng.integers(1, 4)), constrained)
        for budget in budgets_around(problem, rng, 3):
            cap = math.floor(budget * problem.n_params)
            expect = brute_force(problem, cap)
            if expect is None:
                with pytest.raises(BudgetError):
                    solve_ilp(problem, budget)
                n_infeasible += 1
                continue
            sol = solve_ilp(problem, budget)
            check(problem, sol, cap)
            assert sol.optimal
            assert sol.total_error == pytest.approx(expect[0], rel=1e-9, abs=1e-9)
            assert sol.total_bits <= budget * problem.n_params
            # exact DP (small room: the gcd resolution fits) agrees too
            dp = solve_dp(problem, budget)
            check(problem, dp, cap)
            if dp.optimal:
                assert dp.total_error == pytest.approx(expect[0], rel=1e-9, abs=1e-9)
            n_checked += 1
    assert n_checked > 200 and n_infeasible > 10  # both branches really exercised


def test_max_bytes_matches_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(60):
        problem = random_problem(rng, int(rng.integers(2, 6)), 3)
        fixed = int(rng.integers(0, 200))
        max_bytes = int(rng.integers(0, 80 * problem.n_params // 64 + 1))
        expect = brute_force(problem, 8 * max_bytes - fixed)
        if expect is None:
            with pytest.raises(BudgetError):
                solve_ilp(problem, None, max_bytes=max_bytes, fixed_bits=fixed)
            continue
        sol = solve_ilp(problem, None, max_bytes=max_bytes, fixed_bits=fixed)
        assert sol.total_bits + fixed <= 8 * max_bytes
        assert sol.total_error == pytest.approx(expect[0], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("core_extra", [0, 1, 4])
def test_ilp_exact_whatever_the_core(monkeypatch, core_extra):
    """A small core forces the second, Lagrangian-fixed MILP: still exact (vs brute force on
    tiny problems and the exact DP on medium ones)."""
    import mixq.allocate.ilp as ilp_module

    monkeypatch.setattr(ilp_module, "CORE_EXTRA", core_extra)
    rng = np.random.default_rng(99 + core_extra)
    for _ in range(60):
        problem = random_problem(rng, int(rng.integers(2, 7)), 3)
        budget = float(rng.uniform(2.0, 7.0))
        expect = brute_force(problem, math.floor(budget * problem.n_params))
        if expect is not None:
            assert solve_ilp(problem, budget).total_error == pytest.approx(expect[0], rel=1e-9, abs=1e-9)
    for _ in range(15):
        problem = random_problem(rng, int(rng.integers(10, 40)), int(rng.integers(3, 7)))
        for budget in rng.uniform(2.5, 6.0, size=3):
            try:
                dp = solve_dp(problem, float(budget))
            except BudgetError:
                continue
            assert dp.optimal
            sol = solve_ilp(problem, float(budget))
            check(problem, sol, math.floor(budget * problem.n_params))
            assert sol.total_error == pytest.approx(dp.total_error, rel=1e-9, abs=1e-9)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n_units=st.integers(5, 60), n_options=st.integers(2, 6))
def test_ilp_never_worse_than_greedy_or_dp(seed, n_units, n_options):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, n_units, n_options)
    for budget in [float(rng.uniform(2.0, 8.0)) for _ in range(3)]:
        cap = math.floor(budget * problem.n_params)
        try:
            ilp = solve_ilp(problem, budget)
        except BudgetError:
            for other in (solve_greedy, solve_dp):  # all agree on feasibility
                with pytest.raises(BudgetError):
                    other(problem, budget)
            continue
        check(problem, ilp, cap)
        for other in (solve_greedy(problem, budget), solve_dp(problem, budget, max_cells=512)):
            check(problem, other, cap)
            assert ilp.total_error <= other.total_error * (1 + 1e-9) + 1e-9


def test_greedy_is_not_optimal_but_ilp_is():
    # a: 10 bits for 10 error; b: 6 bits for 5.5 error. Greedy drops b first (smaller error per
    # bit) but 9 bits still need a dropped too: 15.5. Keeping b alone costs 10.
    p = Problem(
        [
            UnitChoices("a", 1, [Choice("lo", 0, 10.0), Choice("hi", 10, 0.0)]),
            UnitChoices("b", 1, [Choice("lo", 0, 5.5), Choice("hi", 6, 0.0)]),
        ]
    )
    g, i, d = solve_greedy(p, 4.5), solve_ilp(p, 4.5), solve_dp(p, 4.5)  # 9 bits for 2 params
    assert g.total_error == 15.5 and not g.optimal
    assert i.total_error == d.total_error == 10.0 and i.choice == {"a": "lo", "b": "hi"}


def test_time_limit_returns_a_feasible_choice():
    rng = np.random.default_rng(4)
    p = random_problem(rng, 200, 6, constrained=False)
    sol = solve_ilp(p, 4.0, time_limit_s=1e-6)
    check(p, sol, math.floor(4.0 * p.n_params))
    if not sol.optimal:
        assert sol.status.startswith("stopped")


def test_large_bit_counts_respect_cap_exactly():
    rng = np.random.default_rng(3)
    units = []
    for i in range(120):
        n = int(rng.choice([4096 * 4096, 4096 * 11008, 1024 * 4096]))
        opts = []
        for j, bpw in enumerate((2.125, 3.125, 4.125, 4.25, 6.0625, 8.0625)):
            error = float(rng.uniform(0.5, 1.5) * 2.0 ** (-2 * bpw) * n)
            opts.append(Choice(NAMES[j], int(bpw * n) + int(rng.integers(0, 64)), error))
        units.append(UnitChoices(f"model.layers.{i}.w", n, opts))
    p = Problem(units)
    for budget in (2.5, 3.7, 4.1, 4.25, 5.0):
        cap = math.floor(budget * p.n_params)
        for sol in (solve_ilp(p, budget), solve_greedy(p, budget), solve_dp(p, budget)):
            check(p, sol, cap)
            assert sol.bits_per_weight <= budget
        assert solve_ilp(p, budget).total_error <= solve_greedy(p, budget).total_error


def test_dp_resolution_is_reported_and_conservative():
    rng = np.random.default_rng(5)
    p = random_problem(rng, 30, 5, constrained=False)
    fine, coarse = solve_dp(p, 3.0), solve_dp(p, 3.0, max_cells=16)
    assert fine.optimal and fine.status.startswith("dp resolution=")
    assert not coarse.optimal
    cap = math.floor(3.0 * p.n_params)
    check(p, coarse, cap)
    assert solve_ilp(p, 3.0).total_error == pytest.approx(fine.total_error, rel=1e-12)
    assert coarse.total_error >= fine.total_error


@pytest.mark.parametrize("solver", ["ilp", "greedy", "dp"])
def test_deterministic(solver):
    rng = np.random.default_rng(11)
    p = random_problem(rng, 40, 6)
    runs = [frontier(p, n_points=9, solver=solver) for _ in range(2)]
    assert runs[0] == runs[1]


# ---- frontier ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_frontier_monotone_and_spans_range(solver):
    rng = np.random.default_rng(21)
    p = random_problem(rng, 50, 6)
    points = frontier(p, solver=solver)
    bits = [pt.total_bits for pt in points]
    errors = [pt.total_error for pt in points]
    assert bits == sorted(set(bits))
    assert all(a > b for a, b in zip(errors, errors[1:]))  # more bits, strictly less error
    assert all(pt.bits_per_weight <= pt.budget_bpw for pt in points)
    unconstrained = solve_ilp(p, 1e6)
    assert points[-1].total_error == pytest.approx(unconstrained.total_error)
    cheapest = solve_ilp(p, points[0].budget_bpw)
    assert points[0].total_bits == cheapest.total_bits  # the sweep starts at the minimum
    with pytest.raises(BudgetError):
        solve_ilp(p, points[0].bits_per_weight - 1e-3)


def test_frontier_given_budgets_skips_infeasible():
    p = Problem(
        [
            UnitChoices("a", 10, [Choice("int2", 20, 4.0), Choice("int4", 40, 1.0), Choice("int8", 80, 0.0)]),
            UnitChoices("b", 10, [Choice("int2", 20, 2.0), Choice("int4", 40, 0.5), Choice("int8", 80, 0.0)]),
        ]
    )
    points = frontier(p, budgets=[1.0, 2.0, 3.0, 3.5, 5.0, 8.0, 9.0])
    # 5 bpw (100 bits) is best spent as int4 + int4 (80 bits, 1.5), not int8 + int2 (2.0)
    assert [pt.bits_per_weight for pt in points] == [2.0, 3.0, 4.0, 8.0]
    assert [pt.total_error for pt in points] == [6.0, 3.0, 1.5, 0.0]
    assert points[2].budget_bpw == 5.0
    assert points[0].budget_bpw == 2.0 and points[1].budget_bpw == 3.0  # 3.5 bought the same
    with pytest.raises(BudgetError, match="2 to 8 bits per weight"):
        frontier(p, budgets=[1.0, 1.5])


def test_pareto_set_exact_and_frontier_on_it():
    rng = np.random.default_rng(8)
    for _ in range(20):
        p = random_problem(rng, int(rng.integers(1, 6)), 3)
        pareto = pareto_set(p)
        # brute-force Pareto set: least error at each achievable bit count, then strictly falling
        seen = {}
        for combo in itertools.product(*[u.options for u in p.units]):
            choice = dict(zip([u.unit for u in p.units], [o.name for o in combo]))
            if respects(p, choice) and all(in_window(p, u, o) for u, o in zip(p.units, combo)):
                b, e = sum(o.bits for o in combo), math.fsum(o.error for o in combo)
                seen[b] = min(seen.get(b, math.inf), e)
        expect, best = [], math.inf
        for b in sorted(seen):
            if seen[b] < best - 1e-9:
                expect.append((b, seen[b]))
                best = seen[b]
        assert [pt.total_bits for pt in pareto] == [b for b, _ in expect]
        assert [pt.total_error for pt in pareto] == pytest.approx([e for _, e in expect], rel=1e-9, abs=1e-9)
        for pt in pareto:
            assert respects(p, pt.choice)
        # every ILP frontier point is the Pareto point with the most bits under its budget
        for pt in frontier(p, n_points=11):
            under = [q for q in pareto if q.total_bits <= math.floor(pt.budget_bpw * p.n_params)]
            assert pt.total_error == pytest.approx(under[-1].total_error, rel=1e-9, abs=1e-9)
