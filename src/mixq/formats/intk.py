"""INT-k: uniform integer grids with a float16 scale per group, channel or tensor.

Symmetric (`int4:g64`): all 2**k levels are used, the zero point fixed at the middle code,
and the scale carries a sign (as llama.cpp's Q4_0 does): the element of largest magnitude,
x_ext, maps exactly onto the extra level -2**(k-1), i.e. scale = -x_ext / 2**(k-1) (its
magnitude rounded *up* to float16), q = clamp(round(w / scale), -2**(k-1), 2**(k-1) - 1),
code = q + 2**(k-1), value = (code - 2**(k-1)) * scale. The sign costs nothing (float16
scales have a sign bit). Compared with the mirror-symmetric grid (scale amax / (2**(k-1)-1),
2**k - 1 levels) and the GPTQ/compressed-tensors grid (scale 2 amax / (2**k - 1)), the step
is the finest of the three and the extreme is exact; the price is that values on the other
side beyond (2**(k-1) - 1) |scale| are clipped, by at most one step. Measured on
SmolLM2-135M (8 windows x 512 WikiText-2 test tokens), KL to float of int4:g64 / int3:g64 /
int4:ch: mirror 0.53 / 2.37 / 0.91, GPTQ grid 0.49 / 2.24 / 1.05, signed 0.38 / 1.37 / 0.72
(BENCHMARKS.md). Codes are idempotent for the stored scales.

Asymmetric (`int3:g64:asym`): the range [lo, hi] = [min(min w, 0), max(max w, 0)] always
includes 0 (so the zero point is an exact k-bit code), scale = (hi - lo) / (2**k - 1)
rounded *up* to float16 (so hi still fits: in-range error stays within half a step),
zero = clamp(round(-lo / scale), 0, 2**k - 1), code = clamp(round(w / scale) + zero, 0,
2**k - 1), value = (code - zero) * scale. Asymmetric min-max quantization is not
idempotent in general: the top code may round to 2**k - 2, shrinking the next range.

Scales are clamped to >= 2**-14 (see `grouping.FP16_SCALE_MIN`); an all-zero group thus
gets scale 2**-14 and zero point 0. `:mse` searches clip ratios per group (same bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.errors import FormatError
from mixq.formats.base import Layout, QTensor
from mixq.formats.grouping import (PER_TENSOR, GroupCodec, check_qtensor, div,
                                   fp16_scale, from_groups, granularity_str, group_len,
                                   scales_shape, to_groups)


@dataclass(frozen=True)
class IntFormat(GroupCodec):
    """k-bit integer codes, float16 scales (and k-bit zero points when `asym`)."""

    code_bits: int
    group_size: int  # g > 0, PER_CHANNEL (0) or PER_TENSOR (-1)
    asym: bool = False
    mse: bool = False

    def __post_init__(self):
        if not 2 <= self.code_bits <= 8:
            raise FormatError(f"int bits must be 2..8, got {self.code_bits}")
        if self.group_size < PER_TENSOR:
            raise FormatError(f"bad group size {self.group_size}")

    def __str__(self) -> str:
        s = f"int{self.code_bits}:{granularity_str(self.group_size)}"
        return s + (":asym" if self.asym else "") + (":mse" if self.mse else "")

    def group_size_for(self, cols: int) -> int:
        return group_len(self.group_size, cols)

    def levels(self) -> torch.Tensor:
        """code -> integer value before scaling (asymmetric: the code itself; subtract zero)."""
        offset = 0 if self.asym else 2 ** (self.code_bits - 1)
        return torch.arange(2**self.code_bits, dtype=torch.float32) - offset

    def layout(self, shape: tuple[int, int]) -> Layout:
        return Layout(self.code_bits, shape[0] * shape[1], scales_shape(self.group_size, shape),
                      torch.float16, has_zeros=self.asym)

    def bits(self, shape: tuple[int, int]) -> int:
        return self.layout(shape).bits

    # -- math on the group view (R, G, g) -------------------------------------------------

    def _decode(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None):
        """values (R, G, g) from codes (R, G, g), scale (R, G) f32 and zero (R, G) uint8."""
        offset = zero.float().unsqueeze(-1) if self.asym else 2 ** (self.code_bits - 1)
        return (codes.float() - offset) * scale.unsqueeze(-1)

    def _encode(self, x: torch.Tensor, ratio: float | torch.Tensor, with_codes: bool = True):
        """(codes (R, G, g) uint8 | None, values (R, G, g), scale (R, G), zero (R, G) | None)
        of x (R, G, g), the group range shrunk by `ratio` (a float or (R, G))."""
        k = self.code_bits
        if self.asym:
            top = 2**k - 1
            lo = x.amin(-1).clamp(max=0) * ratio  # (R, G)
            hi = x.amax(-1).clamp(min=0) * ratio
            scale = fp16_scale(div(hi - lo, top), round_up=True)
            zero = torch.clamp(torch.round(-lo / scale), 0, top)
            s3, z3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
            c = torch.clamp(torch.round(x / s3) + z3, 0, top)  # codes, as floats
            values = (c - z3) * s3
            zero = zero.to(torch.uint8)
        else:
            qmax = 2 ** (k - 1) - 1
            # The signed extreme lands exactly on level -(qmax + 1).
            ext = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1) * ratio  # (R, G)
            mag = fp16_scale(div(ext.abs(), qmax + 1), round_up=True)
            scale = torch.where(ext > 0, -mag, mag)  # (R, G)
            s3 = scale.unsqueeze(-1)
            q = torch.clamp(torch.round(x / s3), -qmax - 1, qmax)
            values = q * s3
            c, zero = q + 2 ** (k - 1), None
        return (c.to(torch.uint8) if with_codes else None), values, scale, zero

    # -- the Format contract (fake_quant and quantize from GroupCodec) -----------------------

    def dequantize(self, q: QTensor) -> torch.Tensor:
        check_qtensor(q, self)
        codes = to_groups(q.codes, self.group_size)
        values = self._decode(codes, q.scales.float(), q.zeros)
        return from_groups(values, q.shape, self.group_size)
