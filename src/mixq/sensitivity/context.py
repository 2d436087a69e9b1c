"""What every sensitivity method works from: the model, its units, the candidate options, the
calibration batches and the loss, and the quantized image of each unit's weight.

The calibration loss is the mean over the whole calibration set: next-token cross-entropy
over all n * (L - 1) predicted positions of the windows (task "lm"), or cross-entropy of
the class logits on the labels (task "image"). It is split into micro-batches whose losses
are weighted so that they sum to that mean (`Batch.weight`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mixq.errors import DataError, MixqError
from mixq.models.capture import forward_logits, owner_module
from mixq.models.units import Unit, get_weight
from mixq.option import Option, parse_option
from mixq.progress import Progress
from mixq.quantizers.smooth import output_error
from mixq.sensitivity.quantized import rtn_quantize

TASKS = ("lm", "image")
LOSSES = ("ce",)

# quantize_fn(unit, w (out, in), option) -> w_hat (out, in): the weight a unit would carry.
QuantizeFn = Callable[[Unit, torch.Tensor, Option], torch.Tensor]


@dataclass
class Batch:
    """One micro-batch: inputs (ids (B, L) or images (B, C, H, W)), labels for images, and
    the weight of its mean loss in the calibration mean (its share of the predicted items)."""

    x: torch.Tensor
    y: torch.Tensor | None
    weight: float
    n_items: int  # predicted tokens (lm) or images (image)


def detect_task(calib) -> str:
    """"image" for an (images, labels) pair, "lm" for a LongTensor of token ids."""
    return "image" if isinstance(calib, (tuple, list)) else "lm"


def make_batches(calib, task: str, batch_size: int) -> list[Batch]:
    """Split the calibration set into micro-batches of `batch_size` windows / images."""
    if task not in TASKS:
        raise MixqError(f"unknown task {task!r}; expected one of {TASKS}")
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    if task == "lm":
        if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
            raise DataError("calib for task 'lm' must be a LongTensor (n_windows, seqlen) of token ids")
        if calib.shape[0] < 1 or calib.shape[1] < 2:
            raise DataError(f"calib {tuple(calib.shape)}: need at least one window of at least 2 tokens")
        n_total = calib.shape[0] * (calib.shape[1] - 1)
        chunks = [(c, None) for c in calib.split(batch_size)]
        return [Batch(x, None, x.shape[0] * (x.shape[1] - 1) / n_total, x.shape[0] * (x.shape[1] - 1))
                for x, _ in chunks]
    if not (isinstance(calib, (tuple, list)) and len(calib) == 2):
        raise DataError("calib for task 'image' must be an (images, labels) pair")
    images, labels = calib
    if images.shape[0] != labels.shape[0] or images.shape[0] < 1:
        raise DataError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} differ in count (or are empty)")
    n_total = images.shape[0]
    return [Batch(x, y, x.shape[0] / n_total, x.shape[0])
            for x, y in zip(images.split(batch_size), labels.split(batch_size))]


def batch_loss(model: nn.Module, batch: Batch, task: str, loss: str = "ce") -> torch.Tensor:
    """Mean loss of one micro-batch (not yet weighted)."""
    if loss not in LOSSES:
        raise MixqError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    logits = forward_logits(model, batch.x)
    if task == "lm":
        v = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), batch.x[:, 1:].reshape(-1))
    return F.cross_entropy(logits.float(), batch.y)


def calibration_loss_fn(model: nn.Module, calib, *, task: str | None = None, loss: str = "ce",
                        batch_size: int = 1) -> Callable[[], torch.Tensor]:
    """A closure returning the calibration loss (mean over all predicted items) as a graph-
    carrying scalar; calling `.backward()` on it gives the calibration gradient."""
    task = task or detect_task(calib)
    batches = _on_device(make_batches(calib, task, batch_size), model)

    def fn() -> torch.Tensor:
        return sum(b.weight * batch_loss(model, b, task, loss) for b in batches)

    return fn


def fwd_bwd_seconds(model: nn.Module, calib, *, task: str | None = None, loss: str = "ce",
                    batch_size: int = 1, repeats: int = 1) -> float:
    """Wall seconds of one float forward + backward over the calibration set (micro-batch by
    micro-batch, gradients freed in between): the unit in which analysis cost is reported.
    The best of `repeats` runs."""
    task = task or detect_task(calib)
    batches = _on_device(make_batches(calib, task, batch_size), model)
    params = [p for p in model.parameters() if p.requires_grad]
    device = batches[0].x.device
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for b in batches:
            lb = b.weight * batch_loss(model, b, task, loss)
            torch.autograd.grad(lb, params, allow_unused=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _on_device(batches: list[Batch], model: nn.Module) -> list[Batch]:
    """The micro-batches on the model's device."""
    device = next(model.parameters()).device
    return [Batch(b.x.to(device), None if b.y is None else b.y.to(device), b.weight, b.n_items) for b in batches]


