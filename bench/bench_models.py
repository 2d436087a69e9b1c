"""Benchmark a built-in LM end to end: float, uniform RTN formats, GPTQ (+rotate) options and
mixed Fisher/ILP plans, all in one `api.evaluate` call (one float reference, one
calibration set shared by every GPTQ option).

    OMP_NUM_THREADS=2 PYTHONPATH=src python3 bench/bench_models.py --model gemma3-270m --windows 8 --seqlen 512 \\
        --fisher-samples 8 --calib-samples 32 --budgets 3.5,4.125 --out bench/results

`--budgets ""` skips the sensitivity analysis and the plans (e.g. where the Fisher's
gradients do not fit in memory). Prints the eval table and a markdown table; writes
`models_<alias>.json` (eval artifact) and the sensitivity table and plans into --out.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from mixq import api
from mixq.artifacts import write_artifact
from mixq.cli import eval_table
from mixq.models import load_model
from mixq.progress import LineProgress

FORMATS = "int8:ch,int4:g128,int3:g128,int4:g128+gptq,int4:g128+gptq+rotate,int3:g128+gptq,int3:g128+gptq+rotate"
CANDIDATES = "int2:g128,int3:g128,int4:g128,int8:ch"


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--candidates", default=CANDIDATES)
    ap.add_argument("--budgets", default="3.5,4.125", help="ILP budgets (bits per weight); '' for none")
    ap.add_argument("--fisher-samples", type=int, default=8)
    ap.add_argument("--sensitivity", default=None, help="plan from this sensitivity.json instead of measuring")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto (see mixq.models.load_model)")
    ap.add_argument("--offload", default="auto", help="none, cpu, disk, auto: where the blocks wait (disk: one block "
                    "in memory at a time)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = LineProgress(sys.stderr)
    t0 = time.perf_counter()
    from mixq.models import builtin, gguf_cache

    if a.offload == "disk" and a.model in builtin.SOURCES:
        # block by block from the dequantized cache (safetensors): one block in memory at a time
        deq = gguf_cache.dequantized(builtin.gguf_path(a.model))
        loaded = load_model(str(deq.folder), device=a.device, offload="disk")
        loaded.name, loaded.note = a.model, gguf_cache.baseline_note(deq.info, builtin.SOURCES[a.model].description)
    else:
        loaded = load_model(a.model, device=a.device, offload=a.offload)
    print(f"# {a.model}, {datetime.date.today()}: loaded in {time.perf_counter() - t0:.0f} s; {loaded.note}", flush=True)
    plans = []
    budgets = [float(b) for b in a.budgets.split(",") if b]
    if budgets:
        t1 = time.perf_counter()
        if a.sensitivity:
            from mixq.sensitivity import SensitivityTable

            table = SensitivityTable.load(a.sensitivity)
            print(f"sensitivity from {a.sensitivity}: {table.calibration.get('description')}", flush=True)
        else:
            table = api.analyze(loaded, candidates=a.candidates.split(","), samples=a.fisher_samples,
                                seqlen=a.seqlen, measure_cost=False, progress=progress)
            table.save(out / f"models_{a.model}_sensitivity.json")
            print(f"fisher on {a.fisher_samples} x {a.seqlen}: {time.perf_counter() - t1:.0f} s", flush=True)
        for b in budgets:
            p, _ = api.plan(table, b)
            p.meta["label"] = f"mixed ILP @ {b:g}"
            p.save(out / f"models_{a.model}_plan_{b:g}.json")
            plans.append(p)
    t2 = time.perf_counter()
    res = api.evaluate(loaded, formats=a.formats.split(",") if a.formats else [], plans=plans, seqlen=a.seqlen,
                       windows=a.windows, calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen,
                       progress=progress)
    write_artifact(out / f"models_{a.model}.json", "eval", api.EVAL_SCHEMA, res)
    print(eval_table(res))
    print(f"(eval {time.perf_counter() - t2:.0f} s; calibration {res.get('calibration')})\n")
    print("| format | bpw blocks | bpw all | ppl | KL | top-1 agree | quant s |")
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['label']} | {r['bpw_blocks']:.3f} | {r['bpw_all']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | "
              f"{r['top1_agree']:.3f} | {r.get('quantize_s', 0):.0f} |")
        for w in r.get("manifest_warnings", [])[:3]:
            print(f"  warning ({r['label']}): {w}")


if __name__ == "__main__":
    main()
