"""Turning a plan into a quantized model.

`fake_quantized` swaps every planned unit's weight for its quantize-dequantize image in place
and restores the float weights on exit, so one float model serves the evaluation of many
plans. Packed modules for storage and inference live in `mixq.nn` and `mixq.export`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from mixq.errors import DataError, FormatError, MixqError
from mixq.models.units import Unit, get_weight, set_weight
from mixq.plan import Plan
from mixq.progress import Progress, track

log = logging.getLogger(__name__)


def check_finite(unit: Unit, w: torch.Tensor) -> None:
    """Raise DataError naming the unit if its weight holds NaN or inf."""
    if not torch.isfinite(w).all():
        n_bad = int((~torch.isfinite(w)).sum())
        raise DataError(f"unit {unit.name!r}: weight contains {n_bad} NaN/inf values; refusing to quantize it")


def quantize_weight(unit: Unit, w: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Fake-quantize one unit's 2-D weight with its planned option (round to nearest)."""
    opt = plan.options[unit.name]
    check_finite(unit, w)
    if opt.quantizer != "rtn" or opt.transforms:
        raise MixqError(
            f"unit {unit.name!r}: option {opt} needs calibration (quantizer/transforms); "
            "use mixq.api.quantize_model with calibration data"
        )
    try:
        return opt.fmt.fake_quant(w)
    except (FormatError, DataError) as e:
        raise type(e)(f"unit {unit.name!r} (shape {tuple(w.shape)}), format {opt.format}: {e}") from e


@contextmanager
def fake_quantized(model: nn.Module, units: list[Unit], plan: Plan,
                   progress: Progress | None = None) -> Iterator[nn.Module]:
    """Within the block, `model` computes with every planned unit fake-quantized."""
    plan.check_against(units)
    planned = [u for u in units if u.name in plan.options]
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for u in track(planned, "quantize", len(planned), progress):
                w = get_weight(model, u)
                saved[u.name] = w.detach().clone()
                set_weight(model, u, quantize_weight(u, w, plan))
        yield model
    finally:
        with torch.no_grad():
            by_name = {u.name: u for u in planned}
            for name, w in saved.items():
                set_weight(model, by_name[name], w)
