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

    codes:  (rows, cols) uint8, each < 2**code_bits (unpacked; see `formats.packing`).
    scales: (rows, n_groups) in the format's scale storage dtype: float16 for INT/FP/NF,
            uint8 biased exponents for MX (E8M0), uint8 E4M3 bit patterns for NVFP4.
    zeros:  (rows, n_groups) uint8 zero points (asymmetric INT only), else None.
    tensor_scale: float32 scalar tensor (NVFP4 only), else None.
    """

    fmt: str
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None


@runtime_checkable
class Format(Protocol):
    """What every format provides. Implementations are frozen dataclasses whose
    `str(fmt)` is a spec string that `mixq.formats.parse` maps back to an equal object."""

    @property
    def code_bits(self) -> int:
        """Bits per stored code (16 for the unquantized bf16/fp16 formats)."""

    def group_size_for(self, cols: int) -> int:
        """Number of consecutive input elements sharing one scale, for a weight of `cols`
        columns (cols for per-channel, rows*cols handled as one group for per-tensor)."""

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize; same shape and dtype as `w` (computed in float32)."""

    def quantize(self, w: torch.Tensor) -> QTensor:
        """Codes-plus-scales form of a 2-D float weight."""

    def dequantize(self, q: QTensor) -> torch.Tensor:
        """Float32 weight from codes-plus-scales; `dequantize(quantize(w)) == fake_quant(w)`."""

    def bits(self, shape: tuple[int, int]) -> int:
        """Exact all-in storage bits for a weight of `shape`: codes, scales, zeros, tensor
        scales. Equal to 8x the bytes a packed checkpoint writes for it (up to byte
        rounding of each packed stream)."""
