"""Programmatic dependent launch (PDL) for mixq's Triton kernels, as the CUDA GEMV and GEMM
use it (csrc/gemv_int4.h `pdl_enabled`): on sm_90+ devices, unless MIXQ_PDL=0, a kernel is
launched with Triton's `launch_pdl` and starts while the kernel before it finishes.

    kernel[grid](..., **launch_kw(x.device))   # GDC=True plus launch_pdl, or GDC=False
    # inside the kernel, before anything that the previous kernel writes is read:
    enter(GDC)

Each kernel then lets the next one start at once (so a following matmul streams its weights
while this kernel waits and runs) and waits for the previous kernel before it reads its
inputs; constants (weights, signs, scales) may be loaded before `enter`. H200, int4
Llama-3-8B decode step: 2.53 -> 2.36 ms/token (BENCHMARKS.md section 5).
"""

from __future__ import annotations

import os

import torch

import triton
import triton.language as tl

_PDL_DEVICES: dict[int, bool] = {}
# grid dependency control in this Triton (3.4+); older ones launch these kernels without PDL
_HAS_GDC = hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


def pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA device of sm_90 or newer, a Triton
    that has grid dependency control, and MIXQ_PDL not 0 (read at every call)."""
    if os.environ.get("MIXQ_PDL") == "0" or device.type != "cuda" or not _HAS_GDC:
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_DEVICES:
        _PDL_DEVICES[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL_DEVICES[idx]


def launch_kw(device: torch.device) -> dict:
    """Launch keywords of a kernel that calls `enter(GDC)`: GDC and, with PDL, Triton's
    launch_pdl (not passed at all to a Triton without it)."""
    return {"GDC": True, "launch_pdl": True} if pdl(device) else {"GDC": False}


@triton.jit
def enter(GDC: tl.constexpr):
    """GDC: let the next kernel start, then wait until the previous one has finished and its
    writes are visible. A no-op without PDL."""
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
