"""Fused GPTQ on the GPU: one Triton launch quantizes a whole block of columns.

GPTQ's inner loop (`mixq.quantizers.gptq`) is sequential over columns: column i is rounded,
its error err_i = (w_i - q_i) / U_ii is spread onto the later columns of its block, and only
then can column i + 1 be rounded. Written in torch that is ~15 small kernel launches per
column, so a large model's GPTQ is all launch overhead. Here one program owns a tile of
BLOCK_R rows and the whole block (b <= 128 columns, padded to BLOCK_B = next power of two)
of W1 in registers, and loops over the block's columns:

    for i in 0..b-1:
        q_i   = round_to_grid(W1[:, i], step[:, i], zero[:, i])
        err_i = (W1[:, i] - q_i) / U1[i, i]
        loss += err_i**2 / 2
        W1[:, j] -= err_i * U1[i, j]   for j > i        (OBS update inside the block)
        Q1[:, i] = q_i; codes[:, i]; Err1[:, i] = err_i

Rows are independent, so programs never talk to each other. Column i is read out of the
register tile with a masked row sum (a sum of one value and zeros, exact), and the update
is applied to the whole tile with the U row masked to j > i (an exact no-op elsewhere);
column i is then replaced by q_i, so at the end the tile holds Q1. The next column's step,
zero point and U row are loaded one iteration ahead.

Exactness: the rounding equals `formats.fixed.round_columns` for INT-k bit for bit:
y = x / step is an IEEE division (`div_rn`, as torch does; a multiply by the reciprocal
can differ in the last bit), round half to even (libdevice `rint` on CUDA; under the
Triton interpreter, which has no libdevice, the exact float trick (y + 1.5·2**23) - 1.5·2**23),
and kernels are compiled without FMA contraction, so `W - err * u` rounds the product and
the difference separately, as torch's `W1 -= err * U1` does. On the same inputs the result
then equals the torch column loop; only float summation order in the lazy batch update
(`torch.matmul` either way) can differ between devices.

`gptq_static` is the whole GPTQ sweep for fixed per-column parameters (static groups,
per-channel, per-tensor): it loops over blocks, calls the kernel and applies the lazy batch
update `W[:, i2:] -= Err1 @ U[i1:i2, i2:]` with torch. `gptq_dynamic` does the same for
grouped formats without act order, each group's parameters computed in torch from the
updated weights when the sweep reaches it (one group per block). Codes are recovered in
the kernel's epilogue from the values (exactly), so only Err1 and Q1 live in registers.
`gptq_static_reference` is the pure-torch column loop both are tested against.
"""

from __future__ import annotations

import torch

from mixq.errors import DataError, FormatError
from mixq.formats.intk import IntFormat

try:  # Triton is optional: without it `supported` says False and nothing else is usable
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

MAX_BLOCK = 128  # columns per launch: the register tile is (BLOCK_R, 128) float32


