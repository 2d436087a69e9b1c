"""Options and calibration settings: what a plan assigns to a unit, typed, low in the stack.

An option is a numeric format plus the quantizer that produces it and the transforms applied
before quantizing, written `FORMAT[+QUANTIZER][+rotate][+smooth][+lowrank:R][@ACT]`:

    int4:g64                  round to nearest
    int3:g64+gptq+rotate      GPTQ on the rotated weight
    int4:g128+smooth+lowrank:16
    int4:g128+gptq@int8:tok   and the unit's input quantized to int8 per token
    int4:g64+gptq+rotate@int4:tok   the input rotated online by the weight's rotation, then int4

The part after `@` is the unit's input-activation format (`mixq.formats.activation`); without
it the input stays in the model's float dtype. The transforms act on the input too, exactly:
the unit computes ŵ x̂ with x̂ = T⁻¹ A(T x), T x = (x diag(1/s)) Q the transformed input the
stored weight multiplies (QuaRot-style online rotation), so the activation quantizer A sees
the rotated (smoothed) input. `bits` (the weight's all-in bits) does not count the activation
format: activation widths count in bit operations (`act_bits`), not in storage.

`parse_option(str(o)) == o` for every option; the string form is canonical (quantizer, then
rotate, smooth, lowrank, whatever order the parts were written in), so plans and tables
compare options by their strings. The composition order is fixed by the math, not the
string: smooth, then rotate, then the low-rank split, then the quantizer (see
`mixq.quantizers.unit`).

`CalibConfig` carries the settings of calibrated application (GPTQ's block size, damping and
activation order, the smoothing grid, micro-batch size, true-sequential order), so they
travel as one frozen value instead of keyword arguments through every layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from mixq import formats
from mixq.errors import FormatError
from mixq.formats.activation import ActFormat, parse_act

QUANTIZERS = ("rtn", "gptq")
TRANSFORMS = ("rotate", "smooth", "lowrank:R")

_HELP = "expected FORMAT[+gptq][+rotate][+smooth][+lowrank:R][@ACT], e.g. int3:g64+gptq+rotate or int8:ch@int8:tok"

# Bits an unquantized activation (or weight) computes in, for bit operations.
FLOAT_COMPUTE_BITS = 16


@dataclass(frozen=True)
class Option:
    """A format with the quantizer and transforms that produce it.

    format: canonical format spec (`formats.parse` validates it).
    quantizer: "rtn" (round to nearest) or "gptq".
    rotate: a random-sign block Hadamard rotation of the input dimension.
    smooth: AWQ-style per-input-channel scales.
    lowrank: rank R of a bf16 low-rank branch kept beside the quantized residual, or None.
    act: the unit's input-activation format (`ActFormat`), or None (float inputs)."""

    format: str
    quantizer: str = "rtn"
    rotate: bool = False
    smooth: bool = False
    lowrank: int | None = None
    act: ActFormat | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", str(formats.parse(self.format)))
        for name in ("rotate", "smooth"):
            if not isinstance(getattr(self, name), bool):
                raise FormatError(f"option {self.format}: {name} must be True or False, got {getattr(self, name)!r}")
        if self.quantizer not in QUANTIZERS:
            raise FormatError(f"option {self.format}+{self.quantizer}: unknown quantizer {self.quantizer!r}; "
                              f"expected one of {', '.join(QUANTIZERS)}")
        if self.lowrank is not None and (isinstance(self.lowrank, bool) or not isinstance(self.lowrank, int)
                                         or self.lowrank < 1):
            raise FormatError(f"option {self.format}: lowrank needs a positive integer rank, got {self.lowrank!r}")
        if self.act is not None:
            object.__setattr__(self, "act", parse_act(self.act))

    def __str__(self) -> str:
        parts = [self.format]
        if self.quantizer != "rtn":
            parts.append(self.quantizer)
        parts.extend(self.transforms)
        return "+".join(parts) + (f"@{self.act}" if self.act is not None else "")

    @cached_property
    def fmt(self) -> formats.Format:
        return formats.parse(self.format)

    @property
    def transforms(self) -> tuple[str, ...]:
        """The transform parts as written in the spec: ("rotate", "smooth", "lowrank:R")."""
        out = []
        if self.rotate:
            out.append("rotate")
        if self.smooth:
            out.append("smooth")
        if self.lowrank is not None:
            out.append(f"lowrank:{self.lowrank}")
        return tuple(out)

    @property
    def is_plain(self) -> bool:
        """Round to nearest with no transform: the weight is the format's own rounding
        (whatever the activation format)."""
        return self.quantizer == "rtn" and not self.transforms

    @property
    def needs_calibration(self) -> bool:
        """Whether the option needs calibration data: an input Hessian or activation
        statistics (gptq, smooth), or a static activation scale."""
        return self.quantizer == "gptq" or self.smooth or (self.act is not None and self.act.static)

    @property
    def weight_needs_calibration(self) -> bool:
        """Whether the weight's quantizer needs input statistics (gptq, smooth)."""
        return self.quantizer == "gptq" or self.smooth

    @property
    def weight_only(self) -> Option:
        """The option without its activation format."""
        return self if self.act is None else dataclasses.replace(self, act=None)

    @property
    def act_bits(self) -> int:
        """Bits the input activations compute in (16 without an activation format)."""
        return FLOAT_COMPUTE_BITS if self.act is None else self.act.code_bits

    def weight_compute_bits(self) -> int:
        """Bits of a weight element as the matmul reads it (the format's code width)."""
        return int(self.fmt.code_bits)

    def replace(self, **changes) -> Option:
        return dataclasses.replace(self, **changes)

    def supports(self, shape: tuple[int, int]) -> str | None:
        """None when a unit of `shape` can take this option, else why not (its format cannot
        hold the shape, e.g. a GGUF k-quant on rows that are not multiples of 256)."""
        return self.fmt.supports(tuple(shape))

    def lowrank_rank(self, shape: tuple[int, int]) -> int | None:
        """The rank actually kept for a unit of `shape` (capped at min(out, in)), or None."""
        return None if self.lowrank is None else min(self.lowrank, shape[0], shape[1])

    def transform_bits(self, shape: tuple[int, int]) -> int:
        """Bits stored beside the codes: a low-rank branch 16 r (out + in) (bf16 factors),
        smoothing scales 32 in (one float32 per input channel). A rotation is a seed: 0."""
        rank = self.lowrank_rank(shape)
        return (16 * rank * (shape[0] + shape[1]) if rank else 0) + (32 * shape[1] if self.smooth else 0)

    def bits(self, shape: tuple[int, int]) -> int:
        """All-in bits of a unit of `shape` under this option, as a packed checkpoint stores it."""
        return self.fmt.bits(shape) + self.transform_bits(shape)


