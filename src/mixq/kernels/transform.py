"""The online input transform of a `QuantLinear` in one kernel: x' = ((x / s) * d) H, with s
the smoothing scales, d the random signs and H = blockdiag(H_b, ...) the orthonormal
Sylvester Hadamard matrix of the rotation block b (see `quantizers.hadamard`).

    xt = online_transform(x, smooth, signs, block)   # (..., in), x's dtype

On a CUDA device with Triton, one launch computes it (`_transform_kernel`): a program takes
one block of b inputs of 16 rows (b <= 128: X (16, b) @ H_b on the tensor cores) or 16 rows
of the product for one row (b >= 256: the block viewed as X (f1, f2), f1 * f2 = b, and H_b =
H_f1 ⊗ H_f2 gives H_f1 X H_f2, two small tensor-core products, f1 / 16 programs per block).
Half-precision inputs multiply as split bfloat16 products (`split_products`), float32 ones
as tf32x3 products; both about float32 accuracy, rounded once to x's dtype. In the decode
step's chain on the H200 it adds 2.6-4.1 µs per Llama-3-8B unit (BENCHMARKS.md section 5,
fourth pass; the CUDA kernel below 1.7-2.8 µs). With programmatic
dependent launch (`kernels.pdl`) the launch overlaps the kernel before it. Elsewhere, and
for blocks below 16 or above 2**14, the same math runs as torch ops (`reference_transform`),
which the kernel is tested against. For rotation blocks of 256..8192 inputs and half-precision
CUDA inputs the CUDA kernel `cuda_gemv.norm_transform` (butterflies in registers, across
lanes and warps; built with the CUDA GEMV extension) runs instead where it is available
(MIXQ_CUDA_TRANSFORM=0: this Triton kernel). Units that read the same input with the same transform
(q/k/v, gate/up) compute it once (`nn.LinearGroup`), and in the decode loop the RMSNorm
kernel that produces their input applies it (`decode_ops.add_rms_norm`).
"""

from __future__ import annotations

import importlib.util
import math

import torch

from mixq.errors import FormatError
from mixq.quantizers.hadamard import fwht, hadamard_matrix

HAS_TRITON = importlib.util.find_spec("triton") is not None
_FACTORS: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}


