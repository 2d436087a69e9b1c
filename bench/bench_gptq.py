"""Benchmark of the fused GPTQ kernel (`mixq.kernels.triton_gptq`) on a GPU.

    PYTHONPATH=src python3 bench/bench_gptq.py --out bench_gptq.json [--sweep] [--no-torch]

(A smoke run of the script itself on a CPU, under the Triton interpreter:
`TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/bench_gptq.py --device cpu --shapes 40x64
--block-size 32 --out /tmp/b.json`.)

For each weight shape (out x in; default Llama-3-8B's MLP shapes 14336x4096 and 4096x14336)
in each format (default int4:g128 and int3:g128:asym, act order with static groups, block 128):

* `fused`: wall time of `gptq_static` (kernel per block of 128 columns + torch lazy batch
  update), after one warm-up call that compiles the kernel;
* `kernel_only`: the same launches without the lazy batch updates (the kernel's share);
* `dynamic`: `gptq_dynamic` (groups' parameters from the updated weights, act_order=False),
  timed on the same inputs;
* `torch_loop`: the torch column loop (`gptq_static_reference`, the loop of
  `quantizers.gptq`: ~15 launches per column), one run;
* agreement between the two: share of equal codes, relative loss difference.

Not timed: the Hessian's inverse Cholesky factor and the group parameters (both paths need
them). The Hessian is 2 XᵀX / n of n = 4096 random correlated inputs (rank-deficient for
in = 14336, as with few calibration tokens; damping 0.01 keeps it positive definite).
`--sweep` also times kernel_only for each (rows per program, warps) launch shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from mixq import formats
from mixq.formats.fixed import group_params
from mixq.kernels import triton_gptq as tg
from mixq.quantizers.gptq import inverse_cholesky

SHAPES = [(14336, 4096), (4096, 14336)]  # (out, in)
FORMATS = ["int4:g128", "int3:g128:asym"]
SWEEP = [(16, 2), (16, 4), (32, 4), (32, 8), (64, 8), (64, 16), (8, 2), (8, 1)]  # (block_r, warps)


def log(*a):
    print(*a, flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall(fn, reps: int) -> float:
    """Median wall time of fn() in seconds, the GPU synchronised around each call."""
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def problem(out_f: int, in_f: int, spec: str, device: str, seed: int = 0):
    """(W (out, in) in act order, U, step_cols, zero_cols | None, fmt) on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    fmt = formats.parse(spec)
    w = torch.randn(out_f, in_f, device=device, generator=gen) * 0.02
    n = 4096
    gain = torch.rand(in_f, device=device, generator=gen) + 0.1
    x = torch.randn(n, in_f, device=device, generator=gen) * gain  # (n, in)
    x = x + 0.3 * x.roll(1, dims=1)  # neighbouring inputs correlated
    H = 2 * x.T @ x / n
    del x
    perm = torch.argsort(torch.diagonal(H), descending=True)
    U = inverse_cholesky(H[perm][:, perm], 0.01)[0]
    del H
    p = group_params(fmt, w)
    g = fmt.group_size_for(in_f)
    step_cols = tg.gather_columns(p.step, g, in_f, perm)
    zero_cols = tg.gather_columns(p.zero, g, in_f, perm) if fmt.asym else None
    return w[:, perm].contiguous(), U.contiguous(), step_cols, zero_cols, fmt


