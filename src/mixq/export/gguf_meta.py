"""The metadata of a GGUF file mixq writes: architecture hyper-parameters and tokenizer.

Two sources, in this order:
- a GGUF the model came from (the built-in `smollm2-135m` ships as one; `--metadata-from
  FILE.gguf` names one): every key/value of it is copied except the quantization keys
  (`general.file_type`, `general.quantization_version`), after checking that its shape keys
  (blocks, widths, heads, vocabulary) match the checkpoint's config.json;
- otherwise the checkpoint's config.json and tokenizer files, written the way llama.cpp's
  convert_hf_to_gguf.py writes a Llama model: `llama.*` hyper-parameters; a byte-level BPE
  tokenizer.json as `tokenizer.ggml.model = gpt2` with its tokens, token types and merges (the
  special tokens, merges and chat template through the `gguf` package's `SpecialVocab`) and a
  pre-tokenizer name recognised from tokenizer.json's pre_tokenizer (`BPE_PRE`) or given; a
  checkpoint without a tokenizer as `tokenizer.ggml.model = none` (llama.cpp then runs token
  ids only).

Only the Llama architecture (LlamaForCausalLM and models that share its layout, such as
SmolLM2) is written; any other is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

from mixq.errors import MixqError

SKIPPED_KEYS = ("general.file_type", "general.quantization_version", "general.architecture")
# keys of a source GGUF that must agree with config.json: GGUF key -> config attribute
SHAPE_KEYS = {"llama.block_count": "num_hidden_layers", "llama.embedding_length": "hidden_size",
              "llama.feed_forward_length": "intermediate_size", "llama.attention.head_count": "num_attention_heads",
              "llama.attention.head_count_kv": "num_key_value_heads"}
LLAMA_MODEL_TYPES = ("llama",)


def check_llama(config: dict, where: str) -> None:
    """Refuse configs that are not the Llama layout mixq writes."""
    if config.get("model_type") not in LLAMA_MODEL_TYPES:
        raise MixqError(f"{where}: GGUF export writes the Llama architecture; this model is "
                        f"{config.get('model_type')!r} ({', '.join(config.get('architectures') or [])})")
    scaling = config.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in ("linear", "default"):
        raise MixqError(f"{where}: rope scaling {scaling} is not written to GGUF by mixq (only linear)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise MixqError(f"{where}: {flag} = true is not the Llama layout mixq writes to GGUF")


def head_counts(config: dict) -> tuple[int, int]:
    """(attention heads, key/value heads) of a Llama config."""
    n_head = int(config["num_attention_heads"])
    return n_head, int(config.get("num_key_value_heads") or n_head)


def from_gguf(path: Path, config: dict) -> list[tuple]:
    """(key, value, value type, array sub-type) of every key of the GGUF at `path` but the
    quantization keys, after checking its shape keys against `config`."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise MixqError(f"{path}: metadata of architecture {arch!r}; GGUF export writes 'llama'")
    out = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in SKIPPED_KEYS:
            continue
        if key in SHAPE_KEYS and int(field.contents()) != int(config.get(SHAPE_KEYS[key]) or 0):
            raise MixqError(f"{path}: {key} = {field.contents()}, the checkpoint's config.json has "
                            f"{SHAPE_KEYS[key]} = {config.get(SHAPE_KEYS[key])}: this metadata describes another model")
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    return out


