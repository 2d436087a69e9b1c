"""Unit input statistics and Gram matrices from one forward pass over the calibration set.

For every unit the inputs its weight multiplies are captured (`mixq.models.capture`): rows
of X (tokens, in); for a Conv2d the im2col columns (batch * positions, in * kh * kw); for a
fused expert only the tokens routed to it. From them:

- `stats` (recorded in every sensitivity table):
    n_tokens      rows of X seen (routed tokens for an expert; 0: the unit got none)
    max_abs       max |x| over all elements
    median_abs    median of the nonzero |x| (exact zeros, e.g. after a ReLU, are left out)
                  over a deterministic subsample of the elements (up to `_SAMPLE_PER_CALL`
                  per forward call, taken with a stride co-prime to `in` so every channel
                  is represented)
    ratio         max_abs / median_abs: large for the "activation spikes" of LLaMA-style
                  models (a few huge values among small ones)
    kurtosis      Pearson kurtosis E[(x - mean)^4] / Var(x)^2 over all elements (3 for a
                  Gaussian), from power sums (float32 per call, float64 across calls)
    channel_ratio max over channels of the per-channel max |x|, divided by the median over
                  channels of that per-channel max: large for outlier channels
    top_channel   the channel (column of X; for a Conv2d an (in, kh, kw) position) holding
                  max_abs
  Units fed the same tensor (q/k/v, gate/up of one block) share one set of statistics.
- the Gram matrix G = X^T X (in, in) (summed over rows), for the `output` method;
  an Embedding's "Gram" is the count of each token id.
"""

from __future__ import annotations

import math

import torch

from mixq.models.capture import forward_logits, unit_inputs
from mixq.models.units import Unit
from mixq.progress import track
from mixq.sensitivity.context import Context

_SAMPLE_PER_CALL = 16384


