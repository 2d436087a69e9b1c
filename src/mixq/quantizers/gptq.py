"""GPTQ (Frantar et al., 2023): quantize a weight column by column, spreading each column's
rounding error onto the columns not yet quantized so that the layer's output error on the
calibration inputs, tr(ΔW H ΔWᵀ) with H = 2 XᵀX / n, stays small.

With U the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U), quantizing column j to q_j and
updating the remaining columns by

    w_{j+1:} -= (w_j - q_j) / U_jj * U_{j, j+1:}

is the optimal (OBS) compensation given the columns before j are fixed. Columns are
processed in blocks of `block_size`: inside a block updates are immediate, the rest of the
weight receives the block's errors in one matrix product ("lazy batch" updates).

Group parameters (scales, zero points, MX exponents, NVFP4 block scales):
- group formats, `act_order=False`: a group's parameters are computed from the *current*
  (error-updated) weights of its columns when the quantizer reaches the group's first
  column. Blocks are aligned to whole groups (the effective block size is the largest
  multiple of g not above `block_size`, or g itself when g > block_size), so those columns
  hold every update made so far.
- group formats, `act_order=True` (columns in decreasing order of H_ii): "static groups",
  each group's parameters computed from the original W (after dead-input zeroing) before
  reordering, since a group's columns are then no longer quantized together.
- per-channel and per-tensor formats: parameters from the whole W up front (NVFP4's
  float32 tensor scale likewise).
`:mse` formats run their clip-ratio search wherever parameters are computed. GGUF formats
fix a whole block (32 columns, or a k-quant super-block of 256) at once, and every column is
rounded with the (step, offset) of its sub-block; their parameter search weighs each input's
squared error by diag(H) (the importance an llama.cpp imatrix holds).

The result is a `QTensor`: the codes GPTQ rounded to with the parameters they were rounded
with (`formats.fixed.qtensor_from`). Re-deriving codes from the dequantized weight would not
do: `fmt.quantize` picks scales from the values, which need not reproduce GPTQ's (a
symmetric INT group whose extreme lands on the extra negative level gets a larger scale).
With H = identity there is no error to spread and GPTQ equals RTN exactly.

On a CUDA device, for INT formats with parameters fixed up front (activation order, or per
channel / per tensor), the column loop runs as one fused Triton kernel per block of columns
(`mixq.kernels.triton_gptq`), the same rounding in the same order.

Damping: `damp * mean(diag(H))` is added to the diagonal; if a Cholesky factorisation
fails (H not positive definite), the relative damping is multiplied by 10 and retried up to
`MAX_DAMP`; the damping used is recorded. Dead inputs (H_ii = 0: an input channel that is
zero on every calibration token) get H_ii = 1 and their weights set to 0, as in the
reference implementation (IST-DASLab/gptq); their count is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mixq.formats.grouping import all_finite
from mixq import formats
from mixq.errors import DataError, MixqError
from mixq.formats.base import QTensor
from mixq.formats.fixed import GroupParams, encode_columns, group_params, param_group_size, qtensor_from
from mixq.formats.plain import PlainFormat

MAX_DAMP = 100.0  # largest relative damping tried before giving up (×10 steps from `damp`)


@dataclass
class GPTQInfo:
    """What one GPTQ run did; `to_dict()` is JSON-serialisable."""

    damp: float  # relative damping used (multiple of mean(diag(H)))
    damp_abs: float  # the absolute value added to diag(H)
    damp_retries: int  # how many times the damping was raised ×10
    n_dead: int  # inputs with H_ii = 0
    block_size: int  # effective block size
    act_order: bool
    loss: float  # sum over columns of (w - q)² / U_jj², GPTQ's own error estimate (/2)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"damp": self.damp, "damp_abs": self.damp_abs, "damp_retries": self.damp_retries,
                "n_dead": self.n_dead, "block_size": self.block_size, "act_order": self.act_order,
                "gptq_loss": self.loss}


def check_hessian(H: torch.Tensor, cols: int) -> None:
    """Raise DataError unless H is a finite (cols, cols) matrix."""
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or tuple(H.shape) != (cols, cols):
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise DataError(f"Hessian must be ({cols}, {cols}) for a weight with {cols} input columns, got {shape}")
    if not torch.isfinite(H).all():
        raise DataError("Hessian contains NaN/inf values")


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, float, int]:
    """(U, relative damping, absolute damping, retries): U upper triangular with
    Uᵀ U = (H + λI)⁻¹, λ = damp * mean(diag(H)), raising damp ×10 while a factorisation
    fails. H must already have no zero diagonal entries. Raises MixqError past MAX_DAMP."""
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    rel, retries = float(damp), 0
    while True:
        lam = rel * mean_diag
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, rel, lam, retries
        if rel * 10 > MAX_DAMP * (1 + 1e-9):
            raise MixqError(
                f"GPTQ: Hessian not positive definite even with damping {rel:g} x mean(diag(H)) "
                f"(mean diag {mean_diag:.3g}); its inputs may be degenerate"
            )
        rel *= 10
        retries += 1


def _block_len(block_size: int, group: int, grouped: bool) -> int:
    if not grouped:
        return block_size
    return (block_size // group) * group if group <= block_size else group


@torch.no_grad()
def gptq(w: torch.Tensor, H: torch.Tensor, fmt, *, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False) -> tuple[QTensor, GPTQInfo]:
    """GPTQ-quantize w (out, in) against the input Hessian H (in, in) (e.g. 2XᵀX/n) in format
    `fmt` (a Format or spec). Returns (QTensor, GPTQInfo): the codes GPTQ chose with the
    scales (zero points, tensor scale) they were rounded with, so that `fmt.dequantize` of
    the result is GPTQ's output bit for bit. See the module docstring for group parameters,
    damping and dead inputs. The arithmetic runs in float32 on w's device."""
    fmt = formats.parse(fmt)
    if w.dim() != 2:
        raise DataError(f"GPTQ needs a 2-D weight (out, in), got {tuple(w.shape)}")
    rows, cols = w.shape
    check_hessian(H, cols)
    if not all_finite(w):
        raise DataError("weight contains NaN/inf values")
    if block_size < 1:
        raise DataError(f"block_size must be positive, got {block_size}")
    W = w.detach().float().clone()  # (out, in)
    H = H.detach().to(W.device, torch.float32).clone()  # (in, in)
    dead = torch.diagonal(H) == 0
    n_dead = int(dead.sum())
    if n_dead:
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

    plain = isinstance(fmt, PlainFormat)
    g = fmt.group_size_for(cols)
    sub = cols if plain else param_group_size(fmt, cols)  # columns sharing one (step, zero)
    grouped = not plain and g < cols  # per-channel/per-tensor: g == cols
    nvfp4_ts = fmt.tensor_scale_of(W) if isinstance(fmt, formats.NVFP4Format) else None
    importance = torch.diagonal(H).clone()  # (in,) weights of the parameter search (GGUF)
    # Up-front parameters: the whole W (per channel / tensor), or static groups (act order).
    up_front = None if plain or (grouped and not act_order) else group_params(
        fmt, W, tensor_scale=nvfp4_ts, importance=importance)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    # group of every column, in processing order (static parameters only)
    col_group = None
    if up_front is not None:
        orig = perm if perm is not None else torch.arange(cols, device=W.device)
        col_group = orig // sub if sub < cols else torch.zeros(cols, dtype=torch.long, device=W.device)

    U, rel, lam, retries = inverse_cholesky(H, damp)
    del H
    B = _block_len(block_size, g, grouped and not act_order)
    fused = _fused_kernel(fmt, W)
    if fused is not None and up_front is None and grouped and g <= 128:
        # groups whose parameters come from the updated weights: one launch per group
        Q, C, loss, steps, zeros = fused.gptq_dynamic(W, U, fmt)
        params = GroupParams(steps, zeros, steps.to(torch.float16))
    elif fused is not None and up_front is not None:
        step_cols, zero_cols = up_front.columns(col_group)
        if step_cols.shape[0] == 1:  # per-tensor: one step for every row
            step_cols = step_cols.expand(rows, -1)
            zero_cols = None if zero_cols is None else zero_cols.expand(rows, -1)
        Q, C, loss = fused.gptq_static(W, U, step_cols.contiguous(),
                                             None if zero_cols is None else zero_cols.contiguous(),
                                             fmt.code_bits, fmt.asym, B)
        params = up_front
    else:
        Q, C, loss, params = _gptq_columns(W, U, fmt, B, g, sub, grouped, plain, up_front, col_group, nvfp4_ts,
                                           importance)

    if perm is not None:
        inv = torch.argsort(perm)
        Q, C = Q[:, inv], C[:, inv]
    warnings = []
    if n_dead:
        warnings.append(f"{n_dead} of {cols} inputs never active in calibration (H_ii = 0): their weights set to 0")
    if retries:
        warnings.append(f"Hessian not positive definite at damp {damp:g}: used {rel:g} x mean(diag(H))")
    info = GPTQInfo(damp=rel, damp_abs=lam, damp_retries=retries, n_dead=n_dead, block_size=B,
                    act_order=act_order, loss=float(loss.sum()), warnings=warnings)
    if not math.isfinite(info.loss):
        raise MixqError("GPTQ produced non-finite values (ill-conditioned Hessian?)")
    return qtensor_from(fmt, (rows, cols), C, params), info


