"""Fused element-wise steps of a Llama-family decode step, one Triton launch each, so a
decode step runs about ten kernels per block instead of some forty small torch ops.

    h, r = add_rms_norm(h, delta, weight, eps)     # h + delta, and RMSNorm of it
    h, r = add_rms_norm(h, delta, weight, eps, (smooth, signs, block))   # r through a unit's input transform
    r = add_rms_norm(h, None, weight, eps)         # RMSNorm only
    q = rope_to_cache(q, k, v, positions, inv_freq, k_cache, v_cache)   # (B, H, T, D)
    m = silu_mul(g, u)                             # silu(g) * u
    tok = argmax(logits)                           # (B,) as logits.argmax(-1), in parallel

They round where Hugging Face's Llama modules round (RMSNorm: normalise in float32, round
to the input dtype, multiply by the weight; rotary: cos/sin rounded to the dtype, then
x * cos + rotate_half(x) * sin with each product and the sum rounded; SiLU rounded before
the product), so in float32 they equal the torch ops to float rounding and in bf16 to the
last bit in most elements. `reference_*` functions are the torch versions they are tested
against (and the CPU path). Rows must fit one program: hidden sizes up to 16384. Attention
of a one-token step (with the rotary embedding inside it) is `kernels.decode_attention`.
"""

from __future__ import annotations


import torch

import triton
import triton.language as tl

from mixq.kernels.pdl import enter as pdl_enter
from mixq.kernels.pdl import launch_kw
from mixq.kernels.transform import _dot_hx, _dot_xh


# --------------------------------------------------------------------------- references


