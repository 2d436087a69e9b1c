"""GGUF block formats: the bytes mixq writes are the bytes llama.cpp reads. Checked against the
`gguf` package's reference (de)quantization and, where the `llama-cpp-python` package is
installed, against llama.cpp's own C functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixq.errors import FormatError
from mixq.formats import GGUFFormat, parse
from mixq.formats.gguf import TYPES, from_blocks, ggml_type_of, int_to_gguf, nearest_ggml, to_blocks

gguf = pytest.importorskip("gguf")
G = gguf.GGMLQuantizationType
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows of varied scale with outliers, an all-zero row and a tiny row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02 * torch.rand(rows, 1, generator=g).add(0.2)
    w.view(-1)[torch.randint(0, rows * cols, (rows * cols // 150,), generator=g)] *= 20
    w[1] = 0.0
    w[2] *= 1e-3
    return w


@pytest.mark.parametrize("name", list(TYPES))
def test_gguf_dequantizes_mixq_blocks_to_mixq_values(name):
    """llama.cpp's layout (as the gguf package reads it) gives exactly mixq's values."""
    fmt = GGUFFormat(name)
    w = weight(9, 512, seed=len(name))
    q = fmt.quantize(w)
    blocks = to_blocks(q)
    assert blocks.shape == (9, 512 // TYPES[name].block * TYPES[name].type_size)
    assert 8 * blocks.nbytes == fmt.bits((9, 512))
    ref = gguf.quants.dequantize(blocks, G[TYPES[name].ggml])
    assert np.array_equal(ref, fmt.dequantize(q).numpy())
    back = from_blocks(fmt, blocks, (9, 512))
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    rel = float(((fmt.dequantize(q) - w) ** 2).sum() / (w**2).sum())
    # and the values are a sound quantization (relative squared error, heavy outliers included)
    assert rel < {"q2_k": 0.12, "q3_k": 0.04, "q4_0": 0.03, "q4_1": 0.03, "iq4_nl": 0.03, "iq4_xs": 0.03,
                  "q4_k": 0.03}.get(name, 0.012)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_types_take_llama_cpp_reference_scales(name):
    """q4_0..q8_0 store the reference quantizer's float16 scales (and mins) byte for byte; the
    codes are the nearest levels of those stored values, which differ from the reference
    (rounded against the unrounded float32 scale) only at near-ties, by one level, never with a
    larger error."""
    fmt = GGUFFormat(name)
    w = weight(16, 256, seed=3)
    ours = fmt.quantize(w)
    ref = from_blocks(fmt, gguf.quants.quantize(w.numpy(), G[TYPES[name].ggml]), (16, 256))
    assert torch.equal(ours.scales, ref.scales)
    differ = ours.codes != ref.codes
    assert float(differ.float().mean()) < 0.05
    # one level apart where the float16 scale is normal (a subnormal one is far from its float32 value)
    step = fmt.params(ours.scales, 16)[0].repeat_interleave(32, dim=1)
    normal = step.abs() >= 2.0**-14
    assert int((ours.codes.int() - ref.codes.int()).abs()[normal].max()) <= 1
    err_ours = (fmt.dequantize(ours) - w).abs()
    err_ref = (fmt.dequantize(ref) - w).abs()
    assert torch.all(err_ours[differ] <= err_ref[differ])


@pytest.mark.parametrize("name", LEGACY)
def test_reading_reference_blocks(name):
    """Blocks written by the reference quantizer read back as the same values."""
    w = weight(4, 128, seed=4).numpy()
    blocks = gguf.quants.quantize(w, G[TYPES[name].ggml])
    q = from_blocks(GGUFFormat(name), blocks, (4, 128))
    assert np.array_equal(GGUFFormat(name).dequantize(q).numpy(), gguf.quants.dequantize(blocks, G[TYPES[name].ggml]))


@pytest.mark.parametrize("spec,ggml", [("int4:g32", "Q4_0"), ("int5:g32", "Q5_0")])
def test_symmetric_int_g32_is_a_legacy_type(spec, ggml):
    """int4:g32 (signed scale, levels -8..7) is Q4_0 and int5:g32 is Q5_0: same codes, same
    float16 scale, same values."""
    fmt = parse(spec)
    w = weight(6, 128, seed=5)
    q = fmt.quantize(w)
    assert ggml_type_of(fmt) == ggml
    g = int_to_gguf(q)
    assert np.array_equal(gguf.quants.dequantize(to_blocks(g), G[ggml]), fmt.dequantize(q).numpy())
    assert torch.equal(GGUFFormat(g.fmt).dequantize(g), fmt.dequantize(q))


@pytest.mark.parametrize("spec", ["int8:g32", "int4:g64", "int4:g32:asym", "int3:g32", "nvfp4", "mxfp4", "nf4:g64"])
def test_formats_that_are_no_ggml_type(spec):
    assert ggml_type_of(parse(spec)) is None
    near = nearest_ggml(spec, (576, 576))
    assert near and all(GGUFFormat(n).supports((576, 576)) is None for n in near)


def test_shapes_the_blocks_rule_out():
    assert GGUFFormat("q4_k").supports((576, 1536)) is None
    why = GGUFFormat("q4_k").supports((1536, 576))
    assert "256" in why and "576" in why
    assert GGUFFormat("q4_0").supports((1536, 576)) is None and GGUFFormat("q4_0").supports((4, 100)) is not None
    for call in (lambda f: f.quantize(torch.randn(4, 576)), lambda f: f.bits((4, 576))):
        with pytest.raises(FormatError, match="blocks of 256"):
            call(GGUFFormat("q6_k"))


@pytest.mark.parametrize("name", ["iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"])
def test_importance_weights_steer_the_search(name):
    """With per-input importance the parameter search lowers the weighted error."""
    fmt = GGUFFormat(name)
    w = weight(32, 512, seed=6)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(7)) ** 4 * 10 + 0.01
    from mixq.formats.fixed import fake_quant_with, group_params

    plain = fmt.fake_quant(w)
    weighted = fake_quant_with(fmt, w, group_params(fmt, w, importance=imp))
    err = lambda v: float((((v - w) ** 2) * imp).sum())  # noqa: E731
    assert err(weighted) < err(plain)


# ---------------------------------------------------------------- llama.cpp itself

from llama_cpp_ref import dequantize, ggml_library, quantize_ref  # noqa: E402

LIB = ggml_library()


def c_name(name: str) -> str:
    """ggml's function suffix of a type: q4_K for q4_k, iq4_nl for iq4_nl."""
    return name[:-1] + "K" if name.endswith("_k") else name
