"""Packed checkpoints of units quantized with transforms (+rotate, +smooth, +lowrank:R):
Q(E)'s codes, s, the rotation's seed and L, R round-trip; the loaded model computes the
fake-quantized model's logits (bit for bit dequantized, to float rounding packed); damaged
transform tensors and records are refused, naming the file or unit."""

from __future__ import annotations

import copy
import json
import shutil
import struct

import pytest
import torch

from conftest import needs_gpu, needs_smollm2
from mixq import formats
from mixq.apply import applied, quantize_model
from mixq.errors import ArtifactError
from mixq.export import WEIGHTS_FILE, load_qtensors, load_quantized, load_transforms, read_checkpoint, save_quantized
from mixq.models import LoadedModel, llm_units
from mixq.nn import QuantLinear
from mixq.option import CalibConfig, parse_option
from mixq.plan import Plan

pytestmark = pytest.mark.usefixtures("one_thread")

UNIFORM = ["int4:g32+rotate", "int4:g32+smooth", "int4:g32+lowrank:8", "int3:g32+gptq+rotate"]
# the units of the tiny Llama (head included) cycle through these; the embedding gets
# EMBEDDING, whose smoothing is dropped (no input Hessian) and whose rotation is kept
MIXED = ["int4:g32+rotate", "int3:g32+gptq", "nvfp4+smooth", "int3:g32:asym+gptq+rotate+lowrank:4",
         "mxfp4+lowrank:8", "int4:g32+smooth+rotate", "fp8_e4m3:ch+rotate", "int4:g32"]
EMBEDDING = "int4:g32+smooth+rotate"