def kernel_only(W, U, step_cols, zero_cols, fmt, block: int, block_r=None, num_warps=None):
    """The kernel launches of gptq_static without the lazy batch updates (same work)."""
    rows, cols = W.shape
    Q = torch.empty_like(W)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    err = torch.empty(rows, block, device=W.device)
    loss = torch.empty(rows, device=W.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        tg._launch(W[:, i1:i2], U[i1:i2, i1:i2], step_cols[:, i1:i2],
                   zero_cols[:, i1:i2] if fmt.asym else None, Q[:, i1:i2], codes[:, i1:i2],
                   err[:, : i2 - i1], loss, fmt.code_bits, fmt.asym, block_r, num_warps)


def run_case(out_f: int, in_f: int, spec: str, block: int, with_torch: bool, sweep: bool,
             device: str) -> dict:
    W, U, step_cols, zero_cols, fmt = problem(out_f, in_f, spec, device)
    args = (W, U, step_cols, zero_cols, fmt.code_bits, fmt.asym, block)
    row = {"shape": [out_f, in_f], "format": spec, "block_size": block}
    t0 = time.perf_counter()
    Q, codes, loss = tg.gptq_static(*args)  # compiles
    sync()
    row["first_call_s"] = time.perf_counter() - t0
    row["fused_s"] = wall(lambda: tg.gptq_static(*args), 3)
    row["kernel_only_s"] = wall(lambda: kernel_only(W, U, step_cols, zero_cols, fmt, block), 3)
    log(f"{out_f}x{in_f} {spec}: fused {row['fused_s'] * 1e3:.1f} ms "
        f"(kernel {row['kernel_only_s'] * 1e3:.1f} ms; first call {row['first_call_s']:.2f} s)")
    if fmt.group_size > 0:  # groups from the updated weights (act_order=False); timing only
        tg.gptq_dynamic(W, U, fmt)
        row["dynamic_s"] = wall(lambda: tg.gptq_dynamic(W, U, fmt), 3)
        log(f"  gptq_dynamic (parameters per group in torch) {row['dynamic_s'] * 1e3:.1f} ms")
    if with_torch:
        t0 = time.perf_counter()
        Q_ref, codes_ref, loss_ref = tg.gptq_static_reference(*args)
        sync()
        row["torch_loop_s"] = time.perf_counter() - t0
        row["speedup"] = row["torch_loop_s"] / row["fused_s"]
        row["codes_equal"] = float((codes == codes_ref).float().mean())
        row["loss_rel_diff"] = abs(float(loss.sum()) - float(loss_ref.sum())) / float(loss_ref.sum())
        row["values_equal"] = float((Q == Q_ref).float().mean())
        log(f"  torch loop {row['torch_loop_s']:.2f} s -> speedup x{row['speedup']:.0f}; codes equal "
            f"{row['codes_equal']:.6f}, values equal {row['values_equal']:.6f}, loss rel diff "
            f"{row['loss_rel_diff']:.2e}")
    if sweep:
        row["sweep"] = []
        for block_r, warps in SWEEP:
            try:
                kernel_only(W, U, step_cols, zero_cols, fmt, block, block_r, warps)  # compile
                t = wall(lambda: kernel_only(W, U, step_cols, zero_cols, fmt, block, block_r, warps), 3)
            except Exception as e:  # a launch shape the compiler rejects is reported, not fatal
                log(f"  block_r {block_r} warps {warps}: failed ({type(e).__name__}: {e})")
                continue
            row["sweep"].append({"block_r": block_r, "num_warps": warps, "kernel_only_s": t})
            log(f"  block_r {block_r:3d} warps {warps:2d}: kernel {t * 1e3:.2f} ms")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_gptq.json")
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="out x in, comma-separated")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--no-torch", action="store_true", help="skip the (slow) torch column loop")
    ap.add_argument("--sweep", action="store_true", help="time each (rows per program, warps) launch shape")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    if not tg.supported(formats.parse("int4:g128"), args.device):
        print(f"bench_gptq: the kernel cannot run on {args.device} (needs Triton and a CUDA GPU, "
              "or TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch default; GPTQ's updates in fp32
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    results = {"device": name, "torch": torch.__version__,
               "triton": __import__("triton").__version__, "cases": []}
    log(f"device {results['device']}, torch {results['torch']}, triton {results['triton']}")
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        for spec in args.formats.split(","):
            results["cases"].append(run_case(out_f, in_f, spec, args.block_size, not args.no_torch,
                                             args.sweep, args.device))
            if args.device == "cuda":
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
