"""Scaled grid formats: FP8/FP6/FP4 elements (`fp8_e4m3:ch`, `fp4_e2m1:g32`, ...) and NF4
(`nf4:g64`), each with a float16 scale per group, channel or tensor.

scale = amax / max|level| rounded to float16 to nearest (max|level| is the element's largest
normal: E4M3 448, E5M2 57344, E3M2 28, E2M3 7.5, E2M1 6; NF4 1), code = the grid value
nearest to w / scale (saturating at +-max; minifloat ties go to the even mantissa, NF4 ties
to the lower value),
value = levels[code] * scale. Scales are clamped to >= 2**-14 (see `grouping`); `:mse`
searches clip ratios per group (same bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.errors import FormatError
from mixq.formats.base import Layout, QTensor
from mixq.formats.elements import GRIDS, Grid, grid_levels, round_elements
from mixq.formats.grouping import (PER_TENSOR, GroupCodec, check_qtensor, div,
                                   fp16_scale, from_groups, granularity_str, group_len,
                                   scales_shape, to_groups)

GRID_ELEMENTS = ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "nf4")


@dataclass(frozen=True)
class GridFormat(GroupCodec):
    """Element codes of `element`'s grid times a float16 scale per group."""

    element: str  # one of GRID_ELEMENTS
    group_size: int  # g > 0, PER_CHANNEL (0) or PER_TENSOR (-1)
    mse: bool = False

    def __post_init__(self):
        if self.element not in GRID_ELEMENTS:
            raise FormatError(f"unknown element {self.element!r}; expected one of {GRID_ELEMENTS}")
        if self.group_size < PER_TENSOR:
            raise FormatError(f"bad group size {self.group_size}")

    def __str__(self) -> str:
        return f"{self.element}:{granularity_str(self.group_size)}" + (":mse" if self.mse else "")

    @property
    def grid(self) -> Grid:
        return GRIDS[self.element]

    @property
    def code_bits(self) -> int:
        return self.grid.code_bits

    def group_size_for(self, cols: int) -> int:
        return group_len(self.group_size, cols)

    def levels(self) -> torch.Tensor:
        """code -> element value (before scaling), float32 (2**code_bits,)."""
        return grid_levels(self.grid, torch.device("cpu")).clone()

    def layout(self, shape: tuple[int, int]) -> Layout:
        return Layout(self.code_bits, shape[0] * shape[1], scales_shape(self.group_size, shape),
                      torch.float16)

    def bits(self, shape: tuple[int, int]) -> int:
        return self.layout(shape).bits

    # -- math on the group view (R, G, g) -------------------------------------------------

    def _decode(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        levels = grid_levels(self.grid, codes.device)
        return levels[codes.long()] * scale.unsqueeze(-1)

    def _encode(self, x: torch.Tensor, ratio: float | torch.Tensor, with_codes: bool = True):
        """(codes (R, G, g) uint8 | None, values (R, G, g), scale (R, G)) of x (R, G, g), the
        group amax shrunk by `ratio` (a float or (R, G))."""
        scale = fp16_scale(div(x.abs().amax(-1) * ratio, self.grid.max_abs))  # (R, G)
        s3 = scale.unsqueeze(-1)
        codes, elements = round_elements(x / s3, self.element, with_codes=with_codes)
        return codes, elements * s3, scale

    # -- the Format contract (fake_quant and quantize from GroupCodec) -----------------------

    def dequantize(self, q: QTensor) -> torch.Tensor:
        check_qtensor(q, self)
        values = self._decode(to_groups(q.codes, self.group_size), q.scales.float())
        return from_groups(values, q.shape, self.group_size)