def _ids(n: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _quantize(float_model, plan, units):
    """The quantized weights of the model under the plan (QuantizedModel) and the logits of
    the fake-quantized model."""
    qm = quantize_model(float_model, units, plan, _ids(4, 32, seed=2), config=CalibConfig(batch_size=2))
    with torch.no_grad(), applied(float_model, units, qm.weights):
        logits = float_model(_ids()).logits
    return qm, logits


def _transformed(qm):
    return {n: w for n, w in qm.weights.items() if not w.transforms.is_identity}


def _plan(model, specs, embedding=None):
    units = llm_units(model, include_head=True, include_embeddings=embedding is not None)
    opts = {u.name: parse_option(embedding if u.kind == "embedding" else specs[i % len(specs)])
            for i, u in enumerate(units)}
    return Plan("tiny", opts, {u.name: u.shape for u in units})


@pytest.fixture(scope="module", params=UNIFORM + ["mixed"])
def saved(request, tiny_llama, tmp_path_factory):
    all_units = llm_units(tiny_llama, include_head=True, include_embeddings=True)
    if request.param == "mixed":
        plan = _plan(tiny_llama, MIXED, embedding=EMBEDDING)
    else:
        plan = _plan(tiny_llama, [request.param])
    qm, ref = _quantize(tiny_llama, plan, all_units)
    out = tmp_path_factory.mktemp("tf") / "ckpt"
    doc = save_quantized(tiny_llama, all_units, plan, out, weights=qm.weights, manifest=qm.manifest,
                         float_dtype=torch.float32)
    return request.param, all_units, plan, qm, ref, out, doc


def test_loaded_logits_equal_fake_quant(saved):
    spec, units, plan, manifest, ref, out, doc = saved
    assert doc["schema_version"] == 2
    dense = load_quantized(out, packed=False)
    packed = load_quantized(out, packed=True)
    with torch.no_grad():
        dense_logits = dense.model(_ids()).logits
        packed_logits = packed.model(_ids()).logits
    assert torch.equal(dense_logits, ref)  # the same reconstruction of ŵ as fake quantization
    torch.testing.assert_close(packed_logits, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    n_transformed = 0
    for u in units:
        if u.name not in plan.options or u.kind != "linear":
            continue
        m = packed.model.get_submodule(u.name)
        assert isinstance(m, QuantLinear) and m.layout.fmt == plan.options[u.name].format
        opt = plan.options[u.name]
        assert (m.rotate_signs is not None) == ("rotate" in opt.transforms)
        assert (m.smooth_scales is not None) == ("smooth" in opt.transforms)
        assert (m.lowrank_l is not None) == any(t.startswith("lowrank") for t in opt.transforms)
        if opt.transforms:  # the module's own weight in the unit's basis is the fake-quant weight
            n_transformed += 1
            assert torch.equal(m.effective_weight(), manifest.weights[u.name].weight())
    assert n_transformed > 0
    if spec == "mixed":  # the embedding (rotated) is reconstructed in the float model
        assert "model.embed_tokens" in packed.extra["dequantized_units"]
        assert "model.embed_tokens" in doc["units"] and "rotate" in doc["units"]["model.embed_tokens"]["transforms"]


def test_codes_and_transforms_round_trip(saved):
    spec, units, plan, manifest, ref, out, doc = saved
    qts = load_qtensors(out)
    tfs = load_transforms(out)
    by_name = {u.name: u for u in units}
    assert set(by_name) >= set(qts)
    for name, tw in _transformed(manifest).items():
        q = qts[name]
        fmt = formats.parse(q.fmt)
        assert torch.equal(fmt.dequantize(q), fmt.dequantize(tw.qtensor)), name  # Q(E) exactly
        assert torch.equal(q.codes, tw.qtensor.codes) and torch.equal(q.scales, tw.qtensor.scales)
        got, want = tfs[name], tw.transforms
        assert got.rotate_seed == want.rotate_seed and got.rotate_block == want.rotate_block
        assert (got.smooth_scales is None) == (want.smooth_scales is None)
        assert (got.lowrank is None) == (want.lowrank is None)
        pairs = [(got.smooth_scales, want.smooth_scales)] + list(zip(got.lowrank or (), want.lowrank or ()))
        for a, b in pairs:
            assert a is None or (a.dtype == torch.float32 and torch.equal(a, b)), name
    assert set(tfs) == set(_transformed(manifest))
    if spec == "mixed":  # plain RTN / GPTQ units carry no transforms record
        assert all("transforms" not in doc["units"][n] for n, o in plan.options.items() if not o.transforms)


def test_stored_bytes_equal_accounting(saved):
    spec, units, plan, manifest, ref, out, doc = saved
    from safetensors import safe_open

    n_bytes = n_tensors = 0
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        for name, u in doc["units"].items():
            names = list(u["tensors"].values())
            tf = u.get("transforms", {})
            names += [tf["smooth"]["tensor"]] if "smooth" in tf else []
            names += [tf["lowrank"]["l"], tf["lowrank"]["r"]] if "lowrank" in tf else []
            size = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names)
            assert size == u["bytes"]
            n_bytes += size
            n_tensors += len(names)
    fallbacks = [n for n, r in manifest.manifest.units.items() if r["fallback"]]
    expected = {n: b for n, b in plan.unit_bits().items() if n not in fallbacks}
    assert {n: doc["units"][n]["bits"] for n in expected} == expected  # the accounting's bits (Option.bits)
    assert doc["totals"]["unit_bytes"] == n_bytes
    assert 0 <= n_bytes * 8 - doc["totals"]["unit_bits"] < 8 * n_tensors
    if spec == "mixed":  # the embedding cannot smooth (no Hessian): stored without s, bits as stored
        emb = [n for n in fallbacks if doc["units"][n]["kind"] == "embedding"]
        for n in emb:
            assert "smooth" not in doc["units"][n].get("transforms", {})
            assert doc["units"][n]["bits"] < plan.unit_bits()[n]


def test_state_dict_and_device_move(saved):
    out = saved[5]
    packed = load_quantized(out, packed=True)
    qlins = {n: m for n, m in packed.model.named_modules() if isinstance(m, QuantLinear) and m.transforms.is_identity is False}
    assert qlins
    name, m = next(iter(qlins.items()))
    keys = set(m.state_dict())
    assert {"codes", "scales"} <= keys
    assert ("smooth_scales" in keys) == (m.smooth_scales is not None)
    assert ("rotate_signs" in keys) == (m.rotate_signs is not None)
    assert ("lowrank_l" in keys and "lowrank_r" in keys) == (m.lowrank_l is not None)
    clone = copy.deepcopy(m)
    clone.load_state_dict(m.state_dict())
    x = torch.randn(3, m.in_features)
    assert torch.equal(clone(x), m(x))
    moved = copy.deepcopy(m).to("meta")
    assert all(b.device.type == "meta" for b in moved.buffers())


# ---------------------------------------------------------------- bad input


def test_transform_plan_without_transformed_weights_refused(tiny_llama, tmp_path):
    all_units = llm_units(tiny_llama, include_head=True, include_embeddings=True)
    plan = _plan(tiny_llama, ["int4:g32+rotate"])
    qm, _ = _quantize(tiny_llama, plan, all_units)
    first = next(iter(plan.options))
    with pytest.raises(ArtifactError, match=f"unit '{first}'.*quantize_model"):
        save_quantized(tiny_llama, all_units, plan, tmp_path / "a")  # no quantized weights given
    with pytest.raises(ArtifactError, match=f"unit '{first}'.*quantizer's output"):
        save_quantized(tiny_llama, all_units, plan, tmp_path / "b", weights={first: qm.weights[first].weight()})
    rtn = _plan(tiny_llama, ["int4:g32"])
    with pytest.raises(ArtifactError, match=f"unit '{first}'.*rotation given, but the option does not rotate"):
        save_quantized(tiny_llama, all_units, rtn, tmp_path / "c", weights=qm.weights)
    smooth_plan = _plan(tiny_llama, ["int4:g32+smooth"])
    with pytest.raises(ArtifactError, match=f"unit '{first}'.*rotation given, but the option does not rotate"):
        save_quantized(tiny_llama, all_units, smooth_plan, tmp_path / "d", weights=qm.weights)
    assert not any((tmp_path / d).exists() for d in "abcd")


@pytest.fixture(scope="module")
def lowrank_ckpt(tiny_llama, tmp_path_factory):
    all_units = llm_units(tiny_llama, include_head=True, include_embeddings=True)
    plan = _plan(tiny_llama, ["int4:g32+smooth+rotate+lowrank:4"])
    qm, _ = _quantize(tiny_llama, plan, all_units)
    out = tmp_path_factory.mktemp("lr") / "ckpt"
    save_quantized(tiny_llama, all_units, plan, out, weights=qm.weights, manifest=qm.manifest)
    return out


def _tensor_offset(path, name) -> tuple[int, int]:
    """(start, end) byte offsets of a tensor's data inside a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    start, end = header[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def test_tampered_transform_tensor_refused(lowrank_ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(lowrank_ckpt, dst)
    doc = read_checkpoint(dst)
    unit = "model.layers.1.mlp.down_proj"
    name = doc["units"][unit]["transforms"]["lowrank"]["l"]
    start, end = _tensor_offset(dst / WEIGHTS_FILE, name)
    data = bytearray((dst / WEIGHTS_FILE).read_bytes())
    data[start + 1] ^= 0x40
    (dst / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_FILE} is damaged"):
        load_quantized(dst)
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_FILE} is damaged"):
        load_transforms(dst)


def _rewrite(dst, edit_doc=None, edit_tensors=None):
    """Edit a checkpoint consistently (as a buggy or malicious writer could): tensors and/or
    mixq.json changed, the recorded sizes and hashes updated to match."""
    from safetensors.torch import load_file, save_file

    from mixq.artifacts import sha256_file

    doc = json.loads((dst / "mixq.json").read_text())
    if edit_tensors is not None:
        tensors = load_file(str(dst / WEIGHTS_FILE))
        edit_tensors(tensors)
        save_file(tensors, str(dst / WEIGHTS_FILE))
        doc["files"][WEIGHTS_FILE] = {"sha256": sha256_file(dst / WEIGHTS_FILE),
                                      "bytes": (dst / WEIGHTS_FILE).stat().st_size}
    if edit_doc is not None:
        edit_doc(doc)
    (dst / "mixq.json").write_text(json.dumps(doc))


UNIT = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("case, match", [
    ("seed", f"unit '{UNIT}'.*seed 5 differs.*mixq.json"),
    ("block", f"unit '{UNIT}'.*rotation block 32"),
    ("record", f"unit '{UNIT}'.*malformed transforms record"),
    ("unknown", f"unit '{UNIT}'.*unknown transforms"),
    ("shape", f"unit '{UNIT}'.*low-rank L tensor.*expected torch.bfloat16 \\(64, 4\\)"),
    ("dtype", f"unit '{UNIT}'.*smoothing scales tensor.*float16"),
    ("negative", f"unit '{UNIT}'.*positive"),
    ("missing", f"tensor '{UNIT}.lowrank_r'.*not in the weights file"),
])
def test_bad_transform_records_refused(lowrank_ckpt, tmp_path, case, match):
    dst = tmp_path / "copy"
    shutil.copytree(lowrank_ckpt, dst)

    def doc_edit(doc):
        rec = doc["units"][UNIT]["transforms"]
        if case == "seed":
            rec["rotate"]["seed"] = 5
        elif case == "block":
            rec["rotate"]["block"] = 32
        elif case == "record":
            rec["lowrank"] = {"rank": "four"}
        elif case == "unknown":
            rec["shift"] = {}

    def tensor_edit(t):
        if case == "shape":
            t[f"{UNIT}.lowrank_l"] = t[f"{UNIT}.lowrank_l"][:, :3].contiguous()
        elif case == "dtype":
            t[f"{UNIT}.smooth_scales"] = t[f"{UNIT}.smooth_scales"].half()
        elif case == "negative":
            t[f"{UNIT}.smooth_scales"] = -t[f"{UNIT}.smooth_scales"]
        elif case == "missing":
            del t[f"{UNIT}.lowrank_r"]

    tensor_cases = ("shape", "dtype", "negative", "missing")
    _rewrite(dst, None if case in tensor_cases else doc_edit, tensor_edit if case in tensor_cases else None)
    for packed in (True, False):
        with pytest.raises(ArtifactError, match=match):
            load_quantized(dst, packed=packed)


def test_schema_1_checkpoints_still_load(tiny_llama, tmp_path):
    """A checkpoint without transforms is written, and read, as schema 1."""
    units = llm_units(tiny_llama)
    plan = Plan.uniform("tiny", units, "int4:g32")
    doc = save_quantized(tiny_llama, units, plan, tmp_path / "v1")
    assert doc["schema_version"] == 1 and all("transforms" not in u for u in doc["units"].values())
    q = load_quantized(tmp_path / "v1")
    assert load_transforms(tmp_path / "v1") == {}
    assert q.model.get_submodule(units[0].name).transforms.is_identity


def test_api_quantize_keeps_transforms(tiny_llama, char_encode, text_file, tmp_path):
    """mixq.api.quantize with a calibrated option with every transform: the checkpoint runs
    as the fake-quantized model does on the same calibration windows."""
    from mixq import api

    spec = "int3:g32+gptq+smooth+rotate+lowrank:4"
    model = copy.deepcopy(tiny_llama)
    loaded = LoadedModel(name="tiny", kind="causal_lm", model=model, source="fixture", encode=char_encode)
    calib = {"calib": str(text_file), "calib_samples": 4, "calib_seqlen": 32}
    ids, _ = api.calibration_data(loaded, calib["calib"], calib["calib_samples"], calib["calib_seqlen"], 0)
    units = loaded.units(include_head=True, include_embeddings=True)
    plan = Plan.uniform("tiny", loaded.units(), spec)
    qm = quantize_model(model, units, plan, ids)
    with torch.no_grad(), applied(model, units, qm.weights):
        ref = model(_ids()).logits
    doc = api.quantize(loaded, tmp_path / "q", fmt=spec, fp32=True, **calib)
    assert doc["schema_version"] == 2 and doc["totals"]["transform_bytes"] > 0
    rec = doc["units"]["model.layers.0.mlp.down_proj"]
    assert set(rec["transforms"]) == {"smooth", "rotate", "lowrank"} and rec["transforms"]["lowrank"]["rank"] == 4
    assert "transformed" not in doc["manifest"]  # tensors stay out of the JSON manifest
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q", packed=False).model(_ids()).logits, ref)
        torch.testing.assert_close(load_quantized(tmp_path / "q").model(_ids()).logits, ref,
                                   rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@needs_smollm2
def test_smollm2_rotated_checkpoint(tmp_path):
    """SmolLM2-135M, the units of its first 4 blocks int4:g64+rotate (RTN; blocks 64 for
    the 576 inputs, 512 for down_proj's 1536): checkpoint logits equal the fake-quantized
    model's."""
    from mixq.models import load_model

    loaded = load_model("smollm2-135m")
    all_units = loaded.units(include_head=True, include_embeddings=True)
    plan = Plan.uniform(loaded.name, [u for u in loaded.units() if u.block < 4], "int4:g64+rotate")
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    qm = quantize_model(loaded.model, all_units, plan)
    with torch.no_grad(), applied(loaded.model, all_units, qm.weights):
        ref = loaded.model(ids).logits
    doc = save_quantized(loaded, all_units, plan, tmp_path / "smol", weights=qm.weights, manifest=qm.manifest,
                         float_dtype=None)
    assert doc["units"]["model.layers.0.mlp.down_proj"]["transforms"]["rotate"]["block"] == 512
    assert doc["totals"]["unit_bits"] == sum(plan.unit_bits().values())
    for packed in (False, True):
        q = load_quantized(tmp_path / "smol", packed=packed)
        with torch.no_grad():
            logits = q.model(ids).logits
        if packed:
            assert q.extra["dequantized_units"] == {}
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        else:
            assert torch.equal(logits, ref)


@needs_gpu
def test_transformed_checkpoint_on_gpu(tmp_path):
    """On CUDA with bf16 activations the QuantLinear modules transform x online and the
    Triton kernels see x': logits match the dequantized model's (same weights, other
    rounding); in float32 (reference matmul on the GPU) they match the CPU fake quant."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixq.export import generate_ids
    from mixq.kernels import kernel_available

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)
    float_model = LlamaForCausalLM(cfg).eval()
    plan = _plan(float_model, ["int4:g64+rotate", "int4:g64+gptq+smooth+rotate", "nvfp4+lowrank:16",
                               "int3:g64+gptq+rotate+lowrank:8", "mxfp4+smooth"])
    all_units = llm_units(float_model, include_head=True, include_embeddings=True)
    qm, _ = _quantize(float_model, plan, all_units)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), applied(float_model, all_units, qm.weights):
        ref = float_model(ids).logits
    save_quantized(float_model, all_units, plan, tmp_path / "c", weights=qm.weights, manifest=qm.manifest,
                   float_dtype=torch.float32)
    packed = load_quantized(tmp_path / "c", device="cuda", dtype=torch.bfloat16, packed="auto")
    dense = load_quantized(tmp_path / "c", device="cuda", dtype=torch.bfloat16, packed=False)
    qlins = [m for m in packed.model.modules() if isinstance(m, QuantLinear)]
    assert len(qlins) == len(plan.options) and all(not m.transforms.is_identity for m in qlins)
    x = torch.randn(3, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    assert all(kernel_available(m.weights(), x) for m in qlins)
    with torch.no_grad():
        a, b = packed.model(ids.cuda()).logits.float(), dense.model(ids.cuda()).logits.float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()
    f32 = load_quantized(tmp_path / "c", device="cuda", dtype=torch.float32, packed=True)
    with torch.no_grad():
        c = f32.model(ids.cuda()).logits.cpu()
    torch.testing.assert_close(c, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    assert 1 <= len(generate_ids(packed.model, [1, 17, 42, 99, 5], max_new_tokens=8)) <= 8
