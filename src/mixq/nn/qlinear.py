"""`QuantLinear`: a Linear layer whose weight lives only as packed codes and scales.

The buffers are those of `mixq.kernels.KernelWeights` (layout in `mixq.kernels.packed`), so
they move with `.to(device)` and land in `state_dict()`. `forward` calls `kernels.qmatmul`:
the Triton kernel on CUDA where the format's layout is supported, else the reference path
(dequantize, then one matmul in the activation dtype).

A unit quantized with transforms (smooth, rotate, lowrank; see `quantizers.transformed`)
holds the codes of its quantized *transformed* weight Q(E) and applies the transforms to
its input online, so that it computes x ŵᵀ + b for ŵ = ((L R + Q(E)) Qᵀ) diag(1/s):

    x' = (x diag(1/s)) Q                       divide by s, then Q = D · blockdiag(H_b):
                                               random signs, then a Walsh–Hadamard
                                               transform per block of b inputs: on a GPU one
                                               fused kernel (`kernels.transform`), else one
                                               small matmul per Kronecker factor of H_b
                                               (<= 128 wide; `hadamard.fwht_kron`)
    y  = x' Q(E)ᵀ + (x' Rᵀ) Lᵀ + b             packed matmul (the kernels see x') plus the
                                               bf16 low-rank branch, in x's dtype

which is x diag(1/s) Q (L R + Q(E))ᵀ + b = x ŵᵀ + b since Q Qᵀ = I. s, the signs of Q and
L, R are buffers too (the Hadamard factors non-persistent ones, rebuilt from the block
size); no dense (in, in) or (b, b) matrix is built.
"""

from __future__ import annotations

import torch
from torch import nn

