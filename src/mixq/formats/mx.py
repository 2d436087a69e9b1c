"""OCP Microscaling (MX v1.0) block formats: `mxfp8` (E4M3), `mxfp8_e5m2`, `mxfp6` (E2M3),
`mxfp6_e3m2`, `mxfp4` (E2M1), `mxint8`.

Blocks of 32 consecutive input elements share one E8M0 scale X = 2**e, stored as the uint8
biased exponent e + 127. Per the spec (section 6.3), e = floor(log2(amax_block)) - emax_elem,
where emax_elem is the exponent of the element's largest normal (E4M3 8, E5M2 15, E3M2 4,
E2M3 2, E2M1 2, INT8 0); elements are round(v / X) to the element format, nearest with ties
to even and saturating at +-max normal. e is clamped to E8M0's range [-127, 127] (255 is its
NaN). An all-zero block gets e = -127 (stored byte 0): every element code is then 0.

MXINT8 elements are 8-bit two's complement codes with an implicit scale 2**-6 (value
code/64). We clamp to the symmetric range [-127, 127]: -128 (-2.0) is never produced, so a
block's rounded amax keeps its exponent and quantization is idempotent.

The last block of a row may be partial (cols % 32 != 0); it gets its own scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.errors import FormatError
from mixq.formats.base import Layout, QTensor
from mixq.formats.elements import GRIDS, grid_levels, pow2, round_minifloat
from mixq.formats.grouping import check_qtensor, check_weight, from_groups, scales_shape, to_groups

MX_BLOCK = 32
E8M0_BIAS = 127
E8M0_MIN_EXP = -127  # biased 0; biased 255 is NaN, so the largest exponent is 127
E8M0_MAX_EXP = 127
MXINT8_FRAC_BITS = 6  # value = int8 code * 2**-6

# spec name -> element name (grid name, or "int8")
MX_ELEMENTS: dict[str, str] = {
    "mxfp8": "fp8_e4m3",
    "mxfp8_e5m2": "fp8_e5m2",
    "mxfp6": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp4": "fp4_e2m1",
    "mxint8": "int8",
}


def mxint8_levels(device: torch.device) -> torch.Tensor:
    """(256,) code -> value: two's complement int8 of the code, times 2**-6."""
    codes = torch.arange(256, device=device)
    return torch.where(codes < 128, codes, codes - 256).float() * 2.0**-MXINT8_FRAC_BITS


@dataclass(frozen=True)
class MXFormat:
    """An OCP MX format: `name` is one of MX_ELEMENTS' keys."""

    name: str

    def __post_init__(self):
        if self.name not in MX_ELEMENTS:
            raise FormatError(f"unknown MX format {self.name!r}; expected one of {tuple(MX_ELEMENTS)}")

    def __str__(self) -> str:
        return self.name

    @property
    def element(self) -> str:
        return MX_ELEMENTS[self.name]

    @property
    def code_bits(self) -> int:
        return 8 if self.element == "int8" else GRIDS[self.element].code_bits

    @property
    def emax(self) -> int:
        """Exponent of the element's largest normal (0 for MXINT8: max 127/64 < 2)."""
        return 0 if self.element == "int8" else GRIDS[self.element].emax

    def group_size_for(self, cols: int) -> int:
        return MX_BLOCK

    def levels(self, device: torch.device | None = None) -> torch.Tensor:
        """code -> element value before the 2**e block scale, float32 (2**code_bits,)."""
        device = device or torch.device("cpu")
        if self.element == "int8":
            return mxint8_levels(device)
        return grid_levels(GRIDS[self.element], device)

    def supports(self, shape: tuple[int, int]) -> str | None:
        """Every 2-D shape (a partial last group or block is zero-padded)."""
        return None

    def layout(self, shape: tuple[int, int]) -> Layout:
        return Layout(self.code_bits, shape[0] * shape[1], scales_shape(MX_BLOCK, shape), torch.uint8)

    def bits(self, shape: tuple[int, int]) -> int:
        return self.layout(shape).bits

    # -- math on the block view (R, B, 32) -------------------------------------------------

    def _decode(self, codes: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        """values from codes (R, B, 32) and unbiased exponents (R, B) int32."""
        return self.levels(codes.device)[codes.long()] * pow2(exp).unsqueeze(-1)

    def _encode(self, x: torch.Tensor, with_codes: bool = True):
        """(codes (R, B, 32) uint8 | None, values (R, B, 32), exponents (R, B) int32)."""
        amax = x.abs().amax(-1)  # (R, B)
        _, e_amax = torch.frexp(amax)  # amax = m * 2**e_amax, m in [0.5, 1): floor(log2) = e_amax - 1
        exp = torch.where(amax > 0, e_amax - 1 - self.emax, E8M0_MIN_EXP)
        exp = exp.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP).to(torch.int32)
        block_scale = pow2(exp).unsqueeze(-1)  # (R, B, 1), exact power of two
        y = x / block_scale
        if self.element == "int8":
            q = torch.clamp(torch.round(y * 2**MXINT8_FRAC_BITS), -127, 127)
            elements = q * 2.0**-MXINT8_FRAC_BITS
            codes = (q.to(torch.int16) & 0xFF).to(torch.uint8) if with_codes else None  # two's complement
        else:
            codes, elements = round_minifloat(y, self.element, with_codes=with_codes)
        return codes, elements * block_scale, exp

    # -- the Format contract ----------------------------------------------------------------

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        check_weight(w)
        _, values, _ = self._encode(to_groups(w.float(), MX_BLOCK), with_codes=False)
        return from_groups(values, tuple(w.shape), MX_BLOCK).to(w.dtype)

    def quantize(self, w: torch.Tensor) -> QTensor:
        check_weight(w)
        shape = tuple(w.shape)
        codes, _, exp = self._encode(to_groups(w.float(), MX_BLOCK))
        return QTensor(str(self), shape, from_groups(codes, shape, MX_BLOCK),
                       (exp + E8M0_BIAS).to(torch.uint8))

    def dequantize(self, q: QTensor) -> torch.Tensor:
        check_qtensor(q, self)
        exp = q.scales.to(torch.int32) - E8M0_BIAS
        values = self._decode(to_groups(q.codes, MX_BLOCK), exp)
        return from_groups(values, q.shape, MX_BLOCK)
