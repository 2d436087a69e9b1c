"""Element grids equal the specs' value lists; rounding is nearest, ties to even, saturating;
MX shared exponents and NVFP4 two-level scales follow their rules on hand-made tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixq.formats import parse
from mixq.formats.elements import (GRIDS, MINIFLOATS, NF4_LEVELS, grid_levels, grid_tables,
                                   pow2, round_minifloat, round_to_grid)


def positives(name: str) -> list[float]:
    """Finite non-negative values of a sign-magnitude grid, by code (codes 0 .. 2**(k-1)-1)."""
    levels = GRIDS[name].levels
    return [v for v in levels[: len(levels) // 2] if math.isfinite(v)]


def test_e2m1_values():
    assert positives("fp4_e2m1") == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert GRIDS["fp4_e2m1"].levels[8:] == tuple(-v for v in [0, 0.5, 1, 1.5, 2, 3, 4, 6])


def test_e2m3_values():
    assert positives("fp6_e2m3") == [
        0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875,  # subnormals: f/8 * 2**0
        1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,
        2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75,
        4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5,
    ]


def test_e3m2_values():
    assert positives("fp6_e3m2") == [
        0, 0.0625, 0.125, 0.1875,  # subnormals: f/4 * 2**-2
        0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 0.875, 1, 1.25, 1.5, 1.75,
        2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28,
    ]


def test_e4m3_spot_values():
    lv = GRIDS["fp8_e4m3"].levels
    assert lv[0x7E] == 448 and GRIDS["fp8_e4m3"].max_abs == 448
    assert lv[0x01] == 2.0**-9 and lv[0x08] == 2.0**-6  # min subnormal, min normal
    assert lv[0x38] == 1.0 and lv[0xB8] == -1.0  # bias 7
    assert math.isnan(lv[0x7F]) and math.isnan(lv[0xFF])
    assert sum(math.isfinite(v) for v in lv) == 254 and not any(math.isinf(v) for v in lv)


def test_e5m2_spot_values():
    lv = GRIDS["fp8_e5m2"].levels
    assert lv[0x7B] == 57344 and GRIDS["fp8_e5m2"].max_abs == 57344
    assert lv[0x01] == 2.0**-16 and lv[0x04] == 2.0**-14
    assert lv[0x7C] == math.inf and lv[0xFC] == -math.inf
    assert all(math.isnan(lv[c]) for c in (0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF))


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_tables_match_torch(name, dtype):
    ours = torch.tensor(GRIDS[name].levels, dtype=torch.float32)
    theirs = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    ok = ~torch.isnan(ours)
    assert torch.equal(ours[ok], theirs[ok])


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_rounding_matches_torch_cast(name, dtype):
    """In range, nearest-even rounding equals torch's float8 cast, midpoints included."""
    g = torch.Generator().manual_seed(0)
    vmax = GRIDS[name].max_abs
    y = torch.cat([
        (torch.rand(20000, generator=g) * 2 - 1) * vmax,
        torch.randn(20000, generator=g) * torch.exp2(torch.randint(-20, 10, (20000,), generator=g).float()),
    ]).clamp(-vmax, vmax)
    mids = grid_tables(GRIDS[name], y.device)[3]
    y = torch.cat([y, mids, -mids])  # every tie
    codes, values = round_minifloat(y, name)
    assert torch.equal(values, y.to(dtype).float())
    assert torch.equal(grid_levels(GRIDS[name], y.device)[codes.long()], values)


@pytest.mark.parametrize("name", list(MINIFLOATS))
def test_round_minifloat_equals_table_search(name):
    """The arithmetic rounding (production path) equals a nearest search over the value table
    away from ties, saturates beyond max, and encodes zero as +0."""
    g = torch.Generator().manual_seed(3)
    y = torch.randn(100000, generator=g) * torch.exp2(torch.randint(-20, 20, (100000,), generator=g).float())
    y = torch.cat([y, torch.tensor([0.0, -0.0, 1e30, -1e30, 1e-40, -1e-40])])
    codes, values = round_minifloat(y, name)
    assert torch.equal(codes, round_to_grid(y, GRIDS[name]))
    assert torch.equal(grid_levels(GRIDS[name], y.device)[codes.long()], values)
    assert values[-4:-2].tolist() == [GRIDS[name].max_abs, -GRIDS[name].max_abs]
    assert round_minifloat(y, name, with_codes=False)[0] is None
    assert torch.equal(round_minifloat(y, name, with_codes=False)[1], values)


def test_pow2_exact():
    e = torch.arange(-149, 128)
    assert torch.equal(pow2(e), torch.tensor([math.ldexp(1.0, int(i)) for i in e], dtype=torch.float32))


def test_e2m1_ties_to_even_and_saturation():
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, -5.0, 7.0, 1e9, -1e9, -0.1, 0.0])
    codes, vals = round_minifloat(y, "fp4_e2m1")
    assert vals.tolist() == [0, 1, 1, 2, 2, 4, 4, -2, -4, 6, 6, -6, 0, 0]
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6, 12, 14, 7, 7, 15, 0, 0]  # zero is always +0


