"""`QuantLinear`: a Linear layer whose weight lives only as packed codes and scales.

The buffers are those of `mixq.kernels.KernelWeights` (layout in `mixq.kernels.packed`), so
they move with `.to(device)` and land in `state_dict()`. `forward` calls `kernels.qmatmul`:
the Triton kernel on CUDA where the format's layout is supported, else the reference path
(dequantize, then one matmul in the activation dtype).
"""

from __future__ import annotations

import torch
from torch import nn

from mixq import formats
from mixq.formats import Format, QTensor
from mixq.kernels import KernelWeights, PackedLayout, dequantize, prepack, qmatmul


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b, with W stored packed (see `mixq.kernels.packed`)."""

    def __init__(self, kw: KernelWeights, bias: torch.Tensor | None = None):
        super().__init__()
        self.layout: PackedLayout = kw.layout
        self.in_features = kw.layout.in_features
        self.out_features = kw.layout.out_features
        self.register_buffer("codes", kw.codes)
        self.register_buffer("scales", kw.scales)
        self.register_buffer("levels", kw.levels)
        self.register_buffer("zeros", kw.zeros)
        self.register_buffer("tensor_scale", kw.tensor_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_qtensor(cls, q: QTensor, fmt: Format | str | None = None,
                     bias: torch.Tensor | None = None) -> QuantLinear:
        """From a quantized weight (e.g. the output of GPTQ), packed for the kernels."""
        return cls(prepack(q, fmt), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: Format | str) -> QuantLinear:
        """Round-to-nearest quantization of `linear.weight` in `fmt`; the bias is kept in the
        weight's dtype."""
        fmt = formats.parse(fmt)
        q = fmt.quantize(linear.weight.detach())
        return cls(prepack(q, fmt), linear.bias)

    def weights(self) -> KernelWeights:
        """The packed weight as the kernels read it (views of this module's buffers)."""
        return KernelWeights(self.layout, self.codes, self.scales, self.levels, self.zeros, self.tensor_scale)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) float32 weight (for checks and export, not for inference)."""
        return dequantize(self.weights())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qmatmul(x, self.weights(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fmt={self.layout.fmt}, bias={self.bias is not None}")
