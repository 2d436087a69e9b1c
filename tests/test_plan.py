"""Plan artifact: options, JSON round trip, refusal of a plan made for another model."""

import json

import pytest

from mixq.accounting import bit_totals
from mixq.errors import ArtifactError, FormatError
from mixq.models import llm_units
from mixq.option import Option, parse_option
from mixq.plan import Plan


def test_option_round_trip():
    o = parse_option("int3:g64+gptq+rotate")
    assert o == Option("int3:g64", "gptq", rotate=True)
    assert parse_option(str(o)) == o
    assert str(parse_option("int4:g64")) == "int4:g64"


def test_option_string_is_canonical():
    """Parts in any order give one option, written in the canonical order."""
    o = parse_option("int4:g128+lowrank:16+smooth+rotate+gptq")
    assert o == Option("int4:g128", "gptq", rotate=True, smooth=True, lowrank=16)
    assert str(o) == "int4:g128+gptq+rotate+smooth+lowrank:16"
    assert o.needs_calibration and not o.is_plain
    assert parse_option("int4:g64").is_plain and not parse_option("int4:g64+rotate").needs_calibration


@pytest.mark.parametrize("fields", [{"rotate": ("rotate",)}, {"smooth": 1}, {"lowrank": 0}, {"lowrank": True},
                                    {"quantizer": "awq"}])
def test_option_fields_are_typed(fields):
    with pytest.raises(FormatError):
        Option("int4:g64", **fields)


@pytest.mark.parametrize("bad", ["", "int4:g64+foo", "int4:g64+lowrank:x", "int4:g64+lowrank:0", "nope",
                                 "int4:g64+lowrank:8+lowrank:16"])
def test_bad_options_raise(bad):
    with pytest.raises(FormatError):
        parse_option(bad)


def test_lowrank_bits_count(tiny_llama):
    o = parse_option("int4:g64+lowrank:8")
    shape = (64, 128)
    assert o.bits(shape) == o.fmt.bits(shape) + 16 * 8 * (64 + 128)
    # the rank is capped at min(out, in), as quantize_unit caps it
    assert parse_option("int4:g64+lowrank:100").bits(shape) == o.fmt.bits(shape) + 16 * 64 * (64 + 128)


def test_transform_bits_count():
    """Smoothing scales are stored as one float32 per input channel; a rotation is a seed."""
    shape = (64, 128)
    fmt_bits = parse_option("int4:g64").bits(shape)
    assert parse_option("int4:g64+smooth").bits(shape) == fmt_bits + 32 * 128
    assert parse_option("int4:g64+rotate").bits(shape) == fmt_bits
    assert parse_option("int4:g64+gptq+smooth+rotate+lowrank:8").bits(shape) == fmt_bits + 32 * 128 + 16 * 8 * 192


def test_plan_save_load_and_mismatch(tiny_llama, tmp_path):
    units = llm_units(tiny_llama)
    plan = Plan.uniform("tiny", units, "int4:g32")
    p = tmp_path / "plan.json"
    plan.save(p)
    again = Plan.load(p)
    assert again.options == plan.options and again.shapes == plan.shapes
    doc = json.loads(p.read_text())
    assert doc["kind"] == "plan" and doc["schema_version"] == 1
    # A plan for another model: shapes differ.
    doc["units"]["model.layers.0.mlp.down_proj"]["shape"] = [64, 256]
    doc["units"]["model.layers.9.mlp.up_proj"] = {"option": "int4:g32", "shape": [1, 1], "bits": 0}
    p.write_text(json.dumps(doc))
    bad = Plan.load(p)
    with pytest.raises(ArtifactError) as e:
        bad.check_against(units)
    assert "down_proj" in str(e.value) and "layers.9" in str(e.value)


def test_plan_of_other_schema_is_refused(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"kind": "plan", "schema_version": 99, "units": {}}))
    with pytest.raises(ArtifactError, match="schema_version"):
        Plan.load(p)


def test_bit_totals(tiny_llama):
    units = llm_units(tiny_llama, include_head=True, include_embeddings=True)
    n_params = sum(p.numel() for p in tiny_llama.parameters())
    block_units = [u for u in units if u.block >= 0]
    plan = Plan.uniform("tiny", block_units, "int4:g32")
    t = bit_totals(plan, units, n_params)
    # int4 with an fp16 scale per 32 weights: 4 + 16/32 bits per weight.
    assert t["bpw_units"] == pytest.approx(4.5)
    assert t["bpw_blocks"] == pytest.approx(4.5)
    q = sum(u.n_params for u in block_units)
    assert t["bpw_all"] == pytest.approx((4.5 * q + 16 * (n_params - q)) / n_params)
    f = bit_totals(None, units, n_params)
    assert f["bpw_all"] == 16 and f["bpw_blocks"] == 16


def test_tied_head_counted_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in m.parameters())  # the tied tensor once
    units = llm_units(m, include_head=True, include_embeddings=True)
    plan = Plan.uniform("t", llm_units(m, include_head=True), "int8:ch")
    t = bit_totals(plan, units, n_params)
    assert t["quantized_params"] == sum(u.n_params for u in units if u.tied_to is None)
