"""The one path from a plan to quantized weights (`mixq.apply`): sequential calibrated
application on tiny random models, unit by unit on CNNs, sensitivity's UnitQuantizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import needs_data, needs_smollm2
from mixq import formats
from mixq.apply import applied, quantize_model
from mixq.errors import DataError
from mixq.eval.perplexity import lm_eval
from mixq.models.enumerate import llm_units
from mixq.models.units import get_weight
from mixq.option import CalibConfig, parse_option
from mixq.plan import Plan
from mixq.quantizers import output_error
from mixq.sensitivity import UnitQuantizer, collect_stats


def bs(n: int) -> CalibConfig:
    return CalibConfig(batch_size=n)


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
        qm = quantize_model(model, units, plan, calib, config=bs(4))
        for name, p in model.named_parameters():  # the model is left as it was
            assert torch.equal(p, float_model.get_parameter(name))
        with applied(model, units, qm.weights):
            kls[spec] = lm_eval(model, evalw, reference=float_model)["kl"]
        doc = json.loads(json.dumps(qm.manifest.to_dict()))  # JSON-serialisable
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
    qm = quantize_model(model, units, Plan.uniform("tiny", units, "int4:g32"))
    assert not qm.manifest.sequential
    fmt = formats.parse("int4:g32")
    u = units[0]
    assert torch.equal(qm.weights[u.name].weight(), fmt.fake_quant(get_weight(tiny_llama, u)))
    assert torch.equal(qm.weights[u.name].qtensor.codes, fmt.quantize(get_weight(tiny_llama, u)).codes)
    with applied(model, units, qm.weights):
        assert torch.equal(get_weight(model, u), fmt.fake_quant(get_weight(tiny_llama, u)))
    assert torch.equal(get_weight(model, u), get_weight(tiny_llama, u))  # restored
    with pytest.raises(DataError, match="calib_ids"):
        quantize_model(copy.deepcopy(tiny_llama), units, Plan.uniform("tiny", units, "int4:g32+gptq"))


def test_moe_experts_get_routed_hessians(tiny_moe):
    model = copy.deepcopy(tiny_moe)
    units = llm_units(model)
    calib = windows(4, 32, seed=3)
    plan = Plan.uniform("moe", units, "int3:g32+gptq")
    qm = quantize_model(model, units, plan, calib, config=bs(2))
    manifest = qm.manifest
    experts = [u for u in units if u.kind == "expert"]
    assert experts
    recs = [manifest.units[u.name] for u in experts]
    routed = [r for r in recs if r["fallback"] is None]
    assert routed and all(0 < r["n_tokens"] < 4 * 32 * 2 for r in routed)  # routed tokens only
    for r in recs:
        if r["fallback"] is not None:  # an expert no calibration token reached
            assert r["n_tokens"] == 0 and r["warnings"]
    with applied(model, units, qm.weights):
        out = model(calib[:1]).logits
    assert torch.isfinite(out).all()


def test_unit_quantizer_for_sensitivity(tiny_llama):
    units = llm_units(tiny_llama)
    calib = windows(8, 64, seed=4)
    fn = UnitQuantizer.from_calibration(tiny_llama, units, calib, config=bs(4))
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
    manifest = quantize_model(loaded.model, units, plan, calib, config=bs(2)).manifest
    assert set(manifest.units) == {u.name for u in units}
    rec = manifest.units["model.layers.0.mlp.down_proj"]
    assert rec["rotate_block"] == 512 and rec["n_tokens"] == 128
    assert manifest.units["model.layers.0.self_attn.q_proj"]["rotate_block"] == 64


# ---------------------------------------------------------------------------------------
# Models without a decoder-block list: unit by unit (a tiny CNN, ResNet20 on CIFAR-10)


class TinyCNN(torch.nn.Module):
    """conv(3->8, 3x3: 27 inputs, odd) -> conv(8->16, stride 2) -> conv(16->16) -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 3, 16, 16)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny_cnn():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():  # logits spread over a few units (a random net is otherwise near uniform)
        model.fc.weight.mul_(50.0)
    return model


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 16, 16) images of upsampled 4x4 noise: neighbouring pixels are strongly
    correlated, so the im2col inputs of the convolutions are too (where GPTQ gains)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)


