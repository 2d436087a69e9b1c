"""int4, int8 and 3-bit codes at 9-16 activation rows: the CUDA GEMV with two B tiles
(`cuda_gemv.qmatmul`; int4: every launch shape of one chunk per buffer or the 4-slot ring,
int8 / 3-bit: 2-16 warps) against the routes that took these batches before it (the Triton
tensor-core kernel, `MIXQ_KERNEL=tc`; the CUDA mma.sync GEMM, `MIXQ_KERNEL=cuda_tc`; for 3-bit
the older Triton kernel, `MIXQ_KERNEL=triton`), the dispatcher as shipped and bf16 cuBLAS, in
one run on a GPU.

    PYTHONPATH=src python3 bench/bench_gemv16.py --out gemv16.json [--batches 9,12,16] [--shapes 14336x4096]

Method: bench_kernels' (CUDA-graph replays of calls rotating over >= 256 MB of weight copies,
random codes and scales, bf16 activations); % = of the device-to-device copy bandwidth
measured in the same run. Formats: int4:g128 on every shape; int4:g128:asym and int4:g64 on
14336x4096 (the heuristic's launch only); int3:g128 and int8:ch on three shapes, int3:g128:asym on one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
from bench_gemm import forced, timed  # noqa: E402
from bench_tc import copies, time_dispatch  # noqa: E402

from mixq.kernels import cuda_gemv, route  # noqa: E402

SHAPES = [(14336, 4096), (4096, 4096), (4096, 14336), (6144, 4096), (28672, 4096), (128256, 4096)]
OTHER = [("int4:g128:asym", 14336, 4096), ("int4:g64", 14336, 4096), ("int3:g128", 14336, 4096), ("int3:g128:asym", 14336, 4096),
         ("int3:g128", 4096, 14336), ("int3:g128", 28672, 4096), ("int8:ch", 14336, 4096), ("int8:ch", 4096, 14336),
         ("int8:ch", 6144, 4096)]
log = bk.log


def gemv_configs(k: int, bits: int = 4) -> list[cuda_gemv.GemvConfig]:
    """The launch shapes the GEMV takes at 9-16 rows: int4 1-2 row tiles, 2-16 warps (at least
    one 128-input chunk each), the register pipeline or the 4-slot ring; int8 / 3-bit 2-16 warps
    (chunks of 128 / 512 inputs)."""
    chunks = -(-k // (512 if bits == 3 else 128))
    if bits != 4:
        return [cuda_gemv.GemvConfig(1, 1, w) for w in (2, 4, 8, 16) if w <= chunks]
    out = []
    for rt, w, st in itertools.product((1, 2), (2, 4, 8, 16), (0, 4)):
        cfg = cuda_gemv.GemvConfig(rt, 1, w, st)
        if w <= chunks and cfg.ring_bytes() <= cuda_gemv.MAX_RING_BYTES:
            out.append(cfg)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gemv16.json")
    ap.add_argument("--batches", default="9,12,16")
    ap.add_argument("--shapes", default=None, help="out x in shapes, e.g. 14336x4096 (default: six Llama-3-8B shapes)")
    ap.add_argument("--no-other", action="store_true", help="skip the other formats")
    ap.add_argument("--other-only", action="store_true", help="only the other formats")
    ap.add_argument("--specs", default=None, help="only these of the other formats, e.g. int3:g128")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    props = torch.cuda.get_device_properties(0)
    results = dict(device=props.name, torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"), rows=[])
    if cuda_gemv.extension() is None:
        log(f"extension unavailable: {cuda_gemv.build_error()}")
        return 1
    copy_bw = bk.copy_bandwidth()
    results["copy_GBps"] = copy_bw / 1e9
    log(f"device {props.name}; copy {copy_bw / 1e9:.0f} GB/s")
    points = [] if args.other_only else [("int4:g128", n, k) for n, k in shapes]
    if not args.no_other:
        points += [o for o in OTHER if args.specs is None or o[0] in args.specs.split(",")]
    for spec, n, k in points:
        kws = copies(spec, n, k)
        lay = kws[0].layout
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            heur = cuda_gemv.pick_config(m, lay)
            bits = lay.bits
            configs = gemv_configs(k) if spec == "int4:g128" else (gemv_configs(k, bits) if bits != 4 else [heur])
            if heur not in configs:
                configs.append(heur)
            sweep = sorted(((timed(kws, lambda kw, c=c: (lambda: cuda_gemv.qmatmul(x, kw, None, c))), c) for c in configs),
                           key=lambda r: r[0])
            t_heur = next(t for t, c in sweep if c == heur)
            t_tc = forced(kws, x, "tc")
            t_triton = forced(kws, x, "triton") if bits == 3 else None
            t_cuda_tc = forced(kws, x, "cuda_tc")
            t_disp = time_dispatch(kws, x)
            t_bf16 = bk.bench_bf16(n, k, m)
            io = bk.io_bytes(kws[0].nbytes(), m, n, k)
            pct = 100 * io / (sweep[0][0] * 1e-6) / copy_bw
            row = dict(spec=spec, n=n, k=k, m=m, io_bytes=io, gemv_best_us=sweep[0][0], gemv_best=sweep[0][1].__dict__,
                       gemv_best_pct_copy=pct, gemv_heuristic_us=t_heur, gemv_heuristic=heur.__dict__,
                       triton_tc_us=t_tc, triton_us=t_triton, cuda_tc_us=t_cuda_tc, dispatch_us=t_disp, dispatch_route=route(kws[0], x),
                       bf16_us=t_bf16, all=[(t, c.__dict__) for t, c in sweep])
            results["rows"].append(row)
            fmt = lambda t: f"{t:6.1f}" if t else "     -"  # noqa: E731
            log(f"{spec:>14} {n:>6}x{k:<5} m={m:2d} gemv best {fmt(sweep[0][0])} ({pct:3.0f}%) {sweep[0][1]} | "
                f"heuristic {fmt(t_heur)} | triton tc {fmt(t_tc)} | triton {fmt(t_triton)} | cuda tc {fmt(t_cuda_tc)} | "
                f"dispatch {fmt(t_disp)} ({row['dispatch_route']}) | bf16 {fmt(t_bf16)}")
            Path(args.out).write_text(json.dumps(results, indent=1))
        del kws
        torch.cuda.empty_cache()
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
