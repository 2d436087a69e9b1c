"""CPU tests of the kernels' packed layout and pure-torch reference path (always run)."""

from __future__ import annotations

import pytest
import torch

from mixq import formats
from mixq.errors import FormatError
from mixq.kernels import dequantize, pack_codes, prepack, qmatmul, reference_matmul, unpack_codes
from mixq.kernels.packed import e4m3_to_float, unit_shape

# GGUF block types have no packed kernel (llama.cpp runs them; mixq dequantizes them).
QUANTIZED_SPECS = [s for s in formats.catalogue()
                   if not isinstance(formats.parse(s), (formats.PlainFormat, formats.GGUFFormat))]


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip_every_width(bits):
    torch.manual_seed(bits)
    c_per_unit, w_per_unit = unit_shape(bits)
    assert c_per_unit * bits == 32 * w_per_unit
    codes = torch.randint(0, 2**bits, (7, 3 * c_per_unit), dtype=torch.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (7, 3 * w_per_unit)
    assert torch.equal(unpack_codes(words, bits, codes.shape[1]), codes.long())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_matches_formats_bitstream_when_bits_divide_32(bits):
    """For b | 32 each row of the kernel layout is formats.packing's LSB-first stream."""
    from mixq.formats import packing

    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
    words = pack_codes(codes, bits)
    for row in range(codes.shape[0]):
        stream = packing.pack(codes[row], bits)  # uint8 bytes
        assert torch.equal(words[row].contiguous().view(torch.uint8), stream)


def test_pack_rejects_partial_units():
    with pytest.raises(FormatError):
        pack_codes(torch.zeros(2, 20, dtype=torch.uint8), 3)  # 3-bit units hold 32 codes


def test_e4m3_decode_matches_format_grid():
    grid = formats.parse("fp8_e4m3:ch").levels()
    mine = e4m3_to_float(torch.arange(256, dtype=torch.int32).to(torch.uint8))
    finite = torch.isfinite(grid)
    assert torch.equal(mine[finite], grid[finite])


@pytest.mark.parametrize("spec", QUANTIZED_SPECS)
def test_prepack_dequantize_equals_format(spec):
    torch.manual_seed(0)
    fmt = formats.parse(spec)
    w = torch.randn(48, 576)
    q = fmt.quantize(w)
    assert torch.equal(dequantize(prepack(q, fmt)), fmt.dequantize(q))


@pytest.mark.parametrize("spec", QUANTIZED_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matmul_equals_fake_quant(spec, dtype):
    torch.manual_seed(1)
    fmt = formats.parse(spec)
    w = torch.randn(40, 576)
    bias = torch.randn(40)
    x = torch.randn(3, 576).to(dtype)
    kw = prepack(fmt.quantize(w), fmt)
    w_hat = fmt.fake_quant(w).to(dtype)
    got = reference_matmul(x, kw)
    assert got.dtype == dtype
    assert torch.equal(got, x @ w_hat.T)
    with_bias = reference_matmul(x, kw, bias)
    assert torch.equal(with_bias, torch.nn.functional.linear(x, w_hat, bias.to(dtype)))
    # the dispatcher takes the reference path on CPU, for any leading shape
    assert torch.equal(qmatmul(x.reshape(1, 3, 576), kw, bias).reshape(3, 40), with_bias)


def test_prepack_rejects_plain_and_mismatched_format():
    w = torch.randn(8, 64)
    with pytest.raises(FormatError):
        prepack(formats.parse("bf16").quantize(w))
    with pytest.raises(FormatError):
        prepack(formats.parse("int4:g64").quantize(w), "int4:g32")


def test_per_tensor_scale_is_repeated_per_row():
    fmt = formats.parse("int8:t")
    q = fmt.quantize(torch.randn(16, 64))
    kw = prepack(q, fmt)
    assert kw.scales.shape == (16, 1) and kw.layout.group_size == 64
    assert torch.equal(dequantize(kw), fmt.dequantize(q))


def test_nbytes_counts_codes_scales_zeros():
    fmt = formats.parse("int4:g64:asym")
    kw = prepack(fmt.quantize(torch.randn(32, 512)), fmt)
    assert kw.nbytes() == 32 * 512 // 2 + 32 * 8 * 2 + 32 * 8
