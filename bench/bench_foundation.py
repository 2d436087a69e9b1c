"""Foundation benchmark: one format everywhere (round to nearest), SmolLM2-135M on
WikiText-2 test and the CIFAR-10 ResNets on the evaluation half of the test images.

    .venv/bin/python bench/bench_foundation.py --windows 40 --seqlen 512 --limit 500 --out bench/results

Prints the tables (the same ones `mixq eval` prints) and writes eval artifacts to --out.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from mixq import api
from mixq.artifacts import write_artifact
from mixq.cli import eval_table
from mixq.progress import TqdmProgress

LM_FORMATS = ["int8:ch", "int4:g64", "int4:g64:asym", "int3:g64", "int2:g64", "fp8_e4m3:ch",
              "mxfp8", "mxfp6", "mxfp4", "nvfp4", "nf4:g64"]
CNN_FORMATS = LM_FORMATS
TASKS = ["piqa", "arc_easy", "hellaswag", "lambada"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--limit", type=int, default=500, help="examples per zero-shot task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--skip-cnn", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    progress = TqdmProgress()
    print(f"# mixq foundation benchmark, {datetime.date.today()}")
    if not args.skip_cnn:
        for name in ("resnet20-cifar10", "resnet56-cifar10"):
            t0 = time.perf_counter()
            res = api.evaluate(name, formats=CNN_FORMATS, progress=progress)
            write_artifact(out / f"foundation_{name}.json", "eval", api.EVAL_SCHEMA, res)
            print(f"\n{eval_table(res)}\n({time.perf_counter() - t0:.0f} s)")
    if not args.skip_lm:
        t0 = time.perf_counter()
        tasks = [t for t in args.tasks.split(",") if t]
        res = api.evaluate("smollm2-135m", formats=LM_FORMATS, data="wikitext2", seqlen=args.seqlen,
                           windows=args.windows, tasks=tasks, limit=args.limit, progress=progress)
        write_artifact(out / "foundation_smollm2.json", "eval", api.EVAL_SCHEMA, res)
        print(f"\n{eval_table(res)}\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
