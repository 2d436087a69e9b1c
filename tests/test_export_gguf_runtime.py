"""Exported GGUF files run by llama.cpp itself (the `llama-cpp-python` package): they load, and
llama.cpp's next-token distribution agrees with mixq's own evaluation of the same checkpoint.

Tolerances (mean KL(P_mixq || P_llama.cpp) per token, nats), from measured floors:
- unquantized weights (F32 file): llama.cpp and torch compute the same function in another
  order: measured 3e-8 on the tiny model, 7e-7 on SmolLM2 (2 windows x 256 tokens) -> bound
  FLOOR_F32_TINY;
- quantized weights: llama.cpp rounds the activations of a quantized dot product to 8 bits
  (Q8_0 / Q8_K blocks), which the float evaluation does not: measured 3.9e-5 (tiny) and
  0.0074 (SmolLM2 under a harsh plan with q2_k/q3_k) -> bounds FLOOR_QUANT_*, and at most a
  few percent of the KL the quantization itself costs against the float model.
"""

from __future__ import annotations

import pytest
import torch

from mixq import api
from mixq.eval.perplexity import _next_token_log_probs
from mixq.export import load_quantized
from mixq.models import LoadedModel
from mixq.option import parse_option
from mixq.plan import Plan

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (make test installs it)")
from mixq.eval.runtime import compare_gguf  # noqa: E402

from conftest import needs_data, needs_smollm2  # noqa: E402
from test_export_gguf import gguf_llama, mixed_plan  # noqa: E402,F401  (gguf_llama: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

FLOOR_F32_TINY = 1e-6  # measured 3e-8 (SmolLM2: 7e-7)
FLOOR_QUANT_TINY = 5e-4  # measured 3.9e-5 against a quantization cost of 0.011
FLOOR_QUANT_SMOLLM2 = 2e-2  # measured 0.0074 against a quantization cost of 0.906


def mixq_log_probs(folder, windows):
    """mixq's evaluation of a checkpoint: its dequantized float32 model's log-probabilities."""
    q = load_quantized(folder, packed=False)
    with torch.no_grad():
        return _next_token_log_probs(q.model, windows)  # (n, L-1, V)


@pytest.fixture(scope="module")
def tiny_windows():
    return torch.randint(0, 128, (3, 64), generator=torch.Generator().manual_seed(11))


def test_tiny_mixed_plan_runs_in_llama_cpp_as_mixq_evaluates_it(gguf_llama, char_encode, tmp_path, tiny_windows):
    loaded = LoadedModel(name="tiny-gguf", kind="causal_lm", model=gguf_llama, source="fixture", encode=char_encode)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"tok{i % 53} x{i % 7}" for i in range(4000)))
    api.quantize(loaded, tmp_path / "ck", plan=mixed_plan(loaded.units()), calib=str(calib), calib_samples=4,
                 calib_seqlen=32, fp32=True)
    api.export(tmp_path / "ck", tmp_path / "m.gguf", to="gguf", float_type="f32")
    ref = mixq_log_probs(tmp_path / "ck", tiny_windows)
    with torch.no_grad():
        float_ref = _next_token_log_probs(gguf_llama, tiny_windows)
    res = compare_gguf(tmp_path / "m.gguf", tiny_windows, {"mixq": lambda i: ref[i], "float": lambda i: float_ref[i]},
                       n_threads=1)
    assert res["mixq"]["kl"] < FLOOR_QUANT_TINY and res["mixq"]["top1_agree"] > 0.95
    # llama.cpp's difference is small next to what the quantization costs (measured 0.4%)
    assert res["mixq"]["kl"] < 0.03 * res["float"]["kl"]


def test_tiny_float_export_matches_torch(gguf_llama, char_encode, tmp_path, tiny_windows):
    """An unquantized export (fp32 units, f32 embeddings) computes what torch computes: this pins
    the tensor names, the q/k row permutation and the hyper-parameters."""
    loaded = LoadedModel(name="tiny-gguf", kind="causal_lm", model=gguf_llama, source="fixture", encode=char_encode)
    units = loaded.units()
    api.quantize(loaded, tmp_path / "ck", plan=Plan.uniform("tiny-gguf", units, "fp32"), fp32=True)
    api.export(tmp_path / "ck", tmp_path / "f.gguf", to="gguf", float_type="f32")
    with torch.no_grad():
        ref = _next_token_log_probs(gguf_llama, tiny_windows)
    res = compare_gguf(tmp_path / "f.gguf", tiny_windows, {"float": lambda i: ref[i]}, n_threads=1)["float"]
    assert res["kl"] < FLOOR_F32_TINY and res["top1_agree"] == 1.0


