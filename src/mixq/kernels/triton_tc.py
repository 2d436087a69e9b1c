"""Tensor-core weight-only matmul `y = x @ dequant(W)^T` for batch 1..128, reading the packed
layout of `mixq.kernels.packed` as it is (codes, native scales, zeros). Entry point:
`qmatmul(x, kw, bias, config)`; `supports(layout)` says which layouts it takes (1, 2, 4 and
8-bit codes, one word per unit, and the 3-bit layout of 3-word units; any grid and scale mode).

Swapped operands: the program computes a (BLOCK_N weight rows, BLOCK_M batch rows) tile of
yᵀ = W xᵀ, so the weight is the tensor-core A operand (M dimension >= 64, as Hopper's wgmma
wants, whatever the batch) and x the B operand (N dimension 16..128). A K step covers
BLOCK_J units of every weight row, BLOCK_J * C inputs; the word tile (BLOCK_N, BLOCK_J)
is loaded once (Triton's pipeliner copies it asynchronously into shared memory and reads it
back straight into the A operand's register layout), and code position i of those words
is its own A operand: the codes at input C * j + i, which meet the activations at those
inputs, xᵀ[C * j + i, m], in one `tl.dot` of depth BLOCK_J. So the codes never leave
registers and no code is moved between threads; the activations (small, L2-resident) are
read with stride C instead.

Two ways to apply the group scales:
* post-scale (a K step lies inside one scale group, and an integer grid): the dots run on
  the codes themselves (exact in bf16/fp16), and the step's fp32 result is corrected once
  per row: s * (sum_k c_k x_k - z * sum_k x_k), with sum_k x_k from the same activation
  tiles. Decoding then costs about one instruction per weight (with `asm`).
* pre-scale (groups narrower than a step, or a table grid): each weight is formed as
  (c - z) * s (or level[c] * s), rounded once to the activation dtype.

`asm=True` decodes int4 with inline PTX, two weights per instruction: a byte permute puts
byte k of two words side by side, and one LOP3 `(t & 0x000F000F) | magic` makes two
half-precision values magic + code (bf16 magic 128, fp16 1024; exact); pre-scale then
subtracts magic + zero and multiplies by the scale with two packed FMAs. Without `asm` the
same values come from plain Triton integer and float ops (which the Triton interpreter can
run on the CPU; inline PTX it cannot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixq.errors import FormatError
from mixq.kernels.packed import KernelWeights, PackedLayout
from mixq.kernels.triton_qmm import _SCALE_MODE_ID, _VALUE_MODE_ID, _col_units, _scale, _sm_count, checked_input
from mixq.kernels.workspace import Workspace

# byte k of two int32 words a, b -> (a.k, a.k, b.k, b.k): prmt selectors per k
_PRMT_SEL = (0x4400, 0x5511, 0x6622, 0x7733)


def _asm_int4(sel: int, half: str, pre_scale: bool) -> str:
    """PTX for two outputs (codes 2k and 2k + 1 of two words) of the int4 decode; operands
    $0, $1 out (half2 each), $2, $3 the words, then post-scale: $4 = -(magic + z) (out: c - z);
    pre-scale: $4 the scale, $5 = -(magic + z) (out: (c - z) * s)."""
    magic, one = ("0x43004300", "0x3F803F80") if half == "bf16" else ("0x64006400", "0x3C003C00")
    body = [
        "{",
        ".reg .b32 t, u, m, k, v0, v1, one, nzero;",
        "mov.b32 m, 0x000F000F;",
        f"mov.b32 k, {magic};",
        f"prmt.b32 t, $2, $3, {sel:#x};",
        "shr.u32 u, t, 4;",
    ]
    body += [
        "lop3.b32 v0, t, m, k, 0xEA;",
        "lop3.b32 v1, u, m, k, 0xEA;",
        f"mov.b32 one, {one};",
    ]
    if not pre_scale:  # c - z, exact
        body += [f"fma.rn.{half}x2 $0, v0, one, $4;", f"fma.rn.{half}x2 $1, v1, one, $4;", "}"]
        return "\n".join(body)
    body += [
        "mov.b32 nzero, 0x80008000;",
        f"fma.rn.{half}x2 v0, v0, one, $5;",  # magic + c - (magic + z): exact
        f"fma.rn.{half}x2 v1, v1, one, $5;",
        f"fma.rn.{half}x2 $0, v0, $4, nzero;",  # (c - z) * s, one rounding
        f"fma.rn.{half}x2 $1, v1, $4, nzero;",
        "}",
    ]
    return "\n".join(body)


# tl.constexpr globals: jit functions may only read constexpr globals
_A_POST_BF16 = [tl.constexpr(_asm_int4(s, "bf16", False)) for s in _PRMT_SEL]
_A_POST_F16 = [tl.constexpr(_asm_int4(s, "f16", False)) for s in _PRMT_SEL]
_A_PRE_BF16 = [tl.constexpr(_asm_int4(s, "bf16", True)) for s in _PRMT_SEL]
_A_PRE_F16 = [tl.constexpr(_asm_int4(s, "f16", True)) for s in _PRMT_SEL]
_A_POST_BF16_0, _A_POST_BF16_1, _A_POST_BF16_2, _A_POST_BF16_3 = _A_POST_BF16
_A_POST_F16_0, _A_POST_F16_1, _A_POST_F16_2, _A_POST_F16_3 = _A_POST_F16
_A_PRE_BF16_0, _A_PRE_BF16_1, _A_PRE_BF16_2, _A_PRE_BF16_3 = _A_PRE_BF16
_A_PRE_F16_0, _A_PRE_F16_1, _A_PRE_F16_2, _A_PRE_F16_3 = _A_PRE_F16


@triton.jit
def _asm_pair(w, s, nz, ASM: tl.constexpr, PRE: tl.constexpr, IS_BF16: tl.constexpr):
    """Two decoded tiles (codes 2k, 2k + 1 of each word) from one inline-PTX call."""
    if IS_BF16:
        if PRE:
            return tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r", [w, s, nz], dtype=(tl.bfloat16, tl.bfloat16),
                                             is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r", [w, nz], dtype=(tl.bfloat16, tl.bfloat16),
                                             is_pure=True, pack=2)
    else:
        if PRE:
            return tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r", [w, s, nz], dtype=(tl.float16, tl.float16),
                                             is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r", [w, nz], dtype=(tl.float16, tl.float16),
                                             is_pure=True, pack=2)


@triton.jit
def _code(w0, w1, w2, I: tl.constexpr, BITS: tl.constexpr):
    """Integer codes (int32) at position I of each unit (one word per unit, or split 3-bit)."""
    if BITS == 3:  # mixq's 3-bit unit layout (packed.py, split3_fields)
        SLOT: tl.constexpr = (I & 7) + 8 * (I >> 4)  # pair slot
        UP: tl.constexpr = 16 * ((I >> 3) & 1)  # the pair's second code: 16 bits up
        if SLOT == 15:  # bit j of the code in word j
            c = ((w0 >> (6 + UP)) & 1) | (((w1 >> (6 + UP)) & 1) << 1) | (((w2 >> (6 + UP)) & 1) << 2)
        else:
            POS: tl.constexpr = 3 * (SLOT % 5) + (1 if SLOT % 5 >= 2 else 0) + UP
            if SLOT < 5:
                c = (w0 >> POS) & 7
            elif SLOT < 10:
                c = (w1 >> POS) & 7
            else:
                c = (w2 >> POS) & 7
    else:
        c = (w0 >> (BITS * I)) & ((1 << BITS) - 1)
    return c


@triton.jit
def _value(c, lut_ptr, VALUE_MODE: tl.constexpr):
    """Grid value (float32) of integer codes: affine codes as they are, a table, or E4M3 bits
    (the E4M3 value / 2**8; VALUE_MULT puts the 2**8 back into the scale)."""
    if VALUE_MODE == 0:
        v = c.to(tl.float32)
    elif VALUE_MODE == 1:
        v = tl.load(lut_ptr + c)
    else:
        h = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
        v = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _decode(w0, w1, w2, lut_ptr, scale, zero, I: tl.constexpr, BITS: tl.constexpr,
            VALUE_MODE: tl.constexpr, CODE_OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr,
            POST: tl.constexpr, DT: tl.constexpr):
    """Plain-Triton decode of code position I: post-scale the code itself, pre-scale
    (value - zero) * scale, in the activation dtype DT."""
    c = _code(w0, w1, w2, I, BITS)
    if POST:  # c - z: integers below 256 in magnitude, exact in bf16 and fp16
        if HAS_ZERO:
            a = (c.to(tl.float32) - zero).to(DT)
        else:
            a = (c - CODE_OFFSET).to(tl.float32).to(DT)
    else:
        v = _value(c, lut_ptr, VALUE_MODE)
        if HAS_ZERO:
            v = v - zero
        elif VALUE_MODE == 0:
            v = v - CODE_OFFSET
        a = (v * scale).to(DT)
    return a


@triton.jit
def _join2(a, b):
    return tl.join(a, b)


@triton.jit
def _join4(a0, a1, a2, a3):
    return tl.join(tl.join(a0, a1), tl.join(a2, a3))


@triton.jit
def _join8(a0, a1, a2, a3, a4, a5, a6, a7):
    return tl.join(_join4(a0, a1, a2, a3), _join4(a4, a5, a6, a7))


@triton.jit
def _plane_order(u, NDIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BN, BJ, 2, ..., 2) joined code tiles (code position i = sum of bit b at axis 2 + b)
    -> (BN, C * BJ) in plane order, column i * BJ + j = code i of unit j. The permute and
    reshape only relabel registers: the joined axes are held by each thread."""
    if NDIM == 3:
        v = tl.permute(u, (0, 2, 1))
    elif NDIM == 4:
        v = tl.permute(u, (0, 3, 2, 1))
    elif NDIM == 5:
        v = tl.permute(u, (0, 4, 3, 2, 1))
    elif NDIM == 6:
        v = tl.permute(u, (0, 5, 4, 3, 2, 1))
    else:
        v = tl.permute(u, (0, 6, 5, 4, 3, 2, 1))
    return tl.reshape(v, (BLOCK_N, BLOCK_K))


