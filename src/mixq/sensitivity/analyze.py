"""`analyze`: one sensitivity table per model, unit list, candidate options and method.

Methods (one explicit dict, `METHODS`; each documents its cost in its module):

    hutchinson  average Hessian trace x ||ΔW||^2            (hessian.py, HAWQ-V2)
    eigen       top Hessian eigenvalue x ||ΔW||^2           (hessian.py, HAWQ-V1)
    fisher      sum of diagonal empirical Fisher x ΔW^2     (fisher.py)
    output      tr(ΔW G ΔW^T) / N, G the input Gram matrix  (activations.py)
    measure     KL to the float model with that unit alone quantized (measure.py)

ΔW = quantize_fn(unit, W, option) - W; the default `rtn_quantize` is the option's format's
round-to-nearest `fake_quant` (calibrated quantizers plug in through `quantize_fn`).

Calibrated options and the diagonal methods. fisher, hutchinson and eigen weigh each weight
error on its own (a diagonal or scalar curvature): they cannot see that GPTQ or a rotation
shapes ΔW so that its errors cancel on the unit's correlated inputs. On SmolLM2-135M the
diagonal Fisher rated int3:g64+gptq+rotate *worse* than plain int3:g64 on every o_proj
(median 1.37x), while the option cuts those units' output error. So when `quantize_fn`
carries `gram(unit)` (the input Hessian H = 2XᵀX/n, as
`mixq.calibrate.quantize_fn_for_sensitivity` provides), the error of an option with a
quantizer or transforms is the method's error for plain round to nearest of its format,
scaled by the ratio of output errors tr(ΔW H ΔWᵀ) of the two:

    e(int3:g64+gptq+rotate) = e(int3:g64) * oe(int3:g64+gptq+rotate) / oe(int3:g64)

The method keeps saying how much this unit's error costs in loss; the input statistics say
how much smaller the option makes that error. The plain format is analysed alongside when it
is not a candidate. Units without a Hessian (an embedding, an expert with no routed token)
keep the method's own number. `output` and `measure` already see correlated errors and are
left as they are.
Every table also carries the input statistics of every unit (one extra forward pass, shared
with `output`).
"""

from __future__ import annotations

import hashlib
import math
import logging
import time
from typing import Callable

import torch
from torch import nn

from mixq import __version__
from mixq.errors import DataError, MixqError
from mixq.models.units import Unit
from mixq.plan import Option
from mixq.progress import Progress
from mixq.sensitivity.activations import capture, output_method
from mixq.sensitivity.context import (LOSSES, TASKS, Context, QuantizeFn, check_units, detect_task,
                                      parse_candidates, rtn_quantize)
from mixq.sensitivity.fisher import fisher
from mixq.sensitivity.hessian import eigen, hutchinson
from mixq.sensitivity.measure import measure
from mixq.sensitivity.table import SensitivityTable, UnitSensitivity

log = logging.getLogger(__name__)

# Methods blind to correlations between a unit's weight errors (see the module docstring).
DIAGONAL_METHODS = ("fisher", "hutchinson", "eigen")

METHODS: dict[str, Callable[..., dict]] = {
    "hutchinson": hutchinson,
    "eigen": eigen,
    "fisher": fisher,
    "output": output_method,
    "measure": measure,
}


def _correct_shaped(errors: dict, output_errors: dict, shaped: list[Option]) -> None:
    """e(option) = e(plain format) * oe(option) / oe(plain format), in place, for every unit
    with recorded output errors (see the module docstring)."""
    for unit, errs in errors.items():
        for o in shaped:
            plain = str(Option(o.format))
            oe = output_errors.get((unit, str(o)))
            oe_plain = output_errors.get((unit, plain))
            if oe is None or oe_plain is None or plain not in errs:
                continue
            errs[str(o)] = errs[plain] * (oe / oe_plain) if oe_plain > 0 else (0.0 if oe == 0 else errs[str(o)])


