"""Quantizable units: the weights a plan assigns formats to, named by their fully qualified
module name from `model.named_modules()`.

Most units are the `weight` of one Linear/Conv2d/Embedding module. Mixture-of-experts layers
whose experts are stored fused as one 3-D parameter `(n_experts, out, in)` give one unit per
expert, named `<parameter name>.<expert index>` (e.g. `model.layers.0.mlp.experts.down_proj.3`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Unit:
    """One quantizable weight.

    name:  fully qualified name (module name, or `<param>.<expert>` for fused experts).
    kind:  "linear", "conv2d", "embedding" or "expert".
    shape: the 2-D view formats see, (out, in): a Conv2d weight (out, in, kh, kw) is viewed
           as (out, in*kh*kw); an Embedding (vocab, dim) as (vocab, dim).
    param: fully qualified name of the parameter holding the weight.
    index: for fused experts, the expert index into the parameter's first dimension, else None.
    role:  projection type ("q_proj", "down_proj", "conv", "fc", "lm_head", "embed", ...);
           used for grouping in reports and tie rules.
    block: index of the transformer/residual block it belongs to, or -1 (stem, embeddings, head).
    tied_to: name of another unit sharing this unit's tensor (a tied lm_head), or None. A tied
           unit is never quantized on its own and its parameters are counted once.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    param: str
    role: str
    block: int = -1
    index: int | None = None
    tied_to: str | None = None
    transposed: bool = False  # stored as (in, out), e.g. GPT-2's Conv1D

    @property
    def n_params(self) -> int:
        return self.shape[0] * self.shape[1]


def _param(model: nn.Module, unit: Unit) -> nn.Parameter:
    return model.get_parameter(unit.param)


def get_weight(model: nn.Module, unit: Unit) -> torch.Tensor:
    """The unit's weight as a 2-D (out, in) view sharing storage with the model."""
    p = _param(model, unit)
    w = p[unit.index] if unit.index is not None else p
    if unit.transposed:
        return w.t()
    return w.reshape(w.shape[0], -1)


@torch.no_grad()
def set_weight(model: nn.Module, unit: Unit, w2d: torch.Tensor) -> None:
    """Copy a 2-D (out, in) tensor into the unit's weight, in place (dtype of the model kept)."""
    p = _param(model, unit)
    target = p[unit.index] if unit.index is not None else p
    if unit.transposed:
        w2d = w2d.t()
    target.copy_(w2d.reshape(target.shape).to(target.dtype))
