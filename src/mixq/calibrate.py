"""Calibrated application of a plan: GPTQ, smoothing and the other data-dependent options,
applied to a model block by block.

`quantize_model(model, units, plan, calib_ids)` writes every planned unit's quantized weight
into the model, in place (keep a float copy or state dict to restore it), and returns a
JSON-serialisable `Manifest`. When some planned option needs calibration data (gptq,
smooth), it runs sequentially, as GPTQ does:

    capture the inputs of block 0 on the calibration windows (the model runs up to block 0)
    for each decoder block b:
        run block b on its inputs, accumulating for each calibrated unit its input Hessian
            H = 2 XᵀX / n and per-channel mean |x| (a fused expert: its routed tokens only)
        quantize the block's units (`quantizers.quantize_unit`), write them into the model
        run the *quantized* block on the same inputs: the next block's inputs
    units outside the blocks (lm_head) last, from the quantized last block's outputs

so each block is calibrated on the inputs the already-quantized blocks before it produce,
and only one block's activations are held (two lists of (windows, seqlen, hidden) tensors).
Within a block all units see the block's float-weight inputs (no "true sequential" order
inside a block). Embeddings are quantized first (round to nearest: an embedding table has
no input Hessian), before block 0's inputs are captured. An expert that receives no
calibration token, or an embedding planned with a calibrated option, falls back to round
to nearest with a warning in the manifest. RTN-only plans need no calibration pass.

Models without a decoder-block list (the CIFAR ResNets; any model), or calibrated on images
(float (n, C, H, W) batches), go unit by unit in forward order instead:

    quantize the units that need no statistics (RTN, rotate, lowrank) first
    while calibrated units remain:
        run the partly quantized model over the calibration batches, hooks on the remaining
            units; the first to receive an input (and those fed the very same tensor) form
            the next stage, and the pass stops there (nothing after it runs)
        quantize the stage's units from their statistics

so, again, every unit is calibrated on the outputs of the already-quantized units before it,
holding statistics only (no activations). It costs one partial forward pass per stage
(about half a full pass on average). A module run several times in one forward (shared
weights) is calibrated on the inputs of the calls before the pass stops.

Whatever the path, an option part that cannot apply to a unit is dropped for that unit with
a warning in the manifest (`applicable_option`): gptq/smooth without statistics, and
rotate across an odd input dimension (no Hadamard block > 1; the 27 = 3·3·3 columns of an
RGB stem conv).

`quantize_fn_for_sensitivity` gives sensitivity analysis a `quantize_fn(unit, w, option)`
that can run GPTQ/smoothing with per-unit statistics from one float capture pass
(non-sequential), so "int3:g64+gptq+rotate" can be weighed against "int4:g64".
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from mixq.errors import DataError, MixqError
from mixq.models.capture import find_blocks, forward_logits, unit_inputs
from mixq.models.units import Unit, get_weight, set_weight
from mixq.plan import Option, Plan
from mixq.progress import Progress, no_progress, track
from mixq.quantizers.hadamard import hadamard_block
from mixq.quantizers.unit import needs_calibration, quantize_unit

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = 1


# ---------------------------------------------------------------------------------------
# Input statistics


class UnitStats:
    """Running XᵀX (float32) and Σ|x| (float64) of one unit's inputs x (tokens, in)."""

    def __init__(self) -> None:
        self.xtx: torch.Tensor | None = None  # (in, in)
        self.abs_sum: torch.Tensor | None = None  # (in,)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])  # (tokens, in)
        if x.shape[0] == 0:
            return
        if self.xtx is None:
            self.xtx = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.abs_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        self.xtx.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2 XᵀX / n (in, in) float32."""
        return self.xtx * (2.0 / self.n_tokens)

    def absmean(self) -> torch.Tensor:
        """Mean |x| per input channel (in,) float32."""
        return (self.abs_sum / self.n_tokens).float()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the very same tensor (units fed one input: q/k/v, gate/up)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class StatsCollector:
    """A `unit_inputs` consumer accumulating `UnitStats` per unit. Units fed the very same
    input tensor (q/k/v, gate/up) share one accumulator (their Hessians are equal)."""

    def __init__(self) -> None:
        self.stats: dict[str, UnitStats] = {}
        self.order: list[str] = []  # unit names in the order of their first input
        self._last: tuple[torch.Tensor, UnitStats] | None = None

    def __call__(self, unit: Unit, x: torch.Tensor) -> None:
        if unit.kind == "embedding":
            return
        if unit.name not in self.stats:
            self.order.append(unit.name)
        if self._last is not None:
            px, pacc = self._last
            if _same_tensor(x, px) and self.stats.setdefault(unit.name, pacc) is pacc:
                return
        acc = self.stats.setdefault(unit.name, UnitStats())
        acc.add(x)
        self._last = (x, acc)

    def release(self) -> None:
        self._last = None

    def get(self, name: str) -> UnitStats | None:
        s = self.stats.get(name)
        return s if s is not None and s.n_tokens > 0 else None


def applicable_option(unit: Unit, option: Option, has_stats: bool) -> tuple[Option, list[str]]:
    """The option `quantize_model` (and `quantize_fn_for_sensitivity`) applies to `unit`:
    `option` less the parts that cannot apply there, with one warning per part dropped.

    - gptq/smooth without input statistics (an embedding has no input Hessian; an expert no
      calibration token reached): round to nearest, without smoothing;
    - rotate across an input dimension with no Hadamard block > 1 (odd `in`, such as the
      27 = 3·3·3 columns of an RGB stem conv): no rotation.

    `quantizers.quantize_unit` on one weight keeps raising for these (there the caller asked
    for exactly that option and there is nothing to fall back within)."""
    used = option
    warnings: list[str] = []
    if needs_calibration(used) and not has_stats:
        why = ("an embedding has no input Hessian" if unit.kind == "embedding"
               else "it received no calibration tokens")
        used = Option(used.format, "rtn", tuple(t for t in used.transforms if t != "smooth"))
        warnings.append(f"{option} needs calibration but {why}: quantized with {used} instead")
    cols = unit.shape[1]
    if "rotate" in used.transforms and hadamard_block(cols) == 1:
        before = used
        used = Option(used.format, used.quantizer, tuple(t for t in used.transforms if t != "rotate"))
        warnings.append(f"{before} cannot rotate an input dimension of {cols} (odd: no Hadamard block > 1 "
                        f"divides it): quantized with {used} instead")
    return used, warnings


def collect_stats(model: nn.Module, units: list[Unit], calib_ids: torch.Tensor, *, batch_size: int = 8,
                  progress: Progress | None = None) -> dict[str, UnitStats]:
    """One float forward pass (eval mode) over the calibration inputs (token windows, or
    images (n, C, H, W) for an image model): input statistics of every unit (embeddings
    excluded; a unit that got no input is absent)."""
    calib_ids = _check_inputs(calib_ids)
    collector = StatsCollector()
    batches = calib_ids.split(batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), unit_inputs(model, [u for u in units if u.kind != "embedding"], collector):
            for ids in track(batches, "calibration stats", len(batches), progress):
                forward_logits(model, _to_model(model, ids))
    finally:
        model.train(was_training)
    collector.release()
    return {n: s for n, s in collector.stats.items() if s.n_tokens > 0}


def quantize_fn_for_sensitivity(model: nn.Module, units: list[Unit], calib_ids: torch.Tensor, *, seed: int = 0,
                                batch_size: int = 8, progress: Progress | None = None,
                                warnings_out: list[str] | None = None,
                                **quantize_opts) -> Callable[[Unit, torch.Tensor, Option], torch.Tensor]:
    """A `quantize_fn(unit, w, option) -> w_hat` for `mixq.sensitivity.analyze`: options that
    need calibration (gptq, smooth) use per-unit statistics from one float capture pass made
    here (non-sequential: every unit's Hessian comes from the float model's inputs); others
    (RTN, rotate, lowrank) need none. `quantize_opts` go to `quantize_unit` (block_size,
    damp, act_order, smooth_grid). The same rule as `quantize_model` drops what cannot apply
    to a unit (`applicable_option`: calibrated options without statistics get round to
    nearest, +rotate across an odd input dimension is left out); each such warning is logged
    once and, when `warnings_out` is given, appended to it as "unit: message"."""
    stats = collect_stats(model, units, calib_ids, batch_size=batch_size, progress=progress)
    warned: set[tuple[str, str]] = set()

    def quantize_fn(unit: Unit, w: torch.Tensor, option: Option) -> torch.Tensor:
        st = stats.get(unit.name)
        planned = option
        option, notes = applicable_option(unit, planned, st is not None)
        if notes and (unit.name, str(planned)) not in warned:
            warned.add((unit.name, str(planned)))
            for m in notes:
                log.warning("unit %s: %s", unit.name, m)
                if warnings_out is not None:
                    warnings_out.append(f"{unit.name}: {m}")
        H = st.hessian() if st is not None else None
        act = st.absmean() if st is not None else None
        try:
            w_hat, _ = quantize_unit(w, option, H=H, act_absmean=act, seed=seed, **quantize_opts)
        except MixqError as e:
            raise type(e)(f"unit {unit.name!r}, option {option}: {e}") from e
        return w_hat.to(w.dtype)

    def gram(unit: Unit) -> torch.Tensor | None:
        """The unit's input Hessian 2XᵀX/n, or None (see `mixq.sensitivity.analyze`)."""
        st = stats.get(unit.name)
        return st.hessian() if st is not None else None

    quantize_fn.gram = gram
    return quantize_fn


