"""GGUF export: candidates a unit's shape rules out, plans restricted to what GGUF holds,
refusals that name units, and files whose tensors are the checkpoint's codes as llama.cpp's
blocks. (llama.cpp itself runs the files in test_export_gguf_runtime.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixq import api
from mixq.errors import MixqError
from mixq.export.gguf import _permutation
from mixq.models import LoadedModel, llm_units
from mixq.option import parse_option
from mixq.plan import Plan
from mixq.sensitivity import analyze

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

# a tiny Llama whose widths suit the k-quants (256) except down_proj's input (320 = 10 x 32)
ROLES_OK_FOR_K = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


@pytest.fixture(scope="module")
def gguf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights of a trained model's scale, so that logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    return model


@pytest.fixture()
def gguf_loaded(gguf_llama, char_encode):
    return LoadedModel(name="tiny-gguf", kind="causal_lm", model=gguf_llama, source="fixture", encode=char_encode)


MIXED = {0: {"q_proj": "q4_k", "k_proj": "q6_k", "v_proj": "q8_0", "o_proj": "iq4_nl", "gate_proj": "q3_k",
             "up_proj": "q5_k", "down_proj": "q5_1"},
         1: {"q_proj": "q4_0", "k_proj": "iq4_xs", "v_proj": "q4_1", "o_proj": "int4:g32", "gate_proj": "q2_k",
             "up_proj": "q5_0+gptq", "down_proj": "fp16"}}


def mixed_plan(units) -> Plan:
    opts = {u.name: parse_option(MIXED[u.block][u.role.split(".")[-1]]) for u in units}
    return Plan("tiny-gguf", opts, {u.name: u.shape for u in units})


def test_analyze_skips_and_records_candidates_the_shape_rules_out(gguf_llama):
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    units = llm_units(gguf_llama)
    table = analyze(gguf_llama, units, ["q3_k", "q4_0", "q8_0"], "output", calib)
    for u in table.units:
        names = [o["option"] for o in u.options]
        if u.name.endswith("down_proj"):
            assert names == ["q4_0", "q8_0"]
            assert "blocks of 256" in u.skipped["q3_k"] and "320" in u.skipped["q3_k"]
        else:
            assert names == ["q3_k", "q4_0", "q8_0"] and not u.skipped
        e = [o["error"] for o in u.options]
        assert e == sorted(e, reverse=True) and e[-1] > 0
    again = type(table).from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.unit(units[-1].name).skipped == table.unit(units[-1].name).skipped
    # the planner takes a unit with fewer options; down_proj never gets the type it cannot hold
    the_plan, _ = api.plan(table, 4.0)
    assert all(str(o) != "q3_k" for n, o in the_plan.options.items() if n.endswith("down_proj"))
    assert any(str(o) == "q3_k" for o in the_plan.options.values())
    with pytest.raises(MixqError, match="cannot take it"):
        api.plan(table, 5.0, keep={"*.down_proj": "q3_k"})
    with pytest.raises(MixqError, match="no candidate applies"):
        analyze(gguf_llama, [u for u in units if u.name.endswith("down_proj")], ["q3_k"], "output", calib)


def test_plan_target_gguf_offers_only_what_exports(gguf_llama, capsys):
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    units = llm_units(gguf_llama)
    table = analyze(gguf_llama, units, ["int3:g64", "int4:g64", "q3_k", "q4_0", "q8_0"], "output", calib)
    rot = parse_option("int4:g32+rotate")
    for u in table.units:  # a transform candidate, rated best everywhere (it would be chosen if offered)
        u.options.append({"option": str(rot), "bits": rot.bits(u.shape), "error": 1e-12})
    table.candidates.append(str(rot))
    free, _ = api.plan(table, 4.6)
    assert any(parse_option(o).format in ("int3:g64", "int4:g64") or o.rotate for o in free.options.values())
    gg, _ = api.plan(table, 4.6, target="gguf")
    assert {str(o) for o in gg.options.values()} <= {"q3_k", "q4_0", "q8_0"}
    assert gg.meta["target"]["name"] == "gguf" and gg.meta["target"]["candidate_rows_dropped"] == 3 * len(units)
    args = api.llama_quantize_args(gg)
    overrides = [a for a in args if "=" in a]
    assert args[:4] == ["--token-embedding-type", "f16", "--output-tensor-type", "f16"]
    assert sum(a.count("|") + 1 for a in overrides) == len(units)  # every unit named once
    import re

    for name, opt in gg.options.items():
        block, role = name.split(".")[2], {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                                           "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                                           "down_proj": "ffn_down"}[name.split(".")[-1]]
        hits = [a.rsplit("=", 1)[1] for a in overrides if re.search(a.rsplit("=", 1)[0], f"blk.{block}.{role}.weight")]
        assert hits == [str(opt)]  # the first (only) matching override is the plan's type
    small = analyze(gguf_llama, units, ["int4:g64", "q3_k"], "output", calib)
    with pytest.raises(MixqError, match="down_proj.*no candidate that gguf can store"):
        api.plan(small, 4.0, target="gguf")
    with pytest.raises(MixqError, match="llama.cpp does not run"):
        api.llama_quantize_args(free if any(o.rotate for o in free.options.values()) else
                                Plan.uniform("t", units, "int4:g32+rotate"))


def test_export_refuses_what_gguf_cannot_hold(tiny_loaded, tmp_path):
    units = tiny_loaded.units()
    opts = {u.name: parse_option("q4_0") for u in units}
    opts[units[0].name] = parse_option("int4:g64")
    opts[units[1].name] = parse_option("int4:g32+rotate")
    opts[units[2].name] = parse_option("nvfp4")
    api.quantize(tiny_loaded, tmp_path / "ck", plan=Plan("tiny", opts, {u.name: u.shape for u in units}))
    with pytest.raises(MixqError) as info:
        api.export(tmp_path / "ck", tmp_path / "m.gguf", to="gguf")
    msg = str(info.value)
    assert msg.startswith("3 unit(s) cannot be stored in a GGUF file")
    for u in units[:3]:
        assert u.name in msg
    assert "int4:g64 is not a GGML type" in msg and "rotate" in msg and "nearest GGUF types: " in msg
    assert not (tmp_path / "m.gguf").exists()
    # a float type the embeddings' rows cannot take (64 wide) is refused too, naming the tensor
    api.quantize(tiny_loaded, tmp_path / "ck2", plan=Plan.uniform("tiny", units, "q4_0"))
    with pytest.raises(MixqError, match=r"--float-type q6_k: tensor (model.embed_tokens|lm_head).weight \(128, 64\) cannot take it"):
        api.export(tmp_path / "ck2", tmp_path / "m.gguf", to="gguf", float_type="q6_k")
    assert not (tmp_path / "m.gguf").exists()


def test_export_cli_refuses_options_of_the_other_target(tiny_loaded, tmp_path, capsys):
    """`mixq export` takes --dtype for compressed-tensors and --float-type/--metadata-from/
    --tokenizer-pre for gguf; the wrong pairing is refused before anything is written."""
    from mixq.cli import main

    api.quantize(tiny_loaded, tmp_path / "ck", plan=Plan.uniform("tiny", tiny_loaded.units(), "q4_0"))
    assert main(["-q", "export", str(tmp_path / "ck"), "--to", "gguf", "--dtype", "float16",
                 "-o", str(tmp_path / "m.gguf")]) == 2
    assert "--dtype: an option of --to compressed-tensors" in capsys.readouterr().err
    assert main(["-q", "export", str(tmp_path / "ck"), "--to", "compressed-tensors", "--float-type", "f32",
                 "-o", str(tmp_path / "ct")]) == 2
    assert "--float-type: options of --to gguf" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "ct").exists()
    assert main(["-q", "export", str(tmp_path / "ck"), "--to", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    assert "run it: llama-cli -m" in capsys.readouterr().out and (tmp_path / "m.gguf").stat().st_size > 0
    from mixq import cli

    assert tuple(cli.EXPORT_TARGETS) == api.EXPORT_TARGETS  # the command line offers what the API writes


def test_export_refuses_an_architecture_it_does_not_write(char_encode, tmp_path):
    """A Qwen2 checkpoint (q/k/v biases, `qwen2` in llama.cpp) is refused by name, not written
    as a Llama file that llama.cpp would run wrongly."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    loaded = LoadedModel("qwen", "causal_lm", Qwen2ForCausalLM(cfg).eval(), "fixture", encode=char_encode)
    api.quantize(loaded, tmp_path / "ck", plan=Plan.uniform("qwen", loaded.units(), "q4_0"))
    with pytest.raises(MixqError, match=r"GGUF export writes the Llama architecture; this model is 'qwen2'"):
        api.export(tmp_path / "ck", tmp_path / "m.gguf", to="gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_export_writes_the_checkpoint_codes_as_llama_cpp_blocks(gguf_loaded, tmp_path):
    units = gguf_loaded.units()
    plan = mixed_plan(units)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"tok{i % 53} x{i % 7}" for i in range(4000)))
    api.quantize(gguf_loaded, tmp_path / "ck", plan=plan, calib=str(calib), calib_samples=4, calib_seqlen=32, fp32=True)
    res = api.export(tmp_path / "ck", tmp_path / "m.gguf", to="gguf")
    assert res["unit_types"] == {"Q4_K": 1, "Q6_K": 1, "Q8_0": 1, "IQ4_NL": 1, "Q3_K": 1, "Q5_K": 1, "Q5_1": 1,
                                 "Q4_0": 2, "IQ4_XS": 1, "Q4_1": 1, "Q2_K": 1, "Q5_0": 1, "F16": 1}
    assert res["bpw_units"] == pytest.approx(sum(plan.unit_bits().values()) / sum(u.shape[0] * u.shape[1] for u in units))
    assert any("token ids only" in w for w in res["warnings"])
    with pytest.raises(Exception, match="exists"):
        api.export(tmp_path / "ck", tmp_path / "m.gguf", to="gguf")
    q8 = api.export(tmp_path / "ck", tmp_path / "q8.gguf", to="gguf", float_type="q8_0")
    assert q8["tensor_types"]["Q8_0"] == 3  # embeddings and head in q8_0, and the plan's one q8_0 unit

    from mixq.export import load_qtensors
    from mixq import formats

    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.tokens")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.embedding_length"] == 256 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "none" and fields["llama.vocab_size"] == 128
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{b}.{n}.weight" for b in (0, 1) for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                         "ffn_up", "ffn_down", "attn_norm", "ffn_norm")}
    assert tensors["token_embd.weight"].tensor_type.name == "F16" and tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    qs = load_qtensors(tmp_path / "ck")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for u in units:
        t = tensors[f"blk.{u.block}.{names[u.role.split('.')[-1]]}.weight"]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(u.shape)
        ours = formats.parse(qs[u.name].fmt).dequantize(qs[u.name]).numpy()
        role = u.role.split(".")[-1]
        if role in ("q_proj", "k_proj"):  # llama.cpp's rotary row order
            ours = ours[_permutation(u.shape[0], 4 if role == "q_proj" else 2).numpy()]
        assert np.array_equal(values, ours), u.name


def test_permutation_is_llama_cpp_rotary_order():
    """convert_hf_to_gguf's rule: per head, rows (half, pair) become (pair, half)."""
    idx = _permutation(8, 2)  # 2 heads of 4 rows: halves [0,1 | 2,3] interleave to 0,2,1,3
    assert idx.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
