"""Orthogonal Hadamard matrices of (almost) any order, for rotations folded into the weights.

A rotation folded offline (`models.fold`) is a dense (n, n) matrix applied once, so unlike the
online transform of `quantizers.hadamard` it needs no fast algorithm and need not be a power
of two: SmolLM2's hidden size is 576 = 2^6 * 9. A Hadamard matrix H (entries +-1, H Hᵀ = n I)
spreads every direction evenly over all n coordinates, which is what makes outlier channels
easy to quantize after rotating (QuaRot). Orders built here:

- Sylvester: 2^a (H_2m = [[H_m, H_m], [H_m, -H_m]]).
- Paley I: q + 1 for a prime q = 3 (mod 4), from the quadratic-residue character of GF(q).
- Paley II: 2 (q + 1) for a prime q = 1 (mod 4).
- Kronecker products: H_p ⊗ H_2^b for a Paley order p and n = p 2^b (576 = 36 x 16, Paley II
  with q = 17; 960 = 60 x 16; 896 = 28 x 32; 1536 = 12 x 128).

An order with none of these (n = 2^a m with no Paley order m 2^j dividing n) gets
H_2^a ⊗ R_m with R_m a seeded random orthogonal m x m matrix: still orthogonal, mixing less
evenly inside each m-block; the description says which was used.
"""

from __future__ import annotations

import math

import torch


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    return all(p % d for d in range(2, int(math.isqrt(p)) + 1))


def sylvester(n: int) -> torch.Tensor:
    """The +-1 Sylvester Hadamard matrix (n, n), n a power of two, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester matrices have power-of-two orders, got {n}")
    m = torch.ones(1, 1, dtype=torch.float64)
    while m.shape[0] < n:
        m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
    return m


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q), chi the quadratic character (0 at 0), (q, q)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[idx]


def paley(order: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of `order` by Paley's constructions, or None when neither
    applies (order - 1 a prime = 3 mod 4: type I; order / 2 - 1 a prime = 1 mod 4: type II)."""
    q = order - 1
    if q >= 3 and _is_prime(q) and q % 4 == 3:
        S = torch.zeros(order, order, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)  # skew conference matrix
        return torch.eye(order, dtype=torch.float64) + S
    if order % 2 == 0:
        q = order // 2 - 1
        if q >= 5 and _is_prime(q) and q % 4 == 1:
            C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)  # symmetric conference matrix
            a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> tuple[torch.Tensor | None, str]:
    """(+-1 Hadamard matrix (n, n) float64 or None, its construction): Sylvester for a power
    of two, else the smallest Paley order p with n / p a power of two, times Sylvester."""
    if n >= 1 and not n & (n - 1):
        return sylvester(n), f"sylvester({n})"
    two = n & -n
    for p in range(4, n + 1, 4):
        if n % p or (n // p) & (n // p - 1):
            continue
        h = paley(p)
        if h is not None:
            return torch.kron(h, sylvester(n // p)), f"paley({p}) x sylvester({n // p})"
    return None, f"no Hadamard construction for {n} = {two} x {n // two}"


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal (n, n) float64 matrix (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    qm, r = torch.linalg.qr(a)
    return (qm * torch.sign(torch.diagonal(r)).reshape(1, -1)).contiguous()


def random_hadamard(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(Q (n, n) float64 orthogonal, description): Q = D H / sqrt(n), D a seeded diagonal of
    random signs and H from `hadamard`; for an order `hadamard` cannot build, D (H_2^a ⊗ R_m)
    with R_m from `random_orthogonal` (see the module docstring)."""
    if n < 1:
        raise ValueError(f"cannot build a rotation of order {n}")
    h, how = hadamard(n)
    if h is None:
        two = n & -n
        h = torch.kron(sylvester(two) / math.sqrt(two), random_orthogonal(n // two, seed + 1))
        how = f"sylvester({two}) x random orthogonal({n // two})"
    else:
        h = h / math.sqrt(n)
    g = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs.view(-1, 1) * h, how
