"""Mixed-precision benchmark (issue: measure sensitivity once, spend any budget).

For each sensitivity method: analyse SmolLM2-135M once on a calibration file, then plan
at several budgets with the exact ILP and the greedy baseline, and evaluate every plan
(plus the uniform candidates) on WikiText-2 test. Also the FP family at 4.5 / 5.5 bits and
the CIFAR ResNets at 3 / 4 bits.

    .venv/bin/python bench/bench_mixed.py --methods output,fisher,hutchinson,measure,eigen \
        --windows 16 --out bench/results

Writes one JSON per part under --out and prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from mixq import api
from mixq.artifacts import write_artifact
from mixq.errors import BudgetError
from mixq.models import load_model
from mixq.pipeline import _rank_check, closest_uniform
from mixq.progress import TqdmProgress

INT_CANDS = ["int2:g64", "int3:g64", "int4:g64", "int8:ch"]
FP_CANDS = ["mxfp4", "nvfp4", "mxfp6", "fp8_e4m3:ch"]
LM_BUDGETS = [2.5, 3.0, 3.25, 3.5, 4.25]
FP_BUDGETS = [4.5, 5.5]
CNN_CANDS = ["int2:ch", "int3:ch", "int4:ch", "int8:ch"]
CNN_BUDGETS = [3.0, 4.0]
METHOD_OPTS = {"eigen": {"max_iters": 8}, "hutchinson": {"max_probes": 8}}


def md_table(headers, rows) -> str:
    def f(v):
        return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def plans_for(table, budgets, solvers=("ilp", "greedy")):
    plans = []
    for b in budgets:
        for s in solvers:
            try:
                p, _ = api.plan(table, b, solver=s)
            except BudgetError as e:
                print(f"  skip {s} @ {b}: {e}")
                continue
            p.meta["label"] = f"{table.method}/{s}@{b:g}"
            plans.append(p)
    return plans


def lm_part(methods, cands, budgets, args, progress, tag):
    loaded = load_model("smollm2-135m")
    rows, timing, all_plans, tables = [], {}, [], {}
    for m in methods:
        t = api.analyze(loaded, candidates=cands, method=m, calib="wikitext2-valid", samples=args.samples,
                        seqlen=args.calib_seqlen, seed=0, progress=progress, **METHOD_OPTS.get(m, {}))
        t.save(Path(args.out) / f"sens_{tag}_{m}.json")
        timing[m] = dict(t.timing)
        tables[m] = t
        all_plans += plans_for(t, budgets, ("ilp", "greedy") if m == methods[0] else ("ilp",))
        print(f"{m}: {t.timing['wall_s']:.1f} s = {t.timing['ratio_to_fwd_bwd']:.1f} x fwd+bwd", flush=True)
    res = api.evaluate(loaded, formats=cands, plans=all_plans, data="wikitext2", seqlen=512, windows=args.windows,
                       progress=progress)
    res["analysis_timing"] = timing
    write_artifact(Path(args.out) / f"mixed_{tag}.json", "eval", api.EVAL_SCHEMA, res)
    by = {r["label"]: r for r in res["rows"]}
    shapes = {u.name: tuple(u.shape) for u in next(iter(tables.values())).units}
    for b in budgets:
        uni = closest_uniform(cands, shapes, b)
        if uni:
            r = by[uni]
            rows.append([b, f"uniform {uni}", r["bpw_blocks"], r["ppl"], r["kl"]])
        for label, r in by.items():
            if label.endswith(f"@{b:g}"):
                rows.append([b, label, r["bpw_blocks"], r["ppl"], r["kl"]])
    print(f"\n### SmolLM2-135M, candidates {', '.join(cands)} ({datetime.date.today()})\n")
    print(f"WikiText-2 test, {res['n_windows']} windows x {res['seqlen']} tokens = {res['n_tokens']} scored tokens; "
          f"float ppl {by['float']['ppl']:.3f}; calibration wikitext2-valid {args.samples} x {args.calib_seqlen}.\n")
    print(md_table(["budget", "plan", "bpw blocks", "ppl", "KL"], rows))
    print()
    print(md_table(["method", "analysis s", "fwd+bwd s", "ratio"],
                   [[m, t["wall_s"], t["fwd_bwd_s"], t["ratio_to_fwd_bwd"]] for m, t in timing.items()]))
    # Predicted vs measured over the ILP plans of each method.
    corr = []
    for m in methods:
        pts = [(p.meta["predicted_error"], by[p.meta["label"]]["kl"]) for p in all_plans
               if p.meta["label"].startswith(f"{m}/ilp")]
        rc = _rank_check([a for a, _ in pts], [b for _, b in pts])
        corr.append([m, len(pts), rc["spearman"], rc["pearson_log"]])
    print()
    print(md_table(["method", "plans", "Spearman(pred, KL)", "Pearson(log pred, log KL)"], corr))
    return res


def cnn_part(args, progress):
    for name in args.cnn_models.split(","):
        loaded = load_model(name)
        t = api.analyze(loaded, candidates=CNN_CANDS, method=args.cnn_method, samples=args.cnn_samples, seed=0,
                        progress=progress)
        plans = plans_for(t, CNN_BUDGETS)
        res = api.evaluate(loaded, formats=CNN_CANDS, plans=plans, progress=progress)
        write_artifact(Path(args.out) / f"mixed_{name}.json", "eval", api.EVAL_SCHEMA, res)
        print(f"\n### {name}, {args.cnn_method} sensitivity on {args.cnn_samples} calibration images; "
              f"top-1 on {res['n_images']} evaluation images\n")
        print(md_table(["plan", "bpw quantized", "top-1 %"],
                       [[r["label"], r["bpw_units"], 100 * r["top1"]] for r in res["rows"]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="output,fisher,hutchinson,measure,eigen")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--cnn-method", default="hutchinson")
    ap.add_argument("--cnn-samples", type=int, default=512)
    ap.add_argument("--cnn-models", default="resnet20-cifar10,resnet56-cifar10")
    ap.add_argument("--parts", default="int,fp,cnn")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    progress = TqdmProgress()
    parts = args.parts.split(",")
    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()
    if "int" in parts:
        lm_part(methods, INT_CANDS, LM_BUDGETS, args, progress, "int")
    if "fp" in parts:
        lm_part(methods[:1], FP_CANDS, FP_BUDGETS, args, progress, "fp")
    if "cnn" in parts:
        cnn_part(args, progress)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
