"""Tests of the hand-written CUDA int4 GEMV (`mixq.kernels.cuda_gemv`).

CPU tests (always run): which layouts it takes, the launch-shape heuristic, and the fallback
when the extension cannot be built. GPU tests (marked `gpu`, skipped without CUDA): every
launch shape against the float32 reference on odd shapes with NaN-poisoned outputs, bf16
and fp16, sym/asym, groups 32/64/128/per-channel, batch 1..8 (int4: 1..16), bias; the dispatcher; CUDA
graph capture. Bound: ||out - ref|| / ||ref|| < 1e-2 (bf16 rounding of x and y is ~3e-3).
"""

from __future__ import annotations

import logging

import pytest
import torch

from mixq import formats
from _cuda_checks import REL_TOL, check, gpu_case
from mixq.kernels import cuda_gemv, dequantize, prepack, qmatmul

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def _layout(spec: str, n: int = 8, k: int = 576):
    return prepack(formats.parse(spec).quantize(torch.randn(n, k)), spec).layout


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("spec,ok", [
    ("int4:g128", True), ("int4:g64", True), ("int4:g32", True), ("int4:g64:asym", True), ("int4:ch", True),
    ("int3:g64", False), ("int8:ch", False), ("nf4:g64", False), ("mxfp4", False), ("nvfp4", False),
    ("int3:g64@1024", True), ("int3:g128:asym@1024", True), ("int3:g32@1024", True), ("int3:ch@1024", True),
    ("fp4_e2m1:g32", False), ("int8:ch@1024", True), ("int8:g128@1024", True), ("int8:g128:asym@1024", True),
    ("int8:g64@1024", False),
])
def test_layout_supported(spec, ok):
    """int4 with in % 32 == 0; 3-bit (its 3-word units) and int8 with in % 128 == 0 (576 is not);
    int8 only with groups of >= 128 inputs (scales after the product)."""
    spec, _, k = spec.partition("@")
    assert cuda_gemv.layout_supported(_layout(spec, k=int(k or 576))) is ok


def test_supports_needs_cuda_half_input_and_small_batch():
    lay = _layout("int4:g64")
    assert not cuda_gemv.supports(lay, torch.randn(1, 576, dtype=torch.bfloat16))  # CPU tensor
    assert not cuda_gemv.layout_supported(_layout("int4:g16", k=64))  # groups below 32 inputs
    assert not cuda_gemv.layout_supported(_layout("int4:g64", k=560))  # 560 % 32 != 0


def test_pick_config_reproduces_the_sweeps(monkeypatch):
    # Fastest launch shapes of bench/bench_gemv.py's sweeps on the H100 (2026-11-26) and the
    # H200 (2026-12-01: batch-1 row tiles after the scale loads were deferred; the ring for
    # the LM head up to batch 4, and, from the decode loop, for every shape at batch 1: 6144x4096
    # is the fused q/k/v).
    monkeypatch.delenv("MIXQ_GEMV_STAGES", raising=False)
    best = {(4096, 4096, 1): (2, 16, 4), (4096, 4096, 8): (2, 16, 0), (14336, 4096, 1): (2, 4, 4),
            (14336, 4096, 8): (2, 4, 0), (4096, 14336, 1): (1, 16, 4), (4096, 14336, 8): (2, 16, 0),
            (6144, 4096, 1): (1, 8, 4), (6144, 4096, 2): (1, 8, 0),
            (128256, 4096, 1): (2, 4, 4), (128256, 4096, 4): (2, 4, 4), (128256, 4096, 8): (2, 2, 0)}
    for (n, k, m), want in best.items():
        lay = _layout("int4:g128", n=16, k=k)
        lay = type(lay)(**{**lay.__dict__, "out_features": n})
        cfg = cuda_gemv.pick_config(m, lay)
        assert (cfg.row_tiles, cfg.warps, cfg.stages) == want, (n, k, m)
    # the benchmark switch: every shape on the ring, warps halved until it fits
    monkeypatch.setenv("MIXQ_GEMV_STAGES", "8")
    lay = _layout("int4:g128", n=4096, k=4096)
    cfg = cuda_gemv.pick_config(1, lay)
    assert (cfg.stages, cfg.unroll, cfg.row_tiles, cfg.warps) == (8, 1, 2, 8)
    assert cfg.ring_bytes() <= cuda_gemv.MAX_RING_BYTES
    monkeypatch.setenv("MIXQ_GEMV_STAGES", "6")
    with pytest.raises(ValueError, match="MIXQ_GEMV_STAGES"):
        cuda_gemv.pick_config(1, lay)


