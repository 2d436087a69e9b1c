"""Unquantized storage: `bf16`, `fp16`, `fp32`.

fake_quant casts to the storage dtype and back. `quantize` keeps the cast tensor itself as
the QTensor's `codes` (dtype bfloat16/float16/float32, not uint8 codes) with no scales;
packing writes its raw little-endian bytes. bits = 16 or 32 per element, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.errors import FormatError
from mixq.formats.base import Layout, QTensor
from mixq.formats.grouping import check_qtensor, check_weight

PLAIN_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


@dataclass(frozen=True)
class PlainFormat:
    """An unquantized float storage dtype: `name` is 'bf16', 'fp16' or 'fp32'."""

    name: str

    def __post_init__(self):
        if self.name not in PLAIN_DTYPES:
            raise FormatError(f"unknown float dtype {self.name!r}; expected one of {tuple(PLAIN_DTYPES)}")

    def __str__(self) -> str:
        return self.name

    @property
    def dtype(self) -> torch.dtype:
        return PLAIN_DTYPES[self.name]

    @property
    def code_bits(self) -> int:
        return self.dtype.itemsize * 8

    def group_size_for(self, cols: int) -> int:
        return cols

    def supports(self, shape: tuple[int, int]) -> str | None:
        """Every 2-D shape."""
        return None

    def layout(self, shape: tuple[int, int]) -> Layout:
        return Layout(self.code_bits, shape[0] * shape[1])

    def bits(self, shape: tuple[int, int]) -> int:
        return self.layout(shape).bits

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        check_weight(w)
        out = w.to(self.dtype).to(w.dtype)
        return out.clone() if out is w else out  # never hand back the caller's own tensor

    def quantize(self, w: torch.Tensor) -> QTensor:
        check_weight(w)
        return QTensor(str(self), tuple(w.shape), w.detach().to(self.dtype).contiguous(), None)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        check_qtensor(q, self)
        return q.codes.float()
