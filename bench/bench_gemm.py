"""Launch-shape sweep of the CUDA int4 tensor-core GEMM (`mixq.kernels.cuda_gemv.gemm`) on
Llama-3-8B shapes, against the Triton tensor-core kernel (`MIXQ_KERNEL=tc`, its own heuristic),
the CUDA GEMV at batch 1/8 and bf16 cuBLAS, timed in one run on a GPU.

    PYTHONPATH=src python3 bench/bench_gemm.py --out gemm.json [--quick]

On sm_90 the sweep includes the Hopper kernel's launches (`GemmConfig.wgmma`) and reports its
heuristic (`pick_wgmma_config`) beside the mma.sync kernel's.

Method: bench_kernels' (CUDA-graph replays of calls rotating over >= 256 MB of weight copies,
random codes and scales, bf16 activations). Bytes = codes + scales (+ zeros) + x + y; % = of
the device-to-device copy bandwidth measured in the same run. Per (format, shape, batch) it
prints the best configuration, the heuristic's (`pick_gemm_config`), the Triton kernel, the
dispatcher as shipped and bf16, and writes every timing to the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
from bench_env import temp_env  # noqa: E402
from bench_tc import copies, time_dispatch  # noqa: E402

from mixq.kernels import cuda_gemv, route  # noqa: E402

SHAPES = [(14336, 4096), (4096, 4096), (4096, 14336)]
BATCHES = [1, 8, 16, 32, 64, 128]
OTHER = [("int4:g128:asym", 14336, 4096), ("int4:g64:asym", 14336, 4096), ("int4:g32", 14336, 4096),
         ("int4:g128", 6144, 4096), ("int4:g128", 28672, 4096), ("int4:g128", 128256, 4096)]
log = bk.log


def candidates(m: int, layout, quick: bool) -> list[cuda_gemv.GemmConfig]:
    """The heuristic's configuration and a grid around it: both row tiles, 4/8 warps (2 too
    unless quick), split K from 1 to 16 or stream-K, and half the activation tiles."""
    base = cuda_gemv.pick_gemm_config(m, layout)
    out = [base]
    nts = sorted({base.n_tiles, max(1, base.n_tiles // 2)})
    warps = (4, 8) if quick else (2, 4, 8)
    for nt, rt, w, s in itertools.product(nts, (1, 2), warps, (1, 2, 4, 8, 16)):
        out.append(cuda_gemv.GemmConfig(rt, nt, w, s))
    for nt, rt, w in itertools.product(nts, (1, 2), (4, 8)):  # stream-K: one wave, even chunks per block
        out.append(cuda_gemv.GemmConfig(rt, nt, w, stream_k=True))
    if cuda_gemv.wgmma_available():  # the Hopper kernel: N = 16..128 rows per tile, 1-2 warpgroups
        nt = 2
        while nt < 16 and 8 * nt < m:
            nt *= 2
        for t, w in itertools.product(sorted({nt, max(2, nt // 2)}), (4, 8)):
            out.append(cuda_gemv.GemmConfig(1, t, w, stream_k=True, wgmma=True))
            for s in (1, 2, 4, 8):
                out.append(cuda_gemv.GemmConfig(1, t, w, s, wgmma=True))
    return list(dict.fromkeys(out))


def timed(kws, make_fn) -> float:
    def make(i):
        kw = kws[i % len(kws)]
        return make_fn(kw)
    return bk.time_rotating_ms(make, kws[0].nbytes()) * 1e3


def forced(kws, x, kernel: str, env: dict | None = None) -> float | None:
    """The dispatcher with MIXQ_KERNEL=kernel (and any other variables of `env`) set."""
    env = {"MIXQ_KERNEL": kernel, **(env or {})}
    with temp_env(env):
        try:
            return time_dispatch(kws, x)
        except Exception as e:  # a route that does not take this point
            log(f"  {kernel}: {type(e).__name__}: {str(e)[:160]}")
            return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gemm.json")
    ap.add_argument("--quick", action="store_true", help="fewer warps/splits in the grid")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernel (saves its compile time)")
    ap.add_argument("--other-only", action="store_true", help="only the other formats and shapes (batch 16, 64)")
    ap.add_argument("--lean", action="store_true",
                    help="only the CUDA GEMM's grid and bf16: no Triton, GEMV sweep, PDL timings or other formats")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    props = torch.cuda.get_device_properties(0)
    results = dict(device=props.name, sm_count=props.multi_processor_count, torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M:%S"), rows=[])
    t0 = time.time()
    if cuda_gemv.extension() is None:
        log(f"extension unavailable: {cuda_gemv.build_error()}")
        return 1
    results["build_s"] = time.time() - t0
    copy_bw = bk.copy_bandwidth()
    results["copy_GBps"] = copy_bw / 1e9
    log(f"device {props.name}; copy {copy_bw / 1e9:.0f} GB/s; extension ready in {results['build_s']:.0f} s")
    out_path = Path(args.out)
    points = [] if args.other_only else [("int4:g128", n, k, m) for n, k in SHAPES for m in batches]
    if not args.lean or args.other_only:
        points += [(spec, n, k, m) for spec, n, k in OTHER for m in (16, 64)]
    cur = None
    try:
        for spec, n, k, m in points:
            if cur != (spec, n, k):
                kws = None
                torch.cuda.empty_cache()
                kws = copies(spec, n, k)
                cur = (spec, n, k)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            lay = kws[0].layout
            rows = []
            for cfg in candidates(m, lay, args.quick or spec != "int4:g128"):
                try:
                    rows.append((timed(kws, lambda kw, cfg=cfg: (lambda: cuda_gemv.gemm(x, kw, None, cfg))), cfg))
                except Exception as e:
                    log(f"  {cfg}: {type(e).__name__}: {str(e)[:160]}")
            rows.sort(key=lambda r: r[0])
            heur = cuda_gemv.pick_gemm_config(m, lay)
            t_heur = next((t for t, c in rows if c == heur), None)
            heur_wg = cuda_gemv.pick_wgmma_config(m, lay) if cuda_gemv.wgmma_available() and m > 16 else None
            t_heur_wg = None
            if heur_wg is not None:
                t_heur_wg = next((t for t, c in rows if c == heur_wg), None)
                if t_heur_wg is None:
                    t_heur_wg = timed(kws, lambda kw: (lambda: cuda_gemv.gemm(x, kw, None, heur_wg)))
            gemv_max = cuda_gemv.max_batch(lay)
            t_gemv = forced(kws, x, "cuda_gemv") if m <= gemv_max else None
            gemv_rows = []
            if m <= gemv_max and spec == "int4:g128" and not args.lean:  # the GEMV's launch shapes
                for rt, w, st in itertools.product((1, 2), (2, 4, 8, 16), (0, 4)):
                    gcfg = cuda_gemv.GemvConfig(rt, 1, w, st)
                    if gcfg.ring_bytes() > cuda_gemv.MAX_RING_BYTES:
                        continue
                    gemv_rows.append((timed(kws, lambda kw, c=gcfg: (lambda: cuda_gemv.qmatmul(x, kw, None, c))), gcfg))
                gemv_rows.sort(key=lambda r: r[0])
                log(f"  gemv best {gemv_rows[0][0]:.1f} {gemv_rows[0][1]} | heuristic {cuda_gemv.pick_config(m, lay)}")
            # with programmatic dependent launch: consecutive calls of the same kernel overlap
            lean_skip = args.lean or m > gemv_max
            t_gemv_pdl = None if lean_skip else forced(kws, x, "cuda_gemv", {"MIXQ_PDL": "1"})
            t_heur_pdl = None if args.lean else forced(kws, x, "cuda_tc", {"MIXQ_PDL": "1"})
            t_tc = None if (args.no_triton or args.lean) else forced(kws, x, "tc")
            t_disp = time_dispatch(kws, x)
            t_bf16 = bk.bench_bf16(n, k, m)
            io = bk.io_bytes(kws[0].nbytes(), m, n, k)
            pct = lambda t: 100 * io / (t * 1e-6) / copy_bw if t else float("nan")  # noqa: E731
            row = dict(spec=spec, n=n, k=k, m=m, weight_bytes=kws[0].nbytes(), io_bytes=io,
                       best_us=rows[0][0] if rows else None, best=dataclasses.asdict(rows[0][1]) if rows else None,
                       heuristic_us=t_heur, heuristic=dataclasses.asdict(heur), gemv_us=t_gemv, triton_tc_us=t_tc,
                       wgmma_heuristic_us=t_heur_wg,
                       wgmma_heuristic=dataclasses.asdict(heur_wg) if heur_wg else None,
                       heuristic_pdl_us=t_heur_pdl, gemv_pdl_us=t_gemv_pdl,
                       gemv_all=[(t, dataclasses.asdict(c)) for t, c in gemv_rows],
                       dispatch_us=t_disp, dispatch_route=route(kws[0], x), bf16_us=t_bf16,
                       all=[(t, dataclasses.asdict(c)) for t, c in rows])
            sk = [t for t, c in rows if c.stream_k and not c.wgmma]
            row["best_split_us"] = min((t for t, c in rows if not c.stream_k and not c.wgmma), default=None)
            row["best_stream_k_us"] = min(sk, default=None)
            wg = [(t, c) for t, c in rows if c.wgmma]
            row["best_wgmma_us"] = wg[0][0] if wg else None
            row["best_wgmma"] = dataclasses.asdict(wg[0][1]) if wg else None
            results["rows"].append(row)
            f = lambda t: f"{t:6.1f}" if t else "     -"  # noqa: E731
            log(f"{spec} {n}x{k} M={m:<3} best {f(row['best_us'])} ({pct(row['best_us']):3.0f}%) "
                f"{rows[0][1] if rows else ''} | heur {f(t_heur)} (PDL {f(t_heur_pdl)}) | gemv {f(t_gemv)} "
                f"(PDL {f(t_gemv_pdl)}) | triton tc {f(t_tc)} | "
                f"dispatch {f(t_disp)} ({row['dispatch_route']}) | bf16 {f(t_bf16)} | x bf16 {t_bf16 / t_disp:4.2f} | "
                f"best split K {f(row['best_split_us'])}, stream-K {f(row['best_stream_k_us'])}, "
                f"wgmma {f(row['best_wgmma_us'])} {wg[0][1] if wg else ''} (heuristic {f(t_heur_wg)})")
            out_path.write_text(json.dumps(results, indent=1))
    finally:
        out_path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