needs_llama_cpp = pytest.mark.skipif(LIB is None, reason="llama-cpp-python not installed (make test installs it)")


@needs_llama_cpp
@pytest.mark.parametrize("name", list(TYPES))
def test_llama_cpp_dequantizes_mixq_blocks_to_mixq_values(name):
    fmt = GGUFFormat(name)
    w = weight(5, 768 if TYPES[name].block == 256 else 96, seed=8)
    q = fmt.quantize(w)
    ours = fmt.dequantize(q).numpy().reshape(-1)
    assert np.array_equal(dequantize(LIB, c_name(name), to_blocks(q), w.numel()), ours)


@needs_llama_cpp
@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("outliers", [False, True])
def test_llama_cpp_reference_blocks_read_back_and_compare(name, outliers):
    """llama.cpp's reference quantizer's blocks read back to llama.cpp's values, and mixq's
    round to nearest is no worse than it (sum of squared errors over the weight), on Gaussian
    weights and on weights with heavy outliers (x20 on 1 in 150)."""
    fmt = GGUFFormat(name)
    t = TYPES[name]
    w = weight(32, 1024, seed=9) if outliers else torch.randn(32, 1024, generator=torch.Generator().manual_seed(3)) * 0.02
    ref = quantize_ref(LIB, c_name(name), w.numpy().reshape(-1), w.numel() // t.block * t.type_size)
    q = from_blocks(fmt, ref, tuple(w.shape))
    ref_values = dequantize(LIB, c_name(name), ref, w.numel())
    assert np.array_equal(fmt.dequantize(q).numpy().reshape(-1), ref_values)
    err_ref = float(((torch.from_numpy(ref_values).reshape(w.shape) - w) ** 2).sum())
    err_ours = float(((fmt.fake_quant(w) - w) ** 2).sum())
    assert err_ours <= err_ref
