"""GPU tests of the batch-1..128 kernel routes, the inline-PTX int4 decoding, the fused
transform, `LinearGroup` and the CUDA-graph decode loop (marked `gpu`; skipped on CPU).

Every case draws fresh random weights of odd shape (200 rows: partial 64/128-row tiles; 1088
or 544 inputs: partial K steps), poisons outputs with NaN where the kernel could skip rows,
and compares with a float32 reference: ||out - ref|| / ||ref|| < 1e-2.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mixq import formats
from mixq.kernels import dequantize, prepack, qmatmul, route

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]
REL_TOL = 1e-2
EVERY_BATCH = list(range(1, 21)) + [31, 32, 33, 48, 63, 64, 65, 96, 127, 128]


def _rel_err(out, ref):
    return float((out.float() - ref).norm() / ref.norm())


def _kw(spec, k, n=200, seed=0):
    torch.manual_seed(seed)
    fmt = formats.parse(spec)
    return prepack(fmt.quantize(torch.randn(n, k, device="cuda")), fmt)


@pytest.mark.parametrize("spec,k", [("int4:g128", 1088), ("int4:g64:asym", 1088), ("int4:g32", 1088),
                                    ("int8:ch", 1088), ("int3:g64", 544), ("int3:g128:asym", 1088)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dispatcher_every_batch(spec, k, dtype):
    """qmatmul at every batch 1..20 and around the tile edges up to 128, whatever it routes to."""
    kw = _kw(spec, k)
    w_ref = dequantize(kw)
    bias = torch.randn(200, device="cuda", dtype=dtype)
    for m in EVERY_BATCH:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        out = qmatmul(x, kw, bias)
        assert route(kw, x) != "reference"
        err = _rel_err(out, x.float() @ w_ref.T + bias.float())
        assert torch.isfinite(out).all() and err < REL_TOL, f"{spec} {dtype} M={m} ({route(kw, x)}): {err:.2e}"


@pytest.mark.parametrize("spec", ["int4:g128", "int4:g128:asym", "int4:g64", "int4:g32:asym", "int4:ch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tc_asm_and_plain_decoding_agree_with_reference(spec, dtype):
    """The inline-PTX int4 decode (post- and pre-scale) and the plain-Triton decode."""
    from mixq.kernels.triton_tc import TcConfig, default_block_j
    from mixq.kernels.triton_tc import qmatmul as tc_qmatmul

    kw = _kw(spec, 1088, seed=3)
    w_ref = dequantize(kw)
    bj = default_block_j(kw.layout)
    for m in (1, 7, 16, 40, 128):
        x = torch.randn(m, 1088, device="cuda", dtype=dtype)
        ref = x.float() @ w_ref.T
        for cfg in (TcConfig(128, 16 if m <= 16 else 64, bj, 1, 4 if m <= 16 else 8),
                    TcConfig(64, 16, bj, 2, post=False), TcConfig(128, 32, bj, 1, asm=False),
                    TcConfig(64, 128, bj, 3, 8, post=False)):
            out = tc_qmatmul(x, kw, None, cfg)
            err = _rel_err(out, ref)
            assert torch.isfinite(out).all() and err < REL_TOL, f"{spec} {dtype} M={m} {cfg}: {err:.2e}"


def test_every_output_written():
    """Outputs come from torch.empty: poison the allocator's blocks with NaN first."""
    from mixq.kernels import triton_tc

    kw = _kw("int4:g128", 1088, n=200)
    for m in (1, 9, 16, 64):
        x = torch.randn(m, 1088, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            junk = torch.full((m, 200), float("nan"), device="cuda", dtype=torch.bfloat16)
            del junk
            out = triton_tc.qmatmul(x, kw)
            assert torch.isfinite(out).all()


def test_fused_transform_on_gpu_matches_torch():
    from mixq.kernels.transform import online_transform, reference_transform
    from mixq.quantizers.hadamard import rotation

    for n, m in [(4096, 1), (14336, 3), (576, 16), (1536, 40)]:
        rot = rotation(n, 1)
        s = (torch.rand(n) + 0.5).cuda()
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        ref = reference_transform(x.float(), s, rot.signs.cuda(), rot.block)
        out = online_transform(x, s, rot.signs.cuda(), rot.block)
        assert _rel_err(out, ref) < 1e-2


def test_linear_group_fuses_and_matches_units():
    from torch import nn

    from mixq.nn import LinearGroup, QuantLinear
    from mixq.quantizers import UnitTransforms

    torch.manual_seed(0)
    s = torch.rand(512) + 0.5
    tf = UnitTransforms(s, 0, None, None)
    units = [QuantLinear.from_qtensor(formats.parse("int4:g128").quantize(torch.randn(n, 512)), "int4:g128",
                                      transforms=tf).cuda() for n in (256, 64, 64)]
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    refs = [nn.functional.linear(x.float(), u.effective_weight()) for u in units]
    group = LinearGroup(units)
    assert group.mode == "fused"
    for out, ref, u in zip(group(x), refs, units):
        assert _rel_err(out, ref) < REL_TOL
        assert _rel_err(u(x), ref) < REL_TOL  # the units, now on views of the fused storage


def test_static_decoder_graph_equals_eager_and_hf():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixq.export.decoder import StaticDecoder
    from mixq.nn.swap import swap_in_quant_modules  # noqa: F401  (import check)

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval().cuda()
    prompt = torch.randint(3, 512, (1, 9))
    ref = model.generate(prompt.cuda(), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                         attention_mask=torch.ones_like(prompt).cuda(), pad_token_id=0)[0, 9:].cpu()
    graphed = StaticDecoder(model, max_len=64).generate(prompt, 16)[0]
    eager = StaticDecoder(model, max_len=64, use_graph=False).generate(prompt, 16)[0]
    assert torch.equal(graphed, eager)
    assert torch.equal(graphed, ref)


@pytest.mark.parametrize("stages", ["0", "4"])
def test_static_decoder_with_dependent_launch_equals_without(stages, monkeypatch):
    """MIXQ_PDL=1: the fused decode step's Triton kernels and the CUDA GEMVs start before the
    kernel they follow ends (weights streamed before the wait). Logits of an eager step and the
    tokens of a graphed generation must equal those without it, with the register pipeline
    and with the cp.async ring (whose prologue loads run before the wait)."""
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixq.export.decoder import StaticDecoder
    from mixq.kernels import pdl
    from mixq.nn import QuantLinear

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval().cuda().to(torch.bfloat16)
    for name, mod in list(model.named_modules()):
        for leaf, lin in list(mod.named_children()):
            if isinstance(lin, nn.Linear):
                setattr(mod, leaf, QuantLinear.from_linear(lin, "int4:g128"))
    monkeypatch.setenv("MIXQ_GEMV_STAGES", stages)
    prompt = torch.randint(3, 1024, (1, 9))
    ids, pos = prompt.cuda(), torch.zeros(1, dtype=torch.long, device="cuda")
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MIXQ_PDL", flag)
        dec = StaticDecoder(model, max_len=64, use_graph=False)
        assert dec.fused
        logits = dec.forward(ids, pos)
        tokens = StaticDecoder(model, max_len=64).generate(prompt, 16)[0]
        torch.cuda.synchronize()
        out[flag] = (logits, tokens)
    assert pdl.pdl(ids.device) == (torch.cuda.get_device_capability()[0] >= 9)
    assert torch.isfinite(out["1"][0]).all()
    assert torch.equal(out["1"][0], out["0"][0])
    assert torch.equal(out["1"][1], out["0"][1])
