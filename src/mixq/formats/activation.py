"""Input-activation formats: how a unit's input x (tokens, in) is quantized before its weight
multiplies it (the `@` part of an option, `int4:g128+gptq@int8:tok`).

    act = parse_act("int8:tok")        # str(act) == "int8:tok"
    x_hat = act.fake_quant(x)          # x (..., in): per token, dynamic
    act.code_bits                      # 8: the width the matmul computes in (BOPs)

Spec grammar (case-insensitive; the element part is that of `mixq.formats.parse`):

    ELEMENT:tok[:asym]     one scale per token (row of x), computed on the fly (dynamic):
                           int8:tok, int4:tok, fp8_e4m3:tok, fp8_e5m2:tok, nf4:tok
    ELEMENT:g<N>[:asym]    per-token groups of N consecutive input channels: int4:g64
    ELEMENT:t              one static scale per tensor, calibrated: fp8_e4m3:t, int8:t
    mxfp8|mxfp6|mxfp4|mxint8|nvfp4   OCP MX (block 32 along `in`, E8M0 scale) and NVFP4
                           (block 16, E4M3 scale, per-call fp32 tensor scale), per token

A token's row is quantized exactly as a weight row of the same element format is (the
formats' own `fake_quant` on the (tokens, in) view: `:tok` is the weight formats' `:ch`, one
scale per row). A static per-tensor format has no scale of its own: its scale is
amax / max level (INT: amax / (2^(k-1) - 1), mirror-symmetric, so the calibrated range is
never clipped; FP: amax / the element's largest normal), rounded to float16, from the largest
|x| seen on the calibration data (`static_scale`), and values beyond it saturate.

`code_bits` is the element width (16 for no quantization), which is what bit operations
(BOPs = MACs x weight bits x activation bits, HAWQ-V3) count; scales are transient and do
not count in any stored size. A group or block must divide the unit's input dimension
(`check_cols`): a kernel cannot run a partial group of an activation row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from mixq.errors import FormatError
from mixq.formats.base import Format
from mixq.formats.fixed import round_columns
from mixq.formats.grouping import PER_CHANNEL, PER_TENSOR, fp16_scale
from mixq.formats.intk import IntFormat
from mixq.formats.mx import MX_BLOCK, MX_ELEMENTS
from mixq.formats.nvfp4 import NVFP4_BLOCK
from mixq.formats.plain import PLAIN_DTYPES
from mixq.formats.scaled import GridFormat
from mixq.formats.spec import parse

ACT_FORMS = ("ELEMENT:tok (int8:tok, int4:tok, fp8_e4m3:tok)", "ELEMENT:g<N> (int4:g64)",
             "ELEMENT:t (fp8_e4m3:t, static, calibrated)", "mxfp8|mxfp6|mxfp4|mxint8|nvfp4")

_HELP = "; valid forms: " + "; ".join(ACT_FORMS)


def _fail(spec: str, reason: str) -> FormatError:
    return FormatError(f"bad activation spec {spec!r}: {reason}{_HELP}")


@dataclass(frozen=True)
class ActFormat:
    """An input-activation format. `row_spec` is the format a row of x (one token) is
    quantized with, as `formats.parse` spells it (per token: `int8:ch`; groups: `int4:g64`;
    static per tensor: `fp8_e4m3:t`; MX/NVFP4 by name)."""

    row_spec: str

    def __post_init__(self) -> None:
        fmt = parse(self.row_spec)
        object.__setattr__(self, "row_spec", str(fmt))
        if not isinstance(fmt, (IntFormat, GridFormat)) and str(fmt).split(":")[0] not in (*MX_ELEMENTS, "nvfp4"):
            raise _fail(str(fmt), "unquantized dtypes are not activation formats (leave the @ part out)")
        if isinstance(fmt, (IntFormat, GridFormat)) and fmt.mse:
            raise _fail(str(fmt), ":mse searches clip ratios offline; activations are quantized on the fly")
        if isinstance(fmt, IntFormat) and fmt.group_size == PER_TENSOR and fmt.asym:
            raise _fail(str(fmt), "a static per-tensor scale is symmetric (drop :asym)")

    def __str__(self) -> str:
        head, *opts = self.row_spec.split(":")
        return ":".join([head] + ["tok" if o == "ch" else o for o in opts])

    @cached_property
    def fmt(self) -> Format:
        return parse(self.row_spec)

    @property
    def static(self) -> bool:
        """Whether the scale is one calibrated number per tensor (else computed per token)."""
        return getattr(self.fmt, "group_size", None) == PER_TENSOR

    @property
    def code_bits(self) -> int:
        return int(self.fmt.code_bits)

    def block(self) -> int | None:
        """Input channels sharing one scale within a token (None: the whole row / tensor)."""
        name = self.row_spec.split(":")[0]
        if name in MX_ELEMENTS:
            return MX_BLOCK
        if name == "nvfp4":
            return NVFP4_BLOCK
        g = self.fmt.group_size
        return g if g > 0 else None

    def check_cols(self, cols: int) -> None:
        """FormatError unless every group / block of a row of `cols` inputs is whole."""
        b = self.block()
        if b is not None and cols % b:
            raise FormatError(f"activation format {self}: groups of {b} do not divide the input dimension {cols} "
                              f"(a row of {cols} inputs would end in a partial group of {cols % b})")

    def max_level(self) -> float:
        """The largest |value| before scaling (static scales map amax onto it)."""
        if isinstance(self.fmt, IntFormat):
            return float(2 ** (self.fmt.code_bits - 1) - 1)
        return float(self.fmt.grid.max_abs)

    def static_scale(self, amax: float) -> torch.Tensor:
        """The float16-rounded (1, 1) float32 scale of a static format for a calibrated amax."""
        return fp16_scale(torch.tensor([[float(amax) / self.max_level()]], dtype=torch.float32))

    def fake_quant(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) quantized and dequantized, same shape and dtype; a static format needs
        `scale` (see `static_scale`)."""
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, shape[-1]).float()  # (tokens, in)
        if rows.shape[0] == 0:
            return x
        if self.static:
            if scale is None:
                raise FormatError(f"activation format {self} is static: it needs a calibrated scale")
            out = round_columns(self.fmt, rows, scale.to(rows.device))
        else:
            out = self.fmt.fake_quant(rows)
        return out.reshape(shape).to(dtype)


