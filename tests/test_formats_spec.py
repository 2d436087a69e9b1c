"""Spec strings: parse/str round trip, canonical forms, helpful errors; exact bit counts."""

from __future__ import annotations

import pytest

from mixq.errors import FormatError
from mixq.formats import (Format, GridFormat, IntFormat, MXFormat, NVFP4Format, PlainFormat,
                          bits_per_weight, catalogue, parse)


@pytest.mark.parametrize("spec", catalogue())
def test_catalogue_round_trip(spec):
    fmt = parse(spec)
    assert isinstance(fmt, Format)
    assert str(fmt) == spec and parse(str(fmt)) == fmt and hash(parse(spec)) == hash(fmt)


def test_catalogue_covers_families():
    cat = catalogue()
    assert len(cat) == len(set(cat))
    for k in range(2, 9):
        assert {f"int{k}:g64", f"int{k}:g128", f"int{k}:ch"} <= set(cat)
    for spec in ("int4:g64:asym", "fp8_e4m3:ch", "fp8_e5m2:g32", "fp6_e3m2:ch", "fp6_e2m3:g32",
                 "fp4_e2m1:g32", "mxfp8", "mxfp8_e5m2", "mxfp6", "mxfp6_e3m2", "mxfp4", "mxint8",
                 "nvfp4", "nf4:g64", "bf16", "fp16", "fp32", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
                 "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"):
        assert spec in cat


@pytest.mark.parametrize("text,canonical", [
    (" INT4 : G64 ", "int4:g64"),
    ("int4:asym:g64", "int4:g64:asym"),
    ("int3:mse:asym:g128", "int3:g128:asym:mse"),
    ("Int8:CH", "int8:ch"),
    ("int8:t", "int8:t"),
    ("FP8_E4M3:ch", "fp8_e4m3:ch"),
    ("fp4_e2m1:mse:g32", "fp4_e2m1:g32:mse"),
    ("MXFP8_E4M3", "mxfp8"),
    ("mxfp6_e2m3", "mxfp6"),
    ("mxfp4_e2m1", "mxfp4"),
    ("Q4_K", "q4_k"),
    (" IQ4_NL ", "iq4_nl"),
    ("bfloat16", "bf16"),
    ("float16", "fp16"),
    ("NVFP4", "nvfp4"),
    ("nf4:ch", "nf4:ch"),
])
def test_canonical_forms(text, canonical):
    assert str(parse(text)) == canonical


def test_parse_objects():
    assert parse("int4:g64") == IntFormat(4, 64)
    assert parse("int3:g64:asym") == IntFormat(3, 64, asym=True)
    assert parse("int8:ch") == IntFormat(8, 0) and parse("int8:t") == IntFormat(8, -1)
    assert parse("fp8_e4m3:g32:mse") == GridFormat("fp8_e4m3", 32, mse=True)
    assert parse("nf4:g64") == GridFormat("nf4", 64)
    assert parse("mxfp6_e3m2") == MXFormat("mxfp6_e3m2")
    assert parse("nvfp4") == NVFP4Format() and parse("bf16") == PlainFormat("bf16")
    fmt = parse("int4:g64")
    assert parse(fmt) is fmt  # a Format passes through


@pytest.mark.parametrize("bad,hint", [
    ("", None),
    ("   ", None),
    ("int4", "int4:g128"),
    ("int1:g64", "int4:g128"),
    ("int9:ch", "int4:g128"),
    ("int16:ch", None),
    ("int4:g0", "int4:g128"),
    ("int4:gx", None),
    ("int4:g-1", None),
    ("int4:g64:g32", None),
    ("int4:ch:t", None),
    ("int4:g64:asym:asym", None),
    ("int4:g64:mse:mse", None),
    ("int4:g64:foo", None),
    ("fp8", "fp8_e4m3:ch"),
    ("fp4", "nvfp4"),
    ("fp8_e4m3", "fp8_e4m3:g128"),
    ("fp8_e4m3:g32:asym", "fp8_e4m3:g32"),
    ("nf4", "nf4:g128"),
    ("nf4:g64:asym", None),
    ("mxfp4:g32", "mxfp4"),
    ("nvfp4:g16", "nvfp4"),
    ("bf16:ch", "bf16"),
    ("mxfp5", None),
    ("int4g64", "int4:g64"),
    ("q4_k_m", "q4_k"),
    ("q4_k:g32", "q4_k"),
    ("iq4", "iq4_nl or iq4_xs"),
    ("e4m3", "fp8_e4m3:ch"),
    ("int4:", None),
])
def test_malformed_specs(bad, hint):
    with pytest.raises(FormatError) as info:
        parse(bad)
    msg = str(info.value)
    assert "Valid forms" in msg and "int<2..8>:(g<N>|ch|t)[:asym][:mse]" in msg and "mxfp4" in msg
    assert repr(bad) in msg
    if hint:
        assert hint in msg


