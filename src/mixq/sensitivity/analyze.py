"""`analyze`: one sensitivity table per model, unit list, candidate options and method.

Methods (one explicit dict, `METHODS`; each documents its cost in its module):

    hutchinson  average Hessian trace x ||ΔW||^2            (hessian.py, HAWQ-V2)
    eigen       top Hessian eigenvalue x ||ΔW||^2           (hessian.py, HAWQ-V1)
    fisher      sum of diagonal empirical Fisher x ΔW^2     (fisher.py)
    output      tr(ΔW G ΔW^T) / N, G the input Gram matrix  (activations.py)
    measure     KL to the float model with that unit alone quantized (measure.py)

ΔW = quantize_fn(unit, W, option) - W; the default `rtn_quantize` is the option's format's
round-to-nearest `fake_quant` (calibrated quantizers plug in through `quantize_fn`, a
`UnitQuantizer`).

Calibrated options and the diagonal methods. fisher, hutchinson and eigen weigh each weight
error on its own (a diagonal or scalar curvature): they cannot see that GPTQ or a rotation
shapes ΔW so that its errors cancel on the unit's correlated inputs. On SmolLM2-135M the
diagonal Fisher rated int3:g64+gptq+rotate *worse* than plain int3:g64 on every o_proj
(median 1.37x), while the option cuts those units' output error. So when the input Hessians H = 2XᵀX/n are at hand (`quantize_fn` a
`sensitivity.UnitQuantizer` on the whole-model path; always on the block-by-block path),
the error of an option with a
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

Activation and KV candidates (fisher and output, block by block). A candidate with an input
activation format (`int4:g64@int8:tok`) costs its weight option's error plus the activation
term of `sensitivity.actkv`: the unit's output Fisher of the change the quantized input
makes, in the method's units (κ_u). `kv_candidates` (`int4:kchan`, ...) give every attention
layer one error per KV format, on the same scale (the cached keys' and values' Fisher,
weighted by κ of the layer's k_proj / v_proj), in the table's `kv` section.
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
from mixq.formats.kvcache import parse_kv
from mixq.models.units import Unit
from mixq.models.walk import Walker
from mixq.option import CalibConfig, Option
from mixq.progress import Progress
from mixq.sensitivity.activations import capture, output_method
from mixq.sensitivity.context import LOSSES, TASKS, Context, QuantizeFn, check_units, detect_task, parse_candidates
from mixq.sensitivity.quantized import UnitQuantizer, rtn_quantize
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
    model: nn.Module | Walker,
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
    config: CalibConfig | None = None,
    progress: Progress | None = None,
    **method_opts,
) -> SensitivityTable:
    """Estimate, for every unit and candidate option, the error the option would cause.

    model: the float model (left unchanged: weights, requires_grad flags, train mode and
        attention implementation are restored), or a `Walker` over a causal LM: then fisher,
        output and (with offloaded blocks) hutchinson run block by block
        (`sensitivity.blockwise`), one block's weights on the device at a time, and
        calibrated candidates are quantized there from each unit's float input Hessian.
    units: the units to analyse; a unit tied to another (`tied_to`) is skipped, its format
        follows the unit it is tied to.
    candidates: option strings ("int4:g64", "fp8_e4m3", ...).
    method: a key of `METHODS`; `method_opts` go to it (e.g. `tol`, `max_probes`,
        `batch_size`).
    calib: LongTensor (n, seqlen) of token ids (task "lm"), or (images, labels) (task
        "image"); `task` is inferred from it when not given.
    seed: seeds every random draw (Hutchinson probes, power-iteration starts).
    quantize_fn: the whole-model path's quantized weights (`rtn_quantize`, or a
        `UnitQuantizer` for calibrated candidates, whose input Hessians then credit shaped
        options in the diagonal methods). config: calibrated candidates' settings.
    Returns a `SensitivityTable`; its `timing` holds the wall seconds of this call.
    """
    return analyze_keeping(model, units, candidates, method, calib, seed=seed, loss=loss, task=task,
                           model_name=model_name, calib_description=calib_description, quantize_fn=quantize_fn,
                           config=config, progress=progress, **method_opts)[0]


def analyze_keeping(model: nn.Module | Walker, units: list[Unit], candidates: list[str], method: str, calib, *,
                    seed: int = 0, loss: str = "ce", task: str | None = None, model_name: str = "",
                    calib_description: str = "", quantize_fn: QuantizeFn = rtn_quantize,
                    config: CalibConfig | None = None, progress: Progress | None = None,
                    keep: set[str] | None = None, kv_candidates: list[str] = (), act_rows: int = 4096,
                    **method_opts) -> tuple[SensitivityTable, dict]:
    """`analyze`, also returning the quantized weights it made of the options named in
    `keep` (block-by-block path only): {(unit, option): QuantizedWeight on the CPU}, so that
    evaluating plans over these candidates needs no second quantization. `kv_candidates`:
    KV-cache formats weighed for every attention layer; `act_rows`: input rows per unit the
    activation terms are computed on (a uniform subsample of the calibration tokens)."""
    if method not in METHODS:
        raise MixqError(f"unknown sensitivity method {method!r}; expected one of {', '.join(METHODS)}")
    if loss not in LOSSES:
        raise MixqError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    task = task or detect_task(calib)
    if task not in TASKS:
        raise MixqError(f"unknown task {task!r}; expected one of {TASKS}")
    options = parse_candidates(candidates)
    act_options = [o for o in options if o.act is not None]
    weight_options = list({str(o.weight_only): o.weight_only for o in options}.values())
    kv_formats = [parse_kv(k) for k in kv_candidates]
    units = [u for u in units if u.tied_to is None]
    if not units:
        raise MixqError("no units to analyse")
    config = config or CalibConfig(seed=seed)
    walker = model if isinstance(model, Walker) else None
    net = walker.model if walker is not None else model
    check_units(net, units)
    if act_options or kv_formats:
        if walker is None or task != "lm" or method not in ("fisher", "output"):
            raise MixqError("activation and KV candidates are analysed block by block on a causal LM with the fisher "
                            f"or output method (got method {method!r}, task {task!r})")
        if kv_formats:
            from mixq.apply.runtime import uniform_kv

            for f in kv_formats:
                uniform_kv(net, f)  # refuses a model without a KV cache, or a group not dividing the head
        _check_act_units(units, act_options)
    stuck = [u for u in units if not any(o.supports(u.shape) is None for o in weight_options)]
    if stuck:
        raise MixqError(f"no candidate applies to unit(s) {', '.join(u.name for u in stuck[:3])}"
                        f"{' and more' if len(stuck) > 3 else ''}: {weight_options[0].supports(stuck[0].shape)}; add a "
                        "candidate that these shapes can take (e.g. q8_0 or int4:g64)")
    shaped = [o for o in weight_options if not o.is_plain]
    run_options = list(weight_options)
    names = {str(o) for o in weight_options}
    for o in shaped:
        plain = Option(o.format)
        if str(plain) not in names:
            names.add(str(plain))
            run_options.append(plain)
    blockwise = walker is not None and task == "lm" and (
        method in ("fisher", "output") or (method == "hutchinson" and walker.offload != "none"))
    if walker is not None and not blockwise and walker.offload != "none":
        raise MixqError(f"method {method!r} needs the whole model on the device: its blocks are offloaded "
                        f"({walker.offload}); use --offload none or a method that runs block by block "
                        "(fisher, output, hutchinson)")
    t0 = time.perf_counter()
    cache: dict = {}
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left alone
        torch.manual_seed(seed)  # any draw a model makes internally
        if blockwise:
            from mixq.sensitivity.blockwise import blockwise as run_blockwise

            correct = bool(shaped) and method in DIAGONAL_METHODS
            result = run_blockwise(walker, units, run_options if correct else weight_options, method, calib,
                                   seed=seed, config=config, progress=progress, keep=keep, want_hessian=correct,
                                   act_options=act_options, kv_formats=kv_formats, act_rows=act_rows, **method_opts)
            output_errors, stats, cost = result["output_errors"], result["stats"], result["cost"]
            cache = result["cache"]
            quantizer_warnings = result["warnings"]
        else:
            hessian = quantize_fn.hessian if isinstance(quantize_fn, UnitQuantizer) else None
            correct = hessian is not None and bool(shaped) and method in DIAGONAL_METHODS
            ctx = Context(net, units, run_options if correct else options, calib, task, loss, seed, progress,
                          quantize_fn, hessian=hessian if correct else None)
            result = METHODS[method](ctx, **method_opts)
            stats = result.get("stats")
            if stats is None:
                stats, _, _ = capture(ctx, want_gram=False)
            output_errors, cost = ctx.output_errors, ctx.cost
            quantizer_warnings = quantize_fn.warnings if isinstance(quantize_fn, UnitQuantizer) else []
    if correct:
        _correct_shaped(result["errors"], output_errors, shaped)
        result.setdefault("opts", {})["shaped_options"] = "rtn error x output-error ratio"
    if act_options:
        incs = result["act_increments"]
        for u in units:
            errs = result["errors"][u.name]
            for o in act_options:
                errs[str(o)] = errs[str(o.weight_only)] + incs.get((u.name, str(o)), 0.0)
                if (u.name, str(o.weight_only)) in cache:
                    cache[(u.name, str(o))] = cache[(u.name, str(o.weight_only))]
    if act_options or kv_formats:
        result.setdefault("opts", {})["activation_terms"] = {"rows": act_rows, "kappa": "sum e(f) / sum oF(f)"}
        for u in units:
            result["info"].setdefault(u.name, {})["kappa"] = result["kappa"].get(u.name)
    wall_s = time.perf_counter() - t0
    records = []
    for u in units:
        errs = result["errors"][u.name]
        skipped = {str(o): o.supports(u.shape) for o in options if o.supports(u.shape) is not None}
        bad = {o: e for o, e in errs.items() if not math.isfinite(e) or e < 0}
        if bad:
            raise DataError(f"unit {u.name!r}: method {method!r} gave non-finite or negative errors {bad}; "
                            "check the model and calibration data for NaN/inf")
        records.append(UnitSensitivity(
            u.name, u.kind, tuple(u.shape), u.role, u.block,
            [{"option": str(o), "bits": int(o.bits(u.shape)), "error": float(errs[str(o)])} for o in options
             if str(o) not in skipped],
            stats[u.name], result["info"].get(u.name, {}), u.index, skipped,
        ))
    calibration = {"description": calib_description, **calibration_digest(calib)}
    if quantizer_warnings:  # option parts dropped for some units (e.g. +rotate on an odd input dim)
        calibration["quantizer_warnings"] = sorted(set(quantizer_warnings))
    table = SensitivityTable(
        model=model_name, method=method, candidates=[str(o) for o in options], seed=seed, loss=loss,
        task=task, calibration=calibration, method_opts=result.get("opts", {}),
        cost={k: round(v, 6) for k, v in sorted(cost.items())}, units=records,
        timing={"wall_s": wall_s}, mixq_version=__version__,
        kv_candidates=[str(f) for f in kv_formats], kv=_kv_records(net, kv_formats, result.get("kv_errors", {})),
    )
    log.info("sensitivity %s: %d units x %d options in %.1f s", method, len(units), len(options), wall_s)
    return table, cache


def _check_act_units(units: list[Unit], act_options: list[Option]) -> None:
    """FormatError naming the first unit that cannot take an activation candidate."""
    from mixq.models.inputs import check_hookable

    outside = [u.name for u in units if u.block < 0]
    if act_options and outside:
        raise MixqError(f"activation candidates are analysed inside the decoder blocks; unit {outside[0]!r} lies "
                        "outside them (analyse without the head, or give it a weight-only option)")
    for u in units:
        for o in act_options:
            try:
                check_hookable(u)
                o.act.check_cols(u.shape[1])
            except MixqError as e:
                raise type(e)(f"unit {u.name!r} (shape {tuple(u.shape)}), candidate {o}: {e}") from e


def _kv_records(model: nn.Module, kv_formats: list, kv_errors: dict) -> list[dict]:
    """The table's `kv` section: per attention layer its KV candidates' errors."""
    if not kv_formats:
        return []
    from mixq.models.kvcache import kv_layers

    out = []
    for layer in kv_layers(model):
        errs = kv_errors.get(layer.name, {})
        bad = {k: e for k, e in errs.items() if not math.isfinite(e) or e < 0}
        if bad:
            raise DataError(f"layer {layer.name!r}: KV errors {bad} are not finite and >= 0")
        out.append({"name": layer.name, "block": layer.block, "n_kv_heads": layer.n_kv_heads,
                    "head_dim": layer.head_dim,
                    "options": [{"kv": str(f), "error": float(errs.get(str(f), 0.0))} for f in kv_formats]})
    return out
