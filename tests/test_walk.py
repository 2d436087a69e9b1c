"""Block-by-block execution (`models.walk`): one block's weights on the compute device at a
time, the same numbers as the whole model resident, for calibrated quantization,
evaluation and sensitivity; the block-by-block backward gives the whole-model Fisher."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import needs_gpu
from mixq.apply import applied, quantize_model
from mixq.eval.perplexity import lm_eval
from mixq.eval.streamed import Variant, evaluate_variants
from mixq.models import llm_units
from mixq.models.lazy import BlockStore, load_skeleton
from mixq.models.walk import Walker
from mixq.option import CalibConfig
from mixq.plan import Plan
from mixq.sensitivity import analyze

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = ["int3:g32+gptq", "int4:g32+gptq+rotate", "int4:g32"]


def windows(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def mixed_plan(units) -> Plan:
    from mixq.option import parse_option

    return Plan("tiny", {u.name: parse_option(SPECS[i % len(SPECS)]) for i, u in enumerate(units)},
                {u.name: u.shape for u in units})


@pytest.fixture(scope="module")
def saved_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama written as a safetensors model directory with a word-level tokenizer
    over the words w0..w127 (what a user downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_llama.save_pretrained(out)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)
    return out


class BlockCounter:
    """Records, at every block call, how many blocks hold real (non-meta) weights."""

    def __init__(self, walker: Walker) -> None:
        self.walker, self.max_resident, self.calls = walker, 0, 0
        self.handles = [b.register_forward_pre_hook(self) for b in walker.blocks]

    def __call__(self, module, args):
        self.calls += 1
        loaded = sum(any(p.device.type != "meta" for p in b.parameters()) for b in self.walker.blocks)
        self.max_resident = max(self.max_resident, loaded)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def disk_walker(folder) -> Walker:
    model = load_skeleton(folder, torch.float32)
    store = BlockStore(folder)
    store.check_names(model)
    return Walker(model, "cpu", "disk", store=store)


def test_disk_offload_holds_one_block_and_matches_resident(tiny_llama, saved_llama):
    """Blocks read from the safetensors shards one at a time: quantization (sequential GPTQ),
    evaluation and Fisher analysis see at most one block's weights in memory, and give the
    resident model's numbers exactly."""
    units = llm_units(tiny_llama, include_head=True)
    plan = mixed_plan(units)
    calib, evalw = windows(8, 32, seed=1), windows(4, 32, seed=2)
    cfg = CalibConfig(batch_size=4)

    resident = Walker(tiny_llama, "cpu", "none")
    ref_qm = quantize_model(resident, units, plan, calib, config=cfg)
    ref_float, ref_rows = evaluate_variants(resident, units, evalw, [Variant.for_plan("p", tiny_llama, plan, calib=calib,
                                                                                       config=cfg)])
    ref_tab = analyze(resident, units, ["int3:g32", "int4:g32+gptq"], "fisher", calib)

    walker = disk_walker(saved_llama)
    counter = BlockCounter(walker)
    try:
        assert counter.max_resident == 0 and all(p.device.type == "meta" for b in walker.blocks for p in b.parameters())
        qm = quantize_model(walker, units, plan, calib, config=cfg)
        fl, rows = evaluate_variants(walker, units, evalw, [Variant.for_plan("p", walker.model, plan, calib=calib,
                                                                             config=cfg)])
        tab = analyze(walker, units, ["int3:g32", "int4:g32+gptq"], "fisher", calib)
    finally:
        counter.close()
    assert counter.calls > 3 * walker.n_blocks and counter.max_resident == 1
    assert walker.resident_blocks() == []
    for name, qw in ref_qm.weights.items():
        q = qm.weights[name].qtensor
        assert torch.equal(q.codes, qw.qtensor.codes) and torch.equal(q.scales, qw.qtensor.scales), name
    assert fl == ref_float and rows[0]["kl"] == ref_rows[0]["kl"] and rows[0]["ppl"] == ref_rows[0]["ppl"]
    assert [u.options for u in tab.units] == [u.options for u in ref_tab.units]


