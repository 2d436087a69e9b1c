"""mixq's GGUF plans against llama.cpp's own quantizer, both run by llama.cpp, on SmolLM2-135M.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_gguf.py \\
        --llama-quantize /path/to/llama-quantize --llama-imatrix /path/to/llama-imatrix \\
        --work /tmp/gguf-bench --windows 40 --seqlen 512 --calib 16 --threads 2 --out bench/results/gguf.json

Stages (each cached in --work, so a run resumes where it stopped):
1. the float model as an F32 GGUF (`mixq export` of an fp32 checkpoint), llama-quantize's input
   and the reference every KL is measured against (llama.cpp F32 against mixq's float
   evaluation: the floor, measured on the first two windows);
2. an importance matrix of wikitext2-valid (`llama-imatrix`, the first --calib chunks of
   --seqlen tokens);
3. llama.cpp's recipes (Q4_0, IQ4_NL, IQ4_XS, Q3_K_S, Q3_K_M, Q4_K_M, Q5_K_M), without and with
   the imatrix, embeddings and head kept at F16 (`--token-embedding-type f16
   --output-tensor-type f16`, as mixq's export writes them), so that rows differ only in the
   block linears, whose real bits per weight are read back from each file;
4. mixq: one Fisher analysis of GPTQ candidates restricted to GGUF types that cannot land back
   on SmolLM2's Q4_1 grid (q2_k, q3_k, iq4_xs, q6_k where rows allow; q4_0, iq4_nl, q5_0; q8_0),
   calibrated on --calib random windows of wikitext2-valid (the imatrix's amount), then one plan
   per recipe's bits per weight (`--target gguf`), its checkpoint assembled from the analysis'
   GPTQ codes (each unit's from its float input Hessian) and exported;
5. every file run by llama.cpp on the first --windows windows of WikiText-2 test: KL to the
   F32 reference, perplexity, top-1 agreement; and, on the first two windows, the KL of
   llama.cpp's run of the first mixq plan to mixq's own evaluation of its checkpoint.
Prints the table for BENCHMARKS.md and writes every number to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

RECIPES = ["Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_S", "Q3_K_M", "Q4_K_M", "Q5_K_M"]
# asymmetric types whose mins can put SmolLM2's Q4_1-dequantized weights back on their grid
GRID_TYPES = ("Q4_1", "Q5_1", "Q4_K", "Q5_K")
CANDIDATES = ["q2_k+gptq", "q3_k+gptq", "iq4_xs+gptq", "q4_0+gptq", "iq4_nl+gptq", "q5_0+gptq", "q6_k+gptq", "q8_0"]
BLOCK_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def block_stats(path: Path) -> dict:
    """Bits per weight over the block linears of a GGUF, their type histogram (by weights) and
    the share of weights in types with mins on blocks of 32 (GRID_TYPES)."""
    import gguf

    bits = params = grid = 0
    hist: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or parts[2] not in BLOCK_ROLES:
            continue
        n = int(np.prod([int(s) for s in t.shape]))
        bits += 8 * int(t.n_bytes)
        params += n
        hist[t.tensor_type.name] = hist.get(t.tensor_type.name, 0) + n
        if t.tensor_type.name in GRID_TYPES:
            grid += n
    return {"bpw_blocks": bits / params, "types": {k: v / params for k, v in sorted(hist.items())},
            "grid_share": grid / params}


def stage_base(work: Path, loaded) -> Path:
    from mixq import api
    from mixq.plan import Plan

    out = work / "f32.gguf"
    if not out.exists():
        log("float model -> F32 GGUF")
        api.quantize(loaded, work / "ck-f32", plan=Plan.uniform(loaded.name, loaded.units(), "fp32"), fp32=True,
                     overwrite=True)
        api.export(work / "ck-f32", out, to="gguf", float_type="f32")
    return out


def stage_imatrix(work: Path, args, base: Path) -> Path:
    from mixq.data import load_text

    out = work / "imatrix.gguf"
    if not out.exists():
        text = work / "wikitext2-valid.txt"
        text.write_text(load_text("wikitext2-valid"), encoding="utf-8")
        cmd = [args.llama_imatrix, "-m", str(base), "-f", str(text), "-o", str(out), "-c", str(args.seqlen),
               "--chunks", str(args.calib), "-t", str(args.threads)]
        log(" ".join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=open(work / "imatrix.log", "w"))
    return out


def stage_recipes(work: Path, args, base: Path, imatrix: Path) -> dict[str, Path]:
    files = {}
    for recipe in RECIPES:
        for with_imatrix in (False, True):
            label = f"llama.cpp {recipe}" + (" + imatrix" if with_imatrix else "")
            out = work / f"llama-{recipe}{'-imat' if with_imatrix else ''}.gguf"
            if not out.exists():
                cmd = [args.llama_quantize, *(["--imatrix", str(imatrix)] if with_imatrix else []),
                       "--token-embedding-type", "f16", "--output-tensor-type", "f16", str(base), str(out), recipe,
                       str(args.threads)]
                log(" ".join(cmd))
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=open(work / f"{out.stem}.log", "w"))
            files[label] = out
    return files


def stage_mixq(work: Path, args, loaded, budgets: dict[str, float]) -> dict[str, Path]:
    from mixq import api
    from mixq.export import save_quantized
    from mixq.sensitivity import SensitivityTable

    sens, cache_file = work / "sensitivity.json", work / "gptq_cache.pt"
    if sens.exists() and cache_file.exists():
        table, cache = SensitivityTable.load(sens), torch.load(cache_file, weights_only=False)
    else:
        log(f"mixq analysis: fisher, {len(CANDIDATES)} candidates, {args.calib} windows of wikitext2-valid")
        t0 = time.perf_counter()
        table, cache = api.analyze_keeping(loaded, CANDIDATES, method="fisher", calib=None, samples=args.calib,
                                           seqlen=args.seqlen, seed=0, include_head=False, measure_cost=False,
                                           progress=None, device="cpu", dtype="float32", offload="none", config=None,
                                           keep=True)
        table.save(sens)
        torch.save(cache, cache_file)
        log(f"analysis {time.perf_counter() - t0:.0f} s")
    units = loaded.units(include_head=True, include_embeddings=True)
    files = {}
    for label, budget in budgets.items():
        out = work / f"mixq-{budget:.4f}.gguf"
        if not out.exists():
            plan, _ = api.plan(table, budget, target="gguf")
            ck = work / f"ck-mixq-{budget:.4f}"
            weights = {n: cache[(n, str(o))] for n, o in plan.options.items() if (n, str(o)) in cache}
            save_quantized(loaded, units, plan, ck, weights=weights, float_dtype=torch.float32, overwrite=True)
            api.export(ck, out, to="gguf")
            (work / f"{out.stem}.plan.json").write_text(json.dumps({n: str(o) for n, o in plan.options.items()}))
        files[label] = out
    return files


def reference_log_probs(work: Path, args, base: Path, windows: torch.Tensor) -> list[Path]:
    """Per window, the F32 GGUF's log-probabilities (float32 .npy files)."""
    from mixq.eval.runtime import GGUFRunner

    paths = [work / "ref" / f"w{i:03d}.npy" for i in range(windows.shape[0])]
    if all(p.exists() for p in paths):
        return paths
    paths[0].parent.mkdir(exist_ok=True)
    log("reference log-probabilities (F32 GGUF)")
    with GGUFRunner(base, n_ctx=args.seqlen, n_threads=args.threads) as run:
        for i, p in enumerate(paths):
            if not p.exists():
                np.save(p, run.log_probs(windows[i].tolist()).numpy())
    return paths


