"""From a sensitivity table and a budget to an explicit plan (and the whole frontier).

User patterns (`--keep PATTERN=OPTION`) are expanded here to concrete unit names before the
plan is written. Tie rules name the units that must share an option:
- `qkv`: q/k/v projections of one block (fused QKV runtimes);
- `gate_up`: gate/up projections of one block;
- `experts`: the experts of one MoE layer (per fused parameter); without it every expert
  gets its own choice.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict

from mixq.allocate import Problem, Solution, UnitChoices, frontier, solve
from mixq.allocate import Choice
from mixq.errors import BudgetError, MixqError
from mixq.option import parse_option
from mixq.plan import Plan

TIE_RULES = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "gate_up": ("gate_proj", "up_proj"),
    "experts": None,  # all experts of one layer, per parameter
}


def expand_pattern(pattern: str, names: list[str]) -> list[str]:
    """Unit names matching a glob (`*.down_proj`) or, prefixed `re:`, a regex (search)."""
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        hits = [n for n in names if rx.search(n)]
    else:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise MixqError(f"pattern {pattern!r} matches no unit (units look like {names[0]!r}; "
                        "use a glob such as '*.down_proj' or a regex as 're:layers\\.(0|1)\\.')")
    return hits


def tie_groups(units: list[dict], rules: list[str]) -> list[list[str]]:
    """Concrete tie sets for the named rules over table units (dicts with name/role/block)."""
    unknown = [r for r in rules if r not in TIE_RULES]
    if unknown:
        raise MixqError(f"unknown tie rule(s) {unknown}; known: {sorted(TIE_RULES)}")
    groups: dict[tuple, list[str]] = defaultdict(list)
    for u in units:
        for rule in rules:
            roles = TIE_RULES[rule]
            if roles is None:
                if u["role"].startswith("experts."):
                    groups[(rule, u["block"], u["role"])].append(u["name"])
            elif u["role"] in roles and u["block"] >= 0:
                groups[(rule, u["block"])].append(u["name"])
    return [g for g in groups.values() if len(g) > 1]


def build_problem(table_units: list[dict], rows: list[tuple[str, str, int, float]], *,
                  keep: dict[str, str] | None = None, ties: list[str] | None = None,
                  min_bits: float | None = None, max_bits: float | None = None) -> Problem:
    """The allocation problem of a sensitivity table.

    keep: pattern -> option. A kept option that is not among the table's candidates is
    added to those units with error 0 (it is forced, so its error does not steer the solver).
    """
    names = [u["name"] for u in table_units]
    shapes = {u["name"]: tuple(u["shape"]) for u in table_units}
    options: dict[str, list[Choice]] = defaultdict(list)
    for unit, opt, bits, err in rows:
        options[unit].append(Choice(opt, bits, err))
    pins: dict[str, str] = {}
    for pattern, opt_text in (keep or {}).items():
        opt = str(parse_option(opt_text))
        for name in expand_pattern(pattern, names):
            why = parse_option(opt).supports(shapes[name])
            if why is not None:
                raise MixqError(f"--keep {pattern}={opt}: unit {name!r} cannot take it ({why})")
            pins[name] = opt
            if not any(o.name == opt for o in options[name]):
                options[name].append(Choice(opt, parse_option(opt).bits(shapes[name]), 0.0))
    units = [UnitChoices(u["name"], int(u["n_params"]), options[u["name"]]) for u in table_units]
    return Problem(units, tie_groups(table_units, ties or []), pins, min_bits, max_bits)


SPIKE_RULES = ("keep", "rotate")


def spike_rule(rows: list[tuple[str, str, int, float]], units: list[dict], spiky: list[str], rule: str,
               keep: dict[str, str] | None = None) -> tuple[list, dict[str, str]]:
    """Apply the spike-aware rule to the units flagged as spiky (see
    `mixq.sensitivity.spiky_units`): returns (rows, keep) for `build_problem`.

    rule "keep": a spiky unit may only take an option of 8 or more bits per weight (the solver
    picks among them, e.g. int8:ch or fp8); "rotate": an option with a rotation (`+rotate`)
    or of 8 or more bits, so the solver weighs "int4 with GPTQ and rotation" against "keep
    at 8 bits"; any other text is an option every spiky unit is pinned to ('int8:ch').
    Activations follow the same rule under both: a spiky unit's input keeps 8 or more bits
    (or stays float) unless the option rotates it (`int4:g64+gptq+rotate@int4:tok`)."""
    keep = dict(keep or {})
    spiky_set = set(spiky)
    if not spiky_set:
        return rows, keep
    if rule not in SPIKE_RULES:
        try:
            opt = str(parse_option(rule))
        except MixqError as e:
            raise type(e)(f"spike rule {rule!r}: expected 'keep', 'rotate' or an option such as int8:ch ({e})") from e
        for name in spiky:
            keep[name] = opt
        return rows, keep
    n_params = {u["name"]: int(u["n_params"]) for u in units}

    def allowed(unit: str, opt: str, bits: int) -> bool:
        o = parse_option(opt)
        wide = bits >= 8 * n_params[unit]
        # activations too: a spiky input keeps 8+ (or float) bits unless the option rotates it
        act_ok = o.act_bits >= 8 or o.rotate
        return act_ok and (wide or (rule == "rotate" and o.rotate))

    out = [r for r in rows if r[0] not in spiky_set or allowed(r[0], r[1], r[2])]
    stuck = [u for u in spiky if not any(r[0] == u for r in out)]
    if stuck:
        need = "an option with +rotate or of 8+ bits" if rule == "rotate" else "an option of 8+ bits"
        raise MixqError(f"spike rule {rule!r}: unit(s) {', '.join(stuck[:3])} have no candidate that is {need}; "
                        "analyse with such candidates (e.g. int8:ch, int4:g64+gptq+rotate) or pin one with "
                        "--spikes OPTION")
    return out, keep


def plan_from_solution(model: str, table_units: list[dict], sol: Solution, meta: dict) -> Plan:
    shapes = {u["name"]: (int(u["shape"][0]), int(u["shape"][1])) for u in table_units}
    options = {n: parse_option(sol.choice[n]) for n in shapes}
    return Plan(model, options, shapes, meta)


def make_plan(model: str, table_units: list[dict], rows, budget_bpw: float, *, solver: str = "ilp",
              max_bytes: int | None = None, keep=None, ties=None, min_bits=None, max_bits=None,
              meta: dict | None = None) -> tuple[Plan, Solution]:
    problem = build_problem(table_units, rows, keep=keep, ties=ties, min_bits=min_bits, max_bits=max_bits)
    sol = solve(problem, budget_bpw, solver=solver, max_bytes=max_bytes)
    info = {"budget_bpw": budget_bpw, "solver": solver, "optimal": sol.optimal, "status": sol.status,
            "predicted_error": sol.total_error, "bits_per_weight": sol.bits_per_weight,
            "total_bits": sol.total_bits, "ties": list(ties or []), "keep": dict(keep or {}),
            "min_bits": min_bits, "max_bits": max_bits, **(meta or {})}
    return plan_from_solution(model, table_units, sol, info), sol


def make_frontier(table_units: list[dict], rows, *, budgets=None, n_points: int = 41, solver="ilp",
                  keep=None, ties=None, min_bits=None, max_bits=None, progress=None) -> list[dict]:
    problem = build_problem(table_units, rows, keep=keep, ties=ties, min_bits=min_bits, max_bits=max_bits)
    pts = frontier(problem, budgets=budgets, n_points=n_points, solver=solver, progress=progress)
    return [{"budget_bpw": p.budget_bpw, "bits_per_weight": p.bits_per_weight, "total_bits": p.total_bits,
             "predicted_error": p.total_error, "choice": p.choice} for p in pts]


# ---------------------------------------------------------------------------------------
# Several budgets at once: weights, activations (bit operations) and the KV cache


def make_plan_multi(model: str, table_units: list[dict], rows, kv_layers: list[dict], budget, *, keep=None,
                    ties=None, min_bits=None, max_bits=None, meta: dict | None = None, time_limit_s=None):
    """The least-error plan within every limit of `budget` (`mixq.budget.Budget`): each unit's
    option (weight and activation format) from `rows`, and with `budget.context` each
    layer's KV format from `kv_layers` (the table's `kv` section; a float cache, error 0, is
    always a candidate). Returns (Plan, MultiSolution)."""
    from mixq.allocate import MultiGroup, solve_multi
    from mixq.budget import kv_costs, limits, unit_costs
    from mixq.formats.kvcache import parse_kv

    problem = build_problem(table_units, rows, keep=keep, ties=ties, min_bits=min_bits, max_bits=max_bits)
    shapes = {u["name"]: (int(u["shape"][0]), int(u["shape"][1])) for u in table_units}
    groups = []
    for g in problem.groups():
        per_option = [[unit_costs(parse_option(name), shapes[u]) for u in g.units] for name in g.names]
        costs = {r: tuple(sum(c[r] for c in opt) for opt in per_option) for r in per_option[0][0]}
        groups.append(MultiGroup(g.units, g.names, costs, g.error))
    n_elements = 0
    if budget.context is not None:
        for layer in kv_layers:
            opts = {o["kv"]: float(o["error"]) for o in layer["options"]}
            opts.setdefault("fp16", 0.0)
            names = tuple(opts)
            per = [kv_costs(parse_kv(n), budget.context, layer["n_kv_heads"], layer["head_dim"]) for n in names]
            groups.append(MultiGroup(("kv:" + layer["name"],), names, {r: tuple(c[r] for c in per) for r in per[0]},
                                     tuple(opts.values())))
            n_elements += 2 * layer["n_kv_heads"] * layer["head_dim"]
    n_params = sum(int(u["n_params"]) for u in table_units)
    caps = limits(budget, n_params, n_elements)
    try:
        sol = solve_multi(groups, caps, time_limit_s=time_limit_s)
    except BudgetError as e:
        raise _budget_message(e, budget, n_params, n_elements) from e
    options = {n: parse_option(sol.choice[n]) for n in shapes}
    kv = {name[3:]: parse_kv(f) for name, f in sol.choice.items()
          if name.startswith("kv:") and not parse_kv(f).is_float}
    t = sol.totals
    achieved = {"bits_per_weight": t["weight_bits"] / n_params, "bits_per_mac": t["bops"] / n_params,
                "bytes": t["bytes_bits"] / 8 if budget.context is not None else None,
                "kv_bits": t["kv_bits"] / (n_elements * budget.context) if n_elements else None}
    info = {"budget": budget.to_dict(), "budget_bpw": budget.bits_per_weight, "solver": "ilp-multi", "optimal": sol.optimal, "status": sol.status,
            "predicted_error": sol.total_error, "bits_per_weight": achieved["bits_per_weight"],
            "total_bits": t["weight_bits"], "achieved": achieved, "limits": caps, "ties": list(ties or []),
            "keep": dict(keep or {}), "min_bits": min_bits, "max_bits": max_bits, **(meta or {})}
    return Plan(model, options, shapes, info, kv), sol


def _budget_message(e: BudgetError, budget, n_params: int, n_elements: int) -> BudgetError:
    """The solver's BudgetError in the budget's own units, with the least achievable."""
    short = getattr(e, "short", {})
    words = []
    for r, (lo, _) in short.items():
        if r == "weight_bits":
            words.append(f"{budget.bits_per_weight:g} bits per weight asked, at least {lo / n_params:.4f} needed")
        elif r == "bytes_bits":
            words.append(f"{budget.max_bytes} bytes of weights + KV cache at {budget.context} tokens asked, at least "
                         f"{-(-lo // 8)} needed")
        elif r == "bops":
            words.append(f"{budget.bits_per_mac:g} bits per MAC asked, at least {lo / n_params:.4f} needed")
        elif r == "kv_bits":
            words.append(f"{budget.kv_bits:g} KV bits per element asked, at least "
                         f"{lo / (n_elements * budget.context):.4f} needed")
    err = BudgetError("budget cannot be met with these candidates: " + "; ".join(words))
    err.minimum = getattr(e, "minimum", {})  # type: ignore[attr-defined]
    return err
