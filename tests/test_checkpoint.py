"""Packed checkpoints: exact round trip of codes, size equal to the bit accounting, damaged
files refused, atomic writes, and loaded models equal to the fake-quantized model."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

from mixq import formats
from mixq.apply import applied, quantize_model
from mixq.errors import ArtifactError
from mixq.export import WEIGHTS_FILE, load_qtensors, load_quantized, read_checkpoint, save_quantized
from mixq.export import save as save_mod
from mixq.models import cnn_units, get_weight, llm_units
from mixq.nn import QuantLinear
from mixq.option import parse_option
from mixq.plan import Plan

SPECS = ["int2:g32", "int3:g32:asym", "int4:ch", "int8:ch", "fp8_e4m3:ch", "mxfp4", "nvfp4", "nf4:g32"]


def mixed_plan(name: str, units, specs=SPECS) -> Plan:
    opts = {u.name: parse_option(specs[i % len(specs)]) for i, u in enumerate(units) if u.tied_to is None}
    return Plan(name, opts, {n: next(u.shape for u in units if u.name == n) for n in opts})


@pytest.fixture(scope="module")
def llama_ckpt(tiny_llama, tmp_path_factory):
    units = llm_units(tiny_llama, include_head=True, include_embeddings=True)
    plan = mixed_plan("tiny-llama", units)
    out = tmp_path_factory.mktemp("ckpt") / "llama"
    doc = save_quantized(tiny_llama, units, plan, out, float_dtype=torch.float32)
    return tiny_llama, units, plan, out, doc


def _ids(n: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(1))


def _fake_quant_logits(model, units, plan, ids) -> torch.Tensor:
    qm = quantize_model(model, units, plan)
    with torch.no_grad(), applied(model, units, qm.weights):
        return model(ids).logits


def test_codes_round_trip_exactly(llama_ckpt):
    model, units, plan, out, doc = llama_ckpt
    assert {o.format for o in plan.options.values()} == set(SPECS)
    loaded = load_qtensors(out)
    assert set(loaded) == set(plan.options)
    for u in units:
        fmt = plan.options[u.name].fmt
        ref = fmt.quantize(get_weight(model, u).detach())
        q = loaded[u.name]
        assert q.fmt == str(fmt) and q.shape == u.shape
        for field in ("codes", "scales", "zeros", "tensor_scale"):
            a, b = getattr(ref, field), getattr(q, field)
            assert (a is None) == (b is None), (u.name, field)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), (u.name, field)


def test_size_equals_accounting(llama_ckpt):
    from safetensors import safe_open

    _, units, plan, out, doc = llama_ckpt
    n_streams, n_bytes = 0, 0
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        for name, u in doc["units"].items():
            for t_name in u["tensors"].values():
                t = f.get_tensor(t_name)
                assert t.dtype == torch.uint8 and t.dim() == 1
                n_bytes += t.numel()
                n_streams += 1
    bits = sum(plan.options[n].fmt.bits(plan.shapes[n]) for n in plan.options)
    assert 0 <= n_bytes * 8 - bits < 8 * n_streams
    assert doc["totals"]["unit_bits"] == bits and doc["totals"]["unit_bytes"] == n_bytes
    # the file is the tensors plus the safetensors header, nothing else
    header = doc["totals"]["file_bytes"] - n_bytes - doc["totals"]["plain_bytes"]
    assert 0 < header < 64 * 1024


def test_loaded_logits_equal_fake_quant(llama_ckpt):
    model, units, plan, out, _ = llama_ckpt
    ids = _ids()
    ref = _fake_quant_logits(model, units, plan, ids)
    dense = load_quantized(out, packed=False)
    packed = load_quantized(out, packed=True)
    with torch.no_grad():
        dense_logits = dense.model(ids).logits
        packed_logits = packed.model(ids).logits
    assert torch.equal(dense_logits, ref)
    torch.testing.assert_close(packed_logits, ref, rtol=1e-5, atol=1e-5)
    # every Linear unit is a QuantLinear of its own format; the embedding is dequantized
    assert set(packed.extra["dequantized_units"]) == {"model.embed_tokens"}
    for u in units:
        if u.kind == "linear":
            m = packed.model.get_submodule(u.name)
            assert isinstance(m, QuantLinear) and m.layout.fmt == plan.options[u.name].format
    assert packed.extra["plan"].options == plan.options
    assert packed.extra["n_params"] == sum(p.numel() for p in model.parameters())
    assert [x.name for x in packed.extra["units"]] == [u.name for u in units]


def test_default_bf16_storage(tiny_llama, tmp_path):
    """Tensors that are not planned units are stored in bf16: the loaded model is the
    fake-quantized model with those tensors rounded to bf16."""
    units = llm_units(tiny_llama)
    plan = Plan.uniform("tiny", units, "int4:g32")
    doc = save_quantized(tiny_llama, units, plan, tmp_path / "c")
    assert doc["float_dtype"] == "bfloat16"
    assert {t["dtype"] for t in doc["tensors"].values()} == {"bfloat16"}
    assert "lm_head.weight" in doc["tensors"] and "model.embed_tokens.weight" in doc["tensors"]
    rounded = copy.deepcopy(tiny_llama)
    planned = {u.param for u in units}
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name not in planned:
                p.copy_(p.to(torch.bfloat16))
    ids = _ids()
    ref = _fake_quant_logits(rounded, units, plan, ids)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "c", packed=False).model(ids).logits, ref)


def _copy(out, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def test_truncated_file_refused(llama_ckpt, tmp_path):
    dst = _copy(llama_ckpt[3], tmp_path)
    path = dst / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        load_quantized(dst)


def test_flipped_byte_refused(llama_ckpt, tmp_path):
    dst = _copy(llama_ckpt[3], tmp_path)
    path = dst / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_FILE} is damaged"):
        load_quantized(dst)
    with pytest.raises(ArtifactError, match="damaged"):
        load_qtensors(dst)


def test_damaged_header_without_verify_is_artifact_error(llama_ckpt, tmp_path):
    dst = _copy(llama_ckpt[3], tmp_path)
    path = dst / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[0:8] = b"\xff" * 8  # header length: garbage, same file size
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="unreadable"):
        load_quantized(dst, verify=False)


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, "config.json", "plan.json", "mixq.json"])
def test_missing_file_named(llama_ckpt, tmp_path, missing):
    dst = _copy(llama_ckpt[3], tmp_path)
    (dst / missing).unlink()
    with pytest.raises(ArtifactError, match=missing.replace(".", r"\.")):
        load_quantized(dst)


def test_schema_mismatch_refused(llama_ckpt, tmp_path):
    dst = _copy(llama_ckpt[3], tmp_path)
    doc = json.loads((dst / "mixq.json").read_text())
    doc["schema_version"] = 999
    (dst / "mixq.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="schema_version"):
        read_checkpoint(dst)


def test_atomic_write(tiny_llama, tmp_path, monkeypatch):
    units = llm_units(tiny_llama)
    plan = Plan.uniform("tiny", units, "int4:g32")
    out = tmp_path / "ckpt"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(save_mod.arch_mod, "save_config", boom)  # fails after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(tiny_llama, units, plan, out)
    assert not out.exists() and os.listdir(tmp_path) == []
    monkeypatch.undo()

    save_quantized(tiny_llama, units, plan, out)
    before = (out / WEIGHTS_FILE).read_bytes()
    with pytest.raises(ArtifactError, match="overwrite"):
        save_quantized(tiny_llama, units, plan, out)
    monkeypatch.setattr(save_mod.arch_mod, "save_config", boom)
    with pytest.raises(RuntimeError):
        save_quantized(tiny_llama, units, Plan.uniform("tiny", units, "int8:ch"), out, overwrite=True)
    assert (out / WEIGHTS_FILE).read_bytes() == before  # the old checkpoint is intact
    monkeypatch.undo()
    save_quantized(tiny_llama, units, Plan.uniform("tiny", units, "int8:ch"), out, overwrite=True)
    assert json.loads((out / "plan.json").read_text())["units"][units[0].name]["option"] == "int8:ch"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not a mixq checkpoint"):
        save_quantized(tiny_llama, units, plan, tmp_path / "other", overwrite=True)


def test_gptq_weights_stored_exactly(tiny_llama, tmp_path):
    from mixq.quantizers.unit import quantize_unit

    units = llm_units(tiny_llama)[:3]
    specs = ["int4:g32+gptq", "int3:g32:asym+gptq", "nvfp4+gptq"]
    plan = Plan("tiny", {u.name: parse_option(s) for u, s in zip(units, specs)}, {u.name: u.shape for u in units})
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for u, s in zip(units, specs):
        x = torch.randn(256, u.shape[1], generator=gen) * torch.linspace(0.2, 2.0, u.shape[1])
        weights[u.name], _ = quantize_unit(get_weight(tiny_llama, u).detach(), s, H=2 * x.T @ x / 256)
    manifest = {"seed": 0, "warnings": ["u: fell back to rtn"], "units": {}}
    doc = save_quantized(tiny_llama, llm_units(tiny_llama), plan, tmp_path / "g", weights=weights, manifest=manifest)
    assert doc["manifest"] == manifest and doc["warnings"] == manifest["warnings"]
    for name, q in load_qtensors(tmp_path / "g").items():  # GPTQ's own codes and scales, bit for bit
        for field in ("codes", "scales", "zeros", "tensor_scale"):
            a, b = getattr(q, field), getattr(weights[name].qtensor, field)
            assert (a is None and b is None) or torch.equal(a, b)
        assert torch.equal(formats.parse(q.fmt).dequantize(q), weights[name].weight())

    wrong = dict(weights)
    name = units[1].name
    wrong[name] = weights[units[0].name]  # a quantized weight of another format and shape
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
        save_quantized(tiny_llama, llm_units(tiny_llama), plan, tmp_path / "h", weights=wrong)
    assert not (tmp_path / "h").exists()
    # a GPTQ option whose quantizer never ran: the float weight is refused, naming the unit
    with pytest.raises(ArtifactError, match="quantize_model"):
        save_quantized(tiny_llama, llm_units(tiny_llama), plan, tmp_path / "h")


def test_rotated_unit_needs_its_transformed_weight(tiny_llama, tmp_path):
    """A rotated unit is stored from its quantized rotated weight (see
    test_checkpoint_transforms.py); its weight in the unit's basis is refused."""
    from mixq.quantizers.unit import quantize_unit

    u = llm_units(tiny_llama)[0]
    plan = Plan("tiny", {u.name: parse_option("int4:g32+rotate")}, {u.name: u.shape})
    qw, info = quantize_unit(get_weight(tiny_llama, u).detach(), "int4:g32+rotate")
    with pytest.raises(ArtifactError, match="rotate.*quantizer's output"):
        save_quantized(tiny_llama, [u], plan, tmp_path / "r", weights={u.name: qw.weight()})
    with pytest.raises(ArtifactError, match="quantize_model"):
        save_quantized(tiny_llama, [u], plan, tmp_path / "r")
    doc = save_quantized(tiny_llama, [u], plan, tmp_path / "r", weights={u.name: qw})
    assert doc["units"][u.name]["transforms"]["rotate"]["block"] == 64


