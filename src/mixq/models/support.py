"""Which architectures mixq can quantize, and a clear refusal for the others.

mixq quantizes decoder-only causal language models whose transformer blocks it can find
(`model.layers.N`, `transformer.h.N`, `blocks.N`: Llama, Qwen2, Mistral, Gemma, Gemma-3,
Mixtral, OPT, GPT-2, Phi and their kin) and the CIFAR ResNets. An encoder (BERT,
RoBERTa, MiniLM), an encoder-decoder (T5, BART) or a vision transformer loaded as a causal
LM would get a newly initialised head and no quantizable unit: mixq refuses it, naming its
class, instead of printing a table with 0 units.
"""

from __future__ import annotations

from torch import nn

from mixq.errors import UnsupportedModelError

SUPPORTED = ("decoder-only causal LMs with blocks named model.layers.N / transformer.h.N / blocks.N (Llama, Qwen2, "
             "Mistral, Gemma, Gemma-3, Mixtral, OPT, GPT-2, Phi, SmolLM2, ...) and the built-in CIFAR ResNets")

# model_type values of encoder-only and vision models; loaded as causal LMs they are not one.
_ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie", "distilbert", "albert",
    "deberta", "deberta-v2", "mpnet", "modernbert", "nomic_bert", "megatron-bert", "rembert", "roc_bert",
    "data2vec-text",
})


# Encoder-decoders. Some load through AutoModelForCausalLM as their decoder alone (BART's
# BartForCausalLM drops the encoder and sets is_encoder_decoder=False on the config), so the
# model_type decides, not only the flag.
_ENCODER_DECODER_TYPES = frozenset({
    "t5", "mt5", "umt5", "longt5", "switch_transformers", "bart", "mbart", "plbart", "pegasus", "pegasus_x",
    "bigbird_pegasus", "marian", "blenderbot", "blenderbot-small", "led", "prophetnet", "xlm-prophetnet",
    "m2m_100", "nllb-moe", "fsmt", "whisper", "seamless_m4t", "encoder-decoder",
})


def kind_of(config) -> str | None:
    """'an encoder-decoder', 'an encoder' or 'a vision model' when the config says so, else None."""
    if config is None:
        return None
    model_type = str(getattr(config, "model_type", "") or "")
    if getattr(config, "is_encoder_decoder", False) or model_type in _ENCODER_DECODER_TYPES:
        return "an encoder-decoder"
    if model_type in {"vit", "deit", "beit", "swin", "convnext", "dinov2", "clip", "siglip"}:
        return "a vision model"
    if model_type in _ENCODER_TYPES:
        return "an encoder"
    return None


def unsupported(what: str, cls: str, why: str) -> UnsupportedModelError:
    """The error for model `what` of class `cls`, which is `why` (e.g. 'an encoder')."""
    return UnsupportedModelError(f"{what}: {cls} is {why}; mixq quantizes {SUPPORTED}")


def check_causal_lm(model: nn.Module, what: str = "model") -> None:
    """Raise `UnsupportedModelError` unless `model` is a decoder-only causal LM with blocks
    mixq knows. `what` names the model in the message (alias or path)."""
    from mixq.models.enumerate import llm_units

    cls = type(model).__name__
    config = getattr(model, "config", None)
    kind = kind_of(config)
    if kind is not None:
        raise unsupported(what, f"{cls} (model_type {getattr(config, 'model_type', '?')!r})", kind)
    if not llm_units(model):
        raise unsupported(what, cls, "a model with no decoder block that mixq can find (0 quantizable units)")


def context_length(model: nn.Module) -> int | None:
    """The number of positions the model was built for (`config.max_position_embeddings`),
    None when it does not say (CNNs, plain modules)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None
