"""What a quantized model computes besides its weights: each unit's input-activation
quantizer and each attention layer's KV-cache format, made active around a forward pass.

    runtime = Runtime(model, plan)            # checks the plan's KV layers against the model
    runtime.add(unit, option, transforms)     # once the unit's weight is quantized
    with runtime.active():                    # every hook on: the variant's forward pass
        walker.run(block, inputs)

An `Applier` owns one: `quantize_block` keeps it active while it collects a block's
calibration statistics (so a later stage, and GPTQ, see the inputs the quantized
activations and cache produce), evaluation while the variant's streams run through the
block, and `calibrate_static` sets static activation scales from a calibration pass. The
hooks live in `mixq.models` (`inputs.input_hooks`, `kvcache.kv_hooks`).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from mixq.errors import FormatError
from mixq.formats.kvcache import KVFormat
from mixq.models.capture import unit_inputs
from mixq.models.inputs import check_hookable, input_hooks
from mixq.models.kvcache import KVLayer, kv_hooks, kv_layers
from mixq.models.units import Unit
from mixq.option import Option
from mixq.quantizers.activation import InputQuantizer, input_quantizer
from mixq.quantizers.hadamard import hadamard_block, rotation
from mixq.quantizers.kvcache import quantize_keys, quantize_values
from mixq.quantizers.transformed import UnitTransforms

log = logging.getLogger(__name__)


def check_kv(model: nn.Module, kv: dict[str, KVFormat]) -> list[KVLayer]:
    """The model's KV layers; FormatError when `kv` names a layer the model lacks (or the
    model has no KV cache), or a format a layer cannot take (a group not dividing its head)."""
    if not kv:
        return []
    layers = kv_layers(model)
    if not layers:
        raise FormatError(f"{type(model).__name__} has no KV cache (no attention layer with k_proj/v_proj): "
                          "KV formats do not apply to it")
    by_name = {layer.name: layer for layer in layers}
    unknown = [n for n in kv if n not in by_name]
    if unknown:
        raise FormatError(f"KV formats name {len(unknown)} layer(s) the model lacks, e.g. {unknown[0]!r}; "
                          f"its attention layers look like {layers[0].name!r}")
    for name, fmt in kv.items():
        try:
            fmt.check_head(by_name[name].head_dim)
        except FormatError as e:
            raise FormatError(f"layer {name!r}: {e}") from e
    return layers


def uniform_kv(model: nn.Module, fmt: KVFormat) -> dict[str, KVFormat]:
    """`fmt` for every KV layer of the model (FormatError when it has none)."""
    layers = kv_layers(model)
    if not layers:
        raise FormatError(f"{type(model).__name__} has no KV cache (no attention layer with k_proj/v_proj): "
                          f"KV format {fmt} does not apply to it")
    kv = {layer.name: fmt for layer in layers}
    check_kv(model, kv)
    return kv


class Runtime:
    """Input quantizers (unit name -> InputQuantizer) and KV formats of one quantized model."""

    def __init__(self, model: nn.Module, kv: dict[str, KVFormat] | None = None) -> None:
        self.model = model
        self.kv = dict(kv or {})
        self.layers = check_kv(model, self.kv)
        self.inputs: dict[str, InputQuantizer] = {}
        self.units: dict[str, Unit] = {}
        self.warnings: list[str] = []

    @property
    def empty(self) -> bool:
        return not self.inputs and not self.kv

    def add(self, unit: Unit, option: Option, transforms: UnitTransforms | None) -> None:
        """Register the input quantizer of `unit` (quantized with `transforms`), if its option
        has an activation format; FormatError naming the unit if the unit cannot take it."""
        if option.act is None:
            return
        try:
            check_hookable(unit)
            self.inputs[unit.name] = input_quantizer(option.act, transforms, unit.shape[1])
        except FormatError as e:
            raise FormatError(f"unit {unit.name!r} (shape {tuple(unit.shape)}), option {option}: {e}") from e
        self.units[unit.name] = unit

    def pre_quantizers(self, units: list[Unit], options: dict[str, Option], seed: int) -> dict[str, InputQuantizer]:
        """Input quantizers of units about to be calibrated (their weights not yet quantized):
        dynamic formats, rotated by the rotation their weight will have; smoothing scales are
        not known yet, so smoothed units are left out (their statistics see float inputs)."""
        out = {}
        for u in units:
            opt = options[u.name]
            if opt.act is None or opt.act.static or opt.smooth or u.kind != "linear":
                continue
            rot = rotation(u.shape[1], seed) if opt.rotate and hadamard_block(u.shape[1]) > 1 else None
            try:
                opt.act.check_cols(u.shape[1])
            except FormatError as e:
                raise FormatError(f"unit {u.name!r} (shape {tuple(u.shape)}), option {opt}: {e}") from e
            out[u.name] = InputQuantizer(opt.act, None, rot, rotate_seed=seed if rot is not None else None)
        return out

    @contextmanager
    def active(self, extra: dict[str, InputQuantizer] | None = None, units: list[Unit] | None = None) -> Iterator[None]:
        """Every registered input quantizer (those still waiting for a static scale excepted),
        the `extra` ones (keyed by unit, over `units`) and the KV formats on."""
        fns = {n: q for n, q in self.inputs.items() if not q.needs_scale}
        hooked = list(self.units.values())
        if extra:
            fns.update(extra)
            hooked += [u for u in (units or []) if u.name in extra and u.name not in self.units]
        shared: dict[tuple, InputQuantizer] = {}
        fns = {n: shared.setdefault(q.key(), q) for n, q in fns.items()}  # one object per distinct quantizer
        with ExitStack() as stack:
            if fns:
                stack.enter_context(input_hooks(self.model, hooked, fns))
            if self.kv:
                keys = {n: _key_fn(f) for n, f in self.kv.items()}
                values = {n: _value_fn(f) for n, f in self.kv.items()}
                stack.enter_context(kv_hooks(self.model, self.layers, keys, values))
            yield

    def calibrate_static(self, units: list[Unit], run: Callable[[], None]) -> None:
        """Static scales of those `units` whose input quantizer waits for one: amax of the
        transformed input x' over the forward passes `run()` makes (with every other
        quantizer on). A unit that gets no input is left with float inputs, with a warning."""
        waiting = [u for u in units if u.name in self.inputs and self.inputs[u.name].needs_scale]
        if not waiting:
            return
        amax: dict[str, float] = {}

        def consume(u: Unit, x: torch.Tensor) -> None:
            m = float(self.inputs[u.name].transformed(x).abs().max()) if x.numel() else 0.0
            amax[u.name] = max(amax.get(u.name, 0.0), m)

        with torch.no_grad(), self.active(), unit_inputs(self.model, waiting, consume):
            run()
        for u in waiting:
            if amax.get(u.name, 0.0) > 0:
                self.inputs[u.name] = self.inputs[u.name].calibrated(amax[u.name])
            else:
                msg = (f"{u.name}: static activation format {self.inputs[u.name].act} got no calibration input: "
                       "its input is left unquantized")
                log.warning(msg)
                self.warnings.append(msg)
                del self.inputs[u.name]

    def describe(self) -> dict:
        """What a manifest records: static scales per unit, KV formats per layer."""
        return {"static_scales": {n: float(q.scale.reshape(())) for n, q in self.inputs.items()
                                  if q.scale is not None},
                "kv": {n: str(f) for n, f in self.kv.items()}}


def _key_fn(fmt: KVFormat):
    return lambda k, rope: quantize_keys(k, fmt, rope)


def _value_fn(fmt: KVFormat):
    return lambda v: quantize_values(v, fmt)


__all__ = ["Runtime", "check_kv", "uniform_kv"]
