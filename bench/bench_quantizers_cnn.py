"""Benchmark: the calibrated quantizers on a CIFAR-10 ResNet (default ResNet56) with
per-channel symmetric INT: RTN, GPTQ, GPTQ + rotate, RTN + smooth, RTN + low-rank and
RTN + rotate.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_quantizers_cnn.py --model resnet56-cifar10 \\
        --formats int4:ch,int3:ch --calib-samples 512 --out bench/results

Every Conv2d and Linear is quantized, the stem conv (27 inputs) and the classifier included,
as in `bench_foundation.py`. Calibration: `--calib-samples` images drawn at random (seed 0)
from `cifar10-calib`, the calibration half of the CIFAR-10 test images
(`mixq.api.calibration_data`); GPTQ and smoothing run unit by unit in forward order
(`mixq.apply.quantize_model`). Evaluation: the other half (5,000 images): top-1,
agreement of the argmax with the float model, and the mean KL(float || quantized) of the
class distributions. bpw is all-in (`mixq.accounting.bit_totals`) over the quantized units
(and over every parameter). Quantization wall time is `quantize_model`'s, on this machine.

Per layer it also records each unit's relative output error under the *float* model's
input statistics, tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with H = XᵀX of the unit's float inputs on the
calibration images, to see where a method gains or loses. Writes a JSON artifact to --out.

With `--plan-budgets 3.0,3.5` it benchmarks the planner instead: one Fisher table over RTN
candidates (int2/3/4/8:ch) and calibrated ones (int2/3/4:ch with +gptq and +gptq+rotate),
then per budget a plan from the RTN rows only and one from all rows, each applied
(unit-by-unit GPTQ on the same calibration images) and evaluated:

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_quantizers_cnn.py --model resnet56-cifar10 \
        --calib-samples 512 --plan-budgets 3.0,3.5 --out bench/results
"""

from __future__ import annotations

import argparse
import copy
import datetime
import time
from pathlib import Path

import torch

from mixq import api
from mixq.accounting import bit_totals
from mixq.artifacts import write_artifact
from mixq.apply import applied, quantize_model
from mixq.data import load_cifar10
from mixq.models import get_weight, load_model
from mixq.option import CalibConfig
from mixq.plan import Plan
from mixq.quantizers import output_error
from mixq.sensitivity import collect_stats

# label -> option suffix appended to the format
METHODS = {"RTN": "", "GPTQ": "+gptq", "GPTQ+rotate": "+gptq+rotate", "RTN+smooth": "+smooth",
           "RTN+lowrank:1": "+lowrank:1", "RTN+rotate": "+rotate"}