@triton.jit
def _dec(w0, w1, w2, lut_ptr, scale, zero, I: tl.constexpr, BITS: tl.constexpr, VALUE_MODE: tl.constexpr,
         CODE_OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr, POST: tl.constexpr, DT: tl.constexpr):
    return _decode(w0, w1, w2, lut_ptr, scale, zero, I, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT)


@triton.jit
def _decode_tile(w0, w1, w2, lut_ptr, scale, zero, BITS: tl.constexpr, C: tl.constexpr,
                 VALUE_MODE: tl.constexpr, CODE_OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr,
                 POST: tl.constexpr, DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Plain-Triton decode of a (BN, BJ) tile of units into the (BN, C * BJ) A operand in
    plane order (see _plane_order)."""
    if C == 4:
        u = _join4(_dec(w0, w1, w2, lut_ptr, scale, zero, 0, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                   _dec(w0, w1, w2, lut_ptr, scale, zero, 1, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                   _dec(w0, w1, w2, lut_ptr, scale, zero, 2, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                   _dec(w0, w1, w2, lut_ptr, scale, zero, 3, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT))
        a = _plane_order(u, 4, BLOCK_N, BLOCK_K)
    elif C == 8:
        u = _decode8(w0, w1, w2, lut_ptr, scale, zero, 0, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT)
        a = _plane_order(u, 5, BLOCK_N, BLOCK_K)
    elif C == 16:
        u = tl.join(_decode8(w0, w1, w2, lut_ptr, scale, zero, 0, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                    _decode8(w0, w1, w2, lut_ptr, scale, zero, 8, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT))
        a = _plane_order(u, 6, BLOCK_N, BLOCK_K)
    else:  # C == 32
        u = _join4(_decode8(w0, w1, w2, lut_ptr, scale, zero, 0, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                   _decode8(w0, w1, w2, lut_ptr, scale, zero, 8, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                   _decode8(w0, w1, w2, lut_ptr, scale, zero, 16, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                   _decode8(w0, w1, w2, lut_ptr, scale, zero, 24, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT))
        a = _plane_order(u, 7, BLOCK_N, BLOCK_K)
    return a


@triton.jit
def _decode8(w0, w1, w2, lut_ptr, scale, zero, I0: tl.constexpr, BITS: tl.constexpr, VALUE_MODE: tl.constexpr,
             CODE_OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr, POST: tl.constexpr, DT: tl.constexpr):
    """Code positions I0 .. I0 + 7 joined: (BN, BJ, 2, 2, 2)."""
    return _join8(_dec(w0, w1, w2, lut_ptr, scale, zero, I0 + 0, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                  _dec(w0, w1, w2, lut_ptr, scale, zero, I0 + 1, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                  _dec(w0, w1, w2, lut_ptr, scale, zero, I0 + 2, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                  _dec(w0, w1, w2, lut_ptr, scale, zero, I0 + 3, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                  _dec(w0, w1, w2, lut_ptr, scale, zero, I0 + 4, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                  _dec(w0, w1, w2, lut_ptr, scale, zero, I0 + 5, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                  _dec(w0, w1, w2, lut_ptr, scale, zero, I0 + 6, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT),
                  _dec(w0, w1, w2, lut_ptr, scale, zero, I0 + 7, BITS, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT))


@triton.jit
def _decode_int4_asm(w, s_h, nz, POST: tl.constexpr, IS_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Inline-PTX int4 decode of a (BN, BJ) word tile into the (BN, 8 * BJ) A operand (plane
    order): post-scale c - z, pre-scale (c - z) * s, in the activation dtype."""
    if POST:
        if IS_BF16:
            a0, a1 = _asm_pair(w, nz, nz, _A_POST_BF16_0, False, IS_BF16)
            a2, a3 = _asm_pair(w, nz, nz, _A_POST_BF16_1, False, IS_BF16)
            a4, a5 = _asm_pair(w, nz, nz, _A_POST_BF16_2, False, IS_BF16)
            a6, a7 = _asm_pair(w, nz, nz, _A_POST_BF16_3, False, IS_BF16)
        else:
            a0, a1 = _asm_pair(w, nz, nz, _A_POST_F16_0, False, IS_BF16)
            a2, a3 = _asm_pair(w, nz, nz, _A_POST_F16_1, False, IS_BF16)
            a4, a5 = _asm_pair(w, nz, nz, _A_POST_F16_2, False, IS_BF16)
            a6, a7 = _asm_pair(w, nz, nz, _A_POST_F16_3, False, IS_BF16)
    else:
        if IS_BF16:
            a0, a1 = _asm_pair(w, s_h, nz, _A_PRE_BF16_0, True, IS_BF16)
            a2, a3 = _asm_pair(w, s_h, nz, _A_PRE_BF16_1, True, IS_BF16)
            a4, a5 = _asm_pair(w, s_h, nz, _A_PRE_BF16_2, True, IS_BF16)
            a6, a7 = _asm_pair(w, s_h, nz, _A_PRE_BF16_3, True, IS_BF16)
        else:
            a0, a1 = _asm_pair(w, s_h, nz, _A_PRE_F16_0, True, IS_BF16)
            a2, a3 = _asm_pair(w, s_h, nz, _A_PRE_F16_1, True, IS_BF16)
            a4, a5 = _asm_pair(w, s_h, nz, _A_PRE_F16_2, True, IS_BF16)
            a6, a7 = _asm_pair(w, s_h, nz, _A_PRE_F16_3, True, IS_BF16)
    return _plane_order(_join8(a0, a1, a2, a3, a4, a5, a6, a7), 5, BLOCK_N, BLOCK_K)


@triton.jit
def _tc_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, ts_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, J, J_PER_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_ym,
    BITS: tl.constexpr, C: tl.constexpr, U: tl.constexpr, UNITS_PER_GROUP: tl.constexpr,
    VALUE_MODE: tl.constexpr, CODE_OFFSET: tl.constexpr, VALUE_MULT: tl.constexpr,
    SCALE_MODE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr, POST: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """(BLOCK_N, BLOCK_M) tile of yᵀ over units [pid_k * J_PER_SPLIT, ... + J_PER_SPLIT): per
    K step one (BN, C * BJ) x (C * BJ, BM) tensor-core product, K in plane order. 3-bit codes:
    the range and each K step are over stored columns (contiguous loads), whose units packed.py
    interleaves by four in blocks of 16; x and the scales follow each column's unit."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    IS_BF16: tl.constexpr = DT == tl.bfloat16
    MAGIC_VALUE: tl.constexpr = 128.0 if IS_BF16 else 1024.0  # asm decoding: code c -> magic + c
    BLOCK_K: tl.constexpr = BLOCK_J * C
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn  # (BN, 1)
    s_rows = offs_n[:, None].to(tl.int64) * stride_sn  # (BN, 1) offsets into scales / zeros
    # B rows in plane order: row r = i * BJ + j holds input C * j + i of the step
    r = tl.arange(0, BLOCK_K)
    r_unit = r % BLOCK_J
    x_rows = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm  # (1, BM)
    x_tile = x_rows + (r_unit * C + r // BLOCK_J)[:, None]  # (BK, BM)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    j_start = pid_k * J_PER_SPLIT
    j_end = tl.minimum(j_start + J_PER_SPLIT, J)
    # a K step lies in one group (3-bit: a step's columns hold units of whole blocks of 16)
    GROUP_TILE: tl.constexpr = UNITS_PER_GROUP % BLOCK_J == 0 and (
        BITS != 3 or (UNITS_PER_GROUP % 16 == 0 and (16 % BLOCK_J == 0 or BLOCK_J % 16 == 0)))
    for j0 in range(j_start, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        if EVEN_K:
            wmask = n_mask[:, None]
            xmask = m_mask[None, :]
        else:
            j_mask = offs_j < j_end
            wmask = n_mask[:, None] & j_mask[None, :]
            xmask = ((j0 + r_unit) < j_end)[:, None] & m_mask[None, :]
        wp = w_rows + offs_j[None, :]
        w0 = tl.load(wp, mask=wmask, other=0)  # (BN, BJ) int32
        if U == 3:
            w1 = tl.load(wp + J, mask=wmask, other=0)
            w2 = tl.load(wp + 2 * J, mask=wmask, other=0)
        else:
            w1 = w0
            w2 = w0
        if GROUP_TILE:  # one scale per row for the whole step: (BN, 1)
            g_off = s_rows + j0 // UNITS_PER_GROUP
            gmask = n_mask[:, None]
        else:  # (BN, BJ): the group of each unit
            g_off = s_rows + (_col_units(offs_j, J, BITS) // UNITS_PER_GROUP)[None, :]
            gmask = n_mask[:, None] & (offs_j < j_end)[None, :]
        scale = _scale(tl.load(s_ptr + g_off, mask=gmask, other=0), SCALE_MODE) * VALUE_MULT  # fp32
        if HAS_ZERO:
            zero = tl.load(z_ptr + g_off, mask=gmask, other=0).to(tl.float32)
        else:
            zero = scale * 0.0 + CODE_OFFSET
        if ASM:
            if HAS_ZERO:
                nz = tl.broadcast_to((-(zero + MAGIC_VALUE)).to(DT), (BLOCK_N, BLOCK_J))
            else:  # a constant keeps the decode in the A operand's registers (no layout change)
                nz = tl.full((BLOCK_N, BLOCK_J), -(CODE_OFFSET + MAGIC_VALUE), DT)
            if POST:
                s_h = nz
            else:
                s_h = tl.broadcast_to(scale.to(DT), (BLOCK_N, BLOCK_J))
            a = _decode_int4_asm(w0, s_h, nz, POST, IS_BF16, BLOCK_N, BLOCK_K)
        else:
            a = _decode_tile(w0, w1, w2, lut_ptr, scale, zero, BITS, C, VALUE_MODE, CODE_OFFSET, HAS_ZERO, POST, DT,
                             BLOCK_N, BLOCK_K)
        if BITS == 3:  # row r of the step: input r // BJ of the unit at column j0 + r % BJ
            xt = tl.load(x_rows + (_col_units(j0 + r_unit, J, BITS) * C + r // BLOCK_J)[:, None], mask=xmask, other=0.0)
        else:
            xt = tl.load(x_tile + j0 * C, mask=xmask, other=0.0)  # (BK, BM)
        if POST:
            acc += scale * tl.dot(a, xt)  # the step's product ran on c - z; scale: (BN, 1)
        else:
            acc = tl.dot(a, xt, acc)
    out = acc
    if HAS_TS:
        out = out * tl.load(ts_ptr)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]  # yᵀ tile -> y
    ymask = n_mask[:, None] & m_mask[None, :]
    if ATOMIC:
        # split-K: partial sums meet in an fp32 workspace that is all zeros between calls; the
        # last program of a tile to arrive (counted per tile) writes y, then zeroes the
        # workspace tile and its counter again, so a call is one launch (no memset, no cast)
        ws_ptrs = ws_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.atomic_add(ws_ptrs, out, mask=ymask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds happen before the release below
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == tl.num_programs(2) - 1:
            tl.debug_barrier()
            total = tl.load(ws_ptrs, mask=ymask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += bias[:, None]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=ymask)
            tl.store(ws_ptrs, tl.zeros_like(total), mask=ymask, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")
    else:
        if HAS_BIAS:
            out += bias[:, None]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=ymask)


# --------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class TcConfig:
    """One launch: weight rows and batch rows per program, units per K step, split-K
    programs (fp32 atomics when > 1), warps, pipeline stages, and the decode variants
    (post: scales after each step's dots where the layout allows; asm: inline-PTX int4)."""

    block_n: int = 64
    block_m: int = 16
    block_j: int = 16
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    post: bool = True
    asm: bool = True


def supports(layout: PackedLayout) -> bool:
    """Layouts this kernel takes: one int32 word per unit (1, 2, 4, 8-bit codes) or the split
    3-bit layout; groups of whole units; zero points only on integer grids."""
    return ((layout.words_per_unit == 1 or layout.bits == 3)
            and layout.group_size % layout.codes_per_unit == 0
            and (not layout.has_zeros or layout.value_mode == "affine"))


def post_scale_ok(layout: PackedLayout, block_j: int) -> bool:
    """Whether scales can be applied after each K step's dots: an integer grid, fp16 scales
    and every K step of block_j units inside one scale group (3-bit codes: a step's columns
    hold units from a block of 16, so groups of whole blocks, 512 inputs)."""
    upg = layout.group_size // layout.codes_per_unit
    blocks_ok = layout.bits != 3 or (upg % 16 == 0 and (16 % block_j == 0 or block_j % 16 == 0))
    return layout.value_mode == "affine" and upg % block_j == 0 and blocks_ok


def asm_ok(layout: PackedLayout, x: torch.Tensor) -> bool:
    """Inline-PTX decoding: int4 integer grids with fp16 scales, on a CUDA device."""
    return (x.is_cuda and layout.bits == 4 and layout.value_mode == "affine" and layout.scale_mode == "fp16")


def default_block_j(layout: PackedLayout) -> int:
    """Units per K step: 128 inputs (16 int4 words, 32 int8, 4 int3 units), or one scale
    group of 64 inputs where groups are narrower than 128 (the step stays inside a group,
    so scales apply after the dot)."""
    c_per_unit = layout.codes_per_unit
    block_j = max(1, 128 // c_per_unit)
    upg = layout.group_size // c_per_unit
    if layout.value_mode == "affine" and upg % block_j and upg * c_per_unit >= 64 and block_j % upg == 0:
        block_j = upg
    return block_j


def pick_config(m: int, layout: PackedLayout, n_sms: int = 132) -> TcConfig:
    """Block shapes by batch size and weight shape, from the H200 sweep (bench/bench_tc.py,
    bench/KERNEL_NOTES.md): a 128-row weight tile; batch tiles of 16..128 rows; K steps of
    `default_block_j` units; scales after each step's product up to 32 rows except for
    8-bit codes (pre-scaled weights above: the product then accumulates in place); 4 warps
    for int4 without zero
    points up to 32 rows, else 8 (the decode then stays in the product's registers); and
    split-K until about 4 programs per SM (2 above 32 rows), each split keeping >= 2 steps."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))
    block_n = 128
    small = m <= 32
    warps = 4 if (small and layout.codes_per_unit == 8 and not layout.has_zeros) else 8
    block_j = default_block_j(layout)
    n_tiles = triton.cdiv(layout.out_features, block_n) * triton.cdiv(m, block_m)
    target = (4 if small else 2) * n_sms
    split = 1
    while n_tiles * split * 2 <= target * 1.25 and layout.n_units >= 2 * block_j * split * 2:
        split *= 2
    return TcConfig(block_n, block_m, block_j, split, warps, 3, post=small and layout.bits != 8)


def check_supported(layout: PackedLayout) -> None:
    if not supports(layout):
        raise FormatError(f"{layout.fmt}: the tensor-core kernel takes 1/2/4/8-bit codes (one word per unit) or "
                          f"3-bit codes, groups of whole units, zero points on integer grids")


# split-K partial sums meet here by atomics; the last program of a tile restores zeros
_WS = Workspace(zeroed=True)


def qmatmul(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None,
            config: TcConfig | None = None) -> torch.Tensor:
    """`x @ dequant(W)^T (+ bias)`: x (M, K) float16/bfloat16 on the weights' device; returns
    (M, N) in x's dtype (fp32 accumulation). Under TRITON_INTERPRET=1 CPU tensors work too."""
    lay = kw.layout
    check_supported(lay)
    x = checked_input(x, lay)
    m, n = x.shape[0], lay.out_features
    cfg = config or pick_config(m, lay, _sm_count(x.device))
    post = cfg.post and post_scale_ok(lay, cfg.block_j)
    use_asm = cfg.asm and asm_ok(lay, x)
    n_units = lay.n_units
    j_per_split = triton.cdiv(triton.cdiv(n_units, cfg.split_k), cfg.block_j) * cfg.block_j
    split = triton.cdiv(n_units, j_per_split)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    atomic = split > 1
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws = cnt = y
    if atomic:
        ws, cnt = _WS.get(x.device, m * n, grid[0] * grid[1])
    dummy = kw.codes
    _tc_kernel[grid](
        x, kw.codes, kw.scales, kw.zeros if kw.zeros is not None else dummy, kw.levels,
        kw.tensor_scale if kw.tensor_scale is not None else kw.levels,
        bias if bias is not None else dummy, y, ws, cnt,
        m, n, n_units, j_per_split,
        x.stride(0), kw.codes.stride(0), kw.scales.stride(0), y.stride(0),
        BITS=lay.bits, C=lay.codes_per_unit, U=lay.words_per_unit,
        UNITS_PER_GROUP=lay.group_size // lay.codes_per_unit,
        VALUE_MODE=_VALUE_MODE_ID[lay.value_mode], CODE_OFFSET=lay.code_offset,
        VALUE_MULT=256.0 if lay.value_mode == "e4m3" else 1.0,
        SCALE_MODE=_SCALE_MODE_ID[lay.scale_mode], HAS_ZERO=lay.has_zeros,
        HAS_TS=lay.has_tensor_scale, HAS_BIAS=bias is not None, ATOMIC=atomic, POST=post, ASM=use_asm,
        EVEN_K=n_units % j_per_split == 0 and j_per_split % cfg.block_j == 0,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_J=cfg.block_j,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y
