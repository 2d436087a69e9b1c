"""KV-cache formats: how the keys and values an attention layer caches are stored.

    kv = parse_kv("int3:kchan:out1%:sink")     # str(kv) round-trips
    kv.bits(context=8192, n_kv_heads=3, head_dim=64)   # exact bits of one layer's K and V

Spec grammar (case-insensitive; options after the head in any order):

    int<2..8>[:g<N>][:asym][:kchan[<T>]][:out<P>%][:sink[<S>]]
    nf<2..4>[:g<N>][:kchan[<T>]][:out<P>%][:sink[<S>]]
    fp16 | bf16                                   unquantized (16 bits)

- Values are always quantized per token: one scale per token and head (`:g<N>`: per group of
  N channels of the head; N must divide the head dimension).
- Keys: per token too (the plain baseline, quantized *after* the rotary embedding, as a cache
  stores them), or with `:kchan` per channel *before* the rotary embedding (KVQuant): one
  scale per key channel over each block of T tokens (default 128), so the few large key
  channels get their own range instead of setting every token's.
- `int` grids are mixq's INT-k (`formats.intk`: symmetric with a signed scale, or `:asym`
  with a zero point); `nf` grids are NormalFloat levels (quantiles of N(0, 1) scaled to
  [-1, 1], QLoRA's construction; nf4 is the NF4 table) times an absmax scale per group.
- `:out<P>%` (dense-and-sparse): in every cached tensor the P% of entries that are largest
  relative to their own vector (|x| over the RMS of the token's head, or of the channel's
  token block) stay in fp16 beside the codes (value + 16-bit position: 32 bits each) and are
  left out of the ranges.
- `:sink[<S>]`: the first S tokens (default 1, the attention sink) stay in fp16.

Scales and zero points are fp16 / k-bit like the weight formats'; `bits(context, ...)`
counts everything a cache of `context` tokens stores for one layer's keys and values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from mixq.errors import FormatError

KV_FORMS = ("int<2..8>[:g<N>][:asym][:kchan[<T>]][:out<P>%][:sink[<S>]]  (int4, int4:kchan, int3:kchan:out1%:sink)",
            "nf<2..4>[:g<N>][:kchan[<T>]][:out<P>%][:sink[<S>]]  (nf4:kchan)", "fp16 | bf16  (unquantized)")
FLOAT_KV = ("fp16", "bf16")
DEFAULT_KEY_BLOCK = 128
OUTLIER_BITS = 32  # fp16 value + 16-bit position
SCALE_BITS = 16


def _fail(spec: str, reason: str) -> FormatError:
    return FormatError(f"bad KV spec {spec!r}: {reason}; valid forms: " + "; ".join(KV_FORMS))


@dataclass(frozen=True)
class KVFormat:
    """A KV-cache format (see the module docstring). grid: "int", "nf" or a float dtype
    ("fp16", "bf16"); bits: code width; group: channels per value/key-token scale (None: the
    whole head); key_block: tokens per key-channel scale (None: keys per token, after
    RoPE); outlier_pct: percent of entries kept in fp16; sink: leading tokens kept in fp16."""

    grid: str
    bits: int = 16
    group: int | None = None
    asym: bool = False
    key_block: int | None = None
    outlier_pct: float = 0.0
    sink: int = 0

    def __post_init__(self) -> None:
        if self.grid in FLOAT_KV:
            if (self.bits, self.group, self.asym, self.key_block, self.outlier_pct, self.sink) != (16, None, False,
                                                                                                  None, 0.0, 0):
                raise _fail(self.grid, f"{self.grid} is unquantized and takes no options")
            return
        if self.grid == "int" and not 2 <= self.bits <= 8:
            raise _fail(f"int{self.bits}", "int bits must be 2..8")
        if self.grid == "nf" and not 2 <= self.bits <= 4:
            raise _fail(f"nf{self.bits}", "nf bits must be 2..4")
        if self.grid not in ("int", "nf"):
            raise _fail(self.grid, f"unknown grid {self.grid!r}")
        if self.asym and self.grid != "int":
            raise _fail(str(self), "asym applies to int grids only")
        if self.group is not None and self.group < 1:
            raise _fail(str(self), "group size must be a positive integer")
        if self.key_block is not None and self.key_block < 1:
            raise _fail(str(self), "kchan token block must be a positive integer")
        if not 0.0 <= self.outlier_pct < 50.0:
            raise _fail(str(self), f"outlier percent must be in [0, 50), got {self.outlier_pct:g}")
        if self.sink < 0:
            raise _fail(str(self), "sink tokens must be >= 0")

    def __str__(self) -> str:
        if self.grid in FLOAT_KV:
            return self.grid
        parts = [f"{self.grid}{self.bits}"]
        if self.group is not None:
            parts.append(f"g{self.group}")
        if self.asym:
            parts.append("asym")
        if self.key_block is not None:
            parts.append("kchan" if self.key_block == DEFAULT_KEY_BLOCK else f"kchan{self.key_block}")
        if self.outlier_pct:
            parts.append(f"out{self.outlier_pct:g}%")
        if self.sink:
            parts.append("sink" if self.sink == 1 else f"sink{self.sink}")
        return ":".join(parts)

    @property
    def is_float(self) -> bool:
        return self.grid in FLOAT_KV

    def check_head(self, head_dim: int) -> None:
        """FormatError unless the per-token group divides the head dimension."""
        if self.group is not None and head_dim % self.group:
            raise FormatError(f"KV format {self}: groups of {self.group} do not divide the head dimension {head_dim}")

    def group_for(self, head_dim: int) -> int:
        return head_dim if self.group is None else self.group

    def bits_total(self, context: int, n_kv_heads: int, head_dim: int) -> int:
        """Exact bits one layer's cache holds for `context` tokens: keys and values, codes,
        scales, zero points, outliers (value + position) and fp16 sink tokens."""
        n = n_kv_heads * head_dim  # elements per token, per K or V
        if self.is_float:
            return 16 * 2 * n * context
        self.check_head(head_dim)
        sink = min(self.sink, context)
        t = context - sink
        zero = self.bits if self.asym else 0
        per_token_scales = n // self.group_for(head_dim)  # per token and tensor
        v_bits = self.bits * n * t + (SCALE_BITS + zero) * per_token_scales * t
        if self.key_block is None:
            k_bits = v_bits
        else:
            k_bits = self.bits * n * t + (SCALE_BITS + zero) * n * (-(-t // self.key_block))
        outliers = 2 * math.floor(self.outlier_pct / 100.0 * n * t) * OUTLIER_BITS
        return k_bits + v_bits + outliers + 16 * 2 * n * sink

    def bits_per_element(self, context: int, n_kv_heads: int, head_dim: int) -> float:
        """All-in bits per cached element (keys and values) at `context` tokens."""
        return self.bits_total(context, n_kv_heads, head_dim) / (2 * n_kv_heads * head_dim * context)

    def levels(self) -> torch.Tensor:
        """NF grid levels (ascending float32, 2**bits values in [-1, 1])."""
        if self.grid != "nf":
            raise FormatError(f"KV format {self} has no NF levels")
        return nf_levels(self.bits)


def nf_levels(bits: int) -> torch.Tensor:
    """NormalFloat levels of `bits` bits (QLoRA, appendix E): 2^(b-1) positive quantiles
    of N(0, 1) over [0.5, δ], 2^(b-1) - 1 negative ones and an exact 0, scaled to max 1;
    δ = (1 - 1/(2·15) + 1 - 1/(2·16)) / 2 as bitsandbytes uses for every width (for b = 4
    these are the NF4 table's values)."""
    delta = 0.5 * (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16))
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