def parse_act(spec: str | ActFormat) -> ActFormat:
    """The activation format a spec names (see the module docstring)."""
    if isinstance(spec, ActFormat):
        return spec
    if not isinstance(spec, str):
        raise FormatError(f"activation spec must be a string, got {type(spec).__name__}{_HELP}")
    text = "".join(spec.split()).lower()
    if not text:
        raise _fail(spec, "empty spec")
    head, *opts = text.split(":")
    if head in PLAIN_DTYPES or head in ("bfloat16", "float16", "float32", "none", "float"):
        raise _fail(spec, "unquantized inputs are the default: leave the @ part out")
    if head in MX_ELEMENTS or head == "nvfp4":
        if opts:
            raise _fail(spec, f"{head} takes no options (its block is fixed; it is per token)")
        return ActFormat(head)
    if "ch" in opts:
        raise _fail(spec, "activations have no output channels: use :tok for one scale per token")
    if not any(o == "tok" or o == "t" or (o.startswith("g") and o[1:].isdigit()) for o in opts):
        raise _fail(spec, f"{head} needs a granularity: {head}:tok (per token), {head}:g64 (groups) or {head}:t "
                    "(static per tensor)")
    row = ":".join([head] + ["ch" if o == "tok" else o for o in opts])
    try:
        return ActFormat(row)
    except FormatError as e:
        if "bad activation spec" in str(e):
            raise
        raise _fail(spec, str(e)) from e


__all__ = ["ACT_FORMS", "ActFormat", "PER_CHANNEL", "parse_act"]
