"""compressed-tensors export: the scheme mapping and its refusals, bit-exact packing, the
library's own decompression equal to mixq's dequantization, and transformers loading the
directory with `from_pretrained` and reproducing mixq's logits (tiny fixtures; SmolLM2 marked
real)."""

from __future__ import annotations

import json

import pytest
import torch

from mixq import api, formats
from mixq.cli import main
from mixq.errors import ArtifactError, ExportError, MixqError
from mixq.export import load_quantized, save_quantized
from mixq.export.compressed_tensors import EXPORT_FILE, export_compressed_tensors, pack_int32, unit_tensors
from mixq.export.ct_schema import restrict_rows, scheme_for, unsupported_reason
from mixq.models import LoadedModel, llm_units
from mixq.option import parse_option
from mixq.plan import Plan

from conftest import needs_smollm2

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (pip install 'mixq[export]')")

# q/k/v and gate/up share a scheme per block, as vLLM's fused layers need
BLOCK_PLANS = [
    {"q_proj": "int4:g32", "k_proj": "int4:g32", "v_proj": "int4:g32", "o_proj": "int8:ch",
     "gate_proj": "int4:g16", "up_proj": "int4:g16", "down_proj": "fp8_e4m3:ch"},
    {"q_proj": "int8:g32", "k_proj": "int8:g32", "v_proj": "int8:g32", "o_proj": "int4:g64:mse",
     "gate_proj": "int4:ch", "up_proj": "int4:ch", "down_proj": "bf16"},
]


def _plan(loaded: LoadedModel, per_block=BLOCK_PLANS, override: dict | None = None) -> Plan:
    units = loaded.units()
    opts = {u.name: parse_option((override or {}).get(u.name, per_block[u.block % len(per_block)][u.role]))
            for u in units}
    return Plan(loaded.name, opts, {u.name: u.shape for u in units})


def _ckpt(loaded: LoadedModel, plan: Plan, path, float_dtype=torch.float32):
    save_quantized(loaded, loaded.units(include_head=True, include_embeddings=True), plan, path,
                   float_dtype=float_dtype)
    return path


def _ids(n=2, length=24, vocab=128):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(3))


def _hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------- the mapping


@pytest.mark.parametrize("spec,expect", [
    ("int4:g64", ("pack-quantized", 4, "int", True, "group", 64)),
    ("int8:ch", ("pack-quantized", 8, "int", True, "channel", None)),
    ("int4:g32:asym:mse", ("pack-quantized", 4, "int", False, "group", 32)),
    ("fp8_e4m3:ch", ("float-quantized", 8, "float", True, "channel", None)),
    ("nvfp4", ("nvfp4-pack-quantized", 4, "float", True, "tensor_group", 16)),
    ("int4:g64+gptq", ("pack-quantized", 4, "int", True, "group", 64)),
])
def test_scheme_of_each_exportable_option(spec, expect):
    s = scheme_for(spec, (192, 576))
    assert (s.format, s.num_bits, s.type, s.symmetric, s.strategy, s.group_size) == expect
    assert scheme_for("bf16", (192, 576)) is None  # float: ignored


@pytest.mark.parametrize("spec,kw,words", [
    ("int3:g64", {}, "4 or 8 bits"),
    ("int4:t", {}, "per-tensor"),
    ("int4:g128", {}, "does not divide the input size 576"),
    ("int8:ch:asym", {}, "zero points at 4 bits only"),
    ("fp8_e4m3:g32", {}, "fp8_e4m3:ch"),
    ("mxfp4", {}, "MX formats"),
    ("int4:g64+gptq+rotate", {}, "--rotate-residual"),
    ("int4:g64", {"role": "lm_head"}, "head in float"),
    ("int4:g64", {"kind": "embedding", "role": "embed"}, "Linear layers only"),
])
def test_refusals_say_why(spec, kw, words):
    assert words in unsupported_reason(spec, (192, 576), **kw)
    with pytest.raises(ExportError):
        scheme_for(spec, (192, 576), **kw)


def test_planning_keeps_nvfp4_off_fused_projections():
    assert unsupported_reason("nvfp4", (576, 576), role="q_proj") is None
    assert "fused" in unsupported_reason("nvfp4", (576, 576), role="q_proj", planning=True)
    assert unsupported_reason("nvfp4", (576, 576), role="o_proj", planning=True) is None