def test_non_string_spec():
    with pytest.raises(FormatError):
        parse(4)
    assert issubclass(FormatError, ValueError)


def test_direct_construction_validates():
    for make in (lambda: IntFormat(9, 64), lambda: IntFormat(4, -2), lambda: GridFormat("fp7", 32),
                 lambda: MXFormat("mxfp3"), lambda: PlainFormat("fp64")):
        with pytest.raises(FormatError):
            make()


# -- exact bit accounting -------------------------------------------------------------------

@pytest.mark.parametrize("spec,shape,bits", [
    ("int4:g64", (576, 576), 4 * 576 * 576 + 16 * 576 * 9),
    ("int4:g64:asym", (576, 576), 4 * 576 * 576 + (16 + 4) * 576 * 9),
    ("int3:g64", (576, 576), 3 * 576 * 576 + 16 * 576 * 9),
    ("int8:ch", (576, 576), 8 * 576 * 576 + 16 * 576),
    ("int8:t", (576, 576), 8 * 576 * 576 + 16),
    ("int4:g128", (576, 576), 4 * 576 * 576 + 16 * 576 * 5),  # 576 = 4*128 + 64: partial group
    ("int4:g64", (7, 100), 4 * 700 + 16 * 7 * 2),
    ("int3:g64:asym", (7, 100), 3 * 700 + (16 + 3) * 7 * 2),
    ("fp8_e4m3:ch", (7, 100), 8 * 700 + 16 * 7),
    ("fp4_e2m1:g32", (7, 100), 4 * 700 + 16 * 7 * 4),
    ("nf4:g64", (576, 576), 4 * 576 * 576 + 16 * 576 * 9),
    ("mxfp4", (576, 576), 4 * 576 * 576 + 8 * 576 * 18),
    ("mxfp6", (7, 100), 6 * 700 + 8 * 7 * 4),
    ("mxfp8", (576, 576), 8 * 576 * 576 + 8 * 576 * 18),
    ("mxint8", (3, 33), 8 * 99 + 8 * 3 * 2),
    ("nvfp4", (576, 576), 4 * 576 * 576 + 8 * 576 * 36 + 32),
    ("nvfp4", (7, 100), 4 * 700 + 8 * 7 * 7 + 32),
    ("bf16", (7, 100), 16 * 700),
    ("fp32", (7, 100), 32 * 700),
    # GGUF: 8 x llama.cpp's bytes (block bytes: q4_0 18, q4_1 20, q5_0 22, q5_1 24, q8_0 34,
    # iq4_nl 18 per 32; q2_k 84, q3_k 110, q4_k 144, q5_k 176, q6_k 210, iq4_xs 136 per 256)
    ("q4_0", (576, 576), 8 * 18 * 576 * 18),
    ("q4_1", (576, 576), 8 * 20 * 576 * 18),
    ("q5_0", (3, 64), 8 * 22 * 3 * 2),
    ("q5_1", (3, 64), 8 * 24 * 3 * 2),
    ("q8_0", (576, 1536), 8 * 34 * 576 * 48),
    ("iq4_nl", (576, 576), 8 * 18 * 576 * 18),
    ("q2_k", (576, 1536), 8 * 84 * 576 * 6),
    ("q3_k", (576, 1536), 8 * 110 * 576 * 6),
    ("q4_k", (576, 1536), 8 * 144 * 576 * 6),
    ("q5_k", (2, 512), 8 * 176 * 2 * 2),
    ("q6_k", (2, 512), 8 * 210 * 2 * 2),
    ("iq4_xs", (2, 512), 8 * 136 * 2 * 2),
])
def test_bits(spec, shape, bits):
    assert parse(spec).bits(shape) == bits
    assert bits_per_weight(spec, shape) == bits / (shape[0] * shape[1])


def test_bits_per_weight_headline_numbers():
    s = (576, 576)
    assert bits_per_weight("int4:g64", s) == 4.25
    assert bits_per_weight("int4:g64:asym", s) == 4.3125
    assert bits_per_weight("int3:g64", s) == 3.25
    assert bits_per_weight("mxfp4", s) == 4.25
    assert bits_per_weight("mxfp6", s) == 6.25
    assert bits_per_weight("mxfp8", s) == 8.25
    assert bits_per_weight("nf4:g64", s) == 4.25
    assert abs(bits_per_weight("nvfp4", s) - 4.5) < 1e-4
    assert bits_per_weight("int4:g128:mse", s) == bits_per_weight("int4:g128", s)
