"""Randomized Hadamard rotation of a unit's input dimension (QuaRot / QuIP# style).

An orthogonal Q (in, in) mixes the input channels so that a few outlier channels are spread
over many, which makes the weight (and the activations) easier to quantize. Rotating the
unit's input online, x -> x Q (a fast Walsh–Hadamard transform at run time), and storing
the quantized rotated weight Q(W Q) computes

    (x Q) Q(W Q)ᵀ  ≈  (x Q)(W Q)ᵀ = x Q Qᵀ Wᵀ = x Wᵀ,

so the exact fake-quant equivalent in the unrotated basis is ŵ = Q(W Q) Qᵀ, which is what
`rotate_quantize` returns. With GPTQ the Hessian rotates too: the rotated unit's inputs are
X Q, so its Hessian is Qᵀ H Q.

Q = D · blockdiag(H_b, ..., H_b): D a diagonal of random signs (seeded), H_b the Sylvester
Hadamard matrix of size b normalised by 1/sqrt(b), where b is the largest power of two
dividing `in` (576 -> 64, 1536 -> 512, 4096 -> 4096). Q depends only on (`in`, seed), so
units sharing an input (q/k/v, gate/up) share one online rotation. An odd `in` has no
Hadamard block larger than 1: `rotation` raises FormatError (a rotation of size 1 is the
identity and would silently do nothing; the caller names the unit in the error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from mixq.errors import FormatError


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform along the last dim (a power of two n):
    x @ H_n / sqrt(n) with H_n the Sylvester matrix (H_{2m} = [[H_m, H_m], [H_m, -H_m]]).
    O(n log n); H_n is symmetric, so this is also x @ H_nᵀ / sqrt(n)."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise FormatError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)  # butterflies of stride h
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n)).to(x.dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense orthonormal Sylvester Hadamard matrix (n, n), n a power of two."""
    if n < 1 or n & (n - 1):
        raise FormatError(f"Hadamard matrices here have power-of-two sizes, got {n}")
    m = torch.ones(1, 1, dtype=torch.float64)
    while m.shape[0] < n:
        m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
    return (m / math.sqrt(n)).to(dtype)


def hadamard_factors(n: int, max_factor: int = 128) -> list[int]:
    """Sizes (powers of two, each <= max_factor, the larger ones first) whose Sylvester
    Hadamard matrices' Kronecker product is H_n: H_{ab} = H_a ⊗ H_b for Sylvester matrices,
    e.g. 512 -> [128, 4], 4096 -> [64, 64]."""
    if n < 1 or n & (n - 1):
        raise FormatError(f"Hadamard matrices here have power-of-two sizes, got {n}")
    k, step = n.bit_length() - 1, max_factor.bit_length() - 1
    n_factors = max(1, -(-k // step))
    sizes = [k // n_factors + (1 if i < k % n_factors else 0) for i in range(n_factors)]
    return [1 << e for e in sizes]


def fwht_kron(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x @ (F_1 ⊗ F_2 ⊗ ...) along the last dim (of size prod(sizes)) for square factors:
    with the orthonormal Hadamard matrices of `hadamard_factors(n)`, the transform `fwht`
    computes, as one small matmul per factor instead of log2(n) butterfly passes (far fewer
    kernel launches on a GPU; equal to `fwht` to float rounding). No (n, n) matrix is built.

    The input viewed as (rows, s_1, ..., s_k): F_k multiplies the last axis, which then moves
    to the front; after k steps every axis was multiplied once and the order is restored."""
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    y = x.reshape(rows, n)
    for f in reversed(factors):
        size = f.shape[0]
        y = (y.reshape(-1, size) @ f).reshape(rows, n // size, size)
        y = y.transpose(1, 2).reshape(rows, n)
    return y.reshape(x.shape)


def hadamard_block(cols: int) -> int:
    """Largest power of two dividing cols."""
    if cols < 1:
        raise FormatError(f"cannot rotate an input dimension of size {cols}")
    return cols & -cols


def _compute(x: torch.Tensor) -> torch.Tensor:
    """x in float64 if it is float64, else float32 (the compute dtype of the transforms)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class Rotation:
    """Q = diag(signs) · blockdiag(H_b, ...): `signs` (in,) of ±1, `block` = b."""

    signs: torch.Tensor  # (in,) float32
    block: int

    @property
    def size(self) -> int:
        return int(self.signs.shape[0])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x Q for x (..., in): the online transform (sign flip, then blockwise FWHT)."""
        y = _compute(x)
        y = y * self.signs.to(device=y.device, dtype=y.dtype)
        y = fwht(y.reshape(*x.shape[:-1], self.size // self.block, self.block))
        return y.reshape(x.shape).to(x.dtype)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        """x Qᵀ for x (..., in): blockwise FWHT, then sign flip (H_b is symmetric)."""
        y = fwht(_compute(x).reshape(*x.shape[:-1], self.size // self.block, self.block))
        return (y.reshape(x.shape) * self.signs.to(device=y.device, dtype=y.dtype)).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """The dense Q (in, in), for tests and small inputs."""
        return self.apply(torch.eye(self.size, device=self.signs.device))

    def rotate_hessian(self, H: torch.Tensor) -> torch.Tensor:
        """Qᵀ H Q for a symmetric H (in, in)."""
        HQ = self.apply(H.float())  # rows of H times Q: H Q
        return self.apply(HQ.t().contiguous()).t()  # (Qᵀ (H Q)) = ((H Q)ᵀ Q)ᵀ


def rotation(cols: int, seed: int = 0) -> Rotation:
    """The seeded random-sign block Hadamard rotation of an input dim `cols` (see module
    docstring). Raises FormatError when cols is odd (no block larger than 1)."""
    b = hadamard_block(cols)
    if b == 1:
        raise FormatError(
            f"cannot rotate an input dimension of {cols}: it is odd, so no Hadamard block of size "
            "> 1 divides it (the rotation would be the identity); quantize this unit without +rotate"
        )
    gen = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (cols,), generator=gen).float() * 2 - 1
    return Rotation(signs, b)


def rotate_quantize(w: torch.Tensor, fmt, seed: int = 0, quantize: Callable | None = None,
                    H: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Q(W Q) Qᵀ: the exact fake-quant equivalent of rotating the unit's input online
    (x -> x Q) and storing the quantized rotated weight, since (x Q)(W Q)ᵀ = x Q Qᵀ Wᵀ = x Wᵀ.

    `quantize(w_rot, fmt, H_rot)` quantizes the rotated weight (default round-to-nearest,
    `fmt.fake_quant`); `H` (in, in), if given, is rotated to Qᵀ H Q for it (GPTQ needs it).
    Returns (w_hat (out, in) float32, {"rotate_block": b, "seed": seed})."""
    from mixq import formats

    fmt = formats.parse(fmt)
    rot = rotation(w.shape[1], seed)
    w_rot = rot.apply(w.float())  # (out, in): rows of W times Q
    h_rot = rot.rotate_hessian(H) if H is not None else None
    if quantize is None:
        q_rot = fmt.fake_quant(w_rot)
    else:
        q_rot = quantize(w_rot, fmt, h_rot)
    return rot.apply_t(q_rot.float()), {"rotate_block": rot.block, "seed": int(seed)}
