"""Property tests of every catalogued format: dequantize(quantize(w)) == fake_quant(w) exactly,
nearest rounding within half a local step, idempotence, partial groups = zero padding, MSE clip
never worse, dtype handling, NaN/inf rejection."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.errors import DataError, FormatError
from mixq.formats import (GGUFFormat, GridFormat, IntFormat, MXFormat, NVFP4Format, PlainFormat,
                          catalogue, parse)
from mixq.formats.elements import GRIDS, grid_levels
from mixq.formats.grouping import to_groups

QUANTIZED = [s for s in catalogue() if not isinstance(parse(s), PlainFormat)]
SHAPES = [(7, 100), (576, 576), (3, 33), (1, 1), (2, 17), (5, 512)]


def supported(specs, shapes):
    """(spec, shape) pairs where the format can hold the shape (GGUF rows are whole blocks)."""
    return [(s, sh) for s in specs for sh in shapes if parse(s).supports(sh) is None]


def make_weight(shape, seed, dtype=torch.float32):
    """Gaussian weights with heavy outliers, an all-zero row and a tiny-magnitude row."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    w = torch.randn(rows, cols, generator=g) * 0.02
    n_out = max(1, rows * cols // 200)
    idx = torch.randint(0, rows * cols, (n_out,), generator=g)
    w.view(-1)[idx] = torch.randn(n_out, generator=g) * 0.5  # outliers ~25x the std
    if rows >= 3:
        w[1] = 0.0
        w[2] *= 1e-4
    return w.to(dtype)


def expand(per_group: torch.Tensor, shape, group: int, per_tensor: bool = False) -> torch.Tensor:
    """(R', G) per-group tensor -> (rows, cols) per element."""
    rows, cols = shape
    if per_tensor:
        return per_group.expand(rows, cols)
    return per_group.repeat_interleave(group, dim=1)[:, :cols].expand(rows, cols)


def element_grid(fmt, q):
    """(per-element scale, per-element offset, sorted grid) with fq = (level - offset) * scale."""
    shape = q.shape
    cols = shape[1]
    g = fmt.group_size_for(cols)
    per_tensor = getattr(fmt, "group_size", None) == -1
    offset = torch.zeros(shape)
    if isinstance(fmt, IntFormat):
        scale = q.scales.float()
        if fmt.asym:
            levels = torch.arange(2**fmt.code_bits).float()
            offset = expand(q.zeros.float(), shape, g, per_tensor)
        else:
            levels = fmt.levels()
    elif isinstance(fmt, GridFormat):
        scale, levels = q.scales.float(), fmt.levels()
    elif isinstance(fmt, MXFormat):
        scale = torch.exp2(q.scales.float() - 127)
        levels = fmt.levels()
        if fmt.element == "int8":
            levels = levels[levels > -2.0]  # -128/64 is never produced (documented clamp)
    elif isinstance(fmt, GGUFFormat):
        step, off = fmt.params(q.scales, shape[0])  # (R, n_sub): value = level * step - off
        g = fmt.sub_block
        levels = fmt.levels()[1:] if fmt.name == "q8_0" else fmt.levels()  # q8_0 never uses -128
        safe = torch.where(step != 0, step, torch.ones_like(step))
        if off is not None:
            offset = expand(off / safe, shape, g)
        scale = step
    else:
        assert isinstance(fmt, NVFP4Format)
        scale = grid_levels(GRIDS["fp8_e4m3"], torch.device("cpu"))[q.scales.long()] * q.tensor_scale
        levels = fmt.levels()
    scale = expand(scale, shape, g, per_tensor)
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))  # NVFP4 zero blocks: all codes 0
    levels = torch.unique(levels[torch.isfinite(levels)])  # sorted
    return scale, offset, levels


def nearest_and_half_step(y: torch.Tensor, levels: torch.Tensor):
    """Distance to the nearest grid value, and half the local spacing (inf out of range)."""
    i = torch.searchsorted(levels, y).clamp(1, len(levels) - 1)
    lo, hi = levels[i - 1], levels[i]
    nearest = torch.minimum((y - lo).abs(), (y - hi).abs())
    nearest = torch.minimum(nearest, (y - levels[0]).abs()).minimum((y - levels[-1]).abs())
    half = torch.where((y >= levels[0]) & (y <= levels[-1]), (hi - lo) / 2, torch.inf)
    return nearest, half