def parse_option(text: str | Option) -> Option:
    """Parse `FORMAT[+QUANTIZER][+TRANSFORM...][@ACT]` (an Option is returned as it is).
    The `@ACT` part may also stand before further `+` parts (`int4:g64@int8:tok+gptq`, as a
    suffix appended to a spec reads): an activation spec never holds a `+`."""
    if isinstance(text, Option):
        return text
    if not isinstance(text, str):
        raise FormatError(f"option must be a string, got {type(text).__name__}; {_HELP}")
    head, *acts = text.strip().split("@")
    if len(acts) > 1:
        raise FormatError(f"option {text!r}: more than one activation part (@); {_HELP}")
    act = None
    if acts:
        act_text, *more = acts[0].split("+")
        if not act_text.strip():
            raise FormatError(f"option {text!r}: empty activation part after @; {_HELP}")
        try:
            act = parse_act(act_text)
        except FormatError as e:
            raise FormatError(f"option {text!r}: {e}") from e
        head = "+".join([head, *more])
    parts = [p.strip() for p in head.split("+") if p.strip()]
    if not parts:
        raise FormatError(f"empty option {text!r}; {_HELP}")
    fmt = str(formats.parse(parts[0]))
    fields: dict = {} if act is None else {"act": act}
    for p in parts[1:]:
        low = p.lower()
        if low in QUANTIZERS:
            key, value = "quantizer", low
        elif low in ("rotate", "smooth"):
            key, value = low, True
        elif low.startswith("lowrank:"):
            rank = low.split(":", 1)[1]
            if not rank.isdigit() or int(rank) < 1:
                raise FormatError(f"option {text!r}: lowrank needs a positive integer rank, e.g. lowrank:16")
            key, value = "lowrank", int(rank)
        else:
            raise FormatError(f"option {text!r}: unknown part {p!r}; expected a quantizer ({', '.join(QUANTIZERS)}) "
                              "or a transform (rotate, smooth, lowrank:R)")
        if key in fields and fields[key] != value:
            raise FormatError(f"option {text!r}: {key} given twice ({fields[key]} and {value})")
        fields[key] = value
    return Option(fmt, **fields)


@dataclass(frozen=True)
class CalibConfig:
    """Settings of calibrated application (GPTQ, smoothing) and of the calibration passes.

    block_size, damp, act_order: GPTQ's column block, relative damping and activation order
    (static groups; see `quantizers.gptq`). smooth_grid: α grid of the smoothing search.
    batch_size: windows (images) per forward micro-batch. true_sequential: calibrate a
    block's units in stages (q/k/v, o, gate/up, down), each on the inputs the already
    quantized earlier stages produce. seed: the rotations' sign seed."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    smooth_grid: int = 20
    batch_size: int = 8
    true_sequential: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "smooth_grid", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FormatError(f"CalibConfig.{name} must be a positive integer, got {v!r}")
        if not (self.damp > 0):
            raise FormatError(f"CalibConfig.damp must be positive, got {self.damp!r}")

    def quantizer_settings(self) -> dict:
        """What the manifest records of the quantizer settings."""
        return {"block_size": self.block_size, "damp": self.damp, "act_order": self.act_order,
                "smooth_grid": self.smooth_grid}
