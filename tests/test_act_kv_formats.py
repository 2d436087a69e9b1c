"""Activation formats (the @ part of an option) and KV-cache formats: spec round trips, the
per-token / per-group / static axes, the NF grids, outliers and the first-token rule."""

from __future__ import annotations

import math

import pytest
import torch

from mixq.errors import FormatError
from mixq.formats import IntFormat, MXFormat, parse
from mixq.formats.activation import parse_act
from mixq.formats.elements import NF4_LEVELS
from mixq.formats.kvcache import KVFormat, nf_levels, parse_kv
from mixq.option import Option, parse_option
from mixq.quantizers.kvcache import quantize_keys, quantize_rows, quantize_values

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- activation formats ------------------------------------------------------------------

@pytest.mark.parametrize("text", ["int4:g128+gptq@int8:tok", "int8:ch@int8:tok", "int4:g64@fp8_e4m3:t",
                                  "int4:g64+gptq+rotate@int4:tok", "int4:g64@mxfp8", "int4:g64@mxfp4",
                                  "int4:g64@nvfp4", "int4:g64@int4:g128", "nf4:g64+smooth@int8:tok:asym"])
def test_option_with_activation_round_trips(text):
    o = parse_option(text)
    assert str(o) == text and parse_option(str(o)) == o
    assert o.bits((64, 256)) == o.weight_only.bits((64, 256)) == Option(o.format, o.quantizer, o.rotate,
                                                                          o.smooth, o.lowrank).bits((64, 256))


def test_act_part_may_come_before_suffixes_and_is_canonicalised():
    assert str(parse_option("int4:g64@INT8:TOK+gptq+rotate")) == "int4:g64+gptq+rotate@int8:tok"
    assert parse_option("int4:g64@int8:tok").act_bits == 8
    assert parse_option("int4:g64").act_bits == 16
    assert parse_option("int4:g64@fp8_e4m3:t").needs_calibration  # a static scale is calibrated
    assert not parse_option("int4:g64@fp8_e4m3:tok").needs_calibration


@pytest.mark.parametrize("bad", ["int4:g64@", "int4:g64@int8", "int4:g64@int8:ch", "int4:g64@bf16",
                                 "int4:g64@int8:tok@int4:tok", "int4:g64@mxfp4:tok", "int4:g64@int4:t:asym",
                                 "int4:g64@int4:tok:mse", "int4:g64@int9:tok"])
def test_bad_activation_specs_are_refused(bad):
    with pytest.raises(FormatError, match="activation|@"):
        parse_option(bad)


def test_per_token_axis_one_scale_per_row():
    x = randn(16, 64)
    act = parse_act("int8:tok")
    q = act.fake_quant(x)
    assert torch.equal(q, IntFormat(8, 0).fake_quant(x))  # :tok is a weight format's :ch on (tokens, in)
    y = x.clone()
    y[3] *= 1000.0  # one token with a spike: every other token's result is unchanged
    qy = act.fake_quant(y)
    rows = [i for i in range(16) if i != 3]
    assert torch.equal(qy[rows], q[rows])
    # each row on its own grid: the row's extreme lands on level -128 of its scale, every value is a
    # multiple of that scale, and the error is within one step (the signed-scale clip of formats.intk)
    step = q.abs().amax(1, keepdim=True) / 128
    assert ((q - x).abs() <= step * (1 + 1e-3)).all()
    ratio = q / step
    assert torch.allclose(ratio, torch.round(ratio), atol=1e-3)
    assert torch.allclose(step, x.abs().amax(1, keepdim=True) / 128, rtol=1e-3)


def test_per_token_groups_and_divisibility():
    x = randn(4, 64)
    act = parse_act("int4:g16")
    q = act.fake_quant(x)
    y = x.clone()
    y[0, :16] *= 100.0  # the first group only: the rest of the token keeps its scales
    assert torch.equal(act.fake_quant(y)[0, 16:], q[0, 16:])
    act.check_cols(64)
    with pytest.raises(FormatError, match="do not divide the input dimension 576"):
        parse_act("int4:g128").check_cols(576)
    with pytest.raises(FormatError, match="groups of 32"):
        parse_act("mxfp4").check_cols(48)


