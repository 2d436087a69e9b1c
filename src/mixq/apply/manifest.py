"""The manifest of a quantization: per unit what was done, and how it was calibrated."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from mixq.models.units import Unit
from mixq.option import Option
from mixq.quantizers.hadamard import hadamard_block

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = 1


@dataclass
class Manifest:
    """What `quantize_model` did: per unit its option, damping, α, rank, warnings and wall
    time; how it was calibrated. `to_dict()` is JSON-serialisable."""

    seed: int
    sequential: bool
    calibration: dict
    settings: dict
    units: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    timing: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"schema_version": MANIFEST_SCHEMA, "seed": self.seed, "sequential": self.sequential,
                "calibration": dict(self.calibration), "settings": dict(self.settings),
                "units": {n: dict(u) for n, u in self.units.items()}, "warnings": list(self.warnings),
                "wall_s": self.wall_s, "timing": dict(self.timing)}


def calibration_record(calib: torch.Tensor | None) -> dict:
    """Shape and sha256 of the calibration inputs (token windows or images), or an empty record."""
    if calib is None:
        return {"n_windows": 0, "seqlen": 0, "sha256": None}
    digest = hashlib.sha256(calib.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    if calib.is_floating_point():  # images (n, C, H, W)
        return {"n_images": int(calib.shape[0]), "image_shape": list(calib.shape[1:]),
                "dtype": str(calib.dtype).removeprefix("torch."), "sha256": digest}
    return {"n_windows": int(calib.shape[0]), "seqlen": int(calib.shape[1]), "sha256": digest}


def applicable_option(unit: Unit, option: Option, has_stats: bool) -> tuple[Option, list[str]]:
    """The option applied to `unit`: `option` less the parts that cannot apply there, with
    one warning per part dropped.

    - gptq/smooth without input statistics (an embedding has no input Hessian; an expert no
      calibration token reached): round to nearest, without smoothing;
    - rotate across an input dimension with no Hadamard block > 1 (odd `in`, such as the
      27 = 3·3·3 columns of an RGB stem conv): no rotation.

    `quantizers.quantize_unit` on one weight keeps raising for these (there the caller asked
    for exactly that option and there is nothing to fall back within)."""
    used = option
    warnings: list[str] = []
    if used.needs_calibration and not has_stats:
        why = ("an embedding has no input Hessian" if unit.kind == "embedding"
               else "it received no calibration tokens")
        used = used.replace(quantizer="rtn", smooth=False)
        warnings.append(f"{option} needs calibration but {why}: quantized with {used} instead")
    cols = unit.shape[1]
    if used.rotate and hadamard_block(cols) == 1:
        before = used
        used = used.replace(rotate=False)
        warnings.append(f"{before} cannot rotate an input dimension of {cols} (odd: no Hadamard block > 1 "
                        f"divides it): quantized with {used} instead")
    return used, warnings
