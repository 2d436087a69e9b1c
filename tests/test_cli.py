"""The command line as a user meets it: version, flags after the subcommand, help with every
alias and default, errors before any model loads, progress off a terminal."""

from __future__ import annotations

import pytest

from mixq import __version__, api
from mixq.cli import _progress, build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mixq {__version__}"


def test_quiet_and_verbose_after_the_subcommand():
    p = build_parser()
    assert p.parse_args(["eval", "m", "-q"]).quiet is True
    assert p.parse_args(["-q", "eval", "m"]).quiet is True  # before it still works
    assert p.parse_args(["eval", "m"]).quiet is False
    assert p.parse_args(["run", "-q", "-v"]).verbose is True


def test_help_lists_every_alias_and_default(capsys):
    from mixq.models import MODELS

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(alias in text for alias in MODELS) and "gemma3-270m" in text and "boolq" in text
    for cmd in ("run", "quantize", "formats"):
        parser = build_parser()
        sub = next(a for a in parser._actions if a.dest == "command").choices[cmd]
        for action in sub._actions:
            if action.dest in ("help", "quiet", "verbose"):
                continue
            assert action.help, (cmd, action.dest)  # every option has help text
            if action.default not in (None, "", False, []) and action.option_strings:
                assert "default" in sub.formatter_class("x")._get_help_string(action), (cmd, action.dest)


def _no_load(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(api, "load_model", no_load)


def test_unknown_task_and_bad_format_exit_2_before_loading(monkeypatch, capsys):
    _no_load(monkeypatch)
    assert main(["-q", "eval", "smollm2-135m", "--format", "int4:g64", "--tasks", "piqa,boolqq"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) 'boolqq'" in err and "Traceback" not in err
    assert main(["eval", "smollm2-135m", "--format", "int4:g64", "--transform", "rotat"]) == 2
    assert "unknown part 'rotat'" in capsys.readouterr().err
    assert main(["run", "-q", "--candidates", "int4:g64,int2:gg"]) == 2
    assert "int2:gg" in capsys.readouterr().err


def test_non_utf8_data_file_exits_2_with_a_message(monkeypatch, tmp_path, tiny_loaded, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("na\xefve caf\xe9 ".encode("latin-1") * 200)
    monkeypatch.setattr(api, "load_model", lambda name, **placement: tiny_loaded)
    assert main(["eval", "tiny", "-q", "--data", str(bad), "--seqlen", "32", "--windows", "1"]) == 2
    err = capsys.readouterr().err
    assert "latin1.txt: not UTF-8 text (byte 2" in err and "Traceback" not in err


def test_encoder_exits_2_naming_the_class(monkeypatch, tiny_bert, capsys):
    from mixq.models import LoadedModel

    monkeypatch.setattr(api, "load_model", lambda name, **placement: LoadedModel("minilm", "causal_lm", tiny_bert, "fixture",
                                                                    encode=list))
    assert main(["eval", "minilm", "-q", "--format", "int8:ch"]) == 2
    assert "BertLMHeadModel (model_type 'bert') is an encoder" in capsys.readouterr().err


def test_progress_is_lines_off_a_terminal(capsys):
    from mixq.progress import LineProgress, TqdmProgress, no_progress

    p = build_parser()
    assert _progress(p.parse_args(["eval", "m", "-q"])) is no_progress
    prog = _progress(p.parse_args(["eval", "m"]))  # pytest's stderr is not a terminal
    assert isinstance(prog, LineProgress) and not isinstance(prog, TqdmProgress)
    lines = LineProgress(__import__("sys").stderr, min_seconds=0.0)
    for i in range(4):
        lines("fisher", i, 3)
    assert capsys.readouterr().err.strip().startswith("fisher: 3/3 in ")


def test_eval_table_prints_acc_and_acc_norm_columns():
    """Both columns per task; acc_norm '-' where the harness does not report it (BoolQ)."""
    from mixq.cli import eval_table

    row = {"label": "float", "bpw_blocks": 16.0, "bpw_all": 16.0, "ppl": 27.9, "kl": 0.0, "top1_agree": 1.0,
           "tasks": {"boolq": {"acc": 0.36, "acc_norm": None, "metric": "acc", "n": 100},
                     "piqa": {"acc": 0.6, "acc_norm": 0.62, "metric": "acc_norm", "n": 100}}}
    result = {"model": "m", "data": "wikitext2", "n_windows": 4, "seqlen": 256, "n_tokens": 1020, "rows": [row],
              "tasks": ["boolq", "piqa"], "task_limit": 100,
              "tokenization": {"bos": True, "bos_token": "<bos>"}}
    text = eval_table(result)
    header, _, line = text.splitlines()[1:4]
    assert header.split()[-8:] == ["boolq", "acc", "boolq", "acc_norm", "piqa", "acc", "piqa", "acc_norm"]
    assert line.split()[-4:] == ["0.360", "-", "0.600", "0.620"]
    assert "starts with the tokenizer's BOS '<bos>'" in text and "boolq, copa, winogrande" in text


@pytest.mark.real
def test_demo_plans_at_the_bits_of_the_uniform_formats(tiny_loaded, tmp_path, monkeypatch):
    """The demo measures once, plans at exactly the bits of uniform int3:g64 and int4:g64,
    and evaluates each plan beside its uniform format (tiny model, real WikiText-2 data)."""
    from conftest import shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("../shared/data (or $MIXQ_DATA_DIR) not present")
    monkeypatch.setenv("MIXQ_DATA_DIR", str(shared_data_dir()))
    from mixq.demo import MATCHED, run_demo

    stages = []
    res = run_demo(tiny_loaded, samples=2, seqlen=32, windows=2, out_dir=tmp_path / "demo",
                   stage=lambda i, n, t: stages.append(i))
    assert stages == [1, 2, 3, 4] and (tmp_path / "demo" / "sensitivity.json").is_file()
    labels = [r["label"] for r in res.eval["rows"]]
    assert labels == ["float", "int3:g64", "mixed @ 3.25", "int4:g64", "mixed @ 4.25"]
    rows = {r["label"]: r for r in res.eval["rows"]}
    for uniform, mixed in res.pairs:
        assert uniform in MATCHED
        assert rows[mixed]["bpw_blocks"] <= rows[uniform]["bpw_blocks"] + 1e-9
        assert len({str(o) for o in res.plans[mixed].options.values()}) >= 1
        assert (tmp_path / "demo" / f"plan_{rows[uniform]['bpw_blocks']:.2f}.json").is_file()