def parse_kv(spec: str | KVFormat) -> KVFormat:
    """The KV format a spec names (see the module docstring)."""
    if isinstance(spec, KVFormat):
        return spec
    if not isinstance(spec, str):
        raise FormatError(f"KV spec must be a string, got {type(spec).__name__}")
    text = "".join(spec.split()).lower()
    if not text:
        raise _fail(spec, "empty spec")
    head, *opts = text.split(":")
    if head in ("fp16", "bf16", "float16", "bfloat16", "half"):
        if opts:
            raise _fail(spec, f"{head} is unquantized and takes no options")
        return KVFormat("bf16" if head in ("bf16", "bfloat16") else "fp16")
    m = re.fullmatch(r"(int|nf)(\d+)", head)
    if not m:
        raise _fail(spec, f"unknown KV grid {head!r}")
    fields: dict = {}

    def put(key, value, opt):
        if key in fields:
            raise _fail(spec, f"option {opt!r} given twice")
        fields[key] = value

    for opt in opts:
        if (g := re.fullmatch(r"g(\d+)", opt)):
            put("group", int(g.group(1)), opt)
        elif opt == "asym":
            put("asym", True, opt)
        elif (k := re.fullmatch(r"kchan(\d*)", opt)):
            put("key_block", int(k.group(1)) if k.group(1) else DEFAULT_KEY_BLOCK, opt)
        elif (o := re.fullmatch(r"out(\d+(?:\.\d+)?)%", opt)):
            put("outlier_pct", float(o.group(1)), opt)
        elif (s := re.fullmatch(r"sink(\d*)", opt)):
            put("sink", int(s.group(1)) if s.group(1) else 1, opt)
        elif opt in ("tok", "ktok"):
            continue  # the default: per token
        else:
            raise _fail(spec, f"unknown option {opt!r}")
    try:
        return KVFormat(m.group(1), int(m.group(2)), **fields)
    except FormatError as e:
        if "bad KV spec" in str(e) and spec in str(e):
            raise
        raise _fail(spec, str(e).split(": ", 1)[-1].split("; valid forms")[0]) from e


__all__ = ["FLOAT_KV", "KVFormat", "KV_FORMS", "nf_levels", "parse_kv"]