def image_kl(model, reference, images) -> float:
    with torch.no_grad():
        lp, lq = reference(images).log_softmax(-1), model(images).log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_cnn_sequential_gptq_beats_rtn(tiny_cnn):
    from mixq.models.enumerate import cnn_units

    units = cnn_units(tiny_cnn)
    assert [u.name for u in units] == ["conv1", "conv2", "conv3", "fc"] and units[0].shape == (8, 27)
    calib, held_out = smooth_images(64, seed=1), smooth_images(64, seed=2)
    kls, manifests = {}, {}
    for spec in ("int3:ch", "int3:ch+gptq", "int3:ch+gptq+rotate"):
        model = copy.deepcopy(tiny_cnn)
        qm = quantize_model(model, units, Plan.uniform("tiny", units, spec), calib, config=bs(16))
        with applied(model, units, qm.weights):
            kls[spec] = image_kl(model, tiny_cnn, held_out)
        manifests[spec] = json.loads(json.dumps(qm.manifest.to_dict()))  # JSON-serialisable
    doc = manifests["int3:ch+gptq"]
    assert doc["sequential"] and doc["settings"]["order"] == "units" and doc["timing"]["n_passes"] == 4
    assert doc["calibration"]["n_images"] == 64 and doc["calibration"]["image_shape"] == [3, 16, 16]
    assert doc["units"]["conv1"]["n_tokens"] == 64 * 16 * 16  # im2col positions
    assert doc["units"]["conv2"]["n_tokens"] == 64 * 8 * 8 and doc["units"]["fc"]["n_tokens"] == 64
    assert all(r["fallback"] is None and r["damp"] == 0.01 for r in doc["units"].values())
    assert not manifests["int3:ch"]["sequential"]
    # the odd stem (27 inputs) cannot rotate: dropped for that unit, with the warning recorded
    rot = manifests["int3:ch+gptq+rotate"]
    assert rot["units"]["conv1"]["fallback"] == "int3:ch+gptq" and rot["units"]["conv1"]["rotate_block"] is None
    assert any("conv1" in w and "27" in w and "rotate" in w for w in rot["warnings"])
    assert rot["units"]["conv2"]["fallback"] is None and rot["units"]["conv2"]["rotate_block"] == 8  # 72 = 8 * 9
    # a real margin on held-out images
    assert kls["int3:ch+gptq"] < 0.7 * kls["int3:ch"]
    assert kls["int3:ch+gptq+rotate"] < 0.85 * kls["int3:ch"]


def test_cnn_units_calibrated_on_quantized_predecessors(tiny_cnn):
    """conv2's GPTQ Hessian comes from the outputs of the *quantized* conv1 (int2, RTN)."""
    from mixq.models.enumerate import cnn_units
    from mixq.quantizers import quantize_unit

    units = cnn_units(tiny_cnn)
    calib = smooth_images(32, seed=3)
    plan = Plan("tiny", {"conv1": parse_option("int2:ch"), "conv2": parse_option("int4:ch+gptq")},
                {"conv1": units[0].shape, "conv2": units[1].shape})
    model = copy.deepcopy(tiny_cnn)
    qm = quantize_model(model, units, plan, calib, config=bs(8))
    conv2 = units[1]
    w = get_weight(tiny_cnn, conv2).detach()
    partly = copy.deepcopy(tiny_cnn)  # conv1 quantized, conv2 float
    partly.conv1.weight.data.copy_(qm.weights["conv1"].weight().reshape(partly.conv1.weight.shape))
    for source, expect_equal in ((partly, True), (tiny_cnn, False)):
        st = collect_stats(source, [conv2], calib, batch_size=8)["conv2"]
        qw, _ = quantize_unit(w, "int4:ch+gptq", H=st.hessian(), act_absmean=st.absmean())
        assert torch.allclose(qw.weight(), qm.weights["conv2"].weight(), atol=1e-6) == expect_equal
    assert set(qm.weights) == {"conv1", "conv2"}  # unplanned units untouched


