"""`LinearGroup`: linear units that read the same input (q/k/v of an attention block, gate/up
of an MLP) run as one call.

    qkv = LinearGroup([attn.q_proj, attn.k_proj, attn.v_proj])
    q, k, v = qkv(x)

* One packed matmul over the units' weights concatenated along the output dimension when
  they are `QuantLinear`s of one layout (same format, group size and grid; equal levels and
  tensor scale) with one input transform; one `F.linear` when they are all `nn.Linear` of
  one dtype. The units' buffers are re-pointed to row slices of the concatenated tensors, so
  the model and the group share one copy of the weights.
* Otherwise the input transform is computed once when the units share it (smoothing scales
  and rotation equal) and each unit's packed matmul reads it; units with different
  transforms run on their own.
* Low-rank branches stay per unit and are added to the unit's slice of the output.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from mixq.errors import FormatError
from mixq.kernels import KernelWeights, qmatmul
from mixq.nn.qlinear import QuantLinear


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def same_transform(a: QuantLinear, b: QuantLinear) -> bool:
    """Whether two units apply the same online input transform (smoothing and rotation)."""
    return (_same_tensor(a.smooth_scales, b.smooth_scales) and a.rotate_block == b.rotate_block
            and _same_tensor(a.rotate_signs, b.rotate_signs))


def _fusable(units: Sequence[QuantLinear]) -> bool:
    first = units[0]
    key = dataclasses.replace(first.layout, fmt="", out_features=0)
    for u in units[1:]:
        if dataclasses.replace(u.layout, fmt="", out_features=0) != key or u.layout.fmt != first.layout.fmt:
            return False
        if not (_same_tensor(u.levels, first.levels) and _same_tensor(u.tensor_scale, first.tensor_scale)):
            return False
        if u.codes.device != first.codes.device or not same_transform(u, first):
            return False
    return True


class LinearGroup(nn.Module):
    """Units reading one input, run as one call (see the module docstring). forward(x)
    returns the units' outputs as a tuple, in order."""

    def __init__(self, units: Sequence[nn.Module]):
        super().__init__()
        if not units:
            raise FormatError("LinearGroup needs at least one unit")
        in_features = {u.in_features for u in units}
        if len(in_features) != 1:
            raise FormatError(f"LinearGroup units must read one input; their in_features are {sorted(in_features)}")
        self.units = nn.ModuleList(units)
        self.sizes = [u.out_features for u in units]
        self.mode = "separate"
        self.fused_kw: KernelWeights | None = None
        self.fused_bias: torch.Tensor | None = None
        self.fused_weight: torch.Tensor | None = None
        if all(isinstance(u, QuantLinear) for u in units):
            if _fusable(units):
                self._fuse_packed(units)
                self.mode = "fused"
            elif all(same_transform(u, units[0]) for u in units):
                self.mode = "shared_transform"
        elif all(type(u) is nn.Linear for u in units) and len({u.weight.dtype for u in units}) == 1 \
                and len({u.weight.device for u in units}) == 1:
            self._fuse_dense(units)
            self.mode = "fused_dense"

    def _fuse_packed(self, units: Sequence[QuantLinear]) -> None:
        codes = torch.cat([u.codes for u in units])
        scales = torch.cat([u.scales for u in units])
        zeros = None if units[0].zeros is None else torch.cat([u.zeros for u in units])
        bias = None
        if any(u.bias is not None for u in units):
            bias = torch.cat([u.bias if u.bias is not None else
                              torch.zeros(u.out_features, dtype=next(b.bias.dtype for b in units if b.bias is not None),
                                          device=u.codes.device) for u in units])
        layout = dataclasses.replace(units[0].layout, fmt=units[0].layout.fmt, out_features=int(codes.shape[0]))
        self.fused_kw = KernelWeights(layout, codes, scales, units[0].levels, zeros, units[0].tensor_scale)
        self.fused_bias = bias
        start = 0
        for u in units:  # the units keep working, on views of the fused storage
            stop = start + u.out_features
            u.codes, u.scales = codes[start:stop], scales[start:stop]
            if zeros is not None:
                u.zeros = zeros[start:stop]
            start = stop

    def _fuse_dense(self, units: Sequence[nn.Linear]) -> None:
        weight = torch.cat([u.weight.detach() for u in units])
        bias = None
        if any(u.bias is not None for u in units):
            bias = torch.cat([u.bias.detach() if u.bias is not None else
                              torch.zeros(u.out_features, dtype=weight.dtype, device=weight.device) for u in units])
        start = 0
        for u in units:
            stop = start + u.out_features
            u.weight = nn.Parameter(weight[start:stop], requires_grad=False)
            start = stop
        self.fused_weight, self.fused_bias = weight, bias

    def _lowrank(self, outs: list[torch.Tensor], h: torch.Tensor) -> list[torch.Tensor]:
        for i, u in enumerate(self.units):
            if getattr(u, "lowrank_l", None) is not None:
                low = nn.functional.linear(h, u.lowrank_r.to(h.dtype))
                outs[i] = outs[i] + nn.functional.linear(low, u.lowrank_l.to(h.dtype))
        return outs

    def shared_transform(self) -> tuple | None:
        """(smooth, signs, block) of the online input transform the group computes once for all
        its units (modes "fused" and "shared_transform"), so that the kernel producing the
        input can apply it (`decode_ops.add_rms_norm`) and the group is called with
        `transformed=True`; None when the units have no transform or run on their own."""
        u = self.units[0]
        if self.mode not in ("fused", "shared_transform") or (u.smooth_scales is None and u.rotate_signs is None):
            return None
        return u.smooth_scales, u.rotate_signs, u.rotate_block

    def _input(self, x: torch.Tensor, transformed: bool) -> torch.Tensor:
        """The units' transformed input: x itself when the caller applied `shared_transform`."""
        if not transformed:
            return self.units[0].transform_input(x)
        if self.shared_transform() is None:
            raise FormatError("LinearGroup: transformed=True needs a group whose units share one input transform "
                              f"(mode {self.mode!r}; see shared_transform)")
        return x

    def forward(self, x: torch.Tensor, *, transformed: bool = False) -> tuple[torch.Tensor, ...]:
        """transformed: x is already the units' shared transformed input (`shared_transform`)."""
        if self.mode in ("fused", "shared_transform") or transformed:
            h = self._input(x, transformed)  # (refuses transformed=True where the units share none)
        if self.mode == "fused":
            y = qmatmul(h, self.fused_kw, self.fused_bias)
            return tuple(self._lowrank(list(y.split(self.sizes, dim=-1)), h))
        if self.mode == "shared_transform":
            outs = [qmatmul(h, u.weights(), u.bias) for u in self.units]
            return tuple(self._lowrank(outs, h))
        if self.mode == "fused_dense":
            y = nn.functional.linear(x, self.fused_weight, self.fused_bias)
            return tuple(y.split(self.sizes, dim=-1))
        return tuple(u(x) for u in self.units)

    def silu_mul(self, x: torch.Tensor, *, transformed: bool = False) -> torch.Tensor | None:
        """silu(gate(x)) * up(x) for a (gate, up) group in one kernel launch (the fused packed
        int4 or 3-bit weight on the CUDA GEMV); None where that kernel does not apply (the caller runs
        the group and the element-wise step). transformed: as for forward."""
        from mixq.kernels import qmatmul_silu_mul, silu_mul_applies

        # decided on x (the input transform keeps its shape and dtype), so that a caller that
        # falls back does not transform the input twice
        if (self.mode != "fused" or len(self.units) != 2 or self.sizes[0] != self.sizes[1]
                or any(getattr(u, "lowrank_l", None) is not None for u in self.units)
                or not silu_mul_applies(self.fused_kw, x)):
            return None
        return qmatmul_silu_mul(self._input(x, transformed), self.fused_kw, self.fused_bias)
