"""Cost of a QuantLinear's online transforms on the GPU: smoothing (x / s) and the random-sign
block Hadamard rotation (one fused kernel, `kernels.transform`), and the bf16 low-rank branch
(x' Rᵀ) Lᵀ, against the same packed matmul without them; and for units sharing an input
(q/k/v of Llama-3-8B, gate/up) run as one `nn.LinearGroup`, the shared transform against
the group without transforms.

    PYTHONPATH=src python3 bench/bench_transforms.py [--out bench_transforms.json]

Timing as in bench_kernels: CUDA-graph replays of calls rotating over >= 256 MB of weight
copies (no L2 reuse, no CPU launch cost), median of 15 replays. Weights are random int4:g128
codes and scales; bf16 activations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (timing helpers, random weights)

from mixq.nn import QuantLinear  # noqa: E402
from mixq.quantizers import UnitTransforms  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (576, 1536)]  # (out, in): Llama-3-8B, SmolLM2
BATCHES = [1, 16]
RANK = 32
VARIANTS = ["plain", "rotate", "smooth+rotate", f"lowrank:{RANK}"]
GROUPS = {"q/k/v 4096 -> 4096+1024+1024": (4096, [4096, 1024, 1024]), "gate/up 4096 -> 2 x 14336": (4096, [14336, 14336])}


def transforms(variant: str, n: int, k: int) -> UnitTransforms | None:
    if variant == "plain":
        return None
    g = torch.Generator().manual_seed(0)
    smooth = torch.rand(k, generator=g) + 0.5 if "smooth" in variant else None
    lowrank = None
    if "lowrank" in variant:
        lowrank = (torch.randn(n, RANK, generator=g) * 0.05, torch.randn(RANK, k, generator=g) * 0.05)
    return UnitTransforms(smooth, 0 if "rotate" in variant else None, None, lowrank)


def bench(n: int, k: int, m: int, variant: str, spec: str = "int4:g128") -> float:
    """Median us per call of QuantLinear(x) (m, k) bf16 under `variant`."""
    tf = transforms(variant, n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    mods: dict[int, QuantLinear] = {}

    def make_call(i):
        if i not in mods:
            mods[i] = QuantLinear(bk.random_weights(spec, n, k), None, tf).cuda()
        mod = mods[i]
        return lambda: mod(x)

    make_call(0)
    return bk.time_rotating_ms(make_call, mods[0].weights().nbytes()) * 1e3


def bench_group(k: int, outs: list[int], m: int, variant: str, spec: str = "int4:g128") -> float:
    """Median us per call of a LinearGroup (fused packed matmul) of units reading one input."""
    from mixq.nn import LinearGroup

    tf = transforms(variant, 1, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    groups: dict[int, LinearGroup] = {}

    def make_call(i):
        if i not in groups:
            groups[i] = LinearGroup([QuantLinear(bk.random_weights(spec, n, k), None, tf).cuda() for n in outs])
        grp = groups[i]
        return lambda: grp(x)

    make_call(0)
    return bk.time_rotating_ms(make_call, groups[0].fused_kw.nbytes()) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.cuda.get_device_name()
    rows = []
    bk.log(f"{dev}; int4:g128 QuantLinear, bf16 activations; us per call (x plain)")
    group_rows = []
    for label, (k, outs) in GROUPS.items():
        for m in BATCHES:
            t = {v: bench_group(k, outs, m, v) for v in ("plain", "smooth+rotate")}
            group_rows.append({"group": label, "batch": m, "us": t})
            bk.log(f"{label:>28} {m:>5} plain {t['plain']:.1f} us, smooth+rotate {t['smooth+rotate']:.1f} us "
                   f"({t['smooth+rotate'] / t['plain']:.2f}x)")
    bk.log(f"{'out x in':>13} {'batch':>5} " + " ".join(f"{v:>26}" for v in VARIANTS))
    for n, k in SHAPES:
        for m in BATCHES:
            t = {v: bench(n, k, m, v) for v in VARIANTS}
            rows.append({"out": n, "in": k, "batch": m, "us": t})
            cells = " ".join(f"{t[v]:>17.1f} ({t[v] / t['plain']:4.2f}x)" for v in VARIANTS)
            bk.log(f"{n:>6} x {k:<6} {m:>5} {cells}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": dev, "format": "int4:g128", "rank": RANK, "rows": rows,
                                              "groups": group_rows},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