def reference_add_rms_norm(h, delta, weight, eps):
    """(h + delta, RMSNorm(h + delta)) as Hugging Face computes them (delta None: no add)."""
    if delta is not None:
        h = h + delta
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * x.to(h.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference_rope(x, positions, inv_freq, scaling=1.0):
    """Rotary embedding of x (B, H, T, D) at positions (T,), as Hugging Face's Llama."""
    freqs = positions[:, None].float() * inv_freq[None, :].float()  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def reference_silu_mul(g, u):
    return torch.nn.functional.silu(g) * u


# --------------------------------------------------------------------------- kernels


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, h_out_ptr, r_ptr, s_ptr, sg_ptr, h1_ptr, h2_ptr, N, stride_h, stride_d,
                         stride_ho, stride_r, eps, hscale, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_S: tl.constexpr, ROTATE: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
                         PRECISION: tl.constexpr, SPLIT: tl.constexpr, GDC: tl.constexpr):
    """Program (row, part): h (+ delta) and its RMSNorm r, rounded as the model rounds them, and
    with HAS_S / ROTATE the unit's online input transform of r (`kernels.transform`: ((r / s)
    * d) H in float32, rounded once) stored instead of r. ROTATE (BLOCK == N): F1 == 1, blocks
    of F2 <= 128 inputs, the row as V (N / F2, F2) and VH_F2, part p computing rows 16p ..
    16p + 15 of it; F1 > 1, the row is one block of F1 * F2 inputs, X the row as (F1, F2) and
    H_F1 X H_F2, part p computing its rows 16p .. 16p + 15. Every part reads the whole row for
    the norm; part 0 stores h + delta. Without ROTATE there is one part. The constants (w, s,
    d, the Hadamard factors) are loaded before the wait on the previous kernel (GDC), so their
    loads overlap its tail."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if ROTATE and F1 == 1:  # this part's 16 rows of V only
        SUB: tl.constexpr = 16 * F2
        rcols = part * SUB + tl.arange(0, SUB)
    else:
        rcols = cols
    rmask = rcols < N
    w = tl.load(w_ptr + rcols, mask=rmask, other=0.0)
    if HAS_S:
        s = tl.load(s_ptr + rcols, mask=rmask, other=1.0)
    if ROTATE:
        sg = tl.load(sg_ptr + rcols, mask=rmask, other=0.0)
        b = tl.arange(0, F2)
        h2 = tl.load(h2_ptr + b[:, None] * F2 + b[None, :])
        if F1 > 1:
            a = tl.arange(0, F1)
            a16 = part * 16 + tl.arange(0, 16)
            h1 = tl.load(h1_ptr + a16[:, None] * F1 + a[None, :])  # rows 16p .. of H_F1
    pdl_enter(GDC)
    h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
    dt = h.dtype
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(dt)
        if part == 0:
            tl.store(h_out_ptr + row * stride_ho + cols, h, mask=mask)
    x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    if ROTATE and F1 == 1:  # reload this part's inputs
        h = tl.load(h_ptr + row * stride_h + rcols)
        if HAS_DELTA:
            h = (h.to(tl.float32) + tl.load(d_ptr + row * stride_d + rcols).to(tl.float32)).to(dt)
    x = (h.to(tl.float32) * rstd).to(dt)
    r = (w.to(tl.float32) * x.to(tl.float32)).to(r_ptr.dtype.element_ty)
    ocols = rcols
    omask = rmask
    if HAS_S or ROTATE:
        y = r.to(tl.float32)
        if HAS_S:
            y = y / s
        if ROTATE:
            y = y * sg
            if F1 == 1:
                y = tl.reshape(_dot_xh(tl.reshape(y, (16, F2)), h2, SPLIT, PRECISION) * hscale, (16 * F2,))
            else:
                t = _dot_hx(h1, tl.reshape(y, (F1, F2)), SPLIT, PRECISION)
                y = tl.reshape(_dot_xh(t, h2, SPLIT, PRECISION) * hscale, (16 * F2,))
                ocols = part * 16 * F2 + tl.arange(0, 16 * F2)
                omask = ocols < N
        r = y.to(r_ptr.dtype.element_ty)
    tl.store(r_ptr + row * stride_r + ocols, r, mask=omask)


@triton.jit
def _rope_full(x, xr, c, s):
    """Rotary embedding of rows x (..., D) given xr = rotate_half(x) (-x2, x1) and cos / sin
    over the full head dim, rounded as Hugging Face's Llama: each product and the sum in x's
    dtype."""
    dt = x.dtype
    return ((x.to(tl.float32) * c).to(dt).to(tl.float32) + (xr.to(tl.float32) * s).to(dt).to(tl.float32)).to(dt)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, f_ptr, qo_ptr, kc_ptr, vc_ptr,
                       T, H, KVH, stride_q, stride_k, stride_v, L, scaling,
                       D: tl.constexpr, GDC: tl.constexpr):
    """Program (b * T + t, head): heads < H rotate q into qo (B, H, T, D); heads H .. H + KVH
    rotate k and copy v into the caches (B, KVH, L, D) at position pos[t]."""
    pdl_enter(GDC)
    bt = tl.program_id(0)
    head = tl.program_id(1)
    b = bt // T
    t = bt % T
    HALF: tl.constexpr = D // 2
    di = tl.arange(0, D)
    rot = (di + HALF) % D  # rotate_half(x) = (-x2, x1): column di reads di + D/2 (mod D), negated below D/2
    sign = tl.where(di < HALF, -1.0, 1.0)
    pos = tl.load(pos_ptr + t)
    freqs = pos.to(tl.float32) * tl.load(f_ptr + di % HALF)
    if head < H:
        base = q_ptr + bt.to(tl.int64) * stride_q + head * D
    else:
        base = k_ptr + bt.to(tl.int64) * stride_k + (head - H) * D
    x = tl.load(base + di)
    dt = x.dtype
    c = (tl.cos(freqs) * scaling).to(dt).to(tl.float32)
    sn = (tl.sin(freqs) * scaling).to(dt).to(tl.float32)
    o = _rope_full(x, (tl.load(base + rot).to(tl.float32) * sign).to(dt), c, sn)
    if head < H:
        tl.store(qo_ptr + ((b * H + head) * T + t).to(tl.int64) * D + di, o)
    else:
        kv = head - H
        off = ((b * KVH + kv) * L + pos).to(tl.int64) * D
        tl.store(kc_ptr + off + di, o.to(kc_ptr.dtype.element_ty))
        tl.store(vc_ptr + off + di, tl.load(v_ptr + bt.to(tl.int64) * stride_v + kv * D + di).to(vc_ptr.dtype.element_ty))


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr, GDC: tl.constexpr):
    pdl_enter(GDC)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(o_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _argmax_partial_kernel(x_ptr, v_ptr, i_ptr, N, stride_x, P, BLOCK: tl.constexpr, GDC: tl.constexpr):
    """Program (row, p): the max of inputs p * BLOCK .. + BLOCK - 1 of the row (NaN counted as
    +inf) and its first index, to the workspace (row, p)."""
    pdl_enter(GDC)
    row = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    cols = p * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    i = tl.argmax(x, axis=0, tie_break_left=True)
    tl.store(v_ptr + row * P + p, tl.max(x, axis=0))
    tl.store(i_ptr + row * P + p, (p * BLOCK + i).to(tl.int64))


@triton.jit
def _argmax_combine_kernel(v_ptr, i_ptr, o_ptr, P, BLOCK_P: tl.constexpr, GDC: tl.constexpr):
    """Program row: the first of the row's chunk maxima that is largest, and its index."""
    pdl_enter(GDC)
    row = tl.program_id(0).to(tl.int64)
    pi = tl.arange(0, BLOCK_P)
    v = tl.load(v_ptr + row * P + pi, mask=pi < P, other=float("-inf"))
    idx = tl.load(i_ptr + row * P + pi, mask=pi < P, other=0)
    j = tl.argmax(v, axis=0, tie_break_left=True)
    tl.store(o_ptr + row, tl.sum(tl.where(pi == j, idx, 0), axis=0))


