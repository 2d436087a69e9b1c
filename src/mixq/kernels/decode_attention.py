"""Attention of a one-token decode step over the written keys of a static KV cache
(flash-decoding in Triton), with or without the step's rotary embedding and cache write
inside it; part of the decode step's fused kernels (`kernels.decode_ops`).

    a = decode_attention(q, k_cache, v_cache, positions, scale)   # (B, 1, H * D), q rotated
    a = decode_attention_rope(q, k, v, positions, inv_freq, k_cache, v_cache, n_heads, scale)

The cache is cut into up to 64 splits of 64-key blocks, one program per (row, kv head, split)
with the kv head's query heads as one tile (online softmax in float32), then one program per
head combines the splits. `reference_decode_attention` is the torch version they are tested
against.
"""

from __future__ import annotations

import os

import torch

import triton
import triton.language as tl

from mixq.kernels.decode_ops import _rope_full
from mixq.kernels.pdl import enter as pdl_enter
from mixq.kernels.pdl import launch_kw


def reference_decode_attention(q, k_cache, v_cache, positions, scale):
    """Softmax attention of q (B, H, 1, D) over the cached keys at positions <= positions[0]
    (grouped-query: head h reads kv head h // (H / KVH)), as (B, 1, H * D), in float32."""
    b, h, _, d = q.shape
    kvh = k_cache.shape[1]
    n = int(positions[0]) + 1
    k = k_cache[:, :, :n].float().repeat_interleave(h // kvh, dim=1)
    v = v_cache[:, :, :n].float().repeat_interleave(h // kvh, dim=1)
    p = torch.softmax((q.float() @ k.transpose(-1, -2)) * scale, dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, 1, h * d)


@triton.jit
def _attn_partial_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, kn_ptr, vn_ptr, f_ptr, L, KVH, S, CHUNK,
                         scale, stride_q, stride_kn, stride_vn, rope_scaling,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         IEEE: tl.constexpr, ROPE: tl.constexpr, GDC: tl.constexpr):
    """Program (b * KVH + kv head, split s): the G query heads of the kv head against the keys
    s * CHUNK .. (s + 1) * CHUNK - 1 that are written (index <= pos[0]); online softmax in fp32,
    the split's running max, sum and weighted values to the workspace. ROPE: q_ptr, kn_ptr,
    vn_ptr are the step's q, k, v rows before the rotary embedding (row strides stride_q, ...);
    every program rotates its query heads, and the program whose split holds pos rotates the
    new key and writes it and the new value into the caches before it reads them (what
    `rope_to_cache` does, without its launch). Else q_ptr is the rotated q (B, H, 1, D)."""
    pdl_enter(GDC)
    bk = tl.program_id(0)
    s = tl.program_id(1)
    b = bk // KVH
    kv = bk % KVH
    gi = tl.arange(0, BLOCK_G)
    di = tl.arange(0, D)
    ni = tl.arange(0, BLOCK_N)
    pos = tl.load(pos_ptr).to(tl.int32)
    n_valid = pos + 1
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, n_valid)
    kv_base = (bk.to(tl.int64) * L) * D
    if ROPE:
        HALF: tl.constexpr = D // 2
        rot = (di + HALF) % D
        sign = tl.where(di < HALF, -1.0, 1.0)
        freqs = pos.to(tl.float32) * tl.load(f_ptr + di % HALF)
        q_rows = q_ptr + b.to(tl.int64) * stride_q + (kv * G + gi)[:, None] * D
        x = tl.load(q_rows + di[None, :], mask=gi[:, None] < G, other=0.0)
        xr = tl.load(q_rows + rot[None, :], mask=gi[:, None] < G, other=0.0)
        dt = x.dtype
        c = (tl.cos(freqs) * rope_scaling).to(dt).to(tl.float32)
        sn = (tl.sin(freqs) * rope_scaling).to(dt).to(tl.float32)
        q = _rope_full(x, (xr.to(tl.float32) * sign[None, :]).to(dt), c[None, :], sn[None, :])
        if (pos >= start) & (pos < start + CHUNK):  # this split reads the new key: write it first
            k_row = kn_ptr + b.to(tl.int64) * stride_kn + kv * D
            kx = tl.load(k_row + di)
            k_new = _rope_full(kx, (tl.load(k_row + rot).to(tl.float32) * sign).to(dt), c, sn)
            tl.store(k_ptr + kv_base + pos.to(tl.int64) * D + di, k_new.to(k_ptr.dtype.element_ty))
            v_new = tl.load(vn_ptr + b.to(tl.int64) * stride_vn + kv * D + di)
            tl.store(v_ptr + kv_base + pos.to(tl.int64) * D + di, v_new.to(v_ptr.dtype.element_ty))
            tl.debug_barrier()  # the block's stores are visible to all its threads before the loads below
    else:
        # q heads kv * G .. kv * G + G - 1 of batch row b: (B, H, 1, D) contiguous
        q_rows = (b * KVH * G + kv * G + gi).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * D + di[None, :], mask=gi[:, None] < G, other=0.0)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + ni
        ok = keys < end
        k = tl.load(k_ptr + kv_base + keys[:, None] * D + di[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv_base + keys[:, None] * D + di[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(k))
        sc = tl.where(ok[None, :], sc * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # workspace rows (b, kv, s, g)
    w_rows = ((bk * S + s) * BLOCK_G + gi).to(tl.int64)
    tl.store(m_ptr + w_rows, m_i)
    tl.store(l_ptr + w_rows, l_i)
    tl.store(acc_ptr + w_rows[:, None] * D + di[None, :], acc)


@triton.jit
def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, KVH, S,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                         GDC: tl.constexpr):
    """Program (b * H + head): the splits of its kv head combined, out[b, 0, head * D ...]."""
    pdl_enter(GDC)
    bh = tl.program_id(0)
    H = KVH * G
    b = bh // H
    h = bh % H
    bk = b * KVH + h // G
    g = h % G
    si = tl.arange(0, BLOCK_S)
    di = tl.arange(0, D)
    rows = ((bk * S + si) * BLOCK_G + g).to(tl.int64)
    ok = si < S
    m = tl.load(m_ptr + rows, mask=ok, other=float("-inf"))
    l = tl.load(l_ptr + rows, mask=ok, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)
    acc = tl.load(acc_ptr + rows[:, None] * D + di[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + bh.to(tl.int64) * D + di, out.to(o_ptr.dtype.element_ty))


ATTN_BLOCK_N = 64


def _attention_ok(h: int, d: int, dtype: torch.dtype, k_cache: torch.Tensor) -> bool:
    kvh = k_cache.shape[1]
    return (k_cache.dtype == dtype and dtype in (torch.float32, torch.float16, torch.bfloat16)
            and 16 <= d <= 256 and d & (d - 1) == 0 and h % kvh == 0 and h // kvh <= 64)


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `decode_attention` takes this step: one query token, float caches of q's dtype,
    a power-of-two head dim of 16..256, whole query groups per kv head (at most 64 heads each)."""
    b, h, t, d = q.shape
    return t == 1 and _attention_ok(h, d, q.dtype, k_cache)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of one query token per row, q (B, H, 1, D), over the keys of the caches
    (B, KVH, L, D) at positions <= positions[0] (the written ones: a decode step reads only
    those, whatever the cache's length), grouped-query (head h reads kv head h // (H / KVH)).
    Returns (B, 1, H * D) in q's dtype. Flash-decoding: the cache is cut into up to 64 splits of
    64-key blocks, one program per (row, kv head, split) with the group's query heads as one
    tile, online softmax in float32, then one program per head combines the splits."""
    b, h, t, d = q.shape
    if not decode_attention_supported(q, k_cache) or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: expected q (B, H, 1, D) and caches (B, KVH, L, D) of its dtype with "
                         f"H a multiple of KVH, D a power of two in 16..256; got q {tuple(q.shape)} {q.dtype}, "
                         f"caches {tuple(k_cache.shape)} {k_cache.dtype}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not x.is_contiguous():
            raise ValueError(f"decode_attention: {name} must be contiguous")
    return _attention(q, k_cache, v_cache, positions, scale, b, h, d, None)


def decode_attention_rope_supported(q: torch.Tensor, k_cache: torch.Tensor, n_heads: int) -> bool:
    """Whether `decode_attention_rope` takes this step: q (B, 1, H * D) of one token, whose
    (B, H, 1, D) view `decode_attention` takes, with an even head dim; MIXQ_ATTN_ROPE=0 keeps
    the rotary embedding in its own kernel (for benchmarks)."""
    if os.environ.get("MIXQ_ATTN_ROPE") == "0" or q.dim() != 3 or q.shape[1] != 1 or q.shape[2] % n_heads:
        return False
    return _attention_ok(n_heads, q.shape[2] // n_heads, q.dtype, k_cache)


def decode_attention_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
                          scale: float, rope_scaling: float = 1.0) -> torch.Tensor:
    """`rope_to_cache` followed by `decode_attention` for a one-token step, in the attention's
    two launches: q (B, 1, H * D), k, v (B, 1, KVH * D) before the rotary embedding (views of
    one fused output are fine); the rotated key and the value are written into the caches at
    positions[0] by the program that reads that position, the rotated queries never leave the
    registers. Returns (B, 1, H * D), what the two steps give."""
    if not decode_attention_rope_supported(q, k_cache, n_heads) or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention_rope: expected q (B, 1, H * D) of one token, H = {n_heads} heads of a "
                         f"power-of-two dim in 16..256, and caches (B, KVH, L, D) of its dtype; got q {tuple(q.shape)} "
                         f"{q.dtype}, caches {tuple(k_cache.shape)} {k_cache.dtype}")
    b, d = q.shape[0], q.shape[2] // n_heads
    kvh = k_cache.shape[1]
    for name, x, width in (("q", q, n_heads * d), ("k", k, kvh * d), ("v", v, kvh * d)):
        if x.shape != (b, 1, width) or x.stride(-1) != 1:
            raise ValueError(f"decode_attention_rope: {name} must be ({b}, 1, {width}) with a unit last-dim stride, "
                             f"got {tuple(x.shape)}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not x.is_contiguous():
            raise ValueError(f"decode_attention_rope: {name} must be contiguous")
    rope = (k, v, inv_freq.float().contiguous(), q.stride(0), k.stride(0), v.stride(0), float(rope_scaling))
    return _attention(q, k_cache, v_cache, positions, scale, b, n_heads, d, rope)


def _attention(q, k_cache, v_cache, positions, scale, b, h, d, rope) -> torch.Tensor:
    """The two launches of `decode_attention` (rope: the raw k, v, inv_freq, the row strides of
    q, k, v and the rotary scaling for `decode_attention_rope`; None: q is rotated)."""
    kvh, L = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    block_g = max(16, triton.next_power_of_2(g))
    splits = max(1, min(64, triton.cdiv(L, ATTN_BLOCK_N)))
    chunk = triton.cdiv(triton.cdiv(L, splits), ATTN_BLOCK_N) * ATTN_BLOCK_N
    splits = triton.cdiv(L, chunk)
    ws_m = torch.empty((b * kvh * splits * block_g,), device=q.device, dtype=torch.float32)
    ws_l = torch.empty_like(ws_m)
    ws_acc = torch.empty((b * kvh * splits * block_g, d), device=q.device, dtype=torch.float32)
    out = torch.empty((b, 1, h * d), device=q.device, dtype=q.dtype)
    gdc = launch_kw(q.device)
    kn, vn, f, sq, sk, sv, rs = rope if rope is not None else (q, q, ws_m, 0, 0, 0, 1.0)
    _attn_partial_kernel[(b * kvh, splits)](q, k_cache, v_cache, positions, ws_m, ws_l, ws_acc, kn, vn, f, L, kvh,
                                            splits, chunk, float(scale), sq, sk, sv, rs, G=g, BLOCK_G=block_g, D=d,
                                            BLOCK_N=ATTN_BLOCK_N, IEEE=q.dtype == torch.float32, ROPE=rope is not None,
                                            num_warps=4, **gdc)
    _attn_combine_kernel[(b * h,)](ws_m, ws_l, ws_acc, out, kvh, splits, G=g, BLOCK_G=block_g, D=d,
                                   BLOCK_S=triton.next_power_of_2(splits), num_warps=4, **gdc)
    return out
