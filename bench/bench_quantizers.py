"""Benchmark: RTN vs sequential GPTQ vs GPTQ+rotate on SmolLM2-135M.

    # windows (needs the tokenizer and ../shared/data): calibration from wikitext2-valid,
    # evaluation = first N windows of WikiText-2 test (token_windows)
    PYTHONPATH=src python3 bench/bench_quantizers.py make-windows --out windows.pt --calib 128 --eval 40 --seqlen 512
    PYTHONPATH=src python3 bench/bench_quantizers.py run --windows windows.pt [--gguf model.gguf] --configs int3:g128,int3:g128+gptq ...
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
    from mixq.calibrate import quantize_model
    from mixq.eval.perplexity import FloatReference, lm_eval
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
    float_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    ref = FloatReference(model, ev, copy_model=False)
    fm = ref.metrics()
    print(json.dumps({"config": "float", "ppl": fm["ppl"], "eval_s": time.perf_counter() - t0}), flush=True)
    for spec in a.configs.split(","):
        opt, *flags = spec.split("@")
        act_order, true_seq = "noact" not in flags, "nots" not in flags
        model.load_state_dict(float_state)
        plan = Plan.uniform("smollm2-135m", units, opt)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        man = quantize_model(model, units, plan, calib, batch_size=a.batch_size, act_order=act_order, true_sequential=true_seq)
        if device == "cuda":
            torch.cuda.synchronize()
        qs = time.perf_counter() - t0
        t0 = time.perf_counter()
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
    a = p.parse_args()
    make_windows(a) if a.cmd == "make-windows" else run(a)
