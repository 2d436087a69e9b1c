"""Side-by-side int4 weight-only matmul at decode batch sizes: mixq's dispatcher (and each
of its int4 kernels forced: the CUDA GEMV, the Triton tensor-core kernel) against peers,
timed the same way in one run (CUDA-graph replays rotating over >= 256 MB of weight copies,
mixq's bench_kernels method), so every figure is a ratio measured in one process.

    PYTHONPATH=src python3 bench/peer_gemv.py [--batches 1,8,16,64,128] [--out peer_gemv.json]

Peers: bf16 cuBLAS (F.linear), torch tinygemm (_weight_int4pack_mm, gpt-fast/torchao int4wo),
gemlite A16W4 (Triton, mobiusml) when installed (a pure-Python sdist: `pip download
gemlite==0.6.0.post2 --no-deps`, then `pip install --no-deps --no-build-isolation` it)."""
import argparse, json, sys, statistics, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path.cwd() / "bench"))
import bench_kernels as bk  # noqa
from bench_env import temp_env  # noqa
from mixq.kernels import qmatmul  # noqa

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096), (1024, 4096), (6144, 4096), (28672, 4096)]


def t_mixq(n, k, m, spec="int4:g128", kernel=None):
    """mixq's dispatcher; kernel: force one route (MIXQ_KERNEL) for the whole timing."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    cop = {}
    def make(i):
        cop[i] = bk.random_weights(spec, n, k)
        kw = cop[i]
        return lambda: qmatmul(x, kw)
    nb = bk.random_weights(spec, n, k).nbytes()
    with temp_env({"MIXQ_KERNEL": kernel} if kernel else {}):
        if kernel == "cuda_gemv" and m > 8:
            raise ValueError("the CUDA GEMV takes batch <= 8")
        return bk.time_rotating_ms(make, nb) * 1e3, nb


def t_bf16(n, k, m):
    return bk.bench_bf16(n, k, m), n * k * 2


def t_tinygemm(n, k, m, g=128):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    cop = {}
    def one():
        wq = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        wu8 = (wq[:, ::2] << 4 | wq[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(wu8, 8)
        sz = torch.rand(k // g, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
        return packed, sz
    def make(i):
        cop[i] = one()
        p, sz = cop[i]
        return lambda: torch.ops.aten._weight_int4pack_mm(x, p, g, sz)
    nb = n * k // 2 + (k // g) * n * 4
    return bk.time_rotating_ms(make, nb) * 1e3, nb


def t_gemlite(n, k, m, g=128):
    from gemlite.helper import A16Wn
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    cop = {}
    def one():
        wq = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        sc = torch.rand(n, k // g, device="cuda", dtype=torch.bfloat16) * 0.01
        z = torch.full((n, k // g), 8.0, device="cuda", dtype=torch.bfloat16)
        return A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(wq, sc, z, W_nbits=4, group_size=g)
    def make(i):
        cop[i] = one()
        lin = cop[i]
        return lambda: lin(x)
    nb = n * k // 2 + (k // g) * n * 4
    return bk.time_rotating_ms(make, nb) * 1e3, nb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--out", default="peer_gemv.json")
    ap.add_argument("--peers", default="mixq,mixq_gemv,mixq_tc,bf16,tinygemm,gemlite")
    ap.add_argument("--shapes", default=None, help="e.g. 14336x4096,4096x4096 (default: all)")
    a = ap.parse_args()
    bw = bk.copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()} copy bandwidth {bw/1e9:.0f} GB/s", flush=True)
    rows = []
    fns = dict(mixq=t_mixq, bf16=t_bf16, tinygemm=t_tinygemm, gemlite=t_gemlite,
               mixq_gemv=lambda n, k, m: t_mixq(n, k, m, kernel="cuda_gemv"),
               mixq_tc=lambda n, k, m: t_mixq(n, k, m, kernel="tc"))
    shapes = SHAPES if not a.shapes else [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    for (n, k) in shapes:
        for m in [int(b) for b in a.batches.split(",")]:
            r = dict(n=n, k=k, m=m)
            for p in a.peers.split(","):
                try:
                    us, nb = fns[p](n, k, m)
                    io = nb + m * k * 2 + m * n * 2
                    r[p] = dict(us=round(us, 2), gbs=round(io / us / 1e3, 1), pct=round(100 * io / (us * 1e-6) / bw, 1))
                except Exception as e:  # a peer that cannot run this shape
                    r[p] = dict(error=f"{type(e).__name__}: {str(e)[:160]}")
                torch.cuda.empty_cache()
            rows.append(r)
            print(json.dumps(r), flush=True)
            Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_bw=bw,
                                                   date=time.strftime("%Y-%m-%d %H:%M:%S"), rows=rows), indent=1))


if __name__ == "__main__":
    main()
