"""The weights a unit would carry under each candidate option, for sensitivity analysis.

`rtn_quantize` is plain round to nearest (the format's `fake_quant`). `UnitQuantizer`
also runs calibrated options (GPTQ, smoothing) from per-unit input statistics of one float
forward pass over the calibration data (non-sequential: every unit's Hessian comes from the
float model's inputs), so "int3:g64+gptq+rotate" can be weighed against "int4:g64"; its
`hessian(unit)` gives the diagonal methods the input Hessian they need to credit such
options (see `analyze`). Options that cannot apply to a unit are reduced as
`mixq.apply.applicable_option` does, with one warning per (unit, option) in `warnings`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mixq.apply.inputs import check_inputs, to_model
from mixq.apply.manifest import applicable_option
from mixq.apply.stats import StatsCollector, UnitStats
from mixq.errors import DataError, MixqError
from mixq.models.capture import forward_logits, unit_inputs
from mixq.models.units import Unit
from mixq.option import CalibConfig, Option
from mixq.progress import Progress, track
from mixq.quantizers.unit import quantize_unit

log = logging.getLogger(__name__)


def rtn_quantize(unit: Unit, w: torch.Tensor, option: Option) -> torch.Tensor:
    """Round-to-nearest fake quantization with the option's format. Options that need a
    calibrated quantizer or transforms (gptq, rotate, ...) need a `UnitQuantizer`."""
    if not option.is_plain:
        raise MixqError(
            f"unit {unit.name!r}: option {option} is not plain round to nearest; sensitivity analysis "
            "weighs it through a UnitQuantizer built on calibration data (mixq.api.analyze does this)"
        )
    if not torch.isfinite(w).all():
        raise DataError(f"unit {unit.name!r}: weight contains NaN/inf values")
    return option.fmt.fake_quant(w)


def collect_stats(model: nn.Module, units: list[Unit], calib: torch.Tensor, *, batch_size: int = 8,
                  progress: Progress | None = None) -> dict[str, UnitStats]:
    """One float forward pass (eval mode) over the calibration inputs (token windows, or
    images (n, C, H, W) for an image model): input statistics of every unit (embeddings
    excluded; a unit that got no input is absent)."""
    calib = check_inputs(calib, model)
    collector = StatsCollector()
    batches = calib.split(batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), unit_inputs(model, [u for u in units if u.kind != "embedding"], collector):
            for x in track(batches, "calibration stats", len(batches), progress):
                forward_logits(model, to_model(model, x))
                collector.release()
    finally:
        model.train(was_training)
    return {n: s for n, s in collector.stats.items() if s.n_tokens > 0}


class UnitQuantizer:
    """`quantizer(unit, w, option) -> w_hat` for every option, calibrated ones from the
    statistics in `stats` (unit name -> UnitStats); `hessian(unit)` is the unit's input
    Hessian 2XᵀX/n or None."""

    def __init__(self, stats: dict[str, UnitStats], config: CalibConfig = CalibConfig()) -> None:
        self.stats = stats
        self.config = config
        self.warnings: list[str] = []
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def from_calibration(cls, model: nn.Module, units: list[Unit], calib: torch.Tensor, *,
                         config: CalibConfig = CalibConfig(), progress: Progress | None = None) -> UnitQuantizer:
        """Statistics from one float capture pass over `calib` (see `collect_stats`)."""
        return cls(collect_stats(model, units, calib, batch_size=config.batch_size, progress=progress), config)

    def hessian(self, unit: Unit) -> torch.Tensor | None:
        st = self.stats.get(unit.name)
        return st.hessian() if st is not None else None

    def quantize_weight(self, unit: Unit, w: torch.Tensor, option: Option, stats: UnitStats | None):
        """(QuantizedWeight, option used) of `w` under `option`, reduced to what applies."""
        used, notes = applicable_option(unit, option, stats is not None)
        if notes and (unit.name, str(option)) not in self._warned:
            self._warned.add((unit.name, str(option)))
            for m in notes:
                log.warning("unit %s: %s", unit.name, m)
                self.warnings.append(f"{unit.name}: {m}")
        H = stats.hessian() if stats is not None else None
        act = stats.absmean() if stats is not None else None
        try:
            qw, _ = quantize_unit(w, used, H=H, act_absmean=act, config=self.config)
        except MixqError as e:
            raise type(e)(f"unit {unit.name!r}, option {used}: {e}") from e
        return qw, used

    def __call__(self, unit: Unit, w: torch.Tensor, option: Option) -> torch.Tensor:
        if option.is_plain:
            return rtn_quantize(unit, w, option)
        qw, _ = self.quantize_weight(unit, w, option, self.stats.get(unit.name))
        return qw.weight().to(w.dtype)
