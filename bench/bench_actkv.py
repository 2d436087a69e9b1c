"""Activations and the KV cache on SmolLM2-135M: each row against the weight-only row at the
same weight format, all variants in one block-by-block walk (BENCHMARKS.md section 5).

    OMP_NUM_THREADS=2 PYTHONPATH=src python3 bench/bench_actkv.py rows --windows 40 \
        --configs "int8:ch;int8:ch@int8:tok;int8:ch+rotate@int8:tok" --out bench/results/actkv_w8.json
    ... rows --configs "float|int4;float|int4:kchan" (WEIGHT_OPTION[|KV], float: weights left float)
    ... rows --plans plan.json,plan2.json

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
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
