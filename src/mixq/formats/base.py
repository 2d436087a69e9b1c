"""The contract every numeric format follows.

A format quantizes a 2-D weight `(rows, cols)`: rows are output channels, cols the input
dimension along which groups/blocks run (a Conv2d weight is flattened to
`(out, in * kh * kw)` by the caller). Every format maps a weight to k-bit unsigned *codes*
plus per-group *scales* (and, for asymmetric INT, per-group *zeros*); dequantization is
`levels[codes] * scale` (INT asym: `(codes - zero) * scale`), where `levels` is the format's
code -> value table. The same (codes, scales, zeros) triple is what packed checkpoints store
and what GPU kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class QTensor:
    """A quantized 2-D weight in codes-plus-scales form.

    codes:  (rows, cols) uint8, each < 2**code_bits (unpacked; see `formats.packing`). The
            unquantized bf16/fp16/fp32 formats keep the cast tensor itself here instead.
    scales: (rows, n_groups) in the format's scale storage dtype: float16 for INT/FP/NF,
            uint8 biased exponents for MX (E8M0), uint8 E4M3 bit patterns for NVFP4;
            (rows, 1) per channel, (1, 1) per tensor; None for unquantized formats. GGUF
            formats: (rows, n_blocks * header_bytes) uint8, each block's non-code bytes as
            llama.cpp stores them (see `formats.gguf`).
    zeros:  (rows, n_groups) uint8 zero points (asymmetric INT only), else None.
    tensor_scale: float32 scalar tensor (NVFP4 only), else None.
    """

    fmt: str
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class Layout:
    """The streams a quantized weight is stored as, with their exact widths.

    Codes and zeros are packed bitstreams at `code_bits` each (`formats.packing`); scales are
    stored at `scale_bits` each (16: float16, 8: E8M0 / E4M3 bytes); `tensor_scale_bits` is 32
    for the one float32 NVFP4 tensor scale, else 0. `bits` is the all-in total every bit count
    in mixq reports.
    """

    code_bits: int
    n_codes: int
    scales_shape: tuple[int, int] | None = None
    scale_dtype: torch.dtype | None = None
    has_zeros: bool = False
    tensor_scale_bits: int = 0

    @property
    def n_scales(self) -> int:
        return 0 if self.scales_shape is None else self.scales_shape[0] * self.scales_shape[1]

    @property
    def scale_bits(self) -> int:
        if self.scale_dtype is None:
            return 0
        return self.scale_dtype.itemsize * 8

    @property
    def bits(self) -> int:
        n_zeros = self.n_scales if self.has_zeros else 0
        return (self.code_bits * (self.n_codes + n_zeros) + self.scale_bits * self.n_scales
                + self.tensor_scale_bits)


@runtime_checkable
class Format(Protocol):
    """What every format provides. Implementations are frozen dataclasses whose
    `str(fmt)` is a spec string that `mixq.formats.parse` maps back to an equal object."""

    @property
    def code_bits(self) -> int:
        """Bits per stored code (16 for the unquantized bf16/fp16 formats)."""

    def group_size_for(self, cols: int) -> int:
        """Number of consecutive input elements sharing one scale, for a weight of `cols`
        columns: g for group/block formats (the last group of a row may be partial), cols for
        per-channel, and cols for per-tensor too (whose one scale also spans all rows)."""

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize; same shape and dtype as `w` (computed in float32)."""

    def quantize(self, w: torch.Tensor) -> QTensor:
        """Codes-plus-scales form of a 2-D float weight."""

    def dequantize(self, q: QTensor) -> torch.Tensor:
        """Float32 weight from codes-plus-scales; `dequantize(quantize(w)) == fake_quant(w)`."""

    def supports(self, shape: tuple[int, int]) -> str | None:
        """None when a weight of `shape` can be stored in this format, else the reason it
        cannot (e.g. a GGUF k-quant's rows must be multiples of 256). Quantizing an
        unsupported shape raises FormatError; planners offer the format only where None."""

    def layout(self, shape: tuple[int, int]) -> Layout:
        """The stored streams (codes, scales, zeros, tensor scale) for a weight of `shape`."""

    def bits(self, shape: tuple[int, int]) -> int:
        """Exact all-in storage bits for a weight of `shape`: codes, scales, zeros, tensor
        scales. Equal to 8x the bytes a packed checkpoint writes for it (up to byte
        rounding of each packed stream)."""
