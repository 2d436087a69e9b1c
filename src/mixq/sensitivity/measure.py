"""Measured sensitivity: the change of the model's output when one unit alone takes an option.

    lm:    error = mean over predicted calibration tokens of KL(P_float || P_unit-quantized)
           of the next-token distributions (nats per token)
    image: error = max(0, CE_quantized - CE_float) on the calibration labels
           (`metric="kl"` uses the class-distribution KL instead, as for LMs)

Every other unit stays in float. The float pass runs once, caching the reference
log-probabilities (n * (L-1) * vocab float64 values, 8 bytes each: 400 MB for 4 windows of
256 tokens and a 49k vocabulary; keep the calibration set small) and,
for transformers, every decoder block's output (`mixq.models.capture.BlockReplay`). A unit
in block b is then measured by running blocks b.. plus the final norm and head only: the
cost of a unit-option pair is (n_blocks - b) / n_blocks forward passes over the calibration
set (plus the head), about half a forward on average; a model without a recognised block
list (CNNs) runs a full forward per pair. `cost.forward` in the table counts these
fractions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixq.errors import MixqError
from mixq.models.capture import BlockReplay, forward_logits
from mixq.models.units import get_weight, set_weight
from mixq.progress import track
from mixq.sensitivity.context import Context, unit_options

METRICS = ("kl", "loss")


def _log_probs(ctx: Context, logits: torch.Tensor) -> torch.Tensor:
    # float64: the KL of a small perturbation is second order in the logit change, while
    # float32 rounding of log-probs (~1e-7 each) would add first-order noise to its sum.
    if ctx.task == "lm":
        return torch.log_softmax(logits[:, :-1].double(), dim=-1)  # (B, L-1, V)
    return torch.log_softmax(logits.double(), dim=-1)  # (B, classes)


def measure(ctx: Context, batch_size: int = 4, metric: str | None = None, replay: bool = True) -> dict:
    """Measured KL (or CE increase) per unit and option; see the module doc. `replay=False`
    runs a full forward per unit and option instead of starting at the unit's block."""
    metric = metric or ("kl" if ctx.task == "lm" else "loss")
    if metric not in METRICS:
        raise MixqError(f"unknown measure metric {metric!r}; expected one of {METRICS}")
    model = ctx.model
    batches = ctx.batches(batch_size)
    n_items = sum(b.n_items for b in batches)
    blocks = BlockReplay(model, enabled=replay)
    ref: list[torch.Tensor] = []
    ref_ce = 0.0
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with blocks.recording():
                for i, b in enumerate(track(batches, "measure: float pass", len(batches), ctx.progress)):
                    blocks.set_batch(i)
                    logp = _log_probs(ctx, forward_logits(model, b.x))
                    ref.append(logp)
                    if ctx.task == "image":
                        ref_ce += float(F.nll_loss(logp, b.y, reduction="sum"))
            ctx.add_cost("forward", 1)

            errors, info = {}, {}
            for u in track(ctx.units, "measure", len(ctx.units), ctx.progress):
                block = max(0, blocks.block_of(u))
                frac = (blocks.n_blocks - block) / blocks.n_blocks if blocks.n_blocks else 1.0
                w = get_weight(model, u).detach().clone()
                errs, raw = {}, {}
                try:
                    for opt in unit_options(ctx.options, u):
                        set_weight(model, u, ctx.quantize_fn(u, w, opt))
                        total = 0.0
                        for i, b in enumerate(batches):
                            with blocks.from_block(block, i):
                                logp = _log_probs(ctx, forward_logits(model, b.x))
                            if metric == "kl":
                                total += float(F.kl_div(logp, ref[i], reduction="sum", log_target=True))
                            else:
                                total += float(F.nll_loss(logp, b.y, reduction="sum"))
                        ctx.add_cost("forward", frac)
                        value = total / n_items if metric == "kl" else (total - ref_ce) / n_items
                        raw[str(opt)] = value
                        errs[str(opt)] = max(0.0, value)
                        set_weight(model, u, w)
                finally:
                    set_weight(model, u, w)
                errors[u.name] = errs
                info[u.name] = {"start_block": block} if metric == "kl" else {"start_block": block, "delta_ce": raw}
    finally:
        model.train(training)
    return {"errors": errors, "info": info, "opts": {"batch_size": batch_size, "metric": metric, "replay": replay}}
