"""`quantize_model`: the one path from a plan to quantized weights.

Every planned unit is quantized once by `quantizers.quantize_unit`, whose result, a
`QuantizedWeight` (the quantizer's own codes and scales plus the unit's transforms), is
what evaluation computes with (`applied`, which writes each ŵ into the model and restores
the float weights afterwards) and what a packed checkpoint stores, as it is. Nothing is
re-derived from a float weight.

When some planned option needs calibration data (gptq, smooth), quantization runs
sequentially, as GPTQ does, on a `models.walk.Walker` (one block on the device at a time):

    block 0's inputs on the calibration windows (the model runs up to block 0)
    for each decoder block b (only its weights on the device):
        run block b on its inputs, accumulating for each calibrated unit its input Hessian
            H = 2 XᵀX / n and per-channel mean |x| (a fused expert: its routed tokens only)
        quantize the block's units, write ŵ into the block
        run the *quantized* block on the same inputs: the next block's inputs
    units outside the blocks (lm_head) last, from the quantized last block's outputs

so each block is calibrated on the inputs the already-quantized blocks before it produce,
and only one block's activations are held (one list of (windows, seqlen, hidden) tensors).
Inside a block, `CalibConfig.true_sequential` calibrates in stages (q/k/v, then o, then
gate/up, then down for Llama), each on the inputs the block's already quantized earlier
stages produce. Embeddings are quantized first (round to nearest: an embedding table has no
input Hessian). An expert that receives no calibration token, or an embedding planned with
a calibrated option, falls back to round to nearest with a warning in the manifest.

Models without a decoder-block list (the CIFAR ResNets; any model), or calibrated on images
(float (n, C, H, W) batches), go unit by unit in forward order instead (`unitwise.py`).

Plans without calibrated options need no data: each unit is quantized from its own weight
(on the walker's device, block by block, when a walker is given).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mixq.apply.inputs import check_inputs
from mixq.apply.manifest import Manifest, applicable_option, calibration_record
from mixq.apply.stats import StatsCollector, UnitStats
from mixq.errors import DataError, MixqError
from mixq.models.capture import unit_inputs
from mixq.models.units import Unit, get_weight, set_weight
from mixq.models.walk import BlockInput, Walker
from mixq.option import CalibConfig, Option
from mixq.plan import Plan
from mixq.progress import Progress, track
from mixq.quantizers.transformed import QuantizedWeight
from mixq.quantizers.unit import quantize_unit

log = logging.getLogger(__name__)

DEFAULT_CONFIG = CalibConfig()


@dataclass
class QuantizedModel:
    """The result of `quantize_model`: unit name -> QuantizedWeight (on `keep_device`), and
    the manifest of what was done."""

    weights: dict[str, QuantizedWeight]
    manifest: Manifest


@contextmanager
def applied(model: nn.Module, units: list[Unit], weights: dict[str, QuantizedWeight]) -> Iterator[nn.Module]:
    """Within the block, each unit named in `weights` computes with its ŵ (cast to the
    model's dtype, on the weight's device); the float weights are restored on exit."""
    saved: list[tuple[Unit, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for u in units:
                qw = weights.get(u.name)
                if qw is None:
                    continue
                w = get_weight(model, u)
                saved.append((u, w.detach().clone()))
                set_weight(model, u, qw.to(w.device).weight())
        yield model
    finally:
        with torch.no_grad():
            for u, w in reversed(saved):
                set_weight(model, u, w)


class Applier:
    """Quantizes units one by one with their planned option, writes ŵ into the model (so
    later calibration sees the quantized unit) and records the manifest. A unit whose
    (name, option) is in `cache` takes the weight found there instead of being quantized."""

    def __init__(self, model: nn.Module, plan: Plan, manifest: Manifest, config: CalibConfig,
                 keep_device: torch.device | str | None, cache: dict | None = None, keep_all: bool = True) -> None:
        self.model, self.plan, self.manifest, self.config = model, plan, manifest, config
        self.keep_device = keep_device
        self.keep_all = keep_all  # keep every QuantizedWeight (else only those of units outside the blocks)
        self.cache = cache or {}  # (unit name, option string) -> QuantizedWeight made earlier
        self.weights: dict[str, QuantizedWeight] = {}
        self.saved: dict[str, tuple[Unit, torch.Tensor]] = {}

    def option(self, unit: Unit) -> Option:
        return self.plan.options[unit.name]

    def needs_stats(self, unit: Unit) -> bool:
        """Whether quantizing `unit` needs its input statistics (a calibrated option that no
        cached weight provides)."""
        return self.option(unit).needs_calibration and (unit.name, str(self.option(unit))) not in self.cache

    def apply(self, unit: Unit, stats: UnitStats | None) -> None:
        opt = self.option(unit)
        cached = self.cache.get((unit.name, str(opt)))
        if cached is not None:
            self._write(unit, cached)
            self.manifest.units[unit.name] = {"option": str(opt), "planned": str(opt), "cached": True}
            return
        used, warnings = applicable_option(unit, opt, stats is not None)
        for m in warnings:
            log.warning("unit %s: %s", unit.name, m)
        w = get_weight(self.model, unit)
        if w.device.type == "meta":
            raise MixqError(f"unit {unit.name!r}: its weight is not loaded (meta tensor); quantize it while its "
                            "block is on the device")
        H = stats.hessian() if stats is not None else None
        act = stats.absmean() if stats is not None else None
        try:
            qw, info = quantize_unit(w.detach(), used, H=H, act_absmean=act, config=self.config)
        except MixqError as e:
            raise type(e)(f"unit {unit.name!r} (shape {tuple(w.shape)}), option {used}: {e}") from e
        self._write(unit, qw)
        rec = info.to_dict()
        rec.update({"planned": str(opt), "n_tokens": stats.n_tokens if stats is not None else 0,
                    "fallback": str(used) if used != opt else None})
        rec["warnings"] = warnings + rec["warnings"]
        self.manifest.units[unit.name] = rec
        self.manifest.warnings.extend(f"{unit.name}: {m}" for m in rec["warnings"])

    def _write(self, unit: Unit, qw: QuantizedWeight) -> None:
        """Write ŵ into the model (saving the float weight) and keep the quantized weight."""
        w = get_weight(self.model, unit)
        self.saved.setdefault(unit.name, (unit, w.detach().clone()))
        set_weight(self.model, unit, qw.to(w.device).weight())
        if self.keep_all or unit.block < 0:
            self.weights[unit.name] = qw if self.keep_device is None else qw.to(self.keep_device)

    def restore(self, names: list[str] | None = None) -> None:
        """Write the float weights back (of `names`, default all units applied so far)."""
        with torch.no_grad():
            for name in list(self.saved) if names is None else names:
                if name in self.saved:
                    unit, w = self.saved.pop(name)
                    set_weight(self.model, unit, w)


def planned_units(units: list[Unit], plan: Plan) -> list[Unit]:
    """The units a plan quantizes on their own (a unit tied to another follows it)."""
    return [u for u in units if u.name in plan.options and u.tied_to is None]


def quantize_model(model: nn.Module | Walker, units: list[Unit], plan: Plan, calib: torch.Tensor | None = None, *,
                   config: CalibConfig = DEFAULT_CONFIG, progress: Progress | None = None,
                   keep_device: torch.device | str | None = "cpu") -> QuantizedModel:
    """Quantize every planned unit with its option; the model is left as it was.

    model: an nn.Module, or a `Walker` over a causal LM (block by block on its device, with
    its offload). calib: what calibrated options (gptq, smooth) learn from: token windows, a
    LongTensor (n_windows, seqlen), or for an image model float images (n, C, H, W);
    `config.batch_size` windows (images) go through a block (the model) at a time. keep_device:
    where the QuantizedWeights are kept (None: where they were made). See the module docstring."""
    t_start = time.perf_counter()
    walker = model if isinstance(model, Walker) else None
    net = walker.model if walker is not None else model
    plan.check_against(units)
    planned = planned_units(units, plan)
    calibrated = [u for u in planned if plan.options[u.name].needs_calibration]
    sequential = bool(calibrated)
    if sequential:
        calib = check_inputs(calib, net)
    by_blocks = walker is not None or (sequential and calib.dtype == torch.long and _has_blocks(net))
    manifest = Manifest(seed=int(config.seed), sequential=sequential,
                        calibration=calibration_record(calib if sequential else None),
                        settings={**config.quantizer_settings(), "batch_size": config.batch_size,
                                  "true_sequential": config.true_sequential,
                                  "order": ("blocks" if by_blocks else "units") if sequential else None})
    applier = Applier(net, plan, manifest, config, keep_device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            if by_blocks:
                if walker is None:
                    walker = Walker(net, _device(net), "none")
                _blockwise(walker, planned, calib if sequential else None, applier, progress)
            elif sequential:
                from mixq.apply.unitwise import quantize_unitwise

                quantize_unitwise(net, planned, calib, applier, progress)
            else:
                for u in track(planned, "quantize", len(planned), progress):
                    applier.apply(u, None)
    finally:
        applier.restore()
        net.train(was_training)
    manifest.wall_s = time.perf_counter() - t_start
    return QuantizedModel(applier.weights, manifest)


def _has_blocks(model: nn.Module) -> bool:
    from mixq.models.capture import find_blocks

    return find_blocks(model) is not None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------
# Block by block


def block_stats(walker: Walker, block: nn.Module, inputs: list[BlockInput], units: list[Unit]) -> StatsCollector:
    """Input statistics of `units` (all inside `block`) over one pass of the block."""
    collector = StatsCollector()
    with unit_inputs(walker.model, units, collector):
        for inp in inputs:
            walker.run(block, inp)
            collector.release()
    return collector


def stages(collector: StatsCollector, units: list[Unit]) -> list[list[Unit]]:
    """Split a block's units into stages by the order their inputs appear in a forward pass
    ("true sequential"): units fed the same tensor (q/k/v, gate/up) or of the same role (the
    experts of one projection) share a stage; stages are ordered by first input. Llama:
    [q, k, v], [o], [gate, up], [down]. Units that got no input join the last stage."""
    by_name = {u.name: u for u in units}
    out: list[list[Unit]] = []
    stage_of_role: dict[str, int] = {}
    stage_of_acc: dict[int, int] = {}
    for name in collector.order:
        u = by_name.get(name)
        if u is None:
            continue
        acc = id(collector.stats[name])
        if acc in stage_of_acc:
            k = stage_of_acc[acc]
        elif u.role in stage_of_role:
            k = stage_of_role[u.role]
        else:
            k = len(out)
            out.append([])
        stage_of_role.setdefault(u.role, k)
        stage_of_acc.setdefault(acc, k)
        out[k].append(u)
    seen = {u.name for st in out for u in st}
    rest = [u for u in units if u.name not in seen]
    if rest:
        if not out:
            out.append([])
        out[-1].extend(rest)
    return out


def quantize_block(walker: Walker, block: nn.Module, units: list[Unit], inputs: list[BlockInput] | None,
                   applier: Applier, timing: dict) -> None:
    """Quantize `units` (all of block `block`, on the device) with the applier, writing each
    ŵ into the block: units needing no statistics first, then the calibrated ones in stages
    (`config.true_sequential`), each stage from a pass of the block on `inputs` whose earlier
    stages are already quantized."""
    plain = [u for u in units if not applier.needs_stats(u)]
    calibrated = [u for u in units if applier.needs_stats(u)]
    t0 = time.perf_counter()
    for u in plain:  # later stages see them quantized
        applier.apply(u, None)
    timing["quantize_s"] = timing.get("quantize_s", 0.0) + time.perf_counter() - t0
    if not calibrated:
        return
    if inputs is None:
        raise MixqError("calibrated options (gptq, smooth) need calibration inputs")
    t0 = time.perf_counter()
    collector = block_stats(walker, block, inputs, calibrated)
    timing["stats_s"] = timing.get("stats_s", 0.0) + time.perf_counter() - t0
    groups = stages(collector, calibrated) if applier.config.true_sequential else [calibrated]
    for k, stage in enumerate(groups):
        if k > 0:
            t0 = time.perf_counter()
            collector = block_stats(walker, block, inputs, stage)
            timing["stats_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for u in stage:
            applier.apply(u, collector.get(u.name))
        timing["quantize_s"] += time.perf_counter() - t0


def calibration_batches(calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(calib.split(batch_size))


def _blockwise(walker: Walker, planned: list[Unit], calib: torch.Tensor | None, applier: Applier,
               progress: Progress | None) -> None:
    by_block: dict[int, list[Unit]] = {}
    for u in planned:
        by_block.setdefault(walker.block_of(u.param), []).append(u)
    outside = by_block.pop(-1, [])
    timing: dict = {"capture_s": 0.0, "stats_s": 0.0, "quantize_s": 0.0, "forward_s": 0.0}
    # Embeddings first (no Hessian): block 0 then sees the quantized embedding's output.
    for u in [u for u in outside if u.kind == "embedding"]:
        applier.apply(u, None)
    outside = [u for u in outside if u.kind != "embedding"]
    needs = {b for b, us in by_block.items() for u in us if applier.option(u).needs_calibration}
    head_calibrated = any(applier.option(u).needs_calibration for u in outside)
    last_needed = walker.n_blocks if head_calibrated else max(needs, default=-1)

    inputs: list[BlockInput] | None = None
    batches = calibration_batches(calib, applier.config.batch_size) if calib is not None else []
    if calib is not None and last_needed >= 0:
        t0 = time.perf_counter()
        inputs = walker.embed(batches)
        timing["capture_s"] = time.perf_counter() - t0
    for b in track(range(walker.n_blocks), "quantize blocks", walker.n_blocks, progress):
        us = by_block.get(b, [])
        forward = inputs is not None and b < last_needed
        if not us and not forward:
            continue
        with walker.on_device(b) as block:
            quantize_block(walker, block, us, inputs if b <= last_needed else None, applier, timing)
            if forward:
                t0 = time.perf_counter()
                inputs = [walker.run(block, x) for x in inputs]
                timing["forward_s"] += time.perf_counter() - t0
            applier.restore([u.name for u in us])  # the float weights back (a no-op copy when offloaded)
    if outside:
        t0 = time.perf_counter()
        collector = StatsCollector()
        calibrated = [u for u in outside if applier.option(u).needs_calibration]
        if calibrated and inputs is not None:
            with unit_inputs(walker.model, calibrated, collector):
                for inp, ids in zip(inputs, batches):
                    walker.logits(inp.hidden, ids)
                    collector.release()
        for u in outside:
            applier.apply(u, collector.get(u.name))
        timing["outside_s"] = time.perf_counter() - t0
    applier.manifest.timing = timing
