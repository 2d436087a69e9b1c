"""GGUF block formats: llama.cpp's quantization types as mixq formats.

    q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl     blocks of 32 elements, one float16 scale (and min)
    q2_k q3_k q4_k q5_k q6_k iq4_xs     super-blocks of 256: a float16 super-scale (and
                                        super-min) times small integer scales (and mins) of
                                        sub-blocks of 16 or 32 elements

Every value is `level[code] * step - offset`, computed in float32 exactly as llama.cpp's
`dequantize_row_*` computes it: `step` is the block's scale (legacy types: the float16 d;
k-quants: d * sc, the super-scale times the sub-block's integer scale, an exact float32
product), `offset` the subtracted minimum (q4_1/q5_1: -m, the negated float16 min; q2_k,
q4_k, q5_k: dmin * m) or none. Levels are code - 8 (q4_0), code - 16 (q5_0), code - 128 (q8_0,
codes 1..255 only: llama.cpp's int8 dot products cannot take -128), code - 4 (q3_k), code - 32
(q6_k), the code itself (q4_1, q5_1, q2_k, q4_k, q5_k) and the IQ4 table `IQ4_LEVELS`.

Representation (`QTensor`): `codes` (rows, cols) uint8 hold each element's code as above;
`scales` (rows, n_blocks * header_bytes) uint8 hold, per block, every byte of llama.cpp's
block that is not a code bit, in block order (d, dmin, the packed 4/6/8-bit sub-block scales
and mins, IQ4_XS's scales_h/scales_l). The header bytes are the truth: `step` and `offset`
are decoded from them (`block_params`), so what mixq computes with is what llama.cpp reads.
`to_blocks` interleaves headers and packed codes into llama.cpp's block bytes, row by row;
`from_blocks` reads them back. bits(shape) = 8 x the bytes llama.cpp stores: rows x
(cols / block) x type_size x 8, every scale and min included.

A row length that is not a multiple of the block (k-quants and IQ4_XS: 256; the others: 32)
cannot be stored: `supports(shape)` says why, and quantizing such a weight raises
FormatError (the planner never offers the type for that unit). Quantization first fixes the
block parameters from the weights (`gguf_fit`: legacy types by llama.cpp's own rules, the
others by a weighted least-squares search), then rounds every element to the nearest level
of those stored parameters; `group_size_for` is the block (GPTQ fixes one block's parameters
at a time), `sub_block` the columns sharing one (step, offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mixq.errors import FormatError
from mixq.formats.base import Layout, QTensor
from mixq.formats.grouping import check_qtensor, check_weight

QK_K = 256
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GGMLType:
    """One llama.cpp block type. `segments`: the block's bytes in order, ("h", n) header bytes
    or ("c", n) packed code bytes; `lo`: the level of code 0 (uniform grids), None for IQ4's
    table; `code_min`: the smallest code produced (q8_0: 1); `sub_scale`: the integer range of
    the sub-block scales (k-quants), `sub_min`: of the sub-block mins; `asym`: has mins."""

    name: str
    ggml: str
    block: int
    sub: int
    code_bits: int
    type_size: int
    segments: tuple[tuple[str, int], ...]
    lo: int | None
    asym: bool = False
    code_min: int = 0
    sub_scale: tuple[int, int] | None = None
    sub_min: tuple[int, int] | None = None

    @property
    def header_bytes(self) -> int:
        return sum(n for kind, n in self.segments if kind == "h")

    @property
    def n_sub(self) -> int:
        return self.block // self.sub

    def levels(self) -> torch.Tensor:
        """code -> level, float32 (2**code_bits,)."""
        if self.lo is None:
            return torch.tensor(IQ4_LEVELS, dtype=torch.float32)
        return torch.arange(2**self.code_bits, dtype=torch.float32) + self.lo


TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("q4_0", "Q4_0", 32, 32, 4, 18, (("h", 2), ("c", 16)), -8),
    GGMLType("q4_1", "Q4_1", 32, 32, 4, 20, (("h", 4), ("c", 16)), 0, asym=True),
    GGMLType("q5_0", "Q5_0", 32, 32, 5, 22, (("h", 2), ("c", 20)), -16),
    GGMLType("q5_1", "Q5_1", 32, 32, 5, 24, (("h", 4), ("c", 20)), 0, asym=True),
    GGMLType("q8_0", "Q8_0", 32, 32, 8, 34, (("h", 2), ("c", 32)), -128, code_min=1),
    GGMLType("iq4_nl", "IQ4_NL", 32, 32, 4, 18, (("h", 2), ("c", 16)), None),
    GGMLType("q2_k", "Q2_K", QK_K, 16, 2, 84, (("h", 16), ("c", 64), ("h", 4)), 0, asym=True,
             sub_scale=(0, 15), sub_min=(0, 15)),
    GGMLType("q3_k", "Q3_K", QK_K, 16, 3, 110, (("c", 96), ("h", 14)), -4, sub_scale=(-32, 31)),
    GGMLType("q4_k", "Q4_K", QK_K, 32, 4, 144, (("h", 16), ("c", 128)), 0, asym=True,
             sub_scale=(0, 63), sub_min=(0, 63)),
    GGMLType("q5_k", "Q5_K", QK_K, 32, 5, 176, (("h", 16), ("c", 160)), 0, asym=True,
             sub_scale=(0, 63), sub_min=(0, 63)),
    GGMLType("q6_k", "Q6_K", QK_K, 16, 6, 210, (("c", 192), ("h", 18)), -32, sub_scale=(-128, 127)),
    GGMLType("iq4_xs", "IQ4_XS", QK_K, 32, 4, 136, (("h", 8), ("c", 128)), None, sub_scale=(-32, 31)),
)}


# ------------------------------------------------------------------ header bytes <-> parameters


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(N,) float32 -> (N, 2) uint8: the float16 bit pattern, little-endian."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _f16_from(b: torch.Tensor) -> torch.Tensor:
    """(N, 2) uint8 -> (N,) float32."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