# ---------------------------------------------------------------- packing and dequantization


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [64, 40, 7])
def test_pack_int32_is_compressed_tensors_packing(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = torch.randint(0, 2**bits, (6, cols), generator=torch.Generator().manual_seed(cols), dtype=torch.uint8)
    ours = pack_int32(codes, bits)
    theirs = pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    back = unpack_from_int32(ours, bits, torch.Size([6, cols]))
    assert torch.equal(back.to(torch.int16) + 2 ** (bits - 1), codes.to(torch.int16))
    # element j of a row sits at bit j*bits of the row's little-endian words
    j = cols - 1
    word = int(ours[2, (j * bits) // 32]) & 0xFFFFFFFF
    assert (word >> ((j * bits) % 32)) & (2**bits - 1) == int(codes[2, j])


def _decompress(spec: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixq's dequantized weight, compressed-tensors' decompression of the exported tensors),
    scales in float32 as a float32 runtime holds them."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    fmt = formats.parse(spec)
    q = fmt.quantize(w)
    s = scheme_for(spec, tuple(w.shape))
    sd = {k.removeprefix("m."): v for k, v in unit_tensors("m", s, q).items()}
    if s.type == "int":
        sd["weight_scale"] = sd["weight_scale"].float()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**s.weights_args()), format=s.format)
    got = BaseCompressor.get_value_from_registry(s.format).decompress(sd, scheme)["weight"]
    return fmt.dequantize(q), got.float()


@pytest.mark.parametrize("spec", ["int4:g32", "int4:g64:asym", "int4:ch:asym", "int8:ch", "int8:g32", "int4:g16:mse",
                                  "fp8_e4m3:ch"])
def test_library_decompression_equals_mixq_exactly(spec):
    # symmetric INT uses mixq's signed scales (the extreme on level -2^(k-1)); asymmetric its zero points
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    w[3, 5] = 0.4  # a positive extreme: a negative scale in its group
    ref, got = _decompress(spec, w)
    assert torch.equal(got, ref)
    if spec == "int4:g32":
        assert (formats.parse(spec).quantize(w).scales < 0).any()


def test_nvfp4_tensors_decode_to_mixq_weights():
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    fmt = formats.parse("nvfp4")
    q = fmt.quantize(w)
    t = unit_tensors("m", scheme_for("nvfp4", (32, 64)), q)
    assert t["m.weight_packed"].dtype == torch.uint8 and t["m.weight_scale"].dtype == torch.float8_e4m3fn
    e2m1 = unpack_fp4_from_uint8(t["m.weight_packed"], 32, 64, dtype=torch.float32)
    scale = (t["m.weight_scale"].float() / t["m.weight_global_scale"]).repeat_interleave(16, dim=1)
    ref = fmt.dequantize(q)
    # the global scale is the float32 reciprocal of mixq's tensor scale: equal to float32 rounding
    torch.testing.assert_close(e2m1 * scale, ref, rtol=2**-21, atol=0)
    # compressed-tensors' own decompression ends in bf16 (its NVFP4 path decompresses to bf16)
    _, got = _decompress("nvfp4", w)
    torch.testing.assert_close(got, ref, rtol=2**-8, atol=0)


# ---------------------------------------------------------------- whole directories


@pytest.fixture()
def llama_export(tiny_loaded, tmp_path):
    plan = _plan(tiny_loaded)
    ckpt = _ckpt(tiny_loaded, plan, tmp_path / "ckpt")
    doc = export_compressed_tensors(ckpt, tmp_path / "ct")
    return ckpt, tmp_path / "ct", doc, plan


def test_config_is_the_library_schema(llama_export, tiny_loaded):
    from compressed_tensors.quantization import QuantizationConfig

    _, out, doc, plan = llama_export
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)  # the library's own pydantic schema (unknown keys forbidden in args)
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == "mixed-precision"
    groups = qc["config_groups"]
    descr = {(g["format"], g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["group_size"])
             for g in groups.values()}
    assert descr == {("pack-quantized", 4, "group", 32), ("pack-quantized", 8, "channel", None),
                     ("pack-quantized", 4, "group", 16), ("float-quantized", 8, "channel", None),
                     ("pack-quantized", 8, "group", 32), ("pack-quantized", 4, "group", 64),
                     ("pack-quantized", 4, "channel", None)}
    targets = [t for g in groups.values() for t in g["targets"]]
    assert len(targets) == len(set(targets)) == 13 and not any(t.startswith("re:") for t in targets)
    # every other Linear layer is ignored: the float-planned down_proj and the head
    assert qc["ignore"] == ["lm_head", "model.layers.1.mlp.down_proj"]
    assert doc["kind"] == "export" and (out / EXPORT_FILE).is_file()


def test_transformers_reproduces_mixq_logits_bit_for_bit(llama_export):
    ckpt, out, _, _ = llama_export
    ids = _ids()
    ref = _logits(load_quantized(ckpt, packed=False).model, ids)
    hf = _hf(out)
    got = _logits(hf, ids)
    # float32: compressed-tensors dequantizes q * scale in float32 exactly like mixq
    assert torch.equal(got, ref)


