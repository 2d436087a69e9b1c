"""`mixq run`: analyze -> plan -> eval -> report on one model, into a run directory.

Because the solver assumes that per-unit errors add up, the run also checks that assumption:
it measures the real KL (causal LMs) or top-1 error (image models) of plans at several
budgets along the frontier and reports the rank correlation of predicted and measured.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np

from mixq import api
from mixq.artifacts import write_artifact
from mixq.errors import BudgetError
from mixq.models import DEFAULT_MODEL, LoadedModel, load_model
from mixq.option import parse_option
from mixq.plan import Plan
from mixq.progress import Progress

log = logging.getLogger(__name__)

CHECK_SCHEMA = 1

# Defaults by model kind. CNNs: per-channel candidates and 512 calibration images, the
# set-up of the CIFAR benchmarks (a handful of images gives a noisy Fisher ranking).
RUN_DEFAULTS: dict[str, dict] = {
    "causal_lm": {"candidates": api.DEFAULT_CANDIDATES, "samples": 8},
    "image_classifier": {"candidates": ("int2:ch", "int3:ch", "int4:ch", "int8:ch"), "samples": 512},
}
N_STAGES = 5

# stage(i, n, text): stage i of n begins; the command line prints it as one line.
Stage = Callable[[int, int, str], None]


def closest_uniform(candidates: list[str], shapes: dict[str, tuple[int, int]], budget_bpw: float) -> str | None:
    """The uniform candidate with the most bits per weight that fits the budget (of those
    every unit can take)."""
    n = sum(r * c for r, c in shapes.values())
    fits = []
    for c in candidates:
        opt = parse_option(c)
        if any(opt.supports(s) is not None for s in shapes.values()):
            continue
        bpw = sum(opt.bits(s) for s in shapes.values()) / n
        if bpw <= budget_bpw + 1e-12:
            fits.append((bpw, c))
    return max(fits)[1] if fits else None


def check_points(curve: list[dict], n_checks: int) -> list[dict]:
    """`n_checks` frontier points spread evenly in bits (endpoints included)."""
    if len(curve) <= n_checks:
        return list(curve)
    idx = np.unique(np.round(np.linspace(0, len(curve) - 1, n_checks)).astype(int))
    return [curve[i] for i in idx]


def _rank_check(predicted: list[float], measured: list[float]) -> dict:
    from scipy.stats import pearsonr, spearmanr

    if len(predicted) < 3:
        return {"spearman": None, "pearson_log": None}
    rho = spearmanr(predicted, measured).statistic
    logs = [(math.log(p), math.log(m)) for p, m in zip(predicted, measured) if p > 0 and m > 0]
    pl = pearsonr(*zip(*logs)).statistic if len(logs) >= 3 else None
    return {"spearman": float(rho), "pearson_log": None if pl is None else float(pl)}


def run(model: str | LoadedModel = DEFAULT_MODEL, budget_bpw: float | list[float] = 3.5,
        out_dir: str | Path = "runs/default", candidates=None, method: str = "fisher",
        calib: str | None = None, samples: int | None = None, seqlen: int = 512, eval_data: str | None = None,
        eval_windows: int = 8, n_checks: int = 5, seed: int = 0, ties: list[str] | None = None,
        progress: Progress | None = None, device: str | None = "auto", dtype: str | None = None,
        offload: str | None = "auto", calib_samples: int = 128, rotate_residual: int | None = None,
        act_candidates=(), kv_candidates=(), context: int | None = None, bits_per_mac: float | None = None,
        kv_bits: float | None = None, max_bytes: int | None = None, stage: Stage | None = None) -> dict:
    """Run the whole pipeline; returns a summary and leaves in `out_dir`: sensitivity.json,
    plan.json (ILP; plan_<budget>.json for each further budget), plan_greedy.json,
    frontier.json, eval.json, check.json, report.html. rotate_residual: a seed to fold a
    residual-stream rotation into the model first (`models.fold`).

    Calibrated candidates (gptq, smooth) are quantized once, in the analysis (from each
    unit's float input Hessian on the analysis' calibration windows), and every plan is
    evaluated with those weights: one measurement serves every budget. `mixq quantize` of a
    plan calibrates sequentially on `calib_samples` windows instead.

    `act_candidates` / `kv_candidates` add input-activation and KV-cache choices to the
    analysis; with `context`, `bits_per_mac`, `kv_bits` or `max_bytes` every plan meets those
    limits too (`mixq.budget`), and chooses KV formats (no frontier then: the additivity check
    is skipped).
    `candidates` and `samples` default by model kind (`RUN_DEFAULTS`); `stage(i, n, text)`
    is called as each of the `N_STAGES` stages begins."""
    from mixq.report import write_report

    say = stage or (lambda i, n, text: None)
    if candidates is not None:
        api.check_requests(options=list(candidates))  # before the model loads
    budgets = [float(b) for b in (budget_bpw if isinstance(budget_bpw, (list, tuple)) else [budget_bpw])]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(1, N_STAGES, f"load {model if isinstance(model, str) else model.name}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device, offload=offload,
                                                                     rotate_residual=rotate_residual)
    if rotate_residual is not None and isinstance(model, LoadedModel):
        from mixq.models.load import fold_residual_rotation

        fold_residual_rotation(loaded, rotate_residual)
    defaults = RUN_DEFAULTS.get(loaded.kind, RUN_DEFAULTS["causal_lm"])
    candidates = tuple(candidates) if candidates is not None else defaults["candidates"]
    samples = samples if samples is not None else defaults["samples"]
    if loaded.kind == "causal_lm":
        api.check_window(loaded, seqlen, "seqlen")
    say(2, N_STAGES, f"analyze: {method} sensitivity of {len(candidates)} candidates on {samples} calibration "
                     f"{'windows' if loaded.kind == 'causal_lm' else 'images'}")
    table, cache = api.analyze_keeping(loaded, candidates, method, calib, samples, seqlen, seed, False, True, progress,
                                       device, dtype, offload, None, keep=True, act_candidates=act_candidates,
                                       kv_candidates=kv_candidates)
    multi = {"context": context, "bits_per_mac": bits_per_mac, "kv_bits": kv_bits, "max_bytes": max_bytes}
    if not any(v is not None for v in (context, bits_per_mac, kv_bits)):
        multi = {"max_bytes": max_bytes} if max_bytes is not None else {}
    table.save(out / "sensitivity.json")
    say(3, N_STAGES, f"plan at {', '.join(f'{b:g}' for b in budgets)} bits per weight (ILP, greedy, frontier)")
    plans = []
    curve: list[dict] = []
    for i, budget in enumerate(budgets):
        plan, c = api.plan(table, budget, ties=ties, frontier_points=41 if i == 0 and "context" not in multi else 0,
                           progress=progress, **multi)
        plan.meta["label"] = f"mixed ILP @ {budget:g}"
        plan.save(out / ("plan.json" if i == 0 else f"plan_{budget:g}.json"))
        plans.append(plan)
        curve = curve or c
    api.save_frontier(out / "frontier.json", curve, {"model": loaded.name, "solver": "ilp",
                                                     "sensitivity": plans[0].meta["sensitivity"]})
    try:
        if "context" not in multi:  # greedy knows one budget only
            greedy, _ = api.plan(table, budgets[0], solver="greedy", ties=ties, **multi)
            greedy.meta["label"] = f"mixed greedy @ {budgets[0]:g}"
            greedy.save(out / "plan_greedy.json")
            plans.append(greedy)
    except BudgetError as e:
        log.warning("greedy found no plan at %g: %s", budgets[0], e)
    checks = []
    for p in check_points(curve, n_checks):
        cp, _ = api.plan(table, p["budget_bpw"], ties=ties)
        cp.meta["label"] = f"frontier @ {p['bits_per_weight']:.3f}"
        checks.append(cp)
    shapes = {u.name: tuple(u.shape) for u in table.units}
    uniform = {b: closest_uniform(list(table.candidates), shapes, b) for b in budgets}
    formats = [c for c in table.candidates if all(parse_option(c).supports(s) is None for s in shapes.values())]
    say(4, N_STAGES, f"eval: float, {len(formats)} uniform formats and {len(plans) + len(checks)} plans")
    res = api.evaluate(loaded, formats=formats, plans=plans + checks, data=eval_data, windows=eval_windows,
                       seqlen=seqlen, progress=progress, cache=cache, seed=seed, calib=calib,
                       calib_samples=calib_samples, calib_seqlen=seqlen)
    res["budget_bpw"] = budgets[0] if len(budgets) == 1 else budgets
    res["closest_uniform"] = uniform[budgets[0]] if len(budgets) == 1 else {f"{b:g}": u for b, u in uniform.items()}
    res["analysis"] = {"wall_s": table.timing.get("wall_s"), "peak_device_bytes": table.timing.get("peak_device_bytes"),
                       "calibrated_from": "the analysis' float input Hessians" if cache else None}
    write_artifact(out / "eval.json", "eval", api.EVAL_SCHEMA, res)
    check = _check(res, checks, formats, loaded.kind)
    write_artifact(out / "check.json", "check", CHECK_SCHEMA, check)
    say(5, N_STAGES, "report")
    report = write_report(out)
    return {"out_dir": str(out), "report": str(report), "eval": res, "check": check, "plan": plans[0],
            "plans": plans[:len(budgets)]}


def _measured(row: dict, kind: str) -> float:
    return row["kl"] if kind == "causal_lm" else 1.0 - row["top1"]


def _check(res: dict, checks: list[Plan], formats: list[str], kind: str) -> dict:
    by_label = {r["label"]: r for r in res["rows"]}
    metric = "KL" if kind == "causal_lm" else "top-1 error"
    pts = []
    for cp in checks:
        r = by_label[cp.meta["label"]]
        pts.append({"budget_bpw": cp.meta["budget_bpw"], "bits_per_weight": cp.meta["bits_per_weight"],
                    "predicted": cp.meta["predicted_error"], "measured": _measured(r, kind), "ppl": r.get("ppl")})
    uni = [{"format": f, "bits_per_weight": by_label[f]["bpw_units"], "measured": _measured(by_label[f], kind)}
           for f in formats]
    return {"metric": metric, "plans": pts, "uniform": uni,
            **_rank_check([p["predicted"] for p in pts], [p["measured"] for p in pts])}
