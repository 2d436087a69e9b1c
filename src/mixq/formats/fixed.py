"""Quantization with per-group parameters held fixed: what GPTQ-style quantizers need.

`fake_quant(w)` derives each group's scale from the group it quantizes. An error-compensating
quantizer instead fixes a group's parameters once (from the weights as they are when it
reaches the group) and then rounds the group's columns one at a time onto that grid, each
column after the errors of the earlier ones were spread onto it. This module splits the two
steps for every quantized format:

    params = group_params(fmt, w)                  # (R, G) steps (+ zero points, stored scales)
    values = fake_quant_with(fmt, w, params)       # == fmt.fake_quant(w) exactly
    cols   = round_columns(fmt, x, step, zero)     # x (R, k): columns sharing one group
    codes, cols = encode_columns(fmt, x, step, zero)   # the element codes too
    q = qtensor_from(fmt, shape, codes, params)    # QTensor: dequantize(q) == the values

`step` is the multiplier of the element values (INT and scaled grids: the float16 scale; MX:
the block's 2**e; NVFP4: E4M3 block scale times the float32 tensor scale); values are
`element(x / step) * step` with the format's own element rounding and clamping, so a value
produced here with the parameters `group_params` gives is bit-identical to `fake_quant`'s.
Unquantized formats (bf16/fp16/fp32) have no parameters (`None`): rounding is the cast.
GGUF formats fix a whole block (32, or a super-block of 256) at once, whose sub-blocks of 16
or 32 columns each get one (step, offset): values are `level * step - offset` with the step
and offset llama.cpp decodes from the block's header bytes (`GroupParams.scales`), and a
column takes the parameters of its sub-block (`param_group_size`).

A quantizer that rounds with fixed parameters (GPTQ) keeps the codes `encode_columns` gives
and the parameters' stored form (`GroupParams.scales`, `tensor_scale`), so its output is a
`QTensor` directly: `fmt.dequantize(qtensor_from(...))` multiplies the same float32 element
value by the same float32 step, so it reproduces the quantizer's values bit for bit. No
codes are ever re-derived from a float weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.formats.base import Format, QTensor
from mixq.formats.elements import GRIDS, grid_levels, pow2, round_elements, round_minifloat
from mixq.formats.gguf import GGUFFormat
from mixq.formats.grouping import check_weight, from_groups, to_groups
from mixq.formats.intk import IntFormat
from mixq.formats.mx import E8M0_BIAS, MXINT8_FRAC_BITS, MXFormat
from mixq.formats.nvfp4 import NVFP4Format
from mixq.formats.plain import PlainFormat
from mixq.formats.scaled import GridFormat

E4M3 = GRIDS["fp8_e4m3"]


@dataclass(frozen=True)
class GroupParams:
    """Fixed quantization parameters of a weight's groups.

    step: (R, G) float32 multiplier of the element values (R = rows, or 1 for a per-tensor
          format, broadcast over rows; G = groups per row, 1 per channel / per tensor).
    zero: (R, G) float32 zero points (asymmetric INT), or the subtracted offsets of GGUF
          formats with mins (value = level * step - zero), else None.
    scales: the scales as the format stores them (`QTensor.scales`: (R, G) float16 for
          INT/FP/NF, E8M0 exponent bytes for MX, E4M3 bytes for NVFP4; GGUF: the blocks'
          header bytes (R, n_blocks * header_bytes), G = n_blocks * sub-blocks per block).
    tensor_scale: float32 scalar (NVFP4 only), else None.
    """

    step: torch.Tensor
    zero: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    def column(self, group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(step (R', 1), zero (R', 1) | None) of group `group` (per row)."""
        z = None if self.zero is None else self.zero[:, group : group + 1]
        return self.step[:, group : group + 1], z

    def columns(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(step (R', k), zero (R', k) | None) of the groups `groups` (k,) (long): one column
        of parameters per entry, e.g. the group of every weight column in processing order."""
        z = None if self.zero is None else self.zero[:, groups]
        return self.step[:, groups], z

    @staticmethod
    def concat(parts: list["GroupParams"]) -> "GroupParams":
        """The parameters of consecutive groups, concatenated along the group dimension."""
        def cat(name):
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts, dim=1)

        return GroupParams(cat("step"), cat("zero"), cat("scales"), parts[0].tensor_scale)


def _grouping(fmt: Format) -> int:
    """The `to_groups` granularity of a format (MX 32, NVFP4 16, GGUF its sub-block, else
    its group_size)."""
    if isinstance(fmt, GGUFFormat):
        return fmt.sub_block
    if isinstance(fmt, MXFormat):
        return 32
    if isinstance(fmt, NVFP4Format):
        return 16
    return fmt.group_size


def param_group_size(fmt: Format, cols: int) -> int:
    """Consecutive columns of a weight with `cols` columns that share one column of
    `GroupParams.step`: the group size, or a GGUF format's sub-block (its parameters are
    fixed a whole block of `group_size_for(cols)` columns at a time)."""
    if isinstance(fmt, GGUFFormat):
        return fmt.sub_block
    return fmt.group_size_for(cols)


def group_params(fmt: Format, w: torch.Tensor, *, tensor_scale: torch.Tensor | None = None,
                 importance: torch.Tensor | None = None) -> GroupParams | None:
    """The parameters `fmt.fake_quant(w)` uses for each group of `w` (rows, cols), including
    the `:mse` clip search. NVFP4 takes its float32 tensor scale from `w` unless
    `tensor_scale` is given (a quantizer that sees a slice of the weight passes the whole
    weight's). `importance` (cols,): weights of each input's squared error for formats that
    search their parameters (GGUF k-quants and IQ4; e.g. diag(H)); with it the parameters
    are no longer `fake_quant`'s. None for unquantized formats."""
    if isinstance(fmt, PlainFormat):
        return None
    check_weight(w)
    if isinstance(fmt, GGUFFormat):
        header = fmt.headers(w.float(), importance)
        step, offset = fmt.params(header, w.shape[0])
        return GroupParams(step, offset, header)
    x = to_groups(w.float(), _grouping(fmt))  # (R, G, g)
    if isinstance(fmt, IntFormat):
        _, _, scale, zero = fmt._encode(x, fmt._ratio(x), with_codes=False)
        return GroupParams(scale, None if zero is None else zero.float(), scale.to(torch.float16))
    if isinstance(fmt, GridFormat):
        _, _, scale = fmt._encode(x, fmt._ratio(x), with_codes=False)
        return GroupParams(scale, None, scale.to(torch.float16))
    if isinstance(fmt, MXFormat):
        _, _, exp = fmt._encode(x, with_codes=False)
        return GroupParams(pow2(exp), None, (exp + E8M0_BIAS).to(torch.uint8))
    if isinstance(fmt, NVFP4Format):
        ts = fmt.tensor_scale_of(w.float()) if tensor_scale is None else tensor_scale.float()
        _, _, block_codes = fmt._encode(x, ts, with_codes=False)
        block_scale = grid_levels(E4M3, x.device)[block_codes.long()]  # (R, B)
        return GroupParams(block_scale * ts, None, block_codes, ts)
    raise TypeError(f"no fixed-parameter path for format {fmt!s} ({type(fmt).__name__})")


def _elements(fmt: Format, y: torch.Tensor, zero: torch.Tensor | None,
              with_codes: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(codes uint8 | None, element values before the step) of y = x / step, rounded and
    clamped as `fmt` does; codes as `fmt.quantize` stores them."""
    if isinstance(fmt, IntFormat):
        k = fmt.code_bits
        if fmt.asym:
            top = 2**k - 1
            c = torch.clamp(torch.round(y) + zero, 0, top)
            return (c.to(torch.uint8) if with_codes else None), c - zero
        qmax = 2 ** (k - 1) - 1
        q = torch.clamp(torch.round(y), -qmax - 1, qmax)
        return ((q + qmax + 1).to(torch.uint8) if with_codes else None), q
    if isinstance(fmt, GridFormat):
        return round_elements(y, fmt.element, with_codes=with_codes)
    if isinstance(fmt, MXFormat):
        if fmt.element == "int8":
            q = torch.clamp(torch.round(y * 2**MXINT8_FRAC_BITS), -127, 127)
            codes = (q.to(torch.int16) & 0xFF).to(torch.uint8) if with_codes else None  # two's complement
            return codes, q * 2.0**-MXINT8_FRAC_BITS
        return round_minifloat(y, fmt.element, with_codes=with_codes)
    if isinstance(fmt, NVFP4Format):
        return round_minifloat(y, "fp4_e2m1", with_codes=with_codes)
    raise TypeError(f"no fixed-parameter path for format {fmt!s} ({type(fmt).__name__})")


def _scaled(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """y = x / step; 0 where the step is 0 (an NVFP4 block whose scale underflowed)."""
    safe = torch.where(step != 0, step, torch.ones_like(step))
    return torch.where(step != 0, x / safe, torch.zeros_like(x))


def round_columns(fmt: Format, x: torch.Tensor, step: torch.Tensor | None,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """Values of x (R, k) on the grid of fixed parameters step (R, 1) or (1, 1) (+ zero), or
    per column (R, k). Every column of x must belong to the group its parameters were made for."""
    return encode_columns(fmt, x, step, zero, with_codes=False)[1]


def encode_columns(fmt: Format, x: torch.Tensor, step: torch.Tensor | None, zero: torch.Tensor | None = None,
                   *, with_codes: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(codes, values) of x (R, k) on the grid of fixed parameters (see `round_columns`):
    codes (R, k) as `fmt.quantize` stores them (uint8; for an unquantized format the cast
    tensor itself), values (R, k) float32 with values == dequantized codes exactly."""
    if isinstance(fmt, PlainFormat):
        cast = x.to(fmt.dtype)
        return (cast if with_codes else None), cast.float()
    if isinstance(fmt, GGUFFormat):
        return fmt.encode(x.float(), step, zero, with_codes)
    codes, elements = _elements(fmt, _scaled(x.float(), step), zero, with_codes)
    return codes, elements * step


def qtensor_from(fmt: Format, shape: tuple[int, int], codes: torch.Tensor, params: GroupParams | None) -> QTensor:
    """The QTensor of codes (rows, cols) made with fixed parameters `params` (e.g. by GPTQ):
    `fmt.dequantize` of it gives exactly the values `encode_columns` returned with them."""
    shape = (int(shape[0]), int(shape[1]))
    if isinstance(fmt, PlainFormat) or params is None:
        return QTensor(str(fmt), shape, codes.to(fmt.dtype).contiguous(), None)
    if params.scales is None:
        raise TypeError(f"parameters of {fmt} without their stored scales")
    if isinstance(fmt, GGUFFormat):
        return QTensor(str(fmt), shape, codes.contiguous(), params.scales.contiguous())
    zeros = None if params.zero is None else params.zero.to(torch.uint8)
    return QTensor(str(fmt), shape, codes.contiguous(), params.scales.contiguous(), zeros, params.tensor_scale)


def fake_quant_with(fmt: Format, w: torch.Tensor, params: GroupParams | None) -> torch.Tensor:
    """Quantize-dequantize w (rows, cols) with fixed group parameters (float32).
    `fake_quant_with(fmt, w, group_params(fmt, w)) == fmt.fake_quant(w)` exactly."""
    if isinstance(fmt, PlainFormat) or params is None:
        return w.to(fmt.dtype).float() if isinstance(fmt, PlainFormat) else w.float()
    gs = _grouping(fmt)
    x = to_groups(w.float(), gs)  # (R, G, g)
    step = params.step.unsqueeze(-1)  # (R, G, 1)
    zero = None if params.zero is None else params.zero.unsqueeze(-1)
    if isinstance(fmt, GGUFFormat):
        return from_groups(fmt.encode(x, step, zero, with_codes=False)[1], tuple(w.shape), gs)
    values = _elements(fmt, _scaled(x, step), zero)[1] * step
    return from_groups(values, tuple(w.shape), gs)