from mixq import formats
from mixq.errors import FormatError
from mixq.formats import Format, QTensor
from mixq.kernels import KernelWeights, PackedLayout, dequantize, prepack, qmatmul
from mixq.kernels.transform import kernel_ok as transform_kernel_ok
from mixq.kernels.transform import online_transform
from mixq.quantizers.hadamard import fwht_kron, hadamard_factors, hadamard_matrix
from mixq.quantizers.transformed import UnitTransforms


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b, with W stored packed (see `mixq.kernels.packed`); with
    `transforms`, y = x ŵᵀ + b computed as in the module docstring.

    Buffers: codes, scales, levels, zeros, tensor_scale, bias; with transforms also
    `smooth_scales` (in,) float32 s, `rotate_signs` (in,) float32 ±1 (the diagonal D of Q;
    the block size is `rotate_block`), `lowrank_l` (out, r) and `lowrank_r` (r, in) bf16."""

    def __init__(self, kw: KernelWeights, bias: torch.Tensor | None = None,
                 transforms: UnitTransforms | None = None):
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
        tf = transforms if transforms is not None else UnitTransforms()
        smooth = rot = lowrank_l = lowrank_r = None
        if tf.smooth_scales is not None:
            smooth = tf.smooth_scales.detach().to(device=kw.codes.device, dtype=torch.float32).reshape(-1)
            if smooth.numel() != self.in_features:
                raise FormatError(f"smoothing scales have {smooth.numel()} entries, in_features is {self.in_features}")
        if tf.rotate_seed is not None:
            rot = tf.rotation(self.in_features)
            if tf.rotate_block is not None and tf.rotate_block != rot.block:
                raise FormatError(f"rotation block {tf.rotate_block} given for in_features={self.in_features}, "
                                  f"whose Hadamard block is {rot.block}")
        if tf.lowrank is not None:
            lowrank_l, lowrank_r = (t.detach().to(device=kw.codes.device, dtype=torch.bfloat16) for t in tf.lowrank)
            r = lowrank_l.shape[1]
            if tuple(lowrank_l.shape) != (self.out_features, r) or tuple(lowrank_r.shape) != (r, self.in_features):
                raise FormatError(f"low-rank factors {tuple(lowrank_l.shape)} and {tuple(lowrank_r.shape)} do not "
                                  f"fit a ({self.out_features}, {self.in_features}) weight")
        self.rotate_seed = tf.rotate_seed
        self.rotate_block = None if rot is None else rot.block
        self.register_buffer("smooth_scales", smooth)
        self.register_buffer("rotate_signs", None if rot is None else rot.signs.to(kw.codes.device))
        self.register_buffer("lowrank_l", lowrank_l)
        self.register_buffer("lowrank_r", lowrank_r)
        sizes = [] if rot is None else hadamard_factors(rot.block)
        self._n_factors = len(sizes)
        for i, size in enumerate(sizes):  # constants of the block size: not in the state dict
            self.register_buffer(f"hadamard_{i}", hadamard_matrix(size).to(kw.codes.device), persistent=False)

    @classmethod
    def from_qtensor(cls, q: QTensor, fmt: Format | str | None = None, bias: torch.Tensor | None = None,
                     transforms: UnitTransforms | None = None) -> QuantLinear:
        """From a quantized weight (e.g. the output of GPTQ, or the Q(E) of a unit with
        `transforms`), packed for the kernels."""
        return cls(prepack(q, fmt), bias, transforms)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: Format | str) -> QuantLinear:
        """Round-to-nearest quantization of `linear.weight` in `fmt`; the bias is kept in the
        weight's dtype."""
        fmt = formats.parse(fmt)
        q = fmt.quantize(linear.weight.detach())
        return cls(prepack(q, fmt), linear.bias)

    @property
    def transforms(self) -> UnitTransforms:
        """The online transforms (s, rotation, L and R as float32), empty when there are none."""
        lowrank = None if self.lowrank_l is None else (self.lowrank_l.float(), self.lowrank_r.float())
        return UnitTransforms(self.smooth_scales, self.rotate_seed, self.rotate_block, lowrank)

    def weights(self) -> KernelWeights:
        """The packed weight as the kernels read it (views of this module's buffers)."""
        return KernelWeights(self.layout, self.codes, self.scales, self.levels, self.zeros, self.tensor_scale)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) float32 stored weight: Q(E), in the transformed basis when there are
        transforms (for checks and export, not for inference)."""
        return dequantize(self.weights())

    def effective_weight(self) -> torch.Tensor:
        """(out, in) float32 weight ŵ the module computes with, in the unit's own basis."""
        w = self.dequantized_weight()
        return w if self.transforms.is_identity else self.transforms.to_weight(w)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = (x diag(1/s)) Q for x (..., in), computed in float32, returned in x's dtype: one
        fused kernel on a CUDA device (`kernels.transform`), else the torch ops below."""
        if self.smooth_scales is None and self.rotate_signs is None:
            return x
        if transform_kernel_ok(x, self.rotate_block):
            return online_transform(x, self.smooth_scales, self.rotate_signs, self.rotate_block)
        h = x if x.dtype == torch.float64 else x.float()
        if self.smooth_scales is not None:
            h = h / self.smooth_scales.to(h.dtype)
        if self.rotate_signs is not None:
            h = h * self.rotate_signs.to(h.dtype)  # D
            blocks = h.reshape(*h.shape[:-1], self.in_features // self.rotate_block, self.rotate_block)
            factors = [getattr(self, f"hadamard_{i}").to(h.dtype) for i in range(self._n_factors)]
            h = fwht_kron(blocks, factors).reshape(h.shape)  # blockdiag(H_b)
        return h.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.transform_input(x)
        y = qmatmul(h, self.weights(), self.bias)
        if self.lowrank_l is not None:
            low = nn.functional.linear(h, self.lowrank_r.to(h.dtype))  # (..., r)
            y = y + nn.functional.linear(low, self.lowrank_l.to(h.dtype))
        return y

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}, out_features={self.out_features}, "
                 f"fmt={self.layout.fmt}, bias={self.bias is not None}"]
        if self.smooth_scales is not None:
            parts.append("smooth=True")
        if self.rotate_signs is not None:
            parts.append(f"rotate=(seed={self.rotate_seed}, block={self.rotate_block})")
        if self.lowrank_l is not None:
            parts.append(f"lowrank={self.lowrank_l.shape[1]}")
        return ", ".join(parts)
