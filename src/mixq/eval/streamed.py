"""Evaluation block by block: the float model and any number of quantized variants of it in
one walk over the model, one block's weights on the device at a time.

    walker = loaded.walker()
    variants = [Variant.for_plan(...), ...]
    rows = evaluate_variants(walker, windows, variants)   # float row first, then one per variant

For each decoder block b (moved to the device once), the float stream of hidden states runs
through the float block; then for each variant the block's planned units are quantized with
the variant's option (round to nearest from the weight; GPTQ/smoothing calibrated on the
variant's own calibration stream, which runs through the variant's already quantized blocks,
exactly as `mixq.apply.quantize_model` does; or taken from a cache of weights quantized
earlier), the variant's streams run through the quantized block, and the float weights are
restored. After the last block every variant's next-token distribution is compared with the
float model's on the same window, so nothing is cached but the hidden states at the block
boundary (windows x seqlen x hidden per variant).

Metrics are those of `eval.perplexity`: token-level NLL and perplexity over n * (L - 1)
scored tokens, KL(P_float || P_variant) per token (nats), top-1 agreement; log-probabilities
in float32 from the logits (float64 sums).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from mixq.apply.manifest import Manifest, calibration_record
from mixq.apply.quantize import Applier, applied, quantize_block
from mixq.apply.stats import StatsCollector
from mixq.errors import DataError
from mixq.eval.perplexity import _check_windows, _kl_and_agree, _summary, _window_nll
from mixq.models.capture import unit_inputs
from mixq.models.units import Unit
from mixq.models.walk import BlockInput, Walker
from mixq.option import CalibConfig
from mixq.plan import Plan
from mixq.progress import Progress, track


@dataclass
class Variant:
    """One quantized version of the model under evaluation: a plan, how its weights are made
    (an `Applier`, optionally drawing from `cache`: (unit, option) -> QuantizedWeight), and
    its streams. `calib` (token windows) is needed when the plan has calibrated options and
    no cache provides them."""

    label: str
    plan: Plan
    applier: Applier
    calib: torch.Tensor | None = None
    calib_inputs: list[BlockInput] | None = None
    eval_inputs: list[BlockInput] | None = None
    quantize_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_plan(cls, label: str, model: nn.Module, plan: Plan, *, calib: torch.Tensor | None = None,
                 config: CalibConfig = CalibConfig(), cache: dict | None = None, keep_all: bool = False) -> Variant:
        calibrated = any(o.needs_calibration for o in plan.options.values())
        uses_calib = calibrated and not cache
        manifest = Manifest(seed=int(config.seed), sequential=uses_calib,
                            calibration=calibration_record(calib if uses_calib else None),
                            settings={**config.quantizer_settings(), "batch_size": config.batch_size,
                                      "true_sequential": config.true_sequential,
                                      "order": "blocks" if uses_calib else None})
        applier = Applier(model, plan, manifest, config, keep_device=None, cache=cache, keep_all=keep_all)
        return cls(label, plan, applier, calib if uses_calib else None)


def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(ids.split(batch_size))


def evaluate_variants(walker: Walker, units: list[Unit], windows: torch.Tensor, variants: list[Variant], *,
                      batch_size: int = 1, progress: Progress | None = None) -> tuple[dict, list[dict]]:
    """(float metrics, one metrics dict per variant) on token windows (n, L); see the module
    docstring. Each variant's metrics carry `quantize_s` and, for calibrated plans, the
    manifest's warnings (`manifest_warnings`)."""
    windows = _check_windows(windows)
    by_block: dict[int, list[Unit]] = {}
    for u in units:
        by_block.setdefault(walker.block_of(u.param), []).append(u)
    outside = by_block.pop(-1, [])
    eval_batches = _batches(windows, batch_size)
    timing = {}
    with torch.inference_mode():
        float_inputs = walker.embed(eval_batches)
        for v in variants:
            _start(walker, v, outside, eval_batches, float_inputs)
        for b in track(range(walker.n_blocks), "evaluate blocks", walker.n_blocks, progress):
            with walker.on_device(b) as block:
                float_inputs = [walker.run(block, x) for x in float_inputs]
                for v in variants:
                    t0 = time.perf_counter()
                    us = [u for u in by_block.get(b, []) if u.name in v.plan.options and u.tied_to is None]
                    quantize_block(walker, block, us, v.calib_inputs, v.applier, timing)
                    v.quantize_s += time.perf_counter() - t0
                    v.eval_inputs = [walker.run(block, x) for x in v.eval_inputs]
                    last = b == walker.n_blocks - 1
                    if v.calib_inputs is not None and (not last or _head_calibrated(v, outside)):
                        v.calib_inputs = [walker.run(block, x) for x in v.calib_inputs]
                    v.applier.restore([u.name for u in us])
        for v in variants:
            _finish_head(walker, v, outside)
        float_row, rows = _score(walker, windows, eval_batches, float_inputs, variants, outside, progress)
    for v, row in zip(variants, rows):
        row["quantize_s"] = v.quantize_s
        if any(not o.is_plain for o in v.plan.options.values()):
            row["manifest_warnings"] = list(v.applier.manifest.warnings)
    return float_row, rows