@torch.no_grad()
def logits_of(model, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([model(x) for x in images.split(batch_size)]).float()  # (N, classes)


def compare(logits: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> dict:
    lp, lq = ref.log_softmax(-1), logits.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # (N,) KL(float || quantized)
    return {"top1": float((logits.argmax(-1) == labels).float().mean()),
            "agree": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
            "kl": float(kl.mean())}


def stage_of(name: str) -> str:
    return name.split(".", 1)[0] if name.startswith("layer") else name


def setup(args):
    """The model, its units, calibration images, evaluation images and the float logits."""
    loaded = load_model(args.model)
    units = loaded.units()
    all_units = loaded.units(include_head=True, include_embeddings=True)
    (calib, _), calib_desc = api.calibration_data(loaded, None, args.calib_samples, seed=args.seed)
    images, labels = load_cifar10("eval")
    if args.eval_limit:
        images, labels = images[: args.eval_limit], labels[: args.eval_limit]
    float_state = copy.deepcopy(loaded.model.state_dict())
    ref = logits_of(loaded.model, images)
    return loaded, units, all_units, calib, calib_desc, images, labels, float_state, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56-cifar10")
    ap.add_argument("--formats", default="int4:ch,int3:ch")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64, help="calibration images per forward pass")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N evaluation images (default all 5,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--plan-budgets", default=None, help="benchmark the planner at these budgets instead")
    ap.add_argument("--rtn", default="int2:ch,int3:ch,int4:ch,int8:ch")
    ap.add_argument("--extra", default="int2:ch+gptq,int3:ch+gptq,int4:ch+gptq,"
                                       "int2:ch+gptq+rotate,int3:ch+gptq+rotate,int4:ch+gptq+rotate")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.plan_budgets:
        plan_bench(args)
        return

    loaded, units, all_units, calib, calib_desc, images, labels, float_state, ref = setup(args)
    model = loaded.model
    float_w = {u.name: get_weight(model, u).detach().clone() for u in units}
    float_row = {"label": "float", "option": None, **compare(ref, ref, labels),
                 **bit_totals(None, all_units, loaded.n_params)}
    # float input statistics of every unit, for the per-layer output errors
    stats = collect_stats(model, units, calib, batch_size=args.batch_size)
    gram = {n: s.xtx / s.n_tokens for n, s in stats.items()}  # (in, in)
    base = {u.name: output_error(float_w[u.name], gram[u.name]) for u in units}

    print(f"# {args.model}, per-channel INT with quantizers ({datetime.date.today()})")
    print(f"calibration: {calib_desc}; evaluation: cifar10-eval, {images.shape[0]} images; "
          f"{len(units)} units (stem conv and fc included); float top-1 {100 * float_row['top1']:.2f}")
    rows = [float_row]
    for fmt in args.formats.split(","):
        for label in args.methods.split(","):
            spec = fmt + METHODS[label]
            plan = Plan.uniform(loaded.name, units, spec)
            t0 = time.perf_counter()
            qm = quantize_model(model, units, plan, calib, config=CalibConfig(batch_size=args.batch_size, seed=args.seed))
            man = qm.manifest
            quant_s = time.perf_counter() - t0
            with applied(model, units, qm.weights):
                m = compare(logits_of(model, images), ref, labels)
            per_layer = {u.name: output_error(qm.weights[u.name].weight() - float_w[u.name], gram[u.name])
                         / base[u.name] for u in units}
            row = {"label": f"{fmt} {label}", "format": fmt, "method": label, "option": spec, **m,
                   "quantize_s": quant_s, **bit_totals(plan, all_units, loaded.n_params),
                   "per_layer_rel_output_error": per_layer, "warnings": man.warnings, "timing": man.timing,
                   "alpha": {n: r["alpha"] for n, r in man.units.items() if r.get("alpha") is not None}}
            rows.append(row)
            by_stage: dict[str, list[float]] = {}
            for n, e in per_layer.items():
                by_stage.setdefault(stage_of(n), []).append(e)
            stage_txt = " ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in by_stage.items())
            print(f"{spec:24s} top1 {100 * m['top1']:6.2f}  agree {100 * m['agree']:6.2f}  KL {m['kl']:.4f}  "
                  f"quant {quant_s:6.1f} s  bpw {row['bpw_units']:.3f} (all {row['bpw_all']:.3f})  "
                  f"rel out err by stage: {stage_txt}  warnings {len(man.warnings)}", flush=True)

    print("\n| method | " + " | ".join(f"{f} top-1 / agree / KL / quant s / bpw" for f in args.formats.split(",")) + " |")
    print("|---|" + "---|" * len(args.formats.split(",")))
    print(f"| float | {100 * float_row['top1']:.2f} |")
    for label in args.methods.split(","):
        cells = []
        for fmt in args.formats.split(","):
            r = next(r for r in rows if r.get("method") == label and r.get("format") == fmt)
            cells.append(f"{100 * r['top1']:.2f} / {100 * r['agree']:.2f} / {r['kl']:.4f} / {r['quantize_s']:.1f} / "
                         f"{r['bpw_units']:.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    out = Path(args.out) / f"quantizers_cnn_{args.model}.json"
    write_artifact(out, "bench_quantizers_cnn", 1, {
        "model": args.model, "date": str(datetime.date.today()), "calibration": calib_desc,
        "n_calib": int(calib.shape[0]), "eval": "cifar10-eval", "n_eval": int(images.shape[0]),
        "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads,
        "units": "every Conv2d and Linear (stem conv and fc included)", "rows": rows})
    print(f"wrote {out}")


def plan_bench(args) -> None:
    from collections import Counter

    from mixq.planner import make_plan

    loaded, units, all_units, calib, calib_desc, images, labels, float_state, ref = setup(args)
    model = loaded.model
    rtn, extra = args.rtn.split(","), args.extra.split(",")
    t0 = time.perf_counter()
    table = api.analyze(loaded, candidates=rtn + extra, method="fisher", samples=args.calib_samples, seed=args.seed,
                        measure_cost=False)
    analysis_s = time.perf_counter() - t0
    print(f"# {args.model}: planner with and without calibrated candidates ({datetime.date.today()})")
    print(f"calibration: {calib_desc}; Fisher over {len(rtn + extra)} candidates in {analysis_s:.1f} s; "
          f"evaluation: cifar10-eval, {images.shape[0]} images; float top-1 {100 * compare(ref, ref, labels)['top1']:.2f}")
    rows = table.to_rows()
    out_rows = []
    print("\n| budget | candidates | bpw | top-1 / agree / KL | choices |\n|---|---|---|---|---|")
    for budget in [float(b) for b in args.plan_budgets.split(",")]:
        for label, keep in (("RTN only", set(rtn)), ("with GPTQ(+rotate)", set(rtn + extra))):
            plan, sol = make_plan(table.model, table.units_info, [r for r in rows if r[1] in keep], budget)
            t1 = time.perf_counter()
            qm = quantize_model(model, units, plan, calib, config=CalibConfig(batch_size=args.batch_size, seed=args.seed))
            man = qm.manifest
            quant_s = time.perf_counter() - t1
            with applied(model, units, qm.weights):
                m = compare(logits_of(model, images), ref, labels)
            choices = dict(Counter(str(o) for o in plan.options.values()).most_common())
            row = {"budget": budget, "candidates": label, **m, "quantize_s": quant_s, "predicted": sol.total_error,
                   "choices": choices, "warnings": man.warnings, **bit_totals(plan, all_units, loaded.n_params)}
            out_rows.append(row)
            print(f"| {budget:g} | {label} | {row['bpw_units']:.3f} | {100 * m['top1']:.2f} / {100 * m['agree']:.2f} / "
                  f"{m['kl']:.4f} | {', '.join(f'{k} {v}' for k, v in choices.items())} |", flush=True)
    out = Path(args.out) / f"planner_cnn_{args.model}.json"
    write_artifact(out, "bench_planner_cnn", 1, {
        "model": args.model, "date": str(datetime.date.today()), "calibration": calib_desc,
        "analysis_s": analysis_s, "rtn": rtn, "extra": extra, "n_eval": int(images.shape[0]), "rows": out_rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