def floor(work: Path, args, loaded, windows: torch.Tensor, refs: list[Path]) -> dict:
    """KL of llama.cpp's F32 run to mixq's (torch) float evaluation, first two windows."""
    from mixq.eval.perplexity import _kl_and_agree, _next_token_log_probs

    kl = agree = 0.0
    with torch.no_grad():
        for i in range(min(2, windows.shape[0])):
            logp = _next_token_log_probs(loaded.model, windows[i : i + 1])
            k, a = _kl_and_agree(logp, torch.from_numpy(np.load(refs[i]))[None])
            kl, agree = kl + k, agree + a
    n = min(2, windows.shape[0]) * (windows.shape[1] - 1)
    return {"kl": kl / n, "top1_agree": agree / n, "n_tokens": n}


def agreement(work: Path, args, windows: torch.Tensor, label: str, budget: float) -> dict:
    """KL of llama.cpp's run of a mixq GGUF to mixq's own (torch) evaluation of the same
    checkpoint, first two windows: llama.cpp's 8-bit activations and summation order."""
    from mixq.eval.perplexity import _next_token_log_probs
    from mixq.eval.runtime import compare_gguf
    from mixq.export import load_quantized

    q = load_quantized(work / f"ck-mixq-{budget:.4f}", packed=False)
    w = windows[:2]
    with torch.no_grad():
        ref = _next_token_log_probs(q.model, w)
    res = compare_gguf(work / f"mixq-{budget:.4f}.gguf", w, {"mixq": lambda i: ref[i]}, n_threads=args.threads)
    return {"plan": label, **res["mixq"], "n_tokens": res["n_tokens"]}


