"""Fake quantization of cached keys and values: tensor in, tensor out.

    k_hat = quantize_keys(k, fmt, rope)      # k (batch, tokens, kv_heads, head_dim), before RoPE
    v_hat = quantize_values(v, fmt)          # v (batch, tokens, kv_heads, head_dim)

Keys arrive *before* the rotary embedding (they are taken at the key projection's output).
A `:kchan` format quantizes them there, per channel over blocks of `key_block` tokens
(KVQuant); a per-token format quantizes what the cache would hold, the rotated keys:
k̂ = R⁻¹ Q(R k) with R the rotary embedding of each position (`rope(x, inverse)`), which
the attention then rotates again, R k̂ = Q(R k). Values are quantized per token.

Within a tensor, each *vector* (a token's head, or a key channel's block of tokens) is one
row of a 2-D view quantized by its grid with one scale per row (or per `group` channels):

- INT: `formats.IntFormat` (symmetric signed scale, or asym with a zero point);
- NF: absmax per group scaled onto `nf_levels(bits)`, nearest level (fp16 scale);
- outliers (`outlier_pct`): the entries with the largest |x| / RMS(own vector), that
  fraction of the tensor (floor), are kept exactly and left out of their group's range;
- the first `sink` tokens are kept exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from mixq.formats.grouping import PER_CHANNEL, fp16_scale, from_groups, to_groups
from mixq.formats.intk import IntFormat
from mixq.formats.kvcache import KVFormat, nf_levels

# rope(x (batch, tokens, heads, head_dim), inverse) -> x rotated by each position's angle
Rope = Callable[[torch.Tensor, bool], torch.Tensor]


def _nf_fake_quant(rows: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """NF grid with an fp16 absmax scale per group of `group_size` along each row (or the row)."""
    x = to_groups(rows, group_size)  # (R, G, g)
    scale = fp16_scale(x.abs().amax(-1, keepdim=True))  # (R, G, 1)
    levels = nf_levels(bits).to(rows.device)
    mids = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize((x / scale).contiguous(), mids)
    return from_groups(levels[codes] * scale, tuple(rows.shape), group_size)


def quantize_rows(rows: torch.Tensor, fmt: KVFormat, group_size: int) -> torch.Tensor:
    """Each row of `rows` (R, L) quantized by `fmt`'s grid, one scale per `group_size`
    consecutive entries (PER_CHANNEL (0): per row), outliers kept (see the module docstring)."""
    rows = rows.float()
    mask = _outliers(rows, fmt.outlier_pct)
    dense = rows if mask is None else torch.where(mask, torch.zeros_like(rows), rows)
    if fmt.grid == "int":
        out = IntFormat(fmt.bits, group_size, asym=fmt.asym).fake_quant(dense)
    else:
        out = _nf_fake_quant(dense, fmt.bits, rows.shape[1] if group_size == PER_CHANNEL else group_size)
    return out if mask is None else torch.where(mask, rows, out)


def _outliers(rows: torch.Tensor, pct: float) -> torch.Tensor | None:
    """Mask (R, L) of the floor(pct% of all entries) entries of largest |x| / RMS(row)."""
    k = math.floor(pct / 100.0 * rows.numel())
    if k <= 0:
        return None
    rms = rows.square().mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    z = (rows.abs() / rms).reshape(-1)
    mask = torch.zeros_like(z, dtype=torch.bool)
    mask[torch.topk(z, k, sorted=False).indices] = True
    return mask.reshape(rows.shape)


def _per_token(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """x (B, T, H, D): one row per (token, head), groups along D."""
    B, T, H, D = x.shape
    group = fmt.group_for(D)
    out = quantize_rows(x.reshape(B * T * H, D), fmt, PER_CHANNEL if group == D else group)
    return out.reshape(B, T, H, D)


def _per_channel(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """x (B, T, H, D): one row per (sequence, head, channel) along the tokens, a scale per
    block of `key_block` tokens (the last block partial)."""
    B, T, H, D = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(B * H * D, T)  # (channels, tokens)
    out = quantize_rows(rows, fmt, fmt.key_block if fmt.key_block < T else PER_CHANNEL)
    return out.reshape(B, H, D, T).permute(0, 3, 1, 2)


def _split_sink(x: torch.Tensor, fmt: KVFormat, quantize: Callable) -> torch.Tensor:
    s = min(fmt.sink, x.shape[1])
    if s == x.shape[1]:
        return x
    body = quantize(x[:, s:].float()).to(x.dtype)
    return body if s == 0 else torch.cat([x[:, :s], body], dim=1)


def quantize_keys(k: torch.Tensor, fmt: KVFormat, rope: Rope | None = None) -> torch.Tensor:
    """Keys k (B, T, H, D) before RoPE, fake-quantized as the cache would hold them (see the
    module docstring); `rope` is the layer's rotary embedding of these positions (None: the
    model has none, keys are cached as they are)."""
    if fmt.is_float:
        return k.to(torch.float16 if fmt.grid == "fp16" else torch.bfloat16).to(k.dtype)
    fmt.check_head(k.shape[-1])
    if fmt.key_block is not None:
        return _split_sink(k, fmt, lambda x: _per_channel(x, fmt))
    if rope is None:
        return _split_sink(k, fmt, lambda x: _per_token(x, fmt))
    # per token after RoPE: quantize R k, hand back R⁻¹ of it (float32 for the rotations)
    rotated = rope(k.float(), False)
    q = _split_sink(rotated, fmt, lambda x: _per_token(x, fmt))
    return rope(q, True).to(k.dtype)


def quantize_values(v: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Values v (B, T, H, D), fake-quantized per token (see the module docstring)."""
    if fmt.is_float:
        return v.to(torch.float16 if fmt.grid == "fp16" else torch.bfloat16).to(v.dtype)
    fmt.check_head(v.shape[-1])
    return _split_sink(v, fmt, lambda x: _per_token(x, fmt))


__all__ = ["Rope", "quantize_keys", "quantize_rows", "quantize_values"]