if triton is not None:
    # 1.5 * 2**23: for |y| <= 2**22, y + M lies in [2**23, 2**24) where float32 spacing is 1,
    # so the addition rounds y to an integer (half to even, the IEEE default) and the
    # subtraction is exact. Larger |y| is clamped to 2**22 first (every grid clamps far below).
    _RINT_MAGIC = tl.constexpr(12582912.0)
    _RINT_LIMIT = tl.constexpr(4194304.0)

    @triton.jit
    def _rint(y, LIBDEVICE: tl.constexpr):
        """Round half to even (torch.round). Without libdevice: exact for |y| <= 2**22;
        larger inputs come back as +-2**22, which every INT-k clamp maps like y itself."""
        if LIBDEVICE:
            r = libdevice.rint(y)
        else:
            yc = tl.minimum(tl.maximum(y, -_RINT_LIMIT), _RINT_LIMIT)
            r = (yc + _RINT_MAGIC) - _RINT_MAGIC
        return r

    @triton.jit
    def _gptq_block_kernel(
        w_ptr, u_ptr, s_ptr, z_ptr, q_ptr, c_ptr, e_ptr, l_ptr,
        R, B,
        stride_wr, stride_wc, stride_ur, stride_uc, stride_sr, stride_sc, stride_zr, stride_zc,
        stride_qr, stride_qc, stride_cr, stride_cc, stride_er, stride_ec,
        QMIN: tl.constexpr, QMAX: tl.constexpr, OFFSET: tl.constexpr,
        ASYM: tl.constexpr, LIBDEVICE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        """One GPTQ block for rows [pid * BLOCK_R, +BLOCK_R) and columns 0..B-1 (B <= BLOCK_B).
        Sym: e = clamp(rint(y), QMIN, QMAX), code = e + OFFSET. Asym: code = clamp(rint(y) +
        zero, 0, QMAX), e = code - zero. Value q = e * step; y = x / step (0 where step == 0)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        r_mask = rows < R
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_B)[None, :]  # (1, BLOCK_B)
        c_mask = cols < B
        tile_mask = r_mask[:, None] & c_mask  # (BLOCK_R, BLOCK_B)
        W = tl.load(w_ptr + rows64[:, None] * stride_wr + cols * stride_wc,
                    mask=tile_mask, other=0.0)  # (BLOCK_R, BLOCK_B)
        # U rows are loaded as whole (BLOCK_R, BLOCK_B) tiles of identical rows (L1 broadcast
        # loads): a (BLOCK_B,) vector would need a layout conversion through shared memory,
        # with barriers, in every iteration. Err stays in a register tile for the same reason
        # (a per-column store of a row vector is converted too).
        u_tile = tl.broadcast_to(u_ptr + cols * stride_uc, (BLOCK_R, BLOCK_B))
        u_mask = tl.broadcast_to(c_mask, (BLOCK_R, BLOCK_B))
        s_rows = s_ptr + rows64 * stride_sr
        z_rows = z_ptr + rows64 * stride_zr
        zeros_r = tl.zeros([BLOCK_R], dtype=tl.float32)
        loss = zeros_r
        Err = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)

        # column 0's parameters; later columns are loaded one iteration ahead
        s = tl.load(s_rows, mask=r_mask, other=1.0)
        if ASYM:
            z = tl.load(z_rows, mask=r_mask, other=0.0)
        else:
            z = zeros_r
        u = tl.load(u_tile, mask=u_mask, other=0.0)  # U1[0, :] on every row
        d = tl.load(u_ptr)  # U1[0, 0]
        # Column tests compare float copies of the column index with a float counter: LLVM
        # widens an integer loop index used in addresses to 64 bits, which would double every
        # per-element comparison.
        col_f = cols.to(tl.float32)  # (1, BLOCK_B)
        i_f = 0.0
        # A static trip count: padding columns (i >= B) compute zeros that are never stored.
        # (A runtime bound `range(B)` breaks Triton 3.6's interpreter under numpy >= 2.4.)
        for i in range(0, BLOCK_B):
            nxt = i + 1
            more = nxt < B
            s_next = tl.load(s_rows + nxt * stride_sc, mask=r_mask & more, other=1.0)
            if ASYM:
                z_next = tl.load(z_rows + nxt * stride_zc, mask=r_mask & more, other=0.0)
            else:
                z_next = zeros_r
            u_next = tl.load(u_tile + nxt * stride_ur, mask=u_mask & more, other=0.0)
            d_next = tl.load(u_ptr + nxt * stride_ur + nxt * stride_uc, mask=more, other=1.0)

            is_i = col_f == i_f  # (1, BLOCK_B)
            x = tl.sum(tl.where(is_i, W, 0.0), axis=1)  # W1[:, i]  (BLOCK_R,)
            nonzero = s != 0.0
            y = tl.where(nonzero, tl.math.div_rn(x, tl.where(nonzero, s, 1.0)), 0.0)
            r = _rint(y, LIBDEVICE)
            if ASYM:
                e = tl.minimum(tl.maximum(r + z, 0.0), QMAX) - z
            else:
                e = tl.minimum(tl.maximum(r, QMIN), QMAX)
            q = e * s
            err = tl.math.div_rn(x - q, zeros_r + d)
            loss += err * err * 0.5
            err2 = err[:, None]  # (BLOCK_R, 1)
            # OBS update of the later columns (U1[i, j] masked to j > i: an exact no-op
            # elsewhere; a masked load would not vectorize); column i itself now holds q_i,
            # so the tile ends up as Q1
            W = tl.where(is_i, q[:, None], W - err2 * tl.where(col_f > i_f, u, 0.0))
            Err = tl.where(is_i, err2, Err)
            s, z, u, d = s_next, z_next, u_next, d_next
            i_f += 1.0
        out = rows64[:, None]
        tl.store(q_ptr + out * stride_qr + cols * stride_qc, W, mask=tile_mask)
        tl.store(e_ptr + out * stride_er + cols * stride_ec, Err, mask=tile_mask)
        tl.store(l_ptr + rows64, loss, mask=r_mask)
        # Codes from the values: Q = e * step exactly as rounded above, and for |e| <= 255
        # fl(fl(e * step) / step) is within 2**-16 of e, so rint gives e back exactly.
        S = tl.load(s_ptr + out * stride_sr + cols * stride_sc, mask=tile_mask, other=1.0)
        nz = S != 0.0
        level = tl.where(nz, _rint(tl.math.div_rn(W, tl.where(nz, S, 1.0)), LIBDEVICE), 0.0)
        if ASYM:
            code = level + tl.load(z_ptr + out * stride_zr + cols * stride_zc, mask=tile_mask, other=0.0)
        else:
            code = level + OFFSET
        tl.store(c_ptr + out * stride_cr + cols * stride_cc, code.to(tl.int32).to(tl.uint8), mask=tile_mask)


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1 was set before
    this module was imported): CPU tensors are then accepted."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_gptq_block_kernel, InterpretedFunction)


def supported(fmt, device) -> bool:
    """True when `gptq_block` / `gptq_static` can quantize in `fmt` on `device`: Triton is
    installed, fmt is an INT-k format (sym or asym, any group size, `:mse` or not: the
    parameters are given), and the device is CUDA (or any device under the interpreter)."""
    if triton is None or not isinstance(fmt, IntFormat):
        return False
    return torch.device(device).type == "cuda" or interpreting()


def _grid_consts(code_bits: int, asym: bool) -> tuple[float, float, float]:
    """(QMIN, QMAX, OFFSET) of the kernel for k-bit codes."""
    if not 2 <= int(code_bits) <= 8:
        raise FormatError(f"code_bits must be 2..8, got {code_bits}")
    k = int(code_bits)
    if asym:
        return 0.0, float(2**k - 1), 0.0
    return float(-(2 ** (k - 1))), float(2 ** (k - 1) - 1), float(2 ** (k - 1))


def _check_f32(name: str, t: torch.Tensor, shape: tuple[int, int], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 2:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise DataError(f"{name} must be a 2-D float32 tensor, got {got}")
    if tuple(t.shape) != shape:
        raise DataError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise DataError(f"{name} is on {t.device}, expected {device} (the weight's device)")


# Launch shape: 16 rows x 128 columns over 4 warps is 16 tile elements per thread (128
# registers for sm_90, no spills); more rows per program use proportionally more warps.
# bench/bench_gptq.py sweeps the alternatives.
BLOCK_R = 16
ROWS_PER_WARP = 4


def _launch(W1, U1, step, zero, Q1, codes, Err1, loss, code_bits: int, asym: bool,
            block_r: int | None = None, num_warps: int | None = None) -> None:
    """Run the kernel on checked (R, b) views, writing Q1, codes, Err1 (R, b) and loss (R,)."""
    rows, b = W1.shape
    qmin, qmax, offset = _grid_consts(code_bits, asym)
    block_r = block_r or BLOCK_R
    num_warps = num_warps or max(1, block_r // ROWS_PER_WARP)
    block_b = max(16, triton.next_power_of_2(b))
    z = zero if asym else step  # never read when symmetric
    grid = (triton.cdiv(rows, block_r),)
    _gptq_block_kernel[grid](
        W1, U1, step, z, Q1, codes, Err1, loss, rows, b,
        W1.stride(0), W1.stride(1), U1.stride(0), U1.stride(1), step.stride(0), step.stride(1),
        z.stride(0), z.stride(1), Q1.stride(0), Q1.stride(1), codes.stride(0), codes.stride(1),
        Err1.stride(0), Err1.stride(1),
        QMIN=qmin, QMAX=qmax, OFFSET=offset, ASYM=bool(asym), LIBDEVICE=not interpreting(),
        BLOCK_R=block_r, BLOCK_B=block_b, num_warps=num_warps, enable_fp_fusion=False,
    )


def _check_weight(W: torch.Tensor, what: str) -> tuple[int, int]:
    """(rows, cols) of a float32 2-D weight on a device the kernel runs on, else an error."""
    if triton is None:
        raise FormatError("the fused GPTQ kernel needs Triton (pip install triton)")
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise DataError(f"{what}: W must be a 2-D (rows, cols) tensor")
    if W.device.type != "cuda" and not interpreting():
        raise DataError(f"{what}: W is on {W.device}; the kernel runs on CUDA tensors "
                        "(CPU tensors only under TRITON_INTERPRET=1)")
    rows, cols = W.shape
    _check_f32("W", W, (rows, cols), W.device)
    return rows, cols


def _check_params(W: torch.Tensor, step, zero, asym: bool, what: str) -> None:
    rows, cols = W.shape
    _check_f32("step", step, (rows, cols), W.device)
    if asym:
        if zero is None:
            raise DataError(f"{what}: asymmetric INT needs zero points")
        _check_f32("zero", zero, (rows, cols), W.device)


@torch.no_grad()
def gptq_block(W1: torch.Tensor, U1: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None,
               code_bits: int, asym: bool):
    """Quantize one GPTQ block in one launch.

    W1 (R, b) float32, b <= 128: the block's columns in processing order (not modified);
    U1 (b, b) float32: the block's part of the upper Cholesky factor of H⁻¹ (only its upper
    triangle is read);
    step, zero (R, b) float32: each column's fixed grid parameters (zero: asymmetric only,
    else None; a broadcast view such as `step.expand(R, b)` is fine).
    Returns (Q1 (R, b) float32 values, codes (R, b) uint8, Err1 (R, b) float32 scaled
    errors (w - q) / U_ii, loss (R,) float32 = sum_i Err1[:, i]**2 / 2)."""
    rows, b = _check_weight(W1, "gptq_block")
    _check_params(W1, step, zero, asym, "gptq_block")
    if not 1 <= b <= MAX_BLOCK:
        raise DataError(f"gptq_block: a block has 1..{MAX_BLOCK} columns, got {b}")
    _check_f32("U1", U1, (b, b), W1.device)
    Q1 = torch.empty_like(W1)
    codes = torch.empty(rows, b, dtype=torch.uint8, device=W1.device)
    Err1 = torch.empty_like(W1)
    loss = torch.empty(rows, dtype=torch.float32, device=W1.device)
    _launch(W1, U1, step, zero, Q1, codes, Err1, loss, code_bits, asym)
    return Q1, codes, Err1, loss


@torch.no_grad()
def gptq_static(W: torch.Tensor, U: torch.Tensor, step_cols: torch.Tensor, zero_cols: torch.Tensor | None,
                code_bits: int, asym: bool, block_size: int = 128, *, overwrite: bool = False,
                block_r: int | None = None, num_warps: int | None = None):
    """GPTQ with fixed per-column grid parameters, fused: the same result as the torch column
    loop of `quantizers.gptq` for static groups, per-channel and per-tensor INT formats.

    W (R, C) float32: the weight with its columns in processing order (act order applied,
    dead inputs zeroed); U (C, C): upper Cholesky factor of the damped H⁻¹ in the same order
    (`quantizers.gptq.inverse_cholesky`); step_cols / zero_cols: each column's step and zero
    point, (R, C) or broadcastable to it ((R, 1) per channel, (1, 1) per tensor; see
    `gather_columns`); zero_cols only for `asym`. block_size: columns per launch (<= 128).
    W is copied unless `overwrite` (then it is used as scratch). block_r / num_warps tune the
    launch (rows per program, default BLOCK_R; warps, default block_r / 4).
    Returns (Q (R, C) float32 values on the grid, codes (R, C) uint8, loss (R,) float64 with
    loss.sum() GPTQ's own error estimate, as `GPTQInfo.loss`)."""
    rows, cols = _check_weight(W, "gptq_static")
    step_cols = _broadcast("step_cols", step_cols, rows, cols)
    zero_cols = _broadcast("zero_cols", zero_cols, rows, cols) if asym and zero_cols is not None else zero_cols
    _check_params(W, step_cols, zero_cols, asym, "gptq_static")
    _check_f32("U", U, (cols, cols), W.device)
    if not 1 <= block_size <= MAX_BLOCK:
        raise DataError(f"gptq_static: block_size must be 1..{MAX_BLOCK}, got {block_size}")
    W = W if overwrite else W.clone()
    Q = torch.empty_like(W)  # (R, C)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    n_blocks = -(-cols // block_size)
    losses = torch.empty(n_blocks, rows, dtype=torch.float32, device=W.device)
    Err1 = torch.empty(rows, min(block_size, cols), dtype=torch.float32, device=W.device)
    for n, i1 in enumerate(range(0, cols, block_size)):
        i2 = min(i1 + block_size, cols)
        err = Err1[:, : i2 - i1]
        _launch(W[:, i1:i2], U[i1:i2, i1:i2], step_cols[:, i1:i2],
                zero_cols[:, i1:i2] if asym else None, Q[:, i1:i2], codes[:, i1:i2], err,
                losses[n], code_bits, asym, block_r, num_warps)
        if i2 < cols:
            W[:, i2:] -= err @ U[i1:i2, i2:]  # lazy batch update (the torch loop's expression)
    return Q, codes, losses.double().sum(0)


@torch.no_grad()
def gptq_dynamic(W: torch.Tensor, U: torch.Tensor, fmt: IntFormat, *, overwrite: bool = False,
                 block_r: int | None = None, num_warps: int | None = None):
    """GPTQ for a grouped INT format without act order, fused: each group's parameters come
    from the weight as it is when the sweep reaches the group (`formats.fixed.group_params`
    on the error-updated columns, `:mse` search included), then the group's columns run
    through the kernel in one launch (two or more when g > 128) and the lazy batch update
    follows. Equal to `quantizers.gptq.gptq(w, H, fmt, block_size=g, act_order=False)` for
    g <= 128; other block sizes there (and g > 128) differ only in float summation order.

    W (R, C) float32 in natural column order (dead inputs zeroed), U (C, C) as for
    `gptq_static`. Returns (Q (R, C) float32, codes (R, C) uint8, loss (R,) float64,
    steps (R, G) float32, zeros (R, G) float32 | None), G = ceil(C / g)."""
    from mixq.formats.fixed import group_params

    if not isinstance(fmt, IntFormat) or fmt.group_size <= 0:
        raise FormatError(f"gptq_dynamic takes a grouped INT-k format, got {fmt!s} "
                          "(per-channel and per-tensor parameters are fixed: use gptq_static)")
    rows, cols = _check_weight(W, "gptq_dynamic")
    g = fmt.group_size_for(cols)
    _check_f32("U", U, (cols, cols), W.device)
    W = W if overwrite else W.clone()
    n_groups = -(-cols // g)
    steps = torch.empty(rows, n_groups, device=W.device)
    zeros = torch.empty(rows, n_groups, device=W.device) if fmt.asym else None
    Q = torch.empty_like(W)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    block = min(g, MAX_BLOCK)
    losses = torch.empty(-(-cols // block) + n_groups, rows, device=W.device)
    Err1 = torch.empty(rows, block, device=W.device)
    n = 0
    for j1 in range(0, cols, g):
        j2 = min(j1 + g, cols)
        p = group_params(fmt, W[:, j1:j2])  # (R, 1) from the updated columns
        steps[:, j1 // g] = p.step[:, 0]
        if zeros is not None:
            zeros[:, j1 // g] = p.zero[:, 0]
        for i1 in range(j1, j2, block):
            i2 = min(i1 + block, j2)
            err = Err1[:, : i2 - i1]
            _launch(W[:, i1:i2], U[i1:i2, i1:i2], p.step.expand(rows, i2 - i1),
                    p.zero.expand(rows, i2 - i1) if fmt.asym else None, Q[:, i1:i2],
                    codes[:, i1:i2], err, losses[n], fmt.code_bits, fmt.asym, block_r, num_warps)
            n += 1
            if i2 < cols:
                W[:, i2:] -= err @ U[i1:i2, i2:]  # lazy batch update
    return Q, codes, losses[:n].double().sum(0), steps, zeros


def _broadcast(name: str, t, rows: int, cols: int):
    """t expanded (a view, no copy) to (rows, cols); a clear error when it cannot be."""
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2 or t.shape[0] not in (1, rows) or t.shape[1] not in (1, cols):
        raise DataError(f"{name} must be (rows, cols) = ({rows}, {cols}) or broadcastable to it, "
                        f"got {tuple(t.shape)}")
    return t.expand(rows, cols)


def gather_columns(t: torch.Tensor, group_size: int, cols: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Per-column parameters from per-group ones (e.g. `GroupParams.step`): t (R', G) ->
    (R', cols), column j taking group `orig(j) // group_size` with orig = perm[j] (act order:
    column j of the reordered weight is input perm[j]) or j. group_size is the format's
    group length along the columns (`fmt.group_size_for(cols)`: cols per channel/tensor)."""
    orig = torch.arange(cols, device=t.device) if perm is None else perm.to(t.device)
    if orig.shape != (cols,):
        raise DataError(f"perm must have shape ({cols},), got {tuple(orig.shape)}")
    groups = orig // group_size
    if t.dim() != 2 or int(groups.max()) >= t.shape[1]:
        raise DataError(f"parameters of shape {tuple(t.shape)} have too few groups for {cols} "
                        f"columns of group size {group_size}")
    return t[:, groups]


@torch.no_grad()
def gptq_static_reference(W: torch.Tensor, U: torch.Tensor, step_cols: torch.Tensor,
                          zero_cols: torch.Tensor | None, code_bits: int, asym: bool,
                          block_size: int = 128):
    """Pure-torch reference of `gptq_static`: the column loop of `quantizers.gptq` with the
    same fixed per-column parameters, rounding with `formats.fixed.round_columns`. Same
    arguments and results (Q, codes, loss (R,) float64); W is not modified."""
    from mixq.formats.fixed import round_columns

    rows, cols = W.shape
    fmt = IntFormat(code_bits, 0, asym=asym)  # the group size plays no part in round_columns
    k = int(code_bits)
    step_cols = _broadcast("step_cols", step_cols, rows, cols)
    zero_cols = _broadcast("zero_cols", zero_cols, rows, cols) if asym else None
    W = W.clone()
    Q = torch.zeros_like(W)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    loss = torch.zeros(rows, dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (R, b)
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            col = W1[:, i : i + 1]  # (R, 1)
            step = step_cols[:, j : j + 1]
            zero = zero_cols[:, j : j + 1] if asym else None
            q = round_columns(fmt, col, step, zero)
            Q[:, j : j + 1] = q
            y = torch.where(step != 0, col / torch.where(step != 0, step, 1.0), 0.0)
            c = torch.clamp(torch.round(y) + zero, 0, 2**k - 1) if asym else \
                torch.clamp(torch.round(y), -(2 ** (k - 1)), 2 ** (k - 1) - 1) + 2 ** (k - 1)
            codes[:, j : j + 1] = c.to(torch.uint8)
            err = (col - q) / U1[i, i]
            loss += (err[:, 0].double() ** 2) / 2
            W1[:, i:] -= err * U1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q, codes, loss