def test_folded_rotation_exports_and_runs_in_llama_cpp(gguf_llama, char_encode, tmp_path, tiny_windows):
    """`--rotate-residual` is the rotation that exports: the folded model (RMSNorm weights in
    the linears, residual stream rotated) quantized with GPTQ into GGUF types is a plain Llama
    GGUF. llama.cpp runs it as mixq evaluates the checkpoint, and its float export computes
    the original model's function."""
    import copy

    from mixq.models.load import fold_residual_rotation

    loaded = LoadedModel(name="tiny-gguf", kind="causal_lm", model=copy.deepcopy(gguf_llama), source="fixture",
                         encode=char_encode)
    fold_residual_rotation(loaded, 0)
    for n, m in loaded.model.named_modules():  # the norms now only normalise
        if n.endswith("norm"):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), n
    with torch.no_grad():
        original = _next_token_log_probs(gguf_llama, tiny_windows)
    units = loaded.units()
    api.quantize(loaded, tmp_path / "f", plan=Plan.uniform("tiny-gguf", units, "fp32"), fp32=True)
    api.export(tmp_path / "f", tmp_path / "f.gguf", to="gguf", float_type="f32")
    res = compare_gguf(tmp_path / "f.gguf", tiny_windows, {"original": lambda i: original[i]}, n_threads=1)
    assert res["original"]["kl"] < FLOOR_F32_TINY and res["original"]["top1_agree"] == 1.0  # measured 2.5e-8
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"tok{i % 53} x{i % 7}" for i in range(4000)))
    api.quantize(loaded, tmp_path / "q", plan=Plan.uniform("tiny-gguf", units, "q4_0+gptq"), calib=str(calib),
                 calib_samples=4, calib_seqlen=32, fp32=True)
    api.export(tmp_path / "q", tmp_path / "q.gguf", to="gguf", float_type="f32")
    ref = mixq_log_probs(tmp_path / "q", tiny_windows)
    res = compare_gguf(tmp_path / "q.gguf", tiny_windows, {"mixq": lambda i: ref[i], "original": lambda i: original[i]},
                       n_threads=1)
    # measured: KL 3.5e-5 to mixq's evaluation, 0.0134 to the original float model
    assert res["mixq"]["kl"] < FLOOR_QUANT_TINY and res["mixq"]["kl"] < 0.05 * res["original"]["kl"]


@needs_smollm2
@needs_data
@pytest.mark.real
@pytest.mark.slow
def test_smollm2_gguf_plan_agrees_with_mixq(tmp_path):
    """SmolLM2 under a plan of several GGUF types (k-quants where rows are multiples of 256),
    exported with the source GGUF's tokenizer metadata: llama.cpp loads it, tokenizes like the
    model, and its distribution agrees with mixq's evaluation of the checkpoint."""
    from mixq.data import load_text, token_windows

    loaded = api.load_model("smollm2-135m", device="cpu", dtype="float32")
    units = loaded.units()
    cycle = ["iq4_nl", "q4_0", "q5_0", "q8_0"]
    down = ["q4_k", "q3_k", "q6_k", "iq4_xs", "q5_k", "q2_k"]
    opts = {u.name: parse_option(down[u.block % 6] if u.role.endswith("down_proj") else cycle[i % 4])
            for i, u in enumerate(units)}
    api.quantize(loaded, tmp_path / "ck", plan=Plan(loaded.name, opts, {u.name: u.shape for u in units}), fp32=True)
    res = api.export(tmp_path / "ck", tmp_path / "m.gguf", to="gguf")
    assert res["metadata"].endswith(".gguf") and not res["warnings"]
    text = load_text("wikitext2")
    windows = token_windows(loaded.encode, text, 256, 2)
    vocab = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    sample = text[:2000]
    assert vocab.tokenize(sample.encode(), add_bos=False, special=False) == loaded.encode(sample)
    ref = mixq_log_probs(tmp_path / "ck", windows)
    with torch.no_grad():
        float_ref = _next_token_log_probs(loaded.model, windows)
    res = compare_gguf(tmp_path / "m.gguf", windows, {"mixq": lambda i: ref[i], "float": lambda i: float_ref[i]},
                       n_threads=2)
    # measured: KL 0.0074 to mixq's evaluation, 0.906 to the float model, top-1 agreement 0.91
    assert res["mixq"]["kl"] < FLOOR_QUANT_SMOLLM2 and res["mixq"]["kl"] < 0.02 * res["float"]["kl"]
    assert res["mixq"]["top1_agree"] > 0.85


def test_hf_bpe_tokenizer_is_written_as_llama_cpp_reads_it(tmp_path, char_encode):
    """A Hugging Face checkpoint with a byte-level BPE tokenizer.json: the GGUF carries its
    tokens, merges and pre-tokenizer, and llama.cpp splits text into the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = " ".join(f"The {w} of {i % 13} is {w[::-1]}, isn't it? 42" for i, w in
                    enumerate(["cat", "dog", "river", "mountain", "quantize", "llama"] * 40))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    loaded = LoadedModel(name="tiny-bpe", kind="causal_lm", model=model, source="fixture",
                         encode=lambda t: hf_tok(t, add_special_tokens=False)["input_ids"], tokenizer=hf_tok)
    api.quantize(loaded, tmp_path / "ck", plan=Plan.uniform("tiny-bpe", loaded.units(), "q8_0"), fp32=True)
    res = api.export(tmp_path / "ck", tmp_path / "t.gguf", to="gguf")
    assert not res["warnings"]  # the pre-tokenizer was recognised (byte-level: gpt-2)
    import gguf

    fields = gguf.GGUFReader(str(tmp_path / "t.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2" and fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors}  # tied head
    vocab = llama_cpp.Llama(model_path=str(tmp_path / "t.gguf"), vocab_only=True, verbose=False)
    sample = "The llama of 7 is amall, isn't it? 42 quantize the river"
    assert vocab.tokenize(sample.encode(), add_bos=False, special=False) == loaded.encode(sample)
    windows = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    ref = mixq_log_probs(tmp_path / "ck", windows)
    out = compare_gguf(tmp_path / "t.gguf", windows, {"mixq": lambda i: ref[i]}, n_threads=1)
    assert out["mixq"]["kl"] < FLOOR_QUANT_TINY
