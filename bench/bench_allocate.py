"""Solve time of the allocation solvers on synthetic LLM-like problems.

    .venv/bin/python bench/bench_allocate.py [--units 200 400 800] [--repeat 3] [--ties]

Units mimic a Llama-style stack (q/k/v/o/gate/up/down per block, 7 units a block, shapes of a
2048-wide model); six candidate formats with exact-looking all-in bits (payload + scales);
errors are n_params * 4^(-bpw) * a log-normal per-unit sensitivity with 10% per-option noise
(so neighbouring formats do not always trade off the same way). Each row is one solver at
one budget: median wall time over --repeat runs (same input each time), and the total
error relative to the ILP's. Timings are CPU wall-clock seconds of one process.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from mixq.allocate import Choice, Problem, UnitChoices, frontier, solve

# (name, payload bits per weight, scale bits per group, group size)
FORMATS = (
    ("int2:g64", 2, 16, 64),
    ("int3:g64", 3, 16, 64),
    ("int4:g128", 4, 16, 128),
    ("int4:g64", 4, 16, 64),
    ("int6:g64", 6, 16, 64),
    ("int8:ch", 8, 16, 1 << 30),
)
SHAPES = {  # (out, in) of a 2048-wide Llama block with 4 KV heads of 128
    "q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048),
    "gate": (5632, 2048), "up": (5632, 2048), "down": (2048, 5632),
}


def make_problem(n_units: int, seed: int, ties: bool) -> Problem:
    rng = np.random.default_rng(seed)
    units, tie_sets = [], []
    roles = list(SHAPES)
    for i in range(n_units):
        block, role = divmod(i, len(roles))
        out_f, in_f = SHAPES[roles[role]]
        n = out_f * in_f
        sens = float(rng.lognormal(0.0, 1.0))
        opts = []
        for name, payload, scale_bits, group in FORMATS:
            bits = n * payload + out_f * -(-in_f // group) * scale_bits
            err = n * 4.0 ** (-bits / n) * sens * float(rng.uniform(0.9, 1.1))
            opts.append(Choice(name, bits, err))
        units.append(UnitChoices(f"model.layers.{block}.{roles[role]}", n, opts))
    if ties:
        names = {u.unit for u in units}
        for b in range(n_units // len(roles) + 1):
            qkv = [f"model.layers.{b}.{r}" for r in ("q", "k", "v")]
            if all(q in names for q in qkv):
                tie_sets.append(qkv)
    return Problem(units, ties=tie_sets)


def timed(fn, repeat: int):
    walls, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, nargs="+", default=[200, 400, 800])
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.5, 4.25, 5.5])
    ap.add_argument("--solvers", nargs="+", default=["ilp", "greedy"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ties", action="store_true", help="tie q/k/v of each block")
    ap.add_argument("--frontier", action="store_true", help="also time a 41-point ILP frontier")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"{len(FORMATS)} options per unit, ties={'qkv' if args.ties else 'none'}, median of {args.repeat}")
    print(f"{'units':>5} {'solver':>6} {'budget':>6} {'bpw':>7} {'ms':>8} {'err/ilp':>9}")
    for n_units in args.units:
        problem = make_problem(n_units, seed=n_units, ties=args.ties)
        for budget in args.budgets:
            ilp_err = None
            for solver in args.solvers:
                wall, sol = timed(lambda: solve(problem, budget, solver=solver), args.repeat)
                ilp_err = sol.total_error if solver == "ilp" else ilp_err
                ratio = f"{sol.total_error / ilp_err:9.5f}" if ilp_err else f"{'-':>9}"
                print(f"{n_units:>5} {solver:>6} {budget:>6.2f} {sol.bits_per_weight:>7.4f} {wall * 1e3:>8.1f} {ratio}")
        if args.frontier:
            wall, points = timed(lambda: frontier(problem), 1)
            print(f"{n_units:>5} frontier (41 ILP budgets): {len(points)} points in {wall:.2f} s")


if __name__ == "__main__":
    main()
