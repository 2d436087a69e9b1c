"""Diagonal empirical Fisher sensitivity.

    F = (1/B) * sum over micro-batches b of g_b ⊙ g_b,   g_b = grad of batch b's mean loss
    error = sum(F ⊙ ΔW ⊙ ΔW)

the diagonal Fisher approximation of the second-order loss change (up to the factor 1/2,
dropped for every unit alike). `batch_size` windows (images) make one micro-batch; the
default of 1 gives one gradient per calibration window. Cost: one forward + backward over
the calibration set.
"""

from __future__ import annotations

import torch

from mixq.models.capture import unit_view
from mixq.progress import track
from mixq.sensitivity.context import Context, grads_for


def fisher(ctx: Context, batch_size: int = 1) -> dict:
    """Diagonal empirical Fisher of every unit, from per-micro-batch gradients."""
    model, units = ctx.model, ctx.units
    batches = ctx.batches(batch_size)
    with grads_for(model, units) as params:
        sq = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for b in track(batches, "fisher", len(batches), ctx.progress):
            grads = torch.autograd.grad(ctx.batch_loss(b), params, allow_unused=True)
            for acc, g in zip(sq, grads):
                if g is not None:
                    acc += g.double() ** 2
        pidx = {id(p): i for i, p in enumerate(params)}
        fis = {u.name: unit_view(u, sq[pidx[id(model.get_parameter(u.param))]]) / len(batches) for u in units}
    ctx.add_cost("forward", 1)
    ctx.add_cost("backward", 1)
    errors, info = {}, {}
    for u in units:
        f = fis[u.name]  # (out, in) float64
        errors[u.name] = {str(opt): float((f * dw.double() ** 2).sum()) for opt, dw in ctx.deltas(u)}
        info[u.name] = {"fisher_mean": float(f.mean())}
    return {"errors": errors, "info": info, "opts": {"batch_size": batch_size}}