# tokenizer.json pre_tokenizer -> llama.cpp's pre-tokenizer name (tokenizer.ggml.pre)
LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def bpe_pre(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json pre_tokenizer, or None when it is
    not one mixq recognises: byte-level alone is 'gpt-2'; digits split one by one before
    byte-level is 'smollm' (StarCoder's rule, which SmolLM uses); Llama 3's split is
    'llama-bpe'."""
    if not pre_tokenizer:
        return None
    parts = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split" and LLAMA3_SPLIT in str(parts[0].get("pattern", {}).get("Regex", "")):
        return "llama-bpe"
    return None


def from_config(folder: Path, config: dict, tokenizer_pre: str | None = None) -> tuple[list[tuple], list[str]]:
    """(key/values, warnings) of a Llama checkpoint directory: hyper-parameters from
    config.json, the tokenizer from its tokenizer files (see the module docstring)."""
    from gguf import GGUFValueType as V

    n_head, n_kv = head_counts(config)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    kv = [("general.name", str(config.get("_name_or_path") or folder.name), V.STRING),
          ("llama.context_length", int(config.get("max_position_embeddings", 2048)), V.UINT32),
          ("llama.embedding_length", hidden, V.UINT32),
          ("llama.block_count", int(config["num_hidden_layers"]), V.UINT32),
          ("llama.feed_forward_length", int(config["intermediate_size"]), V.UINT32),
          ("llama.attention.head_count", n_head, V.UINT32),
          ("llama.attention.head_count_kv", n_kv, V.UINT32),
          ("llama.rope.freq_base", float(config.get("rope_theta", 10000.0)), V.FLOAT32),
          ("llama.attention.layer_norm_rms_epsilon", float(config.get("rms_norm_eps", 1e-6)), V.FLOAT32),
          ("llama.vocab_size", int(config["vocab_size"]), V.UINT32),
          ("llama.rope.dimension_count", head_dim, V.UINT32)]
    if head_dim != hidden // n_head:
        kv += [("llama.attention.key_length", head_dim, V.UINT32), ("llama.attention.value_length", head_dim, V.UINT32)]
    scaling = config.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) == "linear":
        kv += [("llama.rope.scaling.type", "linear", V.STRING),
               ("llama.rope.scaling.factor", float(scaling["factor"]), V.FLOAT32)]
    out = [(k, v, t, None) for k, v, t in kv]
    tok, warnings = _tokenizer(folder, config, tokenizer_pre)
    return out + tok, warnings


def _tokenizer(folder: Path, config: dict, tokenizer_pre: str | None) -> tuple[list[tuple], list[str]]:
    from gguf import GGUFValueType as V
    from gguf import SpecialVocab, TokenType

    n_vocab = int(config["vocab_size"])
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "tokenizer.model").is_file():
            raise MixqError(f"{folder}: a SentencePiece tokenizer (tokenizer.model) is not written by mixq; give the "
                            "model's own GGUF with --metadata-from FILE.gguf")
        return ([("tokenizer.ggml.model", "none", V.STRING, None)],
                ["the checkpoint has no tokenizer: the GGUF runs token ids only (tokenizer.ggml.model = none)"])
    doc = json.loads(path.read_text(encoding="utf-8"))
    model = doc.get("model", {})
    if model.get("type") != "BPE":
        raise MixqError(f"{path}: a {model.get('type')} tokenizer is not written by mixq (byte-level BPE only); give "
                        "the model's own GGUF with --metadata-from FILE.gguf")
    warnings = []
    pre = tokenizer_pre or bpe_pre(doc.get("pre_tokenizer"))
    if pre is None:
        pre = "default"
        warnings.append(f"pre-tokenizer of {path} not recognised: written as 'default' (llama.cpp may split text "
                        "differently from the model's tokenizer; give --tokenizer-pre NAME)")
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in doc.get("added_tokens", [])}
    for tid, t in added.items():
        vocab[t["content"]] = tid
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            t = added.get(i)
            types.append(int(TokenType.NORMAL if t is None else TokenType.CONTROL if t.get("special")
                             else TokenType.USER_DEFINED))
    kv = [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", pre, V.STRING, None),
          ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING), ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)]
    special = SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if special.merges:
        kv.append(("tokenizer.ggml.merges", list(special.merges), V.ARRAY, V.STRING))
    for typ, tid in special.special_token_ids.items():
        kv.append((f"tokenizer.ggml.{typ}_token_id", int(tid), V.UINT32, None))
    for typ, value in special.add_special_token.items():
        kv.append((f"tokenizer.ggml.add_{typ}_token", bool(value), V.BOOL, None))
    if special.chat_template:
        kv.append(("tokenizer.chat_template", str(special.chat_template), V.STRING, None))
    return kv, warnings