def test_nf4_constants_match_construction():
    """QLoRA: quantiles of N(0,1) at linspace(0.9677083, 0.5) (8 positive, 7 negative) and 0,
    normalised by the largest."""
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, neg, [0.0]]))
    v = v / v.max()
    assert np.abs(v - np.array(NF4_LEVELS)).max() < 1e-6
    assert NF4_LEVELS[0] == -1.0 and NF4_LEVELS[7] == 0.0 and NF4_LEVELS[15] == 1.0
    assert list(NF4_LEVELS) == sorted(NF4_LEVELS)


# -- OCP MX ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,emax", [("mxfp8", 8), ("mxfp8_e5m2", 15), ("mxfp6", 2),
                                       ("mxfp6_e3m2", 4), ("mxfp4", 2), ("mxint8", 0)])
def test_mx_shared_exponent_hand_made(spec, emax):
    fmt = parse(spec)
    assert fmt.emax == emax
    amaxes = [1.0, 0.75, 448.0, 6.0, 7.0, 3e-3, 2.0**-20, 1000.0]
    w = torch.zeros(len(amaxes), 32)
    for i, a in enumerate(amaxes):
        w[i] = torch.linspace(-a / 3, a / 2, 32)
        w[i, 7] = -a  # the block's amax, negative
    q = fmt.quantize(w)
    expected = [math.floor(math.log2(a)) - emax + 127 for a in amaxes]
    assert q.scales.flatten().tolist() == expected


def test_mx_random_blocks_and_partial_block():
    fmt = parse("mxfp4")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(9, 75, generator=g) * torch.exp2(torch.randint(-8, 8, (9, 1), generator=g).float())
    q = fmt.quantize(w)
    assert q.scales.shape == (9, 3)  # 75 = 32 + 32 + 11
    padded = torch.cat([w, torch.zeros(9, 21)], 1).reshape(9, 3, 32)
    amax = padded.abs().amax(-1)
    exp = torch.floor(torch.log2(amax)) - 2 + 127
    assert torch.equal(q.scales.float(), exp)


def test_mx_zero_block_and_saturation():
    w = torch.zeros(2, 32)
    w[1, 0], w[1, 1] = 7.0, 1.0  # 7 > 6 = E2M1 max at X = 2**0: saturates to 6
    q = parse("mxfp4").quantize(w)
    assert q.scales.tolist() == [[0], [127]]  # all-zero block: byte 0 (2**-127)
    assert torch.all(q.codes[0] == 0)
    assert parse("mxfp4").dequantize(q)[1, :2].tolist() == [6.0, 1.0]


def test_mxint8_codes():
    w = torch.zeros(1, 32)
    w[0, :5] = torch.tensor([1.0, -0.5, 0.25, 1.999, -1.999])  # amax 1.999 -> X = 2**0
    q = parse("mxint8").quantize(w)
    assert q.scales.item() == 127
    # round(v * 64), two's complement bytes, clamped to +-127 (never -128 = 0x80)
    assert q.codes[0, :5].tolist() == [64, 256 - 32, 16, 127, 256 - 127]


# -- NVFP4 ----------------------------------------------------------------------------------

def test_nvfp4_hand_made():
    w = torch.zeros(1, 48)
    w[0, 0] = 2688.0  # global amax = 6 * 448: tensor scale exactly 1
    w[0, 16], w[0, 17] = 12.0, -2.5  # block scale 12/6 = 2.0 (E4M3 0x40); -1.25 ties to -1
    w[0, 32], w[0, 33] = 7.8, 1.0  # block scale 1.3 -> E4M3 1.25 (0x3A); 7.8/1.25 = 6.24 -> 6
    fmt = parse("nvfp4")
    q = fmt.quantize(w)
    assert q.tensor_scale.item() == 1.0
    assert q.scales.tolist() == [[0x7E, 0x40, 0x3A]]
    out = fmt.dequantize(q)
    assert out[0, [0, 16, 17, 32, 33]].tolist() == [2688.0, 12.0, -2.0, 7.5, 1.25]


def test_nvfp4_scale_rules_random():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(13, 100, generator=g) * torch.rand(13, 1, generator=g)
    fmt = parse("nvfp4")
    q = fmt.quantize(w)
    ts = w.abs().max() / (6 * 448)
    assert q.tensor_scale.dtype == torch.float32 and q.tensor_scale.item() == ts.item()
    padded = torch.cat([w, torch.zeros(13, 12)], 1).reshape(13, 7, 16)
    target = padded.abs().amax(-1) / 6 / ts
    bs = q.scales.view(torch.float8_e4m3fn).float()
    assert torch.equal(bs, target.to(torch.float8_e4m3fn).float())
    elements = padded / (bs * ts).unsqueeze(-1)
    e2m1 = grid_levels(GRIDS["fp4_e2m1"], w.device)
    expected = (e2m1[round_to_grid(elements, GRIDS["fp4_e2m1"]).long()] * (bs * ts).unsqueeze(-1))
    assert torch.equal(fmt.dequantize(q), expected.reshape(13, -1)[:, :100])


def test_nvfp4_zero_tensor():
    fmt = parse("nvfp4")
    q = fmt.quantize(torch.zeros(3, 20))
    assert q.tensor_scale.item() == 0 and torch.all(q.codes == 0) and torch.all(q.scales == 0)
    assert torch.equal(fmt.fake_quant(torch.zeros(3, 20)), torch.zeros(3, 20))
