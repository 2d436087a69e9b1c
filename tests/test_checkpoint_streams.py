"""Packed byte streams: the LSB-first layout, and the kernel words built straight from them."""

from __future__ import annotations

import pytest
import torch

from mixq import formats
from mixq.export.streams import kernel_weights
from mixq.formats.packing import pack, pack_qtensor, unpack
from mixq.kernels import prepack


def _reference_stream(codes: list[int], bits: int) -> list[int]:
    """LSB-first bitstream, bit by bit in plain Python."""
    stream = [(c >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(stream[8 * n + j] << j for j in range(8)) for n in range(len(stream) // 8)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 64, 101])
def test_pack_is_the_lsb_first_bitstream(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    stream = pack(codes, bits)
    assert stream.tolist() == _reference_stream(codes.tolist(), bits)
    assert torch.equal(unpack(stream, bits, numel), codes)


@pytest.mark.parametrize("spec", ["int2:g32", "int4:g32:asym", "int4:t", "int8:ch", "fp8_e4m3:ch", "mxfp4",
                                  "nvfp4", "nf4:g32", "int3:g32"])
def test_kernel_weights_equal_prepack(spec):
    fmt = formats.parse(spec)
    q = fmt.quantize(torch.randn(20, 128, generator=torch.Generator().manual_seed(1)))
    kw = kernel_weights(q, pack_qtensor(q, fmt)["codes"], fmt)
    if fmt.code_bits not in (1, 2, 4, 8):
        assert kw is None  # int3: units of 3 words, stored stream is not the kernel layout
        return
    ref = prepack(q, fmt)
    assert kw.layout == ref.layout
    for field in ("codes", "scales", "levels", "zeros", "tensor_scale"):
        a, b = getattr(kw, field), getattr(ref, field)
        assert (a is None) == (b is None), field
        if a is not None:  # levels of fp8_e4m3 hold a NaN code
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