def encode_header(t: GGMLType, d: torch.Tensor, dmin: torch.Tensor | None = None,
                  sc: torch.Tensor | None = None, mi: torch.Tensor | None = None) -> torch.Tensor:
    """(N, header_bytes) uint8 from per-block float32 d (N,) (legacy types: the scale; q4_1 /
    q5_1: with dmin = the min m), and for k-quants the integer sub-block scales sc (N, S) and
    mins mi (N, S) (long, within the type's ranges). d and dmin are rounded to float16."""
    d16 = _f16_bytes(d)
    if t.sub_scale is None:
        return d16 if not t.asym else torch.cat([d16, _f16_bytes(dmin)], dim=1)
    n = d.shape[0]
    if t.name == "q2_k":
        return torch.cat([(sc | (mi << 4)).to(torch.uint8), d16, _f16_bytes(dmin)], dim=1)
    if t.name in ("q4_k", "q5_k"):
        s = torch.zeros(n, 12, dtype=torch.long, device=d.device)
        s[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
        s[:, 4:8] = mi[:, 0:4] | ((mi[:, 4:8] >> 4) << 6)
        s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mi[:, 4:8] & 0xF) << 4)
        return torch.cat([d16, _f16_bytes(dmin), s.to(torch.uint8)], dim=1)
    if t.name == "q3_k":
        u = sc + 32  # 0..63
        s = torch.zeros(n, 12, dtype=torch.long, device=d.device)
        s[:, 0:8] = (u[:, 0:8] & 0xF) | ((u[:, 8:16] & 0xF) << 4)
        for j in range(16):
            s[:, 8 + j % 4] |= (u[:, j] >> 4) << (2 * (j // 4))
        return torch.cat([s.to(torch.uint8), d16], dim=1)
    if t.name == "q6_k":
        return torch.cat([(sc & 0xFF).to(torch.uint8), d16], dim=1)
    if t.name == "iq4_xs":
        u = sc + 32
        hi = torch.zeros(n, dtype=torch.long, device=d.device)
        for j in range(8):
            hi |= (u[:, j] >> 4) << (2 * j)
        lo = (u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4)  # (N, 4)
        h = torch.stack([hi & 0xFF, hi >> 8], dim=1)
        return torch.cat([d16, h.to(torch.uint8), lo.to(torch.uint8)], dim=1)
    raise AssertionError(t.name)


def block_params(t: GGMLType, header: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step (N, S), offset (N, S) | None) float32 of blocks from their header bytes (N, hb):
    value = level * step - offset, the numbers llama.cpp's dequantization computes with."""
    h = header.to(torch.long)
    d = _f16_from(header[:, 0:2]) if t.name not in ("q2_k", "q3_k", "q6_k") else None
    if t.sub_scale is None:
        step = d.unsqueeze(1)
        return step, (-_f16_from(header[:, 2:4]).unsqueeze(1) if t.asym else None)
    if t.name == "q2_k":
        d, dmin = _f16_from(header[:, 16:18]), _f16_from(header[:, 18:20])
        sc, mi = h[:, :16] & 0xF, h[:, :16] >> 4
    elif t.name in ("q4_k", "q5_k"):
        dmin = _f16_from(header[:, 2:4])
        q = h[:, 4:16]
        sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
        mi = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    elif t.name == "q3_k":
        d = _f16_from(header[:, 12:14])
        low = torch.cat([h[:, 0:8] & 0xF, h[:, 0:8] >> 4], dim=1)  # (N, 16)
        high = torch.stack([(h[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], dim=1)
        sc = (low | (high << 4)) - 32
    elif t.name == "q6_k":
        d = _f16_from(header[:, 16:18])
        sc = header[:, :16].view(torch.int8).to(torch.long)
    elif t.name == "iq4_xs":
        hi = h[:, 2] | (h[:, 3] << 8)
        lo = torch.stack([h[:, 4:8] & 0xF, h[:, 4:8] >> 4], dim=2).reshape(-1, 8)
        sc = (lo | (torch.stack([(hi >> (2 * j)) & 3 for j in range(8)], dim=1) << 4)) - 32
    else:
        raise AssertionError(t.name)
    step = d.unsqueeze(1) * sc.float()  # exact: an 11-bit mantissa times an integer < 2**8
    offset = dmin.unsqueeze(1) * mi.float() if t.asym else None
    return step, offset


# ------------------------------------------------------------------ codes <-> block bytes


def _nibbles(c: torch.Tensor) -> torch.Tensor:
    """(N, 32k) codes < 16 -> (N, 16k) bytes: per 32, byte j = c[j] | c[j + 16] << 4."""
    c = c.reshape(c.shape[0], -1, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(c.shape[0], -1)


def _unnibble(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(b.shape[0], -1, 1, 16)
    return torch.cat([b & 0xF, b >> 4], dim=2).reshape(b.shape[0], -1)


def _bitplane(bits: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(N, 256) bits -> (N, n_rows) bytes: element e sets bit e // n_rows of byte e % n_rows."""
    b = bits.reshape(bits.shape[0], -1, n_rows)  # (N, 256 / n_rows, n_rows)
    shifts = torch.arange(b.shape[1], device=b.device).reshape(1, -1, 1)
    return (b << shifts).sum(1)


def _unbitplane(b: torch.Tensor, n_bits: int) -> torch.Tensor:
    shifts = torch.arange(n_bits, device=b.device).reshape(1, -1, 1)
    return ((b.unsqueeze(1) >> shifts) & 1).reshape(b.shape[0], -1)


def _crumbs(c: torch.Tensor) -> torch.Tensor:
    """(N, 256) 2-bit values -> (N, 64) bytes, the q2_k/q3_k order: per half of 128, byte l
    holds elements l, l + 32, l + 64, l + 96 in bits 0-1, 2-3, 4-5, 6-7."""
    c = c.reshape(c.shape[0], 2, 4, 32)
    shifts = (2 * torch.arange(4, device=c.device)).reshape(1, 1, 4, 1)
    return (c << shifts).sum(2).reshape(c.shape[0], 64)


def _uncrumbs(b: torch.Tensor) -> torch.Tensor:
    shifts = (2 * torch.arange(4, device=b.device)).reshape(1, 1, 4, 1)
    return ((b.reshape(b.shape[0], 2, 1, 32) >> shifts) & 3).reshape(b.shape[0], 256)


def pack_codes(t: GGMLType, codes: torch.Tensor) -> torch.Tensor:
    """(N, block) codes -> (N, code bytes) uint8 in llama.cpp's order."""
    c = codes.to(torch.long)
    n = c.shape[0]
    if t.name in ("q4_0", "q4_1", "iq4_nl", "iq4_xs"):
        out = _nibbles(c)
    elif t.name in ("q5_0", "q5_1"):
        qh = (((c >> 4) & 1) << torch.arange(32, device=c.device)).sum(1)  # uint32 little-endian
        out = torch.cat([torch.stack([(qh >> (8 * i)) & 0xFF for i in range(4)], 1), _nibbles(c & 0xF)], 1)
    elif t.name == "q8_0":
        out = c ^ 0x80  # offset binary -> two's complement int8
    elif t.name == "q2_k":
        out = _crumbs(c)
    elif t.name == "q3_k":
        out = torch.cat([_bitplane(c >> 2, 32), _crumbs(c & 3)], 1)
    elif t.name == "q4_k":
        out = (c.reshape(n, 4, 2, 32) << torch.tensor([0, 4], device=c.device).reshape(1, 1, 2, 1)).sum(2).reshape(n, 128)
    elif t.name == "q5_k":
        low = ((c & 0xF).reshape(n, 4, 2, 32) << torch.tensor([0, 4], device=c.device).reshape(1, 1, 2, 1)).sum(2).reshape(n, 128)
        out = torch.cat([_bitplane(c >> 4, 32), low], 1)
    elif t.name == "q6_k":
        q = c.reshape(n, 2, 4, 32)  # (half, quarter, l)
        ql = torch.stack([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                          (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], dim=2).reshape(n, 128)
        qh = ((q >> 4) << (2 * torch.arange(4, device=c.device)).reshape(1, 1, 4, 1)).sum(2).reshape(n, 64)
        out = torch.cat([ql, qh], 1)
    else:
        raise AssertionError(t.name)
    return out.to(torch.uint8)


def unpack_codes(t: GGMLType, b: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_codes`: (N, code bytes) uint8 -> (N, block) uint8 codes."""
    b = b.to(torch.long)
    n = b.shape[0]
    if t.name in ("q4_0", "q4_1", "iq4_nl", "iq4_xs"):
        c = _unnibble(b)
    elif t.name in ("q5_0", "q5_1"):
        qh = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
        c = _unnibble(b[:, 4:]) | (((qh.unsqueeze(1) >> torch.arange(32, device=b.device)) & 1) << 4)
    elif t.name == "q8_0":
        c = b ^ 0x80
    elif t.name == "q2_k":
        c = _uncrumbs(b)
    elif t.name == "q3_k":
        c = _uncrumbs(b[:, 32:]) | (_unbitplane(b[:, :32], 8) << 2)
    elif t.name == "q4_k":
        c = ((b.reshape(n, 4, 1, 32) >> torch.tensor([0, 4], device=b.device).reshape(1, 1, 2, 1)) & 0xF).reshape(n, 256)
    elif t.name == "q5_k":
        low = ((b[:, 32:].reshape(n, 4, 1, 32) >> torch.tensor([0, 4], device=b.device).reshape(1, 1, 2, 1)) & 0xF).reshape(n, 256)
        c = low | (_unbitplane(b[:, :32], 8) << 4)
    elif t.name == "q6_k":
        ql = b[:, :128].reshape(n, 2, 2, 32)  # (half, l + 32 k, l)
        qh = b[:, 128:].reshape(n, 2, 1, 32)
        low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
        high = (qh >> (2 * torch.arange(4, device=b.device)).reshape(1, 1, 4, 1)) & 3
        c = (low | (high << 4)).reshape(n, 256)
    else:
        raise AssertionError(t.name)
    return c.to(torch.uint8)


def to_blocks(q: QTensor) -> np.ndarray:
    """llama.cpp's bytes of a GGUF-format QTensor: (rows, n_blocks * type_size) uint8."""
    t = TYPES[q.fmt]
    rows, cols = q.shape
    nb = cols // t.block
    codes = pack_codes(t, q.codes.reshape(rows * nb, t.block).cpu())  # (N, code bytes)
    header = q.scales.reshape(rows * nb, t.header_bytes).cpu()
    parts, hi, ci = [], 0, 0
    for kind, n in t.segments:
        if kind == "h":
            parts.append(header[:, hi:hi + n])
            hi += n
        else:
            parts.append(codes[:, ci:ci + n])
            ci += n
    return torch.cat(parts, dim=1).reshape(rows, nb * t.type_size).numpy()


def from_blocks(fmt: "GGUFFormat | str", data: np.ndarray, shape: tuple[int, int]) -> QTensor:
    """The QTensor of llama.cpp block bytes `data` (rows * n_blocks * type_size bytes)."""
    t = TYPES[str(fmt)]
    rows, cols = shape
    nb = cols // t.block
    raw = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8).reshape(rows * nb, t.type_size).copy())
    headers, codes, at = [], [], 0
    for kind, n in t.segments:
        (headers if kind == "h" else codes).append(raw[:, at:at + n])
        at += n
    c = unpack_codes(t, torch.cat(codes, dim=1)).reshape(rows, cols)
    return QTensor(t.name, (rows, cols), c, torch.cat(headers, dim=1).reshape(rows, nb * t.header_bytes).contiguous())


# ------------------------------------------------------------------ the format


@dataclass(frozen=True)
class GGUFFormat:
    """A llama.cpp block type (`name` a key of TYPES: q4_0, q4_k, iq4_nl, ...)."""

    name: str

    def __post_init__(self):
        if self.name not in TYPES:
            raise FormatError(f"unknown GGUF type {self.name!r}; expected one of {', '.join(TYPES)}")

    def __str__(self) -> str:
        return self.name

    @property
    def type(self) -> GGMLType:
        return TYPES[self.name]

    @property
    def ggml_type(self) -> str:
        """llama.cpp's name of the type (Q4_K, IQ4_NL, ...)."""
        return self.type.ggml

    @property
    def code_bits(self) -> int:
        return self.type.code_bits

    @property
    def asym(self) -> bool:
        """Whether blocks carry a min (q4_1, q5_1, q2_k, q4_k, q5_k)."""
        return self.type.asym

    @property
    def sub_block(self) -> int:
        """Consecutive columns sharing one (step, offset)."""
        return self.type.sub

    def group_size_for(self, cols: int) -> int:
        return self.type.block

    def levels(self) -> torch.Tensor:
        return self.type.levels()

    def supports(self, shape: tuple[int, int]) -> str | None:
        cols = int(shape[1])
        if cols % self.type.block:
            return (f"{self.name} stores rows in blocks of {self.type.block}; a row of {cols} is not a multiple "
                    f"of {self.type.block}")
        return None

    def _check_shape(self, shape) -> None:
        why = self.supports(shape)
        if why is not None:
            raise FormatError(f"format {self.name} cannot hold a weight of shape {tuple(shape)}: {why}")

    def layout(self, shape: tuple[int, int]) -> Layout:
        self._check_shape(shape)
        rows, cols = int(shape[0]), int(shape[1])
        return Layout(self.code_bits, rows * cols, (rows, cols // self.type.block * self.type.header_bytes),
                      torch.uint8)

    def bits(self, shape: tuple[int, int]) -> int:
        return self.layout(shape).bits

    # -- quantization ------------------------------------------------------------------------

    def headers(self, w: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, n_blocks * header_bytes) uint8: the block parameters fixed from w (rows,
        cols), optionally weighing each element's squared error by `weights` (cols,) or
        (rows, cols) (e.g. the inputs' second moments)."""
        from mixq.formats.gguf_fit import fit_headers

        check_weight(w)
        self._check_shape(w.shape)
        return fit_headers(self.type, w.float(), weights)

    def params(self, header: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(step (rows, n_sub), offset (rows, n_sub) | None) of a header tensor (rows, ...)."""
        t = self.type
        step, offset = block_params(t, header.reshape(-1, t.header_bytes))
        return step.reshape(rows, -1), None if offset is None else offset.reshape(rows, -1)

    def encode(self, x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None,
               with_codes: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(codes uint8 | None, values float32) of x rounded to the nearest level of fixed
        parameters; x, step and offset broadcast (e.g. (R, S, sub) against (R, S, 1))."""
        t = self.type
        y = (x + offset) if offset is not None else x
        safe = torch.where(step != 0, step, torch.ones_like(step))
        y = torch.where(step != 0, y / safe, torch.zeros_like(y))
        if t.lo is None:
            levels = self.levels().to(x.device)
            mids = (levels[1:] + levels[:-1]) / 2
            codes = torch.bucketize(y, mids)  # nearest level (ties to the lower one)
            lv = levels[codes]
        else:
            lv = torch.clamp(torch.round(y), t.lo + t.code_min, t.lo + 2**t.code_bits - 1)
            codes = lv - t.lo
        values = lv * step
        if offset is not None:
            values = values - offset
        return (codes.to(torch.uint8) if with_codes else None), values

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        return w.reshape(rows, cols // self.sub_block, self.sub_block)  # (R, S, sub)

    def quantize(self, w: torch.Tensor) -> QTensor:
        header = self.headers(w)
        rows, cols = w.shape
        step, offset = self.params(header, rows)
        codes, _ = self.encode(self._grouped(w.float()), step.unsqueeze(-1),
                               None if offset is None else offset.unsqueeze(-1))
        return QTensor(self.name, (rows, cols), codes.reshape(rows, cols), header)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(w)).to(w.dtype)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        check_qtensor(q, self)
        rows, cols = q.shape
        step, offset = self.params(q.scales, rows)
        levels = self.levels().to(q.codes.device)[q.codes.long()]  # (R, cols)
        values = levels.reshape(rows, -1, self.sub_block) * step.unsqueeze(-1)
        if offset is not None:
            values = values - offset.unsqueeze(-1)
        return values.reshape(rows, cols)


# ------------------------------------------------------------------ mixq formats -> GGML types


def ggml_type_of(fmt) -> str | None:
    """The GGML type whose stored values are exactly `fmt`'s (F16/BF16/F32 for unquantized
    formats, Q4_0 for `int4:g32`, Q5_0 for `int5:g32`, each GGUF format its own), else None."""
    from mixq.formats.intk import IntFormat
    from mixq.formats.plain import PlainFormat

    if isinstance(fmt, GGUFFormat):
        return fmt.ggml_type
    if isinstance(fmt, PlainFormat):
        return {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}[fmt.name]
    if isinstance(fmt, IntFormat) and not fmt.asym and fmt.group_size == 32 and fmt.code_bits in INT_AS_GGML:
        return INT_AS_GGML[fmt.code_bits]
    return None


# Symmetric INT with the signed scale (levels -2**(k-1) .. 2**(k-1) - 1, value = level * fp16
# scale) is exactly Q4_0 / Q5_0 at k = 4 / 5 with groups of 32: the same codes and the same
# float16 d. int8:g32 is not Q8_0: its extreme lands on -128, which llama.cpp's int8 dot
# products cannot take.
INT_AS_GGML = {4: "Q4_0", 5: "Q5_0"}


def nearest_ggml(fmt, shape: tuple[int, int] | None = None) -> list[str]:
    """The GGUF formats (mixq names) closest in bits per weight to `fmt`, that a weight of
    `shape` can take: what a refusal suggests instead."""
    from mixq.formats.spec import parse

    fmt = parse(fmt)
    shape = tuple(shape) if shape is not None else (256, 4096)
    try:
        bpw = fmt.bits(shape) / (shape[0] * shape[1])
    except FormatError:
        bpw = float(fmt.code_bits)
    ok = [t for t in TYPES if GGUFFormat(t).supports(shape) is None]
    ok.sort(key=lambda t: (abs(GGUFFormat(t).bits(shape) / (shape[0] * shape[1]) - bpw), t))
    return ok[:2]


def int_to_gguf(q: QTensor) -> QTensor:
    """An `int4:g32` / `int5:g32` QTensor as the equal Q4_0 / Q5_0 one (same codes, the float16
    scales as header bytes)."""
    name = {"Q4_0": "q4_0", "Q5_0": "q5_0"}[INT_AS_GGML[int(q.fmt[3])]]
    rows, _ = q.shape
    header = q.scales.to(torch.float16).contiguous().view(torch.uint8).reshape(rows, -1)
    return QTensor(name, q.shape, q.codes, header)
