"""Sensitivity block by block: Fisher, output error and Hutchinson traces with one decoder
block's weights on the device at a time (`models.walk.Walker`), so models whose weights do
not fit the device are analysed too.

    forward   inputs[0] = embed(windows); inputs[b+1] = block_b(inputs[b])   (no graph kept)
    head      per micro-batch: loss of head(inputs[B]); g[B] = d loss / d inputs[B]
    backward  for b = B-1 .. 0: recompute block_b from inputs[b] with its graph,
                  g[b] = d/d inputs[b] and the gradient of block b's weights (a vector-Jacobian
                  product with g[b+1]), and collect its units' input statistics on the way

so the Fisher of every unit, F = mean over micro-batches of (gradient of the batch's mean
loss)², is exactly the whole-model backward's (`sensitivity.fisher`), with one extra forward
per block. Per block, while it is on the device, each unit's candidates are quantized
(`quantize_unit`: RTN, or GPTQ/smoothing from the unit's input Hessian, which comes from
the same recomputed float inputs) and their errors computed; only the activations at the
block boundaries (windows x seqlen x hidden per block) are kept across blocks.

- fisher:      error = Σ F ΔW², F in float64
- output:      error = tr(ΔW G ΔWᵀ) / N, G = XᵀX the unit's input Gram matrix, N the tokens
- hutchinson:  error = |Tr(H_i)/n_i| ‖ΔW‖², the trace from Rademacher probes v:
               vᵢ·(Hv)ᵢ with Hv = (∇L(θ + εv) − ∇L(θ − εv)) / 2ε, a central finite
               difference of two block-by-block gradients (ε = `fd_eps` × the RMS of the
               units' weights), the blocks computing in float32. The exact double-backward
               Hessian-vector product (`sensitivity.hessian`) needs the whole model's graph;
               this one needs one block's, at the price of an O(ε²) truncation error
               (relative 1e-3 or less on the test models, see the tests).

Calibrated candidates (gptq, smooth) and the shaped-option correction of the diagonal
methods (fisher, hutchinson) work as in `analyze`: e(option) = e(plain format) x
oe(option) / oe(plain format), oe = tr(ΔW H ΔWᵀ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mixq.apply.stats import StatsCollector, same_tensor
from mixq.errors import MixqError
from mixq.models.capture import unit_inputs, unit_view
from mixq.models.units import Unit, get_weight
from mixq.models.walk import BlockInput, Walker
from mixq.option import CalibConfig, Option
from mixq.progress import Progress, track
from mixq.quantizers.smooth import output_error
from mixq.sensitivity.activations import _Acc
from mixq.sensitivity.context import unit_options
from mixq.sensitivity.quantized import UnitQuantizer

BLOCKWISE_METHODS = ("fisher", "output", "hutchinson")


class _BlockConsumer:
    """Per unit: the table's activation statistics (`_Acc`) and the calibration statistics
    (`UnitStats`: XᵀX, Σ|x|), units fed the very same tensor sharing both."""

    def __init__(self, units: list[Unit]) -> None:
        self.accs = {u.name: _Acc(u, want_gram=False) for u in units}
        self.collector = StatsCollector()
        self._last: tuple[torch.Tensor, _Acc] | None = None

    def __call__(self, unit: Unit, x: torch.Tensor) -> None:
        x = x.detach()
        self.collector(unit, x)
        if self._last is not None and same_tensor(x, self._last[0]):
            self.accs[unit.name] = self._last[1]
            return
        self.accs[unit.name].add(x)
        self._last = (x, self.accs[unit.name])

    def release(self) -> None:
        self._last = None
        self.collector.release()


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))


class BlockwiseAnalysis:
    """One analysis: the walker, the units (inside blocks, or the head), the candidate
    options, the calibration micro-batches."""

    def __init__(self, walker: Walker, units: list[Unit], options: list[Option], calib: torch.Tensor, *,
                 batch_size: int = 1, config: CalibConfig = CalibConfig(), progress: Progress | None = None,
                 keep: set[str] | None = None, want_hessian: bool = False) -> None:
        self.walker, self.units, self.options = walker, units, options
        self.batches = [b.to(walker.device) for b in calib.split(batch_size)]
        self.n_total = calib.shape[0] * (calib.shape[1] - 1)
        self.n_tokens = int(calib.numel())
        self.config, self.progress = config, progress
        self.keep = keep or set()
        self.want_hessian = want_hessian or any(o.needs_calibration for o in options)
        self.by_block: dict[int, list[Unit]] = {}
        for u in units:
            if u.kind == "embedding":
                raise MixqError(f"unit {u.name!r}: block-by-block analysis does not cover embeddings")
            self.by_block.setdefault(walker.block_of(u.param), []).append(u)
        self.cost: dict = {}
        self.errors: dict[str, dict[str, float]] = {}
        self.info: dict[str, dict] = {}
        self.stats: dict[str, dict] = {}
        self.output_errors: dict[tuple[str, str], float] = {}
        self.cache: dict[tuple[str, str], object] = {}
        self.quantizer = UnitQuantizer({}, config)

    def add_cost(self, kind: str, passes: float) -> None:
        self.cost[kind] = self.cost.get(kind, 0.0) + float(passes)

    # -- passes ------------------------------------------------------------------------------

    def forward_sweep(self) -> list[list[BlockInput]]:
        """Every block's inputs on every micro-batch (float, no graph): inputs[b], b = 0..B."""
        w = self.walker
        with torch.no_grad():
            inputs = [w.embed(self.batches)]
            for b in track(range(w.n_blocks), "analysis: forward", w.n_blocks, self.progress):
                with w.on_device(b) as block:
                    inputs.append([w.run(block, x) for x in inputs[-1]])
        self.add_cost("forward", 1)
        return inputs

    def head_grads(self, hidden: list[BlockInput], head_units: list[Unit], grads: dict | None) -> list[torch.Tensor]:
        """Per micro-batch, the gradient of the batch's mean loss w.r.t. the last block's
        output; the head units' weight gradients squared are added to `grads` (when given)."""
        w = self.walker
        params = [w.model.get_parameter(u.param) for u in head_units]
        out = []
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            for inp, ids in zip(hidden, self.batches):
                h = inp.hidden.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = _lm_loss(w.logits(h, ids), ids)
                    g = torch.autograd.grad(loss, [h] + params, allow_unused=True)
                out.append(g[0])
                if grads is not None:
                    for u, gp in zip(head_units, g[1:]):
                        if gp is not None:
                            grads[u.name] += unit_view(u, gp).double() ** 2
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return out

    def block_backward(self, block, units: list[Unit], inputs: list[BlockInput], g_out: list[torch.Tensor],
                       need_input_grad: bool, grads: dict, consumer: _BlockConsumer) -> list[torch.Tensor | None]:
        """Recompute the block from each stored input with its graph (the units' input hooks
        feeding `consumer`) and backpropagate g_out: the gradient w.r.t. the block's input per
        micro-batch; each unit's weight gradient squared added to grads[unit] (per
        micro-batch, for the Fisher)."""
        w = self.walker
        params = {}
        for u in units:
            p = w.model.get_parameter(u.param)
            params.setdefault(id(p), p)
        plist = list(params.values())
        flags = [p.requires_grad for p in plist]
        index = {id(p): i for i, p in enumerate(plist)}
        out: list[torch.Tensor | None] = []
        try:
            for p in plist:
                p.requires_grad_(True)
            with unit_inputs(w.model, units, consumer):
                for inp, g in zip(inputs, g_out):
                    h = inp.hidden.detach().requires_grad_(need_input_grad)
                    with torch.enable_grad():
                        y = w.run(block, inp.with_hidden(h)).hidden
                        targets = ([h] if need_input_grad else []) + plist
                        gs = torch.autograd.grad(y, targets, grad_outputs=g, allow_unused=True) if targets else ()
                    consumer.release()
                    out.append(gs[0] if need_input_grad else None)
                    pg = gs[1:] if need_input_grad else gs
                    for u in units:
                        gp = pg[index[id(w.model.get_parameter(u.param))]]
                        if gp is not None:
                            grads[u.name] += unit_view(u, gp).double() ** 2
        finally:
            for p, f in zip(plist, flags):
                p.requires_grad_(f)
        return out

    def unit_stats(self, block, units: list[Unit], inputs: list[BlockInput]) -> _BlockConsumer:
        """Run the block on its float inputs with the units' input hooks (no graph)."""
        consumer = _BlockConsumer(units)
        with torch.no_grad(), unit_inputs(self.walker.model, units, consumer):
            for inp in inputs:
                self.walker.run(block, inp)
                consumer.release()
        return consumer

    def head_stats(self, units: list[Unit], hidden: list[BlockInput]) -> _BlockConsumer:
        consumer = _BlockConsumer(units)
        with torch.no_grad(), unit_inputs(self.walker.model, units, consumer):
            for inp, ids in zip(hidden, self.batches):
                self.walker.logits(inp.hidden, ids)
                consumer.release()
        return consumer

    # -- per unit ---------------------------------------------------------------------------

    def unit_errors(self, units: list[Unit], consumer: _BlockConsumer, weigh) -> None:
        """Quantize each unit with each candidate (on the device), record its errors
        (`weigh(unit, dW) -> error`), output errors, statistics and kept weights."""
        for u in units:
            st = consumer.collector.get(u.name)
            H = st.hessian() if (st is not None and self.want_hessian) else None
            W = get_weight(self.walker.model, u).detach()
            W32 = W.float()
            errs = {}
            for opt in unit_options(self.options, u):
                if opt.is_plain:
                    w_hat = opt.fmt.fake_quant(W32)
                    qw = None
                else:
                    qw, _ = self.quantizer.quantize_weight(u, W32, opt, st)
                    w_hat = qw.weight()
                dw = w_hat.to(W.dtype).float() - W32  # what the model would compute with
                errs[str(opt)] = weigh(u, dw)
                if H is not None:
                    self.output_errors[(u.name, str(opt))] = output_error(dw, H)
                if qw is not None and str(opt) in self.keep:
                    self.cache[(u.name, str(opt))] = qw.to("cpu")
            self.errors[u.name] = errs
            self.stats[u.name] = consumer.accs[u.name].stats()