def test_ring_launch_shapes_are_checked_before_the_extension():
    kw = prepack(formats.parse("int4:g128").quantize(torch.randn(64, 256)), "int4:g128")
    x = torch.zeros(1, 256)
    assert cuda_gemv.GemvConfig(2, 1, 16, 8).ring_bytes() == 256 * 1024
    for cfg in (cuda_gemv.GemvConfig(1, 1, 4, 6), cuda_gemv.GemvConfig(1, 2, 4, 4),
                cuda_gemv.GemvConfig(2, 1, 16, 8)):
        with pytest.raises(ValueError, match="not a launch shape"):
            cuda_gemv._check_config(cfg)
    cuda_gemv._check_config(cuda_gemv.GemvConfig(2, 1, 8, 8))  # 128 KiB: accepted
    assert not cuda_gemv.supports(kw.layout, x)  # CPU input: never reaches the kernel
    # 9-16 rows (two B tiles): the register pipeline of one chunk per buffer, or the 4-slot ring
    cuda_gemv._check_config(cuda_gemv.GemvConfig(2, 1, 8, 4), m=16)
    cuda_gemv._check_config(cuda_gemv.GemvConfig(1, 1, 8, 0), m=9)
    for cfg in (cuda_gemv.GemvConfig(2, 1, 8, 8), cuda_gemv.GemvConfig(1, 2, 4, 0)):
        cuda_gemv._check_config(cfg, m=8)
        with pytest.raises(ValueError, match="for 9 activation rows"):
            cuda_gemv._check_config(cfg, m=9)


def test_batch_limits_per_format(monkeypatch):
    """int4, int8 and 3-bit codes with groups of >= 128 inputs take up to 16 activation rows (two
    B tiles), 3-bit with smaller groups up to 8 (its pre-scaled kernel has one); the heuristic
    never gives 9-16 rows a launch shape the kernel refuses, even under MIXQ_GEMV_STAGES=8."""
    assert cuda_gemv.max_batch(_layout("int4:g128", k=1024)) == 16
    assert cuda_gemv.max_batch(_layout("int4:g32", k=1024)) == 16
    assert cuda_gemv.max_batch(_layout("int3:g128", k=1024)) == 16
    assert cuda_gemv.max_batch(_layout("int3:ch", k=1024)) == 16
    assert cuda_gemv.max_batch(_layout("int3:g64", k=1024)) == 8
    assert cuda_gemv.max_batch(_layout("int8:ch", k=1024)) == 16
    for stages in (None, "0", "4", "8"):
        if stages is None:
            monkeypatch.delenv("MIXQ_GEMV_STAGES", raising=False)
        else:
            monkeypatch.setenv("MIXQ_GEMV_STAGES", stages)
        for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096), (128256, 4096), (200, 1088)]:
            lay = _layout("int4:g128", n=16, k=k)
            lay = type(lay)(**{**lay.__dict__, "out_features": n})
            for m in (9, 12, 16):
                cuda_gemv._check_config(cuda_gemv.pick_config(m, lay), m)


