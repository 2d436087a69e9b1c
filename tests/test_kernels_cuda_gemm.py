"""Tests of the hand-written CUDA int4 tensor-core GEMM (`mixq.kernels.cuda_gemv.gemm`).

CPU tests (always run): which layouts it takes and the launch-shape heuristic. GPU tests
(marked `gpu`, skipped without CUDA): every launch shape (row tiles, activation tiles, warps,
split K) against the float32 reference on odd shapes with NaN-poisoned outputs, bf16 and fp16,
sym/asym, groups 32/64/128/per channel, batches 1..128 around the tile edges, bias; split-K
results independent of arrival order and counters restored; CUDA-graph capture; the
dispatcher's route. Bound: ||out - ref|| / ||ref|| < 1e-2 (bf16 rounding of x, the weights
and y is ~3e-3).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mixq import formats
from _cuda_checks import REL_TOL, check, gpu_case
from mixq.kernels import cuda_gemv, prepack, qmatmul, route

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def _layout(spec: str, n: int = 16, k: int = 4096):
    lay = prepack(formats.parse(spec).quantize(torch.randn(16, k)), spec).layout
    return dataclasses.replace(lay, out_features=n)


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("spec,ok", [("int4:g128", True), ("int4:g32:asym", True), ("int4:ch", True),
                                     ("int3:g128", False), ("int8:ch", False), ("nf4:g64", False)])
def test_gemm_layouts(spec, ok):
    assert cuda_gemv.gemm_layout_supported(_layout(spec)) is ok
    assert not cuda_gemv.gemm_supports(_layout(spec), torch.randn(16, 4096, dtype=torch.bfloat16))  # CPU input


@pytest.mark.parametrize("m", [1, 8, 9, 16, 17, 32, 64, 65, 128, 512])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 4096), (4096, 14336), (128256, 4096), (320, 256)])
def test_pick_gemm_config(m, n, k):
    cfg = cuda_gemv.pick_gemm_config(m, _layout("int4:g128", n, k))
    assert cfg.n_tiles in (1, 2, 4, 8) and cfg.row_tiles in (1, 2) and 1 <= cfg.warps <= 8
    assert 8 * cfg.n_tiles >= min(m, 64)  # one block's activation tiles cover the batch up to 64 rows
    assert cfg.n_tiles == 1 or 8 * cfg.n_tiles < 2 * m  # and no more than needed
    chunks = -(-k // 128)
    assert cfg.split == 1 or chunks >= 2 * cfg.split  # every K slice keeps >= 2 chunks
    tiles = -(-n // (16 * cfg.row_tiles * cfg.warps)) * -(-m // (8 * cfg.n_tiles))
    assert cfg.split == 1 or tiles * cfg.split <= 2 * 132  # about 2 blocks per SM at most
    assert cfg.stream_k == (tiles >= 48) and (cfg.split == 1 or not cfg.stream_k)
    assert cuda_gemv.gemm_smem_bytes(cfg) <= 96 * 1024


def test_pick_gemm_config_follows_the_h200_sweep():
    # (n, k, m) -> (n_tiles, split) of the fastest 2-row-tile, 8-warp launches in
    # bench/results_h200/gemm.json and gemm_stream_k.json (2026-11-30); split 0 = stream-K
    best = {(14336, 4096, 16): (2, 0), (14336, 4096, 32): (4, 0), (14336, 4096, 64): (8, 0),
            (14336, 4096, 128): (8, 0), (4096, 14336, 16): (2, 16), (4096, 14336, 32): (4, 8),
            (4096, 14336, 64): (8, 8), (4096, 4096, 16): (2, 16), (4096, 4096, 128): (8, 4)}
    for (n, k, m), want in best.items():
        cfg = cuda_gemv.pick_gemm_config(m, _layout("int4:g128", n, k))
        got = (cfg.n_tiles, 0 if cfg.stream_k else cfg.split)
        assert (cfg.row_tiles, cfg.warps) == (2, 8) and got == want, (n, k, m, cfg)


def test_pick_wgmma_config_follows_the_h200_sweep():
    # (n, k, m) -> (n_tiles, split; 0 = stream-K) of the fastest two-warpgroup launches in
    # bench/results_h200/gemm_wgmma.json (2026-12-01), or one within 3% of it
    best = {(14336, 4096, 32): (4, 0), (14336, 4096, 64): (8, 0), (14336, 4096, 128): (16, 0),
            (14336, 4096, 256): (16, 0), (28672, 4096, 64): (8, 0), (6144, 4096, 64): (8, 0),
            (4096, 4096, 32): (4, 4), (4096, 4096, 64): (8, 4), (4096, 14336, 64): (8, 4),
            (4096, 14336, 128): (16, 4), (4096, 14336, 256): (16, 0)}
    for (n, k, m), want in best.items():
        cfg = cuda_gemv.pick_gemm_config(m, _layout("int4:g128", n, k), wgmma=True)
        assert cfg.wgmma and (cfg.row_tiles, cfg.warps) == (1, 8), cfg
        assert (cfg.n_tiles, 0 if cfg.stream_k else cfg.split) == want, (n, k, m, cfg)
    # up to 16 rows, and without wgmma, the mma.sync kernel's launch
    assert not cuda_gemv.pick_gemm_config(16, _layout("int4:g128", 14336, 4096), wgmma=True).wgmma
    assert not cuda_gemv.pick_gemm_config(64, _layout("int4:g128", 14336, 4096)).wgmma


@pytest.mark.parametrize("m", [17, 33, 64, 100, 128, 129, 512])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 4096), (320, 256), (128256, 4096)])
def test_pick_wgmma_config(m, n, k):
    cfg = cuda_gemv.pick_wgmma_config(m, _layout("int4:g128", n, k))
    assert cfg.n_tiles in (2, 4, 8, 16) and 8 * cfg.n_tiles >= min(m, 128)
    assert cfg.n_tiles == 2 or 8 * cfg.n_tiles < 2 * m  # no more than needed
    tiles = -(-n // 128) * -(-m // (8 * cfg.n_tiles))
    assert cfg.stream_k == (tiles >= 48) and (cfg.split == 1 or not cfg.stream_k)
    assert cfg.split == 1 or (tiles * cfg.split <= 132 and -(-k // 128) >= 2 * cfg.split)


@pytest.mark.parametrize("spec,n,k,m,want", [
    ("int4:g128", 14336, 4096, 16, False),   # up to 16 rows: Triton (20.3 vs 21.6 µs)
    ("int4:g128", 14336, 4096, 17, True),
    ("int4:g128", 14336, 4096, 64, True),    # 38-41 vs 43.6 µs (mma.sync) and 45.7 (Triton)
    ("int4:g128", 6144, 4096, 64, True),     # 23.4 vs 24.0 (Triton)
    ("int4:g128", 4096, 4096, 32, True),     # 12.4-13.3 vs 14.1
    ("int4:g128", 4096, 4096, 64, False),    # Triton 15.9 vs 17.1
    ("int4:g128", 4096, 14336, 64, False),   # Triton 37.1 vs 38.4
    ("int4:g128", 4096, 4096, 65, True),     # 24.5-25.3 vs 29.4 at 128
    ("int4:g128:asym", 4096, 4096, 64, True),  # zero points: never Triton
    ("int4:g32", 4096, 4096, 48, True),
    ("int4:g128:asym", 4096, 4096, 9, True),  # 9-16 rows: the mma.sync kernel, as without wgmma
])
def test_gemm_preferred_with_wgmma(monkeypatch, spec, n, k, m, want):
    monkeypatch.setattr(cuda_gemv, "gemm_available", lambda layout, x: True)
    monkeypatch.setattr(cuda_gemv, "wgmma_available", lambda: True)
    monkeypatch.setattr(cuda_gemv, "_sm_count", lambda device: 132)
    assert cuda_gemv.gemm_preferred(_layout(spec, n, k), torch.empty(m, k)) is want


@pytest.mark.parametrize("spec,n,k,m,want", [
    ("int4:g128", 14336, 4096, 16, False),   # Triton 20.0 vs 21.7 µs
    ("int4:g128", 14336, 4096, 32, True),    # stream-K
    ("int4:g128", 14336, 4096, 64, True),
    ("int4:g128", 4096, 4096, 64, False),    # 16 tiles: split K, Triton 16.1 vs 19.7 µs
    ("int4:g128", 4096, 4096, 65, True),     # past 64 rows
    ("int4:g128:asym", 4096, 4096, 9, True),  # zero points
    ("int4:g32", 4096, 4096, 16, True),      # groups under 128 inputs
    ("int4:ch", 4096, 4096, 16, False),
])
def test_gemm_preferred_follows_the_h200_measurements(monkeypatch, spec, n, k, m, want):
    monkeypatch.setattr(cuda_gemv, "gemm_available", lambda layout, x: True)
    monkeypatch.setattr(cuda_gemv, "_sm_count", lambda device: 132)
    assert cuda_gemv.gemm_preferred(_layout(spec, n, k), torch.empty(m, k)) is want


# --------------------------------------------------------------------------- GPU


def _gpu_case(spec: str, n: int, k: int, seed: int):
    return gpu_case(spec, n, k, seed)


def _check(kw, m, dtype, cfg=None, bias=False):
    return check(cuda_gemv.gemm, kw, m, dtype, cfg, bias)


# formats on odd row counts and K not a multiple of 128, for both GEMM kernels
ODD_CASES = [("int4:g128", 200, 1088), ("int4:g64:asym", 136, 1056), ("int4:g32", 72, 544), ("int4:ch", 100, 4096),
             ("int4:g128:asym", 48, 416)]
CONFIGS = [cuda_gemv.GemmConfig(r, t, w, s) for r in (1, 2) for t in (1, 2, 4, 8) for w in (1, 3, 8) for s in (1, 3)]
CONFIGS += [cuda_gemv.GemmConfig(r, t, w, stream_k=True) for r in (1, 2) for t in (1, 2, 4, 8) for w in (1, 3, 8)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spec,n,k", ODD_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_launch_shape_matches_reference(spec, n, k, dtype):
    """Odd row counts (past every tile edge), K not a multiple of 128 (partial last chunk),
    batches around the 8-row activation tiles, 1..8 warps, split K with uneven slices (and
    slices of one chunk: half a shared-memory stage), stream-K (here mostly one chunk per
    block, so up to every chunk of a tile in its own partial-sum slot)."""
    kw = _gpu_case(spec, n, k, seed=n + k)
    for cfg in CONFIGS:
        for m in (1, 9, 17, 64):
            _check(kw, m, dtype, cfg, bias=(m == 9))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [9, 16, 31, 33, 64, 65, 100, 128])
def test_llama_shapes_every_batch(m):
    for n, k in [(4096, 4096), (1024, 14336), (14336, 4096)]:
        kw = _gpu_case("int4:g128", n, k, seed=m)
        _check(kw, m, torch.bfloat16)
        _check(kw, m, torch.float16, bias=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 64, 100])
def test_stream_k_on_llama_shapes(m):
    """Stream-K with fewer blocks than chunk-units: blocks whose chunks start in one tile and end
    in the next, tiles summed from 2-3 slots, several tiles per block at 100 rows."""
    for n, k in [(4096, 4096), (1024, 14336), (14336, 4096)]:
        kw = _gpu_case("int4:g128:asym", n, k, seed=m + n)
        for cfg in [cuda_gemv.GemmConfig(2, 2 if m <= 16 else 8, 8, stream_k=True),
                    cuda_gemv.GemmConfig(1, 1, 4, stream_k=True)]:
            _check(kw, m, torch.bfloat16, cfg, bias=True)
    ws, cnt = _WS_of(torch.device("cuda", torch.cuda.current_device()))
    torch.cuda.synchronize()
    assert int(cnt.abs().sum()) == 0  # every tile's counter back at zero


@pytest.mark.gpu
@needs_cuda
def test_split_k_is_deterministic_and_restores_counters():
    kw = _gpu_case("int4:g128:asym", 512, 4096, seed=2)
    x = torch.randn(24, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = cuda_gemv.GemmConfig(1, 4, 4, 8)
    ys = [cuda_gemv.gemm(x, kw, None, cfg) for _ in range(5)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    sk = [cuda_gemv.gemm(x, kw, None, dataclasses.replace(cfg, stream_k=True)) for _ in range(5)]
    assert all(torch.equal(sk[0], y) for y in sk[1:])  # slots are summed in order, whoever arrives last
    ws, cnt = _WS_of(x.device)
    torch.cuda.synchronize()
    assert int(cnt.abs().sum()) == 0
    one = cuda_gemv.gemm(x, kw, None, dataclasses.replace(cfg, split=1))
    assert float((one.float() - ys[0].float()).norm() / one.float().norm()) < 1e-2


def _WS_of(device):
    return cuda_gemv._WS.buffers[str(device)]


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture_with_split_k():
    kw = _gpu_case("int4:g128", 1024, 4096, seed=5)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = cuda_gemv.GemmConfig(1, 2, 4, 4)
    cfg2 = dataclasses.replace(cfg, stream_k=True)
    y0 = cuda_gemv.gemm(x, kw, None, cfg)
    y0s = cuda_gemv.gemm(x, kw, None, cfg2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda_gemv.gemm(x, kw, None, cfg)
        y2 = cuda_gemv.gemm(x, kw, None, cfg)  # two calls on one workspace in one graph
        y3 = cuda_gemv.gemm(x, kw, None, cfg2)
    y.fill_(float("nan"))
    y2.fill_(float("nan"))
    y3.fill_(float("nan"))
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0) and torch.equal(y2, y0) and torch.equal(y3, y0s)


@pytest.mark.gpu
@needs_cuda
def test_dispatcher_routes_asym_int4_batches_above_8_to_it():
    from torch import nn

    from mixq.nn import QuantLinear

    torch.manual_seed(3)
    lin = nn.Linear(1024, 320).to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, "int4:g128:asym").cuda()
    x = torch.randn(4, 5, 1024, device="cuda", dtype=torch.bfloat16)
    assert route(q.weights(), x.reshape(-1, 1024)) == "cuda_tc"
    assert route(q.weights(), x.reshape(-1, 1024)[:8]) == "cuda_gemv"
    direct = cuda_gemv.gemm(x.reshape(20, 1024), q.weights(), q.bias).reshape(4, 5, 320)
    assert torch.equal(q(x), direct)
    ref = nn.functional.linear(x.float(), q.dequantized_weight(), q.bias.float())
    assert float((q(x).float() - ref).norm() / ref.norm()) < REL_TOL
    assert torch.equal(qmatmul(x, q.weights(), q.bias), direct)


def _check_chain(chain):
    """chain(sync) runs calls that each read the previous call's output (synchronizing after each
    when sync): run back to back, eagerly and replayed from a CUDA graph into NaN-filled
    outputs, it must give what it gives one call at a time."""
    ref = chain(sync=True)
    assert torch.equal(chain(sync=False), ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(sync=False)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 16])
def test_dependent_chain_reads_the_previous_output(m, monkeypatch):
    """Programmatic dependent launch (MIXQ_PDL=1) lets a kernel start before the previous one
    ends: a chain
    of calls, each reading the output the previous call wrote (split K included), eager and
    in a CUDA graph, must match the chain computed one call at a time."""
    monkeypatch.setenv("MIXQ_PDL", "1")
    kws = [_gpu_case(spec, 1024, 1024, seed=i) for i, spec in enumerate(["int4:g128", "int4:g64:asym", "int4:ch"] * 3)]
    x0 = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)

    def chain(sync: bool):
        y = x0
        for i, kw in enumerate(kws):
            cfg = cuda_gemv.GemmConfig(1, 2, 4, 1 + i % 3)
            y = cuda_gemv.qmatmul(y, kw) if (m <= 8 and i % 2) else cuda_gemv.gemm(y, kw, None, cfg)
            if i % 2:  # keep the scale bounded; calls 2j and 2j + 1 follow each other directly
                y = y / y.float().norm(dim=1, keepdim=True).to(y.dtype) * 32
            if sync:
                torch.cuda.synchronize()
        return y

    _check_chain(chain)


# --------------------------------------------------------------------------- Hopper (wgmma)

needs_wgmma = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                                 reason="the wgmma GEMM needs an sm_90 GPU (H100, H200)")

WG_CONFIGS = [cuda_gemv.GemmConfig(1, t, w, s, wgmma=True) for t in (2, 4, 8, 16) for w in (4, 8) for s in (1, 3)]
WG_CONFIGS += [cuda_gemv.GemmConfig(1, t, w, stream_k=True, wgmma=True) for t in (2, 4, 8, 16) for w in (4, 8)]


def test_arch_flags_build_the_wgmma_kernel_only_for_sm90():
    assert "-DMIXQ_WGMMA=1" in cuda_gemv.arch_flags(9, 0)
    assert any("sm_90a" in f for f in cuda_gemv.arch_flags(9, 0))
    for cc in [(8, 0), (8, 9), (10, 0), (12, 0)]:
        flags = cuda_gemv.arch_flags(*cc)
        assert flags == [f"-gencode=arch=compute_{cc[0]}{cc[1]},code=sm_{cc[0]}{cc[1]}"]
    # the fallback build of an nvcc without sm_90a
    assert cuda_gemv.arch_flags(9, 0, wgmma=False) == ["-gencode=arch=compute_90,code=sm_90"]


@pytest.mark.gpu
@needs_wgmma
def test_wgmma_is_built_on_sm90():
    assert cuda_gemv.wgmma_available()


@pytest.mark.gpu
@needs_wgmma
@pytest.mark.parametrize("spec,n,k", ODD_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_every_launch_shape_matches_reference(spec, n, k, dtype):
    """The Hopper kernel at every N (16..128 activation rows per tile) and one or two
    warpgroups, split K (uneven slices, slices of one chunk) and stream-K, on odd row counts
    (a warpgroup's 64 rows past n), K not a multiple of 128, batches below, at and past N
    (several activation tiles), NaN-poisoned outputs, bias."""
    kw = _gpu_case(spec, n, k, seed=n + k + 1)
    for cfg in WG_CONFIGS:
        for m in (1, 9, 17, 64, 130):
            _check(kw, m, dtype, cfg, bias=(m == 9))


@pytest.mark.gpu
@needs_wgmma
@pytest.mark.parametrize("m", [9, 16, 31, 33, 64, 65, 100, 128, 256])
def test_wgmma_llama_shapes_every_batch(m):
    for n, k in [(4096, 4096), (1024, 14336), (14336, 4096)]:
        kw = _gpu_case("int4:g128", n, k, seed=m + 7)
        nt = 16 if m > 64 else (8 if m > 32 else (4 if m > 16 else 2))
        for cfg in [cuda_gemv.GemmConfig(1, nt, 4, stream_k=True, wgmma=True),
                    cuda_gemv.GemmConfig(1, nt, 8, 2, wgmma=True)]:
            _check(kw, m, torch.bfloat16, cfg)
            _check(kw, m, torch.float16, cfg, bias=True)
    ws, cnt = _WS_of(torch.device("cuda", torch.cuda.current_device()))
    torch.cuda.synchronize()
    assert int(cnt.abs().sum()) == 0


@pytest.mark.gpu
@needs_wgmma
def test_wgmma_matches_the_mma_kernel_and_is_deterministic():
    """Same decoded weights and fp32 accumulation as the mma.sync kernel: the two agree to
    accumulation order; repeated split-K / stream-K calls are bitwise equal."""
    kw = _gpu_case("int4:g128:asym", 1536, 4096, seed=11)
    x = torch.randn(48, 4096, device="cuda", dtype=torch.bfloat16)
    ref = cuda_gemv.gemm(x, kw, None, cuda_gemv.GemmConfig(2, 8, 8, 1))
    for cfg in [cuda_gemv.GemmConfig(1, 8, 4, 4, wgmma=True), cuda_gemv.GemmConfig(1, 8, 8, stream_k=True, wgmma=True)]:
        ys = [cuda_gemv.gemm(x, kw, None, cfg) for _ in range(4)]
        assert all(torch.equal(ys[0], y) for y in ys[1:])
        assert float((ys[0].float() - ref.float()).norm() / ref.float().norm()) < 2e-3


@pytest.mark.gpu
@needs_wgmma
def test_wgmma_in_a_dependent_chain_and_a_graph(monkeypatch):
    monkeypatch.setenv("MIXQ_PDL", "1")
    kws = [_gpu_case(spec, 1024, 1024, seed=20 + i) for i, spec in enumerate(["int4:g128", "int4:g64:asym"] * 3)]
    x0 = torch.randn(40, 1024, device="cuda", dtype=torch.bfloat16)

    def chain(sync: bool):
        y = x0
        for i, kw in enumerate(kws):
            cfg = cuda_gemv.GemmConfig(1, 8, 4 * (1 + i % 2), 1 + i % 3, stream_k=i == 4, wgmma=True)
            y = cuda_gemv.gemm(y, kw, None, cfg)
            y = y / y.float().norm(dim=1, keepdim=True).to(y.dtype) * 32
            if sync:
                torch.cuda.synchronize()
        return y

    _check_chain(chain)
