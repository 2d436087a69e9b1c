"""Cost of a QuantLinear's online transforms on the GPU: smoothing (x / s) and the random-sign
block Hadamard rotation (one fused kernel, `kernels.transform`), and the bf16 low-rank branch
(x' Rᵀ) Lᵀ, against the same packed matmul without them; and for units sharing an input
(q/k/v of Llama-3-8B, gate/up) run as one `nn.LinearGroup`, the shared transform against
the group without transforms.

    PYTHONPATH=src python3 bench/bench_transforms.py [--out bench_transforms.json]

Timing as in bench_kernels: CUDA-graph replays of calls rotating over >= 256 MB of weight
copies (no L2 reuse, no CPU launch cost), median of 15 replays. Weights are random int4:g128
codes and scales; bf16 activations.

The last table times the chain a decode step runs, batch 1, with programmatic dependent launch
as the decode loop has it (MIXQ_PDL=1 there): residual add + RMSNorm, then the units' matmul,
plain; with the smoothing + rotation as its own kernel between them; and, for the groups fed
by a norm (q/k/v, gate/up), with the transform inside the RMSNorm kernel
(`decode_ops.add_rms_norm(..., transform)`, what `StaticDecoder` runs). The overhead is the
extra time of the chain over the plain chain, against the plain matmul's own time in a chain
of matmuls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (timing helpers, random weights)
from bench_env import temp_env  # noqa: E402

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


CHAIN_UNITS = {"q/k/v 4096 -> 4096+1024+1024": (4096, [4096, 1024, 1024], True),
               "gate/up 4096 -> 2 x 14336": (4096, [14336, 14336], True),
               "o 4096 -> 4096": (4096, [4096], False), "down 14336 -> 4096": (14336, [4096], False)}


def bench_chain(k: int, outs: list[int], variant: str, where: str, spec: str = "int4:g128") -> float:
    """us per step of (residual add + RMSNorm -> LinearGroup) at batch 1, under PDL. where:
    "kernel" = the group transforms its input itself; "norm" = the RMSNorm kernel applies the
    group's shared transform (`transformed=True`); "none" = no RMSNorm (matmuls only)."""
    from mixq.kernels import decode_ops as ops
    from mixq.nn import LinearGroup

    tf = transforms(variant, 1, k)
    h, delta = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    groups: dict[int, LinearGroup] = {}

    def make_call(i):
        if i not in groups:
            groups[i] = LinearGroup([QuantLinear(bk.random_weights(spec, n, k), None, tf).cuda() for n in outs])
        grp = groups[i]
        shared = grp.shared_transform() if where == "norm" else None

        def call():
            if where == "none":
                return grp(h)
            _, r = ops.add_rms_norm(h, delta, w, 1e-5, shared)
            return grp(r, transformed=shared is not None)
        return call

    make_call(0)
    return bk.time_rotating_ms(make_call, groups[0].fused_kw.nbytes()) * 1e3


def chain_rows() -> list[dict]:
    rows = []
    bk.log("decode-step chain, batch 1, PDL: us per step (transform overhead / plain matmul)")
    with temp_env({"MIXQ_PDL": "1"}):
        for label, (k, outs, fed_by_norm) in CHAIN_UNITS.items():
            t = {"matmul": bench_chain(k, outs, "plain", "none"), "norm+matmul": bench_chain(k, outs, "plain", "kernel"),
                 "norm+transform+matmul": bench_chain(k, outs, "smooth+rotate", "kernel")}
            if fed_by_norm:
                t["norm(transform)+matmul"] = bench_chain(k, outs, "smooth+rotate", "norm")
            over = {key: (t[key] - t["norm+matmul"]) / t["matmul"] for key in t if "transform" in key}
            rows.append({"unit": label, "us": t, "overhead_vs_matmul": over})
            bk.log(f"{label:>28} matmul {t['matmul']:.1f}, norm+matmul {t['norm+matmul']:.1f}, "
                   + ", ".join(f"{key} {t[key]:.1f} ({100 * over[key]:+.0f}%)" for key in over))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--chain-only", action="store_true", help="only the decode-step chain table")
    args = ap.parse_args(argv)
    dev = torch.cuda.get_device_name()
    rows = []
    bk.log(f"{dev}; int4:g128 QuantLinear, bf16 activations; us per call (x plain)")
    group_rows = []
    chain = chain_rows()
    for label, (k, outs) in ({} if args.chain_only else GROUPS).items():
        for m in BATCHES:
            t = {v: bench_group(k, outs, m, v) for v in ("plain", "smooth+rotate")}
            group_rows.append({"group": label, "batch": m, "us": t})
            bk.log(f"{label:>28} {m:>5} plain {t['plain']:.1f} us, smooth+rotate {t['smooth+rotate']:.1f} us "
                   f"({t['smooth+rotate'] / t['plain']:.2f}x)")
    bk.log(f"{'out x in':>13} {'batch':>5} " + " ".join(f"{v:>26}" for v in VARIANTS))
    for n, k in ([] if args.chain_only else SHAPES):
        for m in BATCHES:
            t = {v: bench(n, k, m, v) for v in VARIANTS}
            rows.append({"out": n, "in": k, "batch": m, "us": t})
            cells = " ".join(f"{t[v]:>17.1f} ({t[v] / t['plain']:4.2f}x)" for v in VARIANTS)
            bk.log(f"{n:>6} x {k:<6} {m:>5} {cells}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": dev, "format": "int4:g128", "rank": RANK, "rows": rows,
                                              "groups": group_rows, "chain": chain},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
