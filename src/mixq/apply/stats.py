"""Input statistics of the units being calibrated: the Hessian GPTQ and smoothing need.

A `StatsCollector` is a `models.capture.unit_inputs` consumer: it accumulates, per unit,
XᵀX (float32) and Σ|x| (float64) of the inputs the unit's weight multiplies. Units fed the
very same tensor (q/k/v, gate/up of one block) share one accumulator: their Hessians are
equal, so it is built once.
"""

from __future__ import annotations

import torch

from mixq.models.units import Unit


class UnitStats:
    """Running XᵀX (float32) and Σ|x| (float64) of one unit's inputs x (tokens, in)."""

    def __init__(self) -> None:
        self.xtx: torch.Tensor | None = None  # (in, in)
        self.abs_sum: torch.Tensor | None = None  # (in,)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])  # (tokens, in)
        if x.shape[0] == 0:
            return
        if self.xtx is None:
            self.xtx = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.abs_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        self.xtx.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2 XᵀX / n (in, in) float32."""
        return self.xtx * (2.0 / self.n_tokens)

    def absmean(self) -> torch.Tensor:
        """Mean |x| per input channel (in,) float32."""
        return (self.abs_sum / self.n_tokens).float()


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the very same tensor (units fed one input: q/k/v, gate/up)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class StatsCollector:
    """A `unit_inputs` consumer accumulating `UnitStats` per unit. Units fed the very same
    input tensor (q/k/v, gate/up) share one accumulator (their Hessians are equal)."""

    def __init__(self) -> None:
        self.stats: dict[str, UnitStats] = {}
        self.order: list[str] = []  # unit names in the order of their first input
        self._last: tuple[torch.Tensor, UnitStats] | None = None

    def __call__(self, unit: Unit, x: torch.Tensor) -> None:
        if unit.kind == "embedding":
            return
        if unit.name not in self.stats:
            self.order.append(unit.name)
        if self._last is not None:
            px, pacc = self._last
            if same_tensor(x, px) and self.stats.setdefault(unit.name, pacc) is pacc:
                return
        acc = self.stats.setdefault(unit.name, UnitStats())
        acc.add(x)
        self._last = (x, acc)

    def release(self) -> None:
        self._last = None

    def get(self, name: str) -> UnitStats | None:
        s = self.stats.get(name)
        return s if s is not None and s.n_tokens > 0 else None
