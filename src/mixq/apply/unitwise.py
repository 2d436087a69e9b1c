"""Sequential calibration unit by unit in forward order: models without a decoder-block
list (the CIFAR ResNets; any model), or calibrated on images.

    quantize the units that need no statistics (RTN, rotate, lowrank) first
    while calibrated units remain:
        run the partly quantized model over the calibration batches, hooks on the remaining
            units; the first to receive an input (and those fed the very same tensor) form
            the next stage, and the pass stops there (nothing after it runs)
        quantize the stage's units from their statistics

so every unit is calibrated on the outputs of the already-quantized units before it,
holding statistics only (no activations). It costs one partial forward pass per stage
(about half a full pass on average). A module run several times in one forward (shared
weights) is calibrated on the inputs of the calls before the pass stops.
"""

from __future__ import annotations

import time

import torch

from mixq.apply.inputs import to_model
from mixq.apply.stats import StatsCollector, same_tensor
from mixq.models.capture import forward_logits, unit_inputs
from mixq.models.units import Unit
from mixq.models.walk import _StopForward
from mixq.progress import no_progress


class _StageInputs:
    """A `unit_inputs` consumer for one unit-wise stage: the first hooked unit to get an
    input, and those fed that very tensor right after it, collect statistics; the first
    other unit reached ends the forward pass (`_StopForward`), so nothing after it runs. The
    stage is fixed by the first batch that reaches any unit (forward order is the same for
    every batch)."""

    def __init__(self) -> None:
        self.collector = StatsCollector()
        self.members: list[str] = []
        self.frozen = False
        self._x: torch.Tensor | None = None

    def __call__(self, unit: Unit, x: torch.Tensor) -> None:
        if unit.name not in self.members:
            if self.frozen or (self.members and not same_tensor(x, self._x)):
                raise _StopForward
            self.members.append(unit.name)
            self._x = x
        self.collector(unit, x)

    def end_batch(self) -> None:
        self.collector.release()
        self._x = None
        self.frozen = bool(self.members)


def quantize_unitwise(model, planned, calib_x, applier, progress) -> None:
    """Sequential calibration unit by unit in forward order (see the module docstring)."""
    cb = progress or no_progress
    t0 = time.perf_counter()
    # units that need no statistics first (an embedding gets none: it falls back to RTN)
    remaining = []
    for u in planned:
        if applier.option(u).needs_calibration and u.kind != "embedding":
            remaining.append(u)
        else:
            applier.apply(u, None)
    timing = {"quantize_s": time.perf_counter() - t0, "stats_s": 0.0, "n_passes": 0}
    batches = calib_x.split(applier.config.batch_size)
    total = len(remaining)
    cb("calibrate units", 0, total)
    while remaining:
        t0 = time.perf_counter()
        stage = _StageInputs()
        with unit_inputs(model, remaining, stage):
            for x in batches:
                try:
                    forward_logits(model, to_model(model, x))
                except _StopForward:
                    pass
                stage.end_batch()
        timing["stats_s"] += time.perf_counter() - t0
        timing["n_passes"] += 1
        t0 = time.perf_counter()
        members = set(stage.members)
        if not members:  # no remaining unit receives an input: round to nearest, with warnings
            members = {u.name for u in remaining}
        for u in remaining:
            if u.name in members:
                applier.apply(u, stage.collector.get(u.name))
        remaining = [u for u in remaining if u.name not in members]
        timing["quantize_s"] += time.perf_counter() - t0
        cb("calibrate units", total - len(remaining), total)
    applier.manifest.timing = timing
