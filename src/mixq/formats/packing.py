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


def _bit_weights(n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([1 << j for j in range(n)], dtype=torch.int32, device=device)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """1-D uint8 bitstream of ceil(numel * bits / 8) bytes from uint8 codes < 2**bits."""
    if not 1 <= bits <= 8:
        raise FormatError(f"pack: bits must be 1..8, got {bits}")
    if codes.dtype != torch.uint8:
        raise FormatError(f"pack: codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise FormatError(f"pack: a code is >= 2**{bits}")
    if bits == 8:
        return flat.clone()
    n_bytes = -(-flat.numel() * bits // 8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (numel * bits,) bits, LSB first
    stream = torch.cat([stream, stream.new_zeros(n_bytes * 8 - stream.numel())])
    byte_vals = (stream.reshape(n_bytes, 8).int() * _bit_weights(8, flat.device)).sum(1)
    return byte_vals.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """1-D uint8 codes: the first `numel` codes of a `pack`ed stream."""
    if not 1 <= bits <= 8:
        raise FormatError(f"unpack: bits must be 1..8, got {bits}")
    if packed.numel() * 8 < numel * bits:
        raise FormatError(f"unpack: {packed.numel()} bytes hold fewer than {numel} {bits}-bit codes")
    packed = packed.reshape(-1)
    if bits == 8:
        return packed[:numel].clone()
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits]
    codes = (stream.reshape(numel, bits).int() * _bit_weights(bits, packed.device)).sum(1)
    return codes.to(torch.uint8)


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