def reference_transform(x: torch.Tensor, smooth: torch.Tensor | None, signs: torch.Tensor | None,
                        block: int | None) -> torch.Tensor:
    """x' = ((x / s) * d) blockdiag(H_b) in float32 (float64 stays float64), in x's dtype."""
    h = x if x.dtype == torch.float64 else x.float()
    if smooth is not None:
        h = h / smooth.to(device=h.device, dtype=h.dtype)
    if signs is not None:
        h = h * signs.to(device=h.device, dtype=h.dtype)
        n = h.shape[-1]
        h = fwht(h.reshape(*h.shape[:-1], n // block, block)).reshape(h.shape)
    return h.to(x.dtype)


def split_block(block: int) -> tuple[int, int]:
    """(f1, f2) with f1 * f2 = block, both powers of two >= 16 (f2 >= f1), for block >= 256;
    (1, block) for 16 <= block <= 128."""
    if block < 16 or block & (block - 1) or block > 1 << 14:
        raise FormatError(f"the fused transform takes power-of-two blocks of 16..16384 inputs, got {block}")
    if block <= 128:
        return 1, block
    k = block.bit_length() - 1
    f2 = 1 << ((k + 1) // 2)
    return block // f2, f2


def _factor_matrices(block: int, device: torch.device, signs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal H_f1 (or a dummy) and H_f2 as float32 on `device`, cached; signs=True: the
    same matrices unnormalised (entries +-1, exact in bfloat16) as bfloat16."""
    key = (block, str(device), signs)
    if key not in _FACTORS:
        f1, f2 = split_block(block)
        if signs:
            h2 = (hadamard_matrix(f2) * math.sqrt(f2)).round().to(device=device, dtype=torch.bfloat16)
            h1 = (hadamard_matrix(f1) * math.sqrt(f1)).round().to(device=device, dtype=torch.bfloat16) if f1 > 1 else h2
        else:
            h2 = hadamard_matrix(f2).to(device)
            h1 = hadamard_matrix(f1).to(device) if f1 > 1 else h2
        _FACTORS[key] = (h1, h2)
    return _FACTORS[key]


def f32_on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A transform vector (smoothing scales, signs) as the kernels read it: contiguous float32
    on `device` (t itself when it already is); None stays None."""
    return None if t is None else t.to(device=device, dtype=torch.float32).contiguous()


def split_products(dtype: torch.dtype) -> bool:
    """Whether the kernels multiply by the Hadamard factors as two bfloat16 tensor-core products
    (`_dot_hx` / `_dot_xh`: the float32 operand split into high and low bfloat16 halves, the factor's +-1
    entries exact, float32 sums, the 1 / sqrt(b) scale applied once at the end; about 2**-16
    relative error, far below a half-precision output's rounding) rather than tf32x3 ones
    (about float32 accuracy, three products each): for bfloat16 and float16 inputs."""
    return dtype in (torch.bfloat16, torch.float16)


def kernel_ok(x: torch.Tensor, block: int | None) -> bool:
    """Whether the Triton kernel takes this input (CUDA, Triton, half or float input, a
    rotation block of 16..16384 inputs, or no rotation)."""
    if not (HAS_TRITON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return False
    if block is None:  # smoothing only: chunks of gcd(in, 128) inputs
        return math.gcd(x.shape[-1], 128) >= 16
    return 16 <= block <= 1 << 14 and block & (block - 1) == 0


if HAS_TRITON:
    import triton
    import triton.language as tl

    from mixq.kernels.pdl import enter as pdl_enter
    from mixq.kernels.pdl import launch_kw

    @triton.jit
    def _split_bf16(x):
        """x (float32) as two bfloat16 halves, hi + lo = x to about 2**-16 relative."""
        hi = x.to(tl.bfloat16)
        return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)

    @triton.jit
    def _dot_hx(hm, x, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        """hm @ x, hm a Hadamard factor, x float32. SPLIT: hm holds +-1 in bfloat16 and x goes
        in as two bfloat16 halves whose products are exact (float32 sums); else tl.dot at
        PRECISION."""
        if SPLIT:  # (an else, not an early return: Triton compiles what follows a constexpr return)
            hi, lo = _split_bf16(x)
            y = tl.dot(hm, lo, acc=tl.dot(hm, hi))
        else:
            y = tl.dot(hm, x, input_precision=PRECISION)
        return y

    @triton.jit
    def _dot_xh(x, hm, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        """x @ hm, as `_dot_hx`."""
        if SPLIT:
            hi, lo = _split_bf16(x)
            y = tl.dot(lo, hm, acc=tl.dot(hi, hm))
        else:
            y = tl.dot(x, hm, input_precision=PRECISION)
        return y

    @triton.jit
    def _transform_kernel(x_ptr, s_ptr, d_ptr, h1_ptr, h2_ptr, y_ptr, M, K, stride_xm, stride_ym, hscale,
                          HAS_S: tl.constexpr, ROTATE: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
                          BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr, GDC: tl.constexpr):
        """One program: rows [pid_m * BLOCK_M, +BLOCK_M) (one row when F1 > 1) x one block of
        F1 * F2 inputs. GDC: launched with programmatic dependent launch (`kernels.pdl`)."""
        pdl_enter(GDC)
        pid_m = tl.program_id(0)
        pid_b = tl.program_id(1)
        B: tl.constexpr = F1 * F2
        if F1 == 1:  # (BLOCK_M, B) @ H_B
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = pid_b * B + tl.arange(0, B)
            mask = (rows < M)[:, None]
            h = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
            h = h.to(tl.float32)
            if HAS_S:
                h = h / tl.load(s_ptr + cols)[None, :]
            if ROTATE:
                h = h * tl.load(d_ptr + cols)[None, :]
                kk = tl.arange(0, B)
                hb = tl.load(h2_ptr + kk[:, None] * B + kk[None, :])
                h = _dot_xh(h, hb, SPLIT, PRECISION) * hscale
            tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], h.to(y_ptr.dtype.element_ty),
                     mask=mask)
        else:  # one row: X (F1, F2) -> rows 16 p .. 16 p + 15 of H_F1 X H_F2, p = program_id(2)
            row = pid_m
            a = tl.arange(0, F1)
            a16 = tl.program_id(2) * 16 + tl.arange(0, 16)
            b = tl.arange(0, F2)
            cols = pid_b * B + a[:, None] * F2 + b[None, :]  # (F1, F2)
            h = tl.load(x_ptr + row.to(tl.int64) * stride_xm + cols).to(tl.float32)
            if HAS_S:
                h = h / tl.load(s_ptr + cols)
            h = h * tl.load(d_ptr + cols)
            h1 = tl.load(h1_ptr + a16[:, None] * F1 + a[None, :])
            h2 = tl.load(h2_ptr + b[:, None] * F2 + b[None, :])
            h = _dot_hx(h1, h, SPLIT, PRECISION)
            h = _dot_xh(h, h2, SPLIT, PRECISION) * hscale
            out = pid_b * B + a16[:, None] * F2 + b[None, :]
            tl.store(y_ptr + row.to(tl.int64) * stride_ym + out, h.to(y_ptr.dtype.element_ty))


def online_transform(x: torch.Tensor, smooth: torch.Tensor | None = None, signs: torch.Tensor | None = None,
                     block: int | None = None, *, use_kernel: bool | None = None) -> torch.Tensor:
    """((x / s) * d) blockdiag(H_block) for x (..., in); `signs` and `block` together (the
    rotation) or neither. use_kernel: None = the Triton kernel where `kernel_ok`; True forces
    it (also under TRITON_INTERPRET=1 on CPU tensors); False the torch ops."""
    if (signs is None) != (block is None):
        raise FormatError("online_transform: give the rotation's signs and block together")
    if smooth is None and signs is None:
        return x
    n = x.shape[-1]
    if block is not None and n % block:
        raise FormatError(f"online_transform: in_features={n} is not a multiple of the rotation block {block}")
    if use_kernel is None:
        use_kernel = kernel_ok(x, block)
    if not use_kernel:
        return reference_transform(x, smooth, signs, block)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    rotate = block is not None
    s32, d32 = f32_on(smooth, x.device), f32_on(signs, x.device)
    if rotate and x.is_cuda:  # the CUDA butterfly kernel, for blocks of 256..8192 inputs
        from mixq.kernels import cuda_gemv

        y = cuda_gemv.norm_transform(x2, d32, block, smooth=s32)
        if y is not None:
            return y.reshape(*lead, n)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    chunk = block if rotate else math.gcd(n, 128)  # smoothing only: any chunk that divides n
    if chunk < 16:
        raise FormatError(f"online_transform kernel: in_features={n} has no chunk of 16..128 inputs")
    f1, f2 = split_block(chunk)
    split = split_products(x.dtype)
    if rotate:
        h1, h2 = _factor_matrices(block, x.device, split)
    else:
        h1 = h2 = x2
    s = s32 if s32 is not None else x2  # (unused pointers: any tensor)
    d = d32 if d32 is not None else x2
    block_m = 16
    grid = (triton.cdiv(m, block_m) if f1 == 1 else m, n // chunk, 1 if f1 == 1 else f1 // 16)
    precision = "ieee" if not x.is_cuda else "tf32x3"
    _transform_kernel[grid](x2, s, d, h1, h2, y, m, n, x2.stride(0), y.stride(0),
                            1.0 / math.sqrt(chunk) if split else 1.0, HAS_S=smooth is not None, ROTATE=rotate, F1=f1,
                            F2=f2, BLOCK_M=block_m, PRECISION=precision, SPLIT=split, num_warps=4, **launch_kw(x.device))
    return y.reshape(*lead, n)
