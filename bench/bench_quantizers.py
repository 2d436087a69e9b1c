"""Benchmark: RTN vs sequential GPTQ vs GPTQ+rotate on SmolLM2-135M.

    # windows (needs the tokenizer and ../shared/data): calibration from wikitext2-valid,
    # evaluation = first N windows of WikiText-2 test (token_windows)
    PYTHONPATH=src python3 bench/bench_quantizers.py make-windows --out windows.pt --calib 128 --eval 40 --seqlen 512
    PYTHONPATH=src python3 bench/bench_quantizers.py run --windows windows.pt [--gguf model.gguf] --configs int3:g128,int3:g128+gptq ...
    # the mixed planner at given budgets, with RTN candidates only vs with GPTQ/rotation
    # candidates too (one Fisher table over all candidates; the RTN-only plans use its RTN rows)
    PYTHONPATH=src python3 bench/bench_quantizers.py plan --windows windows.pt [--gguf model.gguf] --budgets 3.0,3.5
"""
import argparse, copy, json, os, sys, time

import torch


def make_windows(a):
    from mixq.data import calibration_windows, load_text, token_windows
    from mixq.models import load_model
    loaded = load_model("smollm2-135m")
    calib = calibration_windows(loaded.encode, "wikitext2-valid", seqlen=a.seqlen, n_samples=a.calib, seed=0)
    ev = token_windows(loaded.encode, load_text("wikitext2"), a.seqlen, a.eval)
    torch.save({"calib": calib, "eval": ev, "desc": f"calib wikitext2-valid {a.calib}x{a.seqlen} seed 0; eval wikitext2 test first {a.eval}x{a.seqlen}"}, a.out)
    fp = sum(float(p.double().sum()) for p in loaded.model.parameters())
    print("windows", calib.shape, ev.shape, "weight fingerprint", repr(fp))


def load(a, device):
    if a.gguf:
        from transformers import AutoModelForCausalLM
        d, f = os.path.split(a.gguf)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    else:
        from mixq.models import load_model
        model = load_model("smollm2-135m").model
    return model.to(device)


