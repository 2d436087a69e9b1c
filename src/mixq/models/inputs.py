"""Hooks that replace what a unit's weight multiplies: input-activation quantization.

`input_hooks(model, units, fns)`: while active, each unit named in `fns` computes on
`fns[name](x)` instead of its input x (..., in). Forward pre-hooks registered *first* on the
module (`prepend=True`), so any other pre-hook on it (the statistics of
`capture.unit_inputs`) sees the replaced input, as the weight does. Units fed the very same
tensor (q/k/v, gate/up) whose functions are the same object share one output tensor: it is
computed once, and statistics that recognise a shared input still do. Linear units only
(GPT-2's Conv1D included): a Conv2d multiplies im2col columns, an embedding looks up ids and
a fused expert set routes its tokens inside one module; `check_hookable` refuses them,
naming the unit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from mixq.errors import FormatError
from mixq.models.capture import owner_module
from mixq.models.units import Unit

InputFn = Callable[[torch.Tensor], torch.Tensor]


def check_hookable(unit: Unit) -> None:
    """FormatError naming the unit unless its input can be quantized (a linear unit)."""
    if unit.kind != "linear":
        raise FormatError(f"unit {unit.name!r} ({unit.kind}): input-activation formats apply to linear units only "
                          "(a conv multiplies im2col columns, an embedding looks up ids, fused experts route "
                          "tokens inside one module)")


@contextmanager
def input_hooks(model: nn.Module, units: list[Unit], fns: dict[str, InputFn]) -> Iterator[None]:
    """Within the block, each unit in `fns` multiplies fns[name](x) (see the module docstring)."""
    handles = []
    last: list = [None, None, None]  # (input, fn, output) of the latest call

    def replaced(x: torch.Tensor, fn: InputFn) -> torch.Tensor:
        px, pfn, pout = last
        if pfn is fn and px is not None and (x is px or (x.data_ptr() == px.data_ptr() and x.shape == px.shape
                                                        and x.stride() == px.stride() and x.dtype == px.dtype)):
            return pout
        out = fn(x)
        last[:] = [x, fn, out]
        return out

    try:
        for u in units:
            fn = fns.get(u.name)
            if fn is None:
                continue
            check_hookable(u)

            def hook(mod, args, fn=fn):
                return (replaced(args[0], fn),) + tuple(args[1:])

            handles.append(owner_module(model, u).register_forward_pre_hook(hook, prepend=True))
        yield
    finally:
        last[:] = [None, None, None]
        for h in handles:
            h.remove()




@contextmanager
def output_grads(model: nn.Module, units: list[Unit],
                 consumer: Callable[[Unit, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """While active, a backward pass through a linear unit's output calls
    `consumer(unit, y, g)` with its output y (..., out), detached, and the gradient g of the
    loss with respect to it (same shape), once per forward call whose output takes part in
    the backward. Linear units only (`check_hookable`)."""
    handles = []
    try:
        for u in units:
            check_hookable(u)

            def hook(mod, args, out, u=u):
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    y = out.detach()
                    out.register_hook(lambda g, u=u, y=y: consumer(u, y, g.detach()))
                return None

            handles.append(owner_module(model, u).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


__all__ = ["InputFn", "check_hookable", "input_hooks", "output_grads"]