def test_bfloat16_runtime_rounds_the_scales(tiny_loaded, tmp_path):
    """In bf16 the runtime holds the float16 INT scales in bf16; measured against mixq's own
    bf16 model, the logits move by a few bf16 steps (NVFP4 needs bf16 in transformers)."""
    plan = _plan(tiny_loaded, override={"model.layers.1.self_attn.o_proj": "nvfp4"})
    ckpt = _ckpt(tiny_loaded, plan, tmp_path / "ckpt")
    export_compressed_tensors(ckpt, tmp_path / "ct", dtype="bfloat16")
    ids = _ids()
    ref = _logits(load_quantized(ckpt, packed=False, dtype=torch.bfloat16).model, ids)
    got = _logits(_hf(tmp_path / "ct", torch.bfloat16), ids)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"  # the key the source config uses


def test_tied_qwen2_with_biases(tmp_path, char_encode):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True)
    loaded = LoadedModel("qwen", "causal_lm", Qwen2ForCausalLM(cfg).eval(), "fixture", encode=char_encode)
    ckpt = _ckpt(loaded, _plan(loaded), tmp_path / "ckpt")
    export_compressed_tensors(ckpt, tmp_path / "ct")
    ids = _ids()
    assert torch.equal(_logits(_hf(tmp_path / "ct"), ids), _logits(load_quantized(ckpt, packed=False).model, ids))