def blockwise(walker: Walker, units: list[Unit], options: list[Option], method: str, calib: torch.Tensor, *,
              seed: int = 0, batch_size: int = 1, config: CalibConfig = CalibConfig(),
              progress: Progress | None = None, keep: set[str] | None = None, want_hessian: bool = False,
              tol: float = 1e-2, min_probes: int = 4, max_probes: int = 50, fd_eps: float = 1e-3) -> dict:
    """Run `method` ("fisher", "output" or "hutchinson") block by block; returns the pieces a
    sensitivity table is made of: errors, info, stats, opts, cost, output_errors, and
    `cache`: (unit, option) -> QuantizedWeight (on the CPU) for the options in `keep`."""
    if method not in BLOCKWISE_METHODS:
        raise MixqError(f"method {method!r} does not run block by block (only {', '.join(BLOCKWISE_METHODS)}); "
                        "it needs the whole model on the device (--offload none)")
    a = BlockwiseAnalysis(walker, units, options, calib, batch_size=batch_size, config=config, progress=progress,
                          keep=keep, want_hessian=want_hessian)
    w = walker
    inputs = a.forward_sweep()
    head_units = a.by_block.get(-1, [])
    n_batches = len(a.batches)
    opts: dict = {"batch_size": batch_size, "blockwise": True}
    if method == "fisher":
        def zeros(us):  # float64 squared-gradient sums, one block's units at a time
            return {u.name: torch.zeros(u.shape, dtype=torch.float64, device=w.device) for u in us}

        grads = zeros(head_units)
        g = a.head_grads(inputs[-1], head_units, grads)
        if head_units:
            _finish(a, head_units, a.head_stats(head_units, inputs[-1]), grads, n_batches)
        for b in track(reversed(range(w.n_blocks)), "analysis: backward", w.n_blocks, a.progress):
            us = a.by_block.get(b, [])
            grads = zeros(us)
            with w.on_device(b) as block:
                consumer = _BlockConsumer(us)
                g = a.block_backward(block, us, inputs[b], g, b > 0, grads, consumer)
                if us:
                    _finish(a, us, consumer, grads, n_batches)
            inputs[b + 1] = None  # no longer needed
        a.add_cost("forward", 1)
        a.add_cost("backward", 1)
    elif method == "output":
        def weigh_for(consumer):
            def weigh(u, dw):
                st = consumer.collector.get(u.name)
                if st is None:
                    return 0.0
                return max(0.0, float(((dw @ st.xtx) * dw).double().sum())) / a.n_tokens
            return weigh

        for b in track(range(w.n_blocks), "analysis: output error", w.n_blocks, a.progress):
            us = a.by_block.get(b, [])
            if us:
                with w.on_device(b) as block:
                    consumer = a.unit_stats(block, us, inputs[b])
                    a.unit_errors(us, consumer, weigh_for(consumer))
        if head_units:
            consumer = a.head_stats(head_units, inputs[-1])
            a.unit_errors(head_units, consumer, weigh_for(consumer))
        a.add_cost("forward", 1)
        opts["normalizer"] = a.n_tokens
    else:
        traces, k = _fd_traces(a, inputs, seed, tol, min_probes, max_probes, fd_eps)
        for b in track(range(w.n_blocks), "analysis: errors", w.n_blocks, a.progress):
            us = a.by_block.get(b, [])
            if us:
                with w.on_device(b) as block:
                    consumer = a.unit_stats(block, us, inputs[b])
                    a.unit_errors(us, consumer, lambda u, dw: abs(traces[u.name] / u.n_params)
                                  * float(dw.double().pow(2).sum()))
        if head_units:
            a.unit_errors(head_units, a.head_stats(head_units, inputs[-1]),
                          lambda u, dw: abs(traces[u.name] / u.n_params) * float(dw.double().pow(2).sum()))
        for u in units:
            a.info[u.name] = {"trace": traces[u.name], "avg_trace": traces[u.name] / u.n_params, "iterations": k}
        opts.update({"tol": tol, "min_probes": min_probes, "max_probes": max_probes, "iterations": k,
                     "hvp": "central finite difference", "fd_eps": fd_eps})
    return {"errors": a.errors, "info": a.info, "stats": a.stats, "opts": opts, "cost": a.cost,
            "output_errors": a.output_errors, "cache": a.cache, "warnings": a.quantizer.warnings}


