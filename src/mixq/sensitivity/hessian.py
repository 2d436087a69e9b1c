"""Second-order sensitivity: the Hessian H of the calibration loss with respect to the unit
weights, seen through Hessian-vector products (double backward).

- `hutchinson` (HAWQ-V2, Dong et al. 2020): the average trace Tr(H_ii) / n_i of each unit's
  diagonal block, estimated with Rademacher probes v over *all* units at once. One product
  Hv per probe gives v_i . (Hv)_i for every unit i, and since E[v_i v_j^T] = 0 for i != j,
  E[v_i . (Hv)_i] = E[v_i^T H_ii v_i] = Tr(H_ii): exact in expectation, for all units from
  the same probes (the cross terms v_i^T H_ij v_j average out but add to the variance:
  2 sum_{a != b in i} H_ab^2 + sum_{a in i, b not in i} H_ab^2 per probe).
  error = |Tr(H_i) / n_i| * ||ΔW_i||^2.
- `eigen` (HAWQ-V1, Dong et al. 2019): the dominant eigenvalue of each block H_ii by power
  iteration with v supported on that unit only. error = |lambda_i| * ||ΔW_i||^2.

The Hessian of a cross-entropy away from a minimum need not be positive semi-definite, so a
trace or eigenvalue may come out negative; the signed value is recorded in each unit's
`info` and its magnitude scales the error.

Cost. Each product is a forward + backward with `create_graph` over every micro-batch
followed by a double backward (together about 2-3x one float forward + backward). With
`retain_graph=True` the gradient graph of every micro-batch is built once and kept, so a
product is only the double backward: faster (for `eigen` much faster, since the product
for a unit then runs only the part of the graph between the loss and that unit), but the
graphs of the whole calibration set stay in memory (about 3 GB per 256-token window on
SmolLM2-135M, 13 GB for 4 windows). `hutchinson` needs one product per probe for all units
together (`min_probes`..`max_probes`; on SmolLM2-135M with 4 x 256 tokens about 2.3
forward+backward equivalents per probe with retained graphs); `eigen` needs one product
per unit per iteration, about n_units * iterations products: keep `max_iters` and the
calibration set small.
"""

from __future__ import annotations

import torch
from torch import nn

from mixq.models.capture import eager_attention, unit_view
from mixq.models.units import Unit
from mixq.progress import track
from mixq.sensitivity.context import Context, grads_for


class _HVP:
    """Products of the Hessian of the calibration loss with vectors over `params`."""

    def __init__(self, ctx: Context, params: list[nn.Parameter], batch_size: int, retain_graph: bool) -> None:
        self.ctx = ctx
        self.params = params
        self.batches = ctx.batches(batch_size)
        self.retain = retain_graph
        self.graphs: list | None = [self._grads(b) for b in self.batches] if retain_graph else None
        if retain_graph:
            ctx.add_cost("forward", 1)
            ctx.add_cost("backward", 1)

    def _grads(self, batch, only: list[int] | None = None) -> list[torch.Tensor | None]:
        """First-order gradients with their graph, for params[i], i in `only` (default all;
        the others None)."""
        idx = list(range(len(self.params))) if only is None else only
        loss = batch.weight * self.ctx.batch_loss(batch)
        grads = torch.autograd.grad(loss, [self.params[i] for i in idx], create_graph=True, allow_unused=True)
        out: list[torch.Tensor | None] = [None] * len(self.params)
        for i, g in zip(idx, grads):
            out[i] = g
        return out

    def __call__(self, vs: dict[int, torch.Tensor], wrt: list[int]) -> list[torch.Tensor]:
        """(H v) restricted to params[i] for i in `wrt`; `vs` maps param index -> vector
        (a param not in `vs` has v = 0 there)."""
        out = [torch.zeros_like(self.params[i]) for i in wrt]
        for k, batch in enumerate(self.batches):
            g = self.graphs[k] if self.retain else self._grads(batch, sorted(vs))
            terms = [(g[i] * v).sum() for i, v in vs.items() if g[i] is not None and g[i].requires_grad]
            if not terms:
                continue
            hv = torch.autograd.grad(sum(terms), [self.params[i] for i in wrt], retain_graph=self.retain,
                                     allow_unused=True)
            for acc, h in zip(out, hv):
                if h is not None:
                    acc += h.detach()
        if not self.retain:
            self.ctx.add_cost("forward", 1)
            self.ctx.add_cost("backward", 1)
        self.ctx.add_cost("hvp", 1)
        return out

    def release(self) -> None:
        self.graphs = None


def _masks(model: nn.Module, units: list[Unit], params: list[nn.Parameter]) -> dict[int, torch.Tensor | None]:
    """Per param index: a 0/1 mask of the elements belonging to some unit (None: all do)."""
    index = {id(p): i for i, p in enumerate(params)}
    covered: dict[int, list[Unit]] = {}
    for u in units:
        covered.setdefault(index[id(model.get_parameter(u.param))], []).append(u)
    masks: dict[int, torch.Tensor | None] = {}
    for i, us in covered.items():
        if any(u.index is None for u in us) or len({u.index for u in us}) == params[i].shape[0]:
            masks[i] = None
            continue
        m = torch.zeros_like(params[i])
        for u in us:
            m[u.index] = 1.0
        masks[i] = m
    return masks


