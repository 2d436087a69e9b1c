"""Activations and the KV cache on SmolLM2-135M: each row against the weight-only row at the
same weight format, all variants in one block-by-block walk (BENCHMARKS.md section 7).

    OMP_NUM_THREADS=2 PYTHONPATH=src python3 bench/bench_actkv.py rows --windows 40 \
        --configs "int8:ch;int8:ch@int8:tok;int8:ch+rotate@int8:tok" --out bench/results/actkv_w8.json
    ... rows --configs "float|int4;float|int4:kchan" (WEIGHT_OPTION[|KV], float: weights left float)
    ... rows --plans plan.json,plan2.json
    OMP_NUM_THREADS=1 PYTHONPATH=src python3 bench/bench_actkv.py plan --windows 40 --out bench/results/actkv_plan.json

`plan`: one Fisher analysis (8 windows of wikitext2-valid) over weight x activation
candidates and KV candidates, then two plans from it, each evaluated beside its reference at
equal budgets with the weights the analysis made (GPTQ from the float input Hessians): the
planned W4A4KV4 (rotations allowed) against naive W4A4KV4 (int4:g64@int4:tok, KV int4:asym
per token) at equal weight bits, bits per MAC and KV bits; and a plan under the bytes of
weights plus an 8k-token KV cache of int4:g64 + KVQuant-style KV4, against that uniform pair.

Configs are separated by ';' (options hold commas in neither part). Calibrated options
(gptq, smooth, static ELEMENT:t activations) calibrate on --calib-samples random windows of
wikitext2-valid (seed 0). Evaluation: the first --windows windows x --seqlen tokens of
WikiText-2 test. Prints a markdown table and writes the rows (with wall times) as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mixq import api
from mixq.accounting import bit_totals, kv_totals
from mixq.apply.runtime import uniform_kv
from mixq.data import load_text, token_windows
from mixq.eval.streamed import Variant, evaluate_variants
from mixq.formats.kvcache import parse_kv
from mixq.models import load_model
from mixq.models.kvcache import kv_layers
from mixq.option import CalibConfig
from mixq.plan import Plan


def build_plans(lm, configs: list[str], plan_paths: list[str]) -> list[tuple[str, Plan]]:
    units = lm.units()
    out = []
    for cfg in configs:
        weight, _, kv = cfg.partition("|")
        weight = weight.strip()
        plan = Plan.uniform(lm.name, units, None if weight in ("", "float") else weight)
        if kv.strip():
            plan = plan.with_kv(uniform_kv(lm.model, parse_kv(kv.strip())))
        out.append((cfg.strip(), plan))
    for p in plan_paths:
        plan = Plan.load(p)
        out.append((plan.meta.get("label", Path(p).stem), plan))
    return out


def cmd_rows(args) -> None:
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m", device="cpu", offload="none")
    configs = [c for c in args.configs.split(";") if c.strip()] if args.configs else []
    planned = build_plans(lm, configs, [p for p in args.plans.split(",") if p] if args.plans else [])
    windows = token_windows(lm.encode, load_text("wikitext2"), args.seqlen, args.windows)
    calib = None
    if any(o.needs_calibration for _, p in planned for o in p.options.values()):
        calib, desc = api.calibration_data(lm, "wikitext2-valid", args.calib_samples, args.seqlen, 0)
        print(f"calibration: {desc}")
    config = CalibConfig(batch_size=args.batch_size)
    all_units = lm.units(include_head=True, include_embeddings=True)
    t0 = time.perf_counter()
    variants = [Variant.for_plan(label, lm.model, plan, calib=calib, config=config) for label, plan in planned]
    float_row, rows = evaluate_variants(lm.walker(), all_units, windows, variants, batch_size=args.eval_batch)
    wall = time.perf_counter() - t0
    out_rows = [{"label": "float", **bit_totals(None, all_units, lm.n_params),
                 **kv_totals(lm.model, None, args.seqlen), **float_row, "kl": 0.0}]
    for (label, plan), r in zip(planned, rows):
        out_rows.append({"label": label, **bit_totals(plan, all_units, lm.n_params),
                         **kv_totals(lm.model, plan, args.seqlen),
                         "kv_bits_8k": kv_totals(lm.model, plan, 8192)["kv_bits_per_element"], **r})
    print(f"{args.windows} windows x {args.seqlen} tokens ({out_rows[0]['n_tokens']} scored), wall {wall:.0f} s, "
          f"{args.threads} threads")
    print("| config | bpw blocks | KV bits (8k) | ppl | KL | top-1 | quant s |")
    print("|---|---|---|---|---|---|---|")
    for r in out_rows:
        print(f"| {r['label']} | {r['bpw_blocks']:.3f} | {r.get('kv_bits_8k', 16.0):.3f} | {r['ppl']:.3f} | "
              f"{r['kl']:.4f} | {r.get('top1_agree', 1.0):.3f} | {r.get('quantize_s', 0.0):.0f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"wall_s": wall, "threads": args.threads, "windows": args.windows,
                                              "seqlen": args.seqlen, "calib_samples": args.calib_samples,
                                              "rows": out_rows}, indent=1, default=str))


W_CANDIDATES = ["int3:g64", "int4:g64", "int8:ch", "int4:g64+gptq+rotate", "int3:g64+gptq+rotate", "int8:ch+rotate"]
ACT_CANDIDATES = ["none", "int8:tok", "int4:tok"]
KV_CANDIDATES = ["int8", "int4:asym", "int4:asym:kchan:out1%:sink", "int3:asym:g32:kchan64:out1%:sink",
                 "int2:asym:g32:kchan64:out1%:sink"]
NAIVE_KV = "int4:asym"
KVQ4 = "int4:asym:kchan:out1%:sink"


def restrict(table, keep):
    """A copy of a sensitivity table whose units offer only the options `keep(option)` allows."""
    import copy

    from mixq.option import parse_option

    out = copy.deepcopy(table)
    for u in out.units:
        u.options = [o for o in u.options if keep(parse_option(o["option"]))]
    out.candidates = [c for c in out.candidates if keep(parse_option(c))]
    return out


def cmd_plan(args) -> None:
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m", device="cpu", offload="none")
    t0 = time.perf_counter()
    table, cache = api.analyze_keeping(lm, W_CANDIDATES, "fisher", "wikitext2-valid", args.samples, args.seqlen, 0,
                                       False, False, None, "cpu", None, "none", None, keep=True,
                                       act_candidates=ACT_CANDIDATES, kv_candidates=KV_CANDIDATES,
                                       act_rows=args.act_rows)
    t_analysis = time.perf_counter() - t0
    table.save(Path(args.out).with_suffix(".sensitivity.json"))
    print(f"analysis {t_analysis:.0f} s: {len(table.units)} units x {len(table.candidates)} candidates, "
          f"{len(table.kv)} layers x {len(table.kv_candidates)} KV candidates", flush=True)
    units = lm.units()
    n = sum(u.n_params for u in units)
    kv_naive = uniform_kv(lm.model, parse_kv(NAIVE_KV))
    kv_q4 = uniform_kv(lm.model, parse_kv(KVQ4))
    naive = Plan.uniform(lm.name, units, "int4:g64@int4:tok", kv=kv_naive)
    bpw = naive.unit_bits()
    bpw = sum(bpw.values()) / n
    kv_bits = kv_totals(lm.model, naive, args.seqlen)["kv_bits_per_element"]
    t0 = time.perf_counter()
    planned, _ = api.plan(table, bpw, context=args.seqlen, bits_per_mac=16.0, kv_bits=kv_bits)
    ref_bytes = Plan.uniform(lm.name, units, "int4:g64", kv=kv_q4)
    max_bytes = int((sum(ref_bytes.unit_bits().values()) + kv_totals(lm.model, ref_bytes, 8192)["kv_bytes"] * 8) // 8)
    # the bytes plan chooses among round-to-nearest weights (float inputs) and the KV candidates,
    # like the uniform reference it is compared with
    by_bytes, _ = api.plan(restrict(table, lambda o: o.is_plain and o.act is None), None, context=8192,
                           max_bytes=max_bytes)
    t_plan = time.perf_counter() - t0
    plans = [("naive W4A4KV4", naive), ("planned W4A4KV4", planned), ("uniform int4:g64 + KV4 (bytes ref)", ref_bytes),
             ("planned @ bytes of 8k ctx (RTN weights)", by_bytes)]
    for label, p in plans:
        p.meta["label"] = label
        p.save(Path(args.out).with_suffix(f".{label.split()[0]}_{len(p.kv)}.plan.json"))
    windows = token_windows(lm.encode, load_text("wikitext2"), args.seqlen, args.windows)
    all_units = lm.units(include_head=True, include_embeddings=True)
    t0 = time.perf_counter()
    variants = [Variant.for_plan(label, lm.model, p, cache=cache) for label, p in plans]
    float_row, rows = evaluate_variants(lm.walker(), all_units, windows, variants, batch_size=args.eval_batch)
    t_eval = time.perf_counter() - t0
    out_rows = []
    for (label, p), r in zip(plans, rows):
        counts: dict[str, int] = {}
        for o in p.options.values():
            counts[str(o)] = counts.get(str(o), 0) + 1
        kv_counts: dict[str, int] = {}
        for layer in kv_layers(lm.model):
            f = str(p.kv.get(layer.name, "fp16"))
            kv_counts[f] = kv_counts.get(f, 0) + 1
        bops = sum(o.weight_compute_bits() * o.act_bits * p.shapes[u][0] * p.shapes[u][1] for u, o in p.options.items())
        out_rows.append({"label": label, **bit_totals(p, all_units, lm.n_params),
                         "bits_per_mac": bops / n, "kv_bits_512": kv_totals(lm.model, p, args.seqlen)["kv_bits_per_element"],
                         "kv_bits_8k": kv_totals(lm.model, p, 8192)["kv_bits_per_element"],
                         "bytes_8k": (sum(p.unit_bits().values()) + kv_totals(lm.model, p, 8192)["kv_bytes"] * 8) / 8,
                         "options": counts, "kv": kv_counts, "predicted_error": p.meta.get("predicted_error"), **r})
    print(f"{args.windows} windows x {args.seqlen}: analysis {t_analysis:.0f} s, plans {t_plan:.1f} s, "
          f"evaluation {t_eval:.0f} s ({args.threads} threads); float ppl {float_row['ppl']:.3f}")
    print("| plan | bpw blocks | bits/MAC | KV bits (512) | MiB at 8k | ppl | KL | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out_rows:
        print(f"| {r['label']} | {r['bpw_blocks']:.3f} | {r['bits_per_mac']:.2f} | {r['kv_bits_512']:.3f} | "
              f"{r['bytes_8k'] / 2**20:.2f} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1_agree']:.3f} |")
        print(f"  options {r['options']}  kv {r['kv']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"analysis_s": t_analysis, "plan_s": t_plan, "eval_s": t_eval,
                                          "threads": args.threads, "max_bytes_8k": max_bytes, "float": float_row,
                                          "rows": out_rows}, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rows", help="evaluate configs and plans against the float model")
    r.add_argument("--configs", default="", help="WEIGHT_OPTION[|KV] separated by ';'")
    r.add_argument("--plans", default="", help="plan.json files, comma-separated")
    r.add_argument("--windows", type=int, default=40)
    r.add_argument("--seqlen", type=int, default=512)
    r.add_argument("--calib-samples", type=int, default=32)
    r.add_argument("--batch-size", type=int, default=8, help="calibration windows per micro-batch")
    r.add_argument("--eval-batch", type=int, default=1)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--out", default=None)
    r.set_defaults(func=cmd_rows)
    pl = sub.add_parser("plan", help="analysis, the planned W4A4KV4 and the 8k-context bytes plan, evaluated")
    pl.add_argument("--windows", type=int, default=40)
    pl.add_argument("--seqlen", type=int, default=512)
    pl.add_argument("--samples", type=int, default=8, help="analysis windows of wikitext2-valid")
    pl.add_argument("--act-rows", type=int, default=2048, help="input rows per unit for the activation terms")
    pl.add_argument("--eval-batch", type=int, default=4)
    pl.add_argument("--threads", type=int, default=1)
    pl.add_argument("--out", default="bench/results/actkv_plan.json")
    pl.set_defaults(func=cmd_plan)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
