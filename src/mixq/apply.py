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
            f"unit {unit.name!r}: option {opt} is not plain round to nearest; "
            "apply it through fake_quantized (mixq.calibrate.quantize_model)"
        )
    try:
        return opt.fmt.fake_quant(w)
    except (FormatError, DataError) as e:
        raise type(e)(f"unit {unit.name!r} (shape {tuple(w.shape)}), format {opt.format}: {e}") from e


def is_plain_rtn(plan: Plan) -> bool:
    """Whether every option of the plan is round to nearest with no transform."""
    return all(o.quantizer == "rtn" and not o.transforms for o in plan.options.values())


def plan_needs_calibration(plan: Plan) -> bool:
    from mixq.quantizers.unit import needs_calibration

    return any(needs_calibration(o) for o in plan.options.values())


@contextmanager
def fake_quantized(model: nn.Module, units: list[Unit], plan: Plan, progress: Progress | None = None,
                   calib_ids: torch.Tensor | None = None, manifest_out: dict | None = None,
                   **quantize_opts) -> Iterator[nn.Module]:
    """Within the block, `model` computes with every planned unit quantize-dequantized.

    Round-to-nearest plans are applied unit by unit here; plans with GPTQ, rotations,
    smoothing or low-rank branches go through `mixq.calibrate.quantize_model` (block by
    block on `calib_ids` when an option needs calibration data) and its manifest is stored
    in `manifest_out["manifest"]` when given. The float weights are restored on exit."""
    plan.check_against(units)
    planned = [u for u in units if u.name in plan.options]
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for u in planned:
                saved[u.name] = get_weight(model, u).detach().clone()
            if is_plain_rtn(plan):
                for u in track(planned, "quantize", len(planned), progress):
                    set_weight(model, u, quantize_weight(u, saved[u.name], plan))
            else:
                from mixq.calibrate import quantize_model

                if plan_needs_calibration(plan) and calib_ids is None:
                    raise MixqError("this plan has GPTQ/smoothing options, which need calibration data "
                                    "(--calib NAME on the command line)")
                manifest = quantize_model(model, units, plan, calib_ids, progress=progress, **quantize_opts)
                if manifest_out is not None:
                    manifest_out["manifest"] = manifest.to_dict()
        yield model
    finally:
        with torch.no_grad():
            by_name = {u.name: u for u in planned}
            for name, w in saved.items():
                set_weight(model, by_name[name], w)
