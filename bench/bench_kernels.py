"""Benchmark of the packed-weight Triton kernels on a GPU (see bench/KERNEL_NOTES.md).

    PYTHONPATH=src python3 bench/bench_kernels.py --out bench_kernels.json [--sweep] [--e2e]

For Llama-3-8B linear shapes (out x in: 4096x4096, 14336x4096, 4096x14336, 128256x4096) at
batch 1, 4, 16, 64: median time per call of `x @ dequant(W)^T` from packed weights and of
bf16 `torch.nn.functional.linear`, measured as CUDA-graph replays of calls that rotate over
weight copies totalling >= 256 MB (so no call finds its weight in the 50 MB L2, and CPU
launch cost is not timed). triton.testing.do_bench's median is recorded beside it: its L2
flush is a 256 MB memset whose dirty lines are written back during the timed kernel, which
adds ~10 us to short kernels. Achieved bandwidth = (bytes of codes + scales (+ zeros) + x +
y) / time, against the measured device-to-device copy bandwidth (a 1 GiB copy, do_bench,
bytes read + written). `--sweep` first times
a grid of block shapes for int4 and prints the best per (shape, batch); `--e2e` times decode
steps of a random-weight Llama-3-8B-shaped model (bf16 vs int4 vs a mixed int8/int4/int3
plan) replayed as CUDA graphs. Weights are random codes and scales: kernel time does not
depend on the values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
import triton

# Kernel tables time one kernel against peers that do not overlap their neighbours: no
# programmatic dependent launch here unless asked for (MIXQ_PDL=1); the decode loop
# (bench_e2e.py) runs with mixq's default.
os.environ.setdefault("MIXQ_PDL", "0")
from triton.testing import do_bench

from mixq import formats
from mixq.kernels import KernelWeights, prepack
from mixq.kernels.packed import unit_shape
from mixq.kernels.triton_qmm import KernelConfig, pick_config, qmatmul

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]  # (out, in)
BATCHES = [1, 4, 16, 64]
OTHER_FORMATS = ["int8:ch", "int3:g64", "int2:g64", "int4:g128:asym", "nf4:g64", "mxfp4", "nvfp4",
                 "fp8_e4m3:ch"]


def log(*a):
    print(*a, flush=True)


def random_weights(spec: str, n: int, k: int, device="cuda") -> KernelWeights:
    """Random codes and scales in `spec`'s kernel layout (quantizing a small weight once
    fixes the layout; the big tensors are drawn directly)."""
    fmt = formats.parse(spec)
    small = prepack(fmt.quantize(torch.randn(2, k)), fmt)
    lay = dataclasses.replace(small.layout, out_features=n)
    c_per_unit, w_per_unit = unit_shape(lay.bits)
    codes = torch.randint(-2**31, 2**31 - 1, (n, w_per_unit * k // c_per_unit), dtype=torch.int32, device=device)
    if lay.scale_mode == "fp16":
        scales = (torch.rand(n, lay.n_groups, device=device) * 0.02 + 0.001).half()
    elif lay.scale_mode == "e8m0":
        scales = torch.randint(118, 124, (n, lay.n_groups), device=device, dtype=torch.uint8)
    else:  # e4m3 bytes of moderate positive values
        scales = torch.randint(0x30, 0x48, (n, lay.n_groups), device=device, dtype=torch.uint8)
    zeros = None if small.zeros is None else torch.randint(0, 2**lay.bits, (n, lay.n_groups), device=device, dtype=torch.uint8)
    ts = None if small.tensor_scale is None else torch.tensor(1e-2, device=device)
    return KernelWeights(lay, codes, scales, small.levels.to(device), zeros, ts)


def time_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


ROTATE_BYTES = 256 << 20  # > 5x the H100's 50 MB L2: every call finds its weight in HBM


def time_rotating_ms(make_call, nbytes: int, calls_per_graph: int = 24) -> float:
    """Median time of one call when successive calls use different weight copies (so none is
    served from L2), replayed from a CUDA graph (so CPU launch cost is not timed; the small
    gaps between kernels are). make_call(i) -> a closure over weight copy i."""
    n_copies = max(1, min(calls_per_graph, -(-ROTATE_BYTES // nbytes)))
    calls = [make_call(i) for i in range(n_copies)]
    n_calls = n_copies * max(1, calls_per_graph // n_copies)
    for c in calls:  # compile and warm up outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            calls[i % n_copies]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(15):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n_calls)
    del graph, calls
    return statistics.median(times)


def copy_bandwidth() -> float:
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src))  # 2 GiB moved: L2 flushing is irrelevant here
    del src, dst
    return 2 * n / (t * 1e-3)


def io_bytes(kw_bytes: int, m: int, n: int, k: int, act_bytes: int = 2) -> int:
    return kw_bytes + m * k * act_bytes + m * n * act_bytes


def bench_one(spec_or_kw, m: int, cfg: KernelConfig | None = None, n: int = 0, k: int = 0) -> tuple[float, int]:
    """(median us per call, weight bytes) of the packed kernel; weights rotate over copies."""
    kw0 = spec_or_kw if isinstance(spec_or_kw, KernelWeights) else random_weights(spec_or_kw, n, k)
    n, k = kw0.layout.out_features, kw0.layout.in_features
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    copies = {0: kw0}

    def make_call(i):
        if i not in copies:
            copies[i] = random_weights(kw0.layout.fmt, n, k)
        kw = copies[i]
        return lambda: qmatmul(x, kw, None, cfg)

    t = time_rotating_ms(make_call, kw0.nbytes())
    return t * 1e3, kw0.nbytes()


def bench_bf16(n: int, k: int, m: int) -> float:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = {}

    def make_call(i):
        ws[i] = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w = ws[i]
        return lambda: torch.nn.functional.linear(x, w)

    t = time_rotating_ms(make_call, n * k * 2)
    del ws
    return t * 1e3


def sweep(copy_bw: float, results: dict) -> dict:
    """Time a grid of block shapes for int4:g128 and keep the best per (shape, batch)."""
    gemv1 = [KernelConfig("gemv", 1, bn, bj, sk, nw) for bn, bj, nw in
             [(4, 128, 4), (8, 128, 4), (8, 256, 8), (16, 128, 4), (16, 256, 8), (32, 128, 8)] for sk in (1, 2)]
    gemv4 = [KernelConfig("gemv", 4, bn, bj, 1, nw) for bn, bj, nw in [(4, 128, 4), (8, 128, 4), (4, 256, 8)]]
    gemm16 = [KernelConfig("gemm", 16, bn, bj, sk, 4, st) for bn in (64, 128) for bj in (16, 32) for sk in (1, 2, 4)
              for st in (2,)] + [KernelConfig("gemm", 16, 64, 16, 2, 4, 3), KernelConfig("gemm", 16, 128, 16, 2, 8, 3)]
    gemm64 = [KernelConfig("gemm", 64, bn, bj, sk, nw, 2) for bn, nw in ((64, 4), (128, 8)) for bj in (8, 16)
              for sk in (1, 2)]
    gemv1 = [c for c in gemv1 if c.block_n >= 8]
    gemm16 = [KernelConfig("gemm", 16, bn, 16, sk, 4, 2) for bn in (64, 128) for sk in (2, 4, 8)]
    cands_for = {1: gemv1, 4: gemv4[:2], 16: gemm16, 64: gemm64[:0]}
    best = {}
    for n, k in SHAPES[:3]:
        kw = random_weights("int4:g128", n, k)
        for m in BATCHES:
            rows = []
            for cfg in cands_for[m]:
                try:
                    t_us, nbytes = bench_one(kw, m, cfg)
                except Exception as e:  # a config the compiler or the SM cannot take
                    log(f"  sweep {n}x{k} M={m} {cfg}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                gbs = io_bytes(nbytes, m, n, k) / (t_us * 1e-6) / 1e9
                rows.append((t_us, cfg, gbs))
            heur = pick_config(m, kw.layout)
            if not rows:
                continue
            rows.sort(key=lambda r: r[0])
            t_h, _ = bench_one(kw, m, heur)
            best[(n, k, m)] = rows[0][1]
            results.setdefault("sweep", {})[f"{n}x{k}:M{m}"] = {
                "best": rows[0][1].__dict__, "best_us": rows[0][0], "heuristic": heur.__dict__, "heuristic_us": t_h,
                "all": [(r[0], r[1].__dict__) for r in rows]}
            log(f"sweep {n:>6}x{k:<5} M={m:<2} best {rows[0][0]:7.1f} us {rows[0][2]:6.0f} GB/s "
                f"({100*rows[0][2]*1e9/copy_bw:3.0f}%) {rows[0][1]} | heuristic {t_h:7.1f} us {heur}")
            for t, cfg, gbs in rows[1:]:
                log(f"      {t:7.1f} us {gbs:6.0f} GB/s {cfg}")
        del kw
    return best


def main_table(copy_bw: float, results: dict, best: dict | None = None) -> list[dict]:
    """int4:g128 on every shape and batch (heuristic config, and the sweep's best where one
    ran), bf16 F.linear beside it; other formats at batch 1 and 16 on two shapes."""
    best = best or {}
    rows = []
    for n, k in SHAPES:
        kw = random_weights("int4:g128", n, k)
        for m in BATCHES:
            t_q, nbytes = bench_one(kw, m)
            t_s = bench_one(kw, m, best[(n, k, m)])[0] if (n, k, m) in best else None
            t_b = bench_bf16(n, k, m)
            xq = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_db = time_ms(lambda: qmatmul(xq, kw)) * 1e3  # do_bench (L2 flush by memset)
            gb_q = io_bytes(nbytes, m, n, k) / (t_q * 1e-6) / 1e9
            gb_b = io_bytes(n * k * 2, m, n, k) / (t_b * 1e-6) / 1e9
            row = dict(fmt="int4:g128", shape=f"{n}x{k}", batch=m, us=t_q, GBps=gb_q,
                       pct_copy=100 * gb_q * 1e9 / copy_bw, bf16_us=t_b, bf16_GBps=gb_b,
                       bf16_pct_copy=100 * gb_b * 1e9 / copy_bw, speedup=t_b / t_q,
                       config=pick_config(m, kw.layout).__dict__, sweep_best_us=t_s, do_bench_us=t_db)
            rows.append(row)
            log(f"int4:g128 {n:>6}x{k:<5} M={m:<2} {t_q:8.1f} us {gb_q:6.0f} GB/s ({row['pct_copy']:3.0f}%) | "
                f"bf16 {t_b:8.1f} us {gb_b:6.0f} GB/s ({row['bf16_pct_copy']:3.0f}%) | x{row['speedup']:.2f}"
                + (f" | sweep best {t_s:.1f} us" if t_s else "") + f" | do_bench {t_db:.1f} us")
        del kw
    for spec in OTHER_FORMATS:
        for n, k in SHAPES[:2]:
            for m in (1, 16):
                t_q, nbytes = bench_one(spec, m, None, n, k)
                gb_q = io_bytes(nbytes, m, n, k) / (t_q * 1e-6) / 1e9
                rows.append(dict(fmt=spec, shape=f"{n}x{k}", batch=m, us=t_q, GBps=gb_q,
                                 pct_copy=100 * gb_q * 1e9 / copy_bw, weight_MB=nbytes / 1e6))
                log(f"{spec:>14} {n:>6}x{k:<5} M={m:<2} {t_q:8.1f} us {gb_q:6.0f} GB/s ({rows[-1]['pct_copy']:3.0f}%)")
    results["table"] = rows
    return rows


# --------------------------------------------------------------------------- end-to-end decode

LLAMA3_8B = dict(hidden=4096, inter=14336, n_layers=32, n_heads=32, n_kv=8, head_dim=128, vocab=128256)


class _Dense(torch.nn.Module):
    def __init__(self, n, k):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02,
                                         requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


class _Packed(torch.nn.Module):
    def __init__(self, spec, n, k):
        super().__init__()
        self.kw = random_weights(spec, n, k)

    def forward(self, x):
        return qmatmul(x, self.kw)


def _rms(x, eps=1e-5):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class DecodeModel(torch.nn.Module):
    """Llama-shaped decoder step for batch 1 over a static KV cache (no RoPE, unit norms:
    neither changes the bytes moved). plan(layer, name) -> format spec or "bf16"."""

    def __init__(self, cfg: dict, plan, n_layers: int, ctx: int):
        super().__init__()
        h, f, hd = cfg["hidden"], cfg["inter"], cfg["head_dim"]
        self.cfg, self.ctx = cfg, ctx

        def lin(layer, name, n, k):
            spec = plan(layer, name)
            return _Dense(n, k) if spec == "bf16" else _Packed(spec, n, k)

        self.layers = torch.nn.ModuleList()
        for i in range(n_layers):
            blk = torch.nn.ModuleDict(dict(
                q=lin(i, "q_proj", cfg["n_heads"] * hd, h), k=lin(i, "k_proj", cfg["n_kv"] * hd, h),
                v=lin(i, "v_proj", cfg["n_kv"] * hd, h), o=lin(i, "o_proj", h, cfg["n_heads"] * hd),
                gate=lin(i, "gate_proj", f, h), up=lin(i, "up_proj", f, h), down=lin(i, "down_proj", h, f)))
            self.layers.append(blk)
        self.head = lin(n_layers, "lm_head", cfg["vocab"], h)
        shape = (n_layers, 1, cfg["n_kv"], ctx, hd)
        self.k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        self.v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def forward(self, x):  # x: (1, hidden)
        c, hd = self.cfg, self.cfg["head_dim"]
        for i, b in enumerate(self.layers):
            y = _rms(x)
            q = b["q"](y).view(1, c["n_heads"], 1, hd)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[:, :, -1] = b["k"](y).view(1, c["n_kv"], hd)
            vc[:, :, -1] = b["v"](y).view(1, c["n_kv"], hd)
            a = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
            x = x + b["o"](a.reshape(1, -1))
            y = _rms(x)
            x = x + b["down"](torch.nn.functional.silu(b["gate"](y)) * b["up"](y))
        return self.head(_rms(x))

    def weight_bytes(self) -> int:
        total = 0
        for mod in self.modules():
            if isinstance(mod, _Dense):
                total += mod.weight.numel() * 2
            elif isinstance(mod, _Packed):
                total += mod.kw.nbytes()
        return total


def mixed_plan(layer: int, name: str) -> str:
    """int8 for the first and last two blocks and the head; int3 for gate/up elsewhere;
    int4 for the rest."""
    n_layers = LLAMA3_8B["n_layers"]
    if name == "lm_head" or layer < 2 or layer >= n_layers - 2:
        return "int8:ch"
    if name in ("gate_proj", "up_proj"):
        return "int3:g64"
    return "int4:g128"


def e2e(results: dict, n_layers: int, ctx: int = 1024) -> None:
    plans = {
        "bf16": lambda layer, name: "bf16",
        "int4:g128 (head int4 too)": lambda layer, name: "int4:g128",
        "mixed int8/int4/int3": mixed_plan,
    }
    rows = []
    for label, plan in plans.items():
        torch.cuda.empty_cache()
        model = DecodeModel(LLAMA3_8B, plan, n_layers, ctx)
        x = torch.randn(1, LLAMA3_8B["hidden"], device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            for _ in range(3):  # compile every kernel before capture
                model(x)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = model(x)
            graph.replay()
            torch.cuda.synchronize()
            if not torch.isfinite(out.float()).all():
                log(f"e2e {label}: non-finite logits (random weights; timing still valid)")
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(20):
                    graph.replay()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / 20)
        step = statistics.median(times)
        wb = model.weight_bytes()
        row = dict(model=label, n_layers=n_layers, ctx=ctx, step_ms=step * 1e3, tokens_per_s=1 / step,
                   weight_GB=wb / 1e9, weight_GBps=wb / step / 1e9)
        rows.append(row)
        log(f"e2e {label:>28}: {step*1e3:7.2f} ms/token  {1/step:7.1f} tok/s  weights {wb/1e9:5.2f} GB "
            f"-> {wb/step/1e9:6.0f} GB/s")
        del model, graph, out
    results["e2e"] = rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_kernels.json")
    ap.add_argument("--sweep", action="store_true", help="time a grid of block shapes first")
    ap.add_argument("--e2e", action="store_true", help="end-to-end decode of a Llama-3-8B-shaped model")
    ap.add_argument("--e2e-layers", type=int, default=32)
    ap.add_argument("--skip-table", action="store_true")
    args = ap.parse_args(argv)
    props = torch.cuda.get_device_properties(0)
    results = dict(device=props.name, sm_count=props.multi_processor_count, torch=torch.__version__,
                   triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    copy_bw = copy_bandwidth()
    results["copy_GBps"] = copy_bw / 1e9
    log(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}")
    log(f"device-to-device copy: {copy_bw/1e9:.0f} GB/s (read + write)")
    try:
        best = sweep(copy_bw, results) if args.sweep else None
        if not args.skip_table:
            main_table(copy_bw, results, best)
        if args.e2e:
            e2e(results, args.e2e_layers)
    finally:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if "table" in results:
        log("\nshape          batch | int4:g128 us   GB/s  %copy | bf16 us   GB/s  %copy | speedup")
        for r in results["table"]:
            if r["fmt"] == "int4:g128":
                log(f"{r['shape']:>13} {r['batch']:>5} | {r['us']:9.1f} {r['GBps']:6.0f} {r['pct_copy']:5.0f}% | "
                    f"{r['bf16_us']:7.1f} {r['bf16_GBps']:6.0f} {r['bf16_pct_copy']:5.0f}% | x{r['speedup']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
