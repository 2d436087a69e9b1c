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
               this one needs one block's, at the price of an O(ε²) truncation error and
               float32 rounding noise (about 1e-4 of the largest v·(Hv) on the test Llama;
               see the tests). The traces' own probe noise is far larger.

Calibrated candidates (gptq, smooth) and the shaped-option correction of the diagonal
methods (fisher, hutchinson) work as in `analyze`: e(option) = e(plain format) x
oe(option) / oe(plain format), oe = tr(ΔW H ΔWᵀ).
"""

from __future__ import annotations

import contextlib
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
from mixq.sensitivity.actkv import ActKVCollector
from mixq.sensitivity.context import unit_options
from mixq.sensitivity.quantized import UnitQuantizer

BLOCKWISE_METHODS = ("fisher", "output", "hutchinson")
# Central-difference step of the Hutchinson products, relative to the RMS of the units'
# weights: in float32 on the tiny test Llama the error of v·(Hv) was about 1e-4 of the
# largest at this step (9e-3 at 2e-1 relative; rounding noise grows below ~1e-3).
FD_EPS = 5e-3


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
    """Mean next-token cross-entropy, in float32 at least (bf16 logits are upcast)."""
    v = logits.shape[-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))


class BlockwiseAnalysis:
    """One analysis: the walker, the units (inside blocks, or the head), the candidate
    options, the calibration micro-batches."""

    def __init__(self, walker: Walker, units: list[Unit], options: list[Option], calib: torch.Tensor, *,
                 batch_size: int = 1, config: CalibConfig = CalibConfig(), progress: Progress | None = None,
                 keep: set[str] | None = None, want_hessian: bool = False, act_options: list[Option] = (),
                 kv_formats: list = (), method: str = "fisher", act_rows: int = 4096) -> None:
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
        # activation and KV candidates (sensitivity/actkv.py): their errors, per unit and layer
        self.act_increments: dict[tuple[str, str], float] = {}
        self.kv_errors: dict[str, dict[str, float]] = {}
        self.kappa: dict[str, float | None] = {}  # κ_u: the method's error per unit of output Fisher
        self.actkv = None
        if act_options or kv_formats:
            from mixq.models.kvcache import kv_layers

            self.kv_layers = kv_layers(walker.model) if kv_formats else []
            self.actkv = ActKVCollector(list(act_options), list(kv_formats), self.kv_layers,
                                        with_grads=method == "fisher", max_rows=act_rows, n_batches=len(self.batches))

    def add_cost(self, kind: str, passes: float) -> None:
        self.cost[kind] = self.cost.get(kind, 0.0) + float(passes)

    # -- passes ------------------------------------------------------------------------------

    def forward_sweep(self) -> list[list[BlockInput]]:
        """Every block's inputs on every micro-batch (float, no graph): inputs[b], b = 0..B,
        kept in host memory when the blocks are offloaded (`Walker.stash`; `fetch` them)."""
        w = self.walker
        with torch.no_grad():
            current = w.embed(self.batches)
            inputs = [w.stash(current)]
            for b in track(range(w.n_blocks), "analysis: forward", w.n_blocks, self.progress):
                with w.on_device(b) as block:
                    current = [w.run(block, x) for x in current]
                inputs.append(w.stash(current))
        self.add_cost("forward", 1)
        return inputs

    def _grad_params(self, units: list[Unit]) -> tuple[list[torch.nn.Parameter], dict[int, int]]:
        """The units' parameters (each once) and parameter id -> index."""
        plist: list[torch.nn.Parameter] = []
        for u in units:
            p = self.walker.model.get_parameter(u.param)
            if all(p is not q for q in plist):
                plist.append(p)
        return plist, {id(p): i for i, p in enumerate(plist)}

    def _backward(self, run, pairs, units: list[Unit], need_input_grad: bool, sink) -> list[torch.Tensor | None]:
        """For each (input, extra) in `pairs`: out = run(h, extra) with h the input's hidden
        states (requiring grad when `need_input_grad`), then either out is a scalar loss or
        (out, grad_outputs); the gradient w.r.t. h is returned per pair and each unit's
        weight gradient, as a 2-D (out, in) view, goes to sink(unit, grad)."""
        plist, index = self._grad_params(units)
        flags = [p.requires_grad for p in plist]
        result: list[torch.Tensor | None] = []
        try:
            for p in plist:
                p.requires_grad_(True)
            for inp, extra in pairs:
                h = inp.hidden.detach().requires_grad_(need_input_grad)
                with torch.enable_grad():
                    out, g_out = run(inp.with_hidden(h), extra)
                    targets = ([h] if need_input_grad else []) + plist
                    gs = torch.autograd.grad(out, targets, grad_outputs=g_out, allow_unused=True) if targets else ()
                result.append(gs[0] if need_input_grad else None)
                pg = gs[1:] if need_input_grad else gs
                for u in units:
                    gp = pg[index[id(self.walker.model.get_parameter(u.param))]]
                    if gp is not None:
                        sink(u, unit_view(u, gp))
        finally:
            for p, f in zip(plist, flags):
                p.requires_grad_(f)
        return result

    def head_backward(self, hidden: list[BlockInput], head_units: list[Unit], sink, weighted: bool = False):
        """Per micro-batch, the gradient of the batch's mean loss (times its share of the
        calibration tokens when `weighted`) w.r.t. the last block's output; the head units'
        weight gradients go to `sink`."""
        w = self.walker

        def run(inp, ids):
            weight = ids.shape[0] * (ids.shape[1] - 1) / self.n_total if weighted else 1.0
            return weight * _lm_loss(w.logits(inp.hidden, ids), ids), None

        return self._backward(run, list(zip(w.fetch(hidden), self.batches)), head_units, True, sink)

    def block_backward(self, block, units: list[Unit], inputs: list[BlockInput], g_out: list[torch.Tensor],
                       need_input_grad: bool, sink, consumer: _BlockConsumer | None = None):
        """Recompute the block from each stored input with its graph (the units' input hooks
        feeding `consumer`, when given) and backpropagate g_out: the gradient w.r.t. the
        block's input per micro-batch; each unit's weight gradient goes to `sink`."""
        w = self.walker

        def run(inp, g):
            y = w.run(block, inp).hidden
            if consumer is not None:
                consumer.release()
            return y, g

        pairs = list(zip(w.fetch(inputs), g_out))
        if consumer is None:
            return self._backward(run, pairs, units, need_input_grad, sink)
        with unit_inputs(w.model, units, consumer):
            return self._backward(run, pairs, units, need_input_grad, sink)

    def capture(self, units: list[Unit], b: int):
        """The activation/KV collector's hooks on block b (a no-op context without such candidates)."""
        if self.actkv is None:
            return contextlib.nullcontext()
        return self.actkv.capture(self.walker.model, units, b)

    def block_actkv(self, units: list[Unit], b: int) -> None:
        """KV errors of block b's layers (its units' κ known), then the collector is emptied."""
        if self.actkv is None:
            return
        kappa = {u.role: (self.kappa.get(u.name) or 0.0) * self.actkv.row_fraction(u.name) for u in units}
        for layer in self.actkv.layers:
            if layer.block == b:
                self.kv_errors[layer.name] = self.actkv.kv_errors(layer, kappa.get("k_proj", 0.0),
                                                                  kappa.get("v_proj", 0.0))
        self.actkv.release()

    def unit_stats(self, block, units: list[Unit], inputs: list[BlockInput]) -> _BlockConsumer:
        """Run the block on its float inputs with the units' input hooks (no graph)."""
        consumer = _BlockConsumer(units)
        with torch.no_grad(), unit_inputs(self.walker.model, units, consumer):
            for inp in self.walker.fetch(inputs):
                self.walker.run(block, inp)
                consumer.release()
        return consumer

    def head_stats(self, units: list[Unit], hidden: list[BlockInput]) -> _BlockConsumer:
        consumer = _BlockConsumer(units)
        with torch.no_grad(), unit_inputs(self.walker.model, units, consumer):
            for inp, ids in zip(self.walker.fetch(hidden), self.batches):
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
            made = {}  # weight option -> (ŵ as the model computes with it, QuantizedWeight | None)
            for opt in unit_options(self.options, u):
                if opt.is_plain:
                    w_hat = opt.fmt.fake_quant(W32)
                    qw = None
                else:
                    qw, _ = self.quantizer.quantize_weight(u, W32, opt, st)
                    w_hat = qw.weight()
                dw = w_hat.to(W.dtype).float() - W32  # what the model would compute with
                made[str(opt)] = (dw + W32, qw)
                errs[str(opt)] = weigh(u, dw)
                if H is not None:
                    self.output_errors[(u.name, str(opt))] = output_error(dw, H)
                if qw is not None and str(opt) in self.keep:
                    self.cache[(u.name, str(opt))] = qw.to("cpu")
            self.errors[u.name] = errs
            self.stats[u.name] = consumer.accs[u.name].stats()
            if self.actkv is not None:  # activation increments; κ also weighs the layer's KV cache
                incs, self.kappa[u.name] = self.actkv.unit_increments(u, W32, made, errs)
                self.act_increments.update({(u.name, o): e for o, e in incs.items()})