# --------------------------------------------------------------------------- wrappers


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x viewed as (rows, last) with a unit last-dim stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def norm_transform_ok(n: int, smooth: torch.Tensor | None, signs: torch.Tensor | None, block: int | None,
                      x: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> bool:
    """Whether `add_rms_norm` can apply this online input transform to its output in its own
    kernel, for rows of n inputs (like x, when given): smoothing alone for any n; a rotation
    where the CUDA kernel takes x (`cuda_gemv.norm_transform_supported`: blocks of 256..8192
    inputs) or, in Triton, for a power-of-two n whose blocks are either of 16..128 inputs (at
    least 16 of them) or the whole row (256 .. 16384 inputs). Other shapes run the transform
    as its own kernel."""
    if signs is None:
        return smooth is not None
    if x is not None:
        from mixq.kernels import cuda_gemv

        if cuda_gemv.norm_transform_supported(x, block) and (weight is None or weight.dtype == x.dtype):
            return True
    if block is None or n & (n - 1) or block & (block - 1) or n % block:
        return False
    if 16 <= block <= 128:
        return n // block >= 16
    return block == n and 256 <= block <= 1 << 14


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 transform: tuple | None = None):
    """delta given: (h + delta, RMSNorm(h + delta) * weight); None: RMSNorm(h) * weight.

    transform = (smooth, signs, block), where `norm_transform_ok`: the normalised output goes
    through that online input transform in the same kernel (what `kernels.transform` computes
    from the rounded RMSNorm output), so a group of units that reads it (q/k/v, gate/up) runs
    no transform kernel of its own."""
    n = h.shape[-1]
    h2 = _rows(h)
    rows = h2.shape[0]
    r = torch.empty((rows, n), dtype=h.dtype, device=h.device)
    block = triton.next_power_of_2(n)
    kw = dict(BLOCK=block, HAS_S=False, ROTATE=False, F1=1, F2=16, PRECISION="ieee", SPLIT=False, num_warps=8,
              **launch_kw(h.device))
    s = sg = h1 = h2m = h2
    parts, hscale = 1, 1.0
    if transform is not None:
        from mixq.kernels.transform import _factor_matrices, f32_on, split_block, split_products

        smooth, signs, rblock = transform
        s32, sg32 = f32_on(smooth, h.device), f32_on(signs, h.device)
        triton_ok = norm_transform_ok(n, smooth, signs, rblock)
        # a row the Triton kernel below takes runs there (its four programs per 4096-input row
        # beat the CUDA kernel's single block in the decode step's chain on the H200: 10.5 vs
        # 11.3 µs for norm + the q/k/v matmul); other shapes go to the CUDA butterfly kernel
        if signs is not None and h.is_cuda and not triton_ok:
            from mixq.kernels import cuda_gemv

            h_out = None if delta is None else torch.empty((rows, n), dtype=h.dtype, device=h.device)
            y = cuda_gemv.norm_transform(h2, sg32, rblock, smooth=s32, delta=None if delta is None else _rows(delta),
                                         weight=weight, eps=eps, h_out=h_out)
            if y is not None:
                return (h_out.reshape(h.shape), y.reshape(h.shape)) if delta is not None else y.reshape(h.shape)
        if not triton_ok:
            raise ValueError(f"add_rms_norm: the transform (smoothing {smooth is not None}, rotation block {rblock}) "
                             f"does not fit rows of {n} inputs in one kernel (see norm_transform_ok)")
        if s32 is not None:
            s = s32
            kw["HAS_S"] = True
        if sg32 is not None:
            sg = sg32
            split = split_products(h.dtype)
            h1, h2m = _factor_matrices(rblock, h.device, split)
            hscale = rblock ** -0.5 if split else 1.0
            f1, f2 = split_block(rblock)
            kw.update(ROTATE=True, F1=f1, F2=f2, PRECISION="tf32x3" if h.is_cuda else "ieee", SPLIT=split, num_warps=4)
            parts = (n // f2 if f1 == 1 else f1) // 16  # 16 rows of V or of H_F1 X H_F2 per program
    if delta is not None:
        d2 = _rows(delta)
        h_out = torch.empty((rows, n), dtype=h.dtype, device=h.device)
        _add_rms_norm_kernel[(rows, parts)](h2, d2, weight, h_out, r, s, sg, h1, h2m, n, h2.stride(0), d2.stride(0),
                                      h_out.stride(0), r.stride(0), float(eps), hscale, HAS_DELTA=True, **kw)
        return h_out.reshape(h.shape), r.reshape(h.shape)
    _add_rms_norm_kernel[(rows, parts)](h2, h2, weight, h2, r, s, sg, h1, h2m, n, h2.stride(0), h2.stride(0), h2.stride(0),
                                  r.stride(0), float(eps), hscale, HAS_DELTA=False, **kw)
    return r.reshape(h.shape)


def rope_to_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
                  n_kv: int, head_dim: int, scaling: float = 1.0) -> torch.Tensor:
    """q, k, v: (B, T, heads * D) (views of one fused output are fine); positions (T,) long.
    Writes rotated k and v into k_cache / v_cache (B, KVH, L, D) at the positions and returns
    the rotated q as (B, H, T, D)."""
    b, t = q.shape[0], q.shape[1]
    q2, k2, v2 = (x.reshape(b * t, x.shape[-1]) for x in (q, k, v))
    for x in (q2, k2, v2):
        if x.stride(-1) != 1:
            raise ValueError("rope_to_cache: q, k, v need a unit last-dim stride")
    qo = torch.empty((b, n_heads, t, head_dim), dtype=q.dtype, device=q.device)
    gdc = launch_kw(q.device)
    _rope_cache_kernel[(b * t, n_heads + n_kv)](
        q2, k2, v2, positions, inv_freq.float().contiguous(), qo, k_cache, v_cache,
        t, n_heads, n_kv, q2.stride(0), k2.stride(0), v2.stride(0), k_cache.shape[2], float(scaling),
        D=head_dim, num_warps=1, **gdc)
    return qo


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for g, u (..., N) (views are fine), rounded as torch rounds them."""
    g2, u2 = _rows(g), _rows(u)
    rows, n = g2.shape
    out = torch.empty((rows, n), dtype=g.dtype, device=g.device)
    block = 1024
    gdc = launch_kw(g.device)
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0),
                                                     BLOCK=block, num_warps=4, **gdc)
    return out.reshape(g.shape)


ARGMAX_BLOCK = 4096


def argmax(x: torch.Tensor) -> torch.Tensor:
    """(B,) int64: the first index of each row's maximum of x (B, N), as torch.argmax(x, -1),
    in two launches (chunks of ARGMAX_BLOCK in parallel, then one program per row), where
    torch reduces a row of a 128256-token vocabulary in one slow pass. NaN counts as +inf (torch
    returns the first NaN's index; here a +inf before it wins)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"argmax: expected a (rows, n) tensor with a unit last-dim stride, got {tuple(x.shape)}")
    b, n = x.shape
    parts = triton.cdiv(n, ARGMAX_BLOCK)
    ws_v = torch.empty((b, parts), device=x.device, dtype=torch.float32)
    ws_i = torch.empty((b, parts), device=x.device, dtype=torch.int64)
    out = torch.empty((b,), device=x.device, dtype=torch.int64)
    gdc = launch_kw(x.device)
    _argmax_partial_kernel[(b, parts)](x, ws_v, ws_i, n, x.stride(0), parts, BLOCK=ARGMAX_BLOCK, num_warps=8, **gdc)
    _argmax_combine_kernel[(b,)](ws_v, ws_i, out, parts, BLOCK_P=max(16, triton.next_power_of_2(parts)), num_warps=1,
                                 **gdc)
    return out