@pytest.mark.parametrize("spec,shape", supported(catalogue(), SHAPES))
def test_dequantize_equals_fake_quant(spec, shape):
    fmt = parse(spec)
    w = make_weight(shape, seed=zlib.crc32(spec.encode()) % 1000)
    fq = fmt.fake_quant(w)
    q = fmt.quantize(w)
    assert fq.shape == w.shape and fq.dtype == w.dtype
    assert q.codes.shape == shape and q.shape == shape and q.fmt == spec
    assert torch.equal(fmt.dequantize(q), fq)
    if q.codes.dtype == torch.uint8:
        assert int(q.codes.max()) < 2**fmt.code_bits
        assert (q.scales.shape, q.scales.dtype) == (fmt.layout(shape).scales_shape, fmt.layout(shape).scale_dtype)


@pytest.mark.parametrize("spec,shape", supported(QUANTIZED, [(7, 100), (576, 576), (5, 17), (5, 512)]))
def test_nearest_rounding_within_half_step(spec, shape):
    """Every in-range element lands within half its local grid spacing (times the scale);
    without :mse every element lands on the nearest grid value."""
    fmt = parse(spec)
    w = make_weight(shape, seed=3)
    q = fmt.quantize(w)
    fq = fmt.dequantize(q)
    scale, offset, levels = element_grid(fmt, q)
    y = w / scale + offset  # element units
    nearest, half = nearest_and_half_step(y, levels)
    err = (w - fq).abs()
    step = scale.abs()  # symmetric INT scales carry a sign
    tol = 1e-6 * (y.abs() + offset.abs() + 1) * step + 1e-30  # float32 rounding of w / scale + offset
    inside = torch.isfinite(half)
    assert torch.all(err[inside] <= half[inside] * step[inside] + tol[inside])
    if not getattr(fmt, "mse", False):
        assert torch.all(err <= nearest * step + tol)
    if isinstance(fmt, (IntFormat, GridFormat)) and not fmt.mse:
        # the scale maps amax onto the grid's end; only float16 rounding of it (2**-11
        # relative) can push an element past the end. (MX and NVFP4 saturate by design.)
        # (asym: the zero point is rounded, so the range may sit up to half a step off.)
        # symmetric INT: the signed extreme sits on the extra level; the far side may lie one step out
        slack = levels.abs().max() * 2.0**-10 + ((1.0 if not fmt.asym else 0.5) if isinstance(fmt, IntFormat) else 0)
        assert torch.all((y >= levels[0] - slack) & (y <= levels[-1] + slack))


# GGUF types that search their block parameters (k-quants, IQ4) are not claimed idempotent.
@pytest.mark.parametrize("spec,shape", supported(
    [s for s in QUANTIZED if not getattr(parse(s), "asym", False) and not getattr(parse(s), "mse", False)
     and s not in ("iq4_nl", "iq4_xs", "q3_k", "q6_k")], [(7, 100), (576, 576), (3, 33), (3, 64)]))