def test_bad_calibration_inputs_are_clear_errors(tiny_cnn, tiny_llama):
    from mixq.models.enumerate import cnn_units

    units = cnn_units(tiny_cnn)
    plan = Plan.uniform("tiny", units, "int4:ch+gptq")
    images = smooth_images(4, seed=4)
    cases = [
        ((images, torch.zeros(4, dtype=torch.long)), "pass the images"),
        ((images * 255).to(torch.uint8), "dtype torch.uint8"),
        (images[0], r"\(n, C, H, W\)"),
        (images[:, :2], "2 channels .* first Conv2d takes 3"),
        (images[:0], "at least one image"),
        (torch.zeros(4, 16, dtype=torch.long), "takes float images"),
        (images.masked_fill(images > 1, float("nan")), "NaN"),
    ]
    for bad, match in cases:
        model = copy.deepcopy(tiny_cnn)
        with pytest.raises(DataError, match=match):
            quantize_model(model, units, plan, bad)
        assert torch.equal(model.conv1.weight, tiny_cnn.conv1.weight)  # refused before any change
    lm_units = llm_units(tiny_llama)
    with pytest.raises(DataError, match="LongTensor"):  # the LM path keeps requiring token windows
        quantize_model(copy.deepcopy(tiny_llama), lm_units, Plan.uniform("tiny", lm_units, "int4:g32+gptq"), images)


def test_unit_quantizer_on_cnn(tiny_cnn):
    """Same rule as quantize_model: +rotate on the odd stem is dropped (and reported), the
    others rotate; calibrated options use the float statistics of image inputs."""
    from mixq.models.enumerate import cnn_units
    from mixq.quantizers import quantize_unit

    units = cnn_units(tiny_cnn)
    fn = UnitQuantizer.from_calibration(tiny_cnn, units, smooth_images(16, seed=5), config=bs(8))
    warnings = fn.warnings
    conv1, conv2 = units[0], units[1]
    w1, w2 = get_weight(tiny_cnn, conv1).detach(), get_weight(tiny_cnn, conv2).detach()
    assert torch.equal(fn(conv1, w1, parse_option("int3:ch+rotate")), formats.parse("int3:ch").fake_quant(w1))
    fn(conv1, w1, parse_option("int3:ch+rotate"))  # warned once per unit and option
    assert len(warnings) == 1 and warnings[0].startswith("conv1: ") and "27" in warnings[0]
    assert torch.equal(fn(conv2, w2, parse_option("int3:ch+rotate")), quantize_unit(w2, "int3:ch+rotate")[0].weight())
    assert not torch.equal(fn(conv2, w2, parse_option("int3:ch+gptq")), formats.parse("int3:ch").fake_quant(w2))
    with pytest.raises(Exception, match="odd"):  # one unit, directly: still an error
        quantize_unit(w1, "int3:ch+rotate")


@needs_data
def test_resnet20_gptq_on_cifar(one_thread):
    """ResNet20, real weights and CIFAR-10 images: unit-wise GPTQ recovers most of what
    int3:ch RTN loses (about 60% -> 79% top-1 on the evaluation half)."""
    from mixq import api
    from mixq.eval.vision import top1
    from mixq.data import load_cifar10
    from mixq.models import load_model

    loaded = load_model("resnet20-cifar10")
    (calib, labels), desc = api.calibration_data(loaded, None, samples=128, seed=0)
    assert calib.shape == (128, 3, 32, 32) and len(set(labels.tolist())) == 10 and "cifar10-calib" in desc
    with pytest.raises(DataError, match="cifar10-calib"):
        api.calibration_data(loaded, "cifar10-eval", samples=8)
    images, labels = load_cifar10("eval")
    images, labels = images[:1000], labels[:1000]
    units = loaded.units()
    float_state = copy.deepcopy(loaded.model.state_dict())
    acc = {}
    for spec in ("int3:ch", "int3:ch+gptq"):
        qm = quantize_model(loaded.model, units, Plan.uniform(loaded.name, units, spec), calib, config=bs(32))
        with applied(loaded.model, units, qm.weights):
            acc[spec] = top1(loaded.model, images, labels)["top1"]
        assert len(qm.manifest.units) == len(units) == 20
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, float_state[k])
    assert acc["int3:ch+gptq"] > acc["int3:ch"] + 0.08
    # sensitivity analysis with calibrated candidates on an image model
    table = api.analyze(loaded, candidates=["int3:ch", "int3:ch+gptq+rotate"], method="output", samples=32,
                        measure_cost=False)
    assert any(w.startswith("conv1: ") and "27" in w for w in table.calibration["quantizer_warnings"])
    better = [u.options[1]["error"] < u.options[0]["error"] for u in table.units]
    assert sum(better) >= 0.9 * len(better)


