"""Int4 GEMV at batch 1..8: the CUDA kernel (`mixq.kernels.cuda_gemv`) against bf16
`F.linear` (cuBLAS) and the Triton kernel, on Llama-3-8B shapes (see bench/KERNEL_NOTES.md).

    PYTHONPATH=src python3 bench/bench_gemv.py --out bench_gemv.json [--no-sweep]

1. builds the extension (timed); 2. checks correctness: every launch shape, bf16/fp16,
sym/asym, groups 32/64/128, odd shapes, batch 1..8, bias, NaN-poisoned outputs, against a
float32 reference (||out - ref|| / ||ref|| < 1e-2, every output written); 3. times, as
CUDA-graph replays of calls rotating over >= 256 MB of weight copies (bench_kernels'
method), the launch-shape sweep, then the heuristic config vs bf16 and Triton; 4. prints a
short table. Bytes = codes + scales (+ zeros) + x + y; % = of the measured D2D copy bandwidth.
Exit code 1 if any correctness check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (timing helpers, random weights, copy bandwidth)
from bench_env import temp_env  # noqa: E402

from mixq import formats  # noqa: E402
from mixq.kernels import cuda_gemv, dequantize, prepack  # noqa: E402
from mixq.kernels import qmatmul as dispatch_qmatmul  # noqa: E402
from mixq.kernels import triton_qmm  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]  # (out, in)
BATCHES = [1, 2, 4, 8]
QUICK_BATCHES = [1, 4, 8]
REL_TOL = 1e-2
log = bk.log


# --------------------------------------------------------------------------- correctness


def _check_one(spec, n, k, m, dtype, cfg, bias, results) -> bool:
    """One random case; cfg None: the heuristic launch shape."""
    fmt = formats.parse(spec)
    kw = prepack(fmt.quantize(torch.randn(n, k, device="cuda")), fmt)
    cfg = cfg or cuda_gemv.pick_config(m, kw.layout)
    w_ref = dequantize(kw)  # (n, k) float32
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    ref = x.float() @ w_ref.T + (b.float() if bias else 0.0)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    y = cuda_gemv.qmatmul(x, kw, b, cfg, out=out)
    torch.cuda.synchronize()
    written = bool(torch.isfinite(y).all())
    err = float((y.float() - ref).norm() / ref.norm()) if written else float("inf")
    ok = written and err < REL_TOL and y.data_ptr() == out.data_ptr()
    results.append(dict(spec=spec, n=n, k=k, m=m, dtype=str(dtype), cfg=cfg.__dict__, bias=bias, err=err, ok=ok))
    if not ok:
        log(f"  FAIL {spec} {n}x{k} m={m} {dtype} {cfg} bias={bias}: written={written} rel err {err:.2e}")
    return ok


def check(results: dict, quick: bool = False) -> bool:
    rows: list[dict] = []
    torch.manual_seed(0)
    configs = [cuda_gemv.GemvConfig(r, u, w) for r in (1, 2) for u in (1, 2) for w in ((3,) if quick else (1, 3, 16))]
    configs += [cuda_gemv.GemvConfig(r, 1, w, st) for r in (1, 2) for w in ((3,) if quick else (1, 3, 8)) for st in (4, 8)]
    ok = True
    # every launch shape on odd shapes (tail rows, tail chunk: 576 = 4.5 chunks of 128)
    for spec, (n, k) in [("int4:g64", (192, 576)), ("int4:g128", (200, 1088)), ("int4:g128:asym", (192, 576)),
                         ("int4:g64:asym", (200, 1088)), ("int4:g32", (72, 544))]:
        for cfg in configs:
            for m in (1, 3, 8):
                for dtype in (torch.bfloat16, torch.float16):
                    ok &= _check_one(spec, n, k, m, dtype, cfg, bias=(m == 3), results=rows)
    # realistic sizes, heuristic config, every batch
    for spec, (n, k) in [("int4:g128", (4096, 4096)), ("int4:g128", (1024, 14336)), ("int4:g64", (4096, 4096)),
                         ("int4:g128:asym", (4096, 4096)), ("int4:ch", (512, 4096))]:
        for m in ((1, 2, 5, 8) if quick else range(1, 9)):
            for dtype in (torch.bfloat16, torch.float16):
                ok &= _check_one(spec, n, k, m, dtype, None, bias=(m == 2), results=rows)
    # the dispatcher takes this kernel for int4 (opt-in for now) and agrees with it; 3-D input
    os.environ["MIXQ_CUDA_GEMV"] = "1"
    kw = prepack(formats.parse("int4:g128").quantize(torch.randn(320, 1024, device="cuda")), "int4:g128")
    x = torch.randn(2, 3, 1024, device="cuda", dtype=torch.bfloat16)
    a = dispatch_qmatmul(x, kw)
    bb = cuda_gemv.qmatmul(x.reshape(6, 1024), kw).reshape(2, 3, 320)
    same = bool(torch.equal(a, bb)) and cuda_gemv.preferred(kw.layout, x.reshape(6, 1024))
    ok &= same
    # CUDA-graph capture of the kernel
    kw = prepack(formats.parse("int4:g128").quantize(torch.randn(4096, 4096, device="cuda")), "int4:g128")
    xg = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    y0 = cuda_gemv.qmatmul(xg, kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = cuda_gemv.qmatmul(xg, kw)
    yg.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    graph_ok = bool(torch.equal(yg, y0))
    ok &= graph_ok
    n_fail = sum(not r["ok"] for r in rows)
    max_err = max(r["err"] for r in rows)
    log(f"correctness: {len(rows)} cases, {n_fail} failed, max rel err {max_err:.2e}; dispatcher "
        f"{'ok' if same else 'MISMATCH'}; graph replay {'ok' if graph_ok else 'MISMATCH'}")
    results["check"] = dict(cases=len(rows), failed=n_fail, max_rel_err=max_err, dispatcher_ok=same,
                            graph_ok=graph_ok, failures=[r for r in rows if not r["ok"]][:20])
    return ok


# --------------------------------------------------------------------------- timing


class Copies:
    """Random weight copies of one shape/format totalling >= 256 MB (at most 24)."""

    def __init__(self, spec: str, n: int, k: int):
        first = bk.random_weights(spec, n, k)
        self.nbytes = first.nbytes()
        count = max(1, min(24, -(-bk.ROTATE_BYTES // self.nbytes)))
        self.kws = [first] + [bk.random_weights(spec, n, k) for _ in range(count - 1)]

    def time_us(self, fn) -> float:
        """fn(kw) -> closure; median us per call over rotating copies."""
        return bk.time_rotating_ms(lambda i: fn(self.kws[i % len(self.kws)]), self.nbytes) * 1e3


def bf16_us(n: int, k: int, m: int, cache: dict) -> float:
    if (n, k) not in cache:
        count = max(1, min(24, -(-bk.ROTATE_BYTES // (n * k * 2))))
        cache.clear()
        cache[(n, k)] = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
    ws = cache[(n, k)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return bk.time_rotating_ms(lambda i: (lambda w=ws[i % len(ws)]: torch.nn.functional.linear(x, w)),
                               n * k * 2) * 1e3


def gbps(nbytes: int, m: int, n: int, k: int, us: float) -> float:
    return bk.io_bytes(nbytes, m, n, k) / (us * 1e-6) / 1e9


def sweep_configs(k: int, quick: bool = False) -> list:
    """Register-pipeline shapes, then the shared-memory ring (stages 4 and 8) where it fits."""
    chunks = -(-k // 128)
    if quick:
        regs = [cuda_gemv.GemvConfig(r, u, w) for r, u in ((1, 1), (2, 1), (1, 2)) for w in (1, 4, 8, 16)]
        warps = (2, 4, 8, 16)
    else:
        regs = [cuda_gemv.GemvConfig(r, u, w) for r in (1, 2) for u in (1, 2) for w in (1, 2, 4, 8, 16)
                if w <= chunks]
        warps = (1, 2, 4, 8, 16)
    rings = [cuda_gemv.GemvConfig(r, 1, w, st) for r in (1, 2) for w in warps for st in (4, 8)
             if w <= chunks and cuda_gemv.GemvConfig(r, 1, w, st).ring_bytes() <= cuda_gemv.MAX_RING_BYTES]
    return regs + rings


def bench(copy_bw: float, results: dict, do_sweep: bool, quick: bool = False,
          sweep_batches: tuple[int, ...] | None = None) -> list[dict]:
    rows, sweep_rows, cache = [], [], {}
    sweep_batches = sweep_batches or ((1,) if quick else (1, 8))
    floors = results.setdefault("read_floor", [])
    for n, k in SHAPES:
        cp = Copies("int4:g128", n, k)
        # what a plain read of the same codes costs in this harness: torch's sum over them
        t_read = cp.time_us(lambda kw: (lambda: kw.codes.sum(dtype=torch.int32)))
        floors.append(dict(shape=f"{n}x{k}", codes_bytes=cp.kws[0].codes.numel() * 4, us=t_read,
                           pct_copy=100 * cp.kws[0].codes.numel() * 4 / (t_read * 1e-6) / copy_bw))
        log(f"read floor {n}x{k}: torch sum over the codes {t_read:.1f} us ({floors[-1]['pct_copy']:.0f}% of copy)")
        for m in (QUICK_BATCHES if quick else BATCHES):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            heur = cuda_gemv.pick_config(m, cp.kws[0].layout)
            t_cuda = cp.time_us(lambda kw: (lambda: cuda_gemv.qmatmul(x, kw, None, heur)))
            best_cfg, best_t = heur, t_cuda
            if do_sweep and m in sweep_batches:
                for cfg in sweep_configs(k, quick):
                    t = cp.time_us(lambda kw: (lambda: cuda_gemv.qmatmul(x, kw, None, cfg)))
                    sweep_rows.append(dict(shape=f"{n}x{k}", batch=m, cfg=cfg.__dict__, us=t))
                    if t < best_t:
                        best_cfg, best_t = cfg, t
                log(f"  sweep {n}x{k} m={m}: best {best_t:.1f} us {best_cfg} | heuristic {t_cuda:.1f} us {heur}")
            t_tri = cp.time_us(lambda kw: (lambda: triton_qmm.qmatmul(x, kw)))
            t_bf = bf16_us(n, k, m, cache)
            g = gbps(cp.nbytes, m, n, k, t_cuda)
            row = dict(fmt="int4:g128", shape=f"{n}x{k}", batch=m, us=t_cuda, GBps=g, pct_copy=100 * g * 1e9 / copy_bw,
                       config=heur.__dict__, best_us=best_t, best_config=best_cfg.__dict__,
                       best_pct_copy=100 * gbps(cp.nbytes, m, n, k, best_t) * 1e9 / copy_bw,
                       triton_us=t_tri, bf16_us=t_bf, vs_triton=t_tri / t_cuda, vs_bf16=t_bf / t_cuda)
            rows.append(row)
            log(f"int4:g128 {n:>6}x{k:<5} m={m} {t_cuda:7.1f} us {g:6.0f} GB/s ({row['pct_copy']:3.0f}%) | "
                f"best {best_t:7.1f} us ({row['best_pct_copy']:3.0f}%) | triton {t_tri:7.1f} | bf16 {t_bf:7.1f}")
        del cp
        torch.cuda.empty_cache()
    cache.clear()
    # other int4 variants at batch 1 and 8 (heuristic config)
    for spec in ("int4:g64", "int4:g128:asym"):
        for n, k in SHAPES[1:2] if quick else SHAPES[1:3]:
            cp = Copies(spec, n, k)
            for m in ((1,) if quick else (1, 8)):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                t_cuda = cp.time_us(lambda kw: (lambda: cuda_gemv.qmatmul(x, kw)))
                t_tri = cp.time_us(lambda kw: (lambda: triton_qmm.qmatmul(x, kw)))
                g = gbps(cp.nbytes, m, n, k, t_cuda)
                rows.append(dict(fmt=spec, shape=f"{n}x{k}", batch=m, us=t_cuda, GBps=g, pct_copy=100 * g * 1e9 / copy_bw,
                                 triton_us=t_tri, vs_triton=t_tri / t_cuda))
                log(f"{spec:>14} {n:>6}x{k:<5} m={m} {t_cuda:7.1f} us {g:6.0f} GB/s ({rows[-1]['pct_copy']:3.0f}%) | "
                    f"triton {t_tri:7.1f} us (x{t_tri / t_cuda:.2f})")
            del cp
    # launch floor: the same kernel on a weight of 0.26 MB (128 x 4096), graph-replayed
    cp = Copies("int4:g128", 128, 4096)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    floor = cp.time_us(lambda kw: (lambda: cuda_gemv.qmatmul(x, kw)))
    results["floor_us_128x4096"] = floor
    log(f"launch floor (128x4096 int4:g128, m=1): {floor:.2f} us per call")
    results["table"], results["sweep"] = rows, sweep_rows
    return rows


def int3_warps(copy_bw: float, results: dict, batches: tuple[int, ...], warps: tuple[int, ...]) -> None:
    """The 3-bit GEMV (int3:g128, one row tile) at each warps-per-block count of `warps`, on
    SHAPES: the launch shapes pick_config chooses among. Both kernels (the post-scaled one, and
    the pre-scaled one with MIXQ_GEMV3_POST=0)."""
    rows = results.setdefault("int3_warps", [])
    for n, k in SHAPES:
        cp = Copies("int3:g128", n, k)
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for post in ("1", "0"):
                for w in warps:
                    cfg = cuda_gemv.GemvConfig(1, 1, w)
                    with temp_env({"MIXQ_GEMV3_POST": post}):
                        t = cp.time_us(lambda kw: (lambda: cuda_gemv.qmatmul(x, kw, config=cfg)))
                    g = gbps(cp.nbytes, m, n, k, t)
                    rows.append(dict(fmt="int3:g128", shape=f"{n}x{k}", batch=m, post_scaled=post == "1", warps=w,
                                     us=t, GBps=g, pct_copy=100 * g * 1e9 / copy_bw))
                    log(f"int3:g128 {n:>6}x{k:<5} m={m} {'post' if post == '1' else 'pre '} warps={w:2d} {t:7.1f} us "
                        f"{g:6.0f} GB/s ({rows[-1]['pct_copy']:3.0f}%)")
        del cp
        torch.cuda.empty_cache()


def formats_per_byte(copy_bw: float, results: dict, batches: tuple[int, ...]) -> None:
    """Bytes per second of the 3-bit GEMV (int3:g128, sym and asym; the post-scaled kernel that
    runs for groups of >= 128 inputs, and with MIXQ_GEMV3_POST=0 the pre-scaled one) and the
    8-bit one (int8:ch) against int4:g128 on each shape of SHAPES: goal 3 of the kernel issue is
    int3 at least as fast per byte as int4."""
    rows = results.setdefault("formats_per_byte", [])
    for n, k in SHAPES:
        for spec, posts in (("int4:g128", ("1",)), ("int8:ch", ("1",)), ("int3:g128", ("1", "0")),
                            ("int3:g128:asym", ("1", "0"))):
            cp = Copies(spec, n, k)
            for m in batches:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                for post in posts:
                    with temp_env({"MIXQ_GEMV3_POST": post}):
                        t = cp.time_us(lambda kw: (lambda: cuda_gemv.qmatmul(x, kw)))
                    g = gbps(cp.nbytes, m, n, k, t)
                    rows.append(dict(fmt=spec, shape=f"{n}x{k}", batch=m, post_scaled=post == "1", us=t, GBps=g,
                                     pct_copy=100 * g * 1e9 / copy_bw, nbytes=cp.nbytes))
                    kind = "" if spec.startswith(("int4", "int8")) else ("post " if post == "1" else "pre  ")
                    log(f"{spec:>15} {n:>6}x{k:<5} m={m} {kind}{t:7.1f} us "
                        f"{g:6.0f} GB/s ({rows[-1]['pct_copy']:3.0f}%)")
            del cp
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_gemv.json")
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-shape sweep")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer cases, configs and batches (short device leases)")
    ap.add_argument("--sweep-batches", default=None, help="batches of the launch-shape sweep, e.g. 1,4,8")
    ap.add_argument("--shapes", default=None, help="out x in shapes to time, e.g. 14336x4096,4096x14336")
    ap.add_argument("--per-byte", action="store_true",
                    help="only time int3:g128 (both kernels) and int8:ch against int4:g128 on SHAPES")
    ap.add_argument("--int3-warps", default=None,
                    help="only time the 3-bit GEMV at these warps per block on SHAPES, e.g. 1,2,4,8")
    args = ap.parse_args(argv)
    if args.shapes:
        SHAPES[:] = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    props = torch.cuda.get_device_properties(0)
    results = dict(device=props.name, sm_count=props.multi_processor_count, torch=torch.__version__,
                   cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    log(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}")
    t0 = time.perf_counter()
    ext = cuda_gemv.extension()
    results["build_s"] = time.perf_counter() - t0
    if ext is None:
        log(f"extension build FAILED: {cuda_gemv.build_error()}")
        results["build_error"] = cuda_gemv.build_error()
        Path(args.out).write_text(json.dumps(results, indent=1))
        return 1
    log(f"extension built in {results['build_s']:.1f} s")
    ok = False
    try:
        ok = check(results, args.quick)
        if args.check_only:
            return 0 if ok else 1
        copy_bw = bk.copy_bandwidth()
        results["copy_GBps"] = copy_bw / 1e9
        log(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
        sweep_batches = tuple(int(b) for b in args.sweep_batches.split(",")) if args.sweep_batches else None
        if args.per_byte:
            formats_per_byte(copy_bw, results, sweep_batches or (1,))
            return 0 if ok else 1
        if args.int3_warps:
            int3_warps(copy_bw, results, sweep_batches or (1,), tuple(int(w) for w in args.int3_warps.split(",")))
            return 0 if ok else 1
        rows = bench(copy_bw, results, not args.no_sweep, args.quick, sweep_batches)
    finally:
        Path(args.out).write_text(json.dumps(results, indent=1))
    log(f"\n{props.name}, {results['date']}; % = of {copy_bw / 1e9:.0f} GB/s copy; x = speedup of the CUDA kernel")
    log("fmt             shape         batch |   us    GB/s  %copy | best us %copy | x bf16 | x triton")
    for r in rows:
        best = f"{r['best_us']:7.1f} {r['best_pct_copy']:4.0f}%" if "best_us" in r else " " * 13
        vs_bf = f"{r['vs_bf16']:6.2f}" if "vs_bf16" in r else "     -"
        log(f"{r['fmt']:<15} {r['shape']:>12} {r['batch']:>5} | {r['us']:6.1f} {r['GBps']:6.0f} {r['pct_copy']:5.0f}% |"
            f" {best} | {vs_bf} | {r['vs_triton']:6.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
