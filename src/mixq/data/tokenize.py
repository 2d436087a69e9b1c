"""Tokenization as the model expects it: a BOS token where the tokenizer adds one.

Text is cut into windows from one long token stream, so the stream itself is encoded
without special tokens (`TextEncoder.__call__`). The tokenizer's own convention decides
whether each window (perplexity, calibration, sensitivity) and each zero-shot request
starts with a BOS token: `TextEncoder.bos_id` is that token, or None when the tokenizer
adds none (SmolLM2, Qwen2.5). Gemma-3 adds `<bos>` and scores garbage without it.

A plain callable `encode(text) -> ids` (a byte-level stand-in in tests) has no BOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

Encode = Callable[[str], Sequence[int]]

# Probes: the tokenizer's special tokens show up around any text, the empty one included.
_PROBES = ("", "Hello world")


@dataclass(frozen=True)
class TextEncoder:
    """A Hugging Face tokenizer as mixq uses it.

    Calling it encodes text without special tokens (a stream to cut windows from);
    `bos_id` is the token the tokenizer puts first (None when it puts none), which every
    window and every zero-shot request then starts with.
    """

    tokenizer: object = field(repr=False)
    bos_id: int | None

    def __call__(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def bos_token(self) -> str | None:
        if self.bos_id is None:
            return None
        return str(self.tokenizer.convert_ids_to_tokens(self.bos_id))


def tokenizer_bos(tokenizer) -> int | None:
    """The BOS id `tokenizer` puts before text when asked for its special tokens, or None.

    Read from what the tokenizer does (encode an empty probe, then a short text, with and
    without special tokens), not from its `bos_token` attribute alone: many tokenizers
    define a BOS they never add."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    for probe in _PROBES:
        try:
            plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
            full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
        except Exception:  # noqa: BLE001 -- `tokenizers` raises plain Exception (e.g. no [UNK] for the probe)
            continue
        return int(bos) if full and full[0] == bos and not (plain and plain[0] == bos) else None
    return None


def hf_encoder(tokenizer) -> TextEncoder:
    """The `TextEncoder` of a Hugging Face tokenizer, with the BOS convention it follows."""
    return TextEncoder(tokenizer, tokenizer_bos(tokenizer))


def bos_of(encode: Encode) -> int | None:
    """The BOS id every window of `encode`'s model starts with (None for plain callables)."""
    return encode.bos_id if isinstance(encode, TextEncoder) else None


def tokenization_record(encode: Encode) -> dict:
    """What artifacts record of the tokenization: whether windows start with a BOS, which."""
    bos = bos_of(encode)
    token = encode.bos_token if isinstance(encode, TextEncoder) else None
    return {"bos": bos is not None, "bos_id": bos, "bos_token": token,
            "convention": ("each window and zero-shot request starts with the tokenizer's BOS; the BOS itself "
                           "is never scored" if bos is not None else "no BOS: the tokenizer adds none")}
