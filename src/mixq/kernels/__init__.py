"""mixq.kernels: matmuls that read packed quantized weights directly.

    kw = prepack(fmt.quantize(w), fmt)      # KernelWeights: int32 unit words + native scales
    y = qmatmul(x, kw, bias)                # x @ dequant(W)^T (+ bias), x's dtype

`qmatmul` runs, on a CUDA device with a bf16/fp16 input: the hand-written CUDA GEMV
(`cuda_gemv`, built on first use) for int4 layouts at batch <= 8 where `cuda_gemv.preferred`
says so (opt-in with MIXQ_CUDA_GEMV=1 until it is measured on a GPU); else
the Triton kernel (`triton_qmm`) when Triton is installed and the layout is supported; and
otherwise the pure-torch reference (`packed.reference_matmul`: dequantize, then one matmul),
which the kernels are tested against. Importing this package never needs Triton, nvcc or a GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from mixq.errors import FormatError
from mixq.kernels.packed import (KernelWeights, PackedLayout, dequantize, pack_codes, prepack,
                                 reference_matmul, unpack_codes)
from mixq.kernels import cuda_gemv  # noqa: E402  (after packed, which it imports)

HAS_TRITON = importlib.util.find_spec("triton") is not None


def kernel_available(kw: KernelWeights, x: torch.Tensor) -> bool:
    """True when the Triton kernel can compute `x @ dequant(kw)^T` (else: reference path)."""
    if not (HAS_TRITON and x.is_cuda and kw.codes.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    from mixq.kernels import triton_qmm

    try:
        triton_qmm.check_supported(kw.layout)
    except FormatError:
        return False
    return True


def qmatmul(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequant(W)^T (+ bias)` for x of shape (..., in_features), in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if kw.codes.is_cuda and cuda_gemv.preferred(kw.layout, x2):
        y = cuda_gemv.qmatmul(x2, kw, bias)  # None if the extension could not be built
        if y is not None:
            return y.reshape(*lead, y.shape[-1])
    if kernel_available(kw, x2):
        from mixq.kernels import triton_qmm

        y = triton_qmm.qmatmul(x2, kw, bias)
    else:
        y = reference_matmul(x2, kw, bias)
    return y.reshape(*lead, y.shape[-1])


__all__ = ["KernelWeights", "PackedLayout", "prepack", "qmatmul", "reference_matmul", "dequantize",
           "pack_codes", "unpack_codes", "kernel_available", "HAS_TRITON"]
