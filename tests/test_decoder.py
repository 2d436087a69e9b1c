"""`nn.LinearGroup` (units sharing an input, run as one call) and `export.decoder.StaticDecoder`
(static KV cache, CUDA-graph steps on a GPU) on the CPU, against the units themselves and
Hugging Face's `generate`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mixq import formats
from mixq.errors import DataError, FormatError, MixqError
from mixq.export import generate_ids, load_quantized, save_quantized
from mixq.export.decoder import StaticDecoder, supports
from mixq.models import llm_units
from mixq.nn import LinearGroup, QuantLinear
from mixq.plan import Plan, parse_option
from mixq.quantizers import UnitTransforms

PROMPT = [1, 17, 42, 99, 5, 64, 3]


def _qlin(n, k, spec, transforms=None, seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_qtensor(formats.parse(spec).quantize(torch.randn(n, k)), spec, torch.randn(n),
                                    transforms=transforms)


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones_like(ids), pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("specs,mode", [
    (["int4:g32", "int4:g32", "int4:g32"], "fused"),
    (["int4:g32", "int8:ch", "int4:g32"], "shared_transform"),
])
def test_linear_group_equals_its_units(specs, mode, one_thread):
    tf = UnitTransforms(torch.rand(128) + 0.5, 3, None, None)
    units = [_qlin(n, 128, s, tf, seed=i) for i, (n, s) in enumerate(zip((96, 32, 32), specs))]
    x = torch.randn(2, 5, 128)
    refs = [u(x) for u in units]
    group = LinearGroup(units)
    assert group.mode == mode
    outs = group(x)
    assert len(outs) == 3
    for out, ref, u in zip(outs, refs, units):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u(x), ref, rtol=1e-5, atol=1e-5)  # units now read the fused storage
    if mode == "fused":
        assert units[1].codes.data_ptr() == group.fused_kw.codes[96:].data_ptr()


def test_linear_group_other_cases(one_thread):
    dense = [nn.Linear(64, n) for n in (48, 16)]
    x = torch.randn(3, 64)
    refs = [d(x) for d in dense]
    group = LinearGroup(dense)
    assert group.mode == "fused_dense"
    for out, ref in zip(group(x), refs):
        torch.testing.assert_close(out, ref)
    # different transforms: each unit on its own
    a = _qlin(32, 64, "int4:g32", UnitTransforms(None, 0, None, None))
    b = _qlin(32, 64, "int4:g32", UnitTransforms(None, 1, None, None))
    assert LinearGroup([a, b]).mode == "separate"
    with pytest.raises(FormatError, match="one input"):
        LinearGroup([nn.Linear(64, 8), nn.Linear(32, 8)])
    # the one-launch silu(gate) * up applies only to a fused int4 pair on the CUDA GEMV: None
    # on the CPU, for dense, unequal or three-unit groups (the decoder then runs both steps)
    pair = LinearGroup([_qlin(32, 64, "int4:g32", seed=1), _qlin(32, 64, "int4:g32", seed=2)])
    assert pair.mode == "fused" and pair.silu_mul(torch.randn(1, 64)) is None
    assert group.silu_mul(x) is None
    assert LinearGroup([_qlin(48, 64, "int4:g32"), _qlin(16, 64, "int4:g32")]).silu_mul(torch.randn(1, 64)) is None
    # where it does not apply it returns before the input transform (the caller transforms once)
    tf = UnitTransforms(torch.rand(64) + 0.5, 1, None, None)
    smooth = LinearGroup([_qlin(32, 64, "int4:g32", tf, seed=1), _qlin(32, 64, "int4:g32", tf, seed=2)])
    calls = []
    smooth.units[0].transform_input = lambda x: calls.append(x) or x
    assert smooth.mode == "fused" and smooth.silu_mul(torch.randn(1, 64)) is None and not calls


def test_linear_group_takes_an_input_transformed_by_its_producer(one_thread):
    """shared_transform names the transform a group computes once (fused or shared_transform
    modes, units with a transform); called with transformed=True on that transform's output the
    group gives what it gives on the raw input, and it never transforms again; groups whose
    units do not share one transform (or have none, or are dense) refuse transformed=True."""
    from mixq.kernels.transform import reference_transform

    x = torch.randn(3, 64)
    tf = UnitTransforms(torch.rand(64) + 0.5, 1, None, None)
    for specs in (["int4:g32", "int4:g32"], ["int4:g32", "int8:ch"]):  # fused, shared_transform
        group = LinearGroup([_qlin(32, 64, specs[0], tf, seed=1), _qlin(16, 64, specs[1], tf, seed=2)])
        smooth, signs, block = group.shared_transform()
        assert torch.equal(smooth, group.units[0].smooth_scales) and block == 64 and signs.shape == (64,)
        ref = group(x)
        xt = reference_transform(x, smooth, signs, block)
        group.units[0].transform_input = lambda _: pytest.fail("transformed twice")
        for got, want in zip(group(xt, transformed=True), ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = LinearGroup([_qlin(32, 64, "int4:g32"), _qlin(16, 64, "int4:g32")])
    separate = LinearGroup([_qlin(32, 64, "int4:g32", UnitTransforms(None, 0, None, None)),
                            _qlin(32, 64, "int4:g32", UnitTransforms(None, 1, None, None))])
    dense = LinearGroup([nn.Linear(64, 8), nn.Linear(64, 8)])
    for group in (plain, separate, dense):
        assert group.shared_transform() is None
        with pytest.raises(FormatError, match="transformed=True"):
            group(x, transformed=True)


def test_static_decoder_greedy_equals_hf_generate(tiny_llama, one_thread):
    model = copy.deepcopy(tiny_llama)
    assert supports(model)
    ref = _hf_greedy(model, PROMPT, 10)
    dec = StaticDecoder(model, max_len=32)
    assert not dec.use_graph  # CPU
    assert dec.generate(PROMPT, 10)[0].tolist() == ref
    # the prefill's logits are the model's
    with torch.no_grad():
        want = model(torch.tensor([PROMPT])).logits[0, -1]
        got = dec.forward(torch.tensor([PROMPT]), torch.zeros(1, dtype=torch.long))[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # sampling: reproducible under a seed, different across seeds
    s1 = dec.generate(PROMPT, 10, greedy=False, temperature=1.5, top_p=0.95, seed=1)
    assert torch.equal(s1, dec.generate(PROMPT, 10, greedy=False, temperature=1.5, top_p=0.95, seed=1))
    assert not torch.equal(s1, dec.generate(PROMPT, 10, greedy=False, temperature=1.5, top_p=0.95, seed=2))
    with pytest.raises(DataError, match="max_len"):
        dec.generate(PROMPT, 30)


def test_static_decoder_on_a_packed_checkpoint(tiny_llama, tmp_path, one_thread):
    """Mixed formats (so some groups fuse and some do not) with transforms: the static loop
    generates what model.generate does on the same packed model."""
    units = llm_units(tiny_llama, include_head=True)
    specs = ["int4:g32", "int8:ch", "int3:g32:asym"]
    plan = Plan("tiny", {u.name: parse_option(specs[i % len(specs)]) for i, u in enumerate(units)},
                {u.name: u.shape for u in units})
    save_quantized(tiny_llama, units, plan, tmp_path / "ck", float_dtype=torch.float32)
    packed = load_quantized(tmp_path / "ck", packed=True)
    attn = packed.model.model.layers[1].self_attn  # q/k/v with one shared online rotation
    tf = UnitTransforms(torch.rand(64) + 0.5, 0, None, None)
    for name in ("q_proj", "k_proj", "v_proj"):
        w = getattr(attn, name).dequantized_weight()
        setattr(attn, name, QuantLinear.from_qtensor(formats.parse("int4:g32").quantize(w), "int4:g32", transforms=tf))
    ref = generate_ids(packed.model, PROMPT, max_new_tokens=8, engine="hf", eos_token_id=None)
    got = generate_ids(packed.model, PROMPT, max_new_tokens=8, engine="static", eos_token_id=None)
    assert got == ref[: len(got)] and len(got) >= 1
    with pytest.raises(DataError, match="engine"):
        generate_ids(packed.model, PROMPT, engine="fast")


def test_static_decoder_refuses_other_architectures():
    with pytest.raises(MixqError, match="not one of"):
        StaticDecoder(nn.Linear(4, 4), max_len=8)
