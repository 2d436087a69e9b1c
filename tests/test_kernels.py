"""CPU tests of the kernels' packed layout and pure-torch reference path (always run)."""

from __future__ import annotations

import pytest
import torch

from mixq import formats
from mixq.errors import FormatError
from mixq.kernels import dequantize, pack_codes, prepack, qmatmul, reference_matmul, unpack_codes
from mixq.kernels.packed import e4m3_to_float, split3_unit_columns, unit_shape

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


def _decode3_like_the_gpu(w: list[int], slot: int, bf16: bool) -> tuple[float, float]:
    """The two codes of pair slot `slot` of a 3-bit unit's words w, decoded as gemv_int4.cu's
    decode3 + unscale3 do: one mask (after a shift for fields 2-4 of a word; three masks for
    the last slot) into half-precision magic + mult * code, then the exact rescale."""
    import numpy as np

    magic = 0x4300 if bf16 else 0x6400

    def half(bits: int) -> float:
        if bf16:
            return float(np.frombuffer(np.uint32(bits << 16).tobytes(), np.float32)[0])
        return float(np.frombuffer(np.uint16(bits).tobytes(), np.float16)[0])

    if slot == 15:
        v, mult = ((w[0] >> 2) & 0x00100010) | ((w[1] >> 1) & 0x00200020) | (w[2] & 0x00400040), 16
    else:
        r = slot % 5
        v = (w[slot // 5] >> (0 if r < 2 else (7 if r < 4 else 13))) & (0x00380038 if r & 1 else 0x00070007)
        mult = 8 if r & 1 else 1
    v |= magic * 0x10001
    m = half(magic)
    return tuple((half((v >> s) & 0xFFFF) - m) / mult for s in (0, 16))


@pytest.mark.parametrize("bf16", [True, False])
def test_3bit_layout_is_what_the_gpu_decoder_reads(bf16):
    """Every pair slot of the 3-bit unit decodes, by the GPU kernels' mask-and-magic steps, to its
    codes (i, i + 8) / (i + 8, i + 16), and each block of 16 units is stored interleaved by four
    (unit 4t + q at column 4q + t; a last block of 12 units with stride 3)."""
    torch.manual_seed(3)
    n_units = 28  # one block of 16, a last block of 12
    codes = torch.randint(0, 8, (2, 32 * n_units), dtype=torch.uint8)
    words = pack_codes(codes, 3).view(2, 3, n_units)  # (row, plane, column)
    cols = split3_unit_columns(n_units)
    assert cols[:16].tolist() == [4 * (j % 4) + j // 4 for j in range(16)]
    assert cols[16:].tolist() == [16 + 3 * (j % 4) + j // 4 for j in range(12)]
    for row in range(2):
        for unit in range(n_units):
            w = [int(words[row, u, cols[unit]]) & 0xFFFFFFFF for u in range(3)]
            c = codes[row, 32 * unit: 32 * unit + 32].tolist()
            for slot in range(16):
                first = slot if slot < 8 else slot + 8
                assert _decode3_like_the_gpu(w, slot, bf16) == (c[first], c[first + 8]), (row, unit, slot)


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
