"""The eval API and command line on tiny models, and (marked) on the real default model."""

import json

import pytest
import torch

from conftest import needs_data, needs_smollm2
from mixq import api
from mixq.cli import main
from mixq.errors import DataError, FormatError
from mixq.models import LoadedModel


def test_evaluate_orders_formats_by_damage(tiny_loaded, text_file):
    before = {k: v.clone() for k, v in tiny_loaded.model.state_dict().items()}
    res = api.evaluate(tiny_loaded, formats=["int8:ch", "int2:g32"], data=str(text_file), seqlen=32, windows=4)
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == ["float", "int8:ch", "int2:g32"]
    assert res["n_tokens"] == 4 * 31
    assert rows["float"]["kl"] == 0 and rows["float"]["top1_agree"] == 1
    assert 0 < rows["int8:ch"]["kl"] < rows["int2:g32"]["kl"]
    assert rows["int8:ch"]["top1_agree"] > rows["int2:g32"]["top1_agree"]
    assert rows["int2:g32"]["bpw_blocks"] == pytest.approx(2 + 16 / 32)
    assert rows["int2:g32"]["bpw_all"] > rows["int2:g32"]["bpw_blocks"]  # embeddings/head at 16 bits
    # The float model is restored after each format.
    after = tiny_loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_format_names_valid_forms(tiny_loaded, text_file):
    with pytest.raises(FormatError, match="int"):
        api.evaluate(tiny_loaded, formats=["int9:g64"], data=str(text_file), seqlen=32, windows=2)


def test_nan_weight_is_reported_with_unit(tiny_llama, char_encode, text_file):
    import copy

    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    loaded = LoadedModel(name="tiny", kind="causal_lm", model=model, source="fixture", encode=char_encode)
    with pytest.raises(DataError, match=r"layers\.1\.mlp\.up_proj"):
        api.evaluate(loaded, formats=["int4:g32"], data=str(text_file), seqlen=32, windows=2)


def test_formats_command_lists_bits(capsys):
    assert main(["formats", "--rows", "4096", "--cols", "4096"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("int4:g64 "))
    assert line.split()[-1] == "4.250"
    assert any(l.startswith("nvfp4") and l.split()[-1] == "4.500" for l in out.splitlines())


def test_cli_error_is_a_message_not_a_trace(capsys):
    assert main(["eval", "resnet20-cifar10", "--format", "int4:g7x"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


@needs_smollm2
@needs_data
@pytest.mark.real
def test_cli_eval_default_model(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["-q", "eval", "smollm2-135m", "--format", "int4:g64", "--data", "wikitext2", "--windows", "2",
                 "--seqlen", "128", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "eval" and doc["n_tokens"] == 2 * 127
    fl, q = doc["rows"]
    assert 10 < fl["ppl"] < 100 and q["ppl"] > fl["ppl"] and q["kl"] > 0.05
    assert q["bpw_blocks"] == pytest.approx(4.25)
    assert "scored tokens" in capsys.readouterr().out


@needs_data
@pytest.mark.real
def test_cli_eval_resnet20(tmp_path):
    out = tmp_path / "r.json"
    assert main(["-q", "eval", "resnet20-cifar10", "--format", "int4:ch", "--json", str(out)]) == 0
    fl, q = json.loads(out.read_text())["rows"]
    assert 0.78 < fl["top1"] < 0.84  # JPEG re-encoded CIFAR-10 test half
    assert 0.6 < q["top1"] < fl["top1"]


def test_gptq_and_rotation_options_through_evaluate(tiny_loaded, text_file):
    res = api.evaluate(tiny_loaded, formats=["int2:g32", "int2:g32+gptq", "int3:g32+rotate"], data=str(text_file),
                       seqlen=32, windows=4, calib=str(text_file), calib_samples=8, calib_seqlen=32)
    rows = {r["label"]: r for r in res["rows"]}
    assert "calibration" in res and "8 random windows" in res["calibration"]
    # GPTQ on the same calibration text lowers the error of round to nearest at 2 bits.
    assert rows["int2:g32+gptq"]["kl"] < rows["int2:g32"]["kl"]
    assert rows["int2:g32+gptq"]["bpw_blocks"] == rows["int2:g32"]["bpw_blocks"]
    assert rows["int3:g32+rotate"]["kl"] > 0
    assert "manifest_warnings" in rows["int2:g32+gptq"]


def test_cli_builds_options_from_quantizer_and_transform(monkeypatch, capsys):
    seen = {}

    def fake_evaluate(**kw):
        seen.update(kw)
        return {"rows": [{"label": "float", "bpw_units": 16.0, "bpw_all": 16.0, "top1": 0.5}], "model": "m",
                "data": "d", "n_images": 1}

    monkeypatch.setattr(api, "evaluate", fake_evaluate)
    assert main(["eval", "resnet20-cifar10", "--format", "int3:g64,int4:g64", "--quantizer", "gptq",
                 "--transform", "rotate", "--transform", "lowrank:8"]) == 0
    assert seen["formats"] == ["int3:g64+gptq+rotate+lowrank:8", "int4:g64+gptq+rotate+lowrank:8"]


def test_bos_convention_is_recorded_and_used(tiny_llama, bos_encode, char_encode, text_file, tmp_path):
    """A model whose tokenizer adds a BOS: eval.json and sensitivity.json record it, and the
    float perplexity is that of windows starting with the BOS (different from without)."""
    with_bos = LoadedModel(name="tiny", kind="causal_lm", model=tiny_llama, source="fixture", encode=bos_encode)
    plain = LoadedModel(name="tiny", kind="causal_lm", model=tiny_llama, source="fixture", encode=char_encode)
    res = api.evaluate(with_bos, formats=["int8:ch"], data=str(text_file), seqlen=32, windows=2)
    assert res["tokenization"]["bos"] is True and res["tokenization"]["bos_token"] == "<bos>"
    assert res["n_tokens"] == 2 * 31  # every text token after the BOS is scored
    res_plain = api.evaluate(plain, formats=[], data=str(text_file), seqlen=32, windows=2)
    assert res_plain["tokenization"]["bos"] is False
    assert res["rows"][0]["ppl"] != pytest.approx(res_plain["rows"][0]["ppl"])
    table = api.analyze(with_bos, candidates=["int4:g32"], calib=str(text_file), samples=2, seqlen=32,
                        measure_cost=False)
    table.save(tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["calibration"]["tokenization"]["bos_id"] == 1
    assert "after the tokenizer's BOS" in doc["calibration"]["description"]