def test_static_per_tensor_scale_saturates_and_needs_calibration():
    act = parse_act("fp8_e4m3:t")
    assert act.static and act.code_bits == 8
    x = randn(8, 32)
    with pytest.raises(FormatError, match="static"):
        act.fake_quant(x)
    scale = act.static_scale(2.0)
    assert float(scale) == pytest.approx(2.0 / 448, rel=1e-3)
    q = act.fake_quant(x * 10, scale)
    assert q.abs().max() <= 448 * float(scale) + 1e-6  # beyond the calibrated range: saturated
    small = act.fake_quant(x * 0.1, scale)  # inside: E4M3 rounding, relative error <= 2^-4
    assert ((small - x * 0.1).abs() <= (x * 0.1).abs() * 2 ** -4 + 2 ** -9 * float(scale)).all()
    i8 = parse_act("int8:t")
    s8 = i8.static_scale(1.27)
    qi = i8.fake_quant(torch.tensor([[1.27, -1.27, 0.005, 5.0]]), s8)
    assert torch.allclose(qi, torch.tensor([[127, -127, 0, 127]]) * s8.reshape(()), atol=0)


def test_mx_activation_matches_the_weight_format_per_row():
    x = randn(8, 64)
    assert torch.equal(parse_act("mxfp4").fake_quant(x), MXFormat("mxfp4").fake_quant(x))
    assert parse_act("nvfp4").code_bits == 4 and parse_act("mxfp8").code_bits == 8


# -- KV formats --------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["int8", "int4", "int4:kchan", "int3:kchan:out1%:sink", "int2:asym:kchan64:out0.5%:sink4",
                                  "nf3:g32", "nf4:kchan", "fp16", "bf16", "int4:g16:asym"])
def test_kv_spec_round_trips(text):
    f = parse_kv(text)
    assert str(f) == text and parse_kv(str(f)) == f


@pytest.mark.parametrize("bad", ["int9", "nf5", "int4:kchan:kchan", "fp16:sink", "int4:foo", "nf4:asym", "out1%",
                                 "int4:out60%", ""])
def test_bad_kv_specs_are_refused(bad):
    with pytest.raises(FormatError, match="KV spec"):
        parse_kv(bad)


def test_kv_bits_are_exact():
    # 2 heads x 8 dims = 16 elements per token per tensor, 100 tokens
    n, t = 16, 100
    f = parse_kv("int4")
    assert f.bits_total(t, 2, 8) == 2 * (4 * n * t + 16 * 2 * t)  # one fp16 scale per token and head
    f = parse_kv("int4:asym:kchan32")
    v = 4 * n * t + (16 + 4) * 2 * t
    k = 4 * n * t + (16 + 4) * n * math.ceil(t / 32)
    assert f.bits_total(t, 2, 8) == k + v
    f = parse_kv("int2:kchan:out1%:sink")
    body = t - 1
    v = 2 * n * body + 16 * 2 * body
    k = 2 * n * body + 16 * n * math.ceil(body / 128)
    assert f.bits_total(t, 2, 8) == k + v + 2 * math.floor(0.01 * n * body) * 32 + 16 * 2 * n
    assert parse_kv("fp16").bits_per_element(t, 2, 8) == 16
    with pytest.raises(FormatError, match="head dimension 8"):
        parse_kv("int4:g3").bits_total(t, 2, 8)


def test_nf_levels():
    assert torch.allclose(nf_levels(4), torch.tensor(NF4_LEVELS), atol=1e-6)
    for b in (2, 3):
        lv = nf_levels(b)
        assert lv.numel() == 2 ** b and lv[0] == -1 and lv[-1] == 1 and (lv == 0).sum() == 1
        assert (lv[1:] > lv[:-1]).all()
    rows = randn(6, 32)
    q = quantize_rows(rows, parse_kv("nf3"), 0)
    scale = rows.abs().amax(1, keepdim=True)
    on_grid = (q / scale).unsqueeze(-1) - nf_levels(3)
    assert (on_grid.abs().amin(-1) < 1e-3).all()


