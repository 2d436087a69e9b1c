"""The kernels' packed weight layout, the converter from `QTensor`, and the pure-torch
reference that every GPU kernel is tested against.

Layout (`KernelWeights`) of a weight of shape (out, in) = (N, K) with b-bit codes:

* codes are grouped into *units* of C consecutive input elements that fill U whole int32
  words: C = 32 / gcd(b, 32), U = b * C / 32. So b=2: 16 codes in 1 word; b=4: 8 in 1;
  b=8: 4 in 1; b=3: 32 codes in 3 words; b=6: 16 in 3. Inside a unit the codes form an
  LSB-first bitstream: code i sits at bits [b*i, b*i + b) of the unit's U words read as one
  little-endian (32*U)-bit integer (a code may straddle two words when b does not divide 32).
  For b in {1, 2, 4, 8} this is exactly the row-wise LSB-first bitstream of
  `formats.packing`, read as int32 words.
* b = 3 has its own field order instead (no code straddles a word, and a kernel turns each
  pair of codes into two half-precision values with one shift and one mask, or none): the codes
  form 16 pairs, (i, i + 8) for i < 8 and (i + 8, i + 16) for 8 <= i < 16 (pair slot i). Slot s
  < 15 is 3-bit field r = s % 5 of word s // 5: its first code at bit `SPLIT3_POS[r]` = 0, 3,
  7, 10 or 13, its second 16 bits higher. Both fields at 0 and 3 lie inside a bfloat16
  mantissa as stored (value magic + code, and magic + 8 code), those at 7 and 10 after one
  shift by 7, that at 13 after a shift by 13. The last pair (codes 23, 31) holds bit j of its
  codes at bits 6 and 22 of word j (see `split3_fields`).
* `codes` is an int32 tensor (N, U * J), J = K / C units per row, stored *planar*: word u of
  unit j of row n lives at `codes[n, u * J + j]`, so each plane is contiguous along the input
  dim and a kernel loads it with 16-byte vector loads (for U = 1 this is plain row-major).
  b = 3 stores the units of each block of 16 (512 inputs) interleaved by four instead: unit
  4t + q of a block at column q * 4 + t of it, so that a GPU lane taking units q, q + 4, q + 8,
  q + 12 loads them as one 16-byte word (`split3_unit_columns`; a last block of u < 16 units
  interleaves with stride u / 4 when u is a multiple of 4, else keeps its order).
* `scales` stay in the format's own storage dtype, one per (row, group), shape
  (N, K / group_size): float16, or uint8 E8M0 biased exponents (MX: 2**(e - 127)), or uint8
  E4M3 bit patterns (NVFP4, multiplied by the fp32 `tensor_scale`). `zeros` (asymmetric INT)
  are uint8, same shape. group_size must be a multiple of C (all groups hold whole units).
* `levels` is the format's code -> value table (2**b float32 entries); the weight is
  `levels[code] * scale` (asymmetric INT: `(code - zero) * scale`), times `tensor_scale`.

`value_mode` tells a kernel how to turn a code into its level without the table where that is
cheaper: "affine" (level = code - code_offset, exact integer grids), "e4m3" (the code is the
FP8 E4M3 bit pattern itself), or "lut" (any other grid, e.g. NF4, FP4 E2M1: read the table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixq import formats
from mixq.errors import FormatError
from mixq.formats import Format, GridFormat, IntFormat, MXFormat, NVFP4Format, PlainFormat, QTensor

VALUE_MODES = ("affine", "lut", "e4m3")
SCALE_MODES = ("fp16", "e8m0", "e4m3")


def unit_shape(bits: int) -> tuple[int, int]:
    """(codes per unit C, int32 words per unit U) for b-bit codes."""
    if not 1 <= bits <= 8:
        raise FormatError(f"kernel layout supports 1..8-bit codes, got {bits}")
    codes_per_unit = 32 // math.gcd(bits, 32)
    return codes_per_unit, bits * codes_per_unit // 32


@dataclass(frozen=True)
class PackedLayout:
    """Everything about a packed weight that is not a tensor (hashable; kernels specialize on it)."""

    fmt: str
    out_features: int  # N
    in_features: int  # K
    bits: int
    group_size: int  # input elements per scale; in_features for per-channel
    value_mode: str  # one of VALUE_MODES
    code_offset: int  # level = code - code_offset in "affine" mode
    scale_mode: str  # one of SCALE_MODES
    has_zeros: bool
    has_tensor_scale: bool

    @property
    def codes_per_unit(self) -> int:
        return unit_shape(self.bits)[0]

    @property
    def words_per_unit(self) -> int:
        return unit_shape(self.bits)[1]

    @property
    def n_units(self) -> int:  # J, units per row
        return self.in_features // self.codes_per_unit

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_size)  # a partial last group has its own scale


@dataclass(frozen=True)
class KernelWeights:
    """A packed weight as the kernels read it (see the module docstring for the layout)."""

    layout: PackedLayout
    codes: torch.Tensor  # (N, U * J) int32, planar
    scales: torch.Tensor  # (N, n_groups) float16 | uint8
    levels: torch.Tensor  # (2**bits,) float32
    zeros: torch.Tensor | None = None  # (N, n_groups) uint8
    tensor_scale: torch.Tensor | None = None  # () float32

    def to(self, device: torch.device | str) -> KernelWeights:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return KernelWeights(self.layout, mv(self.codes), mv(self.scales), mv(self.levels),
                             mv(self.zeros), mv(self.tensor_scale))

    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight: codes + scales + zeros + tensor scale."""
        return sum(t.numel() * t.element_size()
                   for t in (self.codes, self.scales, self.zeros, self.tensor_scale) if t is not None)