# ---------------------------------------------------------------------------------------
# The manifest


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
    # unit -> TransformedWeight (Q(E), s, rotation, L, R) of each unit quantized with transforms,
    # kept (on the CPU) only with quantize_model(keep_transformed=True); in memory, not in to_dict
    transformed: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"schema_version": MANIFEST_SCHEMA, "seed": self.seed, "sequential": self.sequential,
                "calibration": dict(self.calibration), "settings": dict(self.settings),
                "units": {n: dict(u) for n, u in self.units.items()}, "warnings": list(self.warnings),
                "wall_s": self.wall_s, "timing": dict(self.timing)}


def _check_ids(calib_ids) -> torch.Tensor:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise DataError("calib_ids must be a LongTensor (n_windows, seqlen) of token ids (see mixq.data.calibration_windows)")
    if calib_ids.shape[0] < 1 or calib_ids.shape[1] < 1:
        raise DataError(f"calib_ids {tuple(calib_ids.shape)}: need at least one window")
    return calib_ids


_INPUTS_HELP = ("calib_ids (the calibration inputs) must be token windows, a LongTensor (n_windows, seqlen) (see "
                "mixq.data.calibration_windows), or for an image model a float tensor of images (n, C, H, W) "
                "(see mixq.data.load_cifar10)")