def test_values_per_token_and_keys_per_channel():
    v = randn(2, 40, 3, 16)  # (batch, tokens, heads, head_dim)
    fmt = parse_kv("int4")
    qv = quantize_values(v, fmt)
    rows = v.reshape(-1, 16)
    assert torch.equal(qv.reshape(-1, 16), IntFormat(4, 0).fake_quant(rows))
    # a key channel 1000x larger: per channel the other channels are untouched, per token they suffer
    k = randn(2, 40, 3, 16, seed=1)
    big = k.clone()
    big[..., 5] *= 1000.0
    kc = parse_kv("int4:kchan")
    others = [d for d in range(16) if d != 5]
    assert torch.equal(quantize_keys(big, kc)[..., others], quantize_keys(k, kc)[..., others])
    err_tok = (quantize_keys(big, fmt)[..., others] - k[..., others]).abs().mean()
    err_chan = (quantize_keys(big, kc)[..., others] - k[..., others]).abs().mean()
    assert err_chan < err_tok / 5  # per token the other channels round to 0 (error ~ mean abs k)
    # per channel: one scale per (sequence, head, channel) over each block of 16 tokens
    kc16 = parse_kv("int4:kchan16")
    q = quantize_keys(k, kc16)
    rows = k.permute(0, 2, 3, 1).reshape(-1, 40)
    assert torch.equal(q.permute(0, 2, 3, 1).reshape(-1, 40), IntFormat(4, 16).fake_quant(rows))


def test_outliers_are_kept_exactly_and_counted():
    x = randn(1, 50, 2, 16)
    x[0, 7, 1, 3] = 40.0
    fmt = parse_kv("int3:out1%")
    q = quantize_values(x, fmt)
    n_kept = int((q == x).sum())
    k = math.floor(0.01 * x.numel())
    assert k == 16 and n_kept >= k
    assert q[0, 7, 1, 3] == 40.0
    # without outliers the spike sets its token's scale and that head's other values are lost
    plain = quantize_values(x, parse_kv("int3"))
    assert (plain[0, 7, 1] - x[0, 7, 1]).abs().max() > 5 * (q[0, 7, 1] - x[0, 7, 1]).abs().max()


def test_first_token_kept_in_fp16():
    x = randn(2, 20, 2, 8) * 3
    for spec in ("int2:sink", "int2:kchan:sink"):
        q = quantize_keys(x, parse_kv(spec))
        assert torch.equal(q[:, 0], x[:, 0])
        assert not torch.equal(q[:, 1:], x[:, 1:])
    q = quantize_values(x, parse_kv("int2:sink2"))
    assert torch.equal(q[:, :2], x[:, :2])
    assert torch.equal(quantize_values(x, parse_kv("int2:sink"))[:, 1:], quantize_values(x[:, 1:], parse_kv("int2")))


def test_per_token_keys_are_quantized_after_rope():
    """k̂ = R⁻¹ Q(R k): rotating k̂ gives the per-token quantization of the rotated keys."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    k = randn(1, 12, 2, 8)
    pos = torch.arange(12, dtype=torch.float32)[None, :, None]
    freqs = pos / (100.0 ** (torch.arange(4, dtype=torch.float32) / 4))
    emb = torch.cat([freqs, freqs], dim=-1)  # (1, T, D)
    cos, sin = emb.cos(), emb.sin()

    def rope(x, inverse):
        xt = x.transpose(1, 2)
        return apply_rotary_pos_emb(xt, xt, cos, -sin if inverse else sin)[1].transpose(1, 2)

    fmt = parse_kv("int4")
    q = quantize_keys(k, fmt, rope)
    assert torch.allclose(rope(q, False), quantize_values(rope(k, False), fmt), atol=1e-5)
    assert not torch.allclose(q, quantize_values(k, fmt), atol=1e-3)  # not the same as before RoPE
    kc = parse_kv("int4:kchan")
    assert torch.equal(quantize_keys(k, kc, rope), quantize_keys(k, kc))  # per channel: before RoPE


def test_float_kv_is_a_cast():
    x = randn(1, 4, 2, 8)
    assert torch.equal(quantize_values(x, KVFormat("fp16")), x.half().float())
    assert torch.equal(quantize_keys(x, KVFormat("bf16")), x.bfloat16().float())
    assert parse("int4:g64")  # the weight parser is untouched by the KV grammar