def test_diagonal_methods_credit_error_shaping(tiny_llama):
    """Fisher with calibrated candidates: a gptq option's error is the plain format's Fisher
    error scaled by the ratio of output errors tr(ΔW H ΔWᵀ); without the Hessians (no
    `gram`) the diagonal Fisher is blind to GPTQ's error cancellation."""
    from mixq.quantizers.smooth import output_error as oe
    from mixq.sensitivity import analyze

    units = llm_units(tiny_llama)
    calib = windows(8, 64, seed=4)
    fn = UnitQuantizer.from_calibration(tiny_llama, units, calib, config=bs(4))
    # the plain format is not a candidate: it is analysed alongside, then dropped
    table = analyze(tiny_llama, units, ["int3:g32+gptq", "int4:g32"], "fisher", calib, quantize_fn=fn)
    assert table.candidates == ["int3:g32+gptq", "int4:g32"]
    assert table.method_opts.get("shaped_options")
    plain = analyze(tiny_llama, units, ["int3:g32"], "fisher", calib)
    e_plain = {u.name: u.options[0]["error"] for u in plain.units}
    stats = collect_stats(tiny_llama, units, calib, batch_size=4)
    checked = 0
    for rec in table.units:
        u = next(x for x in units if x.name == rec.name)
        w = get_weight(tiny_llama, u).detach()
        H = stats[u.name].hessian()
        ratio = oe(fn(u, w, parse_option("int3:g32+gptq")) - w, H) / oe(fn(u, w, parse_option("int3:g32")) - w, H)
        e = {o["option"]: o["error"] for o in rec.options}["int3:g32+gptq"]
        assert e == pytest.approx(e_plain[rec.name] * ratio, rel=1e-6)
        assert ratio < 1.0  # GPTQ lowers the output error of every unit here
        checked += 1
    assert checked == len(units)
    # without Hessians the method scores the shaped ΔW on its own diagonal
    fn_blind = lambda unit, w, option: fn(unit, w, option)  # noqa: E731  (not a UnitQuantizer: no Hessians)
    blind = analyze(tiny_llama, units, ["int3:g32+gptq"], "fisher", calib, quantize_fn=fn_blind)
    assert blind.method_opts.get("shaped_options") is None
    assert any(abs(b.options[0]["error"] - {o["option"]: o["error"] for o in r.options}["int3:g32+gptq"])
               > 1e-3 * b.options[0]["error"] for b, r in zip(blind.units, table.units))


def test_spike_rule_rotate_or_keep(tiny_llama):
    """The spike-aware rule picks among +rotate options and 8-bit ones for flagged units,
    keeps them at 8 bits, or pins them; the flagged units land in the plan's meta."""
    from mixq import api
    from mixq.errors import MixqError
    from mixq.sensitivity import analyze, spiky_units

    units = llm_units(tiny_llama)
    calib = windows(4, 64, seed=6)
    fn = UnitQuantizer.from_calibration(tiny_llama, units, calib, config=bs(4))
    table = analyze(tiny_llama, units, ["int2:g32", "int4:g32", "int8:ch", "int3:g32+gptq+rotate"], "fisher", calib,
                    quantize_fn=fn)
    ratios = sorted(u.stats["ratio"] for u in table.units)
    cut = ratios[len(ratios) // 2]  # flag the spikier half
    flagged = spiky_units(table, cut)
    assert 0 < len(flagged) < len(units)
    plan, _ = api.plan(table, 4.0, spikes="rotate", spike_ratio=cut)
    assert plan.meta["spikes"]["units"] == flagged
    for name in flagged:
        o = plan.options[name]
        assert "rotate" in o.transforms or o.format == "int8:ch"
    from mixq.planner import spike_rule

    rows, _ = spike_rule(table.to_rows(), table.units_info, flagged, "rotate")
    for u in table.units:
        left = sorted(r[1] for r in rows if r[0] == u.name)
        assert left == (["int3:g32+gptq+rotate", "int8:ch"] if u.name in flagged else sorted(table.candidates))
    kept, _ = api.plan(table, 6.0, spikes="keep", spike_ratio=cut)
    assert all(str(kept.options[n]) == "int8:ch" for n in flagged)
    pinned, _ = api.plan(table, 6.0, spikes="int4:g32", spike_ratio=cut)
    assert all(str(pinned.options[n]) == "int4:g32" for n in flagged)
    plain = analyze(tiny_llama, units, ["int2:g32", "int4:g32"], "fisher", calib)
    with pytest.raises(MixqError, match="no candidate"):
        api.plan(plain, 3.0, spikes="rotate", spike_ratio=cut)
