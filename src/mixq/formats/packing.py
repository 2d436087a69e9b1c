"""Bit packing of codes, and the packed byte streams of a whole QTensor.

`pack` writes codes as an LSB-first bitstream: code i occupies bits [i*b, (i+1)*b) of the
stream, bit j of byte n being stream bit 8n + j. For b = 4 this is the usual "two codes per
byte, low nibble first"; for b = 8 it is the codes themselves. Codes are flattened row-major.

`pack_qtensor` gives the streams a checkpoint stores for one weight: codes and zeros packed at
the format's code_bits; scales and the tensor scale as their raw little-endian bytes (float16:
2 bytes, E8M0 / E4M3: 1 byte, float32 tensor scale: 4 bytes); unquantized formats store the
raw bytes of the cast tensor. 8 x their byte total equals `fmt.bits(shape)` up to the byte
rounding of each packed stream.
"""

from __future__ import annotations

import torch

from mixq.errors import FormatError
from mixq.formats.base import Format, QTensor


def _check(bits: int, what: str) -> None:
    if not 1 <= bits <= 8:
        raise FormatError(f"{what}: bits must be 1..8, got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """1-D uint8 bitstream of ceil(numel * bits / 8) bytes from uint8 codes < 2**bits, on the
    codes' device. Eight codes make `bits` whole bytes: each group of eight is summed into one
    int64 (code k at bit k * bits, at most 56 bits) whose bytes, low first, are the stream."""
    _check(bits, "pack")
    if codes.dtype != torch.uint8:
        raise FormatError(f"pack: codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1).contiguous()
    n = flat.numel()
    if n and int(flat.max()) >= 1 << bits:
        raise FormatError(f"pack: a code is >= 2**{bits}")
    if bits == 8:
        return flat.clone()
    n_bytes = -(-n * bits // 8)
    groups = torch.nn.functional.pad(flat, (0, -n % 8)).view(-1, 8).long()  # (G, 8)
    shifts = torch.arange(0, 8 * bits, bits, device=flat.device)
    word = (groups << shifts).sum(1)  # (G,) the 8 codes' bits, disjoint, so the sum is an OR
    byte_shifts = torch.arange(0, 8 * bits, 8, device=flat.device)
    return ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)[:n_bytes].clone()


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """1-D uint8 codes: the first `numel` codes of a `pack`ed stream (on its device)."""
    _check(bits, "unpack")
    if packed.numel() * 8 < numel * bits:
        raise FormatError(f"unpack: {packed.numel()} bytes hold fewer than {numel} {bits}-bit codes")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[:numel].clone()
    n_groups = -(-numel // 8)
    need = n_groups * bits
    body = flat[: min(need, flat.numel())]
    body = torch.nn.functional.pad(body, (0, need - body.numel())).view(-1, bits).long()  # (G, bits) bytes
    byte_shifts = torch.arange(0, 8 * bits, 8, device=flat.device)
    word = (body << byte_shifts).sum(1)  # (G,)
    shifts = torch.arange(0, 8 * bits, bits, device=flat.device)
    return ((word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)[:numel].clone()


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def pack_qtensor(q: QTensor, fmt: Format) -> dict[str, torch.Tensor]:
    """The 1-D uint8 streams stored for `q`: 'codes', and 'scales', 'zeros', 'tensor_scale'
    where the format has them."""
    if q.codes.dtype != torch.uint8:  # unquantized: the cast tensor's raw bytes
        streams = {"codes": _raw_bytes(q.codes)}
    else:
        streams = {"codes": pack(q.codes, fmt.code_bits)}
    if q.scales is not None:
        streams["scales"] = _raw_bytes(q.scales)
    if q.zeros is not None:
        streams["zeros"] = pack(q.zeros, fmt.code_bits)
    if q.tensor_scale is not None:
        streams["tensor_scale"] = _raw_bytes(q.tensor_scale.float())
    return streams


def unpack_qtensor(streams: dict[str, torch.Tensor], fmt: Format, shape: tuple[int, int]) -> QTensor:
    """Inverse of `pack_qtensor`, using `fmt.layout(shape)` for the stream shapes."""
    layout = fmt.layout(shape)
    rows, cols = shape
    if layout.scales_shape is None and layout.code_bits > 8:  # unquantized
        dtype = getattr(fmt, "dtype")
        codes = streams["codes"].view(dtype).reshape(rows, cols)
        return QTensor(str(fmt), tuple(shape), codes, None)
    codes = unpack(streams["codes"], layout.code_bits, rows * cols).reshape(rows, cols)
    scales = zeros = tensor_scale = None
    if layout.scales_shape is not None:
        scales = streams["scales"].view(layout.scale_dtype).reshape(layout.scales_shape)
    if layout.has_zeros:
        zeros = unpack(streams["zeros"], layout.code_bits, layout.n_scales).reshape(layout.scales_shape)
    if layout.tensor_scale_bits:
        tensor_scale = streams["tensor_scale"].view(torch.float32).reshape(())
    return QTensor(str(fmt), tuple(shape), codes, scales, zeros, tensor_scale)


def qtensor_nbytes(q: QTensor, fmt: Format) -> int:
    """Bytes of all packed streams of `q` (what a checkpoint writes for this weight)."""
    return sum(s.numel() for s in pack_qtensor(q, fmt).values())
