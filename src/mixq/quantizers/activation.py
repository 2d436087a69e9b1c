"""Fake quantization of a unit's input activations, in the basis its weight was quantized in.

A unit quantized with transforms stores Q(E) for the transformed weight W diag(s) Q and, at
run time, multiplies the transformed input x' = (x diag(1/s)) Q (`quantizers.transformed`).
The activation format quantizes x', the tensor the matmul really reads, so rotating the
input spreads its outliers before they are rounded (QuaRot). In the unit's own basis:

    x̂ = A(x') Qᵀ diag(s),   so   x̂ ŵᵀ = A(x') Q(E)ᵀ (+ the low-rank branch on A(x'))

exactly; `InputQuantizer(x)` returns x̂, which the model's float weight slot (holding ŵ)
then multiplies. Without transforms, x̂ = A(x). A static per-tensor format gets its scale
from `calibrated(amax)`, amax the largest |x'| seen on calibration data (`transformed` gives x').
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mixq.errors import FormatError
from mixq.formats.activation import ActFormat
from mixq.quantizers.hadamard import Rotation
from mixq.quantizers.transformed import UnitTransforms


@dataclass(frozen=True)
class InputQuantizer:
    """x -> x̂ for one unit: its activation format, the smoothing scales s (in,) and rotation
    Q of its weight (or None), and a static format's calibrated scale ((1, 1) float32)."""

    act: ActFormat
    smooth_scales: torch.Tensor | None = None
    rotation: Rotation | None = None
    scale: torch.Tensor | None = None
    rotate_seed: int | None = None  # identifies the rotation (with the input size) in `key`

    def key(self) -> tuple:
        """Equal for quantizers that map every input to the same output (units sharing an
        input and a quantizer, such as q/k/v, compute it once)."""
        return (str(self.act), None if self.rotation is None else (self.rotation.size, self.rotate_seed),
                None if self.smooth_scales is None else id(self.smooth_scales),
                None if self.scale is None else float(self.scale.reshape(())))

    @property
    def needs_scale(self) -> bool:
        return self.act.static and self.scale is None

    def transformed(self, x: torch.Tensor) -> torch.Tensor:
        """x' = (x diag(1/s)) Q in float32 (x itself, as float32, without transforms)."""
        y = x.float()
        if self.smooth_scales is not None:
            y = y / self.smooth_scales.to(y.device)
        if self.rotation is not None:
            y = self.rotation.apply(y)
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.needs_scale:
            raise FormatError(f"activation format {self.act} is static and was not calibrated")
        if self.smooth_scales is None and self.rotation is None:
            return self.act.fake_quant(x, self.scale)
        q = self.act.fake_quant(self.transformed(x), self.scale)  # (..., in) float32
        if self.rotation is not None:
            q = self.rotation.apply_t(q)
        if self.smooth_scales is not None:
            q = q * self.smooth_scales.to(q.device)
        return q.to(x.dtype)

    def calibrated(self, amax: float) -> InputQuantizer:
        """This quantizer with the static scale for a calibrated amax of x'."""
        return replace(self, scale=self.act.static_scale(amax))


def input_quantizer(act: ActFormat, transforms: UnitTransforms | None, in_features: int) -> InputQuantizer:
    """The input quantizer of a unit whose weight was quantized under `transforms`."""
    act.check_cols(in_features)
    if transforms is None or transforms.is_identity:
        return InputQuantizer(act)
    s = transforms.smooth_scales.float() if transforms.smooth_scales is not None else None
    return InputQuantizer(act, s, transforms.rotation(in_features), rotate_seed=transforms.rotate_seed)


__all__ = ["InputQuantizer", "input_quantizer"]