def _finish(a: BlockwiseAnalysis, units: list[Unit], consumer: _BlockConsumer, grads: dict, n_batches: int) -> None:
    """Fisher errors of `units` from their accumulated squared gradients."""
    fis = {u.name: grads.pop(u.name) / n_batches for u in units}
    a.unit_errors(units, consumer, lambda u, dw: float((fis[u.name] * dw.double() ** 2).sum()))
    for u in units:
        a.info[u.name] = {"fisher_mean": float(fis[u.name].mean())}


# ---------------------------------------------------------------------------------------
# Hutchinson by finite differences


def _probe(unit_index: int, probe: int, seed: int, shape, device) -> torch.Tensor:
    """The Rademacher vector of one unit for one probe (regenerated identically on demand)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + probe) * 100_003 + unit_index)
    return (torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.int8).float() * 2 - 1).to(device)


def _perturbed_grad_dot(a: BlockwiseAnalysis, inputs0: list[BlockInput], probe: int, seed: int, eps: float,
                        sign: float) -> dict[str, float]:
    """v·∇L(θ + sign·ε v) per unit: a forward sweep and a backward sweep with every unit's
    weight perturbed while its block is on the device."""
    w = a.walker
    order = {u.name: i for i, u in enumerate(a.units)}

    saved: dict[str, torch.Tensor] = {}

    def perturb(units, direction):
        """direction +1: W <- W + sign·ε·v (the weight saved first); -1: W restored."""
        with torch.no_grad():
            for u in units:
                W = get_weight(w.model, u)
                if direction > 0:
                    saved[u.name] = W.detach().clone()
                    W += sign * eps * _probe(order[u.name], probe, seed, u.shape, W.device).to(W.dtype)
                else:
                    W.copy_(saved.pop(u.name))

    with torch.no_grad():
        inputs = [inputs0]
        for b in range(w.n_blocks):
            us = a.by_block.get(b, [])
            with w.on_device(b) as block:
                perturb(us, 1.0)
                inputs.append([w.run(block, x) for x in inputs[-1]])
                perturb(us, -1.0)
    head = a.by_block.get(-1, [])
    perturb(head, 1.0)
    try:
        dots = {}
        hg = _grad_sums(a, head, inputs[-1], dots, order, probe, seed)
    finally:
        perturb(head, -1.0)
    g = hg
    for b in reversed(range(w.n_blocks)):
        us = a.by_block.get(b, [])
        with w.on_device(b) as block:
            perturb(us, 1.0)
            try:
                g = _block_grad_dots(a, block, us, inputs[b], g, b > 0, dots, order, probe, seed)
            finally:
                perturb(us, -1.0)
        inputs[b + 1] = None
    a.add_cost("forward", 2)
    a.add_cost("backward", 1)
    return dots


def _grad_sums(a, head_units, hidden, dots, order, probe, seed):
    """Head step of a perturbed pass: weighted loss gradients, v·g of the head units."""
    w = a.walker
    params = [w.model.get_parameter(u.param) for u in head_units]
    flags = [p.requires_grad for p in params]
    out = []
    try:
        for p in params:
            p.requires_grad_(True)
        for inp, ids in zip(hidden, a.batches):
            h = inp.hidden.detach().requires_grad_(True)
            weight = ids.shape[0] * (ids.shape[1] - 1) / a.n_total
            with torch.enable_grad():
                loss = weight * _lm_loss(w.logits(h, ids), ids)
                g = torch.autograd.grad(loss, [h] + params, allow_unused=True)
            out.append(g[0])
            for u, gp in zip(head_units, g[1:]):
                if gp is not None:
                    v = _probe(order[u.name], probe, seed, u.shape, gp.device)
                    dots[u.name] = dots.get(u.name, 0.0) + float((unit_view(u, gp).double() * v.double()).sum())
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return out


def _block_grad_dots(a, block, units, inputs, g_out, need_input_grad, dots, order, probe, seed):
    """Backward through a (perturbed) block: input gradients, and v·g per unit."""
    w = a.walker
    plist = []
    seen = set()
    for u in units:
        p = w.model.get_parameter(u.param)
        if id(p) not in seen:
            seen.add(id(p))
            plist.append(p)
    index = {id(p): i for i, p in enumerate(plist)}
    flags = [p.requires_grad for p in plist]
    out = []
    try:
        for p in plist:
            p.requires_grad_(True)
        for inp, g in zip(inputs, g_out):
            h = inp.hidden.detach().requires_grad_(need_input_grad)
            with torch.enable_grad():
                y = w.run(block, inp.with_hidden(h)).hidden
                targets = ([h] if need_input_grad else []) + plist
                gs = torch.autograd.grad(y, targets, grad_outputs=g, allow_unused=True)
            out.append(gs[0] if need_input_grad else None)
            pg = gs[1:] if need_input_grad else gs
            for u in units:
                gp = pg[index[id(w.model.get_parameter(u.param))]]
                if gp is not None:
                    v = _probe(order[u.name], probe, seed, u.shape, gp.device)
                    dots[u.name] = dots.get(u.name, 0.0) + float((unit_view(u, gp).double() * v.double()).sum())
    finally:
        for p, f in zip(plist, flags):
            p.requires_grad_(f)
    return out


def _weight_rms(a: BlockwiseAnalysis) -> float:
    total, count = 0.0, 0
    w = a.walker
    for b in range(w.n_blocks):
        us = a.by_block.get(b, [])
        if not us:
            continue
        with w.on_device(b):
            for u in us:
                W = get_weight(w.model, u).detach().double()
                total += float(W.pow(2).sum())
                count += W.numel()
    for u in a.by_block.get(-1, []):
        W = get_weight(w.model, u).detach().double()
        total += float(W.pow(2).sum())
        count += W.numel()
    return math.sqrt(total / max(count, 1))


def _fd_traces(a: BlockwiseAnalysis, inputs: list[list[BlockInput]], seed: int, tol: float, min_probes: int,
               max_probes: int, fd_eps: float) -> tuple[dict[str, float], int]:
    """Hutchinson traces Tr(H_i) per unit by central finite differences (module docstring):
    probes until every unit's running mean moves by at most `tol` relative to itself."""
    eps = fd_eps * _weight_rms(a)
    sums = {u.name: 0.0 for u in a.units}
    prev = None
    k = 0
    inputs0 = inputs[0]
    for k in range(1, max_probes + 1):
        plus = _perturbed_grad_dot(a, inputs0, k, seed, eps, 1.0)
        minus = _perturbed_grad_dot(a, inputs0, k, seed, eps, -1.0)
        for u in a.units:
            sums[u.name] += (plus.get(u.name, 0.0) - minus.get(u.name, 0.0)) / (2 * eps)
        mean = {n: s / k for n, s in sums.items()}
        if a.progress is not None:
            a.progress("hutchinson probes", k, max_probes)
        if k >= min_probes and prev is not None and all(abs(mean[n] - prev[n]) <= tol * abs(mean[n]) for n in mean):
            break
        prev = mean
        a.add_cost("hvp", 1)
    return {n: s / k for n, s in sums.items()}, k
