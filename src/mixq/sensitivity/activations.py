"""Unit input statistics and Gram matrices from one forward pass over the calibration set.

For every unit the inputs its weight multiplies are captured (`mixq.models.capture`): rows
of X (tokens, in); for a Conv2d the im2col columns (batch * positions, in * kh * kw); for a
fused expert only the tokens routed to it. From them:

- `stats` (recorded in every sensitivity table):
    n_tokens      rows of X seen (routed tokens for an expert; 0: the unit got none)
    max_abs       max |x| over all elements
    median_abs    median |x| over a deterministic subsample of the elements (up to
                  `_SAMPLE_PER_CALL` per forward call, taken with a stride co-prime to `in`
                  so every channel is represented)
    ratio         max_abs / median_abs: large for the "activation spikes" of LLaMA-style
                  models (a few huge values among small ones)
    kurtosis      Pearson kurtosis E[(x - mean)^4] / Var(x)^2 over all elements (3 for a
                  Gaussian), from float64 power sums
    channel_ratio max over channels of the per-channel max |x|, divided by the median over
                  channels of that per-channel max: large for outlier channels
    top_channel   the channel holding max_abs
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
        self.gram: torch.Tensor | None = None  # (in, in) float64, or (vocab,) counts

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
        a = x.abs()
        ch_max = a.amax(dim=0)  # (in,)
        self.channel_max = ch_max if self.channel_max is None else torch.maximum(self.channel_max, ch_max)
        m = float(ch_max.max())
        if m > self.max_abs or self.top_channel < 0:
            self.max_abs, self.top_channel = m, int(ch_max.argmax())
        xd = x.double().reshape(-1)
        x2 = xd * xd
        self.power_sums += torch.stack([torch.tensor(float(xd.numel()), dtype=torch.float64, device=xd.device),
                                        xd.sum(), x2.sum(), (x2 * xd).sum(), (x2 * x2).sum()]).cpu()
        flat = a.reshape(-1)
        self.samples.append(flat[:: _coprime_stride(flat.numel(), x.shape[1])].contiguous().cpu())
        if self.want_gram:
            g = (x.t() @ x).double()  # (in, in)
            self.gram = g if self.gram is None else self.gram + g

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
        median = float(torch.cat(self.samples).median())
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
    accs = {u.name: _Acc(u, want_gram) for u in ctx.units}
    batches = ctx.batches(batch_size)
    with torch.no_grad(), unit_inputs(ctx.model, ctx.units, lambda u, x: accs[u.name].add(x)):
        for b in track(batches, "activations", len(batches), ctx.progress):
            forward_logits(ctx.model, b.x)
    ctx.add_cost("forward", 1)
    n_norm = int(ctx.calib.numel()) if ctx.task == "lm" else int(ctx.calib[0].shape[0])
    stats = {name: a.stats() for name, a in accs.items()}
    grams = {name: a.gram for name, a in accs.items()}
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
        errs = {}
        for opt, dw in ctx.deltas(u):
            if g is None:
                errs[str(opt)] = 0.0
            elif u.kind == "embedding":
                errs[str(opt)] = float((dw.double().pow(2).sum(1) * g).sum()) / n_norm
            else:
                dwd = dw.double()  # (out, in)
                errs[str(opt)] = max(0.0, float(((dwd @ g) * dwd).sum()) / n_norm)
        errors[u.name] = errs
    return {"errors": errors, "info": {}, "stats": stats, "opts": {"batch_size": batch_size},
            "normalizer": n_norm}
