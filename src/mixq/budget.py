"""Budgets over weights, activations and the KV cache, and what each choice costs in them.

A `Budget` is one or more limits, all enforced together by the planner
(`mixq.planner.make_plan_multi`, solved by `mixq.allocate.solve_multi`):

- `bits_per_weight`: average all-in bits per weight over the planned units (storage);
- `max_bytes` with `context`: the bytes of the planned units' weights plus the KV cache of
  `context` tokens (one sequence; every attention layer, at its chosen format, float layers
  at 16 bits): the memory of serving;
- `bits_per_mac`: bit operations (HAWQ-V3), Σ_units MACs x weight bits x activation bits,
  as an average per MAC (W4A4 = 16, W4A8 = 32, W8A8 = 64, W4A16 = 64); MACs are a unit's
  weights (per token), the bits the element widths the matmul reads (scales not counted,
  16 for a float operand);
- `kv_bits`: average all-in bits per cached key/value element at `context`.

Costs are exact integers: `unit_costs` for a unit's option, `kv_costs` for a layer's KV
format; `limits` turns the budget into integer caps over a set of units and layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixq.errors import MixqError
from mixq.formats.kvcache import KVFormat
from mixq.option import Option

RESOURCES = ("weight_bits", "bytes_bits", "bops", "kv_bits")


@dataclass(frozen=True)
class Budget:
    """Limits a plan must meet together (None: not constrained); see the module docstring."""

    bits_per_weight: float | None = None
    max_bytes: int | None = None
    context: int | None = None
    bits_per_mac: float | None = None
    kv_bits: float | None = None

    def __post_init__(self) -> None:
        for name in ("bits_per_weight", "bits_per_mac", "kv_bits"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise MixqError(f"budget {name} must be a positive number, got {v!r}")
        for name in ("max_bytes", "context"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise MixqError(f"budget {name} must be a positive integer, got {v!r}")
        if (self.max_bytes is not None or self.kv_bits is not None) and self.context is None:
            raise MixqError("a bytes or KV-bits budget counts the KV cache at a context length: give context "
                            "(--context 8192)")
        if all(getattr(self, n) is None for n in ("bits_per_weight", "max_bytes", "bits_per_mac", "kv_bits")):
            raise MixqError("give at least one budget: bits per weight, max bytes (with a context), bits per MAC "
                            "or KV bits")

    def to_dict(self) -> dict:
        return {"bits_per_weight": self.bits_per_weight, "max_bytes": self.max_bytes, "context": self.context,
                "bits_per_mac": self.bits_per_mac, "kv_bits": self.kv_bits}


def unit_costs(option: Option, shape: tuple[int, int]) -> dict[str, int]:
    """What an option costs on a unit of `shape` (out, in) in every resource."""
    bits = option.bits(shape)
    macs = shape[0] * shape[1]
    return {"weight_bits": bits, "bytes_bits": bits, "bops": macs * option.weight_compute_bits() * option.act_bits,
            "kv_bits": 0}


def kv_costs(fmt: KVFormat, context: int, n_kv_heads: int, head_dim: int) -> dict[str, int]:
    """What a KV format costs one layer at `context` tokens in every resource."""
    bits = fmt.bits_total(context, n_kv_heads, head_dim)
    return {"weight_bits": 0, "bytes_bits": bits, "bops": 0, "kv_bits": bits}


def limits(budget: Budget, n_params: int, n_kv_elements: int) -> dict[str, int]:
    """Integer caps per constrained resource: `n_params` weights of the planned units,
    `n_kv_elements` cached elements per token over all layers (keys and values)."""
    out = {}
    if budget.bits_per_weight is not None:
        out["weight_bits"] = math.floor(budget.bits_per_weight * n_params)
    if budget.max_bytes is not None:
        out["bytes_bits"] = 8 * budget.max_bytes
    if budget.bits_per_mac is not None:
        out["bops"] = math.floor(budget.bits_per_mac * n_params)
    if budget.kv_bits is not None:
        if n_kv_elements == 0:
            raise MixqError("a KV-bits budget needs KV candidates (mixq analyze --kv-candidates)")
        out["kv_bits"] = math.floor(budget.kv_bits * n_kv_elements * budget.context)
    return out


__all__ = ["Budget", "RESOURCES", "kv_costs", "limits", "unit_costs"]
