"""What mixq refuses: architectures without decoder blocks it knows, and windows longer than
the model's context; both before any work, with the class or the limit named."""

from __future__ import annotations

import pytest
import torch

from mixq import api
from mixq.errors import DataError, UnsupportedModelError
from mixq.models import LoadedModel, load_model
from mixq.models.support import check_causal_lm, context_length


def test_encoder_is_refused_naming_the_class(tiny_bert):
    with pytest.raises(UnsupportedModelError, match=r"BertLMHeadModel \(model_type 'bert'\) is an encoder; "
                                                     r"mixq quantizes decoder-only causal LMs"):
        check_causal_lm(tiny_bert, "minilm")
    loaded = LoadedModel(name="minilm", kind="causal_lm", model=tiny_bert, source="fixture", encode=list)
    with pytest.raises(UnsupportedModelError, match="BertLMHeadModel"):
        loaded.units()  # never a table with 0 units


def test_decoder_passes(tiny_llama):
    check_causal_lm(tiny_llama)
    assert context_length(tiny_llama) == 256 and context_length(torch.nn.Linear(2, 2)) is None


def test_model_without_known_blocks_is_refused():
    class Odd(torch.nn.Module):  # a causal-LM-shaped module whose layers mixq cannot find
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(UnsupportedModelError, match="Odd is a model with no decoder block that mixq can find"):
        check_causal_lm(Odd(), "odd")


def test_encoder_directory_is_refused_at_load(tiny_bert, tmp_path):
    """An encoder checkpoint (config + weights) is refused right after loading, before the
    tokenizer is even looked for."""
    tiny_bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match="BertLMHeadModel"):
        load_model(str(tmp_path / "bert"))


@pytest.mark.parametrize("kind", ["t5", "bart", "vit"])
def test_encoder_decoder_and_vision_directories_are_refused(kind, tmp_path):
    """T5 does not load as a causal LM at all, BART loads as its decoder alone (the encoder
    dropped), ViT is a vision model: each is refused with its class and what it is."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                          num_heads=2))
        match = r"T5ForConditionalGeneration is an encoder-decoder"
    elif kind == "bart":
        model = tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=64, d_model=16, encoder_layers=1,
                                                              decoder_layers=1, encoder_attention_heads=2,
                                                              decoder_attention_heads=2, encoder_ffn_dim=32,
                                                              decoder_ffn_dim=32, max_position_embeddings=32))
        match = r"BartForCausalLM \(model_type 'bart'\) is an encoder-decoder"
    else:
        model = tf.ViTModel(tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, image_size=8, patch_size=4))
        match = r"ViTModel is a vision model"
    model.save_pretrained(tmp_path / kind)
    with pytest.raises(UnsupportedModelError, match=match):
        load_model(str(tmp_path / kind))


def test_eval_window_longer_than_context_is_refused_before_work(tiny_loaded, text_file):
    """tiny_llama has 256 positions: 512-token windows are refused, naming the limit."""
    calls = []
    progress = lambda *a: calls.append(a)  # noqa: E731
    with pytest.raises(DataError, match="eval seqlen 512 is longer than the model's context of 256 positions"):
        api.evaluate(tiny_loaded, formats=["int4:g32"], data=str(text_file), seqlen=512, windows=1, progress=progress)
    assert calls == []  # nothing ran
    with pytest.raises(DataError, match="calibration seqlen 300 is longer than the model's context of 256"):
        api.analyze(tiny_loaded, candidates=["int4:g32"], calib=str(text_file), samples=1, seqlen=300)


def test_unknown_task_and_bad_format_refused_before_the_model_loads(monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(api, "load_model", no_load)
    from mixq.errors import FormatError, NotFoundError

    with pytest.raises(NotFoundError, match=r"unknown task\(s\) 'piqaa'; known tasks: piqa"):
        api.evaluate("whatever", formats=["int4:g64"], tasks=["piqaa"])
    with pytest.raises(FormatError, match="int9"):
        api.evaluate("whatever", formats=["int9:g64"])
    with pytest.raises(FormatError):
        api.analyze("whatever", candidates=["int4:g64", "int4:g64+bogus"])
