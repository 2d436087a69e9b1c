"""mixq.data: paths, text windows, calibration sampling, tasks, CIFAR-10 split."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mixq.data import (
    TASK_NAMES,
    TEXT_DATASETS,
    LastWordExample,
    MCExample,
    calibration_windows,
    cifar10_split_indices,
    data_dir,
    data_file,
    load_cifar10,
    load_task,
    load_text,
    sample_windows,
    token_windows,
)
from mixq.data import paths
from mixq.errors import DataError, NotFoundError

TEXT = "The quick brown fox jumps over the lazy dog. " * 20  # 900 characters


# ---------------------------------------------------------------- token windows


def test_token_windows_are_exact_non_overlapping_slices(char_encode):
    ids = char_encode(TEXT)
    w = token_windows(char_encode, TEXT, seqlen=64, n_windows=5)
    assert w.shape == (5, 64) and w.dtype == torch.long
    for i in range(5):
        assert w[i].tolist() == ids[i * 64 : (i + 1) * 64]


def test_token_windows_all_full_windows(char_encode):
    w = token_windows(char_encode, TEXT, seqlen=100)
    assert w.shape == (len(TEXT) // 100, 100)
    assert w.flatten().tolist() == char_encode(TEXT)[: w.numel()]


def test_token_windows_too_few_tokens_says_counts(char_encode):
    with pytest.raises(DataError, match=r"900 tokens.*10 windows of 100 need 1000"):
        token_windows(char_encode, TEXT, seqlen=100, n_windows=10)
    with pytest.raises(DataError, match="fewer than one window"):
        token_windows(char_encode, "short", seqlen=100)
    with pytest.raises(DataError):
        token_windows(char_encode, TEXT, seqlen=1)


def test_sample_windows_seeded_and_contiguous(char_encode):
    ids = char_encode(TEXT)
    a = sample_windows(ids, seqlen=32, n_samples=8, seed=3)
    b = sample_windows(ids, seqlen=32, n_samples=8, seed=3)
    c = sample_windows(ids, seqlen=32, n_samples=8, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 32)
    text_ids = torch.tensor(ids)
    for row in a:  # every window is some contiguous slice of the text
        starts = [s for s in range(len(ids) - 31) if torch.equal(text_ids[s : s + 32], row)]
        assert starts
    with pytest.raises(DataError, match="fewer than one window"):
        sample_windows(ids[:10], seqlen=32, n_samples=1, seed=0)


def test_calibration_windows_from_a_file(tmp_path, char_encode):
    f = tmp_path / "calib.txt"
    f.write_bytes(TEXT.replace(". ", ".\r\n").encode())
    w = calibration_windows(char_encode, f, seqlen=16, n_samples=4, seed=0)
    assert w.shape == (4, 16)
    assert torch.equal(w, calibration_windows(char_encode, str(f), seqlen=16, n_samples=4, seed=0))
    assert "\r" not in load_text(f)


def test_windows_start_with_bos_where_the_tokenizer_adds_one(bos_encode, char_encode):
    """Gemma-style tokenizers add a BOS: every window is BOS + seqlen-1 text tokens, the text
    tokens consecutive across windows (so the scored tokens are exactly the text)."""
    w = token_windows(bos_encode, TEXT, seqlen=64, n_windows=3)
    ids = char_encode(TEXT)
    assert w.shape == (3, 64) and (w[:, 0] == 1).all()
    assert w[:, 1:].flatten().tolist() == ids[: 3 * 63]
    full = token_windows(bos_encode, TEXT, seqlen=100)
    assert full.shape[0] == len(ids) // 99
    # calibration windows too, seeded the same way
    c = calibration_windows(bos_encode, _write(TEXT), seqlen=32, n_samples=4, seed=0)
    assert c.shape == (4, 32) and (c[:, 0] == 1).all()
    for row in c[:, 1:]:
        assert any(ids[s : s + 31] == row.tolist() for s in range(len(ids) - 30))
    # a plain callable has no BOS: windows unchanged
    assert token_windows(char_encode, TEXT, seqlen=64, n_windows=3).flatten().tolist() == ids[:192]


def test_bos_convention_read_from_the_tokenizer(bos_encode):
    from mixq.data import bos_of, hf_encoder, tokenization_record

    assert bos_of(bos_encode) == 1 and bos_of(lambda t: [1]) is None
    rec = tokenization_record(bos_encode)
    assert rec["bos"] is True and rec["bos_id"] == 1 and rec["bos_token"] == "<bos>"

    class NoBos:  # defines a BOS token but never adds it (SmolLM2, Qwen2.5)
        bos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 128 for c in text]}

    enc = hf_encoder(NoBos())
    assert enc.bos_id is None and tokenization_record(enc)["bos"] is False


def _write(text: str):
    import tempfile
    from pathlib import Path

    f = Path(tempfile.mkdtemp()) / "t.txt"
    f.write_text(text)
    return f


def test_non_utf8_file_is_a_data_error(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(byte 3"):
        load_text(f)


def test_windows_longer_than_the_context_are_refused():
    from mixq.data import check_context

    check_context(256, 256)
    check_context(10_000, None)  # unknown context: not checked
    with pytest.raises(DataError, match="seqlen 512 is longer than the model's context of 256 positions"):
        check_context(512, 256)


def test_load_text_unknown_name():
    with pytest.raises(NotFoundError, match="wikitext2"):
        load_text("no-such-corpus")


# ---------------------------------------------------------------- paths


def test_missing_data_dir_names_every_place(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("MIXQ_DATA_DIR", str(missing))
    with pytest.raises(NotFoundError, match="MIXQ_DATA_DIR") as e:
        data_dir()
    assert str(missing) in str(e.value)
    with pytest.raises(NotFoundError) as e:
        data_file("ptb/ptb.test.txt")
    assert str(missing / "ptb" / "ptb.test.txt") in str(e.value)


def test_missing_file_in_existing_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXQ_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(NotFoundError, match="MIXQ_DATA_DIR") as e:
        load_text("ptb")
    assert str(tmp_path / "ptb" / "ptb.test.txt") in str(e.value)
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" a b c \n")
    assert load_text("ptb") == " a b c \n"


def test_default_candidates_without_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MIXQ_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    cands = paths.candidate_dirs()
    repo = paths.Path(paths.__file__).resolve().parents[3]
    assert cands[0] == repo.parent / "shared" / "data"
    assert tmp_path / "shared" / "data" in cands and tmp_path.parent / "shared" / "data" in cands


def test_mc_example_validation():
    MCExample(["a", "a"], [" b", " c"], 1)
    with pytest.raises(DataError):
        MCExample(["a"], [" b", " c"], 0)
    with pytest.raises(DataError):
        MCExample(["a", "a"], [" b", " c"], 2)
    with pytest.raises(NotFoundError, match="known tasks"):
        load_task("no-such-task")


# ---------------------------------------------------------------- real data

EXPECTED_ROWS = {
    "piqa": 1838,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "winogrande": 1267,
    "boolq": 3270,
    "copa": 100,
    "openbook_qa": 500,
    "lambada": 5153,
    "hellaswag": 10042,
}


@pytest.fixture
def real_data(data_dir, monkeypatch):
    monkeypatch.setenv("MIXQ_DATA_DIR", str(data_dir))
    return data_dir


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(TEXT_DATASETS))
def test_builtin_texts_load(real_data, name, char_encode):
    text = load_text(name)
    assert len(text) > 300_000 and "\r" not in text
    assert token_windows(char_encode, text, seqlen=128, n_windows=3).shape == (3, 128)


@pytest.mark.real
def test_wikitext2_raw_joined_with_blank_lines(real_data):
    text = load_text("wikitext2")
    assert text.startswith(" = Robert Boulter = \n\n Robert Boulter is")
    assert text.count("\n\n") == 2890 and "\n\n\n" not in text  # 2891 paragraphs


@pytest.mark.real
def test_calibration_on_test_split_warns(real_data, char_encode, caplog):
    with caplog.at_level(logging.WARNING, logger="mixq.data.text"):
        calibration_windows(char_encode, "ptb", seqlen=32, n_samples=2, seed=0)
    assert "test split" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mixq.data.text"):
        w = calibration_windows(char_encode, "ptb-valid", seqlen=32, n_samples=2, seed=0)
    assert w.shape == (2, 32) and "test split" not in caplog.text


@pytest.mark.real
@pytest.mark.parametrize("name", TASK_NAMES)
def test_tasks_load_with_official_row_counts(real_data, name):
    examples = load_task(name)
    assert len(examples) == EXPECTED_ROWS[name]
    assert load_task(name, limit=3) == examples[:3]
    for ex in examples:
        if name == "lambada":
            assert isinstance(ex, LastWordExample)
            assert ex.target.startswith(" ") and ex.target.strip() and ex.context == ex.context.rstrip()
        else:
            assert isinstance(ex, MCExample)
            assert all(c == c.rstrip() and c for c in ex.contexts)
            assert all(x.startswith(" ") and not x.startswith("  ") for x in ex.continuations)
            if name == "winogrande":
                assert len(set(ex.continuations)) == 1 and len(set(ex.contexts)) == 2
            else:
                assert len(set(ex.contexts)) == 1


@pytest.mark.real
def test_task_prompts(real_data):
    arc = load_task("arc_easy", limit=1)[0]
    assert arc.contexts[0].startswith("Question: ") and arc.contexts[0].endswith("?\nAnswer:")
    piqa = load_task("piqa", limit=1)[0]
    assert piqa.contexts[0].endswith("occupants?\nAnswer:")
    hs = load_task("hellaswag", limit=1)[0]
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. he" and hs.gold == 3
    assert hs.continuations[3] == " starts pulling up roofing on a roof."
    assert load_task("boolq", limit=1)[0].continuations == [" no", " yes"]
    lam = load_task("lambada")
    assert lam[0].target == " signs" and lam[0].context.endswith("I don't care about")
    assert sum(len(ex.target.split()) != 1 for ex in lam) == 6  # targets with line breaks, kept


@pytest.mark.real
def test_cifar10_split(real_data):
    calib, evl, all_ = (cifar10_split_indices(s) for s in ("calib", "eval", "all"))
    assert len(calib) == len(evl) == 5000
    assert not set(calib) & set(evl)
    assert np.array_equal(np.sort(np.concatenate([calib, evl])), all_)
    x, y = load_cifar10("calib")
    assert x.shape == (5000, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (5000,)
    with np.load(data_file("vision/cifar10_test_jpeg.npz")) as z:
        img, lab = z["images"][calib[7]], z["labels"][calib[7]]
    expect = (img[4, 5, 1] / 255.0 - 0.456) / 0.224  # pixel (row 4, col 5), green channel
    assert x[7, 1, 4, 5].item() == pytest.approx(expect, abs=1e-6)
    assert y[7].item() == lab
    with pytest.raises(DataError):
        cifar10_split_indices("train")