def run(a):
    from mixq.apply import applied, quantize_model
    from mixq.eval.perplexity import FloatReference, lm_eval
    from mixq.option import CalibConfig
    from mixq.models.enumerate import llm_units
    from mixq.plan import Plan
    from mixq.accounting import bit_totals
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and a.threads:
        torch.set_num_threads(a.threads)
    w = torch.load(a.windows)
    calib, ev = w["calib"][: a.n_calib], w["eval"][: a.n_eval]
    model = load(a, device)
    fp = sum(float(p.double().sum()) for p in model.parameters())
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "fingerprint": fp,
                      "torch": torch.__version__, "calib": list(calib.shape), "eval": list(ev.shape), "desc": w["desc"]}), flush=True)
    units = llm_units(model)
    t0 = time.perf_counter()
    ref = FloatReference(model, ev, copy_model=False)
    fm = ref.metrics()
    print(json.dumps({"config": "float", "ppl": fm["ppl"], "eval_s": time.perf_counter() - t0}), flush=True)
    for spec in a.configs.split(","):
        opt, *flags = spec.split("@")
        act_order, true_seq = "noact" not in flags, "nots" not in flags
        plan = Plan.uniform("smollm2-135m", units, opt)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        qm = quantize_model(model, units, plan, calib, config=CalibConfig(batch_size=a.batch_size, act_order=act_order,
                                                                          true_sequential=true_seq))
        man = qm.manifest
        if device == "cuda":
            torch.cuda.synchronize()
        qs = time.perf_counter() - t0
        t0 = time.perf_counter()
        with applied(model, units, qm.weights):
            m = lm_eval(model, ev, reference=ref)
        row = {"config": spec, "kl": m["kl"], "ppl": m["ppl"], "top1_agree": m["top1_agree"], "quant_s": qs,
               "eval_s": time.perf_counter() - t0, "n_calib": int(calib.shape[0]) if man.sequential else 0,
               "timing": man.timing, "n_warnings": len(man.warnings),
               "alpha_mean": None}
        alphas = [u["alpha"] for u in man.units.values() if u.get("alpha") is not None]
        if alphas:
            row["alpha_mean"] = sum(alphas) / len(alphas)
        row.update({k: v for k, v in bit_totals(plan, llm_units(model, include_head=True, include_embeddings=True),
                                                 sum(p.numel() for p in model.parameters())).items()
                    if "bits" in k or "bpw" in k})
        print(json.dumps(row), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "results.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            with open(os.path.join(os.environ["OUT"], f"manifest_{len(spec)}_{abs(hash(spec)) % 10**6}.json"), "w") as f:
                json.dump({"config": spec, **man.to_dict()}, f)


def plan_bench(a):
    """Fisher sensitivity over RTN and calibrated candidates (once), plans per budget with and
    without the calibrated candidates, each applied (sequential GPTQ on the calibration
    windows) and evaluated."""
    from collections import Counter

    from mixq.accounting import bit_totals
    from mixq.apply import applied, quantize_model
    from mixq.eval.perplexity import FloatReference, lm_eval
    from mixq.option import CalibConfig
    from mixq.models.enumerate import llm_units
    from mixq.planner import make_plan
    from mixq.sensitivity import UnitQuantizer, analyze

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.load(a.windows)
    calib, ev = w["calib"][: a.n_calib], w["eval"][: a.n_eval]
    model = load(a, device)
    units = llm_units(model)
    all_units = llm_units(model, include_head=True, include_embeddings=True)
    n_params = sum(p.numel() for p in model.parameters())
    rtn = a.rtn.split(",")
    extra = a.extra.split(",")
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "desc": w["desc"],
           "rtn_candidates": rtn, "extra_candidates": extra, "n_sens_windows": a.sens_windows,
           "n_stats_windows": a.stats_windows, "n_calib": int(calib.shape[0]), "eval": list(ev.shape), "rows": []}
    t0 = time.perf_counter()
    qfn = UnitQuantizer.from_calibration(model, units, calib[: a.stats_windows],
                                         config=CalibConfig(batch_size=a.batch_size))
    table = analyze(model, units, rtn + extra, "fisher", calib[: a.sens_windows].to(device), quantize_fn=qfn,
                    model_name="smollm2-135m", calib_description=w["desc"])
    out["analysis_s"] = time.perf_counter() - t0
    print(json.dumps({"analysis_s": out["analysis_s"]}), flush=True)
    if os.environ.get("OUT"):
        table.save(os.path.join(os.environ["OUT"], "sens_options_fisher.json"))
    rows = table.to_rows()
    ref = FloatReference(model, ev, copy_model=False)
    out["float_ppl"] = ref.metrics()["ppl"]
    for budget in [float(b) for b in a.budgets.split(",")]:
        for label, keep in (("rtn only", set(rtn)), ("with gptq/rotate", set(rtn + extra))):
            sub = [r for r in rows if r[1] in keep]
            plan, sol = make_plan(table.model, table.units_info, sub, budget)
            t1 = time.perf_counter()
            qm = quantize_model(model, units, plan, calib, config=CalibConfig(batch_size=a.batch_size))
            qs = time.perf_counter() - t1
            with applied(model, units, qm.weights):
                m = lm_eval(model, ev, reference=ref)
            row = {"budget": budget, "candidates": label, "kl": m["kl"], "ppl": m["ppl"],
                   "predicted": sol.total_error, "quant_s": qs,
                   "choices": dict(Counter(str(o) for o in plan.options.values()).most_common()),
                   **{k: v for k, v in bit_totals(plan, all_units, n_params).items() if "bpw" in k}}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            if os.environ.get("OUT"):
                plan.save(os.path.join(os.environ["OUT"], f"plan_{budget:g}_{'opts' if 'gptq' in label else 'rtn'}.json"))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "plan_bench.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-windows")
    m.add_argument("--out", required=True); m.add_argument("--calib", type=int, default=128)
    m.add_argument("--eval", type=int, default=40); m.add_argument("--seqlen", type=int, default=512)
    r = sub.add_parser("run")
    r.add_argument("--windows", required=True); r.add_argument("--gguf", default=None)
    r.add_argument("--configs", required=True); r.add_argument("--n-calib", type=int, default=128)
    r.add_argument("--batch-size", type=int, default=8); r.add_argument("--n-eval", type=int, default=40); r.add_argument("--threads", type=int, default=0)
    q = sub.add_parser("plan")
    q.add_argument("--windows", required=True); q.add_argument("--gguf", default=None)
    q.add_argument("--budgets", default="3.0,3.5"); q.add_argument("--n-calib", type=int, default=128)
    q.add_argument("--n-eval", type=int, default=40); q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--sens-windows", type=int, default=8, help="windows for the Fisher pass")
    q.add_argument("--stats-windows", type=int, default=32, help="windows for the per-unit GPTQ statistics of the analysis")
    q.add_argument("--rtn", default="int2:g64,int3:g64,int4:g64,int8:ch")
    q.add_argument("--extra", default="int2:g64+gptq+rotate,int3:g64+gptq+rotate,int4:g64+gptq+rotate")
    a = p.parse_args()
    {"make-windows": make_windows, "run": run, "plan": plan_bench}[a.cmd](a)