def test_moe_round_trip(tiny_moe, tmp_path):
    units = llm_units(tiny_moe, include_head=True)
    # leave expert 1 of block 0 unplanned: its slices are stored as plain tensors
    kept = [u for u in units if not (u.index == 1 and u.block == 0)]
    plan = mixed_plan("tiny-moe", kept, ["int4:g32", "nvfp4", "int3:g32:asym", "int8:ch"])
    doc = save_quantized(tiny_moe, units, plan, tmp_path / "moe", float_dtype=None)
    assert doc["expert_slices"] and all(v == [1] for v in doc["expert_slices"].values())
    ids = _ids()
    ref = _fake_quant_logits(tiny_moe, units, plan, ids)
    for packed in (False, True):
        loaded = load_quantized(tmp_path / "moe", packed=packed)
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    reasons = loaded.extra["dequantized_units"]
    assert all("expert" in reasons[u.name] for u in kept if u.kind == "expert")
    assert isinstance(loaded.model.get_submodule("model.layers.0.self_attn.q_proj"), QuantLinear)


def test_resnet20_round_trip(tmp_path):
    from mixq.models.resnet_cifar import CifarResNet

    torch.manual_seed(0)
    model = CifarResNet(20).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    units = cnn_units(model)
    plan = mixed_plan("resnet20", units, ["int4:ch", "int8:ch", "fp8_e4m3:ch", "int3:ch:asym"])
    doc = save_quantized(model, units, plan, tmp_path / "r20", float_dtype=None)
    assert doc["model"]["arch"] == {"family": "cifar_resnet", "depth": 20, "num_classes": 10}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qm = quantize_model(model, units, plan)
    with torch.no_grad(), applied(model, units, qm.weights):
        ref = model(x)
    q = load_qtensors(tmp_path / "r20")
    for u in units:
        assert torch.equal(q[u.name].codes, plan.options[u.name].fmt.quantize(get_weight(model, u)).codes)
    for packed in (False, True):
        loaded = load_quantized(tmp_path / "r20", packed=packed)
        assert loaded.kind == "image_classifier"
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(loaded.model.linear, QuantLinear)


def test_quantize_refuses_a_non_empty_directory_before_any_work(tiny_loaded, tmp_path):
    """The output directory is checked first: the model is left untouched (quantization
    works in place) and no time is spent."""
    from mixq import api
    from mixq.errors import ArtifactError

    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = {k: v.clone() for k, v in tiny_loaded.model.state_dict().items()}
    with pytest.raises(ArtifactError, match="exists and is not empty"):
        api.quantize(tiny_loaded, out, fmt="int3:g32+rotate")
    after = tiny_loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "notes.txt").read_text() == "mine"
