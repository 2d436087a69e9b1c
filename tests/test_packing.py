"""Bit packing is lossless at every width, has the documented LSB-first layout, and the packed
streams of a QTensor take exactly `fmt.bits(shape)` bits (up to byte rounding per stream)."""

from __future__ import annotations

import pytest
import torch

from mixq.errors import FormatError
from mixq.formats import catalogue, parse
from mixq.formats.packing import pack, pack_qtensor, qtensor_nbytes, unpack, unpack_qtensor


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 13, 1001, 4096])
def test_pack_lossless(bits, numel):
    g = torch.Generator().manual_seed(bits * 10007 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == -(-numel * bits // 8)
    assert torch.equal(unpack(packed, bits, numel), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_2d_row_major(bits):
    codes = torch.randint(0, 2**bits, (7, 13), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, 91).reshape(7, 13), codes)


def test_layout_lsb_first():
    # 4 bits: two codes per byte, low nibble first
    assert pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [1, 1]
    # 3 bits: 5 at bits 0-2, 3 at bits 3-5, 7 at bits 6-8 -> 5 + 24 + 192 = 221, then 1
    assert pack(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [221, 1]
    assert pack(torch.tensor([3, 1, 2, 0], dtype=torch.uint8), 2).tolist() == [3 + (1 << 2) + (2 << 4)]
    codes = torch.tensor([200, 7], dtype=torch.uint8)
    assert torch.equal(pack(codes, 8), codes)


def test_pack_matches_nibble_reference():
    codes = torch.randint(0, 16, (1000,), dtype=torch.uint8)
    reference = codes[0::2] | (codes[1::2] << 4)
    assert torch.equal(pack(codes, 4), reference)


def test_pack_errors():
    with pytest.raises(FormatError):
        pack(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(FormatError):
        pack(torch.tensor([1], dtype=torch.int32), 3)
    with pytest.raises(FormatError):
        pack(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(FormatError):
        unpack(torch.zeros(1, dtype=torch.uint8), 3, 3)


@pytest.mark.parametrize("spec,shape", [(s, sh) for s in catalogue() for sh in [(7, 100), (24, 576), (3, 33), (1, 1),
                                                                              (3, 512)]
                                        if parse(s).supports(sh) is None])
def test_bits_equal_packed_bytes(spec, shape):
    fmt = parse(spec)
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    q = fmt.quantize(w)
    streams = pack_qtensor(q, fmt)
    nbytes = qtensor_nbytes(q, fmt)
    assert nbytes == sum(s.numel() for s in streams.values())
    bits = fmt.bits(shape)
    # only the byte rounding of each packed stream (codes, zeros) may add bits
    assert 0 <= 8 * nbytes - bits < 8 * len(streams)
    if (shape[0] * shape[1] * fmt.code_bits) % 8 == 0 and "zeros" not in streams:
        assert 8 * nbytes == bits
    back = unpack_qtensor(streams, fmt, shape)
    for name in ("codes", "scales", "zeros", "tensor_scale"):
        a, b = getattr(q, name), getattr(back, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    assert torch.equal(fmt.dequantize(back), fmt.fake_quant(w))


def test_stream_sizes_int4_g64_asym():
    fmt = parse("int4:g64:asym")
    q = fmt.quantize(torch.randn(576, 576))
    sizes = {k: v.numel() for k, v in pack_qtensor(q, fmt).items()}
    assert sizes == {"codes": 576 * 576 // 2, "scales": 576 * 9 * 2, "zeros": 576 * 9 // 2}