@dataclass
class Context:
    """Inputs shared by every method."""

    model: nn.Module
    units: list[Unit]
    options: list[Option]
    calib: object
    task: str
    loss: str
    seed: int
    progress: Progress | None
    quantize_fn: QuantizeFn = rtn_quantize
    # hessian(unit) -> the unit's input Hessian (in, in) or None; when given, `deltas` records
    # every option's output error tr(ΔW H ΔWᵀ) in `output_errors[(unit name, option)]`
    hessian: Callable[[Unit], torch.Tensor | None] | None = None
    # deterministic pass counts, in units of one pass over the whole calibration set
    cost: dict = field(default_factory=dict)
    output_errors: dict = field(default_factory=dict)

    def batches(self, batch_size: int) -> list[Batch]:
        """Micro-batches on the model's device."""
        return _on_device(make_batches(self.calib, self.task, batch_size), self.model)

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        return batch_loss(self.model, batch, self.task, self.loss)

    def add_cost(self, kind: str, passes: float) -> None:
        self.cost[kind] = self.cost.get(kind, 0.0) + float(passes)

    def deltas(self, unit: Unit) -> Iterator[tuple[Option, torch.Tensor]]:
        """(option, ΔW = Q(W) - W (out, in) float32) for every candidate option."""
        with torch.no_grad():
            w = get_weight(self.model, unit).detach()
            H = self.hessian(unit) if self.hessian is not None else None
            if H is not None:
                H = H.to(w.device)
            for opt in unit_options(self.options, unit):
                w_hat = self.quantize_fn(unit, w, opt)
                dw = w_hat.float() - w.float()  # (out, in)
                if H is not None:
                    self.output_errors[(unit.name, str(opt))] = output_error(dw, H)
                yield opt, dw


def unit_options(options: list[Option], unit: Unit) -> list[Option]:
    """The options a unit can take (`Option.supports` its shape), in candidate order."""
    return [o for o in options if o.supports(unit.shape) is None]


def parse_candidates(candidates: list[str]) -> list[Option]:
    if not candidates:
        raise MixqError("no candidate options given")
    opts = [parse_option(c) for c in candidates]
    names = [str(o) for o in opts]
    if len(set(names)) != len(names):
        raise MixqError(f"duplicate candidate options: {names}")
    return opts


@contextmanager
def grads_for(model: nn.Module, units: list[Unit]) -> Iterator[list[nn.Parameter]]:
    """Within the block only the units' parameters require grad (returned, unique, in unit
    order); requires_grad flags and train/eval mode are restored afterwards."""
    saved = {id(p): (p, p.requires_grad) for p in model.parameters()}
    training = model.training
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for u in units:
        p = model.get_parameter(u.param)
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    try:
        model.eval()
        for p, _ in saved.values():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for p, flag in saved.values():
            p.requires_grad_(flag)
        model.train(training)


def check_units(model: nn.Module, units: list[Unit]) -> None:
    """Every unit's parameter exists and has the unit's shape."""
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise MixqError("duplicate unit names")
    for u in units:
        try:
            owner_module(model, u)
            w = get_weight(model, u)
        except (AttributeError, KeyError) as e:
            raise MixqError(f"unit {u.name!r}: parameter {u.param!r} not found in the model") from e
        if tuple(w.shape) != tuple(u.shape):
            raise MixqError(f"unit {u.name!r}: weight shape {tuple(w.shape)} differs from the unit's {tuple(u.shape)}")