def calibration_digest(calib) -> dict:
    """Shape, dtype and sha256 of the calibration tensor bytes (images then labels for an
    (images, labels) pair)."""
    tensors = list(calib) if isinstance(calib, (tuple, list)) else [calib]
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"shape": [list(t.shape) for t in tensors] if len(tensors) > 1 else list(tensors[0].shape),
            "dtype": [str(t.dtype) for t in tensors] if len(tensors) > 1 else str(tensors[0].dtype),
            "sha256": h.hexdigest()}


def analyze(
    model: nn.Module,
    units: list[Unit],
    candidates: list[str],
    method: str,
    calib,
    *,
    seed: int = 0,
    loss: str = "ce",
    task: str | None = None,
    model_name: str = "",
    calib_description: str = "",
    quantize_fn: QuantizeFn = rtn_quantize,
    progress: Progress | None = None,
    **method_opts,
) -> SensitivityTable:
    """Estimate, for every unit and candidate option, the error the option would cause.

    model: the float model (left unchanged: weights, requires_grad flags, train mode and
        attention implementation are restored).
    units: the units to analyse; a unit tied to another (`tied_to`) is skipped, its format
        follows the unit it is tied to.
    candidates: option strings ("int4:g64", "fp8_e4m3", ...).
    method: a key of `METHODS`; `method_opts` go to it (e.g. `tol`, `max_probes`,
        `batch_size`).
    calib: LongTensor (n, seqlen) of token ids (task "lm"), or (images, labels) (task
        "image"); `task` is inferred from it when not given.
    seed: seeds every random draw (Hutchinson probes, power-iteration starts).
    Returns a `SensitivityTable`; its `timing` holds the wall seconds of this call.
    """
    if method not in METHODS:
        raise MixqError(f"unknown sensitivity method {method!r}; expected one of {', '.join(METHODS)}")
    if loss not in LOSSES:
        raise MixqError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    task = task or detect_task(calib)
    if task not in TASKS:
        raise MixqError(f"unknown task {task!r}; expected one of {TASKS}")
    options = parse_candidates(candidates)
    units = [u for u in units if u.tied_to is None]
    if not units:
        raise MixqError("no units to analyse")
    check_units(model, units)
    gram = getattr(quantize_fn, "gram", None)
    shaped = [o for o in options if o.quantizer != "rtn" or o.transforms]
    correct = gram is not None and bool(shaped) and method in DIAGONAL_METHODS
    run_options = list(options)
    if correct:
        names = {str(o) for o in options}
        for o in shaped:
            plain = Option(o.format)
            if str(plain) not in names:
                names.add(str(plain))
                run_options.append(plain)
    ctx = Context(model, units, run_options, calib, task, loss, seed, progress, quantize_fn,
                  gram=gram if correct else None)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left alone
        torch.manual_seed(seed)  # any draw a model makes internally
        result = METHODS[method](ctx, **method_opts)
    if correct:
        _correct_shaped(result["errors"], ctx.output_errors, shaped)
        result.setdefault("opts", {})["shaped_options"] = "rtn error x output-error ratio"
    stats = result.get("stats")
    if stats is None:
        stats, _, _ = capture(ctx, want_gram=False)
    wall_s = time.perf_counter() - t0
    records = []
    for u in units:
        errs = result["errors"][u.name]
        bad = {o: e for o, e in errs.items() if not math.isfinite(e) or e < 0}
        if bad:
            raise DataError(f"unit {u.name!r}: method {method!r} gave non-finite or negative errors {bad}; "
                            "check the model and calibration data for NaN/inf")
        records.append(UnitSensitivity(
            u.name, u.kind, tuple(u.shape), u.role, u.block,
            [{"option": str(o), "bits": int(o.bits(u.shape)), "error": float(errs[str(o)])} for o in options],
            stats[u.name], result["info"].get(u.name, {}), u.index,
        ))
    calibration = {"description": calib_description, **calibration_digest(calib)}
    table = SensitivityTable(
        model=model_name, method=method, candidates=[str(o) for o in options], seed=seed, loss=loss,
        task=task, calibration=calibration, method_opts=result.get("opts", {}),
        cost={k: round(v, 6) for k, v in sorted(ctx.cost.items())}, units=records,
        timing={"wall_s": wall_s}, mixq_version=__version__,
    )
    log.info("sensitivity %s: %d units x %d options in %.1f s", method, len(units), len(options), wall_s)
    return table
