"""mixq.kernels: matmuls that read packed quantized weights directly.

    kw = prepack(fmt.quantize(w), fmt)      # KernelWeights: int32 unit words + native scales
    y = qmatmul(x, kw, bias)                # x @ dequant(W)^T (+ bias), x's dtype

`qmatmul` runs, on a CUDA device with a bf16/fp16 input, the kernel `route` names for the
layout and the batch (rows of x):

* "cuda_gemv": the hand-written CUDA GEMV (`cuda_gemv`, built on first use) for int4, int8
  and 3-bit layouts at batch <= `CUDA_GEMV_MAX_BATCH`, and at 9-16 rows where it measured
  faster than the other kernels (`cuda_gemv.gemv_beats_gemm`: int8 and 3-bit codes with groups
  of >= 128 inputs; int4 at 9-12 rows without zero points, outside fused q/k/v and LM heads);
* "cuda_tc": the hand-written CUDA tensor-core GEMM (`cuda_gemv.gemm`, same extension) for
  int4 layouts above that batch where it measured faster than the Triton kernel
  (`cuda_gemv.gemm_preferred`: zero points, groups under 128 inputs, more than 64 rows, or
  stream-K launches from 17 rows);
* "tc": the Triton tensor-core kernel (`triton_tc`) for the layouts it takes (1, 2, 4,
  8-bit codes and the 3-bit layout of 3-word units), above the batch sizes where the older kernels
  measured faster (`_OLD_KERNEL_MAX_BATCH`);
* "triton": the older Triton kernels (`triton_qmm`: CUDA-core GEMV, tensor-core GEMM) below
  those batch sizes and for the remaining layouts (6-bit codes, other multi-word units);

and otherwise the pure-torch reference (`packed.reference_matmul`: dequantize, then one
matmul), which every kernel is tested against. MIXQ_KERNEL=cuda_gemv|cuda_tc|tc|triton|reference
forces one path where it applies (for benchmarks). Importing this package never needs
Triton, nvcc or a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from mixq.errors import FormatError
from mixq.kernels.packed import (KernelWeights, PackedLayout, dequantize, pack_codes, prepack,
                                 reference_matmul, unpack_codes)
from mixq.kernels import cuda_gemv  # noqa: E402  (after packed, which it imports)

HAS_TRITON = importlib.util.find_spec("triton") is not None
ROUTES = ("cuda_gemv", "cuda_tc", "tc", "triton", "reference")
# Batch sizes up to which the CUDA int4 GEMV beats the tensor-core kernel (H200 sweep,
# bench/KERNEL_NOTES.md); above it the tensor-core kernel takes int4 too.
CUDA_GEMV_MAX_BATCH = 8


def _OLD_KERNEL_MAX_BATCH(layout: PackedLayout) -> int:
    """Batch sizes up to which the older Triton kernels (`triton_qmm`) beat the tensor-core
    kernel on the H200 (bench/KERNEL_NOTES.md, 2026-11-30): 3-bit codes up to 16 rows,
    int4 with groups under 64 inputs at every batch, other layouts at GEMV sizes (<= 4)."""
    if layout.bits == 3:
        return 16
    if layout.value_mode == "affine" and layout.group_size < 64 and layout.codes_per_unit == 8:
        return 1 << 30
    return 4


def _triton_ok(x: torch.Tensor, kw: KernelWeights) -> bool:
    return HAS_TRITON and x.is_cuda and kw.codes.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def route(kw: KernelWeights, x: torch.Tensor) -> str:
    """Which kernel `qmatmul` runs for this weight and this 2-D input (see module docstring)."""
    forced = os.environ.get("MIXQ_KERNEL")
    if forced is not None and forced not in ROUTES:
        raise FormatError(f"MIXQ_KERNEL={forced!r}: expected one of {ROUTES}")
    m = x.shape[0]
    if forced in (None, "cuda_gemv") and kw.codes.is_cuda and cuda_gemv.preferred(kw.layout, x):
        if forced == "cuda_gemv" or m <= CUDA_GEMV_MAX_BATCH or cuda_gemv.gemv_beats_gemm(kw.layout, m):
            return "cuda_gemv"
    if forced == "cuda_tc" and kw.codes.is_cuda and cuda_gemv.gemm_available(kw.layout, x):
        return "cuda_tc"
    if forced is None and m > CUDA_GEMV_MAX_BATCH and kw.codes.is_cuda and cuda_gemv.gemm_preferred(kw.layout, x):
        return "cuda_tc"
    if forced == "reference" or not _triton_ok(x, kw):
        return "reference"
    from mixq.kernels import triton_qmm, triton_tc

    try:
        triton_qmm.check_supported(kw.layout)
        old_ok = True
    except FormatError:
        old_ok = False
    if forced in (None, "tc") and triton_tc.supports(kw.layout):
        if forced == "tc" or not old_ok or m > _OLD_KERNEL_MAX_BATCH(kw.layout):
            return "tc"
    return "triton" if old_ok else "reference"


def kernel_available(kw: KernelWeights, x: torch.Tensor) -> bool:
    """True when a GPU kernel (not the reference path) computes `x @ dequant(kw)^T`."""
    return route(kw, x.reshape(-1, x.shape[-1])) != "reference"


def qmatmul(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequant(W)^T (+ bias)` for x of shape (..., in_features), in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    path = route(kw, x2)
    y = None
    if path in ("cuda_gemv", "cuda_tc"):
        # None if the extension could not be built
        y = cuda_gemv.qmatmul(x2, kw, bias) if path == "cuda_gemv" else cuda_gemv.gemm(x2, kw, bias)
        if y is None:
            path = "tc" if _triton_ok(x2, kw) else "reference"
    if path == "tc":
        from mixq.kernels import triton_tc

        y = triton_tc.qmatmul(x2, kw, bias)
    elif path == "triton":
        from mixq.kernels import triton_qmm

        y = triton_qmm.qmatmul(x2, kw, bias)
    elif y is None:
        y = reference_matmul(x2, kw, bias)
    return y.reshape(*lead, y.shape[-1])


def silu_mul_applies(kw: KernelWeights, x: torch.Tensor) -> bool:
    """Whether `qmatmul_silu_mul` runs its one launch for this weight and an input shaped like
    x (..., in_features): where `qmatmul` would take the CUDA GEMV, for int4 or 3-bit codes with
    an even number of rows."""
    x2 = x.reshape(-1, x.shape[-1])
    return route(kw, x2) == "cuda_gemv" and cuda_gemv.silu_mul_supported(kw.layout, x2)


def qmatmul_silu_mul(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """silu(gate) * up for W = [gate; up] (2H rows) and x of shape (..., in_features), (..., H)
    in x's dtype, in one CUDA GEMV launch where `silu_mul_applies`; None elsewhere (the caller
    runs `qmatmul` and the element-wise step)."""
    if not silu_mul_applies(kw, x):
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = cuda_gemv.qmatmul(x2, kw, bias, silu_mul=True)
    return None if y is None else y.reshape(*lead, y.shape[-1])


__all__ = ["KernelWeights", "PackedLayout", "prepack", "qmatmul", "qmatmul_silu_mul", "silu_mul_applies", "reference_matmul", "dequantize",
           "pack_codes", "unpack_codes", "kernel_available", "route", "HAS_TRITON", "ROUTES"]
