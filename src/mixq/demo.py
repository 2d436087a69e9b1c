"""`mixq demo`: the main job in a few minutes on a laptop CPU.

Measure the sensitivity of every unit of the default model to every candidate format once
(Fisher), let the ILP spend exactly the bits of a uniform format where they matter, and
evaluate the mixed plans beside those uniform formats on the same WikiText-2 windows. The
sensitivity table and the plans are left in `out_dir`, so `mixq plan` can take any other
budget from the same measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mixq import api
from mixq.models import DEFAULT_MODEL, LoadedModel, load_model
from mixq.option import parse_option
from mixq.plan import Plan
from mixq.progress import Progress

# Candidates the ILP chooses among; the mixed plans are matched to the bits of these
# uniform formats (int3:g64 = 3.25, int4:g64 = 4.25 bits per weight).
CANDIDATES = ("int2:g64", "int3:g64", "int4:g64", "int8:ch")
MATCHED = ("int3:g64", "int4:g64")
N_STAGES = 4


@dataclass
class DemoResult:
    """The eval body (rows: float, then each uniform format followed by its mixed plan at
    the same bits), the pairs (uniform label, mixed label), the plans and where they are."""

    eval: dict
    pairs: list[tuple[str, str]]
    plans: dict[str, Plan]
    out_dir: Path
    timing: dict


def uniform_bpw(option: str, shapes: dict[str, tuple[int, int]]) -> float:
    """All-in bits per weight of `option` on every unit of `shapes`."""
    opt = parse_option(option)
    return sum(opt.bits(s) for s in shapes.values()) / sum(r * c for r, c in shapes.values())


def run_demo(model: str | LoadedModel = DEFAULT_MODEL, *, samples: int = 4, seqlen: int = 512, windows: int = 4,
             out_dir: str | Path = "runs/demo", seed: int = 0, progress: Progress | None = None,
             stage: Callable[[int, int, str], None] | None = None) -> DemoResult:
    """Analyze (Fisher, `samples` calibration windows), plan at the bits of each `MATCHED`
    uniform format, evaluate float, the uniform formats and the plans on `windows` windows of
    WikiText-2 test; writes sensitivity.json and plan_<bits>.json into `out_dir`."""
    import time

    say = stage or (lambda i, n, text: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say(1, N_STAGES, f"load {model if isinstance(model, str) else model.name}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    say(2, N_STAGES, f"measure: Fisher sensitivity of every unit to {', '.join(CANDIDATES)} on {samples} calibration "
                     f"windows x {seqlen} tokens")
    table = api.analyze(loaded, candidates=CANDIDATES, samples=samples, seqlen=seqlen, seed=seed, measure_cost=False,
                        progress=progress)
    table.save(out / "sensitivity.json")
    t1 = time.perf_counter()
    shapes = {u.name: tuple(u.shape) for u in table.units}
    plans: dict[str, Plan] = {}
    pairs = []
    say(3, N_STAGES, "plan: the ILP spends the bits of " + " and of ".join(
        f"uniform {m} ({uniform_bpw(m, shapes):.2f} bpw)" for m in MATCHED))
    for fmt in MATCHED:
        bpw = uniform_bpw(fmt, shapes)
        plan, _ = api.plan(table, bpw)
        label = f"mixed @ {bpw:.2f}"
        plan.meta["label"] = label
        plan.save(out / f"plan_{bpw:.2f}.json")
        plans[label] = plan
        pairs.append((fmt, label))
    say(4, N_STAGES, f"evaluate float, {len(MATCHED)} uniform formats and {len(plans)} mixed plans on {windows} "
                     f"WikiText-2 test windows x {seqlen} tokens")
    res = api.evaluate(loaded, formats=list(MATCHED), plans=list(plans.values()), data="wikitext2", seqlen=seqlen,
                       windows=windows, progress=progress)
    by_label = {r["label"]: r for r in res["rows"]}
    res["rows"] = [by_label["float"]] + [by_label[x] for pair in pairs for x in pair]
    t2 = time.perf_counter()
    return DemoResult(res, pairs, plans, out, {"load_analyze_s": t1 - t0, "plan_eval_s": t2 - t1, "total_s": t2 - t0})
