"""Input-activation and KV quantizers inside the one quantization/evaluation path, on the tiny
Llama: hooks, calibration that sees quantized inputs, static scales, evaluation equal to a
hand-built fake-quantized model, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from mixq.apply import applied, quantize_model
from mixq.apply.quantize import Applier, block_stats
from mixq.apply.manifest import Manifest
from mixq.apply.runtime import Runtime, check_kv, uniform_kv
from mixq.errors import FormatError
from mixq.eval.perplexity import lm_eval
from mixq.eval.streamed import Variant, evaluate_variants
from mixq.formats.activation import parse_act
from mixq.formats.kvcache import parse_kv
from mixq.models.enumerate import cnn_units, llm_units
from mixq.models.kvcache import kv_hooks, kv_layers
from mixq.models.units import get_weight
from mixq.models.walk import Walker
from mixq.option import CalibConfig, parse_option
from mixq.plan import Plan
from mixq.quantizers.activation import input_quantizer
from mixq.quantizers.kvcache import quantize_keys, quantize_values
from mixq.quantizers.unit import quantize_unit

pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n, seqlen, seed, vocab=128):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_kv_layers_of_the_tiny_llama(tiny_llama):
    layers = kv_layers(tiny_llama)
    assert [l.name for l in layers] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert layers[0].n_kv_heads == 2 and layers[0].head_dim == 16 and layers[0].key_module.endswith("k_proj")
    assert layers[0].elements_per_token == 64


def test_kv_hook_rope_is_the_models_rotary_embedding(tiny_llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids = windows(1, 10, seed=0)
    seen = {}

    def keys(k, rope):
        seen["pre"], seen["post"] = k.clone(), rope(k, False)
        assert torch.allclose(rope(seen["post"], True), k, atol=1e-5)
        return k

    layer = kv_layers(tiny_llama)[0]
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        with kv_hooks(tiny_llama, [layer], {layer.name: keys}, {}):
            out = tiny_llama(ids).logits
        h = tiny_llama.model.embed_tokens(ids)
        cos, sin = tiny_llama.model.rotary_emb(h, torch.arange(10)[None])
        k = seen["pre"].transpose(1, 2)
        expect = apply_rotary_pos_emb(k, k, cos, sin)[1].transpose(1, 2)
    assert torch.equal(out, ref)  # an identity hook changes nothing
    assert torch.allclose(seen["post"], expect, atol=1e-6)


def test_streamed_eval_equals_a_hand_built_fake_quantized_model(tiny_llama):
    """W8A8 + KV int4:kchan:sink through evaluate_variants == ŵ written by hand, inputs
    quantized per token by hand-written pre-hooks, keys/values quantized by hand."""
    model = tiny_llama
    units = llm_units(model)
    all_units = llm_units(model, include_head=True, include_embeddings=True)
    evalw = windows(3, 24, seed=5)
    kv = uniform_kv(model, parse_kv("int4:kchan:sink"))
    plan = Plan.uniform("tiny", units, "int8:ch@int8:tok", kv=kv)
    _, rows = evaluate_variants(Walker(model), all_units, evalw, [Variant.for_plan("w8a8", model, plan)])

    hand = copy.deepcopy(model)
    act = parse_act("int8:tok")
    handles = []
    for u in units:
        w = get_weight(hand, u)
        with torch.no_grad():
            w.copy_(parse_option("int8:ch").fmt.fake_quant(w.detach()))
        mod = hand.get_submodule(u.name)
        handles.append(mod.register_forward_pre_hook(lambda m, a: (act.fake_quant(a[0]),)))
    fmt = parse_kv("int4:kchan:sink")
    for layer in kv_layers(hand):
        attn = hand.get_submodule(layer.name)

        def kq(m, a, out, layer=layer):
            B, T, _ = out.shape
            return quantize_keys(out.view(B, T, layer.n_kv_heads, layer.head_dim), fmt).reshape(B, T, -1)

        def vq(m, a, out, layer=layer):
            B, T, _ = out.shape
            return quantize_values(out.view(B, T, layer.n_kv_heads, layer.head_dim), fmt).reshape(B, T, -1)

        handles += [attn.k_proj.register_forward_hook(kq), attn.v_proj.register_forward_hook(vq)]
    ref = lm_eval(hand, evalw, reference=model)
    for h in handles:
        h.remove()
    assert rows[0]["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert rows[0]["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=1e-9)
    assert rows[0]["kl"] > 0


def test_rotated_input_quantization_is_exact_in_the_transformed_basis():
    """x̂ ŵᵀ = A((x/s) Q) Q(E)ᵀ: the activation quantizer sees the rotated, smoothed input."""
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    x = torch.randn(10, 64)
    H = 2 * x.T @ x / 10
    qw, _ = quantize_unit(W, "int4:g16+smooth+rotate", H=H, act_absmean=x.abs().mean(0))
    tf = qw.transforms
    iq = input_quantizer(parse_act("int4:tok"), tf, 64)
    lhs = iq(x) @ qw.weight().T
    xp = (x / tf.smooth_scales) @ tf.rotation(64).matrix()
    rhs = parse_act("int4:tok").fake_quant(xp) @ qw.fmt.dequantize(qw.qtensor).T
    assert torch.allclose(lhs, rhs, atol=1e-4)
    plain = parse_act("int4:tok").fake_quant(x) @ qw.weight().T
    assert not torch.allclose(plain, lhs, atol=1e-3)


def test_gptq_sees_quantized_inputs(tiny_llama):
    """The statistics of a unit with an activation format (its GPTQ Hessian) are those of the
    inputs it will multiply: A(x), rotated as its weight will be."""
    model = tiny_llama
    units = [u for u in llm_units(model) if u.block == 0]
    plan = Plan.uniform("tiny", units, "int4:g32+gptq@int4:tok")
    walker = Walker(model)
    inputs = walker.embed(list(windows(4, 16, seed=3).split(2)))
    applier = Applier(model, plan, Manifest(0, True, {}, {}), CalibConfig(), None)
    q = [u for u in units if u.role == "q_proj"]
    block = walker.blocks[0]
    got = block_stats(walker, block, inputs, q, applier).get(q[0].name)
    plain = block_stats(walker, block, inputs, q).get(q[0].name)
    xs = []
    h = block.input_layernorm.register_forward_hook(lambda m, a, out: xs.append(out.reshape(-1, 64)))
    with torch.no_grad():
        for inp in inputs:
            walker.run(block, inp)
    h.remove()
    X = torch.cat(xs)
    Xq = parse_act("int4:tok").fake_quant(X)
    assert torch.allclose(got.hessian(), 2 * Xq.T @ Xq / X.shape[0], atol=1e-4)
    assert torch.allclose(plain.hessian(), 2 * X.T @ X / X.shape[0], atol=1e-4)
    assert not torch.allclose(got.hessian(), plain.hessian(), atol=1e-3)


def test_static_scales_calibrated_from_the_quantized_model(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    units = llm_units(model)
    calib = windows(4, 16, seed=7)
    plan = Plan.uniform("tiny", units, "int8:ch@fp8_e4m3:t")
    qm = quantize_model(Walker(model), units, plan, calib, config=CalibConfig(batch_size=2))
    scales = qm.runtime.describe()["static_scales"]
    assert set(scales) == {u.name for u in units}
    # block 0's q_proj input: the float input_layernorm output (nothing quantized before it)
    xs = []
    h = model.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, out: xs.append(out))
    with torch.no_grad():
        model(calib)
    h.remove()
    amax = float(torch.cat(xs).abs().max())
    assert scales["model.layers.0.self_attn.q_proj"] == pytest.approx(float(parse_act("fp8_e4m3:t").static_scale(amax)))
    assert scales["model.layers.0.self_attn.q_proj"] == scales["model.layers.0.self_attn.v_proj"]


def test_bad_input_names_the_unit_or_layer(tiny_llama):
    units = llm_units(tiny_llama, include_embeddings=True)
    layer = kv_layers(tiny_llama)[1].name
    with pytest.raises(FormatError, match=layer.replace(".", r"\.") + ".*head dimension 16"):
        Runtime(tiny_llama, {layer: parse_kv("int4:g12")})
    with pytest.raises(FormatError, match="lacks"):
        check_kv(tiny_llama, {"model.layers.9.self_attn": parse_kv("int4")})
    emb = [u for u in units if u.kind == "embedding"]
    with pytest.raises(FormatError, match="model.embed_tokens.*linear units only"):
        Runtime(tiny_llama).add(emb[0], parse_option("int8:ch@int8:tok"), None)
    down = [u for u in units if u.role == "down_proj"][0]  # in = 128: groups of 48 do not divide it
    with pytest.raises(FormatError, match="down_proj.*do not divide the input dimension 128"):
        Runtime(tiny_llama).add(down, parse_option("int8:ch@int4:g48"), None)


def test_kv_formats_refused_on_a_model_without_a_kv_cache():
    from mixq.models.resnet_cifar import CifarResNet

    net = CifarResNet(20)
    with pytest.raises(FormatError, match="no KV cache"):
        uniform_kv(net, parse_kv("int4"))
    plan = Plan.uniform("resnet", cnn_units(net), "int8:ch", kv={"layer1.0": "int4"})
    with pytest.raises(FormatError, match="no KV cache"):
        quantize_model(net, cnn_units(net), plan)


def test_applied_with_runtime_matches_evaluation(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    units = llm_units(model)
    plan = Plan.uniform("tiny", units, "int4:g32+rotate@int8:tok", kv=uniform_kv(model, parse_kv("int8")))
    qm = quantize_model(model, units, plan)
    evalw = windows(2, 20, seed=9)
    with applied(model, units, qm.weights, qm.runtime):
        got = lm_eval(model, evalw, reference=tiny_llama)
    _, rows = evaluate_variants(Walker(model), llm_units(model, include_head=True, include_embeddings=True), evalw,
                                [Variant.for_plan("p", model, plan)])
    assert got["kl"] == pytest.approx(rows[0]["kl"], rel=1e-4)
    with applied(model, units, qm.weights):  # without the runtime: weights only, a different model
        assert lm_eval(model, evalw, reference=tiny_llama)["kl"] != pytest.approx(rows[0]["kl"], rel=1e-3)


def test_checkpoint_records_activation_and_kv_formats(tiny_llama, tmp_path):
    import json

    from mixq.export import load_quantized, save_quantized

    model = copy.deepcopy(tiny_llama)
    units = llm_units(model)
    plan = Plan.uniform("tiny", units, "int4:g32@fp8_e4m3:t", kv=uniform_kv(model, parse_kv("int3:kchan:out1%:sink")))
    qm = quantize_model(Walker(model), units, plan, windows(2, 16, seed=4), config=CalibConfig(batch_size=2))
    all_units = llm_units(model, include_head=True, include_embeddings=True)
    save_quantized(model, all_units, plan, tmp_path / "ck", weights=qm.weights, manifest=qm.manifest,
                   runtime=qm.runtime.describe(), float_dtype=torch.float32)
    doc = json.loads((tmp_path / "ck" / "mixq.json").read_text())
    rec = doc["units"]["model.layers.0.mlp.down_proj"]["activation"]
    assert rec["format"] == "fp8_e4m3:t" and rec["static"] and rec["bits"] == 8
    assert rec["static_scale"] == qm.runtime.describe()["static_scales"]["model.layers.0.mlp.down_proj"] > 0
    assert doc["kv"] == {"model.layers.0.self_attn": "int3:kchan:out1%:sink",
                         "model.layers.1.self_attn": "int3:kchan:out1%:sink"}
    back = load_quantized(tmp_path / "ck")
    assert back.extra["plan"].kv == plan.kv and back.extra["plan"].options == plan.options