def test_streamed_eval_equals_whole_model_eval(tiny_llama):
    """evaluate_variants (one walk, every variant) gives what quantize_model + applied +
    lm_eval give, variant by variant."""
    units = llm_units(tiny_llama, include_head=True, include_embeddings=True)
    calib, evalw = windows(8, 32, seed=3), windows(4, 32, seed=4)
    cfg = CalibConfig(batch_size=4)
    plans = [Plan.uniform("tiny", units, "int3:g32+gptq"), mixed_plan(units), Plan.uniform("tiny", units, "nvfp4")]
    walker = Walker(tiny_llama, "cpu", "none")
    variants = [Variant.for_plan(str(i), tiny_llama, p, calib=calib, config=cfg) for i, p in enumerate(plans)]
    fl, rows = evaluate_variants(walker, units, evalw, variants, batch_size=2)
    assert fl["ppl"] == pytest.approx(lm_eval(tiny_llama, evalw)["ppl"], rel=1e-6)
    float_copy = copy.deepcopy(tiny_llama)
    for plan, row in zip(plans, rows):
        qm = quantize_model(tiny_llama, units, plan, calib, config=cfg)
        with applied(tiny_llama, units, qm.weights):
            ref = lm_eval(tiny_llama, evalw, reference=float_copy)
        assert row["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
        assert row["kl"] == pytest.approx(ref["kl"], rel=1e-5, abs=1e-9)
        assert row["top1_agree"] == ref["top1_agree"]


def test_blockwise_fisher_equals_whole_model_backward(tiny_llama, tiny_moe):
    """The block-by-block backward (forward storing block inputs, backward recomputing each
    block) gives the whole-model Fisher table; the output method likewise."""
    from mixq.sensitivity.context import Context, parse_candidates
    from mixq.sensitivity.fisher import fisher
    from mixq.sensitivity.activations import output_method

    for model in (tiny_llama, tiny_moe):
        units = llm_units(model, include_head=True)
        calib = windows(4, 24, seed=5)
        cands = ["int2:g32", "int4:g32", "int8:ch"]
        for method, fn in (("fisher", fisher), ("output", output_method)):
            whole = fn(Context(model, units, parse_candidates(cands), calib, "lm", "ce", 0, None))
            table = analyze(Walker(model, "cpu", "none"), units, cands, method, calib)
            assert table.method_opts["blockwise"]
            for rec in table.units:
                for o in rec.options:
                    assert o["error"] == pytest.approx(whole["errors"][rec.name][o["option"]], rel=1e-6, abs=1e-12), \
                        (method, rec.name, o["option"])
            if method == "fisher":
                for rec in table.units:
                    assert rec.info["fisher_mean"] == pytest.approx(whole["info"][rec.name]["fisher_mean"], rel=1e-6)


def test_finite_difference_hvp_matches_double_backward(tiny_llama):
    """The block-by-block Hutchinson probe v·(Hv), by central differences of block-wise
    gradients (float32, the default step), matches the exact double-backward
    Hessian-vector product per unit to 1e-3 of the largest (measured: about 1e-4)."""
    from mixq.models.capture import eager_attention, unit_view
    from mixq.option import parse_option
    from mixq.sensitivity.blockwise import FD_EPS, BlockwiseAnalysis, _perturbed_grad_dot, _probe, _weight_rms
    from mixq.sensitivity.context import Context, grads_for
    from mixq.sensitivity.hessian import _HVP

    model = copy.deepcopy(tiny_llama)
    units = llm_units(model, include_head=True)
    calib = windows(2, 16, seed=6)
    a = BlockwiseAnalysis(Walker(model, "cpu", "none"), units, [parse_option("int4:g32")], calib)
    inputs = a.forward_sweep()
    eps = FD_EPS * _weight_rms(a)
    plus = _perturbed_grad_dot(a, inputs[0], 1, 0, eps, 1.0)
    minus = _perturbed_grad_dot(a, inputs[0], 1, 0, eps, -1.0)
    for name, p in model.named_parameters():  # every perturbation undone
        assert torch.equal(p, tiny_llama.get_parameter(name)), name
    ctx = Context(model, units, [], calib, "lm", "ce", 0, None)
    with eager_attention(model), grads_for(model, units) as params:
        hvp = _HVP(ctx, params, 1, False)
        pidx = {id(p): i for i, p in enumerate(params)}
        vs = {pidx[id(model.get_parameter(u.param))]: _probe(k, 1, 0, u.shape, "cpu") for k, u in enumerate(units)}
        hv = hvp(vs, list(range(len(params))))
    exact = {u.name: float((unit_view(u, vs[pidx[id(model.get_parameter(u.param))]])
                            * unit_view(u, hv[pidx[id(model.get_parameter(u.param))]])).sum()) for u in units}
    scale = max(abs(v) for v in exact.values())
    for u in units:
        fd = (plus[u.name] - minus[u.name]) / (2 * eps)
        assert abs(fd - exact[u.name]) <= 1e-3 * scale, u.name


def test_bf16_gptq_checkpoint_evaluates_to_its_fake_quantization(tiny_llama, saved_llama, tmp_path):
    """A bf16 model quantized with GPTQ saves, loads and evaluates with the same numbers as
    its fake quantization (the codes GPTQ chose are stored as they are)."""
    from mixq.export import load_quantized, save_quantized

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved_llama, dtype=torch.bfloat16).eval()  # as a user loads it
    units = llm_units(model, include_head=True, include_embeddings=True)
    plan = Plan.uniform("tiny", llm_units(model, include_head=True), "int4:g32+gptq")
    calib, evalw = windows(8, 32, seed=7), windows(4, 32, seed=8)
    qm = quantize_model(Walker(model, "cpu", "none"), units, plan, calib, config=CalibConfig(batch_size=4))
    with applied(model, units, qm.weights):
        ref = lm_eval(model, evalw, reference=tiny_llama)
    save_quantized(model, units, plan, tmp_path / "ckpt", weights=qm.weights, manifest=qm.manifest)
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.bfloat16, packed=False)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    got = lm_eval(loaded.model, evalw, reference=tiny_llama)
    assert got["ppl"] == ref["ppl"] and got["kl"] == ref["kl"] and got["top1_agree"] == ref["top1_agree"]