# --------------------------------------------------------------------------- bit packing


SPLIT3_POS = (0, 3, 7, 10, 13)  # bit of a 3-bit pair slot's first code in its word, by s % 5


def split3_fields(i: int) -> list[tuple[int, int, int, int]]:
    """Bit fields (word, shift in the word, width, shift in the code) of code i (0..31) of a
    3-bit unit (see the module docstring)."""
    slot = (i & 7) + 8 * (i >> 4)  # pair slot: (i, i + 8) for i < 8, (i + 8, i + 16) above
    upper = 16 * ((i >> 3) & 1)  # the pair's second code sits 16 bits above the first
    if slot < 15:
        return [(slot // 5, upper + SPLIT3_POS[slot % 5], 3, 0)]
    return [(word, upper + 6, 1, word) for word in range(3)]  # bit j of the code in word j


def split3_unit_columns(n_units: int) -> torch.Tensor:
    """Column (within each plane) of each of the n_units 3-bit units of a row (see the module
    docstring): unit base + 4t + q of a block of u units (16, or fewer in the last block) at
    base + q * (u / 4) + t."""
    j = torch.arange(n_units)
    base = j // 16 * 16
    u = torch.clamp(n_units - base, max=16)
    return torch.where(u % 4 == 0, base + (j % 4) * (u // 4) + (j % 16) // 4, j)


def _code_fields(bits: int) -> list[list[tuple[int, int, int, int]]]:
    """Per code i of a unit, its bit fields: (word, shift in the word, width, shift in the
    code). Bitstream units: one field, or two when the code straddles a word; b = 3: the
    field order of the module docstring."""
    c_per_unit, _ = unit_shape(bits)
    fields = []
    for i in range(c_per_unit):
        if bits == 3:
            fields.append(split3_fields(i))
            continue
        word, shift = divmod(bits * i, 32)
        if shift + bits > 32:  # straddles into the next word
            fields.append([(word, shift, 32 - shift, 0), (word + 1, 0, shift + bits - 32, 32 - shift)])
        else:
            fields.append([(word, shift, bits, 0)])
    return fields


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) integer codes < 2**bits -> (N, U * J) int32 planar unit words."""
    n_rows, n_cols = codes.shape
    c_per_unit, w_per_unit = unit_shape(bits)
    if n_cols % c_per_unit:
        raise FormatError(f"in_features={n_cols} is not a multiple of {c_per_unit} ({bits}-bit units)")
    n_units = n_cols // c_per_unit
    c = codes.reshape(n_rows, n_units, c_per_unit).to(torch.int64)  # (N, J, C)
    words = torch.zeros(n_rows, n_units, w_per_unit, dtype=torch.int64, device=codes.device)
    for i, fields in enumerate(_code_fields(bits)):
        for word, shift, width, at in fields:
            words[:, :, word] |= ((c[:, :, i] >> at) & ((1 << width) - 1)) << shift
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # uint32 -> int32 bits
    if bits == 3:  # units interleaved by four in blocks of 16
        stored = torch.empty_like(words)
        stored[:, split3_unit_columns(n_units).to(words.device)] = words
        words = stored
    return words.permute(0, 2, 1).reshape(n_rows, w_per_unit * n_units).contiguous()


def unpack_codes(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (N, U * J) int32 -> (N, K) int64 codes."""
    n_rows = words.shape[0]
    c_per_unit, w_per_unit = unit_shape(bits)
    n_units = in_features // c_per_unit
    w = words.reshape(n_rows, w_per_unit, n_units).permute(0, 2, 1).to(torch.int64) & 0xFFFFFFFF
    if bits == 3:
        w = w[:, split3_unit_columns(n_units).to(words.device)]
    out = torch.zeros(n_rows, n_units, c_per_unit, dtype=torch.int64, device=words.device)
    for i, fields in enumerate(_code_fields(bits)):
        for word, shift, width, at in fields:
            out[:, :, i] |= ((w[:, :, word] >> shift) & ((1 << width) - 1)) << at
    return out.reshape(n_rows, in_features)


# --------------------------------------------------------------------------- scale decoding


def e4m3_to_float(bits_u8: torch.Tensor) -> torch.Tensor:
    """uint8 FP8 E4M3 (OCP, 'fn') bit patterns -> float32 values."""
    b = bits_u8.to(torch.int32)
    sign = torch.where(b & 0x80 != 0, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).to(torch.float32)
    mag = torch.where(exp == 0, man / 8.0 * 2.0**-6, (1.0 + man / 8.0) * torch.exp2(exp.to(torch.float32) - 7.0))
    return sign * mag


def e8m0_to_float(bits_u8: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 biased exponents -> float32 2**(e - 127) (e = 0 gives 0: 2**-127 is subnormal
    in float32 and the kernels build the value by a shift into the exponent field)."""
    e = bits_u8.to(torch.int32)
    return torch.where(e == 0, 0.0, torch.exp2(e.to(torch.float32) - 127.0))


def decode_scales(scales: torch.Tensor, scale_mode: str) -> torch.Tensor:
    """Stored scales -> float32 values (before the tensor scale)."""
    if scale_mode == "fp16":
        return scales.to(torch.float32)
    if scale_mode == "e8m0":
        return e8m0_to_float(scales)
    if scale_mode == "e4m3":
        return e4m3_to_float(scales)
    raise FormatError(f"unknown scale_mode {scale_mode!r}; expected one of {SCALE_MODES}")


# --------------------------------------------------------------------------- from formats


def _value_mode(fmt: Format) -> tuple[str, int]:
    """(value_mode, code_offset) of a quantized format."""
    if isinstance(fmt, IntFormat):
        return "affine", 0 if fmt.asym else 2 ** (fmt.code_bits - 1)
    element = {GridFormat: lambda f: f.element, MXFormat: lambda f: f.element,
               NVFP4Format: lambda f: "fp4_e2m1"}[type(fmt)](fmt)
    return ("e4m3" if element == "fp8_e4m3" else "lut"), 0


def _scale_mode(fmt: Format) -> str:
    if isinstance(fmt, MXFormat):
        return "e8m0"
    if isinstance(fmt, NVFP4Format):
        return "e4m3"
    return "fp16"


def prepack(q: QTensor, fmt: Format | str | None = None) -> KernelWeights:
    """The kernel layout of a quantized weight (see the module docstring). Codes are repacked;
    scales, zeros and the tensor scale are kept in their storage dtypes (a per-tensor scale is
    repeated per row). Raises FormatError for unquantized formats and when in_features is not
    a multiple of the unit size C."""
    fmt = formats.parse(fmt if fmt is not None else q.fmt)
    if str(fmt) != q.fmt:
        raise FormatError(f"QTensor of format {q.fmt!r} given with format {str(fmt)!r}")
    if isinstance(fmt, PlainFormat):
        raise FormatError(f"{fmt} is unquantized: use torch.nn.Linear, not a packed weight")
    if isinstance(fmt, formats.GGUFFormat):
        raise FormatError(f"{fmt} is a GGUF block type: llama.cpp runs it (mixq export --to gguf); mixq computes "
                          "with its dequantized weight")
    n_rows, n_cols = q.shape
    value_mode, code_offset = _value_mode(fmt)
    scales = q.scales
    if scales.shape[0] != n_rows:  # per-tensor: one scale for all rows
        scales = scales.expand(n_rows, scales.shape[1])
    layout = PackedLayout(
        fmt=str(fmt), out_features=n_rows, in_features=n_cols, bits=fmt.code_bits,
        group_size=fmt.group_size_for(n_cols), value_mode=value_mode, code_offset=code_offset,
        scale_mode=_scale_mode(fmt), has_zeros=q.zeros is not None,
        has_tensor_scale=q.tensor_scale is not None)
    levels = fmt.levels().to(torch.float32).cpu()
    if value_mode == "affine" and not layout.has_zeros:
        assert torch.equal(levels, torch.arange(levels.numel(), dtype=torch.float32) - code_offset)
    device = q.codes.device
    return KernelWeights(
        layout=layout,
        codes=pack_codes(q.codes, layout.bits),
        scales=scales.contiguous(),
        levels=levels.to(device),
        zeros=None if q.zeros is None else q.zeros.expand(n_rows, q.zeros.shape[1]).contiguous(),
        tensor_scale=None if q.tensor_scale is None else q.tensor_scale.to(torch.float32).reshape(()))


# --------------------------------------------------------------------------- reference path


def dequantize(kw: KernelWeights) -> torch.Tensor:
    """(N, K) float32 weight from the packed layout, in pure torch (the kernels' reference)."""
    lay = kw.layout
    codes = unpack_codes(kw.codes, lay.bits, lay.in_features)  # (N, K)
    if lay.has_zeros:
        zeros = kw.zeros.to(torch.float32).repeat_interleave(lay.group_size, dim=1)[:, :lay.in_features]
        vals = codes.to(torch.float32) - zeros
    else:
        vals = kw.levels.to(codes.device)[codes]  # (N, K)
    scale = decode_scales(kw.scales, lay.scale_mode)  # (N, n_groups)
    if lay.has_tensor_scale:
        scale = scale * kw.tensor_scale.to(torch.float32)  # same rounding order as formats.nvfp4
    scale = scale.repeat_interleave(lay.group_size, dim=1)[:, :lay.in_features]  # (N, K)
    return vals * scale


def reference_matmul(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequant(W)^T (+ bias)` computed in x's dtype: dequantize, then one matmul."""
    w = dequantize(kw).to(device=x.device, dtype=x.dtype)  # (N, K)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
