"""CPU tests of QuantLinear (reference path)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixq import formats
from mixq.errors import FormatError
from mixq.nn import QuantLinear


@pytest.mark.parametrize("spec", ["int4:g64", "int3:g64:asym", "int8:ch", "nf4:g64", "mxfp4", "nvfp4", "fp8_e4m3:ch"])
def test_from_linear_forward_equals_fake_quant(spec):
    torch.manual_seed(0)
    lin = nn.Linear(256, 24).to(torch.bfloat16)
    qlin = QuantLinear.from_linear(lin, spec)
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
    w_hat = formats.parse(spec).fake_quant(lin.weight.detach())
    expected = nn.functional.linear(x, w_hat, lin.bias)
    assert torch.equal(qlin(x), expected)
    assert torch.equal(qlin.dequantized_weight().to(torch.bfloat16), w_hat)


def test_from_qtensor_keeps_bias_and_buffers_move():
    fmt = formats.parse("int4:g32")
    w, b = torch.randn(16, 64), torch.randn(16)
    qlin = QuantLinear.from_qtensor(fmt.quantize(w), fmt, b)
    assert qlin.in_features == 64 and qlin.out_features == 16
    names = {n for n, _ in qlin.named_buffers()}
    assert {"codes", "scales", "levels", "bias"} <= names
    assert qlin.codes.dtype == torch.int32
    y = qlin(torch.randn(3, 64))
    assert y.shape == (3, 16)
    assert not any(p.requires_grad for p in qlin.parameters())


def test_state_dict_roundtrip():
    fmt = formats.parse("nvfp4")
    a = QuantLinear.from_linear(nn.Linear(64, 8), fmt)
    b = QuantLinear.from_linear(nn.Linear(64, 8), fmt)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(a(x), b(x))


def test_plain_format_is_refused():
    with pytest.raises(FormatError):
        QuantLinear.from_linear(nn.Linear(64, 8), "bf16")