def _rademacher(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    bits = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
    return (bits.to(like.dtype) * 2 - 1).to(like.device)


def _sq_norms(ctx: Context, unit: Unit) -> dict[str, float]:
    return {str(opt): float(dw.double().pow(2).sum()) for opt, dw in ctx.deltas(unit)}


def hutchinson(ctx: Context, tol: float = 1e-2, min_probes: int = 4, max_probes: int = 50,
               batch_size: int = 1, retain_graph: bool = False) -> dict:
    """Average Hessian trace per unit by Hutchinson's estimator (see module doc). Probes are
    drawn until every unit's running mean moves by at most `tol` relative to itself (after at
    least `min_probes`, at most `max_probes`); `iterations` records how many were used."""
    model, units = ctx.model, ctx.units
    with eager_attention(model), grads_for(model, units) as params:
        hvp = _HVP(ctx, params, batch_size, retain_graph)
        masks = _masks(model, units, params)
        pidx = {id(p): i for i, p in enumerate(params)}
        unit_param = [pidx[id(model.get_parameter(u.param))] for u in units]
        gen = torch.Generator().manual_seed(ctx.seed)
        sums = torch.zeros(len(units), dtype=torch.float64)
        mean_prev = None
        k = 0
        cb = ctx.progress
        for k in range(1, max_probes + 1):
            vs = {}
            for i, p in enumerate(params):
                if i in masks:
                    v = _rademacher(p.shape, gen, p)
                    vs[i] = v if masks[i] is None else v * masks[i]
            hv = hvp(vs, list(range(len(params))))
            est = torch.tensor([float((unit_view(u, vs[j]).double() * unit_view(u, hv[j]).double()).sum())
                                for u, j in zip(units, unit_param)], dtype=torch.float64)
            sums += est
            mean = sums / k
            if cb is not None:
                cb("hutchinson probes", k, max_probes)
            if k >= min_probes and mean_prev is not None:
                if bool(((mean - mean_prev).abs() <= tol * mean.abs()).all()):
                    break
            mean_prev = mean
        hvp.release()
        if cb is not None:
            cb("hutchinson probes", max_probes, max_probes)
    mean = sums / k
    errors, info = {}, {}
    for u, tr in zip(track(units, "hutchinson error", len(units), ctx.progress), mean.tolist()):
        avg = tr / u.n_params
        errors[u.name] = {o: abs(avg) * sq for o, sq in _sq_norms(ctx, u).items()}
        info[u.name] = {"trace": tr, "avg_trace": avg, "iterations": k}
    opts = {"tol": tol, "min_probes": min_probes, "max_probes": max_probes, "batch_size": batch_size,
            "retain_graph": retain_graph, "iterations": k}
    return {"errors": errors, "info": info, "opts": opts}


def eigen(ctx: Context, tol: float = 1e-3, max_iters: int = 20, batch_size: int = 1,
          retain_graph: bool = False) -> dict:
    """Dominant eigenvalue of each unit's Hessian block H_ii by power iteration (see module
    doc): v starts seeded-random on the unit, v <- H_ii v / ||H_ii v||, lambda = v . H_ii v,
    until lambda changes by at most `tol` relative (or `max_iters` products)."""
    model, units = ctx.model, ctx.units
    errors, info = {}, {}
    with eager_attention(model), grads_for(model, units) as params:
        hvp = _HVP(ctx, params, batch_size, retain_graph)
        pidx = {id(p): i for i, p in enumerate(params)}
        gen = torch.Generator().manual_seed(ctx.seed)
        for u in track(units, "eigen", len(units), ctx.progress):
            j = pidx[id(model.get_parameter(u.param))]
            p = params[j]
            mask = None
            if u.index is not None:
                mask = torch.zeros_like(p)
                mask[u.index] = 1.0
            v = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p)
            v = v if mask is None else v * mask
            v = v / v.norm()
            lam, lam_prev, it = 0.0, None, 0
            for it in range(1, max_iters + 1):
                hv = hvp({j: v}, [j])[0]
                hv = hv if mask is None else hv * mask
                lam = float((v.double() * hv.double()).sum())
                norm = hv.norm()
                if float(norm) == 0.0:
                    lam = 0.0
                    break
                v = hv / norm
                if lam_prev is not None and abs(lam - lam_prev) <= tol * abs(lam):
                    break
                lam_prev = lam
            errors[u.name] = {o: abs(lam) * sq for o, sq in _sq_norms(ctx, u).items()}
            info[u.name] = {"eigenvalue": lam, "iterations": it}
        hvp.release()
    opts = {"tol": tol, "max_iters": max_iters, "batch_size": batch_size, "retain_graph": retain_graph}
    return {"errors": errors, "info": info, "opts": opts}
