"""SVDQuant-style low-rank branch: W = L R + E, with L R the rank-r part kept in 16 bits
and only the residual E quantized, so ŵ = L R + Q(E).

The rank-r truncated SVD U_r S_r V_rᵀ is split evenly, L = U_r sqrt(S_r) (out, r) and
R = sqrt(S_r) V_rᵀ (r, in), and both factors are rounded to the storage dtype (bf16 by
default) *before* the residual is formed, so E = W - L R is taken against the factors as
stored and ŵ is exactly what the stored model computes. Storage: 16 r (out + in) bits on
top of the residual's format (`Option.bits` counts them). At run time the branch is one
extra pair of thin matrix products, y = x Q(E)ᵀ + (x Rᵀ) Lᵀ.
"""

from __future__ import annotations

import torch

from mixq.errors import DataError

FACTOR_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def lowrank_split(w: torch.Tensor, rank: int, dtype: str = "bf16") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L (out, r), R (r, in), residual (out, in)): L and R are float32 tensors holding values
    exactly representable in `dtype` ('bf16' or 'fp16'); residual = W - L R in float32."""
    if dtype not in FACTOR_DTYPES:
        raise DataError(f"low-rank factor dtype must be one of {tuple(FACTOR_DTYPES)}, got {dtype!r}")
    out_dim, in_dim = w.shape
    if not 1 <= rank <= min(out_dim, in_dim):
        raise DataError(f"rank must be in 1..{min(out_dim, in_dim)} for a weight of shape {tuple(w.shape)}, got {rank}")
    W = w.detach().float()
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    root = S[:rank].sqrt()
    L = (U[:, :rank] * root).float().to(FACTOR_DTYPES[dtype]).float()  # (out, r)
    R = (root[:, None] * Vh[:rank]).float().to(FACTOR_DTYPES[dtype]).float()  # (r, in)
    return L, R, W - L @ R