def test_cpu_offload_discards_device_writes(tiny_llama):
    """offload 'cpu': a block's weights are copied to the device for the block and the copy
    is dropped afterwards, so the stored float weights never change."""
    model = copy.deepcopy(tiny_llama)
    walker = Walker(model, "cpu", "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with walker.on_device(0) as block:
        assert walker.resident_blocks() == [0]
        block.self_attn.q_proj.weight.data.zero_()
    assert walker.resident_blocks() == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_placement_errors_are_clear():
    from mixq.errors import MixqError
    from mixq.models.placement import choose_offload, resolve_device, resolve_dtype

    if not torch.cuda.is_available():
        with pytest.raises(MixqError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(MixqError, match="expected auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(MixqError, match="--dtype"):
        resolve_dtype("int8", torch.device("cpu"), None)
    assert resolve_dtype("auto", torch.device("cpu"), torch.bfloat16) == torch.float32
    with pytest.raises(MixqError, match="safetensors"):
        choose_offload("disk", torch.device("cpu"), 0, False)
    assert choose_offload("auto", torch.device("cpu"), 10**12, True) == "none"


def test_load_model_offload_disk(saved_llama, tmp_path):
    """A model directory loaded with offload 'disk' keeps its blocks on the meta device and
    computes the resident model's perplexity block by block."""
    from mixq import api
    from mixq.models import load_model

    folder = saved_llama
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(2000)))
    lazy = load_model(str(folder), device="cpu", offload="disk")
    assert lazy.offload == "disk" and all(p.device.type == "meta" for p in lazy.model.model.layers.parameters())
    res = api.evaluate(lazy, formats=["int4:g32"], data=str(text), seqlen=32, windows=4)
    whole = api.evaluate(load_model(str(folder), device="cpu", offload="none"), formats=["int4:g32"], data=str(text),
                         seqlen=32, windows=4)
    assert res["offload"] == "disk" and whole["offload"] == "none"
    for a, b in zip(res["rows"], whole["rows"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6) and a["kl"] == pytest.approx(b["kl"], rel=1e-5, abs=1e-9)


@needs_gpu
def test_gpu_placement_and_offload(saved_llama):
    """On a GPU: auto picks the GPU and the model's dtype; offload 'cpu' keeps at most one
    block's weights on the GPU; the streamed evaluation matches the resident one."""
    from mixq.models import load_model

    loaded = load_model(str(saved_llama), device="auto", dtype="bfloat16", offload="cpu")
    assert loaded.compute_device.type == "cuda" and loaded.offload == "cpu"
    assert all(p.device.type == "cpu" for p in loaded.model.model.layers.parameters())
    assert loaded.model.lm_head.weight.device.type == "cpu"  # placed by the walker
    walker = loaded.walker()
    assert loaded.model.lm_head.weight.device.type == "cuda"
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(
        sum(any(p.is_cuda for p in b.parameters()) for b in walker.blocks))) for b in walker.blocks]
    units = llm_units(loaded.model, include_head=True)
    plan = Plan.uniform("tiny", units, "int4:g32+gptq")
    calib, evalw = windows(4, 32, seed=9), windows(2, 32, seed=10)
    try:
        fl, rows = evaluate_variants(walker, units, evalw, [Variant.for_plan("p", loaded.model, plan, calib=calib)])
    finally:
        for h in hooks:
            h.remove()
    assert seen and max(seen) == 1
    assert rows[0]["kl"] > 0 and fl["ppl"] > 1


def test_blockwise_hutchinson_runs_offloaded(tiny_llama):
    """hutchinson with offloaded blocks (finite differences, float32 blocks): traces for
    every unit, errors scale with the squared weight error, the model is left unchanged."""
    model = copy.deepcopy(tiny_llama)
    units = llm_units(model)
    walker = Walker(model, "cpu", "cpu", compute_dtype=torch.float32)
    table = analyze(walker, units, ["int2:g32", "int4:g32"], "hutchinson", windows(2, 16, seed=11), max_probes=6)
    assert table.method_opts["hvp"] == "central finite difference" and 4 <= table.method_opts["iterations"] <= 6
    for rec in table.units:
        e2, e4 = rec.options[0]["error"], rec.options[1]["error"]
        assert e2 > e4 >= 0 and rec.info["iterations"] == table.method_opts["iterations"]
    for name, p in model.named_parameters():
        assert torch.equal(p, tiny_llama.get_parameter(name)), name
