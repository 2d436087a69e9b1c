"""Spec strings: `parse(str) -> Format` and the catalogue of representative specs.

Grammar (case-insensitive, whitespace ignored; options after the head in any order):

    int<2..8>:(g<N>|ch|t)[:asym][:mse]                  int4:g128, int3:g64:asym, int8:ch
    (fp8_e4m3|fp8_e5m2|fp6_e3m2|fp6_e2m3|fp4_e2m1):(g<N>|ch|t)[:mse]    fp8_e4m3:ch
    nf4:(g<N>|ch|t)[:mse]                               nf4:g64
    mxfp8|mxfp8_e5m2|mxfp6|mxfp6_e3m2|mxfp4|mxint8      OCP MX, block 32, E8M0 scale
    nvfp4                                               block 16, E4M3 scale, fp32 tensor scale
    bf16|fp16|fp32                                      unquantized
    q4_0|q4_1|q5_0|q5_1|q8_0|iq4_nl                      GGUF blocks of 32 (llama.cpp types)
    q2_k|q3_k|q4_k|q5_k|q6_k|iq4_xs                      GGUF super-blocks of 256

g<N>: groups of N input elements per row; ch: one scale per output channel; t: one scale per
tensor; asym: zero points (INT only); mse: per-group MSE-optimal clip search. `str(fmt)` is
canonical: options in the order granularity, asym, mse; aliases (mxfp8_e4m3, mxfp6_e2m3,
mxfp4_e2m1, bfloat16, float16, float32) map to the names above.
"""

from __future__ import annotations

import difflib
import re

from mixq.errors import FormatError
from mixq.formats.base import Format
from mixq.formats.gguf import TYPES as GGUF_TYPES, GGUFFormat
from mixq.formats.grouping import PER_CHANNEL, PER_TENSOR
from mixq.formats.intk import IntFormat
from mixq.formats.mx import MX_ELEMENTS, MXFormat
from mixq.formats.nvfp4 import NVFP4Format
from mixq.formats.plain import PLAIN_DTYPES, PlainFormat
from mixq.formats.scaled import GRID_ELEMENTS, GridFormat

VALID_FORMS = (
    "int<2..8>:(g<N>|ch|t)[:asym][:mse]  (e.g. int4:g128, int3:g64:asym, int8:ch)",
    "fp8_e4m3|fp8_e5m2|fp6_e3m2|fp6_e2m3|fp4_e2m1 :(g<N>|ch|t)[:mse]  (e.g. fp8_e4m3:ch, fp4_e2m1:g32)",
    "nf4:(g<N>|ch|t)[:mse]  (e.g. nf4:g64)",
    "mxfp8|mxfp8_e5m2|mxfp6|mxfp6_e3m2|mxfp4|mxint8  (OCP MX, block 32)",
    "nvfp4  (block 16, E4M3 block scale + fp32 tensor scale)",
    "bf16|fp16|fp32  (unquantized)",
    "q4_0|q4_1|q5_0|q5_1|q8_0|iq4_nl|q2_k|q3_k|q4_k|q5_k|q6_k|iq4_xs  (llama.cpp GGUF block types)",
)

ALIASES = {
    "mxfp8_e4m3": "mxfp8", "mxfp6_e2m3": "mxfp6", "mxfp4_e2m1": "mxfp4",
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
}

# Heads that name a family but not a format, and what to write instead.
HINTS = {
    "fp8": "fp8_e4m3:ch, fp8_e5m2:ch or mxfp8", "e4m3": "fp8_e4m3:ch", "e5m2": "fp8_e5m2:ch",
    "fp6": "fp6_e2m3:g32, fp6_e3m2:g32 or mxfp6", "fp4": "fp4_e2m1:g32, mxfp4 or nvfp4",
    "nf4": "nf4:g64", "int": "int4:g128 or int8:ch", "mx": "mxfp4, mxfp6, mxfp8 or mxint8",
    "mxint4": "int4:g32 or mxfp4", "bf": "bf16", "fp": "fp16 or fp32",
    "q4_k_m": "q4_k (a GGUF file type mixes types: plan with --target gguf)", "q4": "q4_0, q4_1 or q4_k",
    "q3": "q3_k", "q5": "q5_0, q5_1 or q5_k", "q6": "q6_k", "q8": "q8_0", "iq4": "iq4_nl or iq4_xs",
}


