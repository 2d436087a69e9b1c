"""NVFP4: E2M1 elements in blocks of 16 input elements, an E4M3 scale per block and one
float32 scale per tensor (NVIDIA Blackwell's two-level FP4).

    tensor_scale = amax(W) / (6 * 448)              float32 (6: E2M1 max, 448: E4M3 max)
    block_scale  = e4m3_round(amax_block / 6 / tensor_scale)   stored as the E4M3 byte
    element      = e2m1_round(v / (block_scale * tensor_scale))
    value        = element * (block_scale * tensor_scale)

The tensor scale is stored multiplicatively (some runtimes store its reciprocal). An
all-zero weight has tensor_scale 0 (block scales are then computed against 1 and are 0); a
block whose E4M3 scale underflows to 0 has all codes 0. Rounding is to nearest, ties to
even, saturating. The last block of a row may be partial (cols % 16 != 0).

Re-quantizing a quantized weight reproduces its codes and block scales wherever the block
scale is an E4M3 normal (>= 2**-6, i.e. block amax >= amax(W) / 28672); a subnormal block
scale has too few bits to survive the round trip, and the float32 tensor scale may move by an
ulp, so NVFP4 is idempotent only up to those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.formats.base import Layout, QTensor
from mixq.formats.elements import GRIDS, grid_levels, round_minifloat
from mixq.formats.grouping import (check_qtensor, check_weight, div, from_groups, scales_shape,
                                   to_groups)

NVFP4_BLOCK = 16
E2M1 = GRIDS["fp4_e2m1"]
E4M3 = GRIDS["fp8_e4m3"]
E2M1_MAX = 6.0
E4M3_MAX = 448.0


@dataclass(frozen=True)
class NVFP4Format:
    """`nvfp4`: no options."""

    def __str__(self) -> str:
        return "nvfp4"

    @property
    def code_bits(self) -> int:
        return 4

    def group_size_for(self, cols: int) -> int:
        return NVFP4_BLOCK

    def levels(self) -> torch.Tensor:
        """code -> E2M1 value before scaling, float32 (16,)."""
        return grid_levels(E2M1, torch.device("cpu")).clone()

    def supports(self, shape: tuple[int, int]) -> str | None:
        """Every 2-D shape (a partial last group or block is zero-padded)."""
        return None

    def layout(self, shape: tuple[int, int]) -> Layout:
        return Layout(4, shape[0] * shape[1], scales_shape(NVFP4_BLOCK, shape), torch.uint8,
                      tensor_scale_bits=32)

    def bits(self, shape: tuple[int, int]) -> int:
        return self.layout(shape).bits

    # -- math on the block view (R, B, 16) -------------------------------------------------

    @staticmethod
    def _decode(codes: torch.Tensor, block_codes: torch.Tensor, tensor_scale: torch.Tensor):
        """values (R, B, 16) from E2M1 codes, E4M3 block-scale codes (R, B), f32 scalar."""
        block_scale = grid_levels(E4M3, codes.device)[block_codes.long()]  # (R, B)
        denom = (block_scale * tensor_scale).unsqueeze(-1)  # (R, B, 1)
        return grid_levels(E2M1, codes.device)[codes.long()] * denom

    def _encode(self, x: torch.Tensor, tensor_scale: torch.Tensor, with_codes: bool = True):
        """(codes (R, B, 16) | None, values (R, B, 16), block-scale codes (R, B) uint8)."""
        safe_ts = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))
        block_codes, block_scale = round_minifloat(div(x.abs().amax(-1), E2M1_MAX) / safe_ts, "fp8_e4m3")
        denom = (block_scale * tensor_scale).unsqueeze(-1)  # (R, B, 1)
        y = x / torch.where(denom > 0, denom, torch.ones_like(denom))  # denom 0: y is rounded to 0 below
        codes, elements = round_minifloat(torch.where(denom > 0, y, 0.0), "fp4_e2m1", with_codes=with_codes)
        return codes, elements * denom, block_codes

    @staticmethod
    def tensor_scale_of(w: torch.Tensor) -> torch.Tensor:
        """float32 scalar amax(W) / (6 * 448)."""
        return div(w.abs().amax().float(), E2M1_MAX * E4M3_MAX)

    # -- the Format contract ----------------------------------------------------------------

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        check_weight(w)
        w32 = w.float()
        _, values, _ = self._encode(to_groups(w32, NVFP4_BLOCK), self.tensor_scale_of(w32), with_codes=False)
        return from_groups(values, tuple(w.shape), NVFP4_BLOCK).to(w.dtype)

    def quantize(self, w: torch.Tensor) -> QTensor:
        check_weight(w)
        shape, w32 = tuple(w.shape), w.float()
        tensor_scale = self.tensor_scale_of(w32)
        codes, _, block_codes = self._encode(to_groups(w32, NVFP4_BLOCK), tensor_scale)
        return QTensor(str(self), shape, from_groups(codes, shape, NVFP4_BLOCK), block_codes,
                       tensor_scale=tensor_scale)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        check_qtensor(q, self)
        values = self._decode(to_groups(q.codes, NVFP4_BLOCK), q.scales, q.tensor_scale.float())
        return from_groups(values, q.shape, NVFP4_BLOCK)