def _first_layer(model: nn.Module) -> nn.Module | None:
    """The first Conv2d / Linear / Embedding in module order (what the inputs meet first)."""
    return next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))), None)


def _check_inputs(calib, model: nn.Module | None = None) -> torch.Tensor:
    """Token windows (LongTensor (n, seqlen)) or images (float (n, C, H, W)); with `model`,
    images must have the channels its first Conv2d takes, and a model that starts with a
    Conv2d takes no token ids. Raises DataError saying what was expected."""
    if isinstance(calib, (tuple, list)):
        raise DataError(f"{_INPUTS_HELP}; got a {type(calib).__name__} (for an (images, labels) pair, pass the images)")
    if calib is None:
        raise DataError(f"the plan has gptq/smooth options, which need calibration data: {_INPUTS_HELP}")
    if not isinstance(calib, torch.Tensor):
        raise DataError(f"{_INPUTS_HELP}; got {type(calib).__name__}")
    first = _first_layer(model) if model is not None else None
    if calib.dtype == torch.long:
        if isinstance(first, nn.Conv2d):
            raise DataError(f"this model starts with a Conv2d: it takes float images (n, C, H, W), not token ids "
                            f"{tuple(calib.shape)}")
        return _check_ids(calib)
    if not calib.is_floating_point():
        raise DataError(f"{_INPUTS_HELP}; got dtype {calib.dtype} (token ids must be int64; convert uint8 images to "
                        "normalised floats)")
    if isinstance(first, nn.Embedding):
        raise DataError(f"this model starts with an Embedding: it takes token ids, a LongTensor (n_windows, seqlen), "
                        f"not {calib.dtype} {tuple(calib.shape)}")
    if calib.dim() != 4:
        raise DataError(f"calibration images must be (n, C, H, W), got shape {tuple(calib.shape)}")
    if calib.shape[0] < 1:
        raise DataError(f"calibration images {tuple(calib.shape)}: need at least one image")
    if isinstance(first, nn.Conv2d) and first.in_channels != calib.shape[1]:
        raise DataError(f"calibration images have {calib.shape[1]} channels {tuple(calib.shape)}; "
                        f"the model's first Conv2d takes {first.in_channels}")
    if not torch.isfinite(calib).all():
        raise DataError("calibration images contain NaN/inf values")
    return calib


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x on the model's device; float inputs (images) in the model's floating dtype."""
    p = next(model.parameters())
    return x.to(device=p.device, dtype=p.dtype if x.is_floating_point() and p.is_floating_point() else x.dtype)


def _calibration_record(calib_ids: torch.Tensor | None) -> dict:
    if calib_ids is None:
        return {"n_windows": 0, "seqlen": 0, "sha256": None}
    digest = hashlib.sha256(calib_ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    if calib_ids.is_floating_point():  # images (n, C, H, W)
        return {"n_images": int(calib_ids.shape[0]), "image_shape": list(calib_ids.shape[1:]),
                "dtype": str(calib_ids.dtype).removeprefix("torch."), "sha256": digest}
    return {"n_windows": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), "sha256": digest}


# ---------------------------------------------------------------------------------------
# Block-by-block execution


class _StopForward(Exception):
    """Raised by the block-0 hook once its inputs are captured: nothing after it runs."""


class _Cached(nn.Module):
    """Stands in for every block: returns the cached output of the last block."""

    def __init__(self) -> None:
        super().__init__()
        self.output = None

    def forward(self, *args, **kwargs):
        return self.output


@dataclass
class _BlockInput:
    hidden: torch.Tensor  # (batch, seq, hidden)
    args: tuple  # further positional arguments
    kwargs: dict  # attention mask, position embeddings, ...


def _block_inputs(model: nn.Module, block: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> list[_BlockInput]:
    """What the model passes to `block` (the first decoder block) for each calibration batch."""
    captured: list[_BlockInput] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(_BlockInput(hidden.detach(), tuple(args[1:]), kwargs))
        raise _StopForward

    device = _device(model)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in calib_ids.split(batch_size):
                try:
                    forward_logits(model, ids.to(device))
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inp: _BlockInput):
    """(raw output, hidden states) of the block on one captured input."""
    out = block(inp.hidden, *inp.args, **inp.kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    return out, hidden


class _Applier:
    """Quantizes units one by one and records them in the manifest."""

    def __init__(self, model: nn.Module, plan: Plan, manifest: Manifest, seed: int, quantize_opts: dict) -> None:
        self.model, self.plan, self.manifest = model, plan, manifest
        self.seed, self.opts = seed, quantize_opts

    def apply(self, unit: Unit, stats: UnitStats | None) -> None:
        opt = self.plan.options[unit.name]
        used, warnings = applicable_option(unit, opt, stats is not None)
        fallback = used if used != opt else None
        for m in warnings:
            log.warning("unit %s: %s", unit.name, m)
        w = get_weight(self.model, unit)
        if not torch.isfinite(w).all():
            raise DataError(f"unit {unit.name!r}: weight contains NaN/inf values; refusing to quantize it")
        H = stats.hessian() if stats is not None else None
        act = stats.absmean() if stats is not None else None
        try:
            w_hat, info = quantize_unit(w.detach(), used, H=H, act_absmean=act, seed=self.seed, **self.opts)
        except MixqError as e:
            raise type(e)(f"unit {unit.name!r} (shape {tuple(w.shape)}), option {used}: {e}") from e
        set_weight(self.model, unit, w_hat)
        if self.manifest.transformed is not None and info.transformed is not None:
            self.manifest.transformed[unit.name] = info.transformed.to("cpu")
        rec = info.to_dict()
        rec.update({"planned": str(opt), "n_tokens": stats.n_tokens if stats is not None else 0,
                    "fallback": str(fallback) if fallback is not None else None})
        rec["warnings"] = warnings + rec["warnings"]
        self.manifest.units[unit.name] = rec
        self.manifest.warnings.extend(f"{unit.name}: {m}" for m in rec["warnings"])


@torch.no_grad()
def quantize_model(model: nn.Module, units: list[Unit], plan: Plan, calib_ids: torch.Tensor | None = None, *,
                   progress: Progress | None = None, seed: int = 0, batch_size: int = 8, block_size: int = 128,
                   damp: float = 0.01, act_order: bool = True, smooth_grid: int = 20,
                   true_sequential: bool = True, keep_transformed: bool = False) -> Manifest:
    """Quantize every planned unit of `model` in place with its option (see the module
    docstring) and return the manifest. `calib_ids` is needed when some option needs
    calibration (gptq, smooth): token windows, a LongTensor (n_windows, seqlen), or images
    (n, C, H, W) float for an image model; `batch_size` windows (images) run through a
    block (the model) at a time. `seed` seeds the rotations. block_size, damp, act_order (default on:
    static groups, see `quantizers.gptq`) go to GPTQ,
    smooth_grid to the smoothing search. `true_sequential` calibrates a block's units in
    stages (q/k/v, then o, then gate/up, then down for Llama), each on the inputs the
    block's already-quantized earlier stages produce (one block pass per stage); off, every
    unit of a block is calibrated on one pass of the float-weight block. `keep_transformed`
    keeps, in `manifest.transformed`, what a packed checkpoint stores of each unit with
    transforms (its quantized transformed weight Q(E), s, rotation, L and R)."""
    t_start = time.perf_counter()
    plan.check_against(units)
    planned = [u for u in units if u.name in plan.options and u.tied_to is None]
    calibrated = [u for u in planned if needs_calibration(plan.options[u.name])]
    opts = {"block_size": block_size, "damp": damp, "act_order": act_order, "smooth_grid": smooth_grid}
    sequential = bool(calibrated)
    if sequential:
        calib_ids = _check_inputs(calib_ids, model)
    # token windows through a decoder-block list: block by block; otherwise unit by unit
    by_blocks = sequential and calib_ids.dtype == torch.long and find_blocks(model) is not None
    manifest = Manifest(seed=int(seed), sequential=sequential,
                        calibration=_calibration_record(calib_ids if sequential else None),
                        settings={**opts, "batch_size": batch_size, "true_sequential": true_sequential,
                                  "order": "blocks" if by_blocks else "units" if sequential else None})
    manifest.transformed = {} if keep_transformed else None
    applier = _Applier(model, plan, manifest, seed, opts)
    was_training = model.training
    model.eval()
    try:
        if not sequential:
            for u in track(planned, "quantize", len(planned), progress):
                applier.apply(u, None)
        elif by_blocks:
            _sequential(model, planned, calib_ids, applier, batch_size, progress, manifest, true_sequential)
        else:
            _unitwise(model, planned, calib_ids, applier, batch_size, progress, manifest)
    finally:
        model.train(was_training)
    manifest.wall_s = time.perf_counter() - t_start
    return manifest


def _block_stats(model: nn.Module, block: nn.Module, inputs: list, units: list[Unit]) -> StatsCollector:
    """Input statistics of `units` (all inside `block`) over one pass of the block."""
    collector = StatsCollector()
    with unit_inputs(model, units, collector):
        for inp in inputs:
            _run_block(block, inp)
            collector.release()
    return collector


def _stages(collector: StatsCollector, units: list[Unit]) -> list[list[Unit]]:
    """Split a block's units into stages by the order their inputs appear in a forward pass
    ("true sequential"): units fed the same tensor (q/k/v, gate/up) or of the same role (the
    experts of one projection) share a stage; stages are ordered by first input. Llama:
    [q, k, v], [o], [gate, up], [down]. Units that got no input join the last stage."""
    by_name = {u.name: u for u in units}
    stages: list[list[Unit]] = []
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
            k = len(stages)
            stages.append([])
        stage_of_role.setdefault(u.role, k)
        stage_of_acc.setdefault(acc, k)
        stages[k].append(u)
    seen = {u.name for st in stages for u in st}
    rest = [u for u in units if u.name not in seen]
    if rest:
        if not stages:
            stages.append([])
        stages[-1].extend(rest)
    return stages


def _sequential(model, planned, calib_ids, applier: _Applier, batch_size, progress, manifest: Manifest,
                true_sequential: bool) -> None:
    found = find_blocks(model)
    if found is None:
        raise MixqError("sequential calibration needs a decoder-block list (model.layers, transformer.h, ...); "
                        "none found in this model")
    prefix, blocks = found
    head = prefix + "."

    def block_of(u: Unit) -> int:
        if not u.param.startswith(head):
            return -1
        idx = u.param[len(head):].split(".", 1)[0]
        return int(idx) if idx.isdigit() else -1

    by_block: dict[int, list[Unit]] = {}
    for u in planned:
        by_block.setdefault(block_of(u), []).append(u)
    outside = by_block.pop(-1, [])
    # Embeddings first (no Hessian): block 0 then sees the quantized embedding's output.
    for u in [u for u in outside if u.kind == "embedding"]:
        applier.apply(u, None)
    outside = [u for u in outside if u.kind != "embedding"]
    needs = {b for b, us in by_block.items() for u in us if needs_calibration(applier.plan.options[u.name])}
    last_needed = len(blocks) if any(needs_calibration(applier.plan.options[u.name]) for u in outside) else max(needs, default=-1)

    t0 = time.perf_counter()
    inputs = _block_inputs(model, blocks[0], calib_ids, batch_size)
    timing = {"capture_s": time.perf_counter() - t0, "stats_s": 0.0, "quantize_s": 0.0, "forward_s": 0.0}
    raw_outputs: list = []
    for b in track(range(len(blocks)), "calibrate blocks", len(blocks), progress):
        block = blocks[b]
        us = by_block.get(b, [])
        calibrated = [u for u in us if needs_calibration(applier.plan.options[u.name])]
        t0 = time.perf_counter()
        for u in us:  # round-to-nearest units first: later stages see them quantized
            if u not in calibrated:
                applier.apply(u, None)
        timing["quantize_s"] += time.perf_counter() - t0
        if calibrated:
            # true sequential: stage 0 (q/k/v) is calibrated from the first pass; each later
            # stage from a pass of the block whose earlier stages are already quantized
            t0 = time.perf_counter()
            collector = _block_stats(model, block, inputs, calibrated)
            timing["stats_s"] += time.perf_counter() - t0
            stages = _stages(collector, calibrated) if true_sequential else [calibrated]
            for k, stage in enumerate(stages):
                if k > 0:
                    t0 = time.perf_counter()
                    collector = _block_stats(model, block, inputs, stage)
                    timing["stats_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                for u in stage:
                    applier.apply(u, collector.get(u.name))
                timing["quantize_s"] += time.perf_counter() - t0
            del collector
        if b >= last_needed:
            continue  # no later block or head needs these activations
        t0 = time.perf_counter()
        raw_outputs = []
        next_inputs = []
        for inp in inputs:
            raw, hidden = _run_block(block, inp)
            next_inputs.append(_BlockInput(hidden.detach(), inp.args, inp.kwargs))
            if b == len(blocks) - 1:
                raw_outputs.append(raw)
        inputs = next_inputs
        timing["forward_s"] += time.perf_counter() - t0

    if outside:
        t0 = time.perf_counter()
        collector = StatsCollector()
        calibrated = [u for u in outside if needs_calibration(applier.plan.options[u.name])]
        if calibrated:
            stand_in = _Cached()
            originals = list(blocks)
            device = _device(model)
            try:
                for i in range(len(blocks)):
                    blocks[i] = stand_in
                with unit_inputs(model, calibrated, collector):
                    for ids, raw in zip(calib_ids.split(batch_size), raw_outputs):
                        stand_in.output = raw
                        forward_logits(model, ids.to(device))
                        collector.release()
            finally:
                for i, m in enumerate(originals):
                    blocks[i] = m
        for u in outside:
            applier.apply(u, collector.get(u.name))
        timing["outside_s"] = time.perf_counter() - t0
    manifest.timing = timing


# ---------------------------------------------------------------------------------------
# Unit-by-unit execution (no decoder-block list, or image inputs)


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
            if self.frozen or (self.members and not _same_tensor(x, self._x)):
                raise _StopForward
            self.members.append(unit.name)
            self._x = x
        self.collector(unit, x)

    def end_batch(self) -> None:
        self.collector.release()
        self._x = None
        self.frozen = bool(self.members)


def _unitwise(model, planned, calib_x, applier: _Applier, batch_size, progress, manifest: Manifest) -> None:
    """Sequential calibration unit by unit in forward order (see the module docstring)."""
    cb = progress or no_progress
    t0 = time.perf_counter()
    # units that need no statistics first (an embedding gets none: it falls back to RTN)
    remaining = []
    for u in planned:
        if needs_calibration(applier.plan.options[u.name]) and u.kind != "embedding":
            remaining.append(u)
        else:
            applier.apply(u, None)
    timing = {"quantize_s": time.perf_counter() - t0, "stats_s": 0.0, "n_passes": 0}
    batches = calib_x.split(batch_size)
    total = len(remaining)
    cb("calibrate units", 0, total)
    while remaining:
        t0 = time.perf_counter()
        stage = _StageInputs()
        with unit_inputs(model, remaining, stage):
            for x in batches:
                try:
                    forward_logits(model, _to_model(model, x))
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
    manifest.timing = timing