def test_idempotent(spec, shape):
    """Re-quantizing a quantized weight changes nothing: same codes and scales."""
    fmt = parse(spec)
    w = make_weight(shape, seed=4)
    fq = fmt.fake_quant(w)
    q1, q2 = fmt.quantize(w), fmt.quantize(fq)
    if isinstance(fmt, NVFP4Format):
        # Idempotent where the E4M3 block scale is normal (code >= 0x08); a subnormal one has
        # too little precision (the tiny-magnitude row 2 has such blocks). The float32 tensor
        # scale amax / 2688 may move by an ulp.
        normal = expand(q1.scales >= 0x08, shape, 16)
        assert normal.float().mean() > 0.5
        assert torch.equal(q1.codes[normal], q2.codes[normal])
        assert torch.equal(q1.scales >= 0x08, q2.scales >= 0x08)
        assert torch.equal(q1.scales[q1.scales >= 0x08], q2.scales[q1.scales >= 0x08])
        assert torch.allclose(fmt.fake_quant(fq)[normal], fq[normal], rtol=1e-6, atol=0)
    elif isinstance(fmt, IntFormat):
        # Symmetric INT uses all 2**k levels (amax -> qmax + 1/2), so re-deriving the scale
        # from a quantized group shrinks it: the codes are idempotent for the stored scales.
        scale, _, _ = element_grid(fmt, q1)
        again = torch.round(fq / scale) + 2 ** (fmt.code_bits - 1)
        assert torch.equal(again, q1.codes.float())
        assert torch.equal(fmt.dequantize(q1), fq)
    elif isinstance(fmt, GGUFFormat):
        # an all-zero block keeps llama.cpp's d = 0 / -8 = -0.0, which re-quantizes as +0.0
        assert torch.equal(q1.codes, q2.codes)
        assert torch.equal(fmt.params(q1.scales, shape[0])[0], fmt.params(q2.scales, shape[0])[0])
        assert torch.equal(fmt.fake_quant(fq), fq)
    else:
        assert torch.equal(q1.codes, q2.codes) and torch.equal(q1.scales, q2.scales)
        assert torch.equal(fmt.fake_quant(fq), fq)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_asym_requantize_full_range_groups(k):
    """Asym min-max is not idempotent in general (the top code may round to 2**k - 2); where a
    group's codes span 0 .. 2**k - 1 it is: quantize(dequantize(q)) == q."""
    fmt = parse(f"int{k}:g32:asym")
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(0, 2**k, (6, 4, 32), generator=g)
    codes[..., 0], codes[..., 1] = 0, 2**k - 1
    zero = torch.randint(0, 2**k, (6, 4, 1), generator=g)
    scale = torch.rand(6, 4, 1, generator=g).half().float() + 0.01
    w = ((codes - zero) * scale.half().float()).reshape(6, 128)
    q = fmt.quantize(w)
    assert torch.equal(fmt.dequantize(q), w)
    assert torch.equal(q.codes.reshape(6, 4, 32).long(), codes)


@pytest.mark.parametrize("spec", ["int4:g64", "int3:g64:asym", "fp4_e2m1:g64", "nf4:g64", "mxfp4",
                                  "mxint8", "nvfp4", "int8:ch", "fp8_e4m3:g128", "int4:g128:mse"])
@pytest.mark.parametrize("shape", [(7, 100), (576, 576), (4, 1)])
def test_partial_group_is_zero_padded(spec, shape):
    fmt = parse(spec)
    w = make_weight(shape, seed=5)
    g = fmt.group_size_for(shape[1])
    pad = (-shape[1]) % g
    padded = torch.cat([w, torch.zeros(shape[0], pad)], 1)
    assert torch.equal(fmt.fake_quant(w), fmt.fake_quant(padded)[:, : shape[1]])
    assert fmt.quantize(w).scales.shape == fmt.quantize(padded).scales.shape


@pytest.mark.parametrize("base", ["int2:g64", "int3:g128", "int4:g64:asym", "int8:ch",
                                  "fp4_e2m1:g32", "fp8_e4m3:ch", "nf4:g64", "int4:t"])
def test_mse_clip_never_worse(base):
    plain, mse = parse(base), parse(base + ":mse")
    assert plain.bits((576, 576)) == mse.bits((576, 576))
    torch.manual_seed(6)
    w = torch.distributions.StudentT(3.0).sample((64, 576)) * 0.02  # heavy tails: clipping helps
    w = torch.cat([w, make_weight((7, 576), 7)])
    gs = plain.group_size
    err = lambda f: to_groups((f.fake_quant(w) - w).square(), gs).sum(-1)  # noqa: E731
    e_plain, e_mse = err(plain), err(mse)
    assert torch.all(e_mse <= e_plain)
    if base in ("int2:g64", "int3:g128", "int4:t", "fp4_e2m1:g32"):
        assert e_mse.sum() < 0.95 * e_plain.sum()  # and clearly better on heavy tails


