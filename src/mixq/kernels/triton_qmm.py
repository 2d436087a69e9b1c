"""Triton weight-only matmul `y = x @ dequant(W)^T` reading the packed layout of
`mixq.kernels.packed` directly: codes and group scales are decoded in registers, no
dequantized copy of W is ever written. Entry point: `qmatmul(x, kw, bias, config)`.

* `_qgemv_kernel` (batch 1, and 2..4 for units of <= 16 codes): CUDA-core FMAs on 3-D tiles
  (BLOCK_J units, BLOCK_N rows, C codes). A thread owns whole units: the C codes of a word
  and the C matching activations (one 16-byte load), reused across its BLOCK_N rows, so
  decoding needs no data exchange between threads. All codes of a unit share a group:
  scales are decoded once per unit and applied to the unit's partial sum.
* `_qgemm_kernel` (larger batch): a (BLOCK_J, C, BLOCK_N) tile of levels * scale in x's dtype
  is viewed as (BLOCK_J * C, BLOCK_N) in natural input order and meets one contiguous
  activation tile in a single tensor-core `tl.dot`.

Both prefetch the next tile of words by hand (Triton's pipeliner leaves these loads alone)
and split K across programs (fp32 atomics into a zeroed buffer, then a cast) when the output
tiles alone do not give ~2 programs per SM.

Code -> level decoding (`VALUE_MODE`): 0 "affine": the code is OR-ed *in place* into the
mantissa of 2**23 (one LOP3 with the 2**23 bits in a register, since MAGIC is a kernel
argument), one FADD then gives (code - offset) * 2**E exactly, E being the code's bit
position in its word (codes ending above bit 23 are read from word >> 16); the activation
(GEMV: fp32; GEMM: bf16 only, fp16 would overflow) is pre-scaled by 2**-E, so no shift or
int->float conversion is spent per weight. 1 "lut": a gather from the 2**b-entry float32
table (NF4, FP4 E2M1, FP6, E5M2, MXINT8; L1-resident). 2 "e4m3": the FP8 bit pattern moved
into an fp16 (exact, subnormals included), the 2**8 bias difference folded into the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixq.errors import FormatError
from mixq.kernels.packed import KernelWeights, PackedLayout

_VALUE_MODE_ID = {"affine": 0, "lut": 1, "e4m3": 2}
_SCALE_MODE_ID = {"fp16": 0, "e8m0": 1, "e4m3": 2}


_MAGIC = 0x4B000000  # fp32 bits of 2**23: OR-ing an integer c < 2**23 into them gives 2**23 + c
_TWO23 = tl.constexpr(8388608.0)


@triton.jit
def _shift_exponent(S, BITS: tl.constexpr, INPLACE: tl.constexpr):
    """E: a code found at bit S of its word is decoded as code * 2**E ("in place", no shift
    instruction) when it ends below bit 23; codes ending higher are read from word >> 16
    (E = S - 16); codes straddling two words, and all codes when not INPLACE, get E = 0."""
    if INPLACE and BITS != 3:  # the 3-bit layout decodes through a plain code
        E = tl.where(S + BITS > 32, 0, tl.where(S + BITS > 23, S - 16, S))
    else:
        E = S * 0
    return E


@triton.jit
def _decode_unit(w0, w1, w2, lut_ptr, MAGIC, S, WORD, BITS: tl.constexpr,
                 VALUE_MODE: tl.constexpr, CODE_OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr,
                 INPLACE: tl.constexpr):
    """Levels of the codes at bit S of word WORD of each unit (S, WORD: int tensors that are
    compile-time constants per register slot; w*: uint32 words). Affine grids come back times
    2**E (see _shift_exponent) and, with zero points, without the zero subtracted."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 3:  # mixq's 3-bit unit layout (packed.py, split3_fields)
        idx = (WORD * 32 + S) // 3  # code index in the unit
        slot = (idx & 7) + 8 * (idx >> 4)  # its pair slot
        up = 16 * ((idx >> 3) & 1)  # the pair's second code: 16 bits up
        r = slot % 5
        pos = 3 * r + tl.where(r >= 2, 1, 0) + up  # 0, 3, 7, 10, 13 (+ 16)
        src = tl.where(slot < 5, w0, tl.where(slot < 10, w1, w2))
        spare = ((w0 >> (6 + up)) & 1) | (((w1 >> (6 + up)) & 1) << 1) | (((w2 >> (6 + up)) & 1) << 2)
        code = tl.where(slot == 15, spare, (src >> pos) & 7)  # uint32
        if VALUE_MODE == 0:  # E = 0 (_shift_exponent): no in-place decoding
            bits = code | MAGIC
            if HAS_ZERO:
                v = bits.to(tl.float32, bitcast=True) - _TWO23
            else:
                v = bits.to(tl.float32, bitcast=True) - (_TWO23 + CODE_OFFSET)
        else:
            v = tl.load(lut_ptr + code.to(tl.int32))
        return v
    lo = tl.where(WORD == 0, w0, tl.where(WORD == 1, w1, w2))
    hi = tl.where(WORD == 0, w1, w2)
    straddle = S + BITS > 32
    joined = ((lo >> S) | (hi << ((32 - S) % 32))) & MASK  # codes that straddle two words
    if VALUE_MODE == 0:
        E = _shift_exponent(S, BITS, INPLACE)
        if INPLACE:
            high = (S + BITS > 23) & (S + BITS <= 32)
            src = tl.where(high, lo >> 16, lo)
            # (src & mask<<E) | MAGIC is one LOP3 because MAGIC arrives in a register
            bits = tl.where(straddle, joined | MAGIC, (src & (MASK << E)) | MAGIC)
        else:
            bits = tl.where(straddle, joined, (lo >> S) & MASK) | MAGIC
        if HAS_ZERO:
            v = bits.to(tl.float32, bitcast=True) - _TWO23
        else:  # offset * 2**E is an exact integer constant per register slot
            v = bits.to(tl.float32, bitcast=True) - (_TWO23 + (CODE_OFFSET << E).to(tl.float32))
    else:
        c = tl.where(straddle, joined, (lo >> S) & MASK).to(tl.int32)
        if VALUE_MODE == 1:
            v = tl.load(lut_ptr + c)
        else:  # FP8 E4M3 bits -> fp16 bits: sign to bit 15, exponent+mantissa shifted by 7 (value / 2**8)
            h = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
            v = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _unit_cols(j, J, BITS: tl.constexpr):
    """Column of unit j in each plane of a row of J units: j, but for 3-bit codes, whose units
    packed.py interleaves by four in blocks of 16 (`split3_unit_columns`)."""
    if BITS == 3:
        base = j // 16 * 16
        u = tl.minimum(J - base, 16)
        return tl.where(u % 4 == 0, base + (j % 4) * (u // 4) + (j % 16) // 4, j)
    else:
        return j


@triton.jit
def _col_units(p, J, BITS: tl.constexpr):
    """Inverse of `_unit_cols`: the unit stored at column p of each plane of a row of J units."""
    if BITS == 3:
        base = p // 16 * 16
        u = tl.minimum(J - base, 16)
        s = tl.maximum(u // 4, 1)
        local = p - base
        return tl.where(u % 4 == 0, base + 4 * (local % s) + local // s, p)
    else:
        return p


@triton.jit
def _load_words(wp, mask, J, U: tl.constexpr):
    """The U planes of unit words at pointers wp (plane u is u * J words further)."""
    w0 = tl.load(wp, mask=mask, other=0)
    if U > 1:
        w1 = tl.load(wp + J, mask=mask, other=0)
    else:
        w1 = w0
    if U > 2:
        w2 = tl.load(wp + 2 * J, mask=mask, other=0)
    else:
        w2 = w1
    return w0, w1, w2


@triton.jit
def _scale(s, SCALE_MODE: tl.constexpr):
    """Stored scales (fp16, or uint8 E8M0 / E4M3) -> float32."""
    if SCALE_MODE == 0:
        r = s.to(tl.float32)
    elif SCALE_MODE == 1:
        r = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2**(e - 127)
    else:
        si = s.to(tl.int32)
        h = ((si & 0x80) << 8) | ((si & 0x7F) << 7)
        r = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    return r


@triton.jit
def _row_partial(x_ptr, row, M, stride_xm, offs_j, j_mask, v, zf, XS,
                 C: tl.constexpr, HAS_ZERO: tl.constexpr, SCALED_X: tl.constexpr):
    """sum over a unit's codes of level * x for one activation row: (BLOCK_J, BLOCK_N)."""
    offs_c = tl.arange(0, C)
    xp = x_ptr + row * stride_xm + offs_j[:, None, None] * C + offs_c[None, None, :]
    x = tl.load(xp, mask=j_mask[:, None, None] & (row < M), other=0.0).to(tl.float32)  # (BJ, 1, C)
    if SCALED_X:
        part = tl.sum(v * (x * XS), axis=2)
    else:
        part = tl.sum(v * x, axis=2)
    if HAS_ZERO:
        part -= zf * tl.sum(x, axis=2)
    return part


@triton.jit
def _store_row(y_ptr, row, M, stride_ym, offs_n, n_mask, acc, ts_ptr, b_ptr, pid_k,
               HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    out = tl.sum(acc, axis=0)  # (BLOCK_N,)
    if HAS_TS:
        out = out * tl.load(ts_ptr)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = tl.where(pid_k == 0, bias, 0.0)
        out += bias
    mask = n_mask & (row < M)
    if ATOMIC:
        tl.atomic_add(y_ptr + row * stride_ym + offs_n, out, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptr + row * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qgemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, ts_ptr, b_ptr, y_ptr,
    M, N, J, J_PER_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_ym, MAGIC,
    BITS: tl.constexpr, C: tl.constexpr, U: tl.constexpr, UNITS_PER_GROUP: tl.constexpr,
    VALUE_MODE: tl.constexpr, CODE_OFFSET: tl.constexpr, VALUE_MULT: tl.constexpr,
    SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """CUDA-core GEMV for M <= BLOCK_M <= 4 rows. Tiles are (BLOCK_J units, BLOCK_N rows, C
    codes): a thread owns whole units (all C codes of a word) and the C matching activations,
    so decoding needs no data exchange, and the activations are reused across BLOCK_N rows."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    P = tl.arange(0, C)[None, None, :] * BITS  # bit offset of each code in its unit
    WORD = P // 32
    S = P % 32
    SCALED_X: tl.constexpr = VALUE_MODE == 0
    XS = 1.0 / (1 << _shift_exponent(S, BITS, SCALED_X)).to(tl.float32)  # undoes the in-place 2**E
    w_cols = w_ptr + offs_n[None, :, None].to(tl.int64) * stride_wn  # (1, BN, 1)
    s_cols = offs_n[None, :].to(tl.int64) * stride_sn
    acc0 = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    j_start = pid_k * J_PER_SPLIT  # J_PER_SPLIT is a multiple of BLOCK_J
    j_end = j_start + J_PER_SPLIT
    # software pipelining by hand: the words of the next tile are loaded before this one is
    # decoded, so every thread keeps a tile of loads in flight while it computes
    offs_j = j_start + tl.arange(0, BLOCK_J)
    mask2 = (offs_j < J)[:, None] & n_mask[None, :]  # (BJ, BN)
    n0, n1, n2 = _load_words(w_cols + _unit_cols(offs_j, J, BITS)[:, None, None], mask2[:, :, None], J, U)  # (BJ, BN, 1)
    for j0 in range(0, J_PER_SPLIT, BLOCK_J):
        w0 = n0.to(tl.uint32, bitcast=True)
        w1 = n1.to(tl.uint32, bitcast=True)
        w2 = n2.to(tl.uint32, bitcast=True)
        j_mask = offs_j < J
        mask2 = j_mask[:, None] & n_mask[None, :]
        offs_next = offs_j + BLOCK_J
        mask_next = ((offs_next < J) & (offs_next < j_end))[:, None] & n_mask[None, :]
        n0, n1, n2 = _load_words(w_cols + _unit_cols(offs_next, J, BITS)[:, None, None], mask_next[:, :, None], J, U)
        s_off = s_cols + (offs_j // UNITS_PER_GROUP)[:, None]
        s_raw = tl.load(s_ptr + s_off, mask=mask2, other=0)
        v = _decode_unit(w0, w1, w2, lut_ptr, MAGIC, S, WORD, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, True)
        scale = _scale(s_raw, SCALE_MODE) * VALUE_MULT  # (BJ, BN)
        if HAS_ZERO:
            zf = tl.load(z_ptr + s_off, mask=mask2, other=0).to(tl.float32)
        else:
            zf = scale
        acc0 += _row_partial(x_ptr, 0, M, stride_xm, offs_j, j_mask, v, zf, XS, C, HAS_ZERO, SCALED_X) * scale
        if BLOCK_M > 1:
            acc1 += _row_partial(x_ptr, 1, M, stride_xm, offs_j, j_mask, v, zf, XS, C, HAS_ZERO, SCALED_X) * scale
        if BLOCK_M > 2:
            acc2 += _row_partial(x_ptr, 2, M, stride_xm, offs_j, j_mask, v, zf, XS, C, HAS_ZERO, SCALED_X) * scale
            acc3 += _row_partial(x_ptr, 3, M, stride_xm, offs_j, j_mask, v, zf, XS, C, HAS_ZERO, SCALED_X) * scale
        offs_j = offs_next
    _store_row(y_ptr, 0, M, stride_ym, offs_n, n_mask, acc0, ts_ptr, b_ptr, pid_k, HAS_TS, HAS_BIAS, ATOMIC)
    if BLOCK_M > 1:
        _store_row(y_ptr, 1, M, stride_ym, offs_n, n_mask, acc1, ts_ptr, b_ptr, pid_k, HAS_TS, HAS_BIAS, ATOMIC)
    if BLOCK_M > 2:
        _store_row(y_ptr, 2, M, stride_ym, offs_n, n_mask, acc2, ts_ptr, b_ptr, pid_k, HAS_TS, HAS_BIAS, ATOMIC)
        _store_row(y_ptr, 3, M, stride_ym, offs_n, n_mask, acc3, ts_ptr, b_ptr, pid_k, HAS_TS, HAS_BIAS, ATOMIC)


@triton.jit
def _qgemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, ts_ptr, b_ptr, y_ptr,
    M, N, J, J_PER_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_ym, MAGIC,
    BITS: tl.constexpr, C: tl.constexpr, U: tl.constexpr, UNITS_PER_GROUP: tl.constexpr,
    VALUE_MODE: tl.constexpr, CODE_OFFSET: tl.constexpr, VALUE_MULT: tl.constexpr,
    SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, INPLACE: tl.constexpr,
):
    """Tensor-core GEMM: a (BLOCK_J units, C codes, BLOCK_N rows) tile of levels * scale is
    decoded in x's dtype, viewed as (BLOCK_J * C, BLOCK_N) in natural input order, and meets
    one contiguous (BLOCK_M, BLOCK_J * C) activation tile in a single tl.dot."""
    BLOCK_K: tl.constexpr = BLOCK_J * C
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    P = tl.arange(0, C)[None, :, None] * BITS  # (1, C, 1) bit offset of each code in its unit
    WORD = P // 32
    S = P % 32
    SCALED_X: tl.constexpr = VALUE_MODE == 0 and INPLACE
    offs_kk = tl.arange(0, BLOCK_K)
    # x is scaled by 2**-E of the code position (k % C) to undo the in-place 2**E of the levels
    XS = 1.0 / (1 << _shift_exponent((offs_kk % C) * BITS % 32, BITS, SCALED_X)).to(tl.float32)
    w_cols = w_ptr + offs_n[None, None, :].to(tl.int64) * stride_wn  # (1, 1, BN)
    s_cols = offs_n[None, None, :].to(tl.int64) * stride_sn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    j_start = pid_k * J_PER_SPLIT
    j_end = j_start + J_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_j = j_start + tl.arange(0, BLOCK_J)
    mask = (offs_j < J)[:, None, None] & n_mask[None, None, :]  # (BJ, 1, BN)
    n0, n1, n2 = _load_words(w_cols + _unit_cols(offs_j, J, BITS)[:, None, None], mask, J, U)  # prefetched tile
    for j0 in range(0, J_PER_SPLIT, BLOCK_J):
        w0 = n0.to(tl.uint32, bitcast=True)
        w1 = n1.to(tl.uint32, bitcast=True)
        w2 = n2.to(tl.uint32, bitcast=True)
        j_mask = offs_j < J
        mask = j_mask[:, None, None] & n_mask[None, None, :]
        offs_next = offs_j + BLOCK_J
        mask_next = ((offs_next < J) & (offs_next < j_end))[:, None, None] & n_mask[None, None, :]
        n0, n1, n2 = _load_words(w_cols + _unit_cols(offs_next, J, BITS)[:, None, None], mask_next, J, U)
        v = _decode_unit(w0, w1, w2, lut_ptr, MAGIC, S, WORD, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO,
                         SCALED_X)  # (BJ, C, BN)
        s_off = s_cols + (offs_j // UNITS_PER_GROUP)[:, None, None]
        scale = _scale(tl.load(s_ptr + s_off, mask=mask, other=0), SCALE_MODE) * VALUE_MULT  # (BJ, 1, BN)
        if HAS_ZERO:
            zs = tl.load(z_ptr + s_off, mask=mask, other=0).to(tl.float32)
            if SCALED_X:
                v = v - zs * (1 << _shift_exponent(S, BITS, True)).to(tl.float32)
            else:
                v = v - zs
        wt = tl.reshape((v * scale).to(x_ptr.dtype.element_ty), (BLOCK_K, BLOCK_N))
        offs_k = (j_start + j0) * C + offs_kk
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < J * C)[None, :], other=0.0)
        if SCALED_X:
            x = (x.to(tl.float32) * XS[None, :]).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, wt, acc)
        offs_j = offs_next
    out = acc
    if HAS_TS:
        out = out * tl.load(ts_ptr)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = tl.where(pid_k == 0, bias, 0.0)
        out += bias[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    ymask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, out, mask=ymask, sem="relaxed")
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=ymask)


# --------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class KernelConfig:
    """Block shapes of one launch. kind: "gemv" (CUDA-core FMA) or "gemm" (tl.dot)."""

    kind: str
    block_m: int
    block_n: int
    block_j: int  # units (of C codes) per tile along the input dim
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # TRITON_INTERPRET=1 runs on CPU tensors
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _split_for(n_tiles: int, n_units: int, block_j: int, n_sms: int, target_waves: int) -> int:
    """Split-K factor that brings the program count near target_waves * n_sms while every split
    still covers at least two tiles along K."""
    split = 1
    while n_tiles * split < target_waves * n_sms and n_units >= 2 * block_j * split * 2:
        split *= 2
    return split


def pick_config(m: int, layout: PackedLayout, n_sms: int = 132) -> KernelConfig:
    """Block shapes by batch size (M) and weight shape, from the H100 sweeps recorded in
    bench/KERNEL_NOTES.md: CUDA-core GEMV up to 4 rows, tensor-core GEMM above; split-K
    (fp32 atomics) when the output tiles alone give fewer than ~2 programs per SM.

    A GEMV thread holds one unit (C codes) of BLOCK_N rows, so BLOCK_N shrinks as C grows
    (int3's 32-code units would otherwise spill registers)."""
    n, n_units, c_per_unit = layout.out_features, layout.n_units, layout.codes_per_unit
    if m == 1 or (m <= 4 and c_per_unit <= 16):  # 32-code units x 4 rows: the GEMM is cheaper
        block_m = _pow2_at_least(m)
        budget = 64 if m == 1 else 32  # values per thread per activation row
        block_n = min(8, max(1, budget // c_per_unit))
        block_j = min(128, _pow2_at_least(n_units))
        split = _split_for(triton.cdiv(n, block_n), n_units, block_j, n_sms, target_waves=2)
        return KernelConfig("gemv", block_m, block_n, block_j, split, num_warps=4)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    if m <= 32:
        block_n, warps = (128 if n >= 8192 else 64), 4
    else:
        block_n, warps = 128, 8
    block_j = max(1, 128 // c_per_unit)  # a 128-deep K tile per tl.dot
    n_tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = _split_for(n_tiles, n_units, block_j, n_sms, target_waves=2)
    # pipelining the dependent table gathers of "lut" grids only fills shared memory
    stages = 1 if layout.value_mode == "lut" else 2
    return KernelConfig("gemm", block_m, block_n, block_j, split, num_warps=warps, num_stages=stages)


def checked_input(x: torch.Tensor, lay: PackedLayout) -> torch.Tensor:
    """x as the matmul kernels take it: (M, in_features) float16/bfloat16 with unit column
    stride (made contiguous if not); ValueError naming the shape or dtype otherwise."""
    if x.dim() != 2 or x.shape[1] != lay.in_features:
        raise ValueError(f"x must be (M, {lay.in_features}), got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    return x if x.stride(1) == 1 else x.contiguous()


def check_supported(layout: PackedLayout) -> None:
    """Raise FormatError if the kernels cannot run this layout."""
    c_per_unit, w_per_unit = layout.codes_per_unit, layout.words_per_unit
    if w_per_unit > 3:
        raise FormatError(f"{layout.fmt}: {layout.bits}-bit codes need {w_per_unit} words per unit; kernels take at most 3")
    if layout.group_size % c_per_unit:  # a partial last group is fine: it holds whole units
        raise FormatError(f"{layout.fmt}: group_size={layout.group_size} must be a multiple of the "
                          f"{c_per_unit} codes of a {layout.bits}-bit unit")
    if layout.has_zeros and layout.value_mode != "affine":
        raise FormatError(f"{layout.fmt}: zero points need an affine grid")


def qmatmul(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None,
            config: KernelConfig | None = None) -> torch.Tensor:
    """`x @ dequant(W)^T (+ bias)` on the GPU from packed weights. x: (M, K) float16/bfloat16 on
    the weights' device; returns (M, N) in x's dtype (fp32 accumulation)."""
    lay = kw.layout
    check_supported(lay)
    x = checked_input(x, lay)
    m, n = x.shape[0], lay.out_features
    cfg = config or pick_config(m, lay, _sm_count(x.device))
    n_units = lay.n_units
    j_per_split = triton.cdiv(triton.cdiv(n_units, cfg.split_k), cfg.block_j) * cfg.block_j
    atomic = cfg.split_k > 1
    y = torch.zeros((m, n), dtype=torch.float32, device=x.device) if atomic else torch.empty((m, n), dtype=x.dtype, device=x.device)
    dummy = kw.codes
    consts = dict(
        BITS=lay.bits, C=lay.codes_per_unit, U=lay.words_per_unit,
        UNITS_PER_GROUP=lay.group_size // lay.codes_per_unit,
        VALUE_MODE=_VALUE_MODE_ID[lay.value_mode], CODE_OFFSET=lay.code_offset,
        VALUE_MULT=256.0 if lay.value_mode == "e4m3" else 1.0,
        SCALE_MODE=_SCALE_MODE_ID[lay.scale_mode], HAS_ZERO=lay.has_zeros,
        HAS_TS=lay.has_tensor_scale, HAS_BIAS=bias is not None, ATOMIC=atomic,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_J=cfg.block_j,
        num_warps=cfg.num_warps,
    )
    args = (x, kw.codes, kw.scales, kw.zeros if kw.zeros is not None else dummy, kw.levels,
            kw.tensor_scale if kw.tensor_scale is not None else kw.levels,
            bias if bias is not None else dummy, y,
            m, n, n_units, j_per_split,
            x.stride(0), kw.codes.stride(0), kw.scales.stride(0), y.stride(0), _MAGIC)
    if cfg.kind == "gemv":
        if m > cfg.block_m:
            raise ValueError(f"gemv config takes M <= {cfg.block_m}, got {m}")
        _qgemv_kernel[(triton.cdiv(n, cfg.block_n), cfg.split_k)](*args, **consts)
    else:
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
        # in-place decoding scales levels by up to 2**22: fine in bf16, overflows fp16
        _qgemm_kernel[grid](*args, num_stages=cfg.num_stages, INPLACE=x.dtype == torch.bfloat16, **consts)
    return y.to(x.dtype) if atomic else y
