"""A peer beside mixq's W8A8: llm-compressor's W8A8 recipe (SmoothQuant 0.8 + GPTQ, int8 weights
per channel, int8 dynamic per-token activations) on SmolLM2-135M, scored on the same windows
as `bench_actkv.py` (BENCHMARKS.md section 7).

llm-compressor lives in its own virtual environment (its dependencies would otherwise pull a
CUDA build of torch), outside the repository:

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    PYTHONPATH=src python3 bench/bench_llmcompressor.py --python /tmp/llmc/bin/python \
        --windows 40 --calib-samples 32 --out bench/results/llmc_w8a8.json

This script runs twice: under mixq's python it writes the token windows (WikiText-2 test,
the first --windows windows of 512; calibration: --calib-samples random windows of
wikitext2-valid, seed 0, exactly mixq's draw) and the float model's directory to a file,
then runs itself under --python in `peer` mode, which imports llm-compressor and
transformers only (no mixq): it quantizes a copy of the float model with `oneshot` and
scores KL(float || quantized) per token, perplexity and top-1 agreement the way mixq does
(float32 log-softmax of the logits, next-token positions 1..L-1 of every window).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prepare(args) -> None:
    import torch

    from mixq import api
    from mixq.data import load_text, token_windows
    from mixq.models import load_model
    from mixq.models.load import cache_dir

    lm = load_model("smollm2-135m", device="cpu", offload="none")
    windows = token_windows(lm.encode, load_text("wikitext2"), args.seqlen, args.windows)
    calib, desc = api.calibration_data(lm, "wikitext2-valid", args.calib_samples, args.seqlen, 0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "windows.pt"
        torch.save({"eval": windows, "calib": calib, "calib_desc": desc,
                    "model_dir": str(cache_dir() / "models" / "smollm2-135m")}, data)
        cmd = [args.python, __file__, "peer", "--data", str(data), "--threads", str(args.threads),
               "--out", args.out]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def peer(args) -> None:
    import copy

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    d = torch.load(args.data)
    model = AutoModelForCausalLM.from_pretrained(d["model_dir"], dtype=torch.float32).eval()
    quant = copy.deepcopy(model)
    calib = d["calib"]
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    recipe = [SmoothQuantModifier(smoothing_strength=0.8),
              GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    t0 = time.perf_counter()
    oneshot(model=quant, dataset=ds, recipe=recipe, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False)
    t_quant = time.perf_counter() - t0
    quant.eval()
    scheme = getattr(quant.model.layers[0].self_attn.q_proj, "quantization_scheme", None)
    nll_f = nll_q = kl = 0.0
    agree = n_tok = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in d["eval"].split(1):
            lf = torch.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), -1)
            lq = torch.log_softmax(quant(ids, use_cache=False).logits[:, :-1].float(), -1)
            tgt = ids[:, 1:].unsqueeze(-1)
            nll_f -= float(lf.gather(-1, tgt).double().sum())
            nll_q -= float(lq.gather(-1, tgt).double().sum())
            kl += float((lf.exp() * (lf - lq)).sum(-1).double().sum())
            agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
            n_tok += tgt.numel()
    row = {"label": "llm-compressor W8A8 (SmoothQuant 0.8 + GPTQ)", "ppl": math.exp(nll_q / n_tok),
           "ref_ppl": math.exp(nll_f / n_tok), "kl": kl / n_tok, "top1_agree": agree / n_tok, "n_tokens": n_tok,
           "quantize_s": t_quant, "eval_s": time.perf_counter() - t0, "threads": args.threads,
           "calibration": d["calib_desc"], "scheme": str(scheme)}
    print(json.dumps(row, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="prepare", choices=["prepare", "peer"])
    ap.add_argument("--python", default=None, help="the python of llm-compressor's virtual environment")
    ap.add_argument("--data", default=None, help="(peer mode) the windows file")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/llmc_w8a8.json")
    args = ap.parse_args()
    if args.mode == "peer":
        peer(args)
    else:
        if not args.python:
            sys.exit("give --python, the interpreter of llm-compressor's virtual environment")
        prepare(args)


if __name__ == "__main__":
    main()
