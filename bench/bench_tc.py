"""Block-shape sweep of the tensor-core kernel (`mixq.kernels.triton_tc`) and of the CUDA int4
GEMV (`mixq.kernels.cuda_gemv`) on Llama-3-8B shapes, against bf16 cuBLAS, on a GPU.

    PYTHONPATH=src python3 bench/bench_tc.py --out tc_sweep.json [--workers 12] [--quick]

1. compiles every Triton configuration of the sweep first, in `--workers` processes on small
   weights with the same specialisation (so the timed process only loads cached binaries);
2. times, per (shape, batch), each configuration as CUDA-graph replays of calls rotating
   over >= 256 MB of weight copies (bench_kernels' method) and bf16 F.linear the same way,
   and the dispatcher's own choice (`kernels.qmatmul`);
3. other formats (int4 g64 asym, g32; int8; int3 g64/g128; 3.5-bit mixes are built from
   these) at batch 1, 16, 64 with the heuristic configuration and its alternatives;
4. prints, per point, the best configuration and the heuristic's time; writes everything.
Bytes = codes + scales (+ zeros) + x + y; % = of the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
from bench_env import temp_env  # noqa: E402

from mixq.kernels import cuda_gemv, qmatmul, route, triton_tc  # noqa: E402
from mixq.kernels.triton_tc import TcConfig, default_block_j  # noqa: E402

SHAPES = [(14336, 4096), (4096, 4096), (4096, 14336), (6144, 4096), (28672, 4096)]
BATCHES = [1, 8, 16, 32, 64, 128]
QUICK_BATCHES = [1, 16, 64]
OTHER = ["int4:g64:asym", "int4:g32", "int8:ch", "int3:g64", "int3:g128", "int4:g128:asym"]
log = bk.log


def tc_candidates(m: int, layout, n_sms: int = 132) -> list[TcConfig]:
    """The heuristic's configuration and its neighbours: the other warp count, a 64-row
    weight tile, half and double split-K, 2 and 4 pipeline stages, the other scaling mode."""
    base = triton_tc.pick_config(m, layout, n_sms)
    rep = dataclasses.replace
    out = [base, rep(base, num_warps=12 - base.num_warps), rep(base, block_n=64, num_warps=4),
           rep(base, split_k=max(1, base.split_k // 2)), rep(base, split_k=2 * base.split_k),
           rep(base, num_stages=2), rep(base, num_stages=4), rep(base, post=not base.post)]
    return list(dict.fromkeys(out))


def plan(quick: bool) -> list[tuple[str, int, int, int, list[TcConfig]]]:
    """(spec, n, k, m, configs) of the whole sweep."""
    rows = []
    batches = QUICK_BATCHES if quick else BATCHES
    for n, k in SHAPES[: 3 if quick else len(SHAPES)]:
        lay = bk.random_weights("int4:g128", 16, k, device="cpu").layout
        lay = dataclasses.replace(lay, out_features=n)
        for m in batches:
            rows.append(("int4:g128", n, k, m, tc_candidates(m, lay)))
    others = [(spec, 14336, 4096) for spec in OTHER] + [("int3:g128", 4096, 4096), ("int3:g128", 4096, 14336)]
    for spec, n, k in others:
        lay = dataclasses.replace(bk.random_weights(spec, 16, k, device="cpu").layout, out_features=n)
        for m in (1, 16, 64):
            base = triton_tc.pick_config(m, lay)
            cands = [base, dataclasses.replace(base, post=False), dataclasses.replace(base, num_warps=12 - base.num_warps),
                     dataclasses.replace(base, block_n=64)]
            rows.append((spec, n, k, m, list(dict.fromkeys(cands))))
    return rows


def _compile_worker(jobs):
    torch.cuda.init()
    for spec, k, m, cfg in jobs:
        try:
            kw = bk.random_weights(spec, 256, k)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            triton_tc.qmatmul(x, kw, None, cfg)
        except Exception as e:  # reported again when timed
            print(f"precompile {spec} {k} M={m} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    torch.cuda.synchronize()
    return len(jobs)


def precompile(rows, workers: int) -> float:
    t0 = time.time()
    jobs = [(spec, k, m, cfg) for spec, n, k, m, cfgs in rows for cfg in cfgs]
    # the dispatcher's own config at the real N (split-K depends on N)
    jobs += [(spec, k, m, triton_tc.pick_config(m, dataclasses.replace(
        bk.random_weights(spec, 16, k, device="cpu").layout, out_features=n))) for spec, n, k, m, _ in rows]
    # the dispatcher's choices on the shapes peer_gemv.py times
    for n, k in [(14336, 4096), (4096, 4096), (4096, 14336), (6144, 4096), (28672, 4096), (128256, 4096), (1024, 4096)]:
        lay = dataclasses.replace(bk.random_weights("int4:g128", 16, k, device="cpu").layout, out_features=n)
        jobs += [("int4:g128", k, m, triton_tc.pick_config(m, lay)) for m in (16, 64, 128)]
    jobs = list(dict.fromkeys(jobs))
    chunks = [jobs[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_compile_worker, chunks)
    return time.time() - t0


def time_tc(kws, x, cfg) -> float:
    def make(i):
        kw = kws[i % len(kws)]
        return lambda: triton_tc.qmatmul(x, kw, None, cfg)
    return bk.time_rotating_ms(make, kws[0].nbytes()) * 1e3


def time_dispatch(kws, x) -> float:
    def make(i):
        kw = kws[i % len(kws)]
        return lambda: qmatmul(x, kw)
    return bk.time_rotating_ms(make, kws[0].nbytes()) * 1e3


def copies(spec, n, k):
    kw0 = bk.random_weights(spec, n, k)
    count = max(1, min(24, -(-bk.ROTATE_BYTES // kw0.nbytes())))
    return [kw0] + [bk.random_weights(spec, n, k) for _ in range(count - 1)]


def gemv_sweep(copy_bw, results, quick):
    """CUDA int4 GEMV launch shapes at batch 1 and 8."""
    if cuda_gemv.extension() is None:
        log(f"cuda_gemv unavailable: {cuda_gemv.build_error()}")
        return
    out = []
    for spec, n, k in [("int4:g128", n, k) for n, k in SHAPES[:4]] + [("int3:g128", 14336, 4096), ("int3:g128", 4096, 14336)]:
        kws = copies(spec, n, k)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            heur = cuda_gemv.pick_config(m, kws[0].layout)
            rows = []
            for rt in ((1,) if spec.startswith("int3") else (1, 2)):
                for un in ((1,) if spec.startswith("int3") else (1, 2)):
                    for w in ((4, 8, 16) if quick else (2, 4, 8, 16)):
                        if quick and un == 2:
                            continue
                        cfg = cuda_gemv.GemvConfig(rt, un, w)

                        def make(i, cfg=cfg):
                            kw = kws[i % len(kws)]
                            return lambda: cuda_gemv.qmatmul(x, kw, None, cfg)
                        t = bk.time_rotating_ms(make, kws[0].nbytes()) * 1e3
                        rows.append((t, cfg))
            rows.sort(key=lambda r: r[0])
            th = next(t for t, c in rows if c == heur) if any(c == heur for _, c in rows) else None
            io = bk.io_bytes(kws[0].nbytes(), m, n, k)
            best = rows[0]
            log(f"cuda_gemv {spec} {n:>6}x{k:<5} M={m}: best {best[0]:6.1f} us ({100 * io / (best[0] * 1e-6) / copy_bw:3.0f}%) "
                f"{best[1]} | heuristic {th} {heur}")
            out.append(dict(spec=spec, n=n, k=k, m=m, weight_bytes=kws[0].nbytes(), best_us=best[0], best=dataclasses.asdict(best[1]), heuristic_us=th,
                            heuristic=dataclasses.asdict(heur),
                            all=[(t, dataclasses.asdict(c)) for t, c in rows]))
        del kws
        torch.cuda.empty_cache()
    results["cuda_gemv"] = out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tc_sweep.json")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-gemv", action="store_true")
    ap.add_argument("--phase", choices=["all", "precompile", "time"], default="all",
                    help="precompile only (can run beside other GPU work), time only (from the cache), or both")
    args = ap.parse_args(argv)
    props = torch.cuda.get_device_properties(0)
    results = dict(device=props.name, sm_count=props.multi_processor_count, torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M:%S"))
    rows = plan(args.quick)
    if args.workers > 0 and args.phase != "time":
        results["precompile_s"] = precompile(rows, args.workers)
        log(f"precompiled {sum(len(r[4]) for r in rows)} configurations in {results['precompile_s']:.0f} s")
    if args.phase == "precompile":
        return 0
    copy_bw = bk.copy_bandwidth()
    results["copy_GBps"] = copy_bw / 1e9
    log(f"device {props.name}; copy {copy_bw / 1e9:.0f} GB/s")
    out_path = Path(args.out)
    table = results.setdefault("tc", [])
    try:
        cur = None
        for spec, n, k, m, cfgs in rows:
            if cur != (spec, n, k):
                kws = copies(spec, n, k)
                cur = (spec, n, k)
                bf16 = {}
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            timed = []
            for cfg in cfgs:
                try:
                    timed.append((time_tc(kws, x, cfg), cfg))
                except Exception as e:
                    log(f"  {spec} {n}x{k} M={m} {cfg}: {type(e).__name__}: {str(e)[:160]}")
            if not timed:
                continue
            timed.sort(key=lambda r: r[0])
            t_disp = time_dispatch(kws, x)
            t_old = None
            if m <= 16:  # the older Triton kernels (CUDA-core GEMV / GEMM) on the same weights
                with temp_env({"MIXQ_KERNEL": "triton"}):
                    try:
                        t_old = time_dispatch(kws, x)
                    except Exception as e:
                        log(f"  triton route: {type(e).__name__}: {str(e)[:120]}")
            if spec == "int4:g128" and m not in bf16:
                bf16[m] = bk.bench_bf16(n, k, m)
            io = bk.io_bytes(kws[0].nbytes(), m, n, k)
            pct = lambda t: 100 * io / (t * 1e-6) / copy_bw  # noqa: E731
            heur = triton_tc.pick_config(m, kws[0].layout)
            t_heur = next((t for t, c in timed if c == heur), None)
            row = dict(spec=spec, n=n, k=k, m=m, best_us=timed[0][0], best=dataclasses.asdict(timed[0][1]),
                       heuristic_us=t_heur, dispatch_us=t_disp, dispatch_route=route(kws[0], x), old_triton_us=t_old,
                       bf16_us=bf16.get(m), weight_bytes=kws[0].nbytes(),
                       all=[(t, dataclasses.asdict(c)) for t, c in timed])
            table.append(row)
            log(f"{spec:>15} {n:>6}x{k:<5} M={m:<3} best {timed[0][0]:7.1f} us ({pct(timed[0][0]):3.0f}%) "
                f"{timed[0][1]} | heur {t_heur} | dispatch {t_disp:.1f} ({row['dispatch_route']}) | old triton {t_old}"
                + (f" | bf16 {bf16[m]:.1f}" if m in bf16 else ""))
            out_path.write_text(json.dumps(results, indent=1))
        del kws
        torch.cuda.empty_cache()
        if not args.no_gemv:
            gemv_sweep(copy_bw, results, args.quick)
    finally:
        out_path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