def test_untied_fused_projections_refused_by_block(tiny_loaded, tmp_path):
    plan = _plan(tiny_loaded, override={"model.layers.0.self_attn.k_proj": "int8:ch"})
    ckpt = _ckpt(tiny_loaded, plan, tmp_path / "ckpt")
    with pytest.raises(ExportError, match=r"block 0 qkv.*k_proj=int8.*--tie qkv"):
        export_compressed_tensors(ckpt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_unexportable_units_named(tiny_loaded, tmp_path):
    plan = _plan(tiny_loaded, override={"model.layers.1.mlp.down_proj": "int3:g32",
                                        "model.layers.0.self_attn.o_proj": "mxfp4"})
    ckpt = _ckpt(tiny_loaded, plan, tmp_path / "ckpt")
    with pytest.raises(ExportError) as e:
        export_compressed_tensors(ckpt, tmp_path / "ct")
    assert "model.layers.1.mlp.down_proj (int3:g32)" in str(e.value)
    assert "model.layers.0.self_attn.o_proj (mxfp4)" in str(e.value)


def test_nothing_quantized_refused(tiny_loaded, tmp_path):
    ckpt = _ckpt(tiny_loaded, _plan(tiny_loaded, per_block=[{r: "bf16" for r in BLOCK_PLANS[0]}]), tmp_path / "c")
    with pytest.raises(ExportError, match="quantizes no Linear layer"):
        export_compressed_tensors(ckpt, tmp_path / "ct")


def test_nvfp4_fused_with_different_tensor_scales_refused(tiny_loaded, tmp_path):
    plan = _plan(tiny_loaded, override={f"model.layers.0.self_attn.{p}_proj": "nvfp4" for p in "qkv"})
    ckpt = _ckpt(tiny_loaded, plan, tmp_path / "ckpt")
    with pytest.raises(ExportError, match="one global scale per fused layer"):
        export_compressed_tensors(ckpt, tmp_path / "ct")


def test_transformed_units_refused(tiny_loaded, tmp_path, text_file):
    ckpt = tmp_path / "ckpt"
    api.quantize(tiny_loaded, ckpt, fmt="int4:g32+rotate", calib=str(text_file), calib_samples=4, calib_seqlen=16)
    with pytest.raises(ExportError, match="transforms .*rotate"):
        export_compressed_tensors(ckpt, tmp_path / "ct")


def test_overwrite_only_an_export(llama_export, tmp_path):
    ckpt, out, _, _ = llama_export
    with pytest.raises(ArtifactError, match="not empty"):
        export_compressed_tensors(ckpt, out)
    export_compressed_tensors(ckpt, out, overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a directory mixq wrote"):
        export_compressed_tensors(ckpt, other, overwrite=True)
    assert (other / "x.txt").read_text() == "mine"


def test_cli_export(llama_export, tmp_path, capsys):
    ckpt, _, _, _ = llama_export
    assert main(["-q", "export", str(ckpt), "--to", "compressed-tensors", "-o", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "vllm serve" in out and "7 scheme(s)" in out
    assert main(["-q", "export", str(ckpt), "--to", "gguf", "-o", str(tmp_path / "g.gguf")]) == 2
    err = capsys.readouterr().err  # this checkpoint's fp8 units have no GGUF type: refused by name
    assert "cannot be stored in a GGUF file" in err and "fp8_e4m3:ch" in err
    assert not (tmp_path / "g.gguf").exists()


# ---------------------------------------------------------------- planning for the target


def _units_info(loaded):
    return [{"name": u.name, "kind": u.kind, "shape": list(u.shape), "role": u.role, "block": u.block,
             "n_params": u.n_params} for u in loaded.units()]


def test_restrict_rows_drops_what_the_format_cannot_hold(tiny_loaded):
    info = _units_info(tiny_loaded)
    rows = [(u["name"], o, 1, 1.0) for u in info for o in ("int3:g32", "int4:g32", "nvfp4", "int4:g32+gptq+rotate")]
    kept, dropped = restrict_rows(rows, info)
    assert {r[1] for r in kept} == {"int4:g32", "nvfp4"}
    assert {r[0] for r in kept if r[1] == "nvfp4"} == {u["name"] for u in info if u["role"] in ("o_proj", "down_proj")}
    assert set(dropped) == {"int3:g32", "int4:g32+gptq+rotate", "nvfp4"}
    with pytest.raises(ExportError, match="no candidate compressed-tensors can hold"):
        restrict_rows([r for r in rows if r[1] == "int3:g32"], info)
    with pytest.raises(ExportError, match="--keep pins"):
        restrict_rows(rows, info, keep={"*.down_proj": "int3:g32"})


def test_plan_target_ties_and_restricts(tiny_loaded, text_file):
    table = api.analyze(tiny_loaded, candidates=["int2:g32", "int3:g32", "int4:g32", "int8:ch"], method="output",
                        calib=str(text_file), samples=4, seqlen=32, measure_cost=False)
    plan, _ = api.plan(table, 5.0, target="compressed-tensors")
    assert {str(o) for o in plan.options.values()} <= {"int4:g32", "int8:ch"}
    assert plan.meta["target"]["name"] == "compressed-tensors" and set(plan.meta["ties"]) >= {"qkv", "gate_up"}
    for b in range(2):
        assert len({str(plan.options[f"model.layers.{b}.self_attn.{p}_proj"]) for p in "qkv"}) == 1
        assert len({str(plan.options[f"model.layers.{b}.mlp.{p}_proj"]) for p in ("gate", "up")}) == 1
    g, _ = api.plan(table, 5.0, target="gguf")  # of these candidates only int4:g32 is a GGML type (q4_0's grid)
    assert {str(o) for o in g.options.values()} == {"int4:g32"} and g.meta["target"]["name"] == "gguf"
    with pytest.raises(MixqError, match="no candidate that gguf can store"):
        api.plan(api.analyze(tiny_loaded, candidates=["int3:g32", "int8:ch"], method="output", calib=str(text_file),
                             samples=4, seqlen=32, measure_cost=False), 5.0, target="gguf")


# ---------------------------------------------------------------- the real model


@needs_smollm2
@pytest.mark.real
def test_smollm2_export_reproduces_mixq_logits(tmp_path):
    """SmolLM2-135M, a mixed RTN plan (int4:g64 q/k/v/o, int8:ch gate/up, fp8 down in the
    first blocks, int4:g32 down elsewhere), checkpoint stored as `mixq quantize` does (bf16
    float tensors): transformers in float32 gives mixq's checkpoint logits bit for bit, and the
    export is the size of the checkpoint (the same codes and scales)."""
    loaded = api.load_model("smollm2-135m", device="cpu")
    per_block = [{"q_proj": "int4:g64", "k_proj": "int4:g64", "v_proj": "int4:g64", "o_proj": "int4:g64",
                  "gate_proj": "int8:ch", "up_proj": "int8:ch", "down_proj": "fp8_e4m3:ch" if b < 4 else "int4:g32"}
                 for b in range(30)]
    units = loaded.units()
    plan = Plan(loaded.name, {u.name: parse_option(per_block[u.block][u.role]) for u in units},
                {u.name: u.shape for u in units})
    ckpt = _ckpt(loaded, plan, tmp_path / "ckpt", float_dtype=torch.bfloat16)
    del loaded
    doc = export_compressed_tensors(ckpt, tmp_path / "ct")
    # measured: 140,629,280 bytes against the checkpoint's 140,596,880 (weight_shape tensors, headers)
    assert abs(doc["totals"]["file_bytes"] / (ckpt / "model.safetensors").stat().st_size - 1) < 1e-3
    q = load_quantized(ckpt, packed=False)
    ids = torch.tensor([q.encode("The quick brown fox jumps over the lazy dog. " * 6)])
    ref = _logits(q.model, ids)
    del q
    got = _logits(_hf(tmp_path / "ct"), ids)
    assert torch.equal(got, ref)
