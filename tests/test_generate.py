"""Quantized checkpoints run whole and generate: tiny Llama on token ids, and the real
SmolLM2-135M (marked) on text."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_data, needs_gpu, needs_smollm2
from mixq.apply import applied, quantize_model
from mixq.errors import MixqError
from mixq.export import generate, generate_ids, load_quantized, save_quantized
from mixq.models import llm_units
from mixq.option import parse_option
from mixq.plan import Plan

SPECS = ["int4:g32", "nvfp4", "int3:g32:asym", "mxfp4", "int8:ch", "nf4:g32", "fp8_e4m3:ch", "int2:g32"]
PROMPT = [1, 17, 42, 99, 5]


@pytest.fixture(scope="module")
def ckpt(tiny_llama, tmp_path_factory):
    units = llm_units(tiny_llama, include_head=True)
    plan = Plan("tiny", {u.name: parse_option(SPECS[i % len(SPECS)]) for i, u in enumerate(units)},
                {u.name: u.shape for u in units})
    out = tmp_path_factory.mktemp("gen") / "ckpt"
    save_quantized(tiny_llama, units, plan, out, float_dtype=torch.float32)
    return tiny_llama, units, plan, out


def test_generate_packed_equals_dequantized_and_fake_quant(ckpt):
    model, units, plan, out = ckpt
    with applied(model, units, quantize_model(model, units, plan).weights):
        ref = generate_ids(model, PROMPT, max_new_tokens=8)
    packed = load_quantized(out, packed=True)
    dense = load_quantized(out, packed=False)
    assert 1 <= len(ref) <= 8
    assert generate_ids(packed.model, PROMPT, max_new_tokens=8) == ref
    assert generate_ids(dense.model, PROMPT, max_new_tokens=8) == ref
    # without a tokenizer, generate() takes ids and returns them as text
    assert generate(packed, PROMPT, max_new_tokens=8) == " ".join(map(str, ref))
    with pytest.raises(MixqError, match="no tokenizer"):
        generate(packed, "hello")


def test_generate_in_bf16_and_sampling(ckpt):
    out = ckpt[3]
    loaded = load_quantized(out, packed=True, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = loaded.model(torch.tensor([PROMPT])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert loaded.model.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16  # scales not cast
    a = generate_ids(loaded.model, PROMPT, max_new_tokens=6, greedy=False, temperature=0.8, seed=3)
    b = generate_ids(loaded.model, PROMPT, max_new_tokens=6, greedy=False, temperature=0.8, seed=3)
    assert a == b and len(a) >= 1


@needs_smollm2
@needs_data
def test_smollm2_int4_checkpoint(tmp_path):
    from mixq.accounting import bit_totals
    from mixq.data import load_text, token_windows
    from mixq.eval.perplexity import lm_eval
    from mixq.models import load_model

    loaded = load_model("smollm2-135m")
    all_units = loaded.units(include_head=True, include_embeddings=True)
    plan = Plan.uniform(loaded.name, loaded.units(), "int4:g64")
    windows = token_windows(loaded.encode, load_text("wikitext2"), 128, 1)
    with applied(loaded.model, all_units, quantize_model(loaded.model, all_units, plan).weights):
        ref = lm_eval(loaded.model, windows)["ppl"]
    doc = save_quantized(loaded, all_units, plan, tmp_path / "smol", float_dtype=None)
    # unit streams: the format's bits up to byte rounding (2 streams per unit: codes, scales)
    assert 0 <= doc["totals"]["unit_bytes"] * 8 - doc["totals"]["unit_bits"] < 8 * 2 * len(plan.options)
    q = load_quantized(tmp_path / "smol", packed=True)
    assert q.extra["dequantized_units"] == {}
    assert lm_eval(q.model, windows)["ppl"] == pytest.approx(ref, rel=1e-5)
    acc = bit_totals(q.extra["plan"], q.extra["units"], q.extra["n_params"])
    assert acc["bpw_units"] == pytest.approx(4.25)
    text = generate(q, "The capital of France is", max_new_tokens=8)
    assert text.strip()


@needs_gpu
def test_packed_checkpoint_on_gpu_matches_dequantized(tmp_path):
    """On CUDA with bf16 activations QuantLinear runs the Triton kernels inside the HF model:
    logits match the dequantized model's (same weights, other summation order) and greedy
    generation runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixq.kernels import kernel_available
    from mixq.nn import QuantLinear

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    units = llm_units(model, include_head=True)
    plan = Plan("gpu", {u.name: parse_option(SPECS[i % len(SPECS)]) for i, u in enumerate(units)},
                {u.name: u.shape for u in units})
    save_quantized(model, units, plan, tmp_path / "c")
    packed = load_quantized(tmp_path / "c", device="cuda", dtype=torch.bfloat16, packed="auto")
    dense = load_quantized(tmp_path / "c", device="cuda", dtype=torch.bfloat16, packed=False)
    qlins = [m for m in packed.model.modules() if isinstance(m, QuantLinear)]
    assert len(qlins) == len(units)
    x = torch.randn(3, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    assert all(kernel_available(m.weights(), x) for m in qlins)
    ids = torch.randint(0, 256, (2, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        a, b = packed.model(ids).logits.float(), dense.model(ids).logits.float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()
    new = generate_ids(packed.model, PROMPT, max_new_tokens=8)
    assert 1 <= len(new) <= 8
