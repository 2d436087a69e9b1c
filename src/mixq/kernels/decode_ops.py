"""Fused element-wise steps of a Llama-family decode step, one Triton launch each, so a
decode step runs about ten kernels per block instead of some forty small torch ops.

    h, r = add_rms_norm(h, delta, weight, eps)     # h + delta, and RMSNorm of it
    r = add_rms_norm(h, None, weight, eps)         # RMSNorm only
    q = rope_to_cache(q, k, v, positions, inv_freq, k_cache, v_cache)   # (B, H, T, D)
    m = silu_mul(g, u)                             # silu(g) * u

They round where Hugging Face's Llama modules round (RMSNorm: normalise in float32, round
to the input dtype, multiply by the weight; rotary: cos/sin rounded to the dtype, then
x * cos + rotate_half(x) * sin with each product and the sum rounded; SiLU rounded before
the product), so in float32 they equal the torch ops to float rounding and in bf16 to the
last bit in most elements. `reference_*` functions are the torch versions they are tested
against (and the CPU path). Rows must fit one program: hidden sizes up to 16384.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl


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
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, h_out_ptr, r_ptr, N, stride_h, stride_d, stride_ho, stride_r, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
    dt = h.dtype
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(dt)
        tl.store(h_out_ptr + row * stride_ho + cols, h, mask=mask)
    x = h.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    x = (x * tl.rsqrt(var + eps)).to(dt)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(r_ptr + row * stride_r + cols, (w.to(tl.float32) * x.to(tl.float32)).to(r_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, f_ptr, qo_ptr, kc_ptr, vc_ptr,
                       T, H, KVH, stride_q, stride_k, stride_v, L, scaling,
                       D: tl.constexpr):
    """Program (b * T + t, head): heads < H rotate q into qo (B, H, T, D); heads H .. H + KVH
    rotate k and copy v into the caches (B, KVH, L, D) at position pos[t]."""
    bt = tl.program_id(0)
    head = tl.program_id(1)
    b = bt // T
    t = bt % T
    HALF: tl.constexpr = D // 2
    i = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t)
    freqs = pos.to(tl.float32) * tl.load(f_ptr + i)
    if head < H:
        base = q_ptr + bt.to(tl.int64) * stride_q + head * D
    else:
        base = k_ptr + bt.to(tl.int64) * stride_k + (head - H) * D
    x1 = tl.load(base + i)
    x2 = tl.load(base + HALF + i)
    dt = x1.dtype
    c = (tl.cos(freqs) * scaling).to(dt).to(tl.float32)
    s = (tl.sin(freqs) * scaling).to(dt).to(tl.float32)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product rounded
    o1 = ((a1 * c).to(dt).to(tl.float32) + (-a2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)
    if head < H:
        out = qo_ptr + ((b * H + head) * T + t).to(tl.int64) * D
        tl.store(out + i, o1)
        tl.store(out + HALF + i, o2)
    else:
        kv = head - H
        off = ((b * KVH + kv) * L + pos).to(tl.int64) * D
        tl.store(kc_ptr + off + i, o1.to(kc_ptr.dtype.element_ty))
        tl.store(kc_ptr + off + HALF + i, o2.to(kc_ptr.dtype.element_ty))
        vb = v_ptr + bt.to(tl.int64) * stride_v + kv * D
        tl.store(vc_ptr + off + i, tl.load(vb + i).to(vc_ptr.dtype.element_ty))
        tl.store(vc_ptr + off + HALF + i, tl.load(vb + HALF + i).to(vc_ptr.dtype.element_ty))


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(o_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- wrappers


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x viewed as (rows, last) with a unit last-dim stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """delta given: (h + delta, RMSNorm(h + delta) * weight); None: RMSNorm(h) * weight."""
    n = h.shape[-1]
    h2 = _rows(h)
    rows = h2.shape[0]
    r = torch.empty((rows, n), dtype=h.dtype, device=h.device)
    block = triton.next_power_of_2(n)
    if delta is not None:
        d2 = _rows(delta)
        h_out = torch.empty((rows, n), dtype=h.dtype, device=h.device)
        _add_rms_norm_kernel[(rows,)](h2, d2, weight, h_out, r, n, h2.stride(0), d2.stride(0), h_out.stride(0),
                                      r.stride(0), float(eps), HAS_DELTA=True, BLOCK=block, num_warps=8)
        return h_out.reshape(h.shape), r.reshape(h.shape)
    _add_rms_norm_kernel[(rows,)](h2, h2, weight, h2, r, n, h2.stride(0), h2.stride(0), h2.stride(0), r.stride(0),
                                  float(eps), HAS_DELTA=False, BLOCK=block, num_warps=8)
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
    _rope_cache_kernel[(b * t, n_heads + n_kv)](
        q2, k2, v2, positions, inv_freq.float().contiguous(), qo, k_cache, v_cache,
        t, n_heads, n_kv, q2.stride(0), k2.stride(0), v2.stride(0), k_cache.shape[2], float(scaling),
        D=head_dim, num_warps=1)
    return qo


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for g, u (..., N) (views are fine), rounded as torch rounds them."""
    g2, u2 = _rows(g), _rows(u)
    rows, n = g2.shape
    out = torch.empty((rows, n), dtype=g.dtype, device=g.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0),
                                                     BLOCK=block, num_warps=4)
    return out.reshape(g.shape)
