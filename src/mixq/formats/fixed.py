"""Quantization with per-group parameters held fixed: what GPTQ-style quantizers need.

`fake_quant(w)` derives each group's scale from the group it quantizes. An error-compensating
quantizer instead fixes a group's parameters once (from the weights as they are when it
reaches the group) and then rounds the group's columns one at a time onto that grid, each
column after the errors of the earlier ones were spread onto it. This module splits the two
steps for every quantized format:

    params = group_params(fmt, w)                  # (R, G) steps (+ zero points)
    values = fake_quant_with(fmt, w, params)       # == fmt.fake_quant(w) exactly
    cols   = round_columns(fmt, x, step, zero)     # x (R, k): columns sharing one group

`step` is the multiplier of the element values (INT and scaled grids: the float16 scale; MX:
the block's 2**e; NVFP4: E4M3 block scale times the float32 tensor scale); values are
`element(x / step) * step` with the format's own element rounding and clamping, so a value
produced here with the parameters `group_params` gives is bit-identical to `fake_quant`'s.
Unquantized formats (bf16/fp16/fp32) have no parameters (`None`): rounding is the cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.formats.base import Format
from mixq.formats.elements import GRIDS, grid_levels, pow2, round_elements, round_minifloat
from mixq.formats.grouping import check_weight, from_groups, to_groups
from mixq.formats.intk import IntFormat
from mixq.formats.mx import MXINT8_FRAC_BITS, MXFormat
from mixq.formats.nvfp4 import NVFP4Format
from mixq.formats.plain import PlainFormat
from mixq.formats.scaled import GridFormat

E4M3 = GRIDS["fp8_e4m3"]


@dataclass(frozen=True)
class GroupParams:
    """Fixed quantization parameters of a weight's groups.

    step: (R, G) float32 multiplier of the element values (R = rows, or 1 for a per-tensor
          format, broadcast over rows; G = groups per row, 1 per channel / per tensor).
    zero: (R, G) float32 zero points (asymmetric INT only), else None.
    """

    step: torch.Tensor
    zero: torch.Tensor | None = None

    def column(self, group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(step (R', 1), zero (R', 1) | None) of group `group` (per row)."""
        z = None if self.zero is None else self.zero[:, group : group + 1]
        return self.step[:, group : group + 1], z


def _grouping(fmt: Format) -> int:
    """The `to_groups` granularity of a format (MX 32, NVFP4 16, else its group_size)."""
    if isinstance(fmt, MXFormat):
        return 32
    if isinstance(fmt, NVFP4Format):
        return 16
    return fmt.group_size


def group_params(fmt: Format, w: torch.Tensor, *, tensor_scale: torch.Tensor | None = None) -> GroupParams | None:
    """The parameters `fmt.fake_quant(w)` uses for each group of `w` (rows, cols), including
    the `:mse` clip search. NVFP4 takes its float32 tensor scale from `w` unless
    `tensor_scale` is given (a quantizer that sees a slice of the weight passes the whole
    weight's). None for unquantized formats."""
    if isinstance(fmt, PlainFormat):
        return None
    check_weight(w)
    x = to_groups(w.float(), _grouping(fmt))  # (R, G, g)
    if isinstance(fmt, IntFormat):
        _, _, scale, zero = fmt._encode(x, fmt._ratio(x), with_codes=False)
        return GroupParams(scale, None if zero is None else zero.float())
    if isinstance(fmt, GridFormat):
        _, _, scale = fmt._encode(x, fmt._ratio(x), with_codes=False)
        return GroupParams(scale)
    if isinstance(fmt, MXFormat):
        _, _, exp = fmt._encode(x, with_codes=False)
        return GroupParams(pow2(exp))
    if isinstance(fmt, NVFP4Format):
        ts = fmt.tensor_scale_of(w.float()) if tensor_scale is None else tensor_scale.float()
        _, _, block_codes = fmt._encode(x, ts, with_codes=False)
        block_scale = grid_levels(E4M3, x.device)[block_codes.long()]  # (R, B)
        return GroupParams(block_scale * ts)
    raise TypeError(f"no fixed-parameter path for format {fmt!s} ({type(fmt).__name__})")


def _elements(fmt: Format, y: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Element values (before the step) of y = x / step, rounded and clamped as `fmt` does."""
    if isinstance(fmt, IntFormat):
        k = fmt.code_bits
        if fmt.asym:
            top = 2**k - 1
            return torch.clamp(torch.round(y) + zero, 0, top) - zero
        qmax = 2 ** (k - 1) - 1
        return torch.clamp(torch.round(y), -qmax - 1, qmax)
    if isinstance(fmt, GridFormat):
        return round_elements(y, fmt.element, with_codes=False)[1]
    if isinstance(fmt, MXFormat):
        if fmt.element == "int8":
            return torch.clamp(torch.round(y * 2**MXINT8_FRAC_BITS), -127, 127) * 2.0**-MXINT8_FRAC_BITS
        return round_minifloat(y, fmt.element, with_codes=False)[1]
    if isinstance(fmt, NVFP4Format):
        return round_minifloat(y, "fp4_e2m1", with_codes=False)[1]
    raise TypeError(f"no fixed-parameter path for format {fmt!s} ({type(fmt).__name__})")


def round_columns(fmt: Format, x: torch.Tensor, step: torch.Tensor | None,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """Values of x (R, k) on the grid of fixed parameters step (R, 1) or (1, 1) (+ zero).
    Every column of x must belong to the group the parameters were made for."""
    if isinstance(fmt, PlainFormat):
        return x.to(fmt.dtype).float()
    x = x.float()
    # NVFP4: a zero block scale rounds to 0; symmetric INT steps carry a sign.
    safe = torch.where(step != 0, step, torch.ones_like(step))
    y = torch.where(step != 0, x / safe, torch.zeros_like(x))
    return _elements(fmt, y, zero) * step


def fake_quant_with(fmt: Format, w: torch.Tensor, params: GroupParams | None) -> torch.Tensor:
    """Quantize-dequantize w (rows, cols) with fixed group parameters (float32).
    `fake_quant_with(fmt, w, group_params(fmt, w)) == fmt.fake_quant(w)` exactly."""
    if isinstance(fmt, PlainFormat) or params is None:
        return w.to(fmt.dtype).float() if isinstance(fmt, PlainFormat) else w.float()
    gs = _grouping(fmt)
    x = to_groups(w.float(), gs)  # (R, G, g)
    step = params.step.unsqueeze(-1)  # (R, G, 1)
    zero = None if params.zero is None else params.zero.unsqueeze(-1)
    safe = torch.where(step != 0, step, torch.ones_like(step))
    y = torch.where(step != 0, x / safe, torch.zeros_like(x))
    values = _elements(fmt, y, zero) * step
    return from_groups(values, tuple(w.shape), gs)
