"""Shared plumbing of the formats: weight checks, the (rows, n_groups, g) group view, float16
scale storage, and the MSE clip-ratio search.

Granularity is one int, `group_size`: g > 0 is groups of g consecutive input elements
(cols) per row, PER_CHANNEL (0) is one group per row, PER_TENSOR (-1) is one group for the
whole weight. A partial last group (cols % g != 0) is zero-padded in the group view: zeros
change no group statistic here (symmetric amax ignores them and asymmetric ranges always
include 0) and quantize to exactly 0, so they add no error; they are never stored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixq.errors import DataError, FormatError
from mixq.formats.base import QTensor

PER_CHANNEL = 0
PER_TENSOR = -1

# float16 scale storage: scales are clamped to [2**-14, 65504] before rounding. 2**-14 is the
# smallest *normal* float16; using it as the floor keeps the relative rounding error of every
# stored scale <= 2**-11, which is what makes symmetric quantization exactly idempotent (and
# turns an all-zero group's scale 0 into this constant). A group whose ideal scale is below it
# (int8: amax < 127 * 2**-14 ~ 7.8e-3) is quantized with step 2**-14, error <= 3.1e-5.
FP16_SCALE_MIN = 2.0**-14
FP16_MAX = 65504.0

# MSE clip search: the group's range is shrunk by each ratio and the ratio with the least
# squared error per group wins; 1.0 comes first and wins ties, so the search is never worse
# than plain min-max (per group, in squared error).
CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0..0.5


def granularity_str(group_size: int) -> str:
    """'g<N>', 'ch' or 't'."""
    return {PER_CHANNEL: "ch", PER_TENSOR: "t"}.get(group_size, f"g{group_size}")


def check_weight(w: torch.Tensor) -> None:
    """Raise FormatError for a non-2-D, non-float or empty weight, DataError for NaN/inf."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise FormatError(f"expected a 2-D weight (rows, cols), got {shape}")
    if not w.is_floating_point():
        raise FormatError(f"expected a floating-point weight, got {w.dtype}")
    if w.numel() == 0:
        raise FormatError(f"cannot quantize an empty weight of shape {tuple(w.shape)}")
    if not all_finite(w):  # NaN propagates, inf shows: one pass, no allocation
        n_bad = int((~torch.isfinite(w)).sum())
        raise DataError(f"weight contains NaN/inf ({n_bad} of {w.numel()} values)")


def all_finite(w: torch.Tensor) -> bool:
    """Whether every value of w is finite, in one reduction pass without a full-size mask
    (the extremes of a tensor holding NaN or inf are not finite)."""
    if w.numel() == 0:
        return True
    lo, hi = torch.aminmax(w.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def group_len(group_size: int, cols: int) -> int:
    """Elements per group along cols (the padded length for a partial last group)."""
    return group_size if group_size > 0 else cols


def scales_shape(group_size: int, shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, ceil(cols/g)) for groups, (rows, 1) per channel, (1, 1) per tensor."""
    rows, cols = shape
    if group_size == PER_TENSOR:
        return (1, 1)
    if group_size == PER_CHANNEL:
        return (rows, 1)
    return (rows, -(-cols // group_size))


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, cols) -> (rows', n_groups, g), zero-padding a partial last group."""
    rows, cols = w.shape
    if group_size == PER_TENSOR:
        return w.reshape(1, 1, rows * cols)
    if group_size == PER_CHANNEL:
        return w.unsqueeze(1)
    n_groups = -(-cols // group_size)
    pad = n_groups * group_size - cols
    if pad:
        w = torch.cat([w, w.new_zeros(rows, pad)], dim=1)  # (rows, n_groups * g)
    return w.reshape(rows, n_groups, group_size)


def from_groups(x: torch.Tensor, shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """Inverse of `to_groups`: (rows', n_groups, g) -> (rows, cols), dropping padding."""
    rows, cols = shape
    if group_size <= 0:
        return x.reshape(rows, cols)
    return x.reshape(rows, -1)[:, :cols].contiguous()


def div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b, correctly rounded on every device. (CUDA turns division by a Python number into
    multiplication by its rounded reciprocal, which can differ from CPU in the last bit and so
    flip a float16 scale; dividing by a same-device tensor is an IEEE division everywhere.)"""
    return a / torch.tensor(b, dtype=a.dtype, device=a.device)


def fp16_scale(s: torch.Tensor, *, round_up: bool = False) -> torch.Tensor:
    """float32 scales rounded to float16 (nearest, or up), kept as float32 for compute."""
    s = s.clamp(FP16_SCALE_MIN, FP16_MAX)
    h = s.to(torch.float16)
    if round_up:
        # Positive finite float16: the next larger value is the bit pattern + 1.
        bumped = (h.view(torch.int16) + 1).view(torch.float16)
        h = torch.where(h.float() < s, bumped, h)
    return h.float()


def best_clip_ratio(x: torch.Tensor, values_at: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(R, G) float32 clip ratio per group: the CLIP_RATIOS entry whose quantized values
    `values_at(ratio)` (R, G, g) have the least squared error against x (R, G, g); the first
    (1.0) wins ties. Callers then quantize once more with this ratio tensor: a ratio enters
    the math as the same float32 number either way, so the result is the searched one."""
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32, device=x.device)
    best_err = (values_at(ratios[0]) - x).square().sum(-1)  # (R, G)
    best_idx = torch.zeros(best_err.shape, dtype=torch.long, device=x.device)
    for i in range(1, len(CLIP_RATIOS)):
        err = (values_at(ratios[i]) - x).square().sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_idx = torch.where(better, i, best_idx)
    return ratios[best_idx]


def check_qtensor(q, fmt) -> None:
    """Raise FormatError when a QTensor was not made by `fmt`."""
    if q.fmt != str(fmt):
        raise FormatError(f"QTensor of format {q.fmt!r} given to format {str(fmt)!r}")


class GroupCodec:
    """The Format methods shared by the per-group formats (INT-k, scaled FP, NF4): a format
    with `group_size`, `mse` and an `_encode(x (R, G, g), ratio, with_codes)` returning
    (codes | None, values, scale (R, G)[, zero (R, G)]) gets its clip ratio, fake
    quantization and quantization from here."""

    def supports(self, shape: tuple[int, int]) -> str | None:
        """Every 2-D shape (a partial last group or block is zero-padded)."""
        return None

    def _ratio(self, x: torch.Tensor) -> float | torch.Tensor:
        """The clip ratio of each group of x (R, G, g): 1 unless the format has `:mse`, then
        the MSE-optimal ratio per group."""
        if not self.mse:
            return 1.0
        return best_clip_ratio(x, lambda r: self._encode(x, r, with_codes=False)[1])

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize a 2-D weight."""
        check_weight(w)
        x = to_groups(w.float(), self.group_size)  # (R, G, g)
        values = self._encode(x, self._ratio(x), with_codes=False)[1]
        return from_groups(values, tuple(w.shape), self.group_size).to(w.dtype)

    def quantize(self, w: torch.Tensor) -> QTensor:
        """Codes, float16 scales (and zero points, for a format whose `_encode` gives them)."""
        check_weight(w)
        shape = tuple(w.shape)
        x = to_groups(w.float(), self.group_size)  # (R, G, g)
        codes, _, scale, *zero = self._encode(x, self._ratio(x))
        return QTensor(str(self), shape, from_groups(codes, shape, self.group_size), scale.to(torch.float16), *zero)
