"""Shared checks of the hand-written CUDA kernels (tests/test_kernels_cuda*.py): random packed
weights on the GPU, and one call of a kernel against the float32 reference into a NaN-poisoned
output."""

from __future__ import annotations

import torch

from mixq import formats
from mixq.kernels import dequantize, prepack

REL_TOL = 1e-2  # bf16 rounding of x, the weights and y is ~3e-3


def gpu_case(spec: str, n: int, k: int, seed: int):
    torch.manual_seed(seed)
    fmt = formats.parse(spec)
    return prepack(fmt.quantize(torch.randn(n, k, device="cuda")), fmt)


def check(fn, kw, m, dtype, cfg=None, bias=False):
    """fn(x, kw, bias, cfg, out=...) must write all of `out` and match the reference."""
    from mixq.kernels import cuda_gemv

    n, k = kw.layout.out_features, kw.layout.in_features
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    ref = x.float() @ dequantize(kw).T + (b.float() if bias else 0.0)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    y = fn(x, kw, b, cfg, out=out)
    assert y is not None, cuda_gemv.build_error()
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    assert torch.isfinite(y).all(), f"{kw.layout.fmt} m={m} {cfg}: output not fully written"
    err = float((y.float() - ref).norm() / ref.norm())
    assert err < REL_TOL, f"{kw.layout.fmt} {dtype} m={m} {cfg}: rel err {err:.2e}"
    return y
