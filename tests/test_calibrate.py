"""Sequential calibrated application (`mixq.calibrate`) on tiny random models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import needs_smollm2
from mixq import formats
from mixq.calibrate import collect_stats, quantize_fn_for_sensitivity, quantize_model
from mixq.errors import DataError
from mixq.eval.perplexity import lm_eval
from mixq.models.enumerate import llm_units
from mixq.models.units import get_weight
from mixq.plan import Plan, parse_option
from mixq.quantizers import output_error


pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n: int, seqlen: int, seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_sequential_gptq_beats_rtn_on_tiny_llama(tiny_llama):
    float_model = tiny_llama
    units = llm_units(float_model, include_head=True)
    calib, evalw = windows(16, 64, seed=1), windows(8, 64, seed=2)
    kls = {}
    for spec in ("int3:g32", "int3:g32+gptq", "int3:g32+gptq+rotate"):
        model = copy.deepcopy(float_model)
        plan = Plan.uniform("tiny", units, spec)
        manifest = quantize_model(model, units, plan, calib, batch_size=4)
        kls[spec] = lm_eval(model, evalw, reference=float_model)["kl"]
        doc = json.loads(json.dumps(manifest.to_dict()))  # JSON-serialisable
        assert doc["sequential"] == ("gptq" in spec)
        assert set(doc["units"]) == {u.name for u in units}
        for name, rec in doc["units"].items():
            assert rec["option"] == spec and rec["planned"] == spec and rec["fallback"] is None
            assert rec["wall_s"] >= 0 and isinstance(rec["warnings"], list)
            if "gptq" in spec:
                assert rec["damp"] == 0.01 and rec["n_tokens"] == 16 * 64
                assert rec["output_error"] is not None
        if "gptq" in spec:
            assert doc["calibration"]["n_windows"] == 16 and doc["calibration"]["seqlen"] == 64
            assert doc["units"]["model.layers.0.self_attn.q_proj"]["rotate_block"] == (64 if "rotate" in spec else None)
    # a real margin: sequential GPTQ cuts the KL of RTN on held-out windows
    assert kls["int3:g32+gptq"] < 0.85 * kls["int3:g32"]
    assert kls["int3:g32+gptq+rotate"] < 0.85 * kls["int3:g32"]


def test_rtn_plan_needs_no_calibration(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    units = llm_units(model)
    manifest = quantize_model(model, units, Plan.uniform("tiny", units, "int4:g32"))
    assert not manifest.sequential
    fmt = formats.parse("int4:g32")
    u = units[0]
    assert torch.equal(get_weight(model, u), fmt.fake_quant(get_weight(tiny_llama, u)))
    with pytest.raises(DataError, match="calib_ids"):
        quantize_model(copy.deepcopy(tiny_llama), units, Plan.uniform("tiny", units, "int4:g32+gptq"))


def test_moe_experts_get_routed_hessians(tiny_moe):
    model = copy.deepcopy(tiny_moe)
    units = llm_units(model)
    calib = windows(4, 32, seed=3)
    plan = Plan.uniform("moe", units, "int3:g32+gptq")
    manifest = quantize_model(model, units, plan, calib, batch_size=2)
    experts = [u for u in units if u.kind == "expert"]
    assert experts
    recs = [manifest.units[u.name] for u in experts]
    routed = [r for r in recs if r["fallback"] is None]
    assert routed and all(0 < r["n_tokens"] < 4 * 32 * 2 for r in routed)  # routed tokens only
    for r in recs:
        if r["fallback"] is not None:  # an expert no calibration token reached
            assert r["n_tokens"] == 0 and r["warnings"]
    out = model(calib[:1]).logits
    assert torch.isfinite(out).all()


def test_quantize_fn_for_sensitivity(tiny_llama):
    units = llm_units(tiny_llama)
    calib = windows(8, 64, seed=4)
    fn = quantize_fn_for_sensitivity(tiny_llama, units, calib, batch_size=4)
    stats = collect_stats(tiny_llama, units, calib, batch_size=4)
    u = next(x for x in units if x.role == "down_proj")
    w = get_weight(tiny_llama, u).detach()
    H = stats[u.name].hessian()
    w_gptq = fn(u, w, parse_option("int3:g32+gptq"))
    w_rtn = fn(u, w, parse_option("int3:g32"))
    assert torch.equal(w_rtn, formats.parse("int3:g32").fake_quant(w))
    assert output_error(w_gptq - w, H) < 0.8 * output_error(w_rtn - w, H)


@needs_smollm2
def test_smollm2_first_block(data_dir):
    """SmolLM2-135M: sequential GPTQ on block 0 only (two short windows)."""
    from mixq.models import load_model

    loaded = load_model("smollm2-135m")
    units = [u for u in loaded.units() if u.block == 0]
    plan = Plan.uniform(loaded.name, units, "int3:g64+gptq+rotate")
    calib = windows(2, 64, seed=5, vocab=49152)
    manifest = quantize_model(loaded.model, units, plan, calib, batch_size=2)
    assert set(manifest.units) == {u.name for u in units}
    rec = manifest.units["model.layers.0.mlp.down_proj"]
    assert rec["rotate_block"] == 512 and rec["n_tokens"] == 128
    assert manifest.units["model.layers.0.self_attn.q_proj"]["rotate_block"] == 64
