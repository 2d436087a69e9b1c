"""Recover INT-k codes and scales from a weight that already lies on an INT grid.

GPTQ rounds each group onto a grid fixed before the group is updated, so its output is
`(c - offset) * s` for a float16 step `s` per group, but the largest value of a group need
not sit on the step that `IntFormat.quantize` would choose for it: re-quantizing by the
format's own rule moves such groups. Here each group's step is found from the weight itself:
with d the group's largest magnitude, d = n * |s| for an integer n in 1..2**k, so s is one of
+-d / n (symmetric steps carry a sign); the largest candidate that is an exact float16 value (>= 2**-14, the scale floor) and
puts every element of the group on an in-range integer code is taken. The result is checked
bit for bit by the caller. The arithmetic is exact: s has 11 significant bits and |n| <= 255,
so n * s and d / n are exact in float32.
"""

from __future__ import annotations

import torch

from mixq.formats import IntFormat, QTensor
from mixq.formats.grouping import FP16_SCALE_MIN, from_groups, to_groups


@torch.no_grad()
def int_qtensor_on_grid(fmt: IntFormat, w: torch.Tensor, start: QTensor) -> QTensor:
    """`start` (fmt.quantize(w)) with every group that does not reproduce `w` re-derived from
    `w`'s own grid where one exists (groups without one are left as they were)."""
    k = fmt.code_bits
    top = 2**k - 1
    x = to_groups(w.float(), fmt.group_size)  # (R, G, g)
    scale = start.scales.float().clone()  # (R, G)
    zero = None if start.zeros is None else start.zeros.float().clone()
    codes = to_groups(start.codes, fmt.group_size).float()  # (R, G, g)
    offset = zero.unsqueeze(-1) if fmt.asym else 2 ** (k - 1)
    bad = ((codes - offset) * scale.unsqueeze(-1) != x).any(-1)  # (R, G)
    if not bool(bad.any()):
        return start
    d = x.abs().amax(-1)  # (R, G)
    todo = bad & (d > 0)
    n_max = top if fmt.asym else 2 ** (k - 1)
    # Symmetric INT steps carry a sign (the extreme sits on level -2**(k-1)): try both.
    candidates = [(n, sign) for n in range(1, n_max + 1) for sign in ((1,) if fmt.asym else (1, -1))]
    for n, sign in candidates:
        if not bool(todo.any()):
            break
        s = sign * d / n  # (R, G)
        ok = todo & (s.half().float() == s) & (s.abs() >= FP16_SCALE_MIN)
        s3 = torch.where(ok, s, torch.ones_like(s)).unsqueeze(-1)
        q = torch.round(x / s3)  # (R, G, g)
        ok &= (q * s3 == x).all(-1)
        if fmt.asym:
            z = torch.clamp(-q.amin(-1), 0, top)  # (R, G)
            ok &= (q.amax(-1) + z <= top)
            c = q + z.unsqueeze(-1)
        else:
            ok &= (q.amin(-1) >= -(2 ** (k - 1))) & (q.amax(-1) <= 2 ** (k - 1) - 1)
            c = q + 2 ** (k - 1)
        if not bool(ok.any()):
            continue
        scale = torch.where(ok, s, scale)
        codes = torch.where(ok.unsqueeze(-1), c, codes)
        if fmt.asym:
            zero = torch.where(ok, z, zero)
        todo &= ~ok
    shape = tuple(start.shape)
    return QTensor(start.fmt, shape, from_groups(codes.to(torch.uint8), shape, fmt.group_size),
                   scale.to(torch.float16), None if zero is None else zero.to(torch.uint8))