def _fail(spec: str, reason: str, hint: str | None = None) -> FormatError:
    text = f"bad format spec {spec!r}: {reason}"
    if hint:
        text += f" (did you mean {hint}?)"
    return FormatError(text + ". Valid forms: " + "; ".join(VALID_FORMS))


def _granularity(spec: str, head: str, opts: list[str]) -> tuple[int, bool, bool]:
    """(group_size, asym, mse) from the option tokens after the head."""
    group_size, asym, mse = None, False, False
    for opt in opts:
        m = re.fullmatch(r"g(\d+)", opt)
        if m or opt in ("ch", "t"):
            if group_size is not None:
                raise _fail(spec, "more than one granularity")
            if m and int(m.group(1)) < 1:
                raise _fail(spec, "group size must be a positive integer", f"{head}:g128")
            group_size = int(m.group(1)) if m else (PER_CHANNEL if opt == "ch" else PER_TENSOR)
        elif opt in ("asym", "mse"):
            if (asym if opt == "asym" else mse):
                raise _fail(spec, f"option {opt!r} given twice")
            asym, mse = asym or opt == "asym", mse or opt == "mse"
        else:
            raise _fail(spec, f"unknown option {opt!r}", f"{head}:g128, {head}:ch or {head}:t")
    if group_size is None:
        raise _fail(spec, f"{head} needs a granularity", f"{head}:g128, {head}:g64, {head}:ch or {head}:t")
    return group_size, asym, mse


def parse(spec: str | Format) -> Format:
    """The format a spec string names (see the module docstring); a Format passes through."""
    if not isinstance(spec, str):
        if isinstance(spec, Format) and hasattr(spec, "__dataclass_fields__"):
            return spec
        raise FormatError(f"format spec must be a string, got {type(spec).__name__}")
    text = "".join(spec.split()).lower()
    if not text:
        raise _fail(spec, "empty spec")
    head, *opts = text.split(":")
    head = ALIASES.get(head, head)
    if head in MX_ELEMENTS or head == "nvfp4" or head in PLAIN_DTYPES or head in GGUF_TYPES:
        if opts:
            raise _fail(spec, f"{head} takes no options (its block size is fixed)", head)
        if head in GGUF_TYPES:
            return GGUFFormat(head)
        if head == "nvfp4":
            return NVFP4Format()
        return MXFormat(head) if head in MX_ELEMENTS else PlainFormat(head)
    m = re.fullmatch(r"int(\d+)", head)
    if m:
        if not 2 <= int(m.group(1)) <= 8:
            raise _fail(spec, f"int bits must be 2..8, got {m.group(1)}", "int4:g128 or int8:ch")
        group_size, asym, mse = _granularity(spec, head, opts)
        return IntFormat(int(m.group(1)), group_size, asym, mse)
    if head in GRID_ELEMENTS:
        group_size, asym, mse = _granularity(spec, head, opts)
        if asym:
            raise _fail(spec, "asym applies to int formats only", f"{head}:{':'.join(o for o in opts if o != 'asym')}")
        return GridFormat(head, group_size, mse)
    hint = HINTS.get(head) or ", ".join(difflib.get_close_matches(text, catalogue(), n=3, cutoff=0.6))
    raise _fail(spec, f"unknown format {head!r}", hint or None)


def catalogue() -> list[str]:
    """One representative spec per format family and variant, in family order."""
    specs = []
    for k in range(2, 9):
        specs += [f"int{k}:g64", f"int{k}:g128", f"int{k}:ch"]
    for k in (2, 3, 4):
        specs += [f"int{k}:g64:asym", f"int{k}:g128:asym"]
    specs += ["int8:t", "int3:g128:mse", "int4:g128:mse"]
    for element in GRID_ELEMENTS[:-1]:
        specs += [f"{element}:ch", f"{element}:g32"]
    specs += ["fp8_e4m3:t", *MX_ELEMENTS, "nvfp4", "nf4:g64", "nf4:g128", *PLAIN_DTYPES, *GGUF_TYPES]
    return specs