def _fused_kernel(fmt, W: torch.Tensor):
    """The fused Triton GPTQ module when it applies to `fmt` on W's device, else None."""
    if not W.is_cuda:
        return None
    try:
        from mixq.kernels import triton_gptq
    except ImportError:
        return None
    return triton_gptq if triton_gptq.supported(fmt, W.device) else None


def _gptq_columns(W, U, fmt, B, g, sub, grouped, plain, up_front, col_group, nvfp4_ts, importance):
    """The column loop in torch: (values Q, codes C, loss per row, parameters) in processing
    order. W (out, in) is updated in place. A group's parameters are fixed for g columns, a
    column rounded with those of its sub-group of `sub` columns (sub == g but for GGUF)."""
    rows, cols = W.shape
    Q = torch.zeros_like(W)
    C = torch.zeros((rows, cols), dtype=fmt.dtype if plain else torch.uint8, device=W.device)
    dynamic = grouped and up_front is None
    dyn_params: list[GroupParams] = []
    loss = torch.zeros(rows, dtype=torch.float64, device=W.device)
    step = zero = p = None
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].clone()  # (out, b), updated in place
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i  # column in processing order
            if plain:
                step = zero = None
            elif dynamic:
                if j % g == 0:  # first column of a group: parameters from the updated weights
                    p = group_params(fmt, W1[:, i : i + g], tensor_scale=nvfp4_ts, importance=importance[j : j + g])
                    dyn_params.append(p)
                step, zero = p.column((j % g) // sub)
            else:
                k = int(col_group[j])
                step, zero = up_front.column(k)
            col = W1[:, i : i + 1]  # (out, 1)
            c, q = encode_columns(fmt, col, step, zero)  # (out, 1) codes and values
            Q[:, j : j + 1] = q
            C[:, j : j + 1] = c
            d = U1[i, i]
            err = (col - q) / d  # (out, 1)
            loss += (err[:, 0].double() ** 2) / 2
            W1[:, i:] -= err * U1[i : i + 1, i:]  # OBS update of this block's later columns
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of the columns after the block
    params = GroupParams.concat(dyn_params) if dynamic else up_front
    return Q, C, loss, params
