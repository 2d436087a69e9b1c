"""AWQ-style smoothing: per-input-channel scales that move quantization difficulty from the
weight columns that matter to those that don't.

With s > 0 per input channel, W' = W diag(s) and x' = x diag(1/s) give x' W'ᵀ = x Wᵀ; the
division by s folds into the preceding RMSNorm/LayerNorm weight or linear layer (units that
share one input must then share s), or runs online as one elementwise multiply. Quantizing
W' instead of W gives the fake-quant weight Q(W diag(s)) diag(1/s).

Scales follow AWQ (Lin et al., 2024): s = a^α for a the per-channel mean |x| of the
calibration inputs, normalised by sqrt(max(s) min(s)), with α searched on the grid
0, 1/grid, ..., (grid-1)/grid. The winner minimises the output error on the calibration
inputs, tr(ΔW Σ ΔWᵀ) with ΔW = Ŵ - W and Σ the inputs' Gram matrix (any positive multiple,
e.g. the GPTQ Hessian 2XᵀX/n). α = 0 is s = 1, plain quantization, and comes first, so
smoothing never does worse than no smoothing (on the calibration inputs) and picks α = 0
when it cannot help.
"""

from __future__ import annotations

from typing import Callable

import torch

from mixq import formats
from mixq.errors import DataError

# Channels whose mean |x| is below this fraction of the largest are treated as this small,
# so that a^α stays finite and the rescaled weight keeps a sane range.
MIN_REL_ACT = 1e-5


def output_error(dw: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(ΔW Σ ΔWᵀ) for ΔW (out, in) and Σ (in, in)."""
    return float(((dw.double() @ gram.double()) * dw.double()).sum())


def smooth_scales(act_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = a^α / sqrt(max min) of a = act_absmean (in,), floored at MIN_REL_ACT * max(a)."""
    a = act_absmean.detach().double()
    if a.dim() != 1 or not torch.isfinite(a).all() or (a < 0).any():
        raise DataError("act_absmean must be a finite non-negative vector (in,)")
    top = float(a.max())
    if top <= 0:
        return torch.ones_like(a, dtype=torch.float32)
    s = a.clamp(min=top * MIN_REL_ACT) ** alpha
    s = s / torch.sqrt(s.max() * s.min())
    return s.float()


def smooth_quantize(w: torch.Tensor, fmt, act_absmean: torch.Tensor, gram: torch.Tensor, grid: int = 20,
                    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Search α on the grid and return (Q(W diag(s)) diag(1/s) (out, in) float32,
    {"alpha": α, "error": tr(ΔW Σ ΔWᵀ), "error_alpha0": the same at α = 0}).

    `quantize(w_scaled)` is the quantizer used for the search (default `fmt.fake_quant`;
    `quantize_unit` passes rotate-then-RTN when the option also rotates)."""
    fmt = formats.parse(fmt)
    cols = w.shape[1]
    if act_absmean.shape != (cols,):
        raise DataError(f"act_absmean must have shape ({cols},), got {tuple(act_absmean.shape)}")
    if tuple(gram.shape) != (cols, cols):
        raise DataError(f"gram must be ({cols}, {cols}), got {tuple(gram.shape)}")
    if grid < 1:
        raise DataError(f"grid must be positive, got {grid}")
    q = quantize or fmt.fake_quant
    W = w.detach().float()
    best = None
    err0 = None
    for k in range(grid):
        alpha = k / grid
        s = smooth_scales(act_absmean, alpha)  # (in,)
        w_hat = q(W * s) / s
        err = output_error(w_hat - W, gram)
        if err0 is None:
            err0 = err
        if best is None or err < best[0]:
            best = (err, alpha, w_hat)
    err, alpha, w_hat = best
    return w_hat, {"alpha": alpha, "error": err, "error_alpha0": err0}
