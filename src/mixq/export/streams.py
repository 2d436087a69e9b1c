"""Fast converters between QTensors, the checkpoint's byte streams and the kernels' words.

`pack_streams` / `unpack_streams` write and read exactly the bytes of
`formats.packing.pack_qtensor` / `unpack_qtensor` (tests check byte equality for every code
width), with the bit shuffling done by numpy's packbits/unpackbits instead of per-bit torch
arithmetic: about 4x faster, which is most of a checkpoint's save and load time on CPU.

`kernel_weights` builds the `KernelWeights` of a unit straight from its stored codes stream
when the two layouts coincide: for b in {1, 2, 4, 8} a kernel unit is one int32 word and the
planar layout is row-major, so when a row fills whole words (in_features * b % 32 == 0) the
row-wise LSB-first stream, read as little-endian int32, *is* the kernel's codes tensor. All
other fields come from `kernels.prepack` of the first row, whose codes must equal the first
row of the stream's words (else None: the caller uses `prepack` on the whole weight).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch

from mixq.errors import FormatError
from mixq.formats import Format, QTensor
from mixq.kernels import KernelWeights, prepack


def pack_codes_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """LSB-first bitstream of uint8 codes (the bytes of `formats.packing.pack`)."""
    flat = codes.reshape(-1).contiguous()
    if bits == 8:
        return flat.clone()
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise FormatError(f"pack: a code is >= 2**{bits}")
    per_code = np.unpackbits(flat.cpu().numpy()[:, None], axis=1, bitorder="little")[:, :bits]  # (n, bits)
    return torch.from_numpy(np.packbits(per_code.reshape(-1), bitorder="little"))


def unpack_codes_bytes(stream: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first `numel` b-bit codes of a stream, as uint8 (inverse of `pack_codes_bytes`)."""
    if stream.numel() * 8 < numel * bits:
        raise FormatError(f"unpack: {stream.numel()} bytes hold fewer than {numel} {bits}-bit codes")
    flat = stream.reshape(-1)
    if bits == 8:
        return flat[:numel].clone()
    if 8 % bits == 0:  # whole codes per byte: shift and mask
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
        return ((flat[: -(-numel * bits // 8)].unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    stream_bits = np.unpackbits(flat.cpu().numpy(), bitorder="little")[: numel * bits].reshape(numel, bits)
    per_code = np.zeros((numel, 8), dtype=np.uint8)
    per_code[:, :bits] = stream_bits
    return torch.from_numpy(np.packbits(per_code, axis=1, bitorder="little").reshape(-1))


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def pack_streams(q: QTensor, fmt: Format) -> dict[str, torch.Tensor]:
    """Same streams as `formats.packing.pack_qtensor(q, fmt)`."""
    if q.codes.dtype != torch.uint8:  # unquantized: the cast tensor's raw bytes
        streams = {"codes": _raw_bytes(q.codes)}
    else:
        streams = {"codes": pack_codes_bytes(q.codes, fmt.code_bits)}
    if q.scales is not None:
        streams["scales"] = _raw_bytes(q.scales)
    if q.zeros is not None:
        streams["zeros"] = pack_codes_bytes(q.zeros, fmt.code_bits)
    if q.tensor_scale is not None:
        streams["tensor_scale"] = _raw_bytes(q.tensor_scale.float())
    return streams


def unpack_streams(streams: dict[str, torch.Tensor], fmt: Format, shape: tuple[int, int]) -> QTensor:
    """Same QTensor as `formats.packing.unpack_qtensor(streams, fmt, shape)`."""
    layout = fmt.layout(tuple(shape))
    rows, cols = shape
    if layout.scales_shape is None and layout.code_bits > 8:  # unquantized
        codes = streams["codes"].view(getattr(fmt, "dtype")).reshape(rows, cols)
        return QTensor(str(fmt), tuple(shape), codes, None)
    codes = unpack_codes_bytes(streams["codes"], layout.code_bits, rows * cols).reshape(rows, cols)
    scales = zeros = tensor_scale = None
    if layout.scales_shape is not None:
        scales = streams["scales"].view(layout.scale_dtype).reshape(layout.scales_shape)
    if layout.has_zeros:
        zeros = unpack_codes_bytes(streams["zeros"], layout.code_bits, layout.n_scales).reshape(layout.scales_shape)
    if layout.tensor_scale_bits:
        tensor_scale = streams["tensor_scale"].view(torch.float32).reshape(())
    return QTensor(str(fmt), tuple(shape), codes, scales, zeros, tensor_scale)


def kernel_weights(q: QTensor, codes_stream: torch.Tensor, fmt: Format) -> KernelWeights | None:
    """`prepack(q, fmt)` without repacking the codes, where the stored stream already is the
    kernel layout (see the module docstring); None where it is not, or prepack refuses."""
    n_rows, n_cols = q.shape
    bits = fmt.code_bits
    if sys.byteorder != "little" or bits not in (1, 2, 4, 8) or (n_cols * bits) % 32 or q.codes.dtype != torch.uint8:
        return None
    words_per_row = n_cols * bits // 32
    words = codes_stream.reshape(-1)[: n_rows * words_per_row * 4].view(torch.int32).reshape(n_rows, words_per_row)
    first = QTensor(q.fmt, (1, n_cols), q.codes[:1], q.scales[:1],
                    None if q.zeros is None else q.zeros[:1], q.tensor_scale)
    try:
        ref = prepack(first, fmt)
    except FormatError:
        return None
    if not torch.equal(ref.codes, words[:1]):
        return None
    scales = q.scales.expand(n_rows, q.scales.shape[1]).contiguous()
    zeros = None if q.zeros is None else q.zeros.expand(n_rows, q.zeros.shape[1]).contiguous()
    return KernelWeights(dataclasses.replace(ref.layout, out_features=n_rows), words.clone(), scales,
                         ref.levels, zeros, ref.tensor_scale)