def blockwise(walker: Walker, units: list[Unit], options: list[Option], method: str, calib: torch.Tensor, *,
              seed: int = 0, batch_size: int = 1, config: CalibConfig = CalibConfig(),
              progress: Progress | None = None, keep: set[str] | None = None, want_hessian: bool = False,
              tol: float = 1e-2, min_probes: int = 4, max_probes: int = 50, fd_eps: float = FD_EPS,
              act_options: list[Option] = (), kv_formats: list = (), act_rows: int = 4096) -> dict:
    """Run `method` ("fisher", "output" or "hutchinson") block by block; returns the pieces a
    sensitivity table is made of: errors, info, stats, opts, cost, output_errors, and
    `cache`: (unit, option) -> QuantizedWeight (on the CPU) for the options in `keep`.
    With activation options (weight options `options` plus an @ part) or KV formats
    (fisher and output only): `act_increments` {(unit, option): error added to the weight
    option's}, `kv_errors` {layer: {format: error}}, `kappa` {unit: κ_u} (sensitivity/actkv.py)."""
    if method not in BLOCKWISE_METHODS:
        raise MixqError(f"method {method!r} does not run block by block (only {', '.join(BLOCKWISE_METHODS)}); "
                        "it needs the whole model on the device (--offload none)")
    if (act_options or kv_formats) and method not in ("fisher", "output"):
        raise MixqError(f"activation and KV candidates are weighed by the fisher and output methods, not {method!r}")
    a = BlockwiseAnalysis(walker, units, options, calib, batch_size=batch_size, config=config, progress=progress,
                          keep=keep, want_hessian=want_hessian, act_options=list(act_options),
                          kv_formats=list(kv_formats), method=method, act_rows=act_rows)
    w = walker
    inputs = a.forward_sweep()
    head_units = a.by_block.get(-1, [])
    n_batches = len(a.batches)
    opts: dict = {"batch_size": batch_size, "blockwise": True}
    if method == "fisher":
        def zeros(us):  # float64 squared-gradient sums, one block's units at a time
            return {u.name: torch.zeros(u.shape, dtype=torch.float64, device=w.device) for u in us}

        def squares_into(grads):  # the Fisher's per-micro-batch squared gradients
            return lambda u, gp: grads[u.name].add_(gp.double() ** 2)

        grads = zeros(head_units)
        g = a.head_backward(inputs[-1], head_units, squares_into(grads))
        if head_units:
            _finish(a, head_units, a.head_stats(head_units, inputs[-1]), grads, n_batches)
        for b in track(reversed(range(w.n_blocks)), "analysis: backward", w.n_blocks, a.progress):
            us = a.by_block.get(b, [])
            grads = zeros(us)
            with w.on_device(b) as block:
                consumer = _BlockConsumer(us)
                with a.capture(us, b):
                    g = a.block_backward(block, us, inputs[b], g, b > 0, squares_into(grads), consumer)
                if us:
                    _finish(a, us, consumer, grads, n_batches)
                a.block_actkv(us, b)
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
                    with a.capture(us, b):
                        consumer = a.unit_stats(block, us, inputs[b])
                    a.unit_errors(us, consumer, weigh_for(consumer))
                    a.block_actkv(us, b)
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
            "output_errors": a.output_errors, "cache": a.cache, "warnings": a.quantizer.warnings,
            "act_increments": a.act_increments, "kv_errors": a.kv_errors, "kappa": a.kappa}


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
        current = w.fetch(inputs0)
        inputs = [w.stash(current)]
        for b in range(w.n_blocks):
            us = a.by_block.get(b, [])
            with w.on_device(b) as block:
                perturb(us, 1.0)
                current = [w.run(block, x) for x in current]
                perturb(us, -1.0)
            inputs.append(w.stash(current))
    dots: dict[str, float] = {}

    def dot_into(u: Unit, gp: torch.Tensor) -> None:  # v·g of the unit
        v = _probe(order[u.name], probe, seed, u.shape, gp.device)
        dots[u.name] = dots.get(u.name, 0.0) + float((gp.double() * v.double()).sum())

    head = a.by_block.get(-1, [])
    perturb(head, 1.0)
    try:
        g = a.head_backward(inputs[-1], head, dot_into, weighted=True)
    finally:
        perturb(head, -1.0)
    for b in reversed(range(w.n_blocks)):
        us = a.by_block.get(b, [])
        with w.on_device(b) as block:
            perturb(us, 1.0)
            try:
                g = a.block_backward(block, us, inputs[b], g, b > 0, dot_into)
            finally:
                perturb(us, -1.0)
        inputs[b + 1] = None
    a.add_cost("forward", 2)
    a.add_cost("backward", 1)
    return dots


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
