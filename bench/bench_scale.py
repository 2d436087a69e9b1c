"""Scale benchmark: the whole mixq pipeline on real-sized, random-weight Llama models built from
their configs (nobody downloads weights), on the GPU, with the decoder blocks offloaded to
host memory (one block on the GPU at a time).

    # Llama-3-8B shape: a Fisher-only analysis, mixq run at two budgets, quantize the lower plan
    # (GPTQ, 128 x 2048 calibration tokens), evaluate the checkpoint; plus one float forward+backward of the
    # resident model over the analysis' calibration set (the unit of analysis cost)
    PYTHONPATH=src MIXQ_DATA_DIR=<data> python bench/bench_scale.py 8b --layers 32 --out OUT
    # Llama-3-70B width: analyze and quantize with 4, 8, 16 blocks (memory flat, time linear)
    PYTHONPATH=src MIXQ_DATA_DIR=<data> python bench/bench_scale.py 70b --layers 4,8,16 --out OUT

Each stage is the `mixq` command line in a fresh process (what a user runs); its wall time is
measured here, its peak GPU memory read from the artifact it writes (`peak_device_bytes`,
`torch.cuda.max_memory_allocated` over the stage's work). Models: LlamaConfig(hidden 4096,
intermediate 14336, 32 heads, 8 KV heads, vocab 32000) or (8192, 28672, 64, 8, 32000),
bf16, random init (seed 0), with a byte-level BPE tokenizer (vocab 32000) trained on the
calibration text; saved with save_pretrained into --work (safetensors shards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),  # CPU dry run
}


def build(shape: str, layers: int, folder: Path, data: Path) -> dict:
    """A random-weight Llama of `shape` with `layers` blocks, saved in bf16 with a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(data / "wikitext2_tok" / "valid.txt")],
              trainers.BpeTrainer(vocab_size=32000, special_tokens=["<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, vocab_size=32000,
                      max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=0, eos_token_id=1,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, max_shard_size="5GB")
    fast.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return {"n_params": n_params, "build_s": time.perf_counter() - t0,
            "disk_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}


def mixq(args: list[str], log: Path) -> float:
    """Run `mixq ARGS` (the command line, a fresh process); returns its wall seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "mixq.cli", "-q", *args], stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(open(log).read()[-4000:], flush=True)
        raise SystemExit(f"mixq {' '.join(args)} failed with exit {proc.returncode} (log {log})")
    return wall


def gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def fwd_bwd_reference(folder: Path, samples: int, seqlen: int) -> dict:
    """One float forward+backward over the analysis' calibration windows, whole model resident
    on the GPU (what the analysis cost is compared with)."""
    from mixq import api
    from mixq.models import load_model
    from mixq.sensitivity import fwd_bwd_seconds

    loaded = load_model(str(folder), device="auto", offload="none")
    data, _ = api.calibration_data(loaded, None, samples, seqlen, 0)
    fwd_bwd_seconds(loaded.model, data[:1], batch_size=1)  # warm-up
    s = fwd_bwd_seconds(loaded.model, data, batch_size=1)
    del loaded
    torch.cuda.empty_cache()
    return {"fwd_bwd_s": s}


def run_8b(a, out: Path, work: Path, data: Path) -> dict:
    folder = work / f"llama{a.shape}-{a.layers[0]}"
    res: dict = {"shape": a.shape, "layers": a.layers[0]}
    res["build"] = build(a.shape, a.layers[0], folder, data)
    print(json.dumps({"build": res["build"]}), flush=True)
    place = ["--offload", a.offload]
    if a.fisher_candidates:
        # The Fisher analysis alone (round-to-nearest candidates: no GPTQ inside it), streamed
        # block by block as in `mixq run`, to compare with one float forward+backward.
        res["analyze_s"], res["analyze"] = analyze(a, folder, a.fisher_candidates, work / "sens8b.json",
                                                   out / "analyze.log")
        print(json.dumps({"analyze": res["analyze"], "analyze_s": res["analyze_s"]}), flush=True)
    cands = a.candidates
    run_dir = work / "run8b"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    res["run_s"] = mixq(["run", str(folder), "--budget", a.budgets, "--candidates", cands, "--samples", str(a.samples),
                         "--seqlen", str(a.seqlen), "--windows", str(a.windows), "--checks", str(a.checks),
                         "--out", str(run_dir), *place], out / "run.log")
    ev = json.loads((run_dir / "eval.json").read_text())
    res["run"] = {"analysis_s": ev["analysis"]["wall_s"], "analysis_peak_gib": gib(ev["analysis"]["peak_device_bytes"]),
                  "eval_s": ev.get("eval_s"), "eval_peak_gib": gib(ev.get("peak_device_bytes")),
                  "rows": [{k: r.get(k) for k in ("label", "bpw_blocks", "ppl", "kl", "top1_agree")} for r in ev["rows"]]}
    print(json.dumps({"run": res["run"], "run_s": res["run_s"]}), flush=True)
    low = sorted(float(b) for b in a.budgets.split(","))[0]
    plan = run_dir / ("plan.json" if float(a.budgets.split(",")[0]) == low else f"plan_{low:g}.json")
    ckpt = work / "ckpt8b"
    res["quantize_s"] = mixq(["quantize", str(folder), "--plan", str(plan), "--calib-samples", str(a.calib_samples),
                              "--calib-seqlen", str(a.calib_seqlen), "-o", str(ckpt), "--overwrite", *place],
                             out / "quantize.log")
    doc = json.loads((ckpt / "mixq.json").read_text())
    res["quantize"] = {"peak_gib": gib(doc["run"].get("peak_device_bytes")), "manifest_s": doc["run"]["quantize_s"],
                       "timing": doc["manifest"]["timing"], "bpw_blocks": doc["totals"].get("bpw_blocks"),
                       "file_gib": gib(doc["totals"]["file_bytes"])}
    print(json.dumps({"quantize": res["quantize"], "quantize_s": res["quantize_s"]}), flush=True)
    res["eval_s"] = mixq(["eval", str(ckpt), "--windows", str(a.windows), "--seqlen", str(a.seqlen), "--json",
                          str(out / "eval_ckpt.json"), *place], out / "eval.log")
    ev = json.loads((out / "eval_ckpt.json").read_text())
    res["eval"] = {"peak_gib": gib(ev.get("peak_device_bytes")),
                   "rows": [{k: r.get(k) for k in ("label", "bpw_blocks", "ppl", "kl", "top1_agree")} for r in ev["rows"]]}
    print(json.dumps({"eval": res["eval"], "eval_s": res["eval_s"]}), flush=True)
    if a.reference:
        res["reference"] = fwd_bwd_reference(folder, a.samples, a.seqlen)
        fb = res["reference"]["fwd_bwd_s"]
        res["run_analysis_over_fwd_bwd"] = res["run"]["analysis_s"] / fb
        if res.get("analyze", {}).get("analysis_s"):
            res["fisher_over_fwd_bwd"] = res["analyze"]["analysis_s"] / fb
        print(json.dumps({k: res.get(k) for k in ("reference", "run_analysis_over_fwd_bwd", "fisher_over_fwd_bwd")}),
              flush=True)
    if a.cleanup:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    return res


def run_70b(a, out: Path, work: Path, data: Path) -> dict:
    res: dict = {"shape": a.shape, "points": []}
    place = ["--offload", a.offload]
    for layers in a.layers:
        folder = work / f"llama{a.shape}w-{layers}"
        point = {"layers": layers, "build": build(a.shape, layers, folder, data)}
        sens = work / f"sens70b-{layers}.json"
        point["analyze_s"], analysis = analyze(a, folder, a.candidates, sens, out / f"analyze{layers}.log")
        tab = json.loads(sens.read_text())
        ckpt = work / f"ckpt70b-{layers}"
        point["quantize_s"] = mixq(["quantize", str(folder), "--format", a.quantize_format, "--calib-samples",
                                    str(a.calib_samples), "--calib-seqlen", str(a.calib_seqlen), "-o", str(ckpt),
                                    "--overwrite", *place], out / f"quantize{layers}.log")
        doc = json.loads((ckpt / "mixq.json").read_text())
        point["quantize_peak_gib"] = gib(doc["run"].get("peak_device_bytes"))
        point["analyze_peak_gib"] = analysis["peak_gib"]
        point["analysis_s"] = analysis["analysis_s"]
        point["quantize_inner_s"] = doc["run"].get("quantize_s")
        point["n_units"] = len(tab["units"])
        print(json.dumps(point), flush=True)
        res["points"].append(point)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    return res


def analyze(a, folder: Path, candidates: str, sens: Path, log: Path) -> tuple[float, dict]:
    """`mixq analyze` (Fisher, --samples x --seqlen, blocks placed by --offload) into `sens`:
    its process wall seconds, and the analysis' own seconds and peak GPU GiB as it prints them
    ("analysis 77.7 s ...", "peak cuda memory 5.76 GiB")."""
    wall = mixq(["analyze", str(folder), "--candidates", candidates, "--samples", str(a.samples),
                 "--seqlen", str(a.seqlen), "-o", str(sens), "--offload", a.offload], log)
    found = {"analysis_s": None, "peak_gib": None}
    for line in open(log):
        if found["analysis_s"] is None and line.startswith("analysis ") and " s" in line:
            found["analysis_s"] = float(line.split()[1])
        elif found["peak_gib"] is None and line.startswith("peak ") and "GiB" in line:
            found["peak_gib"] = float(line.split("memory")[1].split("GiB")[0])
    return wall, found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=list(SHAPES))
    p.add_argument("--layers", default="32", help="blocks (comma-separated for the scaling runs)")
    p.add_argument("--scaling", action="store_true", help="analyze + quantize at each --layers count (the default "
                   "for 70b) instead of the whole pipeline")
    p.add_argument("--budgets", default="4.25,3.25")
    p.add_argument("--candidates", default="int3:g128,int4:g128,int8:ch,int3:g128+gptq+rotate,int4:g128+gptq+rotate")
    p.add_argument("--fisher-candidates", default="int3:g128,int4:g128,int8:ch",
                   help="8b: a Fisher-only `mixq analyze` over these first ('' to skip)")
    p.add_argument("--cleanup", action="store_true", help="8b: delete the model and checkpoint at the end")
    p.add_argument("--quantize-format", default="int4:g128+gptq")
    p.add_argument("--samples", type=int, default=8, help="analysis calibration windows")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows")
    p.add_argument("--checks", type=int, default=3)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--offload", default="cpu")
    p.add_argument("--reference", action="store_true", help="also time one resident float forward+backward")
    p.add_argument("--work", default="/tmp/mixq-scale")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    a.layers = [int(x) for x in a.layers.split(",")]
    data = Path(os.environ["MIXQ_DATA_DIR"])
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    scaling = a.scaling or a.shape == "70b"
    res = {**info, **(run_70b(a, out, work, data) if scaling else run_8b(a, out, work, data))}
    path = out / f"scale_{a.shape}{'_scaling' if scaling else ''}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