def evaluate(path: Path, args, windows: torch.Tensor, refs: list[Path]) -> dict:
    from mixq.eval.runtime import compare_gguf

    res = compare_gguf(path, windows, {"f32": lambda i: torch.from_numpy(np.load(refs[i]))}, n_threads=args.threads)
    return {"ppl": res["ppl"], "kl": res["f32"]["kl"], "top1_agree": res["f32"]["top1_agree"],
            "n_tokens": res["n_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-quantize", required=True)
    ap.add_argument("--llama-imatrix", required=True)
    ap.add_argument("--work", required=True, help="scratch directory (GGUF files, caches; several GB)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", type=int, default=16, help="calibration windows (imatrix chunks) of --seqlen tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/gguf.json")
    args = ap.parse_args()
    from mixq import api
    from mixq.data import load_text, token_windows

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    loaded = api.load_model("smollm2-135m", device="cpu", dtype="float32")
    base = stage_base(work, loaded)
    imatrix = stage_imatrix(work, args, base)
    files = stage_recipes(work, args, base, imatrix)
    stats = {label: block_stats(p) for label, p in files.items()}
    budgets = {}
    for recipe in RECIPES:
        b = round(stats[f"llama.cpp {recipe} + imatrix"]["bpw_blocks"], 4)
        budgets.setdefault(f"mixq @ {b:.3f}", b)
    files.update(stage_mixq(work, args, loaded, budgets))
    windows = token_windows(loaded.encode, load_text("wikitext2"), args.seqlen, args.windows)
    refs = reference_log_probs(work, args, base, windows)
    results["floor_f32_vs_torch"] = results.get("floor_f32_vs_torch") or floor(work, args, loaded, windows, refs)
    first = next(iter(budgets))
    results["agreement_mixq"] = results.get("agreement_mixq") or agreement(work, args, windows, first, budgets[first])
    results.update({"model": "smollm2-135m", "data": "wikitext2", "n_windows": args.windows, "seqlen": args.seqlen,
                    "calib_windows": args.calib, "candidates": CANDIDATES})
    # the comparison first (mixq and llama.cpp with its imatrix), then llama.cpp without one
    order = sorted(files, key=lambda k: (0 if k.startswith("mixq") or "imatrix" in k else 1, k))
    for label in order:
        path = files[label]
        if label not in results["rows"]:
            log(f"llama.cpp runs {path.name}")
            t0 = time.perf_counter()
            results["rows"][label] = {**evaluate(path, args, windows, refs), **block_stats(path), "file": path.name,
                                      "eval_s": time.perf_counter() - t0}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    print(f"\nfloor: llama.cpp F32 vs mixq float evaluation: KL {results['floor_f32_vs_torch']['kl']:.2e}; "
          f"llama.cpp vs mixq's evaluation of {results['agreement_mixq']['plan']}: KL "
          f"{results['agreement_mixq']['kl']:.2e}")
    print("| file | bpw blocks | share on Q4_1-grid types | ppl | KL to float | top-1 agree |")
    print("|---|---|---|---|---|---|")
    for label, r in sorted(results["rows"].items(), key=lambda kv: kv[1]["bpw_blocks"]):
        print(f"| {label} | {r['bpw_blocks']:.3f} | {100 * r['grid_share']:.0f}% | {r['ppl']:.3f} | {r['kl']:.4f} | "
              f"{r['top1_agree']:.3f} |")


if __name__ == "__main__":
    main()
