"""mixq.formats: numeric formats as frozen dataclasses with round-tripping spec strings.

    fmt = parse("int4:g64")            # str(fmt) == "int4:g64"
    w_hat = fmt.fake_quant(w)          # (out, in), same dtype as w
    q = fmt.quantize(w)                # QTensor: uint8 codes + scales (+ zeros, tensor scale)
    fmt.dequantize(q)                  # == fake_quant(w) exactly (float32)
    fmt.bits(w.shape)                  # exact all-in bits: codes, scales, zeros, tensor scale

Families: INT-k (`intk`), scaled FP elements and NF4 (`scaled`), OCP MX (`mx`), NVFP4
(`nvfp4`), unquantized (`plain`), llama.cpp's GGUF block types (`gguf`); spec grammar in
`spec`; bit packing in `packing`.
"""

from __future__ import annotations

from mixq.formats.base import Format, Layout, QTensor
from mixq.formats.gguf import GGUFFormat
from mixq.formats.grouping import PER_CHANNEL, PER_TENSOR
from mixq.formats.intk import IntFormat
from mixq.formats.mx import MXFormat
from mixq.formats.nvfp4 import NVFP4Format
from mixq.formats.plain import PlainFormat
from mixq.formats.scaled import GridFormat
from mixq.formats.spec import VALID_FORMS, catalogue, parse


def bits_per_weight(fmt: Format | str, shape: tuple[int, int]) -> float:
    """All-in bits per weight element of `fmt` (a Format or a spec) for a weight of `shape`."""
    fmt = parse(fmt)
    return fmt.bits(tuple(shape)) / (shape[0] * shape[1])


__all__ = [
    "Format", "QTensor", "Layout", "parse", "catalogue", "bits_per_weight", "VALID_FORMS",
    "IntFormat", "GridFormat", "MXFormat", "NVFP4Format", "PlainFormat", "GGUFFormat",
    "PER_CHANNEL", "PER_TENSOR",
]
