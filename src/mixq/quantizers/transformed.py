"""A unit quantized in a transformed basis, and the way back to the unit's own basis.

`quantize_unit` quantizes a transformed weight (see `unit.py`):

    smooth  W1 = W diag(s)            rotate  W2 = W1 Q            lowrank  W2 = L R + E
    ŵ = ((L R + Q(E)) Qᵀ) diag(1/s)

A `QuantizedWeight` holds Q(E) as the format's codes (a `QTensor`, exactly as the quantizer
made them) and `UnitTransforms` beside them (s, the rotation as its seed and block, L and
R); a packed checkpoint stores both as they are. `UnitTransforms.to_weight` is the *one*
function that turns Q(E) back into ŵ, used both by fake quantization and by the checkpoint
loader for units it does not run packed, so the two agree bit for bit. At run time the same identity runs on the activations instead:

    x ŵᵀ = x diag(1/s) Q (L R + Q(E))ᵀ = x' Q(E)ᵀ + (x' Rᵀ) Lᵀ,   x' = (x diag(1/s)) Q

(`mixq.nn.QuantLinear` with transforms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq import formats
from mixq.formats import QTensor
from mixq.quantizers.hadamard import Rotation, rotation


@dataclass(frozen=True)
class UnitTransforms:
    """The transforms one unit was quantized under (each None when not applied).

    smooth_scales: s (in,) float32, the weight's columns were multiplied by s.
    rotate_seed, rotate_block: Q = `hadamard.rotation(in, seed)`, whose block is recorded as
        a check (Q depends only on in and the seed).
    lowrank: (L (out, r), R (r, in)) float32 tensors holding bf16-exact values."""

    smooth_scales: torch.Tensor | None = None
    rotate_seed: int | None = None
    rotate_block: int | None = None
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def is_identity(self) -> bool:
        return self.smooth_scales is None and self.rotate_seed is None and self.lowrank is None

    @property
    def rank(self) -> int | None:
        return None if self.lowrank is None else int(self.lowrank[0].shape[1])

    def rotation(self, in_features: int) -> Rotation | None:
        """Q of an input dimension `in_features`, or None without rotation."""
        return None if self.rotate_seed is None else rotation(in_features, self.rotate_seed)

    def to_weight(self, qweight: torch.Tensor, rot: Rotation | None = None) -> torch.Tensor:
        """ŵ = ((L R + Q(E)) Qᵀ) diag(1/s) (out, in) float32 from Q(E) = `qweight` (out, in)
        (`rot`: Q, if already built)."""
        w = qweight.float()
        if self.lowrank is not None:
            L, R = self.lowrank
            w = (L.float() @ R.float()) + w  # (out, r) @ (r, in)
        if self.rotate_seed is not None:
            rot = rot if rot is not None else self.rotation(w.shape[1])
            w = rot.apply_t(w)  # rows times Qᵀ
        if self.smooth_scales is not None:
            w = w / self.smooth_scales.float()
        return w

    def to(self, device: torch.device | str) -> UnitTransforms:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        lowrank = None if self.lowrank is None else (mv(self.lowrank[0]), mv(self.lowrank[1]))
        return UnitTransforms(mv(self.smooth_scales), self.rotate_seed, self.rotate_block, lowrank)


@dataclass(frozen=True)
class QuantizedWeight:
    """One unit quantized: the codes-plus-scales of its (transformed) weight Q(E), exactly as
    the quantizer produced them, and the transforms that map Q(E) back to the unit's basis
    (identity when the option has none). This is what fake quantization evaluates
    (`weight()`) and what a packed checkpoint stores (`qtensor` and `transforms`), so the two
    are the same numbers by construction."""

    qtensor: QTensor
    transforms: UnitTransforms = UnitTransforms()

    @property
    def fmt(self):
        return formats.parse(self.qtensor.fmt)

    def weight(self) -> torch.Tensor:
        """ŵ (out, in) float32 in the unit's basis: ((L R + Q(E)) Qᵀ) diag(1/s)."""
        qe = self.fmt.dequantize(self.qtensor)
        return qe if self.transforms.is_identity else self.transforms.to_weight(qe)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        q = self.qtensor

        def mv(t):
            return None if t is None else t.to(device)

        moved = QTensor(q.fmt, q.shape, mv(q.codes), mv(q.scales), mv(q.zeros), mv(q.tensor_scale))
        return QuantizedWeight(moved, self.transforms.to(device))