def test_pick_config_keeps_a_chunk_per_warp():
    for n, k in [(192, 576), (64, 128), (4096, 1024)]:
        lay = _layout("int4:g128", n=16, k=k)
        lay = type(lay)(**{**lay.__dict__, "out_features": n})
        cfg = cuda_gemv.pick_config(1, lay)
        assert 1 <= cfg.warps <= 16 and -(-k // 128) >= cfg.warps


def test_build_failure_falls_back_with_warning(monkeypatch, caplog):
    monkeypatch.setattr(cuda_gemv, "_ext", None)
    monkeypatch.setattr(cuda_gemv, "_error", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken_build():
        raise RuntimeError("nvcc exploded")

    monkeypatch.setattr(cuda_gemv, "_build", broken_build)
    monkeypatch.setenv("MIXQ_CUDA_GEMV", "1")
    with caplog.at_level(logging.WARNING, logger="mixq.kernels.cuda_gemv"):
        assert cuda_gemv.extension() is None
    assert "nvcc exploded" in cuda_gemv.build_error()
    assert any("falling back" in r.message or "unavailable" in r.message for r in caplog.records)
    # once failed: not preferred, so the dispatcher goes to Triton / the reference
    assert not cuda_gemv.preferred(_layout("int4:g64"), torch.randn(1, 576))


def test_cpu_dispatch_unchanged():
    kw = prepack(formats.parse("int4:g64").quantize(torch.randn(24, 576)), "int4:g64")
    x = torch.randn(2, 576, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, dequantize(kw).to(torch.bfloat16))
    assert torch.equal(qmatmul(x, kw), ref)


# --------------------------------------------------------------------------- GPU


def _gpu_case(spec: str, n: int, k: int, seed: int):
    return gpu_case(spec, n, k, seed)


def _check(kw, m, dtype, cfg=None, bias=False):
    return check(cuda_gemv.qmatmul, kw, m, dtype, cfg, bias)


ONE_TILE = [cuda_gemv.GemvConfig(1, 1, w) for w in (1, 2, 3, 4, 16)]  # the 3-bit and int8 kernels: 1..16 warps


def _check_configs(kw, dtype, configs, ms=(1, 3, 8)):
    """Every launch shape of `configs` at `ms` activation rows (bias at the second)."""
    assert cuda_gemv.layout_supported(kw.layout)
    for cfg in configs:
        for m in ms:
            _check(kw, m, dtype, cfg, bias=(m == ms[1]))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spec,n,k", [("int4:g64", 192, 576), ("int4:g128", 200, 1088), ("int4:g128:asym", 192, 576),
                                      ("int4:g64:asym", 200, 1088), ("int4:g32", 72, 544), ("int4:ch", 100, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_launch_shape_matches_reference(spec, n, k, dtype):
    _check_configs(_gpu_case(spec, n, k, seed=n + k), dtype,
                   [cuda_gemv.GemvConfig(r, u, w) for r in (1, 2) for u in (1, 2) for w in (1, 3, 16)])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spec,n,k", [("int4:g64", 192, 576), ("int4:g128", 200, 1088), ("int4:g128:asym", 192, 576),
                                      ("int4:g32:asym", 72, 4128), ("int4:ch", 100, 4096), ("int4:g128", 4096, 14336)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ring_pipeline_matches_reference(spec, n, k, dtype):
    """The shared-memory ring (stages 4 and 8): fewer chunks than slots (576 inputs = 4.5 chunks
    on one warp), more (4128 = 32.25 chunks, 14336 = 112), a partial last chunk, tail rows."""
    _check_configs(_gpu_case(spec, n, k, seed=n + k + 1), dtype,
                   [cuda_gemv.GemvConfig(r, 1, w, s) for r in (1, 2) for w in (1, 3, 8) for s in (4, 8)])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spec,n,k", [("int4:g64", 192, 576), ("int4:g128", 200, 1088), ("int4:g128:asym", 192, 576),
                                      ("int4:g32:asym", 72, 4128), ("int4:ch", 100, 4096), ("int4:g128", 4096, 14336)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_b_tiles_match_reference(spec, n, k, dtype):
    """int4 at 9-16 activation rows (two B tiles of 8 sharing each decoded weight): the register
    pipeline and the 4-slot ring, one and two row tiles, 1-8 warps; 9 rows (one row in the second
    tile, lanes past m reading row m - 1), 12 with bias, 16 (both tiles full)."""
    _check_configs(_gpu_case(spec, n, k, seed=n + k + 2), dtype,
                   [cuda_gemv.GemvConfig(r, 1, w, s) for r in (1, 2) for w in (1, 3, 8) for s in (0, 4)], ms=(9, 12, 16))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spec,n,k", [("int3:g64", 200, 1152), ("int3:g128:asym", 72, 4096), ("int3:g32", 136, 640),
                                      ("int3:ch", 100, 1024), ("int3:g128", 4096, 14336), ("int3:g128", 40, 1152),
                                      ("int3:g256:asym", 24, 640), ("int3:g64:asym", 56, 768), ("int3:g128", 88, 896)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("post", ["1", "0", "all"])
def test_int3_every_launch_shape_matches_reference(spec, n, k, dtype, post, monkeypatch):
    """The 3-bit kernels: odd row counts, partial 512-input chunks of 4, 8 and 12 units (1152,
    640; 768; 896: units stored interleaved with stride 1, 2, 3 there), every warp count;
    groups of >= 128 inputs through the post-scaled kernel from 5 rows, from 1 row
    (MIXQ_GEMV3_POST=all) or never (=0: the pre-scaled one). Random codes fill all 16 pair
    slots of the 3-bit unit, the one spread over three words included."""
    monkeypatch.setenv("MIXQ_GEMV3_POST", post)
    _check_configs(_gpu_case(spec, n, k, seed=n + k), dtype, ONE_TILE)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spec,n,k", [("int8:ch", 200, 1152), ("int8:g128", 72, 4096), ("int8:g128:asym", 136, 640),
                                      ("int8:ch", 4096, 14336), ("int8:g256", 24, 640)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_every_launch_shape_matches_reference(spec, n, k, dtype):
    """The 8-bit kernel: odd row counts, a partial last group (640 = 2.5 groups of 256), every
    warp count, codes over the whole 0..255 range (bf16 splits off the top bit)."""
    kw = _gpu_case(spec, n, k, seed=n + k)
    codes = kw.codes.view(torch.uint8)
    assert int(codes.min()) < 16 and int(codes.max()) > 240
    _check_configs(kw, dtype, ONE_TILE)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spec,n,k", [("int3:g128", 200, 1152), ("int3:g128:asym", 72, 4096), ("int3:ch", 100, 1024),
                                      ("int3:g256:asym", 24, 640), ("int3:g128:asym", 40, 896), ("int3:g128", 56, 768), ("int8:ch", 200, 1152), ("int8:g128:asym", 136, 640),
                                      ("int8:g256", 24, 640), ("int8:ch", 4096, 14336)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int3_int8_two_b_tiles_match_reference(spec, n, k, dtype):
    """The 3-bit post-scaled kernel and the 8-bit kernel at 9-16 rows (two B tiles): odd row
    counts, partial chunks and groups, every warp count; 3-bit with groups under 128 inputs is
    refused past 8 rows (its pre-scaled kernel has one B tile)."""
    _check_configs(_gpu_case(spec, n, k, seed=n + k + 3), dtype, ONE_TILE, ms=(9, 12, 16))
    kw = _gpu_case("int3:g64", 40, 1152, seed=5)
    x = torch.zeros(9, 1152, device="cuda", dtype=dtype)
    assert not cuda_gemv.supports(kw.layout, x)
    with pytest.raises(ValueError, match="M <= 16"):  # refused before the extension is called
        cuda_gemv.qmatmul(x, kw)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spec,half,k", [("int4:g128", 200, 1088), ("int4:g64:asym", 72, 576), ("int4:ch", 4096, 4096),
                                         ("int4:g32", 24, 544)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_launch_matches_the_two_steps(spec, half, k, dtype):
    """qmatmul(..., silu_mul=True) on W = [gate; up]: silu(gate) * up in one launch, against the
    float32 reference rounded where the separate steps round (each matmul output, silu, the
    product) and against the separate steps themselves; tail rows (200, 72, 24 gate rows)."""
    from mixq.kernels import decode_ops

    kw = _gpu_case(spec, 2 * half, k, seed=half + k)
    w_ref = dequantize(kw)
    for m in (1, 3, 8, 9, 16):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        b = torch.randn(2 * half, device="cuda", dtype=dtype) if m == 3 else None
        out = torch.full((m, half), float("nan"), device="cuda", dtype=dtype)
        y = cuda_gemv.qmatmul(x, kw, b, out=out, silu_mul=True)
        assert y.data_ptr() == out.data_ptr() and bool(torch.isfinite(y).all())
        full = (x.float() @ w_ref.T + (b.float() if b is not None else 0.0)).to(dtype)
        ref = decode_ops.reference_silu_mul(full[:, :half], full[:, half:]).float()
        assert float((y.float() - ref).norm() / ref.norm()) < REL_TOL, (m, dtype)
        two = cuda_gemv.qmatmul(x, kw, b)
        sep = decode_ops.silu_mul(two[:, :half], two[:, half:]).float()
        assert float((y.float() - sep).norm() / sep.norm()) < 1e-2, (m, dtype)
        rings = (cuda_gemv.GemvConfig(2, 1, 3, 4),) + ((cuda_gemv.GemvConfig(2, 1, 8, 8),) if m <= 8 else ())
        for cfg in rings:  # the cp.async ring
            out.fill_(float("nan"))
            yr = cuda_gemv.qmatmul(x, kw, b, config=cfg, out=out, silu_mul=True)
            assert bool(torch.isfinite(yr).all())
            assert float((yr.float() - ref).norm() / ref.norm()) < REL_TOL, (m, dtype, cfg)
    with pytest.raises(ValueError, match="silu_mul"):
        cuda_gemv.qmatmul(torch.zeros(1, 544, device="cuda", dtype=dtype),
                          _gpu_case("int4:g32", 25, 544, seed=0), silu_mul=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spec,half,k", [("int3:g128", 200, 1152), ("int3:g64:asym", 72, 640), ("int3:ch", 24, 896),
                                         ("int3:g128:asym", 4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("post", ["1", "0"])
def test_silu_mul_launch_3bit(spec, half, k, dtype, post, monkeypatch):
    """The 3-bit kernels' SiLU x up launch (a block's 16-row tile is 8 gate rows and the same 8 up
    rows): against the rounded float32 reference and the separate steps, every warp count, 1-16
    rows (1-8 with groups under 128 inputs), both kernels (MIXQ_GEMV3_POST=0: the pre-scaled one
    up to 8 rows), tail rows (200, 72, 24 gate rows), NaN-filled outputs."""
    from mixq.kernels import decode_ops

    monkeypatch.setenv("MIXQ_GEMV3_POST", post)
    kw = _gpu_case(spec, 2 * half, k, seed=half + k + 7)
    w_ref = dequantize(kw)
    for m in (1, 3, 8) + ((9, 16) if kw.layout.group_size >= 128 else ()):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        b = torch.randn(2 * half, device="cuda", dtype=dtype) if m == 3 else None
        full = (x.float() @ w_ref.T + (b.float() if b is not None else 0.0)).to(dtype)
        ref = decode_ops.reference_silu_mul(full[:, :half], full[:, half:]).float()
        two = cuda_gemv.qmatmul(x, kw, b)
        sep = decode_ops.silu_mul(two[:, :half], two[:, half:]).float()
        for warps in (1, 3, 8):
            out = torch.full((m, half), float("nan"), device="cuda", dtype=dtype)
            y = cuda_gemv.qmatmul(x, kw, b, config=cuda_gemv.GemvConfig(1, 1, warps), out=out, silu_mul=True)
            assert y.data_ptr() == out.data_ptr() and bool(torch.isfinite(y).all())
            assert float((y.float() - ref).norm() / ref.norm()) < REL_TOL, (m, warps)
            assert float((y.float() - sep).norm() / sep.norm()) < 1e-2, (m, warps)
    assert cuda_gemv.silu_mul_supported(kw.layout, x)
    assert not cuda_gemv.silu_mul_supported(_gpu_case(spec, 2 * half + 1, k, seed=1).layout, x)  # odd row count


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", range(1, 17))
def test_llama_shape_every_batch(m):
    kw = _gpu_case("int4:g128", 4096, 4096, seed=m)
    _check(kw, m, torch.bfloat16)
    _check(kw, m, torch.float16, bias=True)


@pytest.mark.gpu
@needs_cuda
def test_dispatcher_and_quantlinear_use_it(monkeypatch):
    from torch import nn

    monkeypatch.setenv("MIXQ_CUDA_GEMV", "1")

    from mixq.nn import QuantLinear

    torch.manual_seed(3)
    lin = nn.Linear(1024, 320).to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, "int4:g128").cuda()
    x = torch.randn(2, 3, 1024, device="cuda", dtype=torch.bfloat16)
    assert cuda_gemv.preferred(q.layout, x.reshape(-1, 1024))
    direct = cuda_gemv.qmatmul(x.reshape(6, 1024), q.weights(), q.bias).reshape(2, 3, 320)
    assert torch.equal(q(x), direct)
    ref = nn.functional.linear(x.float(), q.dequantized_weight(), q.bias.float())
    assert float((q(x).float() - ref).norm() / ref.norm()) < REL_TOL


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture_and_strided_input():
    kw = _gpu_case("int4:g128", 512, 4096, seed=5)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    y0 = cuda_gemv.qmatmul(x, kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda_gemv.qmatmul(x, kw)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y0)
    wide = torch.randn(3, 4096 + 1, device="cuda", dtype=torch.bfloat16)[:, 1:]  # misaligned rows
    ref = wide.float() @ dequantize(kw).T
    assert float((cuda_gemv.qmatmul(wide, kw).float() - ref).norm() / ref.norm()) < REL_TOL


# --------------------------------------------------------------------------- online transform


def test_norm_transform_supported_needs_cuda_half_and_a_block_of_256_to_8192():
    x = torch.randn(2, 4096, dtype=torch.bfloat16)
    assert not cuda_gemv.norm_transform_supported(x, 4096)  # a CPU tensor
    assert cuda_gemv.norm_transform(x, torch.ones(4096), 4096) is None
    if torch.cuda.is_available():
        xc = x.cuda()
        assert not cuda_gemv.norm_transform_supported(xc, 128) and not cuda_gemv.norm_transform_supported(xc, 16384)
        assert not cuda_gemv.norm_transform_supported(xc.float(), 4096)
        assert not cuda_gemv.norm_transform_supported(xc, 3000)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,block,rows", [(4096, 4096, 1), (14336, 2048, 3), (768, 256, 5), (16384, 8192, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_transform_matches_reference(n, block, rows, dtype, monkeypatch):
    """The butterfly kernel (blocks of 256..8192, one to seven blocks per row) against the
    float32 torch transform of the same input, with and without smoothing: within the output's
    own rounding; and the same values as the Triton kernel to rounding."""
    from mixq.kernels import transform as T

    torch.manual_seed(n + rows)
    x = (torch.randn(rows, n, device="cuda") * 3).to(dtype)
    signs = torch.where(torch.rand(n, device="cuda") < 0.5, -1.0, 1.0)
    s = torch.rand(n, device="cuda") + 0.5
    bound = 6e-3 if dtype == torch.bfloat16 else 8e-4  # about twice the output rounding
    for smooth in (s, None):
        ref = T.reference_transform(x.float(), smooth, signs, block)
        got = cuda_gemv.norm_transform(x, signs, block, smooth=smooth)
        assert got is not None and got.dtype == dtype and got.shape == x.shape
        assert float((got.float() - ref).norm() / ref.norm()) < bound, smooth is not None
        assert torch.equal(T.online_transform(x, smooth, signs, block), got)  # the route takes it
        monkeypatch.setenv("MIXQ_CUDA_TRANSFORM", "0")
        tri = T.online_transform(x, smooth, signs, block)
        monkeypatch.delenv("MIXQ_CUDA_TRANSFORM")
        assert float((tri.float() - got.float()).norm() / ref.norm()) < bound


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,block", [(4096, 4096), (2048, 256)])
def test_cuda_norm_transform_matches_norm_then_transform(n, block):
    """RMSNorm (+ residual add) and the transform in one launch against the Triton RMSNorm then
    the torch transform: h + delta to the bit, the output within its rounding, and the
    decode-step entry point (decode_ops.add_rms_norm) taking this kernel."""
    from mixq.kernels import decode_ops as ops
    from mixq.kernels import transform as T

    torch.manual_seed(n)
    h, d = (torch.randn(3, n, device="cuda").to(torch.bfloat16) for _ in range(2))
    w = (torch.rand(n, device="cuda") + 0.5).to(torch.bfloat16)
    signs = torch.where(torch.rand(n, device="cuda") < 0.5, -1.0, 1.0)
    s = torch.rand(n, device="cuda") + 0.5
    h_ref, r_ref = ops.reference_add_rms_norm(h, d, w, 1e-5)
    ref = T.reference_transform(r_ref.float(), s, signs, block)
    h_out = torch.empty_like(h)
    got = cuda_gemv.norm_transform(h, signs, block, smooth=s, delta=d, weight=w, eps=1e-5, h_out=h_out)
    assert torch.equal(h_out, h_ref)
    assert float((got.float() - ref).norm() / ref.norm()) < 6e-3
    h2, got2 = ops.add_rms_norm(h, d, w, 1e-5, (s, signs, block))
    assert torch.equal(h2, h_ref)
    if ops.norm_transform_ok(n, s, signs, block):  # a row the Triton kernel takes runs there
        assert float((got2.float() - ref).norm() / ref.norm()) < 6e-3
    else:
        assert torch.equal(got2, got)
    alone = ops.add_rms_norm(h, None, w, 1e-5, (None, signs, block))
    ref1 = T.reference_transform(ops.reference_add_rms_norm(h, None, w, 1e-5)[1].float(), None, signs, block)
    assert float((alone.float() - ref1).norm() / ref1.norm()) < 6e-3
    with pytest.raises(RuntimeError, match="norm_transform"):  # the binding names bad operands
        cuda_gemv.extension().norm_transform(h, d, None, None, signs, None, torch.empty_like(h), block, 1e-5)


@pytest.mark.gpu
@needs_cuda
def test_decode_step_with_transforms_in_bf16(monkeypatch):
    """A bf16 Llama of width 768 (rotation blocks of 256, which the Triton RMSNorm kernel does
    not take) with transforms on every unit (q/k/v and gate/up sharing one each): the fused
    decode step (the groups' transforms inside the CUDA RMSNorm kernel, o and down through the
    CUDA transform) gives the unfused step's logits, prefill and one decode step, within bf16
    rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixq.export.decoder import StaticDecoder
    from mixq.nn import QuantLinear
    from mixq.quantizers import UnitTransforms

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    fmt = formats.parse("int4:g128")
    for i, ly in enumerate(model.model.layers):
        for j, (mod, names, smooth) in enumerate([(ly.self_attn, ("q_proj", "k_proj", "v_proj"), True),
                                                  (ly.self_attn, ("o_proj",), True), (ly.mlp, ("gate_proj", "up_proj"), False),
                                                  (ly.mlp, ("down_proj",), True)]):
            k = getattr(mod, names[0]).in_features
            tf = UnitTransforms(torch.rand(k) + 0.5 if smooth else None, 4 * i + j, None, None)
            for name in names:
                w = getattr(mod, name).weight.detach().float()
                setattr(mod, name, QuantLinear.from_qtensor(fmt.quantize(w), fmt, transforms=tf).cuda())
    calls = []
    real = cuda_gemv.norm_transform
    monkeypatch.setattr(cuda_gemv, "norm_transform",
                        lambda *a, **kw: calls.append(kw.get("weight") is not None) or real(*a, **kw))
    ids = torch.tensor([[1, 17, 42, 99, 5]], device="cuda")
    fused, plain = (StaticDecoder(model, max_len=32, fused=f, use_graph=False) for f in (True, False))
    for t, pos in ((ids, 0), (ids[:, :1], 5)):
        p = torch.tensor([pos], device="cuda")
        a, b = fused.forward(t, p).float(), plain.forward(t, p).float()
        assert float((a - b).norm() / b.norm()) < 3e-2, pos
    assert calls.count(True) == 2 * 2 * 2  # two norms per layer, two layers, two forwards


@pytest.mark.gpu
@needs_cuda
def test_decode_step_of_twelve_sequences_on_the_two_tile_gemv(monkeypatch):
    """A bf16 Llama with a mixed plan (int4 q/k/v and down, int8 o_proj, int3:g128 gate/up)
    decoding 12 sequences at once: the fused step, whose matmuls take the GEMV's two-tile
    kernels (12 activation rows), gives the logits of the unfused step on the reference path
    (dequantize, then matmul), prefill and one decode step, within bf16 rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixq.export.decoder import StaticDecoder
    from mixq.nn import QuantLinear

    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=768, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    plan = {"q_proj": "int4:g128", "k_proj": "int4:g128", "v_proj": "int4:g128", "o_proj": "int8:ch",
            "gate_proj": "int3:g128", "up_proj": "int3:g128", "down_proj": "int4:g128"}
    for ly in model.model.layers:
        for mod in (ly.self_attn, ly.mlp):
            for name, spec in plan.items():
                if hasattr(mod, name):
                    fmt = formats.parse(spec)
                    w = getattr(mod, name).weight.detach().float()
                    setattr(mod, name, QuantLinear.from_qtensor(fmt.quantize(w), fmt).cuda())
    rows = []
    real = cuda_gemv.qmatmul
    monkeypatch.setattr(cuda_gemv, "qmatmul", lambda x, kw, *a, **k: rows.append((kw.layout.bits, x.shape[0]))
                        or real(x, kw, *a, **k))
    ids = torch.randint(0, 256, (12, 5), device="cuda")
    fused = StaticDecoder(model, max_len=32, batch=12, fused=True, use_graph=False)
    plain = StaticDecoder(model, max_len=32, batch=12, fused=False, use_graph=False)
    for t, pos in ((ids, 0), (ids[:, :1], 5)):
        p = torch.tensor([pos], device="cuda")
        rows.clear()
        a = fused.forward(t, p).float()
        if t.shape[1] == 1:  # the decode step: every matmul of the blocks on the two-tile GEMV
            assert {(b, m) for b, m in rows} == {(3, 12), (4, 12), (8, 12)}, rows
            assert len(rows) == 2 * 4  # q/k/v, o, gate/up, down per layer (q/k/v and gate/up fused)
        with monkeypatch.context() as mp:
            mp.setenv("MIXQ_KERNEL", "reference")
            b = plain.forward(t, p).float()
        assert bool(torch.isfinite(a).all())
        assert float((a - b).norm() / b.norm()) < 3e-2, pos


def test_two_tile_routes_and_launch_shapes(monkeypatch):
    """int4 at 9-12 rows goes to the GEMV except with zero points, on 4097-8192-row weights and
    on LM heads (the H200 sweep, bench/bench_gemv16.py); int8 and 3-bit codes with groups of
    >= 128 inputs at 9-16 rows; the launch shapes of the sweep, with warps halved until each
    keeps a 128-input chunk."""
    def lay(spec, n, k):
        base = _layout(spec, n=16, k=k)
        return type(base)(**{**base.__dict__, "out_features": n})

    for n, k, want in [(14336, 4096, True), (4096, 4096, True), (4096, 14336, True), (28672, 4096, True),
                       (6144, 4096, False), (128256, 4096, False)]:
        for m in (9, 12):
            assert cuda_gemv.gemv_beats_gemm(lay("int4:g128", n, k), m) is want, (n, k, m)
        assert not cuda_gemv.gemv_beats_gemm(lay("int4:g128", n, k), 13)
        assert not cuda_gemv.gemv_beats_gemm(lay("int4:g128", n, k), 8)  # the GEMV's own range
    assert cuda_gemv.gemv_beats_gemm(lay("int4:g64", 14336, 4096), 12)
    assert not cuda_gemv.gemv_beats_gemm(lay("int4:g128:asym", 14336, 4096), 9)  # zero points: the CUDA GEMM
    for spec in ("int3:g128", "int3:ch", "int8:ch", "int8:g128:asym"):  # 3-bit (groups >= 128) and int8: 9-16 rows
        for n in (4096, 6144, 14336, 28672):
            assert cuda_gemv.gemv_beats_gemm(lay(spec, n, 4096), 9) and cuda_gemv.gemv_beats_gemm(lay(spec, n, 4096), 16)
            assert not cuda_gemv.gemv_beats_gemm(lay(spec, n, 4096), 17)
    assert not cuda_gemv.gemv_beats_gemm(lay("int3:g64", 14336, 4096), 9)  # one B tile only
    shapes = {(14336, 4096): (2, 4, 4), (4096, 4096): (1, 8, 0), (4096, 14336): (2, 16, 4), (6144, 4096): (1, 4, 0),
              (28672, 4096): (2, 2, 0), (128256, 4096): (2, 2, 4), (200, 256): (2, 2, 4)}
    for (n, k), want in shapes.items():
        cfg = cuda_gemv.pick_config(12, lay("int4:g128", n, k))
        assert (cfg.row_tiles, cfg.warps, cfg.stages) == want, (n, k)
    # int8 from 8 rows and 3-bit (bench_gemv16.py, bench_gemv.py --int3-warps): warps per shape, one row tile
    for spec, m, n, k, warps in [("int8:ch", 12, 14336, 4096, 4), ("int8:ch", 8, 4096, 14336, 8), ("int8:ch", 16, 6144, 4096, 4),
                                 ("int8:ch", 4, 4096, 14336, 16), ("int3:g128", 12, 14336, 4096, 2),
                                 ("int3:g128", 8, 14336, 4096, 2), ("int3:g128", 1, 14336, 4096, 4),
                                 ("int3:g128", 1, 28672, 4096, 4),
                                 ("int3:g128", 8, 28672, 4096, 8),
                                 ("int3:g128", 12, 4096, 14336, 8), ("int3:g128", 16, 28672, 4096, 8)]:
        cfg = cuda_gemv.pick_config(m, lay(spec, n, k))
        assert (cfg.row_tiles, cfg.warps) == (1, warps), (spec, m, n, k)
    monkeypatch.setenv("MIXQ_GEMV_TWO_TILES", "0")  # the benchmark switch: the routes before
    assert not cuda_gemv.gemv_beats_gemm(lay("int4:g128", 14336, 4096), 9)
    assert not cuda_gemv.gemv_beats_gemm(lay("int3:g128", 14336, 4096), 9)