def _coprime_stride(numel: int, cols: int) -> int:
    k = max(1, numel // _SAMPLE_PER_CALL)
    while k > 1 and math.gcd(k, cols) != 1:
        k += 1
    return k


class _Acc:
    """Running input statistics (and optionally the Gram matrix) of one unit."""

    def __init__(self, unit: Unit, want_gram: bool) -> None:
        self.unit = unit
        self.want_gram = want_gram
        self.n_rows = 0
        self.max_abs = 0.0
        self.top_channel = -1
        self.power_sums = torch.zeros(5, dtype=torch.float64)  # count, sum x, x^2, x^3, x^4
        self.channel_max: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.gram: torch.Tensor | None = None  # (in, in) float32, or (vocab,) float64 counts

    def add(self, x: torch.Tensor) -> None:
        if self.unit.kind == "embedding":
            counts = torch.bincount(x.long(), minlength=self.unit.shape[0]).double()  # (vocab,)
            self.gram = counts if self.gram is None else self.gram + counts
            self.n_rows += x.numel()
            return
        x = x.float()  # (tokens, in)
        if x.shape[0] == 0:
            return
        self.n_rows += x.shape[0]
        ch_max = torch.linalg.vector_norm(x, ord=float("inf"), dim=0)  # (in,) max |x| per channel
        self.channel_max = ch_max if self.channel_max is None else torch.maximum(self.channel_max, ch_max)
        m = float(ch_max.max())
        if m > self.max_abs or self.top_channel < 0:
            self.max_abs, self.top_channel = m, int(ch_max.argmax())
        xf = x.reshape(-1)
        x2 = xf * xf
        # float32 sums, merged across calls in float64
        sums = torch.stack([xf.sum(), x2.sum(), torch.dot(x2, xf), torch.dot(x2, x2)]).double().cpu()
        self.power_sums[0] += xf.numel()
        self.power_sums[1:] += sums
        self.samples.append(xf[:: _coprime_stride(xf.numel(), x.shape[1])].abs().cpu())
        if self.want_gram:
            if self.gram is None:
                self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.gram.addmm_(x.t(), x)  # (in, in) += X^T X

    def stats(self) -> dict:
        if self.unit.kind == "embedding":
            return {"n_tokens": self.n_rows}
        if self.n_rows == 0:
            return {"n_tokens": 0}
        n, s1, s2, s3, s4 = (float(v) for v in self.power_sums)
        mean = s1 / n
        var = s2 / n - mean * mean
        m4 = s4 / n - 4 * mean * s3 / n + 6 * mean * mean * s2 / n - 3 * mean**4
        kurt = m4 / (var * var) if var > 0 else 0.0
        sample = torch.cat(self.samples)
        sample = sample[sample > 0]
        median = float(sample.median()) if sample.numel() else 0.0
        ch_median = float(self.channel_max.median())
        return {
            "n_tokens": self.n_rows,
            "max_abs": self.max_abs,
            "median_abs": median,
            "ratio": self.max_abs / median if median > 0 else 0.0,
            "kurtosis": kurt,
            "channel_ratio": self.max_abs / ch_median if ch_median > 0 else 0.0,
            "top_channel": self.top_channel,
        }


def capture(ctx: Context, want_gram: bool, batch_size: int = 1) -> tuple[dict[str, dict], dict[str, torch.Tensor | None], int]:
    """One float forward pass over the calibration set: (stats per unit, Gram per unit (None
    unless `want_gram`; None for a unit that got no input), normaliser N = calibration tokens
    (lm: n * L) or images)."""
    accs: dict[str, _Acc] = {}
    # Units fed the very same tensor (q/k/v, gate/up) share one accumulator: the previous
    # call's input is held, so a tensor with its storage, shape and strides is that tensor.
    last: list = [None, None]  # [input tensor, its accumulator]

    def consume(u: Unit, x: torch.Tensor) -> None:
        prev_x, prev_acc = last
        same = (prev_x is not None and u.kind != "embedding" and x.data_ptr() == prev_x.data_ptr()
                and x.shape == prev_x.shape and x.stride() == prev_x.stride() and x.dtype == prev_x.dtype)
        if same and (u.name not in accs or accs[u.name] is prev_acc):
            accs.setdefault(u.name, prev_acc)
            return
        acc = accs.setdefault(u.name, _Acc(u, want_gram))
        acc.add(x)
        last[0], last[1] = x, acc

    batches = ctx.batches(batch_size)
    with torch.no_grad(), unit_inputs(ctx.model, ctx.units, consume):
        for b in track(batches, "activations", len(batches), ctx.progress):
            forward_logits(ctx.model, b.x)
    ctx.add_cost("forward", 1)
    n_norm = int(ctx.calib.numel()) if ctx.task == "lm" else int(ctx.calib[0].shape[0])
    last[0] = last[1] = None
    empty = {u.name: _Acc(u, want_gram) for u in ctx.units if u.name not in accs}  # never called
    accs.update(empty)
    stats = {u.name: accs[u.name].stats() for u in ctx.units}
    grams = {u.name: accs[u.name].gram for u in ctx.units}
    return stats, grams, n_norm


def output_method(ctx: Context, batch_size: int = 1) -> dict:
    """Activation-weighted output error of each unit and option:

        error = (1/N) * sum over the unit's input rows x of ||ΔW x||^2 = tr(ΔW G ΔW^T) / N

    with G = X^T X the unit's input Gram matrix and N the number of calibration tokens
    (images for image models), the same N for every unit, so a fused expert's error counts
    only the tokens routed to it (an expert that receives none has error 0). For an
    Embedding the rows are one-hot token ids: error = sum_v count_v ||ΔW[v]||^2 / N.
    Cost: one forward pass plus an (out, in) x (in, in) product per unit and option.
    """
    stats, grams, n_norm = capture(ctx, want_gram=True, batch_size=batch_size)
    errors: dict[str, dict[str, float]] = {}
    for u in track(ctx.units, "output error", len(ctx.units), ctx.progress):
        g = grams[u.name]
        deltas = list(ctx.deltas(u))
        if g is None:
            errs = [0.0] * len(deltas)
        elif u.kind == "embedding":
            errs = [float((dw.double().pow(2).sum(1) * g).sum()) / n_norm for _, dw in deltas]
        else:
            dws = torch.stack([dw for _, dw in deltas])  # (n_options, out, in)
            # float32 product (float64 costs ~4x on CPU); sums taken in float64
            quad = ((dws @ g) * dws).double().sum(dim=(1, 2))  # (n_options,)
            errs = [max(0.0, float(q)) / n_norm for q in quad]
        errors[u.name] = {str(opt): e for (opt, _), e in zip(deltas, errs)}
    return {"errors": errors, "info": {}, "stats": stats, "opts": {"batch_size": batch_size},
            "normalizer": n_norm}