def _head_calibrated(v: Variant, outside: list[Unit]) -> bool:
    return any(u.name in v.plan.options and v.plan.options[u.name].needs_calibration for u in outside)


def _start(walker: Walker, v: Variant, outside: list[Unit], eval_batches, float_inputs) -> None:
    """Embeddings quantized first; the variant's block-0 inputs (the float ones unless its
    embedding is quantized) and calibration inputs."""
    t0 = time.perf_counter()
    emb = [u for u in outside if u.kind == "embedding" and u.name in v.plan.options and u.tied_to is None]
    for u in emb:
        v.applier.apply(u, None)
    v.eval_inputs = walker.embed(eval_batches) if emb else list(float_inputs)
    if v.calib is not None:
        v.calib_inputs = walker.embed(_batches(v.calib, v.applier.config.batch_size))
    v.applier.restore([u.name for u in emb])  # re-applied at the head (tied heads, logits)
    v.quantize_s += time.perf_counter() - t0


def _finish_head(walker: Walker, v: Variant, outside: list[Unit]) -> None:
    """Quantize the variant's units outside the blocks (the head: calibrated from the
    variant's last calibration hidden states); they are written at scoring time."""
    t0 = time.perf_counter()
    heads = [u for u in outside if u.kind != "embedding" and u.name in v.plan.options and u.tied_to is None]
    collector = StatsCollector()
    calibrated = [u for u in heads if v.plan.options[u.name].needs_calibration]
    if calibrated and v.calib_inputs is not None:
        with unit_inputs(walker.model, calibrated, collector):
            for inp, ids in zip(v.calib_inputs, _batches(v.calib, v.applier.config.batch_size)):
                walker.logits(inp.hidden, ids)
                collector.release()
    for u in heads:
        v.applier.apply(u, collector.get(u.name))
    v.extra["outside"] = {u.name: v.applier.weights[u.name] for u in outside if u.name in v.applier.weights}
    v.applier.restore()
    v.calib_inputs = None
    v.quantize_s += time.perf_counter() - t0


def _log_probs(walker: Walker, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = walker.logits(hidden, ids)[:, :-1]  # (B, L-1, V)
    return torch.log_softmax(logits.float(), dim=-1)


def _score(walker, windows, eval_batches, float_inputs, variants, outside, progress):
    n, seqlen = windows.shape
    nll_f = 0.0
    acc = [{"nll": 0.0, "kl": 0.0, "agree": 0} for _ in variants]
    for k, ids in enumerate(track(eval_batches, "score windows", len(eval_batches), progress)):
        ids = ids.to(walker.device)
        ref = _log_probs(walker, float_inputs[k].hidden, ids)
        nll_f += float(_window_nll(ref, ids).sum())
        for v, a in zip(variants, acc):
            with applied(walker.model, outside, v.extra.get("outside", {})):
                logp = _log_probs(walker, v.eval_inputs[k].hidden, ids)
            nll = _window_nll(logp, ids)
            if not torch.isfinite(nll).all():
                raise DataError(f"{v.label}: the quantized model gives non-finite log-probabilities on window(s) "
                                f"of batch {k}")
            a["nll"] += float(nll.sum())
            kl, agree = _kl_and_agree(ref, logp)
            a["kl"] += kl
            a["agree"] += agree
    float_row = _summary(nll_f, n, seqlen)
    rows = []
    for a in acc:
        row = _summary(a["nll"], n, seqlen)
        row["kl"] = a["kl"] / row["n_tokens"]
        row["top1_agree"] = a["agree"] / row["n_tokens"]
        row["ref_ppl"] = float_row["ppl"]
        rows.append(row)
    return float_row, rows


def streamed_log_probs(walker: Walker, windows: torch.Tensor, *, batch_size: int = 1,
                       progress: Progress | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """The float model's next-token log-probs (n, L-1, V) float32 on `device` for token
    windows (n, L), block by block (a reference to compare a packed checkpoint with)."""
    windows = _check_windows(windows)
    batches = _batches(windows, batch_size)
    with torch.inference_mode():
        inputs = walker.embed(batches)
        for b in track(range(walker.n_blocks), "float reference", walker.n_blocks, progress):
            with walker.on_device(b) as block:
                inputs = [walker.run(block, x) for x in inputs]
        out = [_log_probs(walker, x.hidden, ids.to(walker.device)).to(device) for x, ids in zip(inputs, batches)]
    return torch.cat(out)
