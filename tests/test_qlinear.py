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


# ---------------------------------------------------------------- online transforms


@pytest.mark.parametrize("transforms", ["smooth", "rotate", "lowrank:8", "gptq+smooth+rotate+lowrank:8"])
def test_online_transforms_compute_the_fake_quant_weight(transforms):
    """x' = (x diag(1/s)) Q, y = x' Q(E)ᵀ + (x' Rᵀ) Lᵀ + b equals x ŵᵀ + b for the ŵ that
    quantize_unit evaluates (float32: to rounding; bf16 activations: to bf16 rounding)."""
    from mixq.option import CalibConfig
    from mixq.quantizers import quantize_unit

    g = torch.Generator().manual_seed(3)
    X = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 3.0, 256)
    w, bias = torch.randn(24, 256, generator=g), torch.randn(24, generator=g)
    spec = f"int4:g64+{transforms}"
    tw, _ = quantize_unit(w, spec, H=2 * X.T @ X / 512, act_absmean=X.abs().mean(0), config=CalibConfig(seed=7))
    w_hat = tw.weight()
    fmt = formats.parse("int4:g64")
    qlin = QuantLinear.from_qtensor(tw.qtensor, fmt, bias, tw.transforms)  # the quantizer's own codes
    assert torch.equal(qlin.dequantized_weight(), fmt.dequantize(tw.qtensor))  # stored: Q(E), the transformed basis
    assert torch.equal(qlin.effective_weight(), w_hat)  # ŵ, the unit's basis
    x = torch.randn(2, 5, 256, generator=g)
    ref = nn.functional.linear(x, w_hat, bias)
    torch.testing.assert_close(qlin(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    y16 = qlin(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert float((y16.float() - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert ("rotate=(seed=7, block=256)" in repr(qlin)) == ("rotate" in transforms)


def test_rotation_of_a_wide_input_runs_blockwise():
    """in = 4096 rotates with one 4096-wide Walsh–Hadamard block; nothing dense is built."""
    from mixq.quantizers import UnitTransforms, rotation

    fmt = formats.parse("int4:g128")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 4096, generator=g)
    rot = rotation(4096, seed=1)
    q = fmt.quantize(rot.apply(w))
    qlin = QuantLinear.from_qtensor(q, fmt, None, UnitTransforms(rotate_seed=1, rotate_block=4096))
    x = torch.randn(3, 4096, generator=g)
    ref = nn.functional.linear(x, rot.apply_t(fmt.dequantize(q)))
    torch.testing.assert_close(qlin(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_transforms_that_do_not_fit_are_refused():
    from mixq.quantizers import UnitTransforms

    fmt = formats.parse("int4:g32")
    q = fmt.quantize(torch.randn(16, 64))
    with pytest.raises(FormatError, match="smoothing scales have 32 entries"):
        QuantLinear.from_qtensor(q, fmt, None, UnitTransforms(smooth_scales=torch.ones(32)))
    with pytest.raises(FormatError, match="rotation block 32"):
        QuantLinear.from_qtensor(q, fmt, None, UnitTransforms(rotate_seed=0, rotate_block=32))
    with pytest.raises(FormatError, match="low-rank factors"):
        QuantLinear.from_qtensor(q, fmt, None, UnitTransforms(lowrank=(torch.zeros(16, 4), torch.zeros(4, 32))))