@pytest.mark.parametrize("spec", ["int4:g64", "fp8_e4m3:ch", "mxfp4", "nvfp4", "nf4:g64", "bf16", "int3:g64:asym"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(spec, dtype):
    fmt = parse(spec)
    w = make_weight((9, 70), 8, dtype)
    fq = fmt.fake_quant(w)
    assert fq.dtype == dtype
    assert torch.equal(fq, fmt.fake_quant(w.float()).to(dtype))
    assert torch.equal(fmt.dequantize(fmt.quantize(w)), fmt.fake_quant(w.float()))


@pytest.mark.parametrize("spec", catalogue())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_raise_data_error(spec, bad):
    fmt = parse(spec)
    w = make_weight((4, 40) if fmt.supports((4, 40)) is None else (4, 256), 9)
    w[2, 3] = bad
    for fn in (fmt.fake_quant, fmt.quantize):
        with pytest.raises(DataError, match="NaN/inf"):
            fn(w)


def test_bad_inputs_raise_format_error():
    fmt = parse("int4:g64")
    for w in (torch.zeros(64), torch.zeros(2, 3, 4), torch.zeros(2, 64, dtype=torch.int32), torch.zeros(0, 64)):
        with pytest.raises(FormatError):
            fmt.fake_quant(w)
    with pytest.raises(FormatError, match="int8:ch"):
        parse("int8:ch").dequantize(fmt.quantize(torch.randn(2, 64)))


def test_plain_formats():
    w = make_weight((5, 30), 10)
    assert torch.equal(parse("fp32").fake_quant(w), w) and parse("fp32").fake_quant(w) is not w
    assert torch.equal(parse("bf16").fake_quant(w), w.bfloat16().float())
    q = parse("fp16").quantize(w)
    assert q.codes.dtype == torch.float16 and q.scales is None
    assert torch.equal(parse("fp16").dequantize(q), w.half().float())


@settings(max_examples=60, deadline=None)
@given(spec=st.sampled_from(QUANTIZED), rows=st.integers(1, 9), cols=st.integers(1, 300),
       log_scale=st.integers(-12, 8), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes_and_magnitudes(spec, rows, cols, log_scale, seed):
    fmt = parse(spec)
    if fmt.supports((rows, cols)) is not None:  # GGUF: whole blocks
        cols = -(-cols // fmt.group_size_for(cols)) * fmt.group_size_for(cols)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 2.0**log_scale
    q = fmt.quantize(w)
    fq = fmt.fake_quant(w)
    assert torch.equal(fmt.dequantize(q), fq)
    scale, offset, levels = element_grid(fmt, q)
    y = w / scale + offset
    nearest, half = nearest_and_half_step(y, levels)
    err = (w - fq).abs()
    step = scale.abs()  # symmetric INT scales carry a sign
    tol = 1e-6 * (y.abs() + offset.abs() + 1) * step + 1e-30
    inside = torch.isfinite(half)
    assert torch.all(err[inside] <= half[inside] * step[inside] + tol[inside])
    if not getattr(fmt, "mse", False):
        assert torch.all(err <= nearest * step + tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("spec", catalogue())
def test_cuda_matches_cpu(spec):
    """The same values on the GPU as on the CPU, bitwise. GGUF types whose block parameters come
    from a search (the IQ4 and k-quant fits) compare candidates through float sums that a GPU
    adds in another order, so near-ties (q2_k: super-block scales that give the same codes) may
    go the other way: there, the squared error must be the same to 0.5%."""
    from mixq.formats.gguf import GGUFFormat

    fmt = parse(spec)
    w = make_weight((64, 200) if fmt.supports((64, 200)) is None else (64, 256), 11)
    ref = fmt.fake_quant(w)

    def same(got):
        assert got.device.type == "cuda"
        got = got.cpu()
        if torch.equal(got, ref):
            return
        assert isinstance(fmt, GGUFFormat) and fmt.type.name in SEARCHED_GGUF, f"{spec}: CUDA differs from CPU"
        e_gpu, e_cpu = float(((got - w) ** 2).sum()), float(((ref - w) ** 2).sum())
        assert abs(e_gpu - e_cpu) <= 0.005 * e_cpu, (spec, e_gpu, e_cpu)

    same(fmt.fake_quant(w.cuda()))
    same(fmt.dequantize(fmt.quantize(w.cuda())))


SEARCHED_GGUF = ("iq4_nl", "iq4_xs", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
