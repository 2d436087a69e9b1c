"""Calls one of mixq's CUDA int4 kernels a few times, eagerly, for a profiler (Nsight Compute) to
capture; prints nothing of its own timing.

    ncu -k regex:gem[mv]_int4 --launch-skip 3 --launch-count 1 --section SpeedOfLight \\
        --section WarpStateStats python3 bench/profile_kernels.py --kernel gemm --m 16

--kernel gemv (the CUDA GEMV, m <= 16 for int4; its heuristic launch shape unless --config
rt,unroll,warps[,stages]), gemm (the tensor-core GEMM, unless --config
rt,nt,warps,split[,stream_k,wgmma]) or sum
(torch's sum over the same codes: a plain streaming read to compare with); weights: random int4:g128 codes of --shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402

from mixq.kernels import cuda_gemv  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=["gemv", "gemm", "sum"], default="gemm",
                    help="sum: torch's sum over the same codes, a plain streaming read to compare with")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--shape", default="14336x4096")
    ap.add_argument("--spec", default="int4:g128")
    ap.add_argument("--config", default=None,
                    help="rt,nt,warps,split[,stream_k,wgmma] of the GEMM (0/1 flags); rt,unroll,warps[,stages] of the GEMV")
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args(argv)
    n, k = (int(v) for v in args.shape.split("x"))
    kw = bk.random_weights(args.spec, n, k)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
    values = [int(v) for v in args.config.split(",")] if args.config else None
    if values is not None and args.kernel == "gemm":
        values = values[:4] + [bool(v) for v in values[4:]]
    cfg = None if values is None else (cuda_gemv.GemvConfig(*values) if args.kernel == "gemv"
                                       else cuda_gemv.GemmConfig(*values))
    for _ in range(args.calls):
        if args.kernel == "sum":
            y = kw.codes.sum(dtype=torch.int32)
        elif args.kernel == "gemv":
            y = cuda_gemv.qmatmul(x, kw, None, cfg)
        else:
            y = cuda_gemv.gemm(x, kw, None, cfg)
    torch.cuda.synchronize()
    return 0 if y is not None else 1


if __name__ == "__main__":
    sys.exit(main())
