"""The checkpoint's fast stream converters write the bytes of `formats.packing` and build the
kernel layout of `kernels.prepack`."""

from __future__ import annotations

import pytest
import torch

from mixq import formats
from mixq.export.streams import (kernel_weights, pack_codes_bytes, pack_streams, unpack_codes_bytes,
                                 unpack_streams)
from mixq.formats.packing import pack, pack_qtensor, unpack_qtensor
from mixq.kernels import prepack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 64, 101])
def test_codes_bytes_equal_formats_packing(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    stream = pack_codes_bytes(codes, bits)
    assert torch.equal(stream, pack(codes, bits))
    assert torch.equal(unpack_codes_bytes(stream, bits, numel), codes)


SPECS = ["int2:g32", "int3:g32:asym", "int4:ch", "int4:t", "int8:ch", "int5:g32:asym", "fp8_e4m3:ch", "mxfp4",
         "nvfp4", "nf4:g32", "bf16"]


@pytest.mark.parametrize("spec", SPECS)
def test_streams_equal_formats_packing(spec):
    fmt = formats.parse(spec)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    q = fmt.quantize(w)
    streams = pack_streams(q, fmt)
    ref = pack_qtensor(q, fmt)
    assert streams.keys() == ref.keys()
    assert all(torch.equal(streams[k], ref[k]) for k in ref)
    back, ref_back = unpack_streams(streams, fmt, q.shape), unpack_qtensor(ref, fmt, q.shape)
    for field in ("codes", "scales", "zeros", "tensor_scale"):
        a, b = getattr(back, field), getattr(ref_back, field)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.parametrize("spec", ["int2:g32", "int4:g32:asym", "int4:t", "int8:ch", "fp8_e4m3:ch", "mxfp4",
                                  "nvfp4", "nf4:g32", "int3:g32"])
def test_kernel_weights_equal_prepack(spec):
    fmt = formats.parse(spec)
    q = fmt.quantize(torch.randn(20, 128, generator=torch.Generator().manual_seed(1)))
    kw = kernel_weights(q, pack_streams(q, fmt)["codes"], fmt)
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
