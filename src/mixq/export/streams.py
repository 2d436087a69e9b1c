"""From a checkpoint's stored byte streams straight to the kernels' words.

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

import torch

from mixq.errors import FormatError
from mixq.formats import Format, QTensor
from mixq.kernels import KernelWeights, prepack


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
